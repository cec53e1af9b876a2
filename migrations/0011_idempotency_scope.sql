-- An idempotency key is its client's own: the same key from another customer is another
-- request. Keys are unique within their scope (for a checkout, the customer), so one customer
-- can never replay, or learn of, another's saga by guessing a key.
ALTER TABLE orchestrator.sagas ADD COLUMN idempotency_scope text NOT NULL DEFAULT '';
ALTER TABLE orchestrator.sagas DROP CONSTRAINT sagas_idempotency_key_key;
CREATE UNIQUE INDEX sagas_idempotency ON orchestrator.sagas (idempotency_scope, idempotency_key);
