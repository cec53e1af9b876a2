-- Partition ownership (orchestrator/src/partitions.rs).
--
-- Sagas hash to a fixed number of partitions (`sagas::wire::partition_of`: the low 32 bits of
-- the id, modulo the count). An orchestrator applies the replies, routed signals and timers of
-- the partitions whose lease it holds; its commits lock their lease rows (FOR KEY SHARE) at the
-- epoch it took them with, so an owner that lost a lease (paused past its expiry, cut off)
-- cannot commit in that partition: taking a lease raises its epoch, a key column, which waits
-- for the commits in flight and makes every later one of the old owner find nothing to lock.

-- The count, fixed once chosen: every id already stored hashes with it.
CREATE TABLE orchestrator.partitioning (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partitions int4 NOT NULL CHECK (partitions BETWEEN 1 AND 1024)
);

CREATE TABLE orchestrator.partition_leases (
    partition int4 PRIMARY KEY,
    -- Raised by every take-over: the fencing token.
    epoch int8 NOT NULL DEFAULT 0,
    -- The orchestrator instance holding it; NULL when released.
    owner text,
    -- Never taken: long expired (a time every client library can read).
    expires_at timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00',
    -- Makes epoch part of a key, so that raising it conflicts with FOR KEY SHARE.
    UNIQUE (partition, epoch)
) WITH (fillfactor = 50);

-- The live orchestrators (a heartbeat each): partitions are divided among them.
CREATE TABLE orchestrator.members (
    instance text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

-- The same function as `sagas::wire::partition_of`.
CREATE FUNCTION orchestrator.saga_partition(id uuid, partitions int4) RETURNS int4
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (('x' || right(replace(id::text, '-', ''), 8))::bit(32)::int8 % partitions)::int4;
