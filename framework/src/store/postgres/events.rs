//! The event log's SQL (every statement of the store), reads, snapshots,
//! and turning rows back into [`StoredEvent`]s. Appends are in `append.rs`.

use std::sync::Arc;

use sqlx_core::query::{Query, query};
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::{PgArguments, PgRow, Postgres};
use uuid::Uuid;

use super::conns::Conns;
use super::order;
use super::types::{Timestamp, Xid8};
use crate::event::{Metadata, Position, StoredEvent};
use crate::store::{Direction, FoldEvent, Snapshot, StoreError};
use crate::subscription::Partition;
use crate::upcast::Upcasters;

/// The columns [`event_from_row`] reads, in its order.
///
/// Correlation and causation come from their own columns and only the
/// metadata's `extra` map from the JSON (NULL when the event has none):
/// turning every event's metadata into text and parsing it again was most of
/// a read's cost (migration 8, which gives `read_typed` these columns too).
const COLUMNS: &str = "transaction_id, seq, stream, version, id, event_type, payload, \
                       correlation_id, causation_id, (metadata -> 'extra')::text AS extra, \
                       recorded_at";

/// Every statement of the store, with the schema name filled in once.
pub(super) struct Sql {
    pub(super) append: Arc<str>,
    pub(super) stream_version: Arc<str>,
    pub(super) locate: Arc<str>,
    pub(super) stored_ids: Arc<str>,
    read_forward: Arc<str>,
    read_fold: Arc<str>,
    read_backward: Arc<str>,
    read_all: Arc<str>,
    read_all_typed: Arc<str>,
    read_partition: Arc<str>,
    read_partition_typed: Arc<str>,
    read_correlation: Arc<str>,
    find_event: Arc<str>,
    head: Arc<str>,
    pub(super) horizon: Arc<str>,
    pub(super) held_back: Arc<str>,
    save_snapshot: Arc<str>,
    load_snapshot: Arc<str>,
}

