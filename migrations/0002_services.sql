-- The shop's services, one schema each. Each service's worker writes only its own schema;
-- the orchestrator reads the catalogue (inventory.variants) to price and validate checkouts.

------------------------------------------------------------------------------------------------
-- Product / inventory: the Product aggregate with variants, their stock, reservations that
-- expire, and an audit trail of every stock movement.
CREATE SCHEMA IF NOT EXISTS inventory;

CREATE TABLE inventory.products (
    id          uuid PRIMARY KEY,
    name        text        NOT NULL,
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE inventory.variants (
    sku         text PRIMARY KEY CHECK (sku ~ '^[A-Za-z0-9._-]{1,64}$'),
    product_id  uuid        NOT NULL REFERENCES inventory.products (id) ON DELETE CASCADE,
    name        text        NOT NULL,
    price_minor bigint      NOT NULL CHECK (price_minor >= 0),
    currency    text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    quantity    integer     NOT NULL CHECK (quantity >= 0),
    reserved    integer     NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- available = quantity - reserved never goes below zero.
    CONSTRAINT available_not_negative CHECK (quantity - reserved >= 0)
);

CREATE INDEX variants_product ON inventory.variants (product_id);

-- One reservation per order. Its status is also the inventory service's idempotency record:
-- a repeated reserve or release for the order answers from it and changes nothing.
CREATE TABLE inventory.reservations (
    order_id    uuid PRIMARY KEY,
    saga_id     uuid        NOT NULL,
    status      text        NOT NULL
        CHECK (status IN ('active', 'released', 'consumed', 'expired', 'rejected')),
    lines       jsonb       NOT NULL,   -- [{"sku": ..., "quantity": ...}]
    expires_at  timestamptz NOT NULL,
    reason      text,                    -- why it was rejected or released
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE INDEX reservations_expiring ON inventory.reservations (expires_at) WHERE status = 'active';

CREATE TABLE inventory.stock_movements (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sku            text        NOT NULL REFERENCES inventory.variants (sku),
    kind           text        NOT NULL
        CHECK (kind IN ('restock', 'reserve', 'release', 'consume', 'expire', 'adjust')),
    quantity_delta integer     NOT NULL,
    reserved_delta integer     NOT NULL,
    order_id       uuid,
    note           text,
    at             timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX stock_movements_sku ON inventory.stock_movements (sku, at);
CREATE INDEX stock_movements_order ON inventory.stock_movements (order_id) WHERE order_id IS NOT NULL;

------------------------------------------------------------------------------------------------
-- Payments: one charge per saga step, refunds of charges. The unique keys make the payment
-- worker idempotent; the processor is called with the same idempotency key.
CREATE SCHEMA IF NOT EXISTS payments;

CREATE TABLE payments.charges (
    id              uuid PRIMARY KEY,
    saga_id         uuid        NOT NULL,
    step            text        NOT NULL,
    order_id        uuid        NOT NULL,
    idempotency_key text        NOT NULL UNIQUE,
    amount_minor    bigint      NOT NULL CHECK (amount_minor >= 0),
    currency        text        NOT NULL,
    -- 'pending': the processor is being (or was) called; its outcome is not recorded yet.
    -- 'voided': a refund came before the charge was recorded: a late charge is refunded at once
    -- and answers "cancelled".
    status          text        NOT NULL
        CHECK (status IN ('pending', 'succeeded', 'declined', 'refunded', 'voided')),
    processor_ref   text,
    decline_code    text,
    reason          text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    UNIQUE (saga_id, step)
);

CREATE TABLE payments.refunds (
    id            uuid PRIMARY KEY,
    charge_id     uuid        NOT NULL UNIQUE REFERENCES payments.charges (id),
    saga_id       uuid        NOT NULL,
    amount_minor  bigint      NOT NULL,
    currency      text        NOT NULL,
    processor_ref text        NOT NULL,
    created_at    timestamptz NOT NULL
);

------------------------------------------------------------------------------------------------
-- Shipping: one shipment per order, booked with the carrier.
CREATE SCHEMA IF NOT EXISTS shipping;

CREATE TABLE shipping.shipments (
    id              uuid PRIMARY KEY,
    saga_id         uuid        NOT NULL,
    order_id        uuid        NOT NULL UNIQUE,
    -- 'pending': the carrier is being (or was) called. 'voided': cancelled before the booking
    -- was recorded: a late booking is cancelled at once and answers "cancelled".
    status          text        NOT NULL
        CHECK (status IN ('pending', 'created', 'cancelled', 'voided', 'rejected')),
    carrier_ref     text,
    tracking_number text,
    address         jsonb       NOT NULL,
    lines           jsonb       NOT NULL,
    reason          text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

------------------------------------------------------------------------------------------------
-- Orders: the Order service's read model. An order is the data of its checkout saga, so it is
-- a view of the saga row, not a second copy that could drift from it: confirmed exactly when
-- the saga completed, in the same commit. The view reads format 1 of the checkout snapshot
-- (sagas::stepwise::Snapshot); a new snapshot format changes this view in the same migration.
CREATE SCHEMA IF NOT EXISTS orders;

CREATE INDEX sagas_checkout_order ON orchestrator.sagas (((snapshot -> 'data' ->> 'order_id')::uuid))
    WHERE saga_type = 'checkout';

CREATE VIEW orders.orders AS
SELECT (s.snapshot -> 'data' ->> 'order_id')::uuid                AS id,
       s.id                                                      AS saga_id,
       s.snapshot -> 'data' -> 'customer' ->> 'id'               AS customer_id,
       s.snapshot -> 'data' -> 'customer' ->> 'email'            AS customer_email,
       CASE s.status
           WHEN 'completed'   THEN 'confirmed'
           WHEN 'compensated' THEN 'cancelled'
           WHEN 'failed'      THEN 'needs_attention'
           ELSE 'pending'
       END                                                       AS status,
       (s.snapshot -> 'data' -> 'total' ->> 'minor')::bigint     AS total_minor,
       s.snapshot -> 'data' -> 'total' ->> 'currency'            AS currency,
       s.snapshot -> 'data' -> 'shipping_address'                AS shipping_address,
       s.created_at,
       s.updated_at
FROM orchestrator.sagas s
WHERE s.saga_type = 'checkout';

CREATE VIEW orders.order_lines AS
SELECT (s.snapshot -> 'data' ->> 'order_id')::uuid                AS order_id,
       l.ord::integer                                            AS line_no,
       l.line ->> 'sku'                                          AS sku,
       (l.line ->> 'quantity')::integer                          AS quantity,
       (l.line -> 'unit_price' ->> 'minor')::bigint              AS unit_price_minor
FROM orchestrator.sagas s,
     jsonb_array_elements(s.snapshot -> 'data' -> 'lines') WITH ORDINALITY AS l(line, ord)
WHERE s.saga_type = 'checkout';

------------------------------------------------------------------------------------------------
-- Notifications: what the notification service sent, once per domain event.
CREATE SCHEMA IF NOT EXISTS notifications;

CREATE TABLE notifications.sent (
    event_id   uuid PRIMARY KEY,
    kind       text        NOT NULL,
    recipient  text        NOT NULL,
    subject    text        NOT NULL,
    body       text        NOT NULL,
    sent_at    timestamptz NOT NULL
);
