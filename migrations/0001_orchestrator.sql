-- The orchestrator's own state: sagas, their append-only event log, the transactional outbox
-- and durable timers. Only the orchestrator writes here.
CREATE SCHEMA IF NOT EXISTS orchestrator;

CREATE TABLE orchestrator.sagas (
    id              uuid PRIMARY KEY,                 -- UUID v7: sorts by creation time
    saga_type       text        NOT NULL,
    state           text        NOT NULL,             -- leaf state of the machine, e.g. 'running'
    status          text        NOT NULL
        CHECK (status IN ('running', 'compensating', 'completed', 'compensated', 'failed')),
    snapshot        jsonb       NOT NULL,             -- the saga type's own versioned snapshot
    version         bigint      NOT NULL CHECK (version >= 1),  -- optimistic lock: +1 per commit
    correlation_id  text        NOT NULL,
    idempotency_key text UNIQUE,                      -- a client key maps to exactly one saga
    request_hash    bytea,                            -- to refuse a key reused with another body
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

-- The dashboard and operators list sagas by status, newest first.
CREATE INDEX sagas_status_created ON orchestrator.sagas (status, created_at DESC);

-- Every input a saga applied, with the effects it produced. Append-only: never updated.
-- Replaying the inputs of a saga in seq order through its machine gives its snapshot.
CREATE TABLE orchestrator.saga_events (
    saga_id     uuid        NOT NULL REFERENCES orchestrator.sagas (id),
    seq         integer     NOT NULL CHECK (seq >= 1),   -- = the saga version it produced
    kind        text        NOT NULL,                    -- 'started', 'step_succeeded', ...
    input       jsonb       NOT NULL,
    effects     jsonb       NOT NULL,
    state_after text        NOT NULL,
    at          timestamptz NOT NULL,                    -- the `now` the machine was given
    PRIMARY KEY (saga_id, seq)
);

-- Messages committed with a transition and not yet acknowledged by JetStream.
CREATE TABLE orchestrator.outbox (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id        uuid        NOT NULL,
    msg_id         text        NOT NULL,   -- Nats-Msg-Id: the command or event id
    subject        text        NOT NULL,
    correlation_id text        NOT NULL,
    payload        bytea       NOT NULL,
    created_at     timestamptz NOT NULL
);

-- Durable timers: one row per saga and timer key; setting a timer replaces the row.
CREATE TABLE orchestrator.timers (
    saga_id      uuid        NOT NULL REFERENCES orchestrator.sagas (id),
    key          text        NOT NULL,
    fire_at      timestamptz NOT NULL,
    timer        jsonb       NOT NULL,
    -- A claimed timer is leased to one orchestrator; if it dies, the lease runs out and
    -- another one fires it (firing twice is harmless: the machine fences stale timers).
    leased_until timestamptz,
    PRIMARY KEY (saga_id, key)
);

CREATE INDEX timers_due ON orchestrator.timers (fire_at);
