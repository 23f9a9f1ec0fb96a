//! The event log's SQL: appends (run on the writer thread), reads (run on
//! the read pool), snapshots, and turning rows back into [`StoredEvent`]s.

use chrono::{DateTime, Utc};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, Statement, params};
use uuid::Uuid;

use crate::event::{EventData, Metadata, Position, StoredEvent};
use crate::store::{AppendResult, Direction, ExpectedVersion, Snapshot, StoreError};
use crate::trace::TraceContext;
use crate::upcast::Upcasters;

/// `SELECT <the columns event_from_row reads> FROM events <rest>`.
macro_rules! select {
    ($rest:literal) => {
        concat!(
            "SELECT position, stream, version, id, event_type, payload, metadata, recorded_at, \
             correlation_id, causation_id, trace FROM events ",
            $rest
        )
    };
}

const INSERT: &str = "INSERT INTO events \
     (stream, version, id, event_type, payload, metadata, recorded_at, correlation_id, causation_id, trace) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";
const STREAM_VERSION: &str =
    "SELECT version FROM events WHERE stream = ?1 ORDER BY version DESC LIMIT 1";
const LOCATE: &str = "SELECT stream, version, position FROM events WHERE id = ?1";
const STORED_IDS: &str = "SELECT id, version, position FROM events \
     WHERE stream = ?1 AND version >= ?2 ORDER BY version LIMIT ?3";

/// SQLite integers are `i64`; larger `u64` bounds mean "no limit".
fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn db(operation: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| StoreError::database(operation, e)
}

/// Where an existing event id is stored.
struct Existing {
    stream: String,
    version: u64,
    position: Position,
}

impl Existing {
    fn duplicate(self, id: Uuid, stream: &str) -> StoreError {
        StoreError::DuplicateEventId {
            id,
            stream: stream.to_owned(),
            existing_stream: self.stream,
            existing_version: self.version,
        }
    }
}

fn locate(conn: &Connection, id: Uuid) -> Result<Option<Existing>, StoreError> {
    let failed = db("looking up an event id");
    let mut stmt = conn.prepare_cached(LOCATE).map_err(failed)?;
    stmt.query_row([id.as_bytes()], |row| {
        Ok(Existing {
            stream: row.get(0)?,
            version: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
            position: Position(u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0)),
        })
    })
    .optional()
    .map_err(db("looking up an event id"))
}

/// The current version of `stream` (0 when it has no events).
pub(super) fn stream_version(conn: &Connection, stream: &str) -> Result<u64, StoreError> {
    let mut stmt = conn
        .prepare_cached(STREAM_VERSION)
        .map_err(db("reading a stream version"))?;
    let version: Option<i64> = stmt
        .query_row([stream], |row| row.get(0))
        .optional()
        .map_err(db("reading a stream version"))?;
    Ok(version.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
}

/// The position of the last event (0 when the log is empty).
pub(super) fn head(conn: &Connection) -> Result<Position, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT coalesce(max(position), 0) FROM events")
        .map_err(db("reading the head position"))?;
    let head: i64 = stmt
        .query_row([], |row| row.get(0))
        .map_err(db("reading the head position"))?;
    Ok(Position(u64::try_from(head).unwrap_or(0)))
}

