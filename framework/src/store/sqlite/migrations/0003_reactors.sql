-- aftermath schema version 3: the reactors' effect journal (their inbox).

CREATE TABLE aftermath_effects (
    reactor    TEXT    NOT NULL,
    event_id   BLOB    NOT NULL,              -- 16 bytes
    position   INTEGER NOT NULL,
    stream     TEXT    NOT NULL,
    event_type TEXT    NOT NULL,
    state      TEXT    NOT NULL,              -- started | done | failed | parked | retry_requested | blocked | skipped
    attempts   INTEGER NOT NULL,
    last_error TEXT,
    created_at INTEGER NOT NULL,              -- unix time, microseconds (UTC)
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (reactor, event_id)
);

-- Entries that hold their stream back, and dead letters, are few: index just those.
CREATE INDEX aftermath_effects_held ON aftermath_effects (reactor, stream, position)
    WHERE state IN ('parked', 'retry_requested', 'blocked');

-- Retention cleanup of finished entries.
CREATE INDEX aftermath_effects_finished ON aftermath_effects (updated_at)
    WHERE state IN ('done', 'skipped');
