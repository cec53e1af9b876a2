-- The fulfilment saga's read model, written by the engine in the commit of each of its
-- transitions (sagas::fulfilment::FULFILMENTS): one row per order it ships. The workers check
-- the fulfilment's commands against it (the saga is the fulfilment of the order it names).
CREATE TABLE orders.fulfilments (
    order_id        uuid PRIMARY KEY,
    saga_id         uuid        NOT NULL UNIQUE,
    -- preparing, shipped, delivered, cancelling, cancelled, needs_attention
    status          text        NOT NULL,
    shipment_id     uuid        NOT NULL,
    tracking_number text,
    dispatched_at   timestamptz,
    delivered_at    timestamptz,
    -- What an operator must look at, when the status is needs_attention.
    case_reason     text,
    refunded        boolean     NOT NULL DEFAULT false,
    restocked       boolean     NOT NULL DEFAULT false,
    started_at      timestamptz NOT NULL
);

CREATE INDEX fulfilments_attention ON orders.fulfilments (started_at) WHERE status = 'needs_attention';

COMMENT ON TABLE orders.fulfilments IS
    'The fulfilment''s read model: written by the orchestrator''s engine (its projection), read by the workers and the Order service.';

-- A reservation the checkout consumed is picked and packed by the fulfilment, or put back on
-- the shelf (restocked) when the fulfilment is undone before the parcel left.
ALTER TABLE inventory.reservations DROP CONSTRAINT reservations_status_check;
ALTER TABLE inventory.reservations ADD CONSTRAINT reservations_status_check
    CHECK (status IN ('active', 'released', 'consumed', 'expired', 'rejected', 'picked', 'restocked'));
