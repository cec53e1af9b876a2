-- Only sagas that have not ended are indexed by status. Completed and compensated sagas are
-- nearly all of the table; listing them newest first walks the primary key. Indexing them
-- cost an index entry at every saga's last update, and every VACUUM of the table read the
-- whole index (the largest of the table's, 26 MB of 59 after a 10-minute soak), a cost that
-- grew with the table until it stalled the hot path (BENCHMARKS.md).
DROP INDEX orchestrator.sagas_status_id;
CREATE INDEX sagas_in_flight ON orchestrator.sagas (status, id DESC)
    WHERE status NOT IN ('completed', 'compensated');
