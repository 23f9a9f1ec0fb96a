//! The embedded default backend: one SQLite file in WAL mode.
//!
//! [`SqliteStore`] keeps the event log, snapshots (and, in later versions,
//! everything else aftermath persists) in one database file:
//!
//! - **One writer thread** owns the only read-write connection and commits
//!   whatever requests are queued in one transaction (group commit), each in
//!   its own savepoint, so a failing append fails alone. Positions are the
//!   rowids this writer assigns, so `$all` is gap-free and in commit order.
//! - **A pool of read-only connections** serves reads on tokio's blocking
//!   threads; with WAL, reads never wait for the writer.
//! - **The schema is versioned**: the file carries aftermath's
//!   `PRAGMA application_id`, a table `aftermath_schema` records the applied
//!   migrations (the `.sql` files beside this module), and opening a file
//!   applies the pending ones. A file that is not SQLite, a database of
//!   another application, or a schema newer than this build is refused with
//!   [`StoreError::Incompatible`].
//!
//! [`SqliteStore::write`] and [`SqliteStore::read`] run your own SQL through
//! the same writer and pool, e.g. a projection updating its read model and
//! its checkpoint in one transaction. The [`rusqlite`] crate is re-exported
//! for them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    AppendResult, Direction, EventStore, ExpectedVersion, Snapshot, StoreError, check_batch_ids,
    validate_stream,
};
use crate::event::{EventData, Position, StoredEvent};
use crate::upcast::Upcasters;

mod deadlines;
mod events;
#[cfg(feature = "nats")]
mod inbox;
mod journal;
mod pool;
mod schema;
mod subscriptions;
#[cfg(test)]
mod tests;
mod writer;

/// The `rusqlite` version this backend uses, for [`SqliteStore::write`] and
/// [`SqliteStore::read`] closures.
pub use rusqlite;

/// The schema version this build of aftermath creates and understands in
/// a SQLite file (the highest `version` in its `aftermath_schema` table). Opening
/// a store of an older version migrates it; a newer one is refused with
/// [`StoreError::Incompatible`]. Tools that
/// must not migrate (the `aftermath` command-line tool) compare against it
/// before opening.
pub const SCHEMA_VERSION: i64 = schema::SCHEMA_VERSION;
pub use subscriptions::SqliteTx;

use pool::ReadPool;
use writer::Writer;

/// How hard SQLite works to make a commit durable (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Synchronous {
    /// `NORMAL` (the default): in WAL mode a commit does not wait for the
    /// disk; the WAL is synced at checkpoints. An application crash loses
    /// nothing that was committed, and the database is never corrupted, but
    /// a power loss or operating-system crash can lose the last transactions
    /// committed before it. Much faster appends.
    #[default]
    Normal,
    /// `FULL`: every commit is synced to disk before the append returns, so
    /// a committed event survives a power loss too. Each group commit costs
    /// an `fsync` (group commit shares it between concurrent appends).
    Full,
}

/// Settings of a [`SqliteStore`], builder style.
///
/// ```
/// use std::time::Duration;
/// use aftermath::{SqliteOptions, Synchronous, Upcasters};
///
/// let options = SqliteOptions::default()
///     .synchronous(Synchronous::Full)
///     .read_connections(8)
///     .max_batch(512)
///     .busy_timeout(Duration::from_secs(10))
///     .upcasters(Upcasters::new());
/// assert_eq!(options.get_read_connections(), 8);
/// ```
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    synchronous: Synchronous,
    read_connections: usize,
    max_batch: usize,
    busy_timeout: Duration,
    upcasters: Arc<Upcasters>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Normal,
            read_connections: 4,
            max_batch: 256,
            busy_timeout: Duration::from_secs(5),
            upcasters: Arc::new(Upcasters::new()),
        }
    }
}

impl SqliteOptions {
    /// Durability of commits; see [`Synchronous`] for the trade-off.
    /// Default [`Synchronous::Normal`].
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// How many read-only connections serve reads in parallel (at least
    /// one). Default 4.
    pub fn read_connections(mut self, count: usize) -> Self {
        self.read_connections = count.max(1);
        self
    }

    /// The most write requests (appends, snapshots, write jobs) committed
    /// in one transaction (at least one). Default 256.
    pub fn max_batch(mut self, requests: usize) -> Self {
        self.max_batch = requests.max(1);
        self
    }

