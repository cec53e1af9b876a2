-- The Product service's model as the brief draws it (workers/src/product): the Product
-- aggregate (variants with their inventory, attributes and images) and the Category aggregate
-- (a tree of categories with their attributes), each root versioned for optimistic locking,
-- and the domain events of both stored in an append-only table in the transaction of the
-- change (and published through events.outbox).

CREATE TABLE inventory.categories (
    id          uuid PRIMARY KEY,
    -- A sub-category belongs to its parent: deleting a category deletes its sub-tree.
    parent_id   uuid REFERENCES inventory.categories (id) ON DELETE CASCADE,
    name        text        NOT NULL,
    slug        text        NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,63}$'),
    version     bigint      NOT NULL DEFAULT 1 CHECK (version > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (parent_id IS DISTINCT FROM id)
);
CREATE INDEX categories_parent ON inventory.categories (parent_id);

-- The attributes a category's products describe themselves with (value objects).
CREATE TABLE inventory.category_attributes (
    category_id uuid    NOT NULL REFERENCES inventory.categories (id) ON DELETE CASCADE,
    name        text    NOT NULL,
    kind        text    NOT NULL CHECK (kind IN ('text', 'number', 'boolean')),
    required    boolean NOT NULL DEFAULT false,
    PRIMARY KEY (category_id, name)
);

-- The product: a category (a category that still has products cannot be deleted), a status,
-- and its version. Stock counters live on the variants under row locks and do not move the
-- version (a reservation must not invalidate an editor's ETag); everything else does.
ALTER TABLE inventory.products
    ADD COLUMN category_id uuid REFERENCES inventory.categories (id) ON DELETE RESTRICT,
    ADD COLUMN status      text        NOT NULL DEFAULT 'active'
        CHECK (status IN ('draft', 'active', 'archived')),
    ADD COLUMN version     bigint      NOT NULL DEFAULT 1 CHECK (version > 0),
    ADD COLUMN updated_at  timestamptz NOT NULL DEFAULT now();
CREATE INDEX products_category ON inventory.products (category_id, id);
CREATE INDEX products_status ON inventory.products (status, id);

CREATE TABLE inventory.product_attributes (
    product_id uuid NOT NULL REFERENCES inventory.products (id) ON DELETE CASCADE,
    name       text NOT NULL,
    value      text NOT NULL,
    PRIMARY KEY (product_id, name)
);
CREATE INDEX product_attributes_value ON inventory.product_attributes (name, value);

CREATE TABLE inventory.product_images (
    product_id uuid    NOT NULL REFERENCES inventory.products (id) ON DELETE CASCADE,
    position   integer NOT NULL CHECK (position >= 0),
    url        text    NOT NULL,
    alt        text    NOT NULL DEFAULT '',
    PRIMARY KEY (product_id, position)
);

-- Variants get ids of their own (the SKU stays their natural key, which orders name) and a
-- status: only an active variant can be reserved. The repository gives each new variant its
-- id; the default is for rows written by SQL of their own (a test's seed).
ALTER TABLE inventory.variants
    ADD COLUMN id     uuid NOT NULL DEFAULT gen_random_uuid(),
    ADD COLUMN status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive'));
CREATE UNIQUE INDEX variants_id ON inventory.variants (id);

CREATE TABLE inventory.variant_attributes (
    variant_id uuid NOT NULL REFERENCES inventory.variants (id) ON DELETE CASCADE,
    name       text NOT NULL,
    value      text NOT NULL,
    PRIMARY KEY (variant_id, name)
);

-- The aggregates' domain events, append-only: every event a change of a product or category
-- raised, with the root's version after it. The same events go to events.outbox to be
-- published.
CREATE TABLE inventory.domain_events (
    id             uuid PRIMARY KEY,
    aggregate      text        NOT NULL CHECK (aggregate IN ('product', 'category')),
    aggregate_id   uuid        NOT NULL,
    version        bigint      NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    correlation_id text        NOT NULL,
    at             timestamptz NOT NULL
);
CREATE INDEX domain_events_aggregate ON inventory.domain_events (aggregate_id, version);

-- A reservation made through the Product service's own API (the brief's reserveStock) is
-- for an order, not necessarily for a saga.
ALTER TABLE inventory.reservations ALTER COLUMN saga_id DROP NOT NULL;