/// Appends on the writer connection, inside the writer's savepoint (an
/// error leaves nothing behind). Same rules as the in-memory store.
pub(super) fn append(
    conn: &Connection,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<AppendResult, StoreError> {
    let current = stream_version(conn, stream)?;

    // Idempotent retry, detected by the first id only; a reuse of any other
    // id is caught by the UNIQUE constraint below.
    if let Some(first) = events.first()
        && let Some(existing) = locate(conn, first.id)?
    {
        if let Some(result) = retried(conn, stream, expected, events, &existing)? {
            return Ok(result);
        }
        return Err(existing.duplicate(first.id, stream));
    }
    if !expected.matches(current) {
        // A reused id is reported before a version conflict, as in memory.
        for event in events.iter().skip(1) {
            if let Some(existing) = locate(conn, event.id)? {
                return Err(existing.duplicate(event.id, stream));
            }
        }
        return Err(StoreError::WrongExpectedVersion {
            stream: stream.to_owned(),
            expected,
            actual: current,
        });
    }
    if events.is_empty() {
        return Ok(AppendResult {
            first_version: current + 1,
            last_version: current,
            first_position: None,
            last_position: None,
            duplicate: false,
        });
    }

    let recorded_at = Utc::now().timestamp_micros();
    let mut insert = conn
        .prepare_cached(INSERT)
        .map_err(db("appending events"))?;
    let mut metadata = Vec::with_capacity(128);
    let mut trace = Vec::with_capacity(32);
    let mut first_position = 0;
    let mut last_position = 0;
    for (i, event) in events.iter().enumerate() {
        metadata.clear();
        crate::event::write_extra_only(&event.metadata, &mut metadata)
            .map_err(|e| StoreError::database("encoding event metadata", e))?;
        trace.clear();
        if let Some(context) = &event.metadata.trace {
            context.write_bytes(&mut trace);
        }
        let version = current + 1 + i as u64;
        let inserted = insert.insert(params![
            stream,
            sql_int(version),
            event.id.as_bytes(),
            event.event_type,
            event.payload,
            // serde_json writes UTF-8: bind as TEXT without copying.
            ToSqlOutput::Borrowed(ValueRef::Text(&metadata)),
            recorded_at,
            event.metadata.correlation_id.as_bytes(),
            event.metadata.causation_id.as_bytes(),
            (!trace.is_empty()).then_some(&trace[..]),
        ]);
        match inserted {
            Ok(position) => {
                if i == 0 {
                    first_position = position;
                }
                last_position = position;
            }
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
                // Earlier events of the batch went in, so this id is the
                // first of the batch that exists already.
                return Err(match locate(conn, event.id)? {
                    Some(existing) => existing.duplicate(event.id, stream),
                    None => StoreError::database("appending events", e),
                });
            }
            Err(e) => return Err(StoreError::database("appending events", e)),
        }
    }
    Ok(AppendResult {
        first_version: current + 1,
        last_version: current + events.len() as u64,
        first_position: Some(Position(u64::try_from(first_position).unwrap_or(0))),
        last_position: Some(Position(u64::try_from(last_position).unwrap_or(0))),
        duplicate: false,
    })
}

/// The first result again when `events` were appended at this place
/// before: the same stream, where `expected` points, all ids in order.
fn retried(
    conn: &Connection,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
    existing: &Existing,
) -> Result<Option<AppendResult>, StoreError> {
    let same_place = existing.stream == stream
        && match expected {
            ExpectedVersion::Exact(v) => v.checked_add(1) == Some(existing.version),
            ExpectedVersion::NoStream => existing.version == 1,
            ExpectedVersion::Any | ExpectedVersion::StreamExists => true,
        };
    if !same_place {
        return Ok(None);
    }
    let failed = db("checking an idempotent retry");
    let mut stmt = conn.prepare_cached(STORED_IDS).map_err(failed)?;
    let mut rows = stmt
        .query(params![
            stream,
            sql_int(existing.version),
            sql_int(events.len() as u64)
        ])
        .map_err(db("checking an idempotent retry"))?;
    let mut matched = 0;
    let mut last = (existing.version, existing.position);
    while let Some(row) = rows.next().map_err(db("checking an idempotent retry"))? {
        let id = row.get_ref(0).map_err(db("checking an idempotent retry"))?;
        let expected_id = events.get(matched).map(|e| e.id.as_bytes().as_slice());
        if !matches!(id, ValueRef::Blob(b) if Some(b) == expected_id) {
            return Ok(None);
        }
        let version: i64 = row.get(1).map_err(db("checking an idempotent retry"))?;
        let position: i64 = row.get(2).map_err(db("checking an idempotent retry"))?;
        last = (
            u64::try_from(version).unwrap_or(0),
            Position(u64::try_from(position).unwrap_or(0)),
        );
        matched += 1;
    }
    if matched != events.len() {
        return Ok(None);
    }
    Ok(Some(AppendResult {
        first_version: existing.version,
        last_version: last.0,
        first_position: Some(existing.position),
        last_position: Some(last.1),
        duplicate: true,
    }))
}