    /// How long a connection waits for a lock held by another process
    /// before failing. Default 5 seconds.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The upcasters every read applies. Default: none.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }

    /// The durability setting.
    pub fn get_synchronous(&self) -> Synchronous {
        self.synchronous
    }

    /// The number of read connections.
    pub fn get_read_connections(&self) -> usize {
        self.read_connections
    }

    /// The group-commit batch limit.
    pub fn get_max_batch(&self) -> usize {
        self.max_batch
    }

    /// The busy timeout.
    pub fn get_busy_timeout(&self) -> Duration {
        self.busy_timeout
    }
}

struct Shared {
    writer: Writer,
    readers: ReadPool,
    head: Arc<tokio::sync::watch::Sender<Position>>,
    upcasters: Arc<Upcasters>,
    path: PathBuf,
}

/// An [`EventStore`] in one SQLite file (WAL mode). Clones share the same
/// writer thread and read pool; the writer stops when the last clone drops.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use aftermath::store::{Direction, EventStore, ExpectedVersion};
/// use aftermath::{EventData, Metadata, SqliteStore};
/// use uuid::Uuid;
///
/// let path = std::env::temp_dir().join(format!("aftermath-doc-{}.db", Uuid::new_v4()));
/// let store = SqliteStore::open(&path).await?;
///
/// let id = Uuid::now_v7();
/// let event = EventData {
///     id,
///     event_type: "Pinged".into(),
///     payload: br#"{"n":1}"#.to_vec(),
///     metadata: Metadata::caused_by(id),
/// };
/// let done = store.append("ping-1", ExpectedVersion::NoStream, vec![event]).await?;
/// assert_eq!(done.last_version, 1);
///
/// let events = store.read_stream("ping-1", 1, Direction::Forward, 10).await?;
/// assert_eq!(events.len(), 1);
/// assert_eq!(events[0].id, id);
/// assert_eq!(events[0].payload, br#"{"n":1}"#);
/// # drop(store);
/// # for suffix in ["", "-wal", "-shm"] {
/// #     let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
/// # }
/// # Ok::<(), aftermath::StoreError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// What an append's output says about the head of `$all`.
fn appended_head(result: &AppendResult) -> Option<Position> {
    if result.duplicate {
        None
    } else {
        result.last_position
    }
}