impl Sql {
    /// The statements for the schema whose quoted name is `schema`.
    pub(super) fn new(schema: &str) -> Sql {
        let s = |sql: String| -> Arc<str> { sql.into() };
        Sql {
            append: s(format!(
                "SELECT out_version, out_transaction, out_first_seq \
                 FROM {schema}.append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            )),
            stream_version: s(format!(
                "SELECT coalesce(max(version), 0) FROM {schema}.events WHERE stream = $1"
            )),
            locate: s(format!(
                "SELECT id, stream, version, transaction_id, seq FROM {schema}.events WHERE id = ANY($1)"
            )),
            stored_ids: s(format!(
                "SELECT id, version, transaction_id, seq FROM {schema}.events \
                 WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3"
            )),
            read_forward: s(format!(
                "SELECT {COLUMNS} FROM {schema}.events \
                 WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3"
            )),
            // What folding an aggregate uses: five columns (see
            // `read_stream_fold`).
            read_fold: s(format!(
                "SELECT transaction_id, seq, version, event_type, payload FROM {schema}.events \
                 WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3"
            )),
            read_backward: s(format!(
                "SELECT {COLUMNS} FROM {schema}.events \
                 WHERE stream = $1 AND version <= $2 ORDER BY version DESC LIMIT $3"
            )),
            // Only rows below the horizon: see `order.rs` for why this order
            // cannot be skipped. The row comparison is an index condition of
            // the primary key (transaction_id, seq).
            read_all: s(format!(
                "SELECT {COLUMNS} FROM {schema}.events \
                 WHERE (transaction_id, seq) > ($1, $2) \
                   AND transaction_id < (SELECT {schema}.horizon(pg_current_snapshot())) \
                 ORDER BY transaction_id, seq LIMIT $3"
            )),
            // The schema's `read_typed` function (migration 6): one ordered
            // range of `events_by_type` per wanted type, one statement, so
            // one snapshot and one horizon for every type.
            read_all_typed: s(format!(
                "SELECT * FROM {schema}.read_typed($1, $2, $3, $4, NULL, NULL)"
            )),
            // One partition: the streams whose `stream_hash` is in [$4, $5]
            // (see `subscription/partition.rs`), otherwise as `read_all`.
            read_partition: s(format!(
                "SELECT {COLUMNS} FROM {schema}.events \
                 WHERE (transaction_id, seq) > ($1, $2) \
                   AND transaction_id < (SELECT {schema}.horizon(pg_current_snapshot())) \
                   AND stream_hash BETWEEN $4 AND $5 \
                 ORDER BY transaction_id, seq LIMIT $3"
            )),
            // As `read_all_typed`, within one range of hashes
            // (`events_by_type` includes `stream_hash`).
            read_partition_typed: s(format!(
                "SELECT * FROM {schema}.read_typed($1, $2, $3, $4, $5, $6)"
            )),
            // One correlation id, below the horizon like `read_all`: an
            // ordered range scan of `events_by_correlation`, whose row
            // comparison is an index condition.
            read_correlation: s(format!(
                "SELECT {COLUMNS} FROM {schema}.events \
                 WHERE correlation_id = $4 \
                   AND (transaction_id, seq) > ($1, $2) \
                   AND transaction_id < (SELECT {schema}.horizon(pg_current_snapshot())) \
                 ORDER BY transaction_id, seq LIMIT $3"
            )),
            find_event: s(format!(
                "SELECT {COLUMNS} FROM {schema}.events WHERE id = $1"
            )),
            // One row: the horizon, the last key below it (if any), and
            // whether committed events wait above it.
            head: s(format!(
                "SELECT h.horizon, e.transaction_id, e.seq, \
                   (SELECT w.transaction_id FROM {schema}.events w \
                     WHERE w.transaction_id >= h.horizon \
                     ORDER BY w.transaction_id LIMIT 1) IS NOT NULL \
                 FROM (SELECT {schema}.horizon(pg_current_snapshot()) AS horizon) h \
                 LEFT JOIN LATERAL ( \
                   SELECT transaction_id, seq FROM {schema}.events \
                   WHERE transaction_id < h.horizon \
                   ORDER BY transaction_id DESC, seq DESC LIMIT 1) e ON true"
            )),
            horizon: s(format!("SELECT {schema}.horizon(pg_current_snapshot())")),
            // The horizon as the cluster's transaction id (the offset taken
            // off: see `order.rs`) and how long the oldest committed event
            // that readers cannot read yet has been waiting (no row: none
            // waits).
            held_back: s(format!(
                "SELECT (h.horizon::text::bigint - b.position_offset)::text::xid8, \
                   extract(epoch FROM clock_timestamp() - w.recorded_at)::float8 \
                 FROM (SELECT {schema}.horizon(pg_current_snapshot()) AS horizon) h \
                 CROSS JOIN {schema}.log_base b \
                 CROSS JOIN LATERAL ( \
                   SELECT recorded_at FROM {schema}.events \
                   WHERE transaction_id >= h.horizon \
                   ORDER BY transaction_id, seq LIMIT 1) w"
            )),
            save_snapshot: s(format!(
                "INSERT INTO {schema}.snapshots AS old (stream, version, state, taken_at) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (stream) DO UPDATE SET version = excluded.version, \
                   state = excluded.state, taken_at = excluded.taken_at \
                 WHERE excluded.version >= old.version"
            )),
            load_snapshot: s(format!(
                "SELECT version, state, taken_at FROM {schema}.snapshots WHERE stream = $1"
            )),
        }
    }
}

/// A query of one of the store's statements (prepared once per connection).
pub(super) fn stmt(statement: &Arc<str>) -> Query<'static, Postgres, PgArguments> {
    query(AssertSqlSafe(statement.clone()))
}

/// Runs a read statement, once more when it failed because its connection
/// was gone (see [`super::append::connection_lost`]): reads are safe to
/// repeat, and the pool tests connections again after such a failure, so
/// the second try gets a live one.
pub(super) async fn retried<T, F, Fut>(mut read: F) -> Result<T, sqlx_core::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx_core::Error>>,
{
    match read().await {
        Err(e) if super::append::connection_lost(&e) => read().await,
        done => done,
    }
}

/// Wraps a driver error with what the store was doing; a closed pool is
/// [`StoreError::Closed`].
pub(super) fn db(operation: &'static str) -> impl FnOnce(sqlx_core::Error) -> StoreError {
    move |e| {
        // Noted also on paths that are not tried again (a subscriber's batch
        // transaction, a checkpoint): the pools then test their connections
        // for a while, so the restarted run gets live ones.
        super::append::connection_lost(&e);
        match e {
            sqlx_core::Error::PoolClosed => {
                StoreError::Closed("the PostgreSQL connection pool was closed".into())
            }
            e => StoreError::database(operation, e),
        }
    }
}

/// PostgreSQL integers are `i64`; larger `u64` bounds mean "no limit".
pub(super) fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored version as `u64` (a negative one, impossible by the schema's
/// CHECK, reads as 0).
pub(super) fn version_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The position of key `(transaction_id, seq)`; a key out of the
/// encoding's range is [`StoreError::Corrupt`].
pub(super) fn position_of(
    transaction_id: Xid8,
    seq: i32,
    stream: &str,
) -> Result<Position, StoreError> {
    order::encode(transaction_id, i64::from(seq)).map_err(|message| StoreError::Corrupt {
        position: Position::ORIGIN,
        stream: stream.to_owned(),
        message,
    })
}

/// The current version of `stream` (0 when it has no events).
pub(super) async fn stream_version(
    conns: &Conns,
    sql: &Sql,
    stream: &str,
) -> Result<u64, StoreError> {
    let version: i64 = retried(|| conns.fetch_one(stmt(&sql.stream_version).bind(stream)))
        .await
        .and_then(|row| row.try_get(0))
        .map_err(db("reading a stream version"))?;
    Ok(version_of(version))
}

/// The head of `$all` that is safe to read up to.
pub(super) struct Head {
    /// The horizon, as a stored transaction id: the oldest appending
    /// transaction still running (see `order.rs`).
    pub(super) horizon: Xid8,
    /// The last position below the horizon.
    pub(super) position: Position,
    /// Whether committed events wait above the horizon.
    pub(super) held_back: bool,
}

/// Reads the [`Head`].
pub(super) async fn head(conns: &Conns, sql: &Sql) -> Result<Head, StoreError> {
    let row = retried(|| conns.fetch_one(stmt(&sql.head)))
        .await
        .map_err(db("reading the head position"))?;
    let failed = || db("reading the head position");
    let horizon: Xid8 = row.try_get(0).map_err(failed())?;
    let transaction: Option<Xid8> = row.try_get(1).map_err(failed())?;
    let seq: Option<i32> = row.try_get(2).map_err(failed())?;
    let held_back: bool = row.try_get(3).map_err(failed())?;
    let position = match (transaction, seq) {
        (Some(transaction), Some(seq)) => position_of(transaction, seq, "$all")?,
        _ => Position::ORIGIN,
    };
    Ok(Head {
        horizon,
        position,
        held_back,
    })
}

/// Reads a page of one stream.
pub(super) async fn read_stream(
    conns: &Conns,
    sql: &Sql,
    stream: &str,
    from: u64,
    direction: Direction,
    limit: usize,
    upcasters: &Upcasters,
) -> Result<Vec<StoredEvent>, StoreError> {
    let (statement, from) = match direction {
        Direction::Forward => (&sql.read_forward, from.max(1)),
        Direction::Backward if from == 0 => return Ok(Vec::new()),
        Direction::Backward => (&sql.read_backward, from),
    };
    let rows = retried(|| {
        conns.fetch_all(
            stmt(statement)
                .bind(stream)
                .bind(sql_int(from))
                .bind(sql_int(limit as u64)),
        )
    })
    .await
    .map_err(db("reading a stream"))?;
    collect(rows, upcasters)
}

/// Reads a page of one stream forward for folding: five columns, upcast.
pub(super) async fn read_stream_fold(
    conns: &Conns,
    sql: &Sql,
    stream: &str,
    from: u64,
    limit: usize,
    upcasters: &Upcasters,
) -> Result<Vec<FoldEvent>, StoreError> {
    let rows = retried(|| {
        conns.fetch_all(
            stmt(&sql.read_fold)
                .bind(stream)
                .bind(sql_int(from.max(1)))
                .bind(sql_int(limit as u64)),
        )
    })
    .await
    .map_err(db("reading a stream"))?;
    rows.iter()
        .map(|row| {
            let corrupt = |position: Position, message: String| StoreError::Corrupt {
                position,
                stream: stream.to_owned(),
                message,
            };
            let column =
                |name: &str, e: sqlx_core::Error| format!("column `{name}` does not decode: {e}");
            let transaction: Xid8 = row
                .try_get(0)
                .map_err(|e| corrupt(Position::ORIGIN, column("transaction_id", e)))?;
            let seq: i32 = row
                .try_get(1)
                .map_err(|e| corrupt(Position::ORIGIN, column("seq", e)))?;
            let position = order::encode(transaction, i64::from(seq)).map_err(|message| {
                corrupt(
                    Position::ORIGIN,
                    format!("columns `transaction_id`, `seq`: {message}"),
                )
            })?;
            let version: i64 = row
                .try_get(2)
                .map_err(|e| corrupt(position, column("version", e)))?;
            let version = u64::try_from(version)
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| {
                    corrupt(
                        position,
                        format!("column `version` holds {version}, not a version of at least 1"),
                    )
                })?;
            let event_type: String = row
                .try_get(3)
                .map_err(|e| corrupt(position, column("event_type", e)))?;
            let payload: Vec<u8> = row
                .try_get(4)
                .map_err(|e| corrupt(position, column("payload", e)))?;
            let event = FoldEvent {
                version,
                position,
                event_type,
                payload,
            };
            if !upcasters.handles(&event.event_type) {
                return Ok(event);
            }
            // Upcasters see the type and payload only; the rest of this
            // envelope is what the row has or a placeholder.
            let mut stored = StoredEvent {
                id: Uuid::nil(),
                stream: stream.to_owned(),
                version,
                position,
                recorded_at: chrono::DateTime::UNIX_EPOCH,
                event_type: event.event_type,
                payload: event.payload,
                metadata: Metadata::caused_by(Uuid::nil()),
            };
            upcasters.apply(&mut stored)?;
            Ok(FoldEvent::from(stored))
        })
        .collect()
}

/// Reads a page of `$all` after `after`, below the horizon, optionally only
/// the stored types in `types` (already widened by the upcasters' old names
/// and without duplicates).
pub(super) async fn read_all(
    conns: &Conns,
    sql: &Sql,
    after: Position,
    types: Option<&[String]>,
    limit: usize,
    upcasters: &Upcasters,
) -> Result<Vec<StoredEvent>, StoreError> {
    let (transaction, seq) = order::decode(after);
    let limit = sql_int(limit as u64);
    if types.is_some_and(<[String]>::is_empty) {
        return Ok(Vec::new());
    }
    let query = || match types {
        None => stmt(&sql.read_all).bind(transaction).bind(seq).bind(limit),
        Some(types) => stmt(&sql.read_all_typed)
            .bind(transaction)
            .bind(seq)
            .bind(limit)
            .bind(types),
    };
    let rows = retried(|| conns.fetch_all(query()))
        .await
        .map_err(db("reading $all"))?;
    collect(rows, upcasters)
}

/// The stored form of a stream hash (`stream_hash` column): the unsigned
/// hash minus 2^63, which keeps its order in a signed `bigint`.
pub(super) use crate::subscription::partition::stored_hash;

/// Reads a page of one partition of `$all` (see [`read_all`]).
pub(super) async fn read_partition(
    conns: &Conns,
    sql: &Sql,
    after: Position,
    types: Option<&[String]>,
    partition: Partition,
    limit: usize,
    upcasters: &Upcasters,
) -> Result<Vec<StoredEvent>, StoreError> {
    let (transaction, seq) = order::decode(after);
    let limit = sql_int(limit as u64);
    let (first, last) = partition.hash_range();
    let (first, last) = (stored_hash(first), stored_hash(last));
    if types.is_some_and(<[String]>::is_empty) {
        return Ok(Vec::new());
    }
    let query = || match types {
        None => stmt(&sql.read_partition)
            .bind(transaction)
            .bind(seq)
            .bind(limit)
            .bind(first)
            .bind(last),
        Some(types) => stmt(&sql.read_partition_typed)
            .bind(transaction)
            .bind(seq)
            .bind(limit)
            .bind(types)
            .bind(first)
            .bind(last),
    };
    let rows = retried(|| conns.fetch_all(query()))
        .await
        .map_err(db("reading a partition of $all"))?;
    collect(rows, upcasters)
}

/// Reads a page of the events of one correlation id after `after`, below
/// the horizon (see [`read_all`]).
pub(super) async fn read_correlation(
    conns: &Conns,
    sql: &Sql,
    correlation_id: Uuid,
    after: Position,
    limit: usize,
    upcasters: &Upcasters,
) -> Result<Vec<StoredEvent>, StoreError> {
    let (transaction, seq) = order::decode(after);
    let rows = retried(|| {
        conns.fetch_all(
            stmt(&sql.read_correlation)
                .bind(transaction)
                .bind(seq)
                .bind(sql_int(limit as u64))
                .bind(correlation_id),
        )
    })
    .await
    .map_err(db("reading a correlation"))?;
    collect(rows, upcasters)
}

/// Finds one event by id.
pub(super) async fn find_event(
    conns: &Conns,
    sql: &Sql,
    id: Uuid,
    upcasters: &Upcasters,
) -> Result<Option<StoredEvent>, StoreError> {
    let rows = retried(|| conns.fetch_all(stmt(&sql.find_event).bind(id)))
        .await
        .map_err(db("finding an event"))?;
    Ok(collect(rows, upcasters)?.pop())
}

fn collect(rows: Vec<PgRow>, upcasters: &Upcasters) -> Result<Vec<StoredEvent>, StoreError> {
    rows.iter()
        .map(|row| {
            let mut event = event_from_row(row)?;
            upcasters.apply(&mut event)?;
            Ok(event)
        })
        .collect()
}

/// Turns a row of [`COLUMNS`] into an event, or a [`StoreError::Corrupt`]
/// naming the position, stream and column.
fn event_from_row(row: &PgRow) -> Result<StoredEvent, StoreError> {
    let corrupt = |position: Position, stream: &str, message: String| StoreError::Corrupt {
        position,
        stream: stream.to_owned(),
        message,
    };
    let column = |name: &str, e: sqlx_core::Error| format!("column `{name}` does not decode: {e}");

    let transaction: Xid8 = row
        .try_get(0)
        .map_err(|e| corrupt(Position::ORIGIN, "", column("transaction_id", e)))?;
    let seq: i32 = row
        .try_get(1)
        .map_err(|e| corrupt(Position::ORIGIN, "", column("seq", e)))?;
    let position = order::encode(transaction, i64::from(seq)).map_err(|message| {
        corrupt(
            Position::ORIGIN,
            "",
            format!("columns `transaction_id`, `seq`: {message}"),
        )
    })?;
    let stream: String = row
        .try_get(2)
        .map_err(|e| corrupt(position, "", column("stream", e)))?;
    let corrupt = |message: String| corrupt(position, &stream, message);
    let version: i64 = row.try_get(3).map_err(|e| corrupt(column("version", e)))?;
    let version = u64::try_from(version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            corrupt(format!(
                "column `version` holds {version}, not a version of at least 1"
            ))
        })?;
    let id: Uuid = row.try_get(4).map_err(|e| corrupt(column("id", e)))?;
    let event_type: String = row
        .try_get(5)
        .map_err(|e| corrupt(column("event_type", e)))?;
    let payload: Vec<u8> = row.try_get(6).map_err(|e| corrupt(column("payload", e)))?;
    let correlation_id: Uuid = row
        .try_get(7)
        .map_err(|e| corrupt(column("correlation_id", e)))?;
    let causation_id: Uuid = row
        .try_get(8)
        .map_err(|e| corrupt(column("causation_id", e)))?;
    let extra: Option<String> = row.try_get(9).map_err(|e| corrupt(column("metadata", e)))?;
    let (extra, trace) = match extra {
        None => Default::default(),
        Some(json) => crate::event::extra_from_json(&json).map_err(|e| {
            corrupt(format!(
                "column `metadata`: `extra` is not a map of strings: {e}"
            ))
        })?,
    };
    let metadata = Metadata {
        correlation_id,
        causation_id,
        trace,
        extra,
    };
    let Timestamp(recorded_at) = row
        .try_get(10)
        .map_err(|e| corrupt(column("recorded_at", e)))?;
    Ok(StoredEvent {
        id,
        stream,
        version,
        position,
        recorded_at,
        event_type,
        payload,
        metadata,
    })
}

