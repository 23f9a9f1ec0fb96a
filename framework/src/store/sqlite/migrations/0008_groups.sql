-- aftermath schema version 8: consumer groups and partitioned deadlines.
--
-- `aftermath_members` holds one row per worker of a consumer group (a
-- partitioned subscriber's workers): a heartbeat that expires at
-- `expires_at` (microseconds since the epoch), and the worker's OS process
-- (as in `aftermath_leases`), so a worker on the same machine sees at once
-- that a member is gone.
CREATE TABLE aftermath_members (
    group_name   TEXT    NOT NULL,
    instance     TEXT    NOT NULL,
    owner        TEXT    NOT NULL,
    joined_at    INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    holder_pid   INTEGER,
    holder_start TEXT,
    PRIMARY KEY (group_name, instance)
);

-- The partition of a deadline's instance: the stream hash of
-- `<process>.process-<instance>` with its top bit flipped, so that signed
-- order is the hash's order and a partition is one BETWEEN. Existing rows
-- get it from the migration code (SQLite has no hash function).
ALTER TABLE aftermath_deadlines ADD COLUMN instance_hash INTEGER;