/// Reads a page of one stream.
pub(super) fn read_stream(
    conn: &Connection,
    stream: &str,
    from: u64,
    direction: Direction,
    limit: usize,
    upcasters: &Upcasters,
) -> Result<Vec<StoredEvent>, StoreError> {
    let limit = sql_int(limit as u64);
    let (sql, from) = match direction {
        Direction::Forward => (
            select!("WHERE stream = ?1 AND version >= ?2 ORDER BY version LIMIT ?3"),
            from.max(1),
        ),
        Direction::Backward if from == 0 => return Ok(Vec::new()),
        Direction::Backward => (
            select!("WHERE stream = ?1 AND version <= ?2 ORDER BY version DESC LIMIT ?3"),
            from,
        ),
    };
    let mut stmt = conn.prepare_cached(sql).map_err(db("reading a stream"))?;
    collect(&mut stmt, params![stream, sql_int(from), limit], upcasters)
}

/// Reads a page of `$all` after `after`, optionally only the stored types
/// in `types` (already widened by the upcasters' old names).
pub(super) fn read_all(
    conn: &Connection,
    after: Position,
    types: Option<&[String]>,
    limit: usize,
    upcasters: &Upcasters,
) -> Result<Vec<StoredEvent>, StoreError> {
    let after = sql_int(after.0);
    let limit = sql_int(limit as u64);
    let Some(types) = types else {
        let sql = select!("WHERE position > ?1 ORDER BY position LIMIT ?2");
        let mut stmt = conn.prepare_cached(sql).map_err(db("reading $all"))?;
        return collect(&mut stmt, params![after, limit], upcasters);
    };
    if types.is_empty() {
        return Ok(Vec::new());
    }
    let sql = filtered_sql(types.len());
    let mut stmt = conn.prepare_cached(&sql).map_err(db("reading $all"))?;
    let mut values: Vec<ToSqlOutput<'_>> = Vec::with_capacity(types.len() + 2);
    values.push(ToSqlOutput::from(after));
    values.push(ToSqlOutput::from(limit));
    values.extend(
        types
            .iter()
            .map(|t| ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes()))),
    );
    collect(&mut stmt, rusqlite::params_from_iter(values), upcasters)
}

/// The filtered `$all` query for `n` types (`?1` after, `?2` limit, `?3..`
/// the types).
///
/// One type is one ordered range scan of the `(event_type, position)`
/// index. For several, a plain `event_type IN (...)` would make SQLite scan
/// every matching index entry after `after` and sort them before applying
/// the limit (quadratic for a subscriber catching up); instead each type
/// contributes at most `limit` positions from its own index range, and only
/// the first `limit` of those are read from the table.
fn filtered_sql(n: usize) -> String {
    if n == 1 {
        return select!("WHERE event_type = ?3 AND position > ?1 ORDER BY position LIMIT ?2")
            .to_owned();
    }
    let per_type: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "SELECT position FROM (SELECT position FROM events WHERE event_type = ?{} AND position > ?1 ORDER BY position LIMIT ?2)",
                i + 3
            )
        })
        .collect();
    format!(
        "{}({} ORDER BY position LIMIT ?2) ORDER BY position",
        select!("WHERE position IN "),
        per_type.join(" UNION ALL ")
    )
}

