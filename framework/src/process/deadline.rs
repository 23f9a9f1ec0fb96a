//! Durable deadlines: timers a process instance sets and cancels as outputs,
//! kept in the database beside the event log (no external scheduler).
//!
//! The instance's stream is the source of truth (`DeadlineSet`,
//! `DeadlineCancelled`, `Completed` records); a [`DeadlineStore`] is the index
//! the runner polls for what is due. Every write is idempotent, so the runner
//! may repeat them after a crash, and a row that outlived its cancellation is
//! recognised against the stream and dropped, never delivered.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::store::StoreError;
use crate::subscription::Partition;

/// One scheduled deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadline {
    /// The process's name.
    pub process: String,
    /// The instance that set it.
    pub instance: String,
    /// The id of the `DeadlineSet` record that set it (unique per setting);
    /// the input id of the deadline when it fires.
    pub id: Uuid,
    /// The name the process gave it (`"shipping"`); setting a name again
    /// replaces the earlier deadline of that name.
    pub name: String,
    /// When it is due.
    pub due_at: DateTime<Utc>,
}

impl Deadline {
    /// The [`stream_hash`](crate::subscription::stream_hash) of its
    /// instance's stream: the partition of a partitioned process runner it
    /// belongs to is the partition of its instance.
    pub fn instance_hash(&self) -> u64 {
        crate::subscription::stream_hash(&super::record::stream_of(&self.process, &self.instance))
    }
}

/// Where deadlines wait until they are due. Implemented by the in-memory
/// [`MemoryDeadlines`], [`SqliteStore`](crate::SqliteStore) and
/// `PostgresStore`.
#[async_trait]
pub trait DeadlineStore: Send + Sync + 'static {
    /// Stores `deadline` (an upsert by `(process, id)`: scheduling the same
    /// deadline again changes nothing).
    async fn schedule(&self, deadline: &Deadline) -> Result<(), StoreError>;

    /// Removes the deadline `id` of `process` (no error when absent).
    async fn cancel(&self, process: &str, id: Uuid) -> Result<(), StoreError>;

    /// Removes every deadline of `instance` (the instance completed).
    async fn cancel_instance(&self, process: &str, instance: &str) -> Result<(), StoreError>;

    /// Up to `limit` deadlines of `process` due at or before `now`, earliest
    /// first (ties by id); with a `partition`, only those of the instances
    /// in it ([`Deadline::instance_hash`]).
    async fn due(
        &self,
        process: &str,
        partition: Option<Partition>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Deadline>, StoreError>;

    /// When the earliest pending deadline of `process` (in `partition`, if
    /// given) is due, if any.
    async fn next_due(
        &self,
        process: &str,
        partition: Option<Partition>,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Every pending deadline of `instance`, earliest first (for operators
    /// and tests).
    async fn pending(&self, process: &str, instance: &str) -> Result<Vec<Deadline>, StoreError>;
}

/// Whether `deadline` belongs to `partition` (always without one).
fn in_partition(deadline: &Deadline, partition: Option<Partition>) -> bool {
    partition.is_none_or(|p| p.contains_hash(deadline.instance_hash()))
}

/// (process, due_at, id) -> deadline: ordered by due time.
type Rows = BTreeMap<(String, DateTime<Utc>, Uuid), Deadline>;

/// Deadlines in memory, for tests and in-memory setups. Clones share state.
#[derive(Clone, Default)]
pub struct MemoryDeadlines {
    rows: Arc<Mutex<Rows>>,
}

impl MemoryDeadlines {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, Rows> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl DeadlineStore for MemoryDeadlines {
    async fn schedule(&self, deadline: &Deadline) -> Result<(), StoreError> {
        let mut rows = self.rows();
        rows.retain(|(p, _, id), _| !(p == &deadline.process && *id == deadline.id));
        rows.insert(
            (deadline.process.clone(), deadline.due_at, deadline.id),
            deadline.clone(),
        );
        Ok(())
    }

    async fn cancel(&self, process: &str, id: Uuid) -> Result<(), StoreError> {
        self.rows()
            .retain(|(p, _, i), _| !(p == process && *i == id));
        Ok(())
    }

    async fn cancel_instance(&self, process: &str, instance: &str) -> Result<(), StoreError> {
        self.rows()
            .retain(|(p, _, _), d| !(p == process && d.instance == instance));
        Ok(())
    }

    async fn due(
        &self,
        process: &str,
        partition: Option<Partition>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Deadline>, StoreError> {
        Ok(self
            .rows()
            .iter()
            .filter(|((p, due, _), d)| p == process && *due <= now && in_partition(d, partition))
            .take(limit)
            .map(|(_, d)| d.clone())
            .collect())
    }

    async fn next_due(
        &self,
        process: &str,
        partition: Option<Partition>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self
            .rows()
            .iter()
            .find(|((p, _, _), d)| p == process && in_partition(d, partition))
            .map(|((_, due, _), _)| *due))
    }

    async fn pending(&self, process: &str, instance: &str) -> Result<Vec<Deadline>, StoreError> {
        Ok(self
            .rows()
            .values()
            .filter(|d| d.process == process && d.instance == instance)
            .cloned()
            .collect())
    }
}
