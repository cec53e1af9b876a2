-- The checkout's read model as typed rows, written by the engine in the same commit as the
-- saga (the checkout definition's projection), instead of views that parsed the saga's
-- snapshot: the snapshot is no longer a contract between processes, and a text a client sent
-- can no longer make a read of every order fail. The workers check commands against these
-- rows; the notification service reads the address it writes to from them.
DROP VIEW orders.order_lines;
DROP VIEW orders.orders;

CREATE TABLE orders.orders (
    id                 uuid PRIMARY KEY,
    saga_id            uuid        NOT NULL UNIQUE,
    customer_id        text        NOT NULL,
    customer_email     text        NOT NULL,
    -- pending, confirmed, cancelled, needs_attention
    status             text        NOT NULL,
    total_minor        bigint      NOT NULL,
    currency           text        NOT NULL,
    shipping_address   jsonb       NOT NULL,
    payment_token_hint text        NOT NULL DEFAULT '',
    created_at         timestamptz NOT NULL
);

CREATE INDEX orders_customer ON orders.orders (customer_id, created_at);

CREATE TABLE orders.order_lines (
    order_id         uuid    NOT NULL,   -- of orders.orders; written in the same statement
    line_no          integer NOT NULL,
    saga_id          uuid    NOT NULL,
    sku              text    NOT NULL,
    quantity         integer NOT NULL,
    unit_price_minor bigint  NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

-- Orders of the checkouts stored so far, from their snapshots (format 1), once.
INSERT INTO orders.orders (id, saga_id, customer_id, customer_email, status, total_minor,
                           currency, shipping_address, payment_token_hint, created_at)
SELECT (s.snapshot -> 'data' ->> 'order_id')::uuid,
       s.id,
       s.snapshot -> 'data' -> 'customer' ->> 'id',
       s.snapshot -> 'data' -> 'customer' ->> 'email',
       CASE s.status
           WHEN 'completed'   THEN 'confirmed'
           WHEN 'compensated' THEN 'cancelled'
           WHEN 'failed'      THEN 'needs_attention'
           ELSE 'pending'
       END,
       (s.snapshot -> 'data' -> 'total' ->> 'minor')::bigint,
       s.snapshot -> 'data' -> 'total' ->> 'currency',
       (s.snapshot -> 'data' -> 'shipping_address')::jsonb,
       coalesce(s.snapshot -> 'data' ->> 'payment_token_hint', ''),
       s.created_at
  FROM orchestrator.sagas s
 WHERE s.saga_type = 'checkout';

INSERT INTO orders.order_lines (order_id, line_no, saga_id, sku, quantity, unit_price_minor)
SELECT (s.snapshot -> 'data' ->> 'order_id')::uuid,
       l.ord::integer,
       s.id,
       l.line ->> 'sku',
       (l.line ->> 'quantity')::integer,
       (l.line -> 'unit_price' ->> 'minor')::bigint
  FROM orchestrator.sagas s,
       json_array_elements(s.snapshot -> 'data' -> 'lines') WITH ORDINALITY AS l(line, ord)
 WHERE s.saga_type = 'checkout';

-- Who may read what is decided per table: the orders are the checkout's read model.
COMMENT ON TABLE orders.orders IS
    'The checkout''s read model: written by the orchestrator''s engine (its projection), read by the workers and the notification service.';

-- Signals are part of the platform: a service that does not know a saga's id names it by its
-- type and subject (an order id).
CREATE INDEX sagas_type_subject ON orchestrator.sagas (saga_type, subject) WHERE subject IS NOT NULL;
DROP INDEX orchestrator.sagas_subject;

-- The ids of effects are derived from the saga and the step (sagas::shop::ids): a compensation
-- names what it undoes. Reservations get one (they were keyed by order alone).
ALTER TABLE inventory.reservations ADD COLUMN id uuid;
CREATE UNIQUE INDEX reservations_id ON inventory.reservations (id) WHERE id IS NOT NULL;
