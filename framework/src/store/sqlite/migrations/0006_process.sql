-- aftermath schema version 6: process managers' durable deadlines, and
-- reading one conversation (correlation id) across streams with the
-- reactors' effects on its events.

-- Deadlines waiting to fire: one row per (process, deadline id). The
-- instance's stream is the source of truth; this is the index the runner
-- polls for what is due.
CREATE TABLE aftermath_deadlines (
    process  TEXT    NOT NULL,
    id       BLOB    NOT NULL,                -- the deadline id, 16 bytes
    instance TEXT    NOT NULL,
    name     TEXT    NOT NULL,
    due_at   INTEGER NOT NULL,                -- unix time, microseconds (UTC)
    PRIMARY KEY (process, id)
);

-- What is due, earliest first (ties by id).
CREATE INDEX aftermath_deadlines_due ON aftermath_deadlines (process, due_at, id);

-- Cancelling every deadline of a completed instance.
CREATE INDEX aftermath_deadlines_instance ON aftermath_deadlines (process, instance);

-- `read_correlation`: one ordered range scan per correlation id.
CREATE INDEX events_by_correlation ON events (correlation_id, position);

-- `effects_for`: every reactor's journal entries of given events (the
-- primary key leads with the reactor).
CREATE INDEX aftermath_effects_by_event ON aftermath_effects (event_id);