/// Saves a snapshot unless a newer one is stored.
pub(super) async fn save_snapshot(
    conns: &Conns,
    sql: &Sql,
    snapshot: &Snapshot,
) -> Result<(), StoreError> {
    conns
        .fetch_optional(
            stmt(&sql.save_snapshot)
                .bind(&snapshot.stream)
                .bind(sql_int(snapshot.version))
                .bind(&snapshot.state)
                .bind(Timestamp(snapshot.taken_at)),
        )
        .await
        .map_err(db("saving a snapshot"))?;
    Ok(())
}

/// Loads the snapshot of a stream. A bad row is [`StoreError::Corrupt`]
/// at position 0 (snapshots have no position), naming the stream.
pub(super) async fn load_snapshot(
    conns: &Conns,
    sql: &Sql,
    stream: &str,
) -> Result<Option<Snapshot>, StoreError> {
    let Some(row) = retried(|| conns.fetch_optional(stmt(&sql.load_snapshot).bind(stream)))
        .await
        .map_err(db("loading a snapshot"))?
    else {
        return Ok(None);
    };
    let corrupt = |message: String| StoreError::Corrupt {
        position: Position::ORIGIN,
        stream: stream.to_owned(),
        message: format!("snapshot row: {message}"),
    };
    let version: i64 = row
        .try_get(0)
        .map_err(|e| corrupt(format!("column `version` does not decode: {e}")))?;
    let version =
        u64::try_from(version).map_err(|_| corrupt(format!("column `version` holds {version}")))?;
    let state: Vec<u8> = row
        .try_get(1)
        .map_err(|e| corrupt(format!("column `state` does not decode: {e}")))?;
    let Timestamp(taken_at) = row
        .try_get(2)
        .map_err(|e| corrupt(format!("column `taken_at` does not decode: {e}")))?;
    Ok(Some(Snapshot {
        stream: stream.to_owned(),
        version,
        state,
        taken_at,
    }))
}
