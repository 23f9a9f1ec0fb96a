//! The [`EventStore`] trait every backend implements, and its types.
//!
//! Contracts (checked for every backend by the conformance suite in `tests/`):
//!
//! - `append` is atomic for the whole batch. An expected-version mismatch is
//!   [`StoreError::WrongExpectedVersion`], never a partial write.
//! - Appending a batch whose event ids were already appended to that stream at
//!   the same versions is a no-op that returns the first [`AppendResult`] (with
//!   `duplicate: true`). Any other reuse of an event id, including twice in one
//!   batch, is [`StoreError::DuplicateEventId`].
//! - `$all` order is total and gap-free for readers: a reader that has seen
//!   position `p` never later receives an event ordered before `p`.
//! - Reads are paged: a call returns at most `limit` events, so memory is
//!   bounded by the page size. [`read_stream_all`] and [`read_all_pages`]
//!   iterate pages as a [`futures::Stream`].
//! - Bad data is a typed error naming the stream, version, position and type.
//! - `read_correlation` reads the events of one correlation id, of every
//!   stream, in `$all` order and with `read_all`'s visibility: it never shows
//!   an event before one ordered earlier.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::Stream;
use uuid::Uuid;

use crate::event::{DecodeError, EventData, Position, StoredEvent};
// The one upward reference: `subscription::partition` depends on nothing.
use crate::subscription::Partition;

#[cfg(feature = "kurrentdb")]
pub mod kurrentdb;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// What the writer expects the stream's current version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist (have no events).
    NoStream,
    /// The stream must exist (have at least one event).
    StreamExists,
    /// The stream's last version must be exactly this (0 means no events).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose current version is `actual` (0 = no stream)
    /// satisfies this expectation.
    pub fn matches(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::StreamExists => actual > 0,
            ExpectedVersion::Exact(v) => v == actual,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("stream exists"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// Version of the first event appended (the stream's version + 1 before
    /// the append). For an empty batch, the stream's current version + 1.
    pub first_version: u64,
    /// The stream's version after the append (its last event's version).
    pub last_version: u64,
    /// Position of the first event appended (`None` for an empty batch).
    pub first_position: Option<Position>,
    /// Position of the last event appended (`None` for an empty batch).
    pub last_position: Option<Position>,
    /// True when these event ids were already appended at this place and the
    /// call changed nothing (idempotent retry).
    pub duplicate: bool,
}

/// Direction of a stream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first: versions `from, from + 1, ...`.
    Forward,
    /// Newest first: versions `from, from - 1, ...` (`u64::MAX` = from the end).
    Backward,
}

/// A saved aggregate state at a stream version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The stream the state was folded from.
    pub stream: String,
    /// The stream version the state includes.
    pub version: u64,
    /// The serialized state (JSON).
    pub state: Vec<u8>,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
}