/// [`check_batch_ids`] without its quadratic cost for large batches: the
/// same error, found by sorting first.
fn check_ids(stream: &str, events: &[EventData]) -> Result<(), StoreError> {
    if events.len() <= 16 {
        return check_batch_ids(stream, events);
    }
    let mut ids: Vec<u128> = events.iter().map(|e| e.id.as_u128()).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|pair| pair[0] == pair[1]) {
        return check_batch_ids(stream, events);
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (or creates) the store in the file at `path` with default
    /// [`SqliteOptions`].
    ///
    /// Creates the schema in a new or empty file and applies pending
    /// migrations to an older aftermath database. Refuses, with
    /// [`StoreError::Incompatible`], a file that is not SQLite, a SQLite
    /// database of another application, or a schema newer than this build.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens (or creates) the store in the file at `path` with `options`.
    /// See [`SqliteStore::open`].
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(path, options))
            .await
            .map_err(|e| StoreError::database("opening the database", e))?
    }

    fn open_blocking(path: PathBuf, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let location = path.display().to_string();
        let conn = schema::open_writer(&path, &location, &options)?;
        let head = Arc::new(tokio::sync::watch::Sender::new(events::head(&conn)?));
        let readers = ReadPool::open(&path, options.read_connections, options.busy_timeout)?;
        let writer = Writer::spawn(conn, &location, options.max_batch, head.clone())?;
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                writer,
                readers,
                head,
                upcasters: options.upcasters,
                path,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `f` on the writer connection, in the next group commit, and
    /// returns its output once that transaction committed.
    ///
    /// `f` runs inside its own savepoint of the writer's transaction: if it
    /// returns an error or panics, its writes are rolled back and the error
    /// (for a panic, a [`StoreError::Database`]) comes back here, while the
    /// other requests of the group commit. If the commit fails, this
    /// returns that error and nothing of `f` is kept. Use it to write a
    /// read model and its checkpoint atomically, in the same file as the
    /// events.
    ///
    /// `f` runs on the writer thread, so every other write waits for it:
    /// keep it short, and do not `BEGIN`, `COMMIT` or `ROLLBACK` in it
    /// (nested `SAVEPOINT`s are fine). Writes to the `events` table made
    /// here do not move [`EventStore::watch_head`]. If the returned future
    /// is dropped after the request was queued, `f` still runs and commits.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use aftermath::{SqliteStore, StoreError};
    /// # let path = std::env::temp_dir().join(format!("aftermath-doc-{}.db", uuid::Uuid::new_v4()));
    /// let store = SqliteStore::open(&path).await?;
    /// store
    ///     .write(|conn| {
    ///         conn.execute_batch("CREATE TABLE IF NOT EXISTS totals (name TEXT PRIMARY KEY, n INTEGER)")
    ///             .map_err(|e| StoreError::database("creating the read model", e))
    ///     })
    ///     .await?;
    /// let n: i64 = store
    ///     .read(|conn| {
    ///         conn.query_row("SELECT count(*) FROM totals", [], |row| row.get(0))
    ///             .map_err(|e| StoreError::database("counting totals", e))
    ///     })
    ///     .await?;
    /// assert_eq!(n, 0);
    /// # drop(store);
    /// # for suffix in ["", "-wal", "-shm"] {
    /// #     let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    /// # }
    /// # Ok::<(), StoreError>(())
    /// # }).unwrap();
    /// ```
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.shared
            .writer
            .submit((), |_| None, move |conn, ()| f(conn))
            .await
    }

    /// Like [`SqliteStore::write`], with exclusive access to the writer's
    /// connection (projection transactions hand it to `SqliteTx`).
    pub(crate) async fn write_exclusive<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.shared
            .writer
            .submit((), |_| None, move |conn, ()| f(conn))
            .await
    }

    /// Runs `f` on a read-only connection of the pool, on tokio's blocking
    /// threads. Sees everything committed before it starts.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.shared.readers.run(f).await
    }

    /// How many group transactions the writer has committed (or tried to).
    #[cfg(test)]
    fn groups(&self) -> u64 {
        self.shared.writer.groups()
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        validate_stream(stream)?;
        check_ids(stream, &events)?;
        let stream = stream.to_owned();
        self.shared
            .writer
            .submit(events, appended_head, move |conn, events| {
                events::append(conn, &stream, expected, events)
            })
            .await
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stream = stream.to_owned();
        let upcasters = self.shared.upcasters.clone();
        self.read(move |conn| {
            events::read_stream(conn, &stream, from, direction, limit, &upcasters)
        })
        .await
    }

    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let types = types.map(|t| {
            let mut stored = self.shared.upcasters.stored_types(t);
            let mut seen = std::collections::HashSet::with_capacity(stored.len());
            stored.retain(|t| seen.insert(t.clone()));
            stored
        });
        let upcasters = self.shared.upcasters.clone();
        self.read(move |conn| events::read_all(conn, after, types.as_deref(), limit, &upcasters))
            .await
    }

    /// One ordered range scan of the `(correlation_id, position)` index.
    async fn read_correlation(
        &self,
        correlation_id: Uuid,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let upcasters = self.shared.upcasters.clone();
        self.read(move |conn| {
            events::read_correlation(conn, correlation_id, after, limit, &upcasters)
        })
        .await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        let stream = stream.to_owned();
        self.read(move |conn| events::stream_version(conn, &stream))
            .await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.read(events::head).await
    }

    fn upcast(&self, event: &mut StoredEvent) -> Result<(), crate::event::DecodeError> {
        self.shared.upcasters.apply(event)
    }

    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        let upcasters = self.shared.upcasters.clone();
        self.read(move |conn| events::find_event(conn, id, &upcasters))
            .await
    }

    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        self.shared.head.subscribe()
    }

    /// Saves the snapshot unless the stored one has a higher version (a
    /// slow writer never replaces a newer snapshot with an older one).
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.write(move |conn| events::save_snapshot(conn, &snapshot))
            .await
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        let stream = stream.to_owned();
        self.read(move |conn| events::load_snapshot(conn, &stream))
            .await
    }
}
