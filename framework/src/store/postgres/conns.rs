//! The store's own statements (appends, stream and `$all` reads, snapshots,
//! the head), run on connections it keeps for a moment between statements
//! instead of handing each back to the pool at once.
//!
//! sqlx tests every connection that goes back to its pool with a round trip
//! (a `Sync` and its answer), in a task of its own. That is one more round
//! trip per statement, and wake-ups on both sides while the next statement
//! runs: measured on a 2-core machine, a command (a stream read and an
//! append) took about 70 µs longer through the pool than on connections
//! kept between its statements, and 8 concurrent clients ran 10% fewer
//! commands.
//!
//! The rules that keep this as safe as the pool itself:
//! - Only a connection whose statement finished is kept. One whose statement
//!   failed, or whose future was dropped mid-statement, goes back through
//!   sqlx, which waits until it is ready again or closes it.
//! - A connection is kept for at most [`KEEP_FOR`] after it left the pool,
//!   however often it is used meanwhile; then it goes back through sqlx. So
//!   the pool's test, lifetime and idle rules still apply, and anyone waiting
//!   for a connection of the pool gets one within [`KEEP_FOR`]. That is also
//!   well below the idle time after which the store's pool tests a connection
//!   before use (see `TEST_IDLE_CONNECTIONS_AFTER`).
//! - At most half of the pool's connections are kept (none of a pool of one),
//!   so the rest of the application always has the other half.
//! - For a few seconds after any lost connection
//!   ([`super::append::suspect_connections`]) nothing is kept or reused: the
//!   kept connections go back to the pool, which tests them.
//! - When the pool is closed, or the last store handle drops, the keeper task
//!   gives every kept connection back at once and nothing is kept after that,
//!   so `PgPool::close` does not wait for them.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx_core::error::Error;
use sqlx_core::pool::PoolConnection;
use sqlx_core::query::Query;
use sqlx_postgres::{PgArguments, PgConnection, PgPool, PgQueryResult, PgRow, Postgres};
use tokio::sync::oneshot;

use super::append::suspect_connections;

/// How long a connection may be kept away from the pool after it left it.
pub(super) const KEEP_FOR: Duration = Duration::from_millis(100);

/// The store's pool, plus the connections kept between statements.
pub(super) struct Conns {
    pool: PgPool,
    kept: Mutex<Kept>,
    /// The most connections kept at once.
    max_kept: usize,
}

#[derive(Default)]
struct Kept {
    /// Kept connections, each with the time it left the pool; the most
    /// recently used last.
    conns: Vec<(PoolConnection<Postgres>, Instant)>,
    /// The pool closed or the store stopped: nothing is kept any more.
    closed: bool,
}

impl Conns {
    /// Keeps up to half of `pool`'s connections between statements.
    pub(super) fn new(pool: PgPool) -> Arc<Self> {
        let max_kept = pool.options().get_max_connections() as usize / 2;
        Arc::new(Conns {
            pool,
            kept: Mutex::new(Kept::default()),
            max_kept,
        })
    }

    /// The pool.
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How many connections are kept now.
    #[cfg(test)]
    pub(super) fn kept_count(&self) -> usize {
        self.kept().conns.len()
    }

