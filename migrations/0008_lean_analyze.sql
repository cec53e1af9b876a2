-- Statistics only where a plan can use them. ANALYZE samples 300 rows per unit of the largest
-- statistics target of a table's columns (30,000 by default) and summarises every column; in
-- a 20-second run at 500 sagas/s that took 30 % of PostgreSQL's time (BENCHMARKS.md).
--
-- The event log is read only by its primary key, and the JSON documents (snapshots, outbox
-- payloads, timers, order lines) are never filtered or joined on: no statistics (target 0
-- leaves a column out, and a table with none samples only what it needs to count its rows).
-- The saga table's plain columns keep a small sample: a list by status or a lookup by
-- subject needs a rough picture only.
ALTER TABLE orchestrator.saga_events
    ALTER COLUMN saga_id SET STATISTICS 0,
    ALTER COLUMN seq SET STATISTICS 0,
    ALTER COLUMN kind SET STATISTICS 0,
    ALTER COLUMN input SET STATISTICS 0,
    ALTER COLUMN effects SET STATISTICS 0,
    ALTER COLUMN state_after SET STATISTICS 0,
    ALTER COLUMN at SET STATISTICS 0,
    ALTER COLUMN blocked SET STATISTICS 0;
ALTER TABLE orchestrator.sagas
    ALTER COLUMN snapshot SET STATISTICS 0,
    ALTER COLUMN request_hash SET STATISTICS 0,
    ALTER COLUMN id SET STATISTICS 10,
    ALTER COLUMN saga_type SET STATISTICS 10,
    ALTER COLUMN state SET STATISTICS 10,
    ALTER COLUMN status SET STATISTICS 10,
    ALTER COLUMN version SET STATISTICS 10,
    ALTER COLUMN correlation_id SET STATISTICS 10,
    ALTER COLUMN idempotency_key SET STATISTICS 10,
    ALTER COLUMN created_at SET STATISTICS 10,
    ALTER COLUMN updated_at SET STATISTICS 10,
    ALTER COLUMN parked_on SET STATISTICS 10,
    ALTER COLUMN subject SET STATISTICS 10;
ALTER TABLE orchestrator.outbox ALTER COLUMN payload SET STATISTICS 0;
ALTER TABLE orchestrator.timers ALTER COLUMN timer SET STATISTICS 0;
ALTER TABLE inventory.reservations ALTER COLUMN lines SET STATISTICS 0;
ALTER TABLE shipping.shipments
    ALTER COLUMN address SET STATISTICS 0,
    ALTER COLUMN lines SET STATISTICS 0;
ALTER TABLE notifications.sent ALTER COLUMN body SET STATISTICS 0;

-- The queue-like tables empty and fill again all the time. VACUUM gives the empty pages at
-- the end of a table back to the file system by default, under an ACCESS EXCLUSIVE lock that
-- makes every commit inserting into the table wait (stalls of up to a second and a half at
-- 500 sagas/s, BENCHMARKS.md); the pages would be needed again a moment later anyway.
ALTER TABLE orchestrator.outbox SET (vacuum_truncate = false);
ALTER TABLE orchestrator.timers SET (vacuum_truncate = false);
