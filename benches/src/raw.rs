//! The raw-driver baseline: what a hand-written application would minimally
//! do with plain `rusqlite` to get the same guarantees as the SQLite store,
//! on the same file, the same schema and the same pragmas.
//!
//! An append is one transaction per batch: `BEGIN IMMEDIATE`, read the
//! stream's current version (one `SELECT`), check the expected version,
//! insert the rows, `COMMIT`. Duplicate event ids are left to the table's
//! `UNIQUE` constraint (the transaction rolls back). A read is one `SELECT`
//! per page of `$all`, decoded into the same [`StoredEvent`] the store
//! returns. Every statement is a cached prepared statement.
//!
//! [`RawStore::project_totals`] is the hand-written counterpart of a
//! projection: read a page, then one transaction per page that upserts the
//! read model and saves the checkpoint.

use std::path::Path;
use std::time::Duration;

use aftermath::trace::TraceContext;
use aftermath::{EventData, ExpectedVersion, Metadata, Position, StoredEvent, Synchronous};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

/// The current version of a stream (0 when it has no events).
/// (The store's own query: one probe of the `(stream, version)` index.)
const STREAM_VERSION: &str =
    "SELECT version FROM events WHERE stream = ?1 ORDER BY version DESC LIMIT 1";

/// One event row, as the store writes it (`migrations/0001_events.sql`,
/// and `0009_trace.sql`: the ids and the trace context in columns, the
/// `metadata` text holds only the application's keys, `{}` without any).
const INSERT: &str = "INSERT INTO events \
     (stream, version, id, event_type, payload, metadata, recorded_at, correlation_id, causation_id, trace) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// One page of `$all`.
const READ_ALL: &str = "SELECT position, stream, version, id, event_type, payload, metadata, recorded_at, \
     correlation_id, causation_id, trace \
     FROM events WHERE position > ?1 ORDER BY position LIMIT ?2";

/// The `metadata` text with the application's keys.
#[derive(serde::Serialize, serde::Deserialize)]
struct Extra<'a> {
    #[serde(borrow)]
    extra: std::collections::BTreeMap<std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>>,
}

/// Why a raw append or read failed.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The driver failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A column did not hold the type expected.
    #[error("column value: {0}")]
    Value(#[from] rusqlite::types::FromSqlError),
    /// Metadata did not (de)serialize.
    #[error("metadata json: {0}")]
    Json(#[from] serde_json::Error),
    /// The stream's version is not the expected one; nothing was written.
    #[error("wrong expected version on `{stream}`: expected {expected}, actual {actual}")]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's version.
        actual: u64,
    },
    /// A row that is not a valid event.
    #[error("corrupt row at position {position}: {message}")]
    Corrupt {
        /// The row's position.
        position: u64,
        /// What is wrong.
        message: String,
    },
}

/// The `PRAGMA synchronous` value the store uses for `synchronous`.
pub fn synchronous_pragma(synchronous: Synchronous) -> &'static str {
    match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    }
}

/// A single plain `rusqlite` connection to a database file created by
/// `SqliteStore::open`, configured like the store's writer connection.
pub struct RawStore {
    conn: Connection,
}

