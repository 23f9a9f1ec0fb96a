//! Following the horizon: waiting (on request) for this handle's own
//! appends to become readable, the background task that moves `watch_head`
//! (after appends through this handle, on `LISTEN/NOTIFY` from other
//! processes, and by polling), and reporting what holds readers back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx_core::row::Row;
use sqlx_postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use super::events::{self, Sql, db, stmt};
use super::types::Xid8;
use super::{Blocker, HeldBack};
use crate::event::Position;
use crate::store::StoreError;

/// What a store handle (and its clones) knows about the horizon.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// The largest transaction id of an append through this handle (0: none).
    own: AtomicU64,
    /// The largest horizon any statement of this handle has seen.
    horizon: AtomicU64,
}

impl Progress {
    /// Records an append of this handle by transaction `id`.
    pub(super) fn appended(&self, id: Xid8) {
        self.own.fetch_max(id.0, Ordering::AcqRel);
    }

    /// Records a horizon seen by a statement.
    pub(super) fn observe(&self, horizon: Xid8) {
        self.horizon.fetch_max(horizon.0, Ordering::AcqRel);
    }

    /// The (stored) transaction id of this handle's last append, while it
    /// is not yet known to be below the horizon (readable in `$all`).
    pub(super) fn pending(&self) -> Option<u64> {
        let own = self.own.load(Ordering::Acquire);
        let seen = self.horizon.load(Ordering::Acquire);
        (own != 0 && seen <= own).then_some(own)
    }
}

/// The current horizon (`{schema}.horizon(pg_current_snapshot())`).
async fn horizon(pool: &PgPool, sql: &Sql) -> Result<Xid8, StoreError> {
    stmt(&sql.horizon)
        .fetch_one(pool)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(db("reading the append horizon"))
}

