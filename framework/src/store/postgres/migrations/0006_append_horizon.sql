-- aftermath PostgreSQL schema version 6: a horizon that waits only for this
-- store's appends, and positions that survive a logical move of the log.
--
-- `order.rs` writes down why a reader can never skip with this horizon.
--
-- 1. Every append holds the store's append lock, a shared transaction-level
--    advisory lock on (hashtext('{name}.append'), 1), taken before the
--    appending transaction has an id (strict mode still takes the exclusive
--    lock (hashtext('{name}.append'), 0) first). Readers
--    read below `{schema}.horizon(snapshot)`: the smallest id among the
--    transactions of the reader's snapshot that were running and either
--    hold the append lock or have since committed events to the log; the
--    snapshot's xmax when there is none. Transactions that do not append to
--    this store (read-model writes, other schemas, other databases, prepared
--    transactions of other applications) no longer hold readers back.
--
-- 2. A stored `transaction_id` is the appending transaction's id plus
--    `log_base.position_offset`. The offset is 0 until the log is moved to a
--    cluster whose transaction counter is behind the stored ids (pg_dump and
--    restore, a logical-replication cutover, a cloud migration): then
--    `{schema}.rebase_positions()`, which every store runs when it opens,
--    raises it so that new appends sort after every restored event, and
--    every restored event is below the horizon. Stored positions (events,
--    checkpoints, journals) never change.

CREATE TABLE {schema}.log_base (
    singleton       boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    position_offset bigint      NOT NULL CHECK (position_offset >= 0),
    rebased_at      timestamptz
);
INSERT INTO {schema}.log_base (position_offset) VALUES (0);

-- The append function, same signature as version 3 (older builds call it
-- too, so they take the append lock as well). Changes: the append lock comes
-- first; the offset is added to the transaction id; the seq lookup only
-- runs when the transaction had written before (otherwise no event of it
-- can exist yet).
CREATE OR REPLACE FUNCTION {schema}.append(
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
    p_stream_hash bigint,
    OUT out_version     bigint,
    OUT out_transaction xid8,
    OUT out_first_seq   integer
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_had_id boolean := pg_current_xact_id_if_assigned() IS NOT NULL;
    v_offset bigint;
BEGIN
    -- A transaction that already has an id must already hold the append
    -- lock (an earlier append of the same transaction): otherwise a reader
    -- may have judged it "not appending" and read past its id.
    IF v_had_id AND NOT EXISTS (
        SELECT 1 FROM pg_locks l
         WHERE l.pid = pg_backend_pid() AND l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
           AND l.classid = hashtext('{name}.append')::oid AND l.objid = 1 AND l.objsubid = 2)
    THEN
        RAISE EXCEPTION 'an append to {schema} must be the first write of its transaction'
            USING ERRCODE = '55000',
                  HINT = 'append before writing anything else in the transaction, or take the append lock first: SELECT pg_advisory_xact_lock_shared(hashtext(''{name}.append''), 1)';
    END IF;
    IF p_strict THEN
        PERFORM pg_advisory_xact_lock(hashtext('{name}.append'), 0);
    END IF;
    PERFORM pg_advisory_xact_lock_shared(hashtext('{name}.append'), 1);
    PERFORM pg_advisory_xact_lock(hashtext('{name}.stream'), hashtext(p_stream));
    -- A new statement, so a new snapshot (READ COMMITTED): it sees the commit
    -- of the previous holder of the stream lock.
    SELECT coalesce(max(e.version), 0) INTO out_version
      FROM {schema}.events e WHERE e.stream = p_stream;
    IF out_version < p_min_version OR out_version > p_max_version
       OR coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN;
    END IF;
    SELECT b.position_offset INTO v_offset FROM {schema}.log_base b;
    IF v_offset = 0 THEN
        out_transaction := pg_current_xact_id();
    ELSE
        out_transaction := (pg_current_xact_id()::text::bigint + v_offset)::text::xid8;
    END IF;
    IF v_had_id THEN
        SELECT coalesce(max(e.seq) + 1, 0) INTO out_first_seq
          FROM {schema}.events e WHERE e.transaction_id = out_transaction;
    ELSE
        out_first_seq := 0;
    END IF;
    INSERT INTO {schema}.events
        (transaction_id, seq, stream, version, id, event_type, payload, metadata,
         correlation_id, causation_id, stream_hash)
    SELECT out_transaction, out_first_seq + (b.n - 1)::integer, p_stream, out_version + b.n,
           b.id, b.event_type, b.payload, b.metadata::jsonb, b.correlation_id, b.causation_id,
           p_stream_hash
      FROM unnest(p_ids, p_types, p_payloads, p_metadata, p_correlation, p_causation)
           WITH ORDINALITY AS b(id, event_type, payload, metadata, correlation_id, causation_id, n);
    IF p_notify THEN
        PERFORM pg_notify('{name}_events', '');
    END IF;
END
$$;

-- The horizon of a reader whose statement's snapshot is `p_snapshot` (pass
-- `pg_current_snapshot()` of the reading statement), in stored positions
-- (offset added). Rows with `transaction_id` below it are final for that
-- snapshot. The append lock holders are read BEFORE any transaction's
-- status: see `order.rs` for why that order matters.
CREATE FUNCTION {schema}.horizon(p_snapshot pg_snapshot) RETURNS xid8
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_offset  bigint;
    v_horizon xid8 := pg_snapshot_xmax(p_snapshot);
    v_holders bigint[];
    v_running xid8[];
    v_status  text;
    t         xid8;