impl RawStore {
    /// Opens a read-write connection to the existing store file at `path`:
    /// WAL (the file is already in WAL mode; this checks it), `synchronous`
    /// as given (it is per connection, so pass the store's setting), and a
    /// prepared-statement cache.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Self, RawError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(RawError::Corrupt {
                position: 0,
                message: format!("journal mode is `{mode}`, not WAL"),
            });
        }
        conn.pragma_update(None, "synchronous", synchronous_pragma(synchronous))?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(RawStore { conn })
    }

    /// The connection, to inspect pragmas or run other statements.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Appends `events` to `stream` in one transaction if the stream's
    /// version matches `expected`; returns the stream's new version.
    ///
    /// `BEGIN IMMEDIATE`, one `SELECT` of the current version, one `INSERT`
    /// per event, `COMMIT`: the minimum for an atomic, version-checked batch.
    pub fn append(
        &mut self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<u64, RawError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<i64> = tx
            .prepare_cached(STREAM_VERSION)?
            .query_row([stream], |row| row.get(0))
            .optional()?;
        let current = current.unwrap_or(0) as u64;
        if !expected.matches(current) {
            return Err(RawError::WrongExpectedVersion {
                stream: stream.to_owned(),
                expected,
                actual: current,
            });
        }
        let recorded_at = Utc::now().timestamp_micros();
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            for (i, event) in events.iter().enumerate() {
                let metadata = if event.metadata.extra.is_empty() {
                    "{}".to_owned()
                } else {
                    serde_json::to_string(&Extra {
                        extra: event
                            .metadata
                            .extra
                            .iter()
                            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                            .collect(),
                    })?
                };
                let trace = event.metadata.trace.as_ref().map(|t| {
                    let mut bytes = t.trace_id().to_be_bytes().to_vec();
                    bytes.extend_from_slice(&t.span_id().to_be_bytes());
                    bytes.push(u8::from(t.sampled()));
                    bytes.extend_from_slice(t.tracestate().unwrap_or_default().as_bytes());
                    bytes
                });
                insert.execute(params![
                    stream,
                    (current + 1 + i as u64) as i64,
                    event.id.as_bytes(),
                    event.event_type,
                    event.payload,
                    metadata,
                    recorded_at,
                    event.metadata.correlation_id.as_bytes(),
                    event.metadata.causation_id.as_bytes(),
                    trace,
                ])?;
            }
        }
        tx.commit()?;
        Ok(current + events.len() as u64)
    }

    /// Reads up to `limit` events of `$all` after position `after`, in
    /// position order, decoded into [`StoredEvent`]s (id, metadata JSON and
    /// timestamp parsed, as the store does).
    pub fn read_all(&self, after: Position, limit: usize) -> Result<Vec<StoredEvent>, RawError> {
        let mut select = self.conn.prepare_cached(READ_ALL)?;
        let mut rows = select.query(params![after.0 as i64, limit as i64])?;
        let mut page = Vec::with_capacity(limit);
        while let Some(row) = rows.next()? {
            let position = row.get::<_, i64>(0)? as u64;
            let corrupt = |message: String| RawError::Corrupt { position, message };
            let id = Uuid::from_slice(row.get_ref(3)?.as_blob()?)
                .map_err(|e| corrupt(format!("event id: {e}")))?;
            let uuid = |index: usize| -> Result<Uuid, RawError> {
                Uuid::from_slice(row.get_ref(index)?.as_blob()?)
                    .map_err(|e| corrupt(format!("column {index}: {e}")))
            };
            let extra = match row.get_ref(6)?.as_bytes()? {
                b"{}" => Default::default(),
                json => serde_json::from_slice::<Extra>(json)?
                    .extra
                    .into_iter()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect(),
            };
            let trace = match row.get_ref(10)?.as_blob_or_null()? {
                None => None,
                Some(b) if b.len() >= 25 => {
                    let trace_id = u128::from_be_bytes(b[..16].try_into().unwrap_or_default());
                    let span_id = u64::from_be_bytes(b[16..24].try_into().unwrap_or_default());
                    let state = std::str::from_utf8(&b[25..])
                        .map_err(|e| corrupt(format!("tracestate: {e}")))?;
                    TraceContext::new(trace_id, span_id, b[24] & 1 == 1).map(|t| {
                        if state.is_empty() {
                            t
                        } else {
                            t.with_tracestate(state)
                        }
                    })
                }
                Some(b) => return Err(corrupt(format!("trace of {} bytes", b.len()))),
            };
            let metadata = Metadata {
                correlation_id: uuid(8)?,
                causation_id: uuid(9)?,
                trace,
                extra,
            };
            let micros: i64 = row.get(7)?;
            let recorded_at: DateTime<Utc> = DateTime::from_timestamp_micros(micros)
                .ok_or_else(|| corrupt(format!("timestamp {micros} out of range")))?;
            page.push(StoredEvent {
                id,
                stream: row.get(1)?,
                version: row.get::<_, i64>(2)? as u64,
                position: Position(position),
                recorded_at,
                event_type: row.get(4)?,
                payload: row.get(5)?,
                metadata,
            });
        }
        Ok(page)
    }

    /// A hand-written projection of `$all` into the upsert read model
    /// `table` ([`crate::projections::totals_table_sql`]), from the start,
    /// at most `max` events: read a page (as [`RawStore::read_all`]), then
    /// one `BEGIN IMMEDIATE` transaction per page that decodes each payload
    /// ([`crate::domain::decode_raw`]), upserts its account's row and saves
    /// the checkpoint, `COMMIT`. Returns how many events it handled.
    pub fn project_totals(&mut self, table: &str, page: usize, max: u64) -> Result<u64, RawError> {
        self.conn
            .execute_batch(&crate::projections::totals_table_sql(table))?;
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS raw_checkpoints (name TEXT PRIMARY KEY, position INTEGER NOT NULL)",
        )?;
        let upsert = crate::projections::totals_upsert_sql(table);
        let mut after = Position::ORIGIN;
        let mut handled = 0u64;
        while handled < max {
            let limit = page.min((max - handled) as usize);
            let events = self.read_all(after, limit)?;
            let Some(last) = events.last() else { break };
            let through = last.position;
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut statement = tx.prepare_cached(&upsert)?;
                for event in &events {
                    let Some(decoded) =
                        crate::domain::decode_raw(&event.event_type, &event.payload)?
                    else {
                        continue;
                    };
                    statement.execute(params![
                        event.stream,
                        crate::projections::balance_change(&decoded)
                    ])?;
                }
            }
            tx.prepare_cached(
                "INSERT INTO raw_checkpoints (name, position) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET position = excluded.position",
            )?
            .execute(params![table, through.0 as i64])?;
            tx.commit()?;
            handled += events.len() as u64;
            if events.len() < limit {
                break;
            }
            after = through;
        }
        Ok(handled)
    }

    /// Reads all of `$all` after `after` in pages of `page` events and
    /// returns how many events were read; each page is dropped before the
    /// next is read, so memory is bounded by the page size.
    pub fn read_all_count(&self, after: Position, page: usize, max: u64) -> Result<u64, RawError> {
        let mut after = after;
        let mut read = 0u64;
        while read < max {
            let limit = page.min((max - read) as usize);
            let events = self.read_all(after, limit)?;
            read += events.len() as u64;
            match events.last() {
                Some(last) if events.len() == limit => after = last.position,
                _ => break,
            }
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use aftermath::{EventStore, SqliteStore};

    use super::*;

    /// The baseline and the store write and read the same rows: each reads
    /// what the other wrote, metadata and trace context included.
    #[test]
    fn the_baseline_and_the_store_read_each_other_s_rows() {
        let db = crate::TempDb::new("raw-layout");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt.block_on(SqliteStore::open(db.path())).unwrap();
        let event = |n: u64, traced: bool| {
            let id = Uuid::from_u128(u128::from(n) + 1);
            let mut metadata = Metadata::caused_by(id);
            if traced {
                metadata.trace =
                    TraceContext::new(7, n + 1, true).map(|t| t.with_tracestate("v=1"));
                metadata.extra.insert("user".into(), "ann".into());
            }
            EventData {
                id,
                event_type: "account.Deposited".into(),
                payload: format!(r#"{{"amount":{n}}}"#).into_bytes(),
                metadata,
            }
        };
        let written = [
            event(0, false),
            event(1, true),
            event(2, false),
            event(3, true),
        ];
        rt.block_on(store.append("s-1", ExpectedVersion::NoStream, written[..2].to_vec()))
            .unwrap();
        let mut raw = RawStore::open(db.path(), Synchronous::Normal).unwrap();
        raw.append("s-1", ExpectedVersion::Exact(2), &written[2..])
            .unwrap();
        let by_raw = raw.read_all(Position::ORIGIN, 10).unwrap();
        let by_store = rt
            .block_on(store.read_all(Position::ORIGIN, None, 10))
            .unwrap();
        assert_eq!(by_raw.len(), 4);
        for (i, (r, s)) in by_raw.iter().zip(&by_store).enumerate() {
            assert_eq!(r.metadata, written[i].metadata, "raw read of event {i}");
            assert_eq!(s.metadata, written[i].metadata, "store read of event {i}");
            assert_eq!((r.id, &r.payload), (s.id, &s.payload));
        }
    }
}