/// Reads a page of the events of one correlation id after `after`, in
/// position order: one ordered range scan of `events_by_correlation`.
pub(super) fn read_correlation(
    conn: &Connection,
    correlation_id: Uuid,
    after: Position,
    limit: usize,
    upcasters: &Upcasters,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = select!("WHERE correlation_id = ?1 AND position > ?2 ORDER BY position LIMIT ?3");
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(db("reading a correlation"))?;
    collect(
        &mut stmt,
        params![
            correlation_id.as_bytes(),
            sql_int(after.0),
            sql_int(limit as u64)
        ],
        upcasters,
    )
}

/// Finds one event by id.
pub(super) fn find_event(
    conn: &Connection,
    id: Uuid,
    upcasters: &Upcasters,
) -> Result<Option<StoredEvent>, StoreError> {
    let sql = select!("WHERE id = ?1");
    let mut stmt = conn.prepare_cached(sql).map_err(db("finding an event"))?;
    Ok(collect(&mut stmt, [id.as_bytes()], upcasters)?.pop())
}

fn collect(
    stmt: &mut Statement<'_>,
    params: impl rusqlite::Params,
    upcasters: &Upcasters,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut rows = stmt.query(params).map_err(db("reading events"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(db("reading events"))? {
        let mut event = event_from_row(row)?;
        upcasters.apply(&mut event)?;
        out.push(event);
    }
    Ok(out)
}

/// How a value looks, for corruption messages.
fn describe(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "NULL".to_owned(),
        ValueRef::Integer(i) => format!("the integer {i}"),
        ValueRef::Real(r) => format!("the real {r}"),
        ValueRef::Text(t) => format!("text of {} bytes", t.len()),
        ValueRef::Blob(b) => format!("a blob of {} bytes", b.len()),
    }
}

/// Turns a row of the `select!` columns into an event, or a
/// [`StoreError::Corrupt`] naming the position, stream and column.
fn event_from_row(row: &Row<'_>) -> Result<StoredEvent, StoreError> {
    let mut position = Position::ORIGIN;
    let mut stream = String::new();
    let value = |index: usize| row.get_ref(index).map_err(db("reading an event row"));
    let corrupt = |position: Position, stream: &str, message: String| StoreError::Corrupt {
        position,
        stream: stream.to_owned(),
        message,
    };

    match value(0)? {
        ValueRef::Integer(p) if p > 0 => position = Position(p as u64),
        other => {
            return Err(corrupt(
                position,
                &stream,
                format!("column `position` holds {}", describe(other)),
            ));
        }
    }
    match value(1)? {
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => stream = s.to_owned(),
            Err(e) => {
                return Err(corrupt(
                    position,
                    &stream,
                    format!("column `stream` is not UTF-8: {e}"),
                ));
            }
        },
        other => {
            return Err(corrupt(
                position,
                &stream,
                format!("column `stream` holds {}, not text", describe(other)),
            ));
        }
    }
    let corrupt = |message: String| corrupt(position, &stream, message);
    let version = match value(2)? {
        ValueRef::Integer(v) if v > 0 => v as u64,
        other => {
            return Err(corrupt(format!(
                "column `version` holds {}, not a version of at least 1",
                describe(other)
            )));
        }
    };
    let uuid = |index: usize, name: &str| match value(index)? {
        ValueRef::Blob(b) => <[u8; 16]>::try_from(b).map(Uuid::from_bytes).map_err(|_| {
            corrupt(format!(
                "column `{name}` holds a blob of {} bytes, not a 16-byte UUID",
                b.len()
            ))
        }),
        other => Err(corrupt(format!(
            "column `{name}` holds {}, not a 16-byte UUID",
            describe(other)
        ))),
    };
    let id = uuid(3, "id")?;
    let event_type = match value(4)? {
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map_err(|e| corrupt(format!("column `event_type` is not UTF-8: {e}")))?
            .to_owned(),
        other => {
            return Err(corrupt(format!(
                "column `event_type` holds {}, not text",
                describe(other)
            )));
        }
    };
    let payload = match value(5)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
        other => {
            return Err(corrupt(format!(
                "column `payload` holds {}, not JSON bytes",
                describe(other)
            )));
        }
    };
    let (extra, mut trace) = match value(6)? {
        ValueRef::Text(b) | ValueRef::Blob(b) => crate::event::extra_of_stored(b)
            .map_err(|e| corrupt(format!("column `metadata` is not valid metadata JSON: {e}")))?,
        other => {
            return Err(corrupt(format!(
                "column `metadata` holds {}, not metadata JSON",
                describe(other)
            )));
        }
    };
    let correlation_id = uuid(8, "correlation_id")?;
    let causation_id = uuid(9, "causation_id")?;
    match value(10)? {
        ValueRef::Null => {}
        ValueRef::Blob(b) => {
            trace = Some(
                TraceContext::from_bytes(b)
                    .map_err(|e| corrupt(format!("column `trace` is not a trace context: {e}")))?,
            );
        }
        other => {
            return Err(corrupt(format!(
                "column `trace` holds {}, not a trace context",
                describe(other)
            )));
        }
    }
    let metadata = Metadata {
        correlation_id,
        causation_id,
        trace,
        extra,
    };
    let recorded_at = match value(7)? {
        ValueRef::Integer(micros) => {
            DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(|| {
                corrupt(format!(
                    "column `recorded_at` holds {micros}, out of the range of a timestamp"
                ))
            })?
        }
        other => {
            return Err(corrupt(format!(
                "column `recorded_at` holds {}, not a timestamp in microseconds",
                describe(other)
            )));
        }
    };
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
pub(super) fn save_snapshot(conn: &Connection, snapshot: &Snapshot) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO snapshots (stream, version, state, taken_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (stream) DO UPDATE SET version = excluded.version, state = excluded.state, \
             taken_at = excluded.taken_at WHERE excluded.version >= snapshots.version",
        )
        .map_err(db("saving a snapshot"))?;
    stmt.execute(params![
        snapshot.stream,
        sql_int(snapshot.version),
        snapshot.state,
        snapshot.taken_at.timestamp_micros()
    ])
    .map_err(db("saving a snapshot"))?;
    Ok(())
}

