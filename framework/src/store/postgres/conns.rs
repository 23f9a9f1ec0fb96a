//! The store's own single statements (appends and their lookups, stream,
//! `$all` and correlation reads, event lookups, snapshots, the head), run on
//! connections it keeps for a moment between statements instead of handing
//! each back to the pool at once.
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
//! - A connection is kept only within [`KEEP_FOR`] of leaving the pool,
//!   however often it is used meanwhile, and the keeper task gives back the
//!   ones past that every [`KEEP_FOR`]: each is back in the pool at most
//!   twice [`KEEP_FOR`] (100 ms) after it left. So the pool's test, lifetime
//!   and idle rules still apply, anyone waiting for a connection of the pool
//!   gets a kept one back within that time, and no kept connection is ever
//!   idle long enough for the store's pool to want to test it
//!   (`TEST_IDLE_CONNECTIONS_AFTER`).
//! - Kept connections are at most half of the pool (none of a pool of one).
//! - For a few seconds after any lost connection
//!   ([`super::append::suspect_connections`]) nothing is kept or reused: the
//!   kept connections go back to the pool, which tests them.
//! - When the pool is closed, or the last store handle drops, the keeper task
//!   gives every kept connection back at once and nothing is kept after that,
//!   so `PgPool::close` does not wait for them; a closed pool's kept
//!   connections are never lent again.
//!
//! A pool of your own (`PostgresStore::from_pool`) sees its `before_acquire`
//! and `after_release` hooks run when a connection leaves or rejoins it, so
//! about every 100 ms for a busy kept one rather than around each statement.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx_core::error::Error;
use sqlx_core::pool::PoolConnection;
use sqlx_core::query::Query;
use sqlx_postgres::{PgArguments, PgConnection, PgPool, PgRow, Postgres};
use tokio::sync::oneshot;

use super::append::suspect_connections;

/// How long after leaving the pool a connection may still be kept (and how
/// often the keeper gives back the ones past it).
pub(super) const KEEP_FOR: Duration = Duration::from_millis(50);

