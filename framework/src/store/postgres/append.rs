//! Appending: one call of the schema's `append` function per batch, and
//! explaining a refused append (an idempotent retry, a reused event id, or a
//! version conflict) the way the in-memory store does.

use std::collections::HashMap;

use sqlx_core::error::ErrorKind;
use sqlx_core::row::Row;
use uuid::Uuid;

use super::conns::Conns;
use super::events::{Sql, db, position_of, sql_int, stmt, stored_hash, stream_version, version_of};
use super::order::{self, MAX_EVENTS_PER_TRANSACTION};
use super::types::Xid8;
use crate::event::{EventData, Position};
use crate::store::{AppendResult, ExpectedVersion, StoreError};
use crate::subscription::stream_hash;

/// A failure inside the store that has no driver error of its own.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// The stored versions `[min, max]` an expectation accepts.
fn version_range(expected: ExpectedVersion) -> (i64, i64) {
    match expected {
        ExpectedVersion::Any => (0, i64::MAX),
        ExpectedVersion::NoStream => (0, 0),
        ExpectedVersion::StreamExists => (1, i64::MAX),
        ExpectedVersion::Exact(v) => match i64::try_from(v) {
            Ok(v) => (v, v),
            // No stored version is that large: an empty range.
            Err(_) => (1, 0),
        },
    }
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

/// How many times an append is tried again after a transient failure
/// (serialization failure, deadlock, a conflicting append that rolled back).
const APPEND_ATTEMPTS: usize = 5;

/// Whether `e` says the connection is gone (a broken socket, or the server
/// ending the session: class 08 but a protocol violation, or an
/// administrator's or the server's shutdown, 57P01 to 57P03), rather than
/// anything about the statement.
/// Seeing one makes the store's pools test every connection before use for
/// a while ([`suspect_connections`]): where one connection died (a server
/// restart, a failover), the idle ones most likely did too.
pub(super) fn connection_lost(e: &sqlx_core::Error) -> bool {
    let lost = is_gone(e);
    if lost {
        let until = since_start().saturating_add(SUSPECT_FOR);
        SUSPECT_UNTIL.fetch_max(
            until.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    lost
}

/// The classification of [`connection_lost`], without recording anything.
fn is_gone(e: &sqlx_core::Error) -> bool {
    match e {
        sqlx_core::Error::Io(_) => true,
        sqlx_core::Error::Database(d) => d.code().is_some_and(|c| {
            (c.starts_with("08") && c != "08P01") || matches!(&*c, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// How long after a lost connection every pooled connection is tested.
const SUSPECT_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Until when (milliseconds since [`since_start`]'s origin) connections are
/// tested before every use.
static SUSPECT_UNTIL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Time since the first call (a monotonic origin for [`SUSPECT_UNTIL`]).
fn since_start() -> std::time::Duration {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

/// Whether a connection was lost recently (see [`connection_lost`]).
pub(super) fn suspect_connections() -> bool {
    let until = SUSPECT_UNTIL.load(std::sync::atomic::Ordering::Relaxed);
    until > 0 && since_start().as_millis() as u64 <= until
}

/// What one call of the append function did.
pub(super) struct Appended {
    /// The result to return.
    pub(super) result: AppendResult,
    /// The appending transaction, when events were written.
    pub(super) transaction: Option<Xid8>,
}

/// Appends `events` to `stream` with one statement (the schema's `append`
/// function, in its own transaction). Same rules as the in-memory store.
pub(super) async fn append(
    conns: &Conns,
    sql: &Sql,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
    strict: bool,
    notify: bool,
) -> Result<Appended, StoreError> {
    if events.len() as u64 > MAX_EVENTS_PER_TRANSACTION {
        return Err(StoreError::database(
            "appending events",
            Refused(format!(
                "a batch of {} events is more than the {MAX_EVENTS_PER_TRANSACTION} one append can hold",
                events.len()
            )),
        ));
    }
    let (min, max) = version_range(expected);
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
    let metadata = events
        .iter()
        .map(|e| serde_json::to_string(&e.metadata))
        .collect::<Result<Vec<String>, _>>()
        .map_err(|e| StoreError::database("encoding event metadata", e))?;
    let correlation: Vec<Uuid> = events.iter().map(|e| e.metadata.correlation_id).collect();
    let hash = stored_hash(stream_hash(stream));
    let causation: Vec<Uuid> = events.iter().map(|e| e.metadata.causation_id).collect();

    let mut attempt = 0;
    // An earlier attempt lost its connection: it may have committed, so
    // finding this batch stored is this call's own append, not a retry's.
    let mut lost = false;
    loop {
        attempt += 1;
        let outcome = conns
            .fetch_one(
                stmt(&sql.append)
                    .bind(stream)
                    .bind(min)
                    .bind(max)
                    .bind(strict)
                    .bind(notify)
                    .bind(&ids[..])
                    .bind(&types[..])
                    .bind(&payloads[..])
                    .bind(&metadata[..])
                    .bind(&correlation[..])
                    .bind(&causation[..])
                    .bind(hash),
            )
            .await;
        let row = match outcome {
            Ok(row) => row,
            Err(e) => {
                let (kind, code, constraint) = match e.as_database_error() {
                    Some(d) => (
                        Some(d.kind()),
                        d.code().map(|c| c.into_owned()),
                        d.constraint().map(str::to_owned),
                    ),
                    None => (None, None, None),
                };
                // A serialization failure or deadlock, or a connection lost
                // (neither a kept connection nor a recently used one of the
                // store's pool is tested before use, see `conns.rs` and
                // `PostgresStore::connect_with`): tried
                // again with the same event ids, so an append that did commit
                // before the connection went is found as its own retry.
                let dropped = connection_lost(&e);
                lost |= dropped;
                let transient = matches!(code.as_deref(), Some("40001" | "40P01")) || dropped;
                match (kind, constraint.as_deref()) {
                    // An id of the batch is stored: a retry, or a reuse.
                    (Some(ErrorKind::UniqueViolation), Some("events_id")) => {
                        if let Some(done) = refused(conns, sql, stream, expected, events).await? {
                            return Ok(found(done, lost));
                        }
                        // The conflicting append rolled back meanwhile.
                        if attempt < APPEND_ATTEMPTS {
                            continue;
                        }
                    }
                    // Only possible when the session does not run READ
                    // COMMITTED (the version was read from an older snapshot).
                    (Some(ErrorKind::UniqueViolation), Some("events_stream_version")) => {
                        if attempt < APPEND_ATTEMPTS {
                            continue;
                        }
                        let actual = stream_version(conns, sql, stream).await?;
                        return Err(StoreError::WrongExpectedVersion {
                            stream: stream.to_owned(),
                            expected,
                            actual,
                        });
                    }
                    _ if transient && attempt < APPEND_ATTEMPTS => continue,
                    _ => {}
                }
                return Err(db("appending events")(e));
            }
        };
        let current: i64 = row
            .try_get(0)
            .map_err(db("reading the result of an append"))?;
        let transaction: Option<Xid8> = row
            .try_get(1)
            .map_err(db("reading the result of an append"))?;
        let first_seq: Option<i32> = row
            .try_get(2)
            .map_err(db("reading the result of an append"))?;
        let current = version_of(current);
        return match (transaction, first_seq) {
            (Some(transaction), Some(first_seq)) => {
                let n = events.len() as i32;
                Ok(Appended {
                    result: AppendResult {
                        first_version: current + 1,
                        last_version: current + events.len() as u64,
                        first_position: Some(position_of(transaction, first_seq, stream)?),
                        last_position: Some(position_of(transaction, first_seq + n - 1, stream)?),
                        duplicate: false,
                    },
                    transaction: Some(transaction),
                })
            }
            _ if events.is_empty() && expected.matches(current) => Ok(Appended {
                result: AppendResult {
                    first_version: current + 1,
                    last_version: current,
                    first_position: None,
                    last_position: None,
                    duplicate: false,
                },
                transaction: None,
            }),
            // The version did not match: an idempotent retry, a reused id
            // (reported first, as in memory), or a version conflict.
            _ => match refused(conns, sql, stream, expected, events).await? {
                Some(done) => Ok(found(done, lost)),
                None => Err(StoreError::WrongExpectedVersion {
                    stream: stream.to_owned(),
                    expected,
                    actual: current,
                }),
            },
        };
    }
}

/// The result of an append that found its batch stored already: an
/// idempotent retry of an earlier call, or (`lost`: an attempt of this call
/// lost its connection, maybe after its commit) this call's own append, which
/// is then reported and recorded as one (not a duplicate; its transaction
/// counted as this handle's, so readers are woken and `wait_for_own_writes`
/// waits for it). A caller's retry whose own first attempt also lost its
/// connection is reported as its own append too: the two cannot be told apart.
fn found(mut done: AppendResult, lost: bool) -> Appended {
    if !lost {
        return Appended {
            result: done,
            transaction: None,
        };
    }
    done.duplicate = false;
    Appended {
        transaction: done.last_position.map(|p| order::decode(p).0),
        result: done,
    }
}

/// Explains a refused append: `Ok(Some(_))` for an idempotent retry (the
/// first result), `Err(DuplicateEventId)` for a reused id, `Ok(None)` when no
/// id of the batch is stored (then it was a version conflict, or a
/// conflicting append that has rolled back since).
async fn refused(
    conns: &Conns,
    sql: &Sql,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<Option<AppendResult>, StoreError> {
    let Some(first) = events.first() else {
        return Ok(None);
    };
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let rows = conns
        .fetch_all(stmt(&sql.locate).bind(&ids[..]))
        .await
        .map_err(db("looking up event ids"))?;
    let mut stored: HashMap<Uuid, Existing> = HashMap::with_capacity(rows.len());
    for row in rows {
        let failed = db("looking up event ids");
        let id: Uuid = row.try_get(0).map_err(failed)?;
        let stream: String = row.try_get(1).map_err(db("looking up event ids"))?;
        let version: i64 = row.try_get(2).map_err(db("looking up event ids"))?;
        let transaction: Xid8 = row.try_get(3).map_err(db("looking up event ids"))?;
        let seq: i32 = row.try_get(4).map_err(db("looking up event ids"))?;
        let position = position_of(transaction, seq, &stream)?;
        stored.insert(
            id,
            Existing {
                stream,
                version: version_of(version),
                position,
            },
        );
    }
    if let Some(existing) = stored.remove(&first.id) {
        if let Some(result) = retried(conns, sql, stream, expected, events, &existing).await? {
            return Ok(Some(result));
        }
        return Err(existing.duplicate(first.id, stream));
    }
    for event in &events[1..] {
        if let Some(existing) = stored.remove(&event.id) {
            return Err(existing.duplicate(event.id, stream));
        }
    }
    Ok(None)
}

/// The first result again when `events` were appended at this place
/// before: the same stream, where `expected` points, all ids in order.
async fn retried(
    conns: &Conns,
    sql: &Sql,
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
    let rows = conns
        .fetch_all(
            stmt(&sql.stored_ids)
                .bind(stream)
                .bind(sql_int(existing.version))
                .bind(sql_int(events.len() as u64)),
        )
        .await
        .map_err(db("checking an idempotent retry"))?;
    if rows.len() != events.len() {
        return Ok(None);
    }
    let mut last = (existing.version, existing.position);
    for (row, event) in rows.iter().zip(events) {
        let failed = || db("checking an idempotent retry");
        let id: Uuid = row.try_get(0).map_err(failed())?;
        if id != event.id {
            return Ok(None);
        }
        let version: i64 = row.try_get(1).map_err(failed())?;
        let transaction: Xid8 = row.try_get(2).map_err(failed())?;
        let seq: i32 = row.try_get(3).map_err(failed())?;
        last = (version_of(version), position_of(transaction, seq, stream)?);
    }
    Ok(Some(AppendResult {
        first_version: existing.version,
        last_version: last.0,
        first_position: Some(existing.position),
        last_position: Some(last.1),
        duplicate: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch found stored after an attempt of this call lost its
    /// connection is this call's append: not a duplicate, and its
    /// transaction is recorded (readers woken, own writes awaited).
    #[test]
    fn a_batch_found_after_a_lost_connection_is_the_call_s_own() {
        let position = order::encode(Xid8(77), 3).unwrap();
        let first = AppendResult {
            first_version: 4,
            last_version: 5,
            first_position: Some(Position(position.0 - 1)),
            last_position: Some(position),
            duplicate: true,
        };
        let retry = found(first.clone(), false);
        assert!(retry.result.duplicate);
        assert_eq!(retry.transaction, None);
        let own = found(first, true);
        assert!(!own.result.duplicate);
        assert_eq!(own.result.last_version, 5);
        assert_eq!(own.transaction, Some(Xid8(77)));
    }

    #[test]
    fn only_a_gone_connection_counts_as_lost() {
        let io = sqlx_core::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        // `is_gone`: `connection_lost` would make every connection of this
        // test binary suspect for a few seconds.
        assert!(is_gone(&io));
        assert!(!is_gone(&sqlx_core::Error::RowNotFound));
        assert!(!is_gone(&sqlx_core::Error::PoolTimedOut));
    }
}
