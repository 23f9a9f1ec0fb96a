-- aftermath PostgreSQL schema version 5: process managers' durable
-- deadlines, and reading one conversation (correlation id) across streams
-- with the reactors' effects on its events.

-- Deadlines waiting to fire: one row per (process, deadline id). The
-- instance's stream is the source of truth; this is the index the runner
-- polls for what is due.
CREATE TABLE {schema}.aftermath_deadlines (
    process  text        NOT NULL,
    id       uuid        NOT NULL,
    instance text        NOT NULL,
    name     text        NOT NULL,
    due_at   timestamptz NOT NULL,
    PRIMARY KEY (process, id)
);

-- What is due, earliest first (ties by id).
CREATE INDEX aftermath_deadlines_due ON {schema}.aftermath_deadlines (process, due_at, id);

-- Cancelling every deadline of a completed instance.
CREATE INDEX aftermath_deadlines_instance ON {schema}.aftermath_deadlines (process, instance);

-- `read_correlation`: one ordered range scan per correlation id, in `$all`
-- order. Every row has `correlation_id` (a copy of metadata.correlation_id
-- that the append function has written since version 1).
CREATE INDEX events_by_correlation ON {schema}.events (correlation_id, transaction_id, seq);

-- `effects_for`: every reactor's journal entries of given events (the
-- primary key leads with the reactor).
CREATE INDEX effects_by_event ON {schema}.effects (event_id);
