-- Sagas of one status, newest first, are listed by id (UUID v7: creation order), with keyset
-- paging on the id; sagas started in one batch share their created_at, so it cannot page.
DROP INDEX orchestrator.sagas_status_created;
CREATE INDEX sagas_status_id ON orchestrator.sagas (status, id DESC);