/// Errors of the event store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream's version is not the one the writer expected.
    #[error(
        "wrong expected version on stream `{stream}`: expected {expected}, actual version {actual}"
    )]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's current version (0 = no events).
        actual: u64,
    },
    /// An event id that already exists elsewhere (or twice in the batch).
    #[error(
        "event id {id} reused on stream `{stream}`: already stored in stream `{existing_stream}` at version {existing_version}"
    )]
    DuplicateEventId {
        /// The offending id.
        id: Uuid,
        /// The stream of the rejected append.
        stream: String,
        /// Where the id is already stored (the same stream for a duplicate in
        /// one batch).
        existing_stream: String,
        /// Version of the existing event (0 for a duplicate within the batch).
        existing_version: u64,
    },
    /// A stream name that cannot be stored (empty, or starting with `$`).
    #[error("invalid stream name `{stream}`: {reason}")]
    InvalidStream {
        /// The rejected name.
        stream: String,
        /// Why.
        reason: &'static str,
    },
    /// A stored event that does not decode or fails upcasting.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A stored row that is not a valid event (bad id, metadata, timestamp).
    #[error("corrupt row at position {position} (stream `{stream}`): {message}")]
    Corrupt {
        /// Position of the row.
        position: Position,
        /// Stream of the row, as far as it could be read.
        stream: String,
        /// What is wrong.
        message: String,
    },
    /// The database is not an aftermath event store, or a newer schema.
    #[error("refusing to open {location}: {reason}")]
    Incompatible {
        /// Path or URL of the database.
        location: String,
        /// Why it was refused.
        reason: String,
    },
    /// A fenced write by an owner whose lease is no longer current.
    #[error("lease `{name}` is no longer held by `{owner}` with token {token}")]
    LeaseLost {
        /// The lease (subscriber) name.
        name: String,
        /// The owner that tried to write.
        owner: String,
        /// The token it held.
        token: u64,
    },
    /// A fenced checkpoint write found the checkpoint (or the layout row
    /// guarding it) no longer where the writer started: another writer
    /// committed in between (a second process without leases, a stale
    /// owner, a rebuild or layout change). Nothing was written. Runners
    /// treat it as a lost race, not a failure: they re-read the checkpoint
    /// and continue from there.
    #[error(
        "checkpoint `{name}` moved: the write expected {expected}, the store holds {}",
        found.as_deref().unwrap_or("nothing")
    )]
    CheckpointMoved {
        /// The checkpoint (or layout row) name.
        name: String,
        /// What the writer expected to find.
        expected: String,
        /// What the store holds (`None`: no row).
        found: Option<String>,
    },
    /// The store was closed or its writer stopped.
    #[error("event store is closed: {0}")]
    Closed(String),
    /// A SQLite write job (a SQLite projection's `apply`, `setup` or
    /// `reset`, a `SqliteStore::write` closure) used a store again or waited
    /// for something outside its own connection. The job runs on the store's
    /// only writer thread, which every write of that store waits for, so such
    /// a wait could never end (an append from `apply` would deadlock every
    /// write in the process): the call fails at once instead, and a job that
    /// waits longer than a second is abandoned and rolled back. Write through
    /// the connection the job was given (`SqliteTx`), and append from a
    /// reactor or process manager.
    #[error(
        "a write job on the writer thread of SQLite store `{store}` {cause}; the job holds the \
         store's only writer, so this would wait forever: write through the connection the job \
         was given (`SqliteTx`) and append or call other stores from a reactor or process manager"
    )]
    WriterReentry {
        /// The database file whose writer thread ran the job.
        store: String,
        /// What the job did, e.g. "called the store (an append, a checkpoint, a lease, a
        /// `write` job)".
        cause: String,
    },
    /// An error of the underlying database.
    #[error("database error during {operation}: {source}")]
    Database {
        /// What the store was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// Wraps a driver error with what the store was doing.
    pub fn database(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Database {
            operation,
            source: Box::new(source),
        }
    }
}

/// Checks a stream name for append: not empty, not starting with `$`
/// (reserved for the store's own streams such as `$all`).
pub fn validate_stream(stream: &str) -> Result<(), StoreError> {
    if stream.is_empty() {
        return Err(StoreError::InvalidStream {
            stream: stream.to_owned(),
            reason: "a stream name must not be empty",
        });
    }
    if stream.starts_with('$') {
        return Err(StoreError::InvalidStream {
            stream: stream.to_owned(),
            reason: "names starting with `$` are reserved",
        });
    }
    Ok(())
}

/// Checks a batch for an event id used twice in it.
pub fn check_batch_ids(stream: &str, events: &[EventData]) -> Result<(), StoreError> {
    for (i, e) in events.iter().enumerate() {
        if events[..i].iter().any(|o| o.id == e.id) {
            return Err(StoreError::DuplicateEventId {
                id: e.id,
                stream: stream.to_owned(),
                existing_stream: stream.to_owned(),
                existing_version: 0,
            });
        }
    }
    Ok(())
}

/// The smallest page of `$all` the default
/// [`EventStore::read_correlation`] scans at a time (events of one
/// correlation are usually sparse in `$all`).
pub const CORRELATION_SCAN_PAGE: usize = 512;

/// One event of a stream as an aggregate folds it (see
/// [`EventStore::read_stream_fold`]): what folding and its errors use, no
/// id, stream name, metadata or time.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldEvent {
    /// Version in its stream (1-based).
    pub version: u64,
    /// Position in `$all` (for error messages).
    pub position: Position,
    /// Type name (after upcasting).
    pub event_type: String,
    /// JSON payload (after upcasting).
    pub payload: Vec<u8>,
}