    fn kept(&self) -> MutexGuard<'_, Kept> {
        // A panic while the lock was held left the list consistent (every
        // change is a single push, pop or drain).
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection: the most recently kept one that may still be kept, or
    /// one of the pool.
    async fn lease(&self) -> Result<Lease<'_>, Error> {
        let mut returned = Vec::new();
        let reused = {
            let mut kept = self.kept();
            if suspect_connections() {
                returned.append(&mut kept.conns);
                None
            } else {
                let mut found = None;
                while let Some((conn, since)) = kept.conns.pop() {
                    if since.elapsed() < KEEP_FOR {
                        found = Some((conn, since));
                        break;
                    }
                    returned.push((conn, since));
                }
                found
            }
        };
        // Outside the lock: each goes back through sqlx's test.
        drop(returned);
        let (conn, since) = match reused {
            Some(reused) => reused,
            None => (self.pool.acquire().await?, Instant::now()),
        };
        Ok(Lease {
            conns: self,
            conn: Some(conn),
            since,
            finished: false,
        })
    }

    /// Keeps `conn` (which left the pool at `since`), or hands it back
    /// when it may not be kept.
    fn keep(&self, conn: PoolConnection<Postgres>, since: Instant) {
        let refused = {
            let mut kept = self.kept();
            if kept.closed
                || self.pool.is_closed()
                || kept.conns.len() >= self.max_kept
                || since.elapsed() >= KEEP_FOR
                || suspect_connections()
            {
                Some(conn)
            } else {
                kept.conns.push((conn, since));
                None
            }
        };
        drop(refused);
    }

    /// Gives back the connections kept for [`KEEP_FOR`] already.
    fn return_stale(&self) {
        let stale: Vec<_> = {
            let mut kept = self.kept();
            let (stale, fresh) = std::mem::take(&mut kept.conns)
                .into_iter()
                .partition(|(_, since)| since.elapsed() >= KEEP_FOR);
            kept.conns = fresh;
            stale
        };
        drop(stale);
    }

    /// Gives back every kept connection and keeps none from now on.
    fn close(&self) {
        let all = {
            let mut kept = self.kept();
            kept.closed = true;
            std::mem::take(&mut kept.conns)
        };
        drop(all);
    }

    /// Starts the keeper: it gives back connections kept too long, and all
    /// of them when the pool closes or the returned sender drops (with the
    /// last store handle).
    pub(super) fn spawn_keeper(self: &Arc<Self>) -> oneshot::Sender<()> {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let conns = self.clone();
        tokio::spawn(async move {
            let closed = conns.pool.close_event();
            tokio::pin!(closed);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = &mut closed => break,
                    _ = tokio::time::sleep(KEEP_FOR) => conns.return_stale(),
                }
            }
            conns.close();
        });
        stop
    }

    /// [`Query::fetch_all`] on a kept connection or one of the pool.
    pub(super) async fn fetch_all(
        &self,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<Vec<PgRow>, Error> {
        let mut lease = self.lease().await?;
        let rows = query.fetch_all(lease.conn()).await?;
        lease.finished = true;
        Ok(rows)
    }

    /// [`Query::fetch_one`] on a kept connection or one of the pool.
    pub(super) async fn fetch_one(
        &self,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<PgRow, Error> {
        let mut lease = self.lease().await?;
        let row = query.fetch_one(lease.conn()).await?;
        lease.finished = true;
        Ok(row)
    }

    /// [`Query::fetch_optional`] on a kept connection or one of the pool.
    pub(super) async fn fetch_optional(
        &self,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<Option<PgRow>, Error> {
        let mut lease = self.lease().await?;
        let row = query.fetch_optional(lease.conn()).await?;
        lease.finished = true;
        Ok(row)
    }

    /// [`Query::execute`] on a kept connection or one of the pool.
    pub(super) async fn execute(
        &self,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<PgQueryResult, Error> {
        let mut lease = self.lease().await?;
        let done = query.execute(lease.conn()).await?;
        lease.finished = true;
        Ok(done)
    }
}

/// A connection lent for one statement: kept when dropped after the
/// statement finished, handed back to the pool otherwise.
struct Lease<'a> {
    conns: &'a Conns,
    conn: Option<PoolConnection<Postgres>>,
    /// When the connection left the pool.
    since: Instant,
    /// The statement finished: the connection is idle and may be kept.
    finished: bool,
}

impl Lease<'_> {
    fn conn(&mut self) -> &mut PgConnection {
        self.conn
            .as_deref_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.finished
        {
            self.conns.keep(conn, self.since);
        }
        // Otherwise `conn` drops here and goes back through sqlx.
    }
}
