//! The read pool: a few read-only connections used from
//! `tokio::task::spawn_blocking`, bounded by a semaphore, so reads run in
//! parallel with each other and with the writer (WAL) and never block the
//! async runtime.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use crate::store::StoreError;

struct Shared {
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    path: PathBuf,
    busy_timeout: Duration,
}

/// A bounded pool of read-only connections to one database file.
pub(super) struct ReadPool {
    shared: Arc<Shared>,
}

impl ReadPool {
    /// Opens `size` (at least one) read-only connections to `path`.
    pub(super) fn open(
        path: &Path,
        size: usize,
        busy_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            idle: Mutex::new(Vec::with_capacity(size)),
            permits: Arc::new(Semaphore::new(size)),
            path: path.to_owned(),
            busy_timeout,
        });
        let mut opened = Vec::with_capacity(size);
        for _ in 0..size {
            opened.push(connect(&shared)?);
        }
        *lock(&shared) = opened;
        Ok(ReadPool { shared })
    }

    /// Runs `f` on a pooled connection on the blocking thread pool, waiting
    /// for a free connection first.
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        // The writer thread has no tokio runtime, and a job reading through
        // another connection would not see its own uncommitted writes.
        super::writer::on_writer_thread("a read")?;
        let permit = self
            .shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed("the read pool is closed".into()))?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            // Dropped last: the connection is back in the pool before the
            // permit is released.
            let _permit = permit;
            let lease = Lease::take(&shared)?;
            f(lease.conn())
        })
        .await
        .map_err(|e| StoreError::database("running a read on the blocking pool", e))?
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Vec<Connection>> {
    // The list is valid even if a holder panicked: pushes and pops only.
    shared.idle.lock().unwrap_or_else(|e| e.into_inner())
}

fn connect(shared: &Shared) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&shared.path, flags)
        .map_err(|e| StoreError::database("opening a read connection", e))?;
    conn.busy_timeout(shared.busy_timeout)
        .map_err(|e| StoreError::database("setting the busy timeout", e))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// A connection taken from the pool; goes back on drop, also when the read
/// panicked.
struct Lease<'a> {
    shared: &'a Shared,
    conn: Option<Connection>,
}

impl<'a> Lease<'a> {
    fn take(shared: &'a Shared) -> Result<Self, StoreError> {
        let idle = lock(shared).pop();
        let conn = match idle {
            Some(conn) => conn,
            // Only after a connection was discarded (see `drop`).
            None => connect(shared)?,
        };
        Ok(Lease {
            shared,
            conn: Some(conn),
        })
    }

    fn conn(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // A read closure that left a transaction open would pin an old
        // snapshot for every later read on this connection.
        if !conn.is_autocommit() && conn.execute_batch("ROLLBACK").is_err() {
            return; // discard it; a fresh one is opened when needed
        }
        lock(self.shared).push(conn);
    }
}