/// The store's pool, plus the connections kept between statements.
pub(super) struct Conns {
    pool: PgPool,
    kept: Mutex<Kept>,
    /// The most connections kept at once.
    max_kept: usize,
    /// [`KEEP_FOR`], longer in a test of the keeper.
    keep_for: Duration,
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
        Self::keeping_for(pool, KEEP_FOR)
    }

    fn keeping_for(pool: PgPool, keep_for: Duration) -> Arc<Self> {
        let max_kept = pool.options().get_max_connections() as usize / 2;
        Arc::new(Conns {
            pool,
            kept: Mutex::new(Kept::default()),
            max_kept,
            keep_for,
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
            if kept.closed || self.pool.is_closed() || suspect_connections() {
                returned.append(&mut kept.conns);
                None
            } else {
                let mut found = None;
                while let Some((conn, since)) = kept.conns.pop() {
                    if since.elapsed() < self.keep_for {
                        found = Some((conn, since));
                        break;
                    }
                    returned.push((conn, since));
                }
                found
            }
        };
        // Outside the lock: each goes back through sqlx's test (or is closed,
        // when the pool is).
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
                || since.elapsed() >= self.keep_for
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

    /// Gives back the connections that left the pool [`KEEP_FOR`] ago or
    /// more.
    fn return_stale(&self) {
        let stale: Vec<_> = {
            let mut kept = self.kept();
            let (stale, fresh) = std::mem::take(&mut kept.conns)
                .into_iter()
                .partition(|(_, since)| since.elapsed() >= self.keep_for);
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
                    _ = tokio::time::sleep(conns.keep_for) => conns.return_stale(),
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

    /// [`Query::fetch_optional`] on a kept connection or one of the pool
    /// (also for statements that return no rows).
    pub(super) async fn fetch_optional(
        &self,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<Option<PgRow>, Error> {
        let mut lease = self.lease().await?;
        let row = query.fetch_optional(lease.conn()).await?;
        lease.finished = true;
        Ok(row)
    }

    /// [`Query::fetch_one`] on a kept connection or one of the pool.
    pub(super) async fn fetch_one(
        &self,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<PgRow, Error> {
        self.fetch_optional(query).await?.ok_or(Error::RowNotFound)
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

#[cfg(test)]
mod tests {
    use sqlx_core::connection::Connection;
    use sqlx_core::query::query;
    use sqlx_core::row::Row;
    use sqlx_postgres::PgPoolOptions;

    use super::*;

    /// Reuse while fresh, the hand-back, the cap at half the pool, no
    /// keeping after a failed or cancelled statement, closing the pool while
    /// statements run on a kept connection, and a kept connection whose
    /// backend was terminated.
    #[test]
    fn connections_are_kept_between_statements_and_given_back() {
        let Some(url) = std::env::var("AFTERMATH_PG_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"SKIPPED postgres::conns: AFTERMATH_PG_URL not set\n",
            );
            return;
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Another test of this binary may have recorded a lost
            // connection: nothing is kept until that window has passed.
            for _ in 0..100 {
                if !suspect_connections() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let pool = || async {
                PgPoolOptions::new()
                    .max_connections(4)
                    .connect(&url)
                    .await
                    .unwrap()
            };
            let pid = |row: PgRow| row.get::<i32, _>(0);
            let backend = "SELECT pg_backend_pid()";
            let idle_soon = |pool: PgPool, idle: usize| async move {
                for _ in 0..100 {
                    if pool.num_idle() == idle {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!(
                    "the pool has {} idle connections, not {idle}",
                    pool.num_idle()
                );
            };

            let shared = pool().await;
            let conns = Conns::new(shared.clone());
            let keeper = conns.spawn_keeper();

            // Kept after its statement (not idle in the pool) and reused.
            let first = pid(conns.fetch_one(query(backend)).await.unwrap());
            assert_eq!(conns.kept_count(), 1);
            assert_eq!(shared.num_idle(), 0);
            let second = pid(conns.fetch_one(query(backend)).await.unwrap());
            assert_eq!(first, second, "a fresh kept connection is reused");

            // Given back by the keeper: the pool holds it idle again.
            tokio::time::sleep(KEEP_FOR * 3).await;
            assert_eq!(conns.kept_count(), 0);
            idle_soon(shared.clone(), 1).await;

            // Of four connections handed in at once, two are kept.
            let mut four = Vec::new();
            for _ in 0..4 {
                four.push(shared.acquire().await.unwrap());
            }
            for conn in four {
                conns.keep(conn, Instant::now());
            }
            assert_eq!(conns.kept_count(), 2, "half of a pool of 4");
            tokio::time::sleep(KEEP_FOR * 3).await;
            assert_eq!(conns.kept_count(), 0);

            // A failed statement's connection is not kept.
            conns.fetch_one(query("SELECT 1/0")).await.unwrap_err();
            assert_eq!(conns.kept_count(), 0);

            // Nor one whose statement was cancelled midway; the next
            // statement gets a connection that works.
            let cancelled = tokio::time::timeout(
                Duration::from_millis(200),
                conns.fetch_one(query("SELECT pg_backend_pid(), pg_sleep(1)")),
            )
            .await;
            assert!(cancelled.is_err(), "the sleep was cancelled");
            assert_eq!(conns.kept_count(), 0);
            conns.fetch_one(query("SELECT 1")).await.unwrap();
            drop(keeper);
            shared.close().await;

            // Connections kept for a minute. An idle one is given back at
            // once when the pool closes.
            let shared = pool().await;
            let conns = Conns::keeping_for(shared.clone(), Duration::from_secs(60));
            let _keeper = conns.spawn_keeper();
            conns.fetch_one(query("SELECT 1")).await.unwrap();
            assert_eq!(conns.kept_count(), 1);
            tokio::time::timeout(Duration::from_secs(10), shared.close())
                .await
                .expect("closing the pool waited for an idle kept connection");
            assert_eq!(conns.kept_count(), 0);

            // So is one that statements keep using, and a closed pool's kept
            // connection is not lent again.
            let shared = pool().await;
            let conns = Conns::keeping_for(shared.clone(), Duration::from_secs(60));
            let _keeper = conns.spawn_keeper();
            let busy = tokio::spawn({
                let conns = conns.clone();
                async move {
                    loop {
                        if let Err(e) = conns.fetch_one(query("SELECT 1")).await {
                            return e;
                        }
                    }
                }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            tokio::time::timeout(Duration::from_secs(10), shared.close())
                .await
                .expect("closing the pool waited for a kept connection in use");
            let stopped = tokio::time::timeout(Duration::from_secs(10), busy)
                .await
                .expect("statements went on after the pool closed")
                .unwrap();
            assert!(matches!(stopped, Error::PoolClosed), "{stopped:?}");
            assert_eq!(conns.kept_count(), 0);

            // A kept connection whose backend was terminated: the read fails
            // on it once, and is answered on a live connection.
            let shared = pool().await;
            let conns = Conns::new(shared.clone());
            let _keeper = conns.spawn_keeper();
            let victim = pid(conns.fetch_one(query(backend)).await.unwrap());
            assert_eq!(conns.kept_count(), 1);
            let mut admin = sqlx_postgres::PgConnection::connect(&url).await.unwrap();
            query("SELECT pg_terminate_backend($1)")
                .bind(victim)
                .execute(&mut admin)
                .await
                .unwrap();
            // pg_terminate_backend only signals: wait until the backend is gone.
            for _ in 0..100 {
                let alive: bool =
                    query("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                        .bind(victim)
                        .fetch_one(&mut admin)
                        .await
                        .unwrap()
                        .get(0);
                if !alive {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let answered = pid(
                super::super::events::retried(|| conns.fetch_one(query(backend)))
                    .await
                    .unwrap(),
            );
            assert_ne!(answered, victim);
            // Nothing is kept while connections are suspect.
            assert_eq!(conns.kept_count(), 0);
            shared.close().await;
        });
    }
}
