-- aftermath schema version 4: messages an inbox could not turn into commands,
-- kept with their raw bytes for operators.

CREATE TABLE aftermath_inbox_parked (
    inbox      TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    error      TEXT    NOT NULL,
    parked_at  INTEGER NOT NULL,              -- unix time, microseconds (UTC)
    PRIMARY KEY (inbox, message_id)
);
