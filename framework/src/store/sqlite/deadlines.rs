//! Process managers' durable deadlines in SQLite, beside the event log
//! (table `aftermath_deadlines`, migration 6). Writes go through the store's
//! single writer thread, reads through the read pool.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, Row};
use uuid::Uuid;

use super::SqliteStore;
use super::subscriptions::{db, micros};
use crate::event::Position;
use crate::process::{Deadline, DeadlineStore};
use crate::store::StoreError;
use crate::subscription::Partition;
use crate::subscription::partition::stored_hash;

const COLUMNS: &str = "process, id, instance, name, due_at";

/// A bad row: [`StoreError::Corrupt`] naming the table (deadlines have no
/// position).
fn corrupt(message: String) -> StoreError {
    StoreError::Corrupt {
        position: Position::ORIGIN,
        stream: "aftermath_deadlines".into(),
        message,
    }
}

/// A stored `due_at` (microseconds), or what is wrong with it.
fn due_at(value: ValueRef<'_>) -> Result<DateTime<Utc>, String> {
    match value {
        ValueRef::Integer(m) => DateTime::<Utc>::from_timestamp_micros(m)
            .ok_or_else(|| format!("due_at holds {m}, out of range")),
        _ => Err("due_at is not an integer of microseconds".to_owned()),
    }
}

/// A row of [`COLUMNS`] as a [`Deadline`], or what is wrong with it.
fn deadline(row: &Row<'_>) -> rusqlite::Result<Result<Deadline, String>> {
    let id = match row.get_ref(1)? {
        ValueRef::Blob(b) => match <[u8; 16]>::try_from(b) {
            Ok(bytes) => Uuid::from_bytes(bytes),
            Err(_) => return Ok(Err(format!("id holds {} bytes, not 16", b.len()))),
        },
        _ => return Ok(Err("id is not a 16-byte blob".to_owned())),
    };
    let due_at = match due_at(row.get_ref(4)?) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    let text = |index: usize, column: &str| -> rusqlite::Result<Result<String, String>> {
        Ok(match row.get_ref(index)? {
            ValueRef::Text(t) => std::str::from_utf8(t)
                .map(str::to_owned)
                .map_err(|e| format!("{column} is not UTF-8: {e}")),
            _ => Err(format!("{column} is not text")),
        })
    };
    let process = match text(0, "process")? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let instance = match text(2, "instance")? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let name = match text(3, "name")? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(Deadline {
        process,
        instance,
        id,
        name,
        due_at,
    }))
}

fn query(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Deadline>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db("reading deadlines"))?;
    let rows = stmt
        .query_map(params, deadline)
        .map_err(db("reading deadlines"))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.map_err(db("reading deadlines"))?.map_err(corrupt)?);
    }
    Ok(out)
}

/// The stored instance hashes of `partition` (every hash without one).
fn range(partition: Option<Partition>) -> (i64, i64) {
    partition.map_or((i64::MIN, i64::MAX), |p| p.stored_range())
}

/// Fills `instance_hash` of deadlines scheduled before migration 8 (SQLite
/// has no hash function to do it in SQL). Runs inside the migration's
/// transaction.
pub(super) fn backfill_instance_hashes(conn: &Connection) -> rusqlite::Result<()> {
    let rows: Vec<(String, String)> = conn
        .prepare("SELECT DISTINCT process, instance FROM aftermath_deadlines WHERE instance_hash IS NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut update = conn.prepare(
        "UPDATE aftermath_deadlines SET instance_hash = ?3 WHERE process = ?1 AND instance = ?2",
    )?;
    for (process, instance) in rows {
        let hash = crate::subscription::stream_hash(&crate::process::record::stream_of(
            &process, &instance,
        ));
        update.execute((&process, &instance, stored_hash(hash)))?;
    }
    Ok(())
}