BEGIN
    SELECT b.position_offset INTO v_offset FROM {schema}.log_base b;
    SELECT array_agg(x ORDER BY x) INTO v_running FROM pg_snapshot_xip(p_snapshot) x;
    IF v_running IS NOT NULL THEN
        -- The ids (low 32 bits) of the transactions holding the append lock
        -- now: their own id lock shares their virtual transaction id (also
        -- for prepared transactions, whose pid is NULL). One read of the
        -- lock table.
        WITH l AS MATERIALIZED (
            SELECT locktype, database, classid, objid, objsubid, virtualtransaction,
                   transactionid, granted
              FROM pg_locks)
        SELECT coalesce(array_agg(x.transactionid::text::bigint), '{}') INTO v_holders
          FROM l a JOIN l x ON x.virtualtransaction = a.virtualtransaction
         WHERE a.locktype = 'advisory' AND a.granted
           AND a.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
           AND a.classid = hashtext('{name}.append')::oid AND a.objid = 1 AND a.objsubid = 2
           AND x.locktype = 'transactionid' AND x.granted;
        FOREACH t IN ARRAY v_running LOOP
            IF (t::text::bigint % 4294967296) = ANY (v_holders) THEN
                v_horizon := t;
                EXIT;
            END IF;
            v_status := pg_xact_status(t);
            -- Still running without the lock: it never appends (an append
            -- must be its transaction's first write). Aborted: no rows.
            CONTINUE WHEN v_status IN ('in progress', 'aborted');
            -- Ended since the snapshot (or unknown): this statement's fresh
            -- snapshot sees all its rows if it committed; if it appended
            -- here, the reader's snapshot does not see them.
            IF EXISTS (SELECT 1 FROM {schema}.events e
                        WHERE e.transaction_id = (t::text::bigint + v_offset)::text::xid8) THEN
                v_horizon := t;
                EXIT;
            END IF;
        END LOOP;
    END IF;
    IF v_offset = 0 THEN
        RETURN v_horizon;
    END IF;
    RETURN (v_horizon::text::bigint + v_offset)::text::xid8;
END
$$;

-- Re-bases positions after a logical move (see 2. above); a no-op (one
-- index probe) otherwise. Returns the offset in force and whether it was
-- raised now.
CREATE FUNCTION {schema}.rebase_positions(OUT out_offset bigint, OUT out_rebased boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_last bigint;
    v_next bigint;
BEGIN
    out_rebased := false;
    SELECT b.position_offset INTO out_offset FROM {schema}.log_base b;
    SELECT e.transaction_id::text::bigint INTO v_last
      FROM {schema}.events e ORDER BY e.transaction_id DESC LIMIT 1;
    v_next := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    IF v_last IS NULL OR v_last < v_next + out_offset THEN
        RETURN;
    END IF;
    -- Moved. No append may run while the offset changes: appends read it
    -- under the append lock.
    PERFORM pg_advisory_xact_lock(hashtext('{name}.append'), 1);
    SELECT b.position_offset INTO out_offset FROM {schema}.log_base b FOR UPDATE;
    SELECT e.transaction_id::text::bigint INTO v_last
      FROM {schema}.events e ORDER BY e.transaction_id DESC LIMIT 1;
    v_next := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    IF v_last < v_next + out_offset THEN
        RETURN;
    END IF;
    -- Every id handed out from now on is >= v_next, so every new stored id
    -- is > v_last.
    out_offset := v_last - v_next + 1;
    UPDATE {schema}.log_base SET position_offset = out_offset, rebased_at = now();
    out_rebased := true;
END
$$;

-- Type-filtered reads of `$all` (optionally of one partition: the hashes in
-- [p_first_hash, p_last_hash]): each wanted type contributes at most
-- `p_limit` keys from its own ordered range of `events_by_type`, and only
-- the first `p_limit` of them are fetched from the table. A function so it
-- can turn bitmap scans off: without fresh planner statistics the planner
-- takes a bitmap scan plus a sort of every remaining row of a type (measured:
-- 300 ms against 3 ms a page of 1,000 on 200k events). STABLE: it runs with
-- the calling statement's snapshot, which the horizon is computed from too.
CREATE FUNCTION {schema}.read_typed(
    p_after_transaction xid8,
    p_after_seq         integer,
    p_limit             bigint,
    p_types             text[],
    p_first_hash        bigint,
    p_last_hash         bigint
) RETURNS TABLE (transaction_id xid8, seq integer, stream text, version bigint, id uuid,
                 event_type text, payload bytea, metadata text, recorded_at timestamptz)
LANGUAGE sql STABLE
SET enable_bitmapscan = off
AS $$
SELECT e.transaction_id, e.seq, e.stream, e.version, e.id, e.event_type, e.payload,
       e.metadata::text, e.recorded_at
  FROM {schema}.events e
  JOIN (SELECT k.transaction_id AS t, k.seq AS s
          FROM unnest(p_types) AS wanted(event_type)
         CROSS JOIN LATERAL (
               SELECT x.transaction_id, x.seq FROM {schema}.events x
                WHERE x.event_type = wanted.event_type
                  AND (x.transaction_id, x.seq) > (p_after_transaction, p_after_seq)
                  AND x.transaction_id < (SELECT {schema}.horizon(pg_current_snapshot()))
                  AND (p_first_hash IS NULL OR x.stream_hash BETWEEN p_first_hash AND p_last_hash)
                ORDER BY x.transaction_id, x.seq
                LIMIT p_limit) k
         ORDER BY k.transaction_id, k.seq
         LIMIT p_limit) keys
    ON e.transaction_id = keys.t AND e.seq = keys.s
 ORDER BY e.transaction_id, e.seq
$$;
