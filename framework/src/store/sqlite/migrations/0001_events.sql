-- aftermath schema version 1: the event log and aggregate snapshots.
--
-- `position` is the rowid, assigned by the store's single writer thread, so
-- `$all` (ORDER BY position) is gap-free and in commit order.
CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    stream         TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    id             BLOB    NOT NULL UNIQUE,   -- the event id, 16 bytes
    event_type     TEXT    NOT NULL,
    payload        BLOB    NOT NULL,          -- JSON bytes
    metadata       TEXT    NOT NULL,          -- JSON of `Metadata`
    recorded_at    INTEGER NOT NULL,          -- unix time, microseconds (UTC)
    correlation_id BLOB    NOT NULL,          -- copy of metadata.correlation_id, 16 bytes
    causation_id   BLOB    NOT NULL,          -- copy of metadata.causation_id, 16 bytes
    UNIQUE (stream, version)
);

-- Filtered `$all` reads: one ordered range scan per requested event type.
CREATE INDEX events_by_type ON events (event_type, position);

-- The latest saved state of a stream; never replaced by an older version.
CREATE TABLE snapshots (
    stream   TEXT    PRIMARY KEY,
    version  INTEGER NOT NULL,
    state    BLOB    NOT NULL,                -- JSON bytes
    taken_at INTEGER NOT NULL                 -- unix time, microseconds (UTC)
);
