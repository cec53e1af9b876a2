-- The services' transactional outbox (runtime::outbox): the domain events a service's change
-- causes, written in the transaction of that change, published by the service's relay and
-- deleted once JetStream acknowledged them.
CREATE SCHEMA IF NOT EXISTS events;

CREATE TABLE events.outbox (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The event id, also its Nats-Msg-Id: an event written twice is one row.
    msg_id         text        NOT NULL UNIQUE,
    subject        text        NOT NULL,
    correlation_id text        NOT NULL,
    payload        json        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- The carrier's side of a shipment: the hand-over the fulfilment asked for, and what the
-- carrier reported since (each report once: its event id is the key).
ALTER TABLE shipping.shipments
    ADD COLUMN pickup_requested_at timestamptz,
    ADD COLUMN dispatched_at       timestamptz,
    ADD COLUMN delivered_at        timestamptz,
    ADD COLUMN lost_reason         text;

CREATE TABLE shipping.carrier_reports (
    event_id    text PRIMARY KEY,
    shipment_id uuid        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('dispatched', 'delivered', 'lost')),
    at          timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
