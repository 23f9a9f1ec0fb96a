-- aftermath schema version 2: what subscribers persist beside the log.

-- How far each subscriber got. Projections also store the version of their
-- read model's shape (NULL for plain checkpoint-store users).
CREATE TABLE aftermath_checkpoints (
    name       TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    version    INTEGER,
    updated_at INTEGER NOT NULL               -- unix time, microseconds (UTC)
);

-- One active owner per subscriber: the token increases at every takeover
-- and fences checkpoint writes.
CREATE TABLE aftermath_leases (
    name       TEXT    PRIMARY KEY,
    owner      TEXT    NOT NULL,
    token      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL               -- unix time, microseconds (UTC)
);

-- Events a subscriber skipped by an explicit policy, for operators.
CREATE TABLE aftermath_skipped (
    subscriber TEXT    NOT NULL,
    position   INTEGER NOT NULL,
    stream     TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    event_type TEXT    NOT NULL,
    error      TEXT    NOT NULL,
    skipped_at INTEGER NOT NULL,              -- unix time, microseconds (UTC)
    PRIMARY KEY (subscriber, position)
);
