-- aftermath PostgreSQL schema version 3: the partition hash of every event's
-- stream, so that a partitioned subscriber's reads filter in SQL.
--
-- `stream_hash` is the hash every backend partitions by
-- (`subscription/partition.rs`): FNV-1a 64 of the stream name's UTF-8 bytes,
-- then MurmurHash3's 64-bit finalizer, stored as the unsigned hash minus 2^63
-- (its top bit flipped), which maps it onto `bigint` keeping its order: a
-- partition, a range of hashes, is then one `BETWEEN`. New rows get it from
-- the append code (one stream per append: computed once, in Rust, and passed
-- to `append`). Existing rows get it from `stream_hash(text)` below, the same
-- function in SQL (numeric arithmetic where 64-bit products must wrap: slow,
-- but it runs once per distinct stream here, and for appends of a build
-- older than this migration).
ALTER TABLE {schema}.events ADD COLUMN stream_hash bigint;

CREATE FUNCTION {schema}.stream_hash(p_stream text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    two64 CONSTANT numeric := 18446744073709551616;
    bytes bytea := convert_to(p_stream, 'UTF8');
    h     numeric := 14695981039346656037;   -- FNV offset basis; h is in [0, 2^64)
    low   integer;
    x     bigint;                            -- the same 64 bits, signed
BEGIN
    FOR i IN 0 .. length(bytes) - 1 LOOP
        -- h ^= byte: only the low 8 bits change.
        low := (h % 256)::integer;
        h := h - low + (low # get_byte(bytes, i));
        h := (h * 1099511628211) % two64;     -- h *= FNV prime
    END LOOP;
    -- fmix64: h ^= h >> 33; h *= c1; h ^= h >> 33; h *= c2; h ^= h >> 33.
    -- Shifts and xor on the signed bits (`>>` is arithmetic: mask the top),
    -- products in numeric modulo 2^64.
    x := CASE WHEN h >= 9223372036854775808 THEN (h - two64)::bigint ELSE h::bigint END;
    x := x # ((x >> 33) & 2147483647);
    h := CASE WHEN x < 0 THEN x + two64 ELSE x::numeric END;
    h := (h * 18397679294719823053) % two64;  -- 0xff51afd7ed558ccd
    x := CASE WHEN h >= 9223372036854775808 THEN (h - two64)::bigint ELSE h::bigint END;
    x := x # ((x >> 33) & 2147483647);
    h := CASE WHEN x < 0 THEN x + two64 ELSE x::numeric END;
    h := (h * 14181476777654086739) % two64;  -- 0xc4ceb9fe1a85ec53
    x := CASE WHEN h >= 9223372036854775808 THEN (h - two64)::bigint ELSE h::bigint END;
    x := x # ((x >> 33) & 2147483647);
    -- Stored form: the top bit flipped.
    RETURN x # (-9223372036854775807 - 1);
END
$$;

UPDATE {schema}.events e SET stream_hash = h.hash
  FROM (SELECT s.stream, {schema}.stream_hash(s.stream) AS hash
          FROM (SELECT DISTINCT stream FROM {schema}.events) s) h
 WHERE e.stream = h.stream;

ALTER TABLE {schema}.events ALTER COLUMN stream_hash SET NOT NULL;

-- Filtered reads of one partition stay index-only (visibility permitting).
DROP INDEX {schema}.events_by_type;
CREATE INDEX events_by_type ON {schema}.events (event_type, transaction_id, seq)
    INCLUDE (stream_hash);

-- The append function, now also given the stream's hash (see version 1 for
-- how it works; only `p_stream_hash` is new).
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
    p_stream_hash bigint,
    OUT out_version     bigint,
    OUT out_transaction xid8,
    OUT out_first_seq   integer
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_strict THEN
        PERFORM pg_advisory_xact_lock(hashtext('{name}.append'), 0);
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('{name}.stream'), hashtext(p_stream));
    SELECT coalesce(max(e.version), 0) INTO out_version
      FROM {schema}.events e WHERE e.stream = p_stream;
    IF out_version < p_min_version OR out_version > p_max_version
       OR coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN;
    END IF;
    out_transaction := pg_current_xact_id();
    SELECT coalesce(max(e.seq) + 1, 0) INTO out_first_seq
      FROM {schema}.events e WHERE e.transaction_id = out_transaction;
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

-- The version 1 signature stays for processes of an older build still
-- running while this migration is applied (rolling upgrades): it computes
-- the hash in SQL. The stream lock is still taken before the transaction
-- has an id: nothing here writes before the inner call does.
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
    OUT out_version     bigint,
    OUT out_transaction xid8,
    OUT out_first_seq   integer
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT a.out_version, a.out_transaction, a.out_first_seq
      INTO out_version, out_transaction, out_first_seq
      FROM {schema}.append(p_stream, p_min_version, p_max_version, p_strict, p_notify,
                           p_ids, p_types, p_payloads, p_metadata, p_correlation, p_causation,
                           {schema}.stream_hash(p_stream)) a;
END
$$;
