//! Process managers' durable deadlines in PostgreSQL, in the store's schema
//! (table `aftermath_deadlines`, migration 5). Every call is one statement.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx_core::row::Row;
use sqlx_postgres::PgRow;
use uuid::Uuid;

use super::PostgresStore;
use super::events::{db, sql_int, stmt};
use super::types::Timestamp;
use crate::event::Position;
use crate::process::{Deadline, DeadlineStore};
use crate::store::StoreError;
use crate::subscription::Partition;
use crate::subscription::partition::stored_hash;

/// The columns [`deadline`] reads, in its order.
const COLUMNS: &str = "process, id, instance, name, due_at";

/// The deadline statements, with the schema name filled in once.
pub(super) struct Statements {
    schedule: Arc<str>,
    cancel: Arc<str>,
    cancel_instance: Arc<str>,
    due: Arc<str>,
    next_due: Arc<str>,
    pending: Arc<str>,
}

impl Statements {
    /// The statements for the schema whose quoted name is `schema`.
    pub(super) fn new(schema: &str) -> Statements {
        let s = |sql: String| -> Arc<str> { sql.into() };
        let table = format!("{schema}.aftermath_deadlines");
        Statements {
            schedule: s(format!(
                "INSERT INTO {table} (process, id, instance, name, due_at, instance_hash) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (process, id) DO UPDATE SET instance = excluded.instance, \
                   name = excluded.name, due_at = excluded.due_at, \
                   instance_hash = excluded.instance_hash"
            )),
            cancel: s(format!(
                "DELETE FROM {table} WHERE process = $1 AND id = $2"
            )),
            cancel_instance: s(format!(
                "DELETE FROM {table} WHERE process = $1 AND instance = $2"
            )),
            due: s(format!(
                "SELECT {COLUMNS} FROM {table} WHERE process = $1 AND due_at <= $2 \
                   AND instance_hash BETWEEN $4 AND $5 \
                 ORDER BY due_at, id LIMIT $3"
            )),
            // The first entry of the process in `(process, due_at, id)`
            // that is in the partition.
            next_due: s(format!(
                "SELECT due_at FROM {table} WHERE process = $1 \
                   AND instance_hash BETWEEN $2 AND $3 ORDER BY due_at LIMIT 1"
            )),
            pending: s(format!(
                "SELECT {COLUMNS} FROM {table} WHERE process = $1 AND instance = $2 \
                 ORDER BY due_at, id"
            )),
        }
    }
}

/// A bad row: [`StoreError::Corrupt`] naming the table (deadlines have no
/// position).
fn corrupt(message: String) -> StoreError {
    StoreError::Corrupt {
        position: Position::ORIGIN,
        stream: "aftermath_deadlines".into(),
        message,
    }
}

/// A row of [`COLUMNS`] as a [`Deadline`].
fn deadline(row: &PgRow) -> Result<Deadline, StoreError> {
    let failed = || db("reading deadlines");
    let Timestamp(due_at) = row
        .try_get(4)
        .map_err(|e| corrupt(format!("column `due_at` does not decode: {e}")))?;
    Ok(Deadline {
        process: row.try_get(0).map_err(failed())?,
        id: row.try_get(1).map_err(failed())?,
        instance: row.try_get(2).map_err(failed())?,
        name: row.try_get(3).map_err(failed())?,
        due_at,
    })
}

fn deadlines(rows: Vec<PgRow>) -> Result<Vec<Deadline>, StoreError> {
    rows.iter().map(deadline).collect()
}

impl PostgresStore {
    fn deadline_statements(&self) -> &Statements {
        &self.shared.deadlines
    }
}

/// The stored instance hashes of `partition` (every hash without one).
fn range(partition: Option<Partition>) -> (i64, i64) {
    partition.map_or((i64::MIN, i64::MAX), |p| p.stored_range())
}

#[async_trait]
impl DeadlineStore for PostgresStore {
    async fn schedule(&self, deadline: &Deadline) -> Result<(), StoreError> {
        stmt(&self.deadline_statements().schedule)
            .bind(&deadline.process)
            .bind(deadline.id)
            .bind(&deadline.instance)
            .bind(&deadline.name)
            .bind(Timestamp(deadline.due_at))
            .bind(stored_hash(deadline.instance_hash()))
            .execute(self.pool())
            .await
            .map_err(db("scheduling a deadline"))?;
        Ok(())
    }

    async fn cancel(&self, process: &str, id: Uuid) -> Result<(), StoreError> {
        stmt(&self.deadline_statements().cancel)
            .bind(process)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(db("cancelling a deadline"))?;
        Ok(())
    }

    async fn cancel_instance(&self, process: &str, instance: &str) -> Result<(), StoreError> {
        stmt(&self.deadline_statements().cancel_instance)
            .bind(process)
            .bind(instance)
            .execute(self.pool())
            .await
            .map_err(db("cancelling an instance's deadlines"))?;
        Ok(())
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
        let (first, last) = range(partition);
        let rows = stmt(&self.deadline_statements().due)
            .bind(process)
            .bind(Timestamp(now))
            .bind(sql_int(limit as u64))
            .bind(first)
            .bind(last)
            .fetch_all(self.pool())
            .await
            .map_err(db("reading due deadlines"))?;
        deadlines(rows)
    }

    async fn next_due(
        &self,
        process: &str,
        partition: Option<Partition>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let (first, last) = range(partition);
        let row = stmt(&self.deadline_statements().next_due)
            .bind(process)
            .bind(first)
            .bind(last)
            .fetch_optional(self.pool())
            .await
            .map_err(db("reading the next deadline"))?;
        row.map(|row| {
            row.try_get(0)
                .map(|Timestamp(t)| t)
                .map_err(|e| corrupt(format!("column `due_at` does not decode: {e}")))
        })
        .transpose()
    }

    async fn pending(&self, process: &str, instance: &str) -> Result<Vec<Deadline>, StoreError> {
        let rows = stmt(&self.deadline_statements().pending)
            .bind(process)
            .bind(instance)
            .fetch_all(self.pool())
            .await
            .map_err(db("reading an instance's deadlines"))?;
        deadlines(rows)
    }
}

impl PostgresStore {
    /// Every pending deadline of every process, earliest first, at most
    /// `limit` (see [`crate::admin::Admin::deadlines`]).
    pub(super) async fn all_deadlines(&self, limit: usize) -> Result<Vec<Deadline>, StoreError> {
        let sql: Arc<str> = format!(
            "SELECT {COLUMNS} FROM \"{}\".aftermath_deadlines ORDER BY due_at, process, id LIMIT $1",
            self.schema()
        )
        .into();
        let rows = stmt(&sql)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(db("reading deadlines"))?;
        deadlines(rows)
    }
}