impl From<StoredEvent> for FoldEvent {
    fn from(e: StoredEvent) -> Self {
        FoldEvent {
            version: e.version,
            position: e.position,
            event_type: e.event_type,
            payload: e.payload,
        }
    }
}

/// An append-only event log with optimistic concurrency and a global order.
///
/// Implementations are cheap to clone handles (`Arc` inside) and safe to
/// share between tasks.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically if its version matches
    /// `expected`. See the module docs for the idempotent-retry rule.
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError>;

    /// Reads up to `limit` events of `stream` starting at version `from`
    /// (inclusive) in `direction`. A missing stream reads as empty.
    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Reads up to `limit` events of `stream` forward from version `from`
    /// (inclusive), upcast, for folding an aggregate: what
    /// [`Repository::load`](crate::aggregate::Repository::load) reads. A
    /// store may leave out what folding does not use (PostgreSQL reads five
    /// columns instead of eleven); the default reads
    /// [`EventStore::read_stream`].
    async fn read_stream_fold(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<FoldEvent>, StoreError> {
        let events = self
            .read_stream(stream, from, Direction::Forward, limit)
            .await?;
        Ok(events.into_iter().map(FoldEvent::from).collect())
    }

    /// Reads up to `limit` events of `$all` with a position greater than
    /// `after`, in position order. With `types`, only events whose type
    /// (after upcasting) is one of them; the filter runs in the store.
    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Like [`read_all`](EventStore::read_all), but only events of the
    /// streams in `partition` (see [`Partition`]): up to `limit` of them
    /// after `after`, in position order. A page shorter than `limit` means
    /// the partition has nothing more up to the head as of the read, exactly
    /// as a short `read_all` page does.
    ///
    /// The default implementation filters pages of `read_all` (of `limit`
    /// events each) until it has `limit` events or reaches the end, so it
    /// reads every partition's events; memory stays bounded by `limit`.
    /// Backends that can filter in their query (PostgreSQL, on a stored hash
    /// column) override it.
    async fn read_all_partition(
        &self,
        after: Position,
        types: Option<&[&str]>,
        partition: Partition,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if partition.count <= 1 || limit == 0 {
            return self.read_all(after, types, limit).await;
        }
        let mut found = Vec::new();
        let mut cursor = after;
        loop {
            let page = self.read_all(cursor, types, limit).await?;
            let short = page.len() < limit;
            if let Some(last) = page.last() {
                cursor = last.position;
            }
            for event in page {
                if partition.contains(&event.stream) {
                    found.push(event);
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
            if short {
                return Ok(found);
            }
        }
    }

    /// Reads up to `limit` events whose `metadata.correlation_id` is
    /// `correlation_id`, of any stream, with a position greater than `after`,
    /// in `$all` order (the conversation's timeline). Upcasters apply as on
    /// every other read. A page shorter than `limit` means there is nothing
    /// more of this correlation up to the head as of the read.
    ///
    /// The default implementation is a full scan: it filters pages of
    /// [`read_all`](EventStore::read_all) (of at least
    /// [`CORRELATION_SCAN_PAGE`] events each) from `after` to the head, so it
    /// reads every event after `after`; memory stays bounded by the page
    /// size. It is correct for any backend, and follows `read_all`'s
    /// visibility rule. Backends with an index on the correlation id
    /// (memory, SQLite, PostgreSQL) override it.
    async fn read_correlation(
        &self,
        correlation_id: Uuid,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let page_size = limit.max(CORRELATION_SCAN_PAGE);
        let mut found = Vec::new();
        let mut cursor = after;
        loop {
            let page = self.read_all(cursor, None, page_size).await?;
            let short = page.len() < page_size;
            if let Some(last) = page.last() {
                cursor = last.position;
            }
            for event in page {
                if event.metadata.correlation_id == correlation_id {
                    found.push(event);
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
            if short {
                return Ok(found);
            }
        }
    }

    /// The current version of `stream` (0 when it has no events).
    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError>;

    /// The position of the last event in `$all` ([`Position::ORIGIN`] when
    /// empty).
    async fn head(&self) -> Result<Position, StoreError>;

    /// Finds an event by id.
    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError>;

    /// A receiver that changes whenever this process appends: the value is
    /// the head position after the append. Readers await it instead of
    /// polling for appends made through this store handle.
    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position>;

    /// Applies this store's upcasters to an event kept elsewhere (a process
    /// instance keeps a copy of each input it handled), so the copy reads
    /// like any event read from this store. Stores without upcasters leave
    /// it as it is.
    fn upcast(&self, event: &mut StoredEvent) -> Result<(), DecodeError> {
        let _ = event;
        Ok(())
    }

    /// Saves (replaces) the snapshot of a stream.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError>;

    /// Loads the snapshot of a stream, if any.
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError>;
}

#[async_trait]
impl<S: EventStore + ?Sized> EventStore for Arc<S> {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        (**self).append(stream, expected, events).await
    }
    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        (**self).read_stream(stream, from, direction, limit).await
    }
    async fn read_stream_fold(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<FoldEvent>, StoreError> {
        (**self).read_stream_fold(stream, from, limit).await
    }
    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        (**self).read_all(after, types, limit).await
    }
    async fn read_all_partition(
        &self,
        after: Position,
        types: Option<&[&str]>,
        partition: Partition,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        (**self)
            .read_all_partition(after, types, partition, limit)
            .await
    }
    async fn read_correlation(
        &self,
        correlation_id: Uuid,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        (**self)
            .read_correlation(correlation_id, after, limit)
            .await
    }
    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        (**self).stream_version(stream).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        (**self).head().await
    }
    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        (**self).find_event(id).await
    }
    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        (**self).watch_head()
    }
    fn upcast(&self, event: &mut StoredEvent) -> Result<(), DecodeError> {
        (**self).upcast(event)
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        (**self).save_snapshot(snapshot).await
    }
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        (**self).load_snapshot(stream).await
    }
}