/// Waits, at most `timeout`, until this handle's appends are below the
/// horizon. False when it gave up (an older append is still in flight).
pub(super) async fn wait_own_writes(
    pool: &PgPool,
    sql: &Sql,
    progress: &Progress,
    timeout: Duration,
) -> Result<bool, StoreError> {
    let Some(target) = progress.pending() else {
        return Ok(true);
    };
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let now = horizon(pool, sql).await?;
        progress.observe(now);
        if now.0 > target {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Whether readers are held back, and by whom.
pub(super) async fn held_back(pool: &PgPool, sql_of: &Sql) -> Result<Option<HeldBack>, StoreError> {
    let Some(row) = stmt(&sql_of.held_back)
        .fetch_optional(pool)
        .await
        .map_err(db("checking the append horizon"))?
    else {
        return Ok(None);
    };
    let failed = || db("checking the append horizon");
    // The cluster's id of the transaction at the horizon (offset taken off).
    let horizon: Xid8 = row.try_get(0).map_err(failed())?;
    let waiting: Option<f64> = row.try_get(1).map_err(failed())?;
    Ok(Some(HeldBack {
        horizon: horizon.0,
        waiting: seconds(waiting),
        blocker: blocker(pool, horizon).await?,
    }))
}

fn seconds(value: Option<f64>) -> Duration {
    value
        .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
        .unwrap_or_default()
}

/// The session (or prepared transaction) whose append is the horizon
/// (`horizon` is the cluster's transaction id), when this role may see it.
async fn blocker(pool: &PgPool, horizon: Xid8) -> Result<Option<Blocker>, StoreError> {
    let failed = || db("looking up the transaction at the horizon");
    let session = sqlx_core::query::query(
        "SELECT pid, datname::text, usename::text, application_name, state, left(query, 200), \
           extract(epoch FROM clock_timestamp() - xact_start)::float8 \
         FROM pg_stat_activity WHERE backend_xid = $1::xid LIMIT 1",
    )
    .bind(horizon)
    .fetch_optional(pool)
    .await
    .map_err(failed())?;
    if let Some(row) = session {
        return Ok(Some(Blocker {
            pid: row.try_get(0).map_err(failed())?,
            database: row.try_get(1).map_err(failed())?,
            user: row.try_get(2).map_err(failed())?,
            application_name: row.try_get(3).map_err(failed())?,
            state: row.try_get(4).map_err(failed())?,
            query: row.try_get(5).map_err(failed())?,
            transaction_age: row
                .try_get::<Option<f64>, _>(6)
                .map_err(failed())?
                .map(|s| seconds(Some(s))),
            prepared: None,
        }));
    }
    let prepared = sqlx_core::query::query(
        "SELECT gid, database::text, owner::text, \
           extract(epoch FROM clock_timestamp() - prepared)::float8 \
         FROM pg_prepared_xacts WHERE transaction = $1::xid LIMIT 1",
    )
    .bind(horizon)
    .fetch_optional(pool)
    .await
    .map_err(failed())?;
    let Some(row) = prepared else {
        return Ok(None);
    };
    Ok(Some(Blocker {
        pid: None,
        database: row.try_get(1).map_err(failed())?,
        user: row.try_get(2).map_err(failed())?,
        application_name: None,
        state: Some("prepared".to_owned()),
        query: None,
        transaction_age: row
            .try_get::<Option<f64>, _>(3)
            .map_err(failed())?
            .map(|s| seconds(Some(s))),
        prepared: row.try_get(0).map_err(failed())?,
    }))
}

/// Everything the background task needs; it holds no store handle, so it
/// stops when the last handle (holding the `stop` sender) drops.
pub(super) struct Background {
    /// The store's pool and kept connections.
    pub(super) conns: Arc<super::conns::Conns>,
    pub(super) sql: Arc<Sql>,
    pub(super) head: Arc<watch::Sender<Position>>,
    pub(super) progress: Arc<Progress>,
    pub(super) wake: Arc<Notify>,
    pub(super) schema: String,
    pub(super) poll: Duration,
    pub(super) warn_after: Duration,
    /// This handle's id: the payload of its NOTIFYs, which its own listener
    /// ignores (its appends already woke it).
    pub(super) handle_id: String,
}

/// At most one held-back warning per this interval.
const WARNING_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest pause between two head reads (coalesces wake-ups under load).
const MIN_REFRESH_GAP: Duration = Duration::from_millis(2);

impl Background {
    /// Starts the task; it stops when the returned sender is dropped.
    pub(super) fn spawn(self) -> oneshot::Sender<()> {
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(self.run(stopped));
        stop
    }

    async fn run(self, mut stopped: oneshot::Receiver<()>) {
        let listener = tokio::spawn(listen(
            (*self.conns.pool().connect_options()).clone(),
            format!("{}_events", self.schema),
            self.handle_id.clone(),
            self.wake.clone(),
        ));
        let mut next_check = Instant::now() + self.poll;
        let mut last_warning: Option<Instant> = None;
        let mut last_error: Option<Instant> = None;
        let mut quick = Duration::from_millis(5);
        // Readers wait for an older transaction: look again soon rather than
        // at the next poll (its end may come without a notification).
        let mut waiting = false;
        loop {
            let until_check = next_check.saturating_duration_since(Instant::now());
            let pause = if waiting {
                quick.min(until_check)
            } else {
                self.poll.min(until_check)
            };
            tokio::select! {
                _ = &mut stopped => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            // Nobody watches the head (a process that only handles
            // commands): no head read per append, and no held-back checks
            // (the processes whose readers wait do those).
            if self.head.receiver_count() == 0 {
                waiting = false;
            } else {
                match events::head(&self.conns, &self.sql).await {
                    Ok(head) => {
                        self.progress.observe(head.horizon);
                        waiting = head.held_back || self.progress.pending().is_some();
                        self.head.send_if_modified(|current| {
                            let moved = head.position > *current;
                            if moved {
                                *current = head.position;
                            }
                            moved
                        });
                    }
                    Err(e) => {
                        if last_error.is_none_or(|t| t.elapsed() >= WARNING_INTERVAL) {
                            tracing::warn!(schema = %self.schema, error = %e, "cannot read the head of $all; retrying");
                            last_error = Some(Instant::now());
                        }
                    }
                }
            }
            quick = if waiting {
                (quick * 2).min(Duration::from_millis(200))
            } else {
                Duration::from_millis(5)
            };
            if Instant::now() >= next_check {
                next_check = Instant::now() + self.poll;
                if waiting {
                    self.check_held_back(&mut last_warning).await;
                }
            }
            tokio::time::sleep(MIN_REFRESH_GAP).await;
        }
        listener.abort();
    }

    /// Warns (at most every few seconds) when committed events have waited
    /// longer than `warn_after` for an older transaction to finish.
    async fn check_held_back(&self, last_warning: &mut Option<Instant>) {
        if last_warning.is_some_and(|t| t.elapsed() < WARNING_INTERVAL) {
            return;
        }
        let held = match held_back(self.conns.pool(), &self.sql).await {
            Ok(Some(held)) if held.waiting >= self.warn_after => held,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(schema = %self.schema, error = %e, "cannot check the snapshot horizon");
                return;
            }
        };
        *last_warning = Some(Instant::now());
        let waiting_ms = held.waiting.as_millis() as u64;
        match &held.blocker {
            Some(b) => tracing::warn!(
                schema = %self.schema,
                horizon = held.horizon,
                waiting_ms,
                pid = b.pid,
                transaction_age_ms = b.transaction_age.map(|a| a.as_millis() as u64),
                database = b.database.as_deref(),
                application_name = b.application_name.as_deref(),
                user = b.user.as_deref(),
                state = b.state.as_deref(),
                query = b.query.as_deref(),
                prepared = b.prepared.as_deref(),
                "readers of $all are held back by an append still in flight (they wait for it, never skip)"
            ),
            None => tracing::warn!(
                schema = %self.schema,
                horizon = held.horizon,
                waiting_ms,
                "readers of $all are held back by an append still in flight that this role cannot see \
                 in pg_stat_activity (grant pg_read_all_stats to name it)"
            ),
        }
    }
}

/// Listens on `channel` on a connection of its own (not one of the store's
/// pool), waking the head task on every notification of another handle
/// (payload other than `own`) and after every reconnect (notifications sent
/// meanwhile are lost: only a wake-up).
async fn listen(options: PgConnectOptions, channel: String, own: String, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options.clone());
        let started = Instant::now();
        let error = listen_on(&pool, &channel, &own, &wake).await;
        drop(pool);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        tracing::debug!(%channel, error = %error, "LISTEN connection failed; polling until it is back");
        wake.notify_one();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs one listener until it fails.
async fn listen_on(pool: &PgPool, channel: &str, own: &str, wake: &Notify) -> sqlx_core::Error {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(listener) => listener,
        Err(e) => return e,
    };
    if let Err(e) = listener.listen(channel).await {
        return e;
    }
    // Appends may have committed before LISTEN took effect.
    wake.notify_one();
    loop {
        match listener.try_recv().await {
            // One head read covers every notification already received;
            // this handle's own NOTIFYs need none (its appends woke it).
            Ok(Some(first)) => {
                let mut foreign = first.payload() != own;
                while let Some(more) = listener.next_buffered() {
                    foreign |= more.payload() != own;
                }
                if !foreign {
                    continue;
                }
            }
            // The connection dropped and was re-established (and LISTEN
            // issued again): something may have been missed.
            Ok(None) => {}
            Err(e) => return e,
        }
        wake.notify_one();
    }
}

/// The shortest time between two NOTIFYs of one store handle.
pub(super) const NOTIFY_GAP: Duration = Duration::from_millis(5);

/// Sends the store's NOTIFY after appends have committed, outside their
/// transactions: PostgreSQL serializes the commits of notifying
/// transactions, so a NOTIFY inside every append would cap concurrent
/// writers at about one commit at a time. Wake-ups that arrive while a
/// NOTIFY is under way coalesce into the next one, and two NOTIFYs are at
/// least [`NOTIFY_GAP`] apart: the first append after a quiet moment is
/// announced at once, the appends of a busy moment together at most that
/// much later. (Each NOTIFY is a transaction, and wakes every listening
/// session of every process; one per append cost a single writer about a
/// fifth of its commands.) Listeners only use it to wake up; nothing depends
/// on it arriving.
pub(super) struct Notifier {
    pub(super) pool: PgPool,
    pub(super) channel: String,
    /// The payload: the sending handle's id.
    pub(super) handle_id: String,
    pub(super) wake: Arc<Notify>,
}

impl Notifier {
    /// Starts the task; it stops when the returned sender is dropped.
    pub(super) fn spawn(self) -> oneshot::Sender<()> {
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut last: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = self.wake.notified() => {}
                }
                if let Some(last) = last {
                    tokio::select! {
                        _ = &mut stopped => break,
                        _ = tokio::time::sleep_until(last + NOTIFY_GAP) => {}
                    }
                }
                last = Some(Instant::now());
                // The NOTIFY's transaction takes a transaction id, so its
                // commit would wait for a WAL flush like an append's: a
                // second flush per append at low concurrency. It writes
                // nothing worth keeping, so it commits without waiting
                // (`synchronous_commit` off for this transaction only); the
                // notification is delivered at commit all the same.
                let sent = sqlx_core::query::query::<sqlx_postgres::Postgres>(
                    "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)",
                )
                .bind(&self.channel)
                .bind(&self.handle_id)
                .execute(&self.pool)
                .await;
                if let Err(e) = sent {
                    tracing::debug!(channel = %self.channel, error = %e, "NOTIFY failed; listeners fall back to polling");
                }
            }
        });
        stop
    }
}
