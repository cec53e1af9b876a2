-- The Order service's history of each order: every event of the Order, Payment and Shipping
-- services that names it, once (the event id is the key), as its subscriber received them.
CREATE TABLE orders.history (
    event_id    uuid PRIMARY KEY,
    order_id    uuid        NOT NULL,
    source      text        NOT NULL,
    type        text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX history_order ON orders.history (order_id, occurred_at);