/// Streams every event of `stream` from version `from` in `direction`,
/// reading `page` events at a time: memory stays bounded by the page size.
pub fn read_stream_all<'a, S: EventStore + ?Sized>(
    store: &'a S,
    stream: &'a str,
    from: u64,
    direction: Direction,
    page: usize,
) -> impl Stream<Item = Result<StoredEvent, StoreError>> + Send + 'a {
    let page = page.max(1);
    let state = (Some(from), Vec::<StoredEvent>::new().into_iter());
    futures::stream::unfold(state, move |(next, mut buffered)| async move {
        if let Some(event) = buffered.next() {
            return Some((Ok(event), (next, buffered)));
        }
        let from = next?;
        match store.read_stream(stream, from, direction, page).await {
            Err(e) => Some((Err(e), (None, Vec::new().into_iter()))),
            Ok(events) => {
                let following = match (events.last(), direction) {
                    _ if events.len() < page => None,
                    (Some(last), Direction::Forward) => last.version.checked_add(1),
                    (Some(last), Direction::Backward) => {
                        last.version.checked_sub(1).filter(|v| *v > 0)
                    }
                    (None, _) => None,
                };
                buffered = events.into_iter();
                buffered.next().map(|e| (Ok(e), (following, buffered)))
            }
        }
    })
}

/// Streams every event of `$all` after `after` (optionally filtered by type),
/// reading `page` events at a time: memory stays bounded by the page size.
pub fn read_all_pages<'a, S: EventStore + ?Sized>(
    store: &'a S,
    after: Position,
    types: Option<&'a [&'a str]>,
    page: usize,
) -> impl Stream<Item = Result<StoredEvent, StoreError>> + Send + 'a {
    let page = page.max(1);
    let state = (Some(after), Vec::<StoredEvent>::new().into_iter());
    futures::stream::unfold(state, move |(next, mut buffered)| async move {
        if let Some(event) = buffered.next() {
            return Some((Ok(event), (next, buffered)));
        }
        let after = next?;
        match store.read_all(after, types, page).await {
            Err(e) => Some((Err(e), (None, Vec::new().into_iter()))),
            Ok(events) => {
                let following = match events.last() {
                    Some(last) if events.len() == page => Some(last.position),
                    _ => None,
                };
                buffered = events.into_iter();
                buffered.next().map(|e| (Ok(e), (following, buffered)))
            }
        }
    })
}
