-- payments.charges.idempotency_key is the saga id and the step (`<saga>:<step>`, the key the
-- processor is called with), so UNIQUE (saga_id, step) already makes it unique. Its own unique
-- index was a second arbiter: two deliveries of one command inserting at once could fail on it
-- (a unique violation, the whole batch retried) instead of taking ON CONFLICT (saga_id, step),
-- and every charge paid for one more index entry. A check keeps the key what it is said to be.
ALTER TABLE payments.charges DROP CONSTRAINT charges_idempotency_key_key;
ALTER TABLE payments.charges
    ADD CONSTRAINT charges_idempotency_key_is_saga_and_step
    CHECK (idempotency_key = saga_id::text || ':' || step);
