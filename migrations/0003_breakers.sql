-- Circuit breakers: sagas park on a step whose breaker is open, and the engine records which
-- steps were blocked when it fed each input, so that the event log replays exactly.

ALTER TABLE orchestrator.sagas DROP CONSTRAINT sagas_status_check;
ALTER TABLE orchestrator.sagas ADD CONSTRAINT sagas_status_check
    CHECK (status IN ('running', 'compensating', 'parked', 'completed', 'compensated', 'failed'));

-- The step a parked saga waits on; the unparker resumes sagas by it.
ALTER TABLE orchestrator.sagas ADD COLUMN parked_on text;
CREATE INDEX sagas_parked ON orchestrator.sagas (parked_on, created_at) WHERE parked_on IS NOT NULL;

-- The steps whose breaker was open when the input was applied (NULL: none).
ALTER TABLE orchestrator.saga_events ADD COLUMN blocked jsonb;

-- What an operator forced, shared by every orchestrator.
CREATE TABLE orchestrator.breaker_overrides (
    step       text PRIMARY KEY,
    force      text        NOT NULL CHECK (force IN ('open', 'closed')),
    reason     text        NOT NULL DEFAULT '',
    set_at     timestamptz NOT NULL
);