/// SQLite integers are `i64`; larger limits mean "no limit".
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[async_trait]
impl DeadlineStore for SqliteStore {
    async fn schedule(&self, deadline: &Deadline) -> Result<(), StoreError> {
        let deadline = deadline.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO aftermath_deadlines (process, id, instance, name, due_at, instance_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (process, id) DO UPDATE SET instance = excluded.instance,
                     name = excluded.name, due_at = excluded.due_at,
                     instance_hash = excluded.instance_hash",
            )
            .and_then(|mut s| {
                s.execute((
                    &deadline.process,
                    deadline.id.as_bytes().as_slice(),
                    &deadline.instance,
                    &deadline.name,
                    micros(deadline.due_at),
                    stored_hash(deadline.instance_hash()),
                ))
            })
            .map_err(db("scheduling a deadline"))?;
            Ok(())
        })
        .await
    }

    async fn cancel(&self, process: &str, id: Uuid) -> Result<(), StoreError> {
        let process = process.to_owned();
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM aftermath_deadlines WHERE process = ?1 AND id = ?2")
                .and_then(|mut s| s.execute((&process, id.as_bytes().as_slice())))
                .map_err(db("cancelling a deadline"))?;
            Ok(())
        })
        .await
    }

    async fn cancel_instance(&self, process: &str, instance: &str) -> Result<(), StoreError> {
        let (process, instance) = (process.to_owned(), instance.to_owned());
        self.write(move |conn| {
            conn.prepare_cached(
                "DELETE FROM aftermath_deadlines WHERE process = ?1 AND instance = ?2",
            )
            .and_then(|mut s| s.execute((&process, &instance)))
            .map_err(db("cancelling an instance's deadlines"))?;
            Ok(())
        })
        .await
    }

    async fn due(
        &self,
        process: &str,
        partition: Option<Partition>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Deadline>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let process = process.to_owned();
        let (first, last) = range(partition);
        self.read(move |conn| {
            query(
                conn,
                &format!(
                    "SELECT {COLUMNS} FROM aftermath_deadlines
                     WHERE process = ?1 AND due_at <= ?2 AND instance_hash BETWEEN ?4 AND ?5
                     ORDER BY due_at, id LIMIT ?3"
                ),
                (&process, micros(now), sql_limit(limit), first, last),
            )
        })
        .await
    }

    async fn next_due(
        &self,
        process: &str,
        partition: Option<Partition>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let process = process.to_owned();
        let (first, last) = range(partition);
        self.read(move |conn| {
            // The first entry of the process in the `(process, due_at, id)`
            // index that is in the partition.
            let due = conn
                .prepare_cached(
                    "SELECT due_at FROM aftermath_deadlines
                     WHERE process = ?1 AND instance_hash BETWEEN ?2 AND ?3
                     ORDER BY due_at LIMIT 1",
                )
                .and_then(|mut s| {
                    s.query_row((&process, first, last), |row| Ok(due_at(row.get_ref(0)?)))
                        .optional()
                })
                .map_err(db("reading the next deadline"))?;
            due.transpose().map_err(corrupt)
        })
        .await
    }

    async fn pending(&self, process: &str, instance: &str) -> Result<Vec<Deadline>, StoreError> {
        let (process, instance) = (process.to_owned(), instance.to_owned());
        self.read(move |conn| {
            query(
                conn,
                &format!(
                    "SELECT {COLUMNS} FROM aftermath_deadlines
                     WHERE process = ?1 AND instance = ?2
                     ORDER BY due_at, id"
                ),
                (&process, &instance),
            )
        })
        .await
    }
}

impl SqliteStore {
    /// Every pending deadline of every process, earliest first, at most
    /// `limit` (see [`crate::admin::Admin::deadlines`]).
    pub(super) async fn all_deadlines(&self, limit: usize) -> Result<Vec<Deadline>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            query(
                conn,
                "SELECT process, id, instance, name, due_at FROM aftermath_deadlines
                 ORDER BY due_at, process, id LIMIT ?1",
                [limit],
            )
        })
        .await
    }
}
