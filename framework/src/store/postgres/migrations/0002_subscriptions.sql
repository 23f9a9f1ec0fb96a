-- aftermath PostgreSQL schema version 2: what subscribers persist beside the
-- log: checkpoints, leases, events skipped by policy, the reactors' effect
-- journal, and parked inbox messages.
--
-- Positions are `numeric(20, 0)`: a `Position` is a `u64` (for this backend
-- `transaction_id << 20 | seq`), which `bigint` cannot hold whole, and ORDER BY
-- position must follow `$all` order. The store binds and reads them as text.

-- How far each subscriber got. Projections also store the version of their
-- read model's shape (NULL for plain checkpoint-store users).
CREATE TABLE {schema}.checkpoints (
    name       text           PRIMARY KEY,
    position   numeric(20, 0) NOT NULL,
    version    integer,
    updated_at timestamptz    NOT NULL DEFAULT now()
);

-- One active owner per subscriber (or partition): the token increases at
-- every takeover and fences every checkpoint and journal write. Expiry is
-- the database's clock, so the workers' clocks never have to agree.
CREATE TABLE {schema}.leases (
    name       text        PRIMARY KEY,
    owner      text        NOT NULL,
    token      bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Events a subscriber skipped by an explicit policy, for operators.
CREATE TABLE {schema}.skipped (
    subscriber text           NOT NULL,
    position   numeric(20, 0) NOT NULL,
    stream     text           NOT NULL,
    version    bigint         NOT NULL,
    event_type text           NOT NULL,
    error      text           NOT NULL,
    skipped_at timestamptz    NOT NULL,
    PRIMARY KEY (subscriber, position)
);

-- The reactors' effect journal (their inbox): per (reactor, event id), what
-- happened to the effect.
CREATE TABLE {schema}.effects (
    reactor    text           NOT NULL,
    event_id   uuid           NOT NULL,
    position   numeric(20, 0) NOT NULL,
    stream     text           NOT NULL,
    event_type text           NOT NULL,
    state      text           NOT NULL,  -- started | done | failed | parked | retry_requested | blocked | skipped
    attempts   integer        NOT NULL,
    last_error text,
    created_at timestamptz    NOT NULL,
    updated_at timestamptz    NOT NULL,
    PRIMARY KEY (reactor, event_id)
);

-- Entries that hold their stream back, and dead letters, are few: index just those.
CREATE INDEX effects_held ON {schema}.effects (reactor, stream, position)
    WHERE state IN ('parked', 'retry_requested', 'blocked');

-- Retention cleanup of finished entries.
CREATE INDEX effects_finished ON {schema}.effects (updated_at)
    WHERE state IN ('done', 'skipped');

-- Messages an inbox could not turn into commands, kept with their raw bytes.
CREATE TABLE {schema}.inbox_parked (
    inbox      text        NOT NULL,
    message_id text        NOT NULL,
    subject    text        NOT NULL,
    payload    bytea       NOT NULL,
    error      text        NOT NULL,
    parked_at  timestamptz NOT NULL,
    PRIMARY KEY (inbox, message_id)
);
