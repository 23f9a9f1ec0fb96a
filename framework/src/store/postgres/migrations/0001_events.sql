-- aftermath PostgreSQL schema version 1: the event log, aggregate snapshots and
-- the append function.
--
-- `{schema}` is replaced by the quoted schema name and `{name}` by the bare
-- name (checked to be lowercase letters, digits and underscores) before this
-- runs, in one transaction under the migration lock.
--
-- The order of `$all` is (transaction_id, seq): the id of the appending
-- transaction, then the index of the event within that transaction. Readers
-- only read rows of transactions below the snapshot horizon; `order.rs`
-- explains why that order can never be skipped.
CREATE TABLE {schema}.events (
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    seq            integer     NOT NULL,
    stream         text        NOT NULL,
    version        bigint      NOT NULL,
    id             uuid        NOT NULL,
    event_type     text        NOT NULL,
    payload        bytea       NOT NULL,           -- JSON bytes, exactly as appended
    metadata       jsonb       NOT NULL,           -- `Metadata` as JSON
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    correlation_id uuid        NOT NULL,           -- copy of metadata.correlation_id
    causation_id   uuid        NOT NULL,           -- copy of metadata.causation_id
    -- Insertion order, for diagnostics only. NEVER read `$all` by it: a number
    -- taken at insert becomes visible at commit, so a reader following it can
    -- pass a number whose transaction commits later and skip that event forever.
    global_seq     bigint      GENERATED ALWAYS AS IDENTITY,
    CONSTRAINT events_position PRIMARY KEY (transaction_id, seq),
    CONSTRAINT events_id UNIQUE (id),
    CONSTRAINT events_stream_version UNIQUE (stream, version),
    -- A position is transaction_id << 20 | seq.
    CONSTRAINT events_seq_range CHECK (seq >= 0 AND seq < 1048576),
    CONSTRAINT events_version_positive CHECK (version >= 1)
);

-- Filtered `$all` reads: one ordered range scan per requested event type.
CREATE INDEX events_by_type ON {schema}.events (event_type, transaction_id, seq);

-- The latest saved state of a stream; never replaced by an older version.
CREATE TABLE {schema}.snapshots (
    stream   text        PRIMARY KEY,
    version  bigint      NOT NULL,
    state    bytea       NOT NULL,                  -- JSON bytes
    taken_at timestamptz NOT NULL
);

-- Appends a batch to one stream, all or nothing, in the caller's transaction
-- (the store calls it as one autocommit statement).
--
-- Returns the stream's version before the append (`out_version`) and, when it
-- wrote, the transaction id and the `seq` of the first event. It writes
-- nothing (out_transaction NULL) when the version is outside
-- [p_min_version, p_max_version] or the batch is empty.
--
-- The stream's advisory lock is taken BEFORE the transaction has an id (the
-- first write assigns it): so of two appends to one stream, the later one
-- gets the larger transaction id, and a stream's versions follow `$all`
-- order. In strict mode a lock shared by every append of this schema is
-- taken first: transaction ids, hence positions, then follow commit order.
-- With p_notify it wakes listeners on the channel `{name}_events`.
CREATE FUNCTION {schema}.append(
    p_stream      text,
    p_min_version bigint,
    p_max_version bigint,
    p_strict      boolean,
    p_notify      boolean,
    p_ids         uuid[],
    p_types       text[],
    p_payloads    bytea[],
    p_metadata    text[],
    p_correlation uuid[],
    p_causation   uuid[],
    OUT out_version     bigint,
    OUT out_transaction xid8,
    OUT out_first_seq   integer
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_strict THEN
        PERFORM pg_advisory_xact_lock(hashtext('{name}.append'), 0);
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('{name}.stream'), hashtext(p_stream));
    -- A new statement, so a new snapshot (READ COMMITTED): it sees the commit
    -- of the previous holder of the lock.
    SELECT coalesce(max(e.version), 0) INTO out_version
      FROM {schema}.events e WHERE e.stream = p_stream;
    IF out_version < p_min_version OR out_version > p_max_version
       OR coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN;
    END IF;
    out_transaction := pg_current_xact_id();
    -- Appends earlier in the same transaction keep their seqs.
    SELECT coalesce(max(e.seq) + 1, 0) INTO out_first_seq
      FROM {schema}.events e WHERE e.transaction_id = out_transaction;
    INSERT INTO {schema}.events
        (transaction_id, seq, stream, version, id, event_type, payload, metadata,
         correlation_id, causation_id)
    SELECT out_transaction, out_first_seq + (b.n - 1)::integer, p_stream, out_version + b.n,
           b.id, b.event_type, b.payload, b.metadata::jsonb, b.correlation_id, b.causation_id
      FROM unnest(p_ids, p_types, p_payloads, p_metadata, p_correlation, p_causation)
           WITH ORDINALITY AS b(id, event_type, payload, metadata, correlation_id, causation_id, n);
    -- Only a wake-up for other processes' readers, delivered at commit.
    -- (PostgreSQL serializes the commits of notifying transactions.)
    IF p_notify THEN
        PERFORM pg_notify('{name}_events', '');
    END IF;
END
$$;
