-- The admin dashboard and API: operator accounts, their sessions, the audit log of what
-- operators did, a saga status for a failed saga an operator resolved by hand, and the
-- indexes that keep the dashboard's list filters and searches an index lookup whatever the
-- number of sagas.

ALTER TABLE orchestrator.sagas DROP CONSTRAINT sagas_status_check;
ALTER TABLE orchestrator.sagas ADD CONSTRAINT sagas_status_check
    CHECK (status IN ('running', 'compensating', 'parked', 'completed', 'compensated', 'failed',
                      'resolved'));

-- People who log in to the dashboard. The password is stored as an Argon2id PHC string, never
-- in clear; `role` is what they may do: a viewer reads, an operator also acts.
CREATE TABLE orchestrator.operators (
    name          text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    role          text        NOT NULL CHECK (role IN ('viewer', 'operator')),
    password_hash text        NOT NULL,
    disabled      boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Logged-in browser sessions. The cookie holds a random token; only its SHA-256 is stored, so a
-- read of this table does not give a session away. `csrf` is the synchronizer token every
-- write of the session must carry.
CREATE TABLE orchestrator.admin_sessions (
    token_hash bytea PRIMARY KEY,
    operator   text        NOT NULL REFERENCES orchestrator.operators (name) ON DELETE CASCADE,
    csrf       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX admin_sessions_expiry ON orchestrator.admin_sessions (expires_at);

-- Everything an operator did or tried (who, when, what, why, and what came of it). Append-only.
CREATE TABLE orchestrator.audit_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    actor          text        NOT NULL,
    role           text        NOT NULL,
    action         text        NOT NULL,   -- e.g. saga.retry_now, breaker.force, dead_letter.replay
    target         text        NOT NULL,   -- a saga id, a step, a dead letter's sequence
    reason         text        NOT NULL,
    outcome        text        NOT NULL,   -- done, or refused: why
    correlation_id text
);
CREATE INDEX audit_log_target ON orchestrator.audit_log (target, id DESC);

-- The dashboard's list searched by correlation id. (Every index on the saga table costs an
-- entry when a saga starts and another when it ends: the end is not a HOT update. So there is
-- none for the type filter: the shop's types are each a large part of the table, and a walk of
-- the primary key newest first finds a page of one type at once, deploy/bench-admin.) The other
-- filters use the primary key (ids are UUID v7: a time range is an id range), `sagas_in_flight`
-- (the statuses of sagas that have not ended, and now `resolved`), `sagas_in_flight_state`
-- (0020) and `sagas_type_subject` (an order id).
CREATE INDEX sagas_correlation ON orchestrator.sagas (correlation_id);
-- A customer's orders by email, like `orders_customer` by customer id.
CREATE INDEX orders_customer_email ON orders.orders (lower(customer_email), created_at);
