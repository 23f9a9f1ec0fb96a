-- aftermath PostgreSQL schema version 9: consumer groups and partitioned
-- deadlines.
--
-- `members` holds one row per worker of a consumer group (a partitioned
-- subscriber's workers): a heartbeat live until `expires_at` (the database's
-- clock), and the worker's presence session (as in `leases`), so that a
-- member whose process died is recognised at once.
CREATE TABLE {schema}.members (
    group_name   text        NOT NULL,
    instance     text        NOT NULL,
    owner        text        NOT NULL,
    joined_at    timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    holder_pid   integer,
    holder_start timestamptz,
    PRIMARY KEY (group_name, instance)
);

-- The partition of a deadline's instance: the stored stream hash (see
-- migration 3) of `<process>.process-<instance>`.
ALTER TABLE {schema}.aftermath_deadlines ADD COLUMN instance_hash bigint;
UPDATE {schema}.aftermath_deadlines
   SET instance_hash = {schema}.stream_hash(process || '.process-' || instance);