/// Loads the snapshot of a stream. A bad row is [`StoreError::Corrupt`]
/// at position 0 (snapshots have no position), naming the stream.
pub(super) fn load_snapshot(
    conn: &Connection,
    stream: &str,
) -> Result<Option<Snapshot>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT version, state, taken_at FROM snapshots WHERE stream = ?1")
        .map_err(db("loading a snapshot"))?;
    let mut rows = stmt.query([stream]).map_err(db("loading a snapshot"))?;
    let Some(row) = rows.next().map_err(db("loading a snapshot"))? else {
        return Ok(None);
    };
    let corrupt = |message: String| StoreError::Corrupt {
        position: Position::ORIGIN,
        stream: stream.to_owned(),
        message: format!("snapshot row: {message}"),
    };
    let value = |index: usize| row.get_ref(index).map_err(db("loading a snapshot"));
    let version = match value(0)? {
        ValueRef::Integer(v) if v >= 0 => v as u64,
        other => {
            return Err(corrupt(format!(
                "column `version` holds {}",
                describe(other)
            )));
        }
    };
    let state = match value(1)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
        other => return Err(corrupt(format!("column `state` holds {}", describe(other)))),
    };
    let taken_at = match value(2)? {
        ValueRef::Integer(micros) => DateTime::<Utc>::from_timestamp_micros(micros)
            .ok_or_else(|| corrupt(format!("column `taken_at` holds {micros}, out of range")))?,
        other => {
            return Err(corrupt(format!(
                "column `taken_at` holds {}",
                describe(other)
            )));
        }
    };
    Ok(Some(Snapshot {
        stream: stream.to_owned(),
        version,
        state,
        taken_at,
    }))
}
