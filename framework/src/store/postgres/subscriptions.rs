//! What subscribers persist in the store's schema: checkpoints, leases,
//! skipped events, and projection transactions (read-model writes and the
//! checkpoint committed together in one PostgreSQL transaction).
//!
//! # Fencing
//!
//! Every fenced write reads the lease row with `FOR SHARE` in the
//! transaction (or statement) that writes, right before the write commits.
//! A takeover (`acquire` by another owner) updates that row, so it either
//! committed before the read, which then sees the new token and fails with
//! [`StoreError::LeaseLost`] (READ COMMITTED re-checks a row updated
//! concurrently against its newest version), or it waits for the share lock
//! until the write has committed. Hence no write of a stale owner commits
//! after a takeover. The lock is held only from the check to the commit
//! (after the projection's work), so renewals never wait behind a long
//! batch. Plain row locks and single statements: nothing depends on the
//! session, so this works through transaction-pooling proxies (no session
//! advisory locks).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sqlx_core::query::Query;
use sqlx_core::row::Row;
use sqlx_core::transaction::Transaction;
use sqlx_postgres::{PgArguments, PgConnection, PgRow, Postgres};

use super::PostgresStore;
use super::events::{db, stmt};
use super::types::Timestamp;
use crate::event::Position;
use crate::projection::{
    Commit, HandlerFailure, ProjectionState, ReadModelDb, SkippedEvent, TxWork,
};
use crate::store::StoreError;
use crate::subscription::{CheckpointStore, Holder, Lease, LeaseStore, Member};

/// A projection's view of the open transaction: a connection of the store's
/// pool inside `BEGIN`, whose writes commit together with the projection's
/// checkpoint (or roll back with it).
///
/// Run your SQL on [`PgTx::conn`] (or `&mut **tx`, through its
/// `DerefMut` to [`PgConnection`]) with the re-exported
/// [`sqlx_core`](super::sqlx_core). Do not `COMMIT` or `ROLLBACK` through
/// it; a failing statement aborts the transaction, so return its error
/// (the runner rolls back and retries the batch). Unlike SQLite, `apply`
/// may await anything, but every await keeps the transaction (and its
/// locks) open.
///
/// The partitions of a [partitioned](crate::projection::ProjectionRunner::partition)
/// projection run `setup` at the same time, and PostgreSQL's `CREATE ...
/// IF NOT EXISTS` can fail when it races itself (the runner then retries
/// after a backoff); take a transaction-scoped advisory lock first
/// (`SELECT pg_advisory_xact_lock(hashtext('balances.setup'))`) to
/// serialize them.
///
/// ```no_run
/// use aftermath::projection::{HandlerError, Projection};
/// use aftermath::store::postgres::PgTx;
/// use aftermath::store::postgres::sqlx_core::query::query;
/// use aftermath::{PostgresStore, Recorded};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, aftermath::Event)]
/// #[event(prefix = "account")]
/// enum AccountEvent {
///     Deposited { amount: i64 },
/// }
///
/// struct Balances;
///
/// impl Projection for Balances {
///     type Event = AccountEvent;
///     type Db = PostgresStore;
///
///     fn name(&self) -> &str {
///         "balances"
///     }
///
///     async fn setup(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
///         query(
///             "CREATE TABLE IF NOT EXISTS balances \
///              (account text PRIMARY KEY, balance bigint NOT NULL)",
///         )
///         .execute(tx.conn())
///         .await?;
///         Ok(())
///     }
///
///     async fn reset(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
///         query("DROP TABLE IF EXISTS balances").execute(tx.conn()).await?;
///         Ok(())
///     }
///
///     async fn apply(
///         &self,
///         tx: &mut PgTx,
///         event: &Recorded<AccountEvent>,
///     ) -> Result<(), HandlerError> {
///         let AccountEvent::Deposited { amount } = &event.event;
///         query(
///             "INSERT INTO balances (account, balance) VALUES ($1, $2) \
///              ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance",
///         )
///         .bind(&event.stream)
///         .bind(*amount)
///         .execute(&mut **tx) // the same as `tx.conn()`
///         .await?;
///         Ok(())
///     }
/// }
///
/// # async fn run(store: PostgresStore) {
/// // The store is the event log, the read-model database and (with a
/// // worker) the lease store; the read model shares its pool.
/// let runner = aftermath::projection::ProjectionRunner::new(Balances, store.clone(), store);
/// runner.catch_up().await.unwrap();
/// # }
/// ```
pub struct PgTx {
    tx: Transaction<'static, Postgres>,
}

impl PgTx {
    /// The connection inside the transaction: pass it to sqlx's
    /// `execute`, `fetch_one`, ... as the executor.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

impl Deref for PgTx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for PgTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

/// The statements of checkpoints, leases, skipped events, the effect
/// journal and parked inbox messages, with the schema name filled in once.
pub(super) struct Statements {
    load_state: Arc<str>,
    save_checkpoint: Arc<str>,
    commit_checkpoint: Arc<str>,
    fence_check: Arc<str>,
    record_skip: Arc<str>,
    skipped: Arc<str>,
    acquire: Arc<str>,
    renew: Arc<str>,
    release: Arc<str>,
    heartbeat: Arc<str>,
    leave: Arc<str>,
    members: Arc<str>,
    pub(super) effects_load: Arc<str>,
    pub(super) effects_for: Arc<str>,
    pub(super) effects_record: Arc<str>,
    pub(super) effects_held: Arc<str>,
    pub(super) effects_parked: Arc<str>,
    pub(super) effects_transition: Arc<str>,
    pub(super) effects_cleanup: Arc<str>,
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(super) inbox_park: Arc<str>,
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(super) inbox_is_parked: Arc<str>,
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(super) inbox_parked: Arc<str>,
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(super) inbox_cleanup: Arc<str>,
    /// This store handle's presence session (shared by its clones): a
    /// connection kept out of the pool while leases are held, whose
    /// backend pid the lease rows record (see [`PostgresStore`]'s
    /// `LeaseStore` impl).
    presence: tokio::sync::Mutex<Option<Presence>>,
}

/// A dedicated connection whose session stands for this process.
struct Presence {
    conn: PgConnection,
    pid: i32,
}

/// The columns [`super::journal`] reads, in its order.
pub(super) const EFFECT_COLUMNS: &str = "reactor, event_id, position::text, stream, event_type, \
                                         state, attempts, last_error, created_at, updated_at";

/// `WITH fence AS (...)`: the lease row, share-locked, when the lease named
/// by parameters `$n`, `$n+1`, `$n+2` (name, instance, token) is current.
fn fence_cte(schema: &str, n: usize) -> String {
    format!(
        "WITH fence AS (SELECT 1 FROM {schema}.leases \
         WHERE name = ${n} AND instance = ${} AND token = ${} FOR SHARE) ",
        n + 1,
        n + 2
    )
}

impl Statements {
    /// The statements for the schema whose quoted name is `schema`.
    pub(super) fn new(schema: &str) -> Statements {
        let s = |sql: String| -> Arc<str> { sql.into() };
        let upsert_checkpoint = "ON CONFLICT (name) DO UPDATE SET position = excluded.position, \
             version = excluded.version, updated_at = excluded.updated_at";
        Statements {
            load_state: s(format!(
                "SELECT position::text, version FROM {schema}.checkpoints WHERE name = $1"
            )),
            // Fenced when $4 (the lease name) is not NULL: one statement, so
            // the share lock is held until it commits. Compare-and-set when
            // $7 (the expected position) is not NULL: a missing row is
            // inserted only when the origin is expected; an existing one is
            // updated only while it holds $7 (and, when $8, version $3).
            // ON CONFLICT locks the row and evaluates the update's WHERE on
            // its newest committed version, so of two writers expecting the
            // same position (also two inserting a new row at once: the
            // second waits for the first and then takes the update path),
            // exactly one writes.
            save_checkpoint: s(format!(
                "{}INSERT INTO {schema}.checkpoints AS c (name, position, version, updated_at) \
                 SELECT $1, $2::numeric, $3, now() \
                 WHERE ($4::text IS NULL OR EXISTS (SELECT 1 FROM fence)) \
                   AND ($7::numeric IS NULL OR $7::numeric = 0 \
                        OR EXISTS (SELECT 1 FROM {schema}.checkpoints WHERE name = $1)) \
                 {upsert_checkpoint} \
                 WHERE $7::numeric IS NULL OR (c.position = $7::numeric \
                   AND ($8::bool IS NOT TRUE OR c.version IS NOT DISTINCT FROM $3))",
                fence_cte(schema, 4)
            )),
            // A projection batch's checkpoint: `save_checkpoint` (always
            // compared, with the version), also guarded by the layout row
            // when $9 (its name) is not NULL: it must still hold what the run
            // found ($10: whether there was a row; $11, $12: its position and
            // version). The row is share-locked until the commit, so a
            // rebuild's update of it waits for commits in flight and commits
            // after it see the new layout. One statement: no round trip of
            // its own for the guard.
            commit_checkpoint: s(format!(
                "{}, layout AS (SELECT position, version FROM {schema}.checkpoints \
                   WHERE name = $9 FOR SHARE) \
                 INSERT INTO {schema}.checkpoints AS c (name, position, version, updated_at) \
                 SELECT $1, $2::numeric, $3, now() \
                 WHERE ($4::text IS NULL OR EXISTS (SELECT 1 FROM fence)) \
                   AND ($9::text IS NULL \
                        OR ($10::bool IS NOT TRUE AND NOT EXISTS (SELECT 1 FROM layout)) \
                        OR ($10::bool AND EXISTS (SELECT 1 FROM layout \
                              WHERE position = $11::numeric AND version IS NOT DISTINCT FROM $12))) \
                   AND ($7::numeric IS NULL OR $7::numeric = 0 \
                        OR EXISTS (SELECT 1 FROM {schema}.checkpoints WHERE name = $1)) \
                 {upsert_checkpoint} \
                 WHERE $7::numeric IS NULL OR (c.position = $7::numeric \
                   AND ($8::bool IS NOT TRUE OR c.version IS NOT DISTINCT FROM $3))",
                fence_cte(schema, 4).trim_end()
            )),
            fence_check: s(format!(
                "SELECT EXISTS (SELECT 1 FROM {schema}.leases WHERE name = $1 AND instance = $2 AND token = $3)"
            )),
            record_skip: s(format!(
                "INSERT INTO {schema}.skipped \
                 (subscriber, position, stream, version, event_type, error, skipped_at) \
                 VALUES ($1, $2::numeric, $3, $4, $5, $6, $7) \
                 ON CONFLICT (subscriber, position) DO UPDATE SET stream = excluded.stream, \
                   version = excluded.version, event_type = excluded.event_type, \
                   error = excluded.error, skipped_at = excluded.skipped_at"
            )),
            skipped: s(format!(
                "SELECT subscriber, position::text, stream, version, event_type, error, skipped_at \
                 FROM {schema}.skipped WHERE $1::text IS NULL OR subscriber = $1 \
                 ORDER BY skipped_at, subscriber, position"
            )),
            // Free, expired, ours (this instance), or its holder's presence
            // session is gone: take it; another instance bumps the token.
            // The row lock of the update waits for fenced writes in flight
            // (their share lock). $5 is the acquirer's presence session.
            acquire: s(format!(
                "INSERT INTO {schema}.leases AS l \
                   (name, owner, instance, token, expires_at, holder_pid, holder_start) \
                 VALUES ($1, $2, $4, 1, now() + $3::bigint * interval '1 microsecond', $5, \
                   (SELECT backend_start FROM pg_stat_activity WHERE pid = $5)) \
                 ON CONFLICT (name) DO UPDATE SET \
                   token = CASE WHEN l.instance = excluded.instance THEN l.token ELSE l.token + 1 END, \
                   owner = excluded.owner, instance = excluded.instance, \
                   expires_at = excluded.expires_at, holder_pid = excluded.holder_pid, \
                   holder_start = excluded.holder_start \
                 WHERE l.instance = excluded.instance OR l.expires_at <= now() \
                   OR (l.holder_pid IS NOT NULL AND l.holder_start IS NOT NULL \
                       AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a \
                       WHERE a.pid = l.holder_pid AND a.backend_start = l.holder_start)) \
                 RETURNING token, expires_at"
            )),
            // Also points the row at the current presence session ($5), in
            // case it was reconnected.
            renew: s(format!(
                "UPDATE {schema}.leases SET expires_at = now() + $4::bigint * interval '1 microsecond', \
                   holder_pid = $5, \
                   holder_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = $5) \
                 WHERE name = $1 AND instance = $2 AND token = $3 RETURNING expires_at"
            )),
            release: s(format!(
                "UPDATE {schema}.leases SET expires_at = 'epoch' \
                 WHERE name = $1 AND instance = $2 AND token = $3"
            )),
            // Upserts this member's row ($1 group, $2 instance, $3 owner,
            // $4 ttl in microseconds, $5 presence session), drops rows
            // expired for an hour, and returns the live members: not
            // expired, and their presence session (if recorded) still there.
            heartbeat: s(format!(
                "WITH me AS ( \
                   INSERT INTO {schema}.members AS m \
                     (group_name, instance, owner, joined_at, expires_at, holder_pid, holder_start) \
                   VALUES ($1, $2, $3, now(), now() + $4::bigint * interval '1 microsecond', $5, \
                     (SELECT backend_start FROM pg_stat_activity WHERE pid = $5)) \
                   ON CONFLICT (group_name, instance) DO UPDATE SET owner = excluded.owner, \
                     joined_at = CASE WHEN m.expires_at <= now() THEN now() ELSE m.joined_at END, \
                     expires_at = excluded.expires_at, holder_pid = excluded.holder_pid, \
                     holder_start = excluded.holder_start \
                   RETURNING group_name, owner, instance, joined_at, expires_at), \
                 gone AS ( \
                   DELETE FROM {schema}.members WHERE group_name = $1 \
                     AND expires_at < now() - interval '1 hour') \
                 SELECT group_name, owner, instance, joined_at, expires_at FROM me \
                 UNION ALL \
                 SELECT group_name, owner, instance, joined_at, expires_at FROM {schema}.members m \
                 WHERE m.group_name = $1 AND m.instance <> $2 AND {LIVE_MEMBER} \
                 ORDER BY instance"
            )),
            leave: s(format!(
                "DELETE FROM {schema}.members WHERE group_name = $1 AND instance = $2"
            )),
            members: s(format!(
                "SELECT group_name, owner, instance, joined_at, expires_at FROM {schema}.members m \
                 WHERE {LIVE_MEMBER} ORDER BY group_name, instance"
            )),
            effects_load: s(format!(
                "SELECT {EFFECT_COLUMNS} FROM {schema}.effects \
                 WHERE reactor = $1 AND event_id = ANY($2)"
            )),
            // Every reactor's entries of these events (`effects_by_event`);
            // byte order of reactor names, as SQLite and memory.
            effects_for: s(format!(
                "SELECT {EFFECT_COLUMNS} FROM {schema}.effects \
                 WHERE event_id = ANY($1) ORDER BY position, reactor COLLATE \"C\""
            )),
            // Fenced like `save_checkpoint` when $11 is not NULL; an update
            // keeps the entry's creation time, and never touches a final
            // entry (done, skipped): ON CONFLICT evaluates that WHERE on the
            // newest committed row, under its lock. Returns whether the
            // fence held (a write to a final entry is not an error).
            effects_record: s(format!(
                "{}, written AS (INSERT INTO {schema}.effects AS e (reactor, event_id, position, stream, \
                   event_type, state, attempts, last_error, created_at, updated_at) \
                 SELECT $1, $2, $3::numeric, $4, $5, $6, $7, $8, $9, $10 \
                 WHERE $11::text IS NULL OR EXISTS (SELECT 1 FROM fence) \
                 ON CONFLICT (reactor, event_id) DO UPDATE SET state = excluded.state, \
                   attempts = excluded.attempts, last_error = excluded.last_error, \
                   updated_at = excluded.updated_at \
                 WHERE e.state NOT IN ('done', 'skipped') RETURNING 1) \
                 SELECT $11::text IS NULL OR EXISTS (SELECT 1 FROM fence)",
                fence_cte(schema, 11).trim_end()
            )),
            // Byte order of stream names (as SQLite): one stream's entries
            // are together, by position.
            effects_held: s(format!(
                "SELECT {EFFECT_COLUMNS} FROM {schema}.effects \
                 WHERE reactor = $1 AND state IN ('parked', 'retry_requested', 'blocked', 'started', 'failed') \
                 ORDER BY stream COLLATE \"C\", position"
            )),
            effects_parked: s(format!(
                "SELECT {EFFECT_COLUMNS} FROM {schema}.effects \
                 WHERE ($1::text IS NULL OR reactor = $1) AND state IN ('parked', 'retry_requested') \
                 ORDER BY updated_at, position"
            )),
            effects_transition: s(format!(
                "UPDATE {schema}.effects SET state = $3, updated_at = $4 \
                 WHERE reactor = $1 AND state = 'parked' AND ($2::uuid IS NULL OR event_id = $2)"
            )),
            effects_cleanup: s(format!(
                "DELETE FROM {schema}.effects WHERE reactor = $1 AND state IN ('done', 'skipped') \
                 AND updated_at < $2 AND position <= $3::numeric"
            )),
            inbox_park: s(format!(
                "INSERT INTO {schema}.inbox_parked \
                 (inbox, message_id, subject, payload, error, parked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (inbox, message_id) DO NOTHING"
            )),
            inbox_is_parked: s(format!(
                "SELECT EXISTS (SELECT 1 FROM {schema}.inbox_parked \
                 WHERE inbox = $1 AND message_id = $2)"
            )),
            inbox_parked: s(format!(
                "SELECT inbox, message_id, subject, payload, error, parked_at \
                 FROM {schema}.inbox_parked WHERE $1::text IS NULL OR inbox = $1 \
                 ORDER BY parked_at, message_id"
            )),
            inbox_cleanup: s(format!(
                "DELETE FROM {schema}.inbox_parked WHERE parked_at < $1"
            )),
            presence: tokio::sync::Mutex::new(None),
        }
    }
}

/// A position as bound to a `numeric` column (text, cast in SQL).
pub(super) fn position_text(position: Position) -> String {
    position.0.to_string()
}

/// A position read back as text; anything else is [`StoreError::Corrupt`]
/// naming the table.
pub(super) fn parse_position(text: &str, table: &str) -> Result<Position, StoreError> {
    text.parse::<u64>()
        .map(Position)
        .map_err(|_| StoreError::Corrupt {
            position: Position::ORIGIN,
            stream: table.to_owned(),
            message: format!("column `position` holds `{text}`, not a position"),
        })
}

/// A token as stored (`bigint`).
fn token(lease: &Lease) -> i64 {
    i64::try_from(lease.token).unwrap_or(i64::MAX)
}

/// A lease's TTL in microseconds, as bound.
fn micros(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)
}

pub(super) fn lease_lost(lease: &Lease) -> StoreError {
    StoreError::LeaseLost {
        name: lease.name.clone(),
        owner: lease.owner.clone(),
        token: lease.token,
    }
}

/// The fence parameters of a fenced statement (all NULL without a lease).
pub(super) fn bind_fence<'q>(
    query: Query<'q, Postgres, PgArguments>,
    lease: Option<&Lease>,
) -> Query<'q, Postgres, PgArguments> {
    query
        .bind(lease.map(|l| l.name.clone()))
        .bind(lease.map(|l| l.instance.clone()))
        .bind(lease.map(token))
}

impl PostgresStore {
    fn statements(&self) -> &Statements {
        &self.shared.statements
    }

    /// Saves a checkpoint (fenced by `lease` when given, compared with
    /// `expected` when given) in one statement.
    async fn save_checkpoint(
        &self,
        name: &str,
        expected: Option<Position>,
        at: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        let query = stmt(&self.statements().save_checkpoint)
            .bind(name)
            .bind(position_text(at))
            .bind(None::<i32>);
        let done = bind_fence(query, lease)
            .bind(expected.map(position_text))
            .bind(false)
            .execute(self.pool())
            .await
            .map_err(db("saving a checkpoint"))?;
        if done.rows_affected() > 0 {
            return Ok(());
        }
        let mut conn = self
            .pool()
            .acquire()
            .await
            .map_err(db("saving a checkpoint"))?;
        Err(self.not_saved(&mut conn, name, expected, None, lease).await)
    }

    /// Why a fenced checkpoint write wrote nothing: the lease is gone
    /// ([`StoreError::LeaseLost`]) or the checkpoint moved
    /// ([`StoreError::CheckpointMoved`]).
    async fn not_saved(
        &self,
        conn: &mut PgConnection,
        name: &str,
        expected: Option<Position>,
        version: Option<u32>,
        lease: Option<&Lease>,
    ) -> StoreError {
        if let Some(lease) = lease {
            let current: Result<bool, _> = stmt(&self.statements().fence_check)
                .bind(&lease.name)
                .bind(&lease.instance)
                .bind(token(lease))
                .fetch_one(&mut *conn)
                .await
                .and_then(|row| row.try_get(0));
            match current {
                Ok(true) => {}
                Ok(false) => return lease_lost(lease),
                Err(e) => return StoreError::database("checking a lease", e),
            }
        }
        let found = match self.load_row(&mut *conn, name).await {
            Ok(found) => found,
            Err(e) => return e,
        };
        let expected = expected.unwrap_or(Position::ORIGIN);
        StoreError::CheckpointMoved {
            name: name.to_owned(),
            expected: match version {
                Some(v) => format!("position {expected} at version {v}"),
                None => expected.to_string(),
            },
            found: found.map(|s| match version {
                Some(_) => format!("position {} at version {}", s.position, s.version),
                None => s.position.to_string(),
            }),
        }
    }

    /// The row of checkpoint `name`, read through `conn`.
    async fn load_row(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<ProjectionState>, StoreError> {
        let row = stmt(&self.statements().load_state)
            .bind(name)
            .fetch_optional(conn)
            .await
            .map_err(db("loading a checkpoint"))?;
        row.as_ref().map(state_from_row).transpose()
    }

    /// The commit of a projection batch, inside its transaction: layout
    /// guard, fence, compared checkpoint, skip record.
    async fn finish(&self, tx: &mut PgTx, commit: &Commit) -> Result<(), StoreError> {
        // One statement: the fenced, compared upsert, guarded by the layout
        // row; it share-locks the lease and layout rows until the commit.
        let guard = commit.layout.as_ref();
        let guard_state = guard.and_then(|g| g.state);
        let query = stmt(&self.statements().commit_checkpoint)
            .bind(&commit.projection)
            .bind(position_text(commit.position))
            .bind(commit.version as i32);
        let done = bind_fence(query, commit.lease.as_ref())
            .bind(commit.expected.map(position_text))
            .bind(true)
            .bind(guard.map(|g| g.key.as_str()))
            .bind(guard_state.is_some())
            .bind(guard_state.map(|s| position_text(s.position)))
            .bind(guard_state.map(|s| s.version as i32))
            .execute(tx.conn())
            .await
            .map_err(db("saving a checkpoint"))?;
        if done.rows_affected() == 0 {
            if let Some(guard) = guard {
                // Which check failed: the layout first (a rebuild started).
                let found = self.load_row(tx.conn(), &guard.key).await?;
                Commit {
                    expected: None,
                    ..commit.clone()
                }
                .check(None, found)?;
            }
            return Err(self
                .not_saved(
                    tx.conn(),
                    &commit.projection,
                    commit.expected,
                    Some(commit.version),
                    commit.lease.as_ref(),
                )
                .await);
        }
        if let Some(skip) = &commit.skipped {
            stmt(&self.statements().record_skip)
                .bind(&skip.subscriber)
                .bind(position_text(skip.position))
                .bind(&skip.stream)
                .bind(i64::try_from(skip.version).unwrap_or(i64::MAX))
                .bind(&skip.event_type)
                .bind(&skip.error)
                .bind(Timestamp(skip.skipped_at))
                .execute(tx.conn())
                .await
                .map_err(db("recording a skipped event"))?;
        }
        Ok(())
    }
}

/// A checkpoint row (`position::text, version`) as a state.
fn state_from_row(row: &PgRow) -> Result<ProjectionState, StoreError> {
    let failed = || db("loading a checkpoint");
    let position: String = row.try_get(0).map_err(failed())?;
    let version: Option<i32> = row.try_get(1).map_err(failed())?;
    Ok(ProjectionState {
        position: parse_position(&position, "checkpoints")?,
        version: version.and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
    })
}

fn skipped_from_row(row: &PgRow) -> Result<SkippedEvent, StoreError> {
    let failed = || db("listing skipped events");
    let position: String = row.try_get(1).map_err(failed())?;
    let version: i64 = row.try_get(3).map_err(failed())?;
    let Timestamp(skipped_at) = row.try_get(6).map_err(failed())?;
    Ok(SkippedEvent {
        subscriber: row.try_get(0).map_err(failed())?,
        position: parse_position(&position, "skipped")?,
        stream: row.try_get(2).map_err(failed())?,
        version: u64::try_from(version).unwrap_or(0),
        event_type: row.try_get(4).map_err(failed())?,
        error: row.try_get(5).map_err(failed())?,
        skipped_at,
    })
}

/// Read models in PostgreSQL, in any schema the pool's role can write:
/// `transact` runs the projection's work and the checkpoint (in this
/// store's schema) in one transaction on a connection of the store's pool.
#[async_trait]
impl ReadModelDb for PostgresStore {
    type Tx = PgTx;

    async fn load_state(&self, projection: &str) -> Result<Option<ProjectionState>, StoreError> {
        let row = stmt(&self.statements().load_state)
            .bind(projection)
            .fetch_optional(self.pool())
            .await
            .map_err(db("loading a projection's checkpoint"))?;
        row.as_ref().map(state_from_row).transpose()
    }

    /// `BEGIN`, the work, then (if it succeeded) the fence check, checkpoint
    /// and skip record, `COMMIT`. A failed work rolls back and is returned
    /// as `Ok(Err(..))`; a lost lease rolls back with
    /// [`StoreError::LeaseLost`].
    async fn transact<T: Send + 'static>(
        &self,
        commit: Commit,
        work: TxWork<Self, T>,
    ) -> Result<Result<T, HandlerFailure>, StoreError> {
        let tx = self
            .pool()
            .begin()
            .await
            .map_err(db("starting a projection transaction"))?;
        let mut tx = PgTx { tx };
        match work(&mut tx).await {
            Err(failure) => {
                // Dropping the transaction would roll back too; this returns
                // the connection to the pool clean at once. If the rollback
                // itself fails, the connection is broken: that is a store
                // failure (retried by the worker), not the handler's, so it
                // must not count against the event or get it skipped.
                match tx.tx.rollback().await {
                    Ok(()) => Ok(Err(failure)),
                    Err(e) => {
                        tracing::warn!(projection = %commit.projection, handler_error = %failure.error, error = %e, "rolling back a failed batch failed");
                        Err(StoreError::database(
                            "rolling back a failed projection batch",
                            e,
                        ))
                    }
                }
            }
            Ok(value) => {
                // On an error the transaction drops and rolls back.
                self.finish(&mut tx, &commit).await?;
                tx.tx
                    .commit()
                    .await
                    .map_err(db("committing a projection transaction"))?;
                Ok(Ok(value))
            }
        }
    }

    async fn skipped(&self, subscriber: Option<&str>) -> Result<Vec<SkippedEvent>, StoreError> {
        let rows = stmt(&self.statements().skipped)
            .bind(subscriber)
            .fetch_all(self.pool())
            .await
            .map_err(db("listing skipped events"))?;
        rows.iter().map(skipped_from_row).collect()
    }
}

/// Checkpoints in the store's schema (shared with projections: a name is
/// one row, whoever writes it).
#[async_trait]
impl CheckpointStore for PostgresStore {
    async fn load_checkpoint(&self, subscriber: &str) -> Result<Option<Position>, StoreError> {
        Ok(ReadModelDb::load_state(self, subscriber)
            .await?
            .map(|s| s.position))
    }

    /// One statement: the fence check, the compare and the upsert commit
    /// together.
    async fn save(
        &self,
        subscriber: &str,
        expected: Option<Position>,
        at: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        self.save_checkpoint(subscriber, expected, at, lease).await
    }
}

impl PostgresStore {
    /// The backend pid of this handle's presence session, opening (or
    /// reopening) it when needed. The session stays open for as long as
    /// the store (any clone) lives: while it exists, lease rows that name
    /// it are held by a live process.
    async fn presence(&self) -> Result<i32, StoreError> {
        let mut presence = self.statements().presence.lock().await;
        if let Some(p) = presence.as_mut() {
            // Still alive? (A dropped connection is replaced.)
            let alive = sqlx_core::query::query("SELECT 1")
                .execute(&mut p.conn)
                .await
                .is_ok();
            if alive {
                return Ok(p.pid);
            }
            tracing::warn!(
                pid = p.pid,
                "the lease presence session was lost; opening another"
            );
            *presence = None;
        }
        let mut conn = self
            .pool()
            .acquire()
            .await
            .map_err(db("opening the lease presence session"))?
            .detach();
        let pid: i32 = sqlx_core::query::query("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(db("opening the lease presence session"))?;
        *presence = Some(Presence { conn, pid });
        Ok(pid)
    }
}

/// Leases in the store's schema, timed by the database's clock: one
/// statement each, no session state in them, so they work through poolers.
///
/// A row also records the holder's presence session (the backend pid and
/// start of a connection this store handle keeps open, outside the pool):
/// when its process dies, the session ends, and the next acquirer that does
/// not find it in `pg_stat_activity` takes the lease over at once rather
/// than after the TTL. The presence session needs a direct connection (a
/// transaction-pooling proxy would not keep it); without one, takeover
/// falls back to the TTL in effect, never to two holders: the token fences.
#[async_trait]
impl LeaseStore for PostgresStore {
    async fn acquire(
        &self,
        name: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let pid = self.presence().await?;
        let Some(row) = stmt(&self.statements().acquire)
            .bind(name)
            .bind(&holder.owner)
            .bind(micros(ttl))
            .bind(&holder.instance)
            .bind(pid)
            .fetch_optional(self.pool())
            .await
            .map_err(db("acquiring a lease"))?
        else {
            return Ok(None);
        };
        let failed = || db("acquiring a lease");
        let token: i64 = row.try_get(0).map_err(failed())?;
        let Timestamp(expires_at) = row.try_get(1).map_err(failed())?;
        Ok(Some(Lease {
            name: name.to_owned(),
            owner: holder.owner.clone(),
            instance: holder.instance.clone(),
            token: u64::try_from(token).unwrap_or(0),
            expires_at,
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError> {
        let pid = self.presence().await?;
        let row = stmt(&self.statements().renew)
            .bind(&lease.name)
            .bind(&lease.instance)
            .bind(token(lease))
            .bind(micros(ttl))
            .bind(pid)
            .fetch_optional(self.pool())
            .await
            .map_err(db("renewing a lease"))?
            .ok_or_else(|| lease_lost(lease))?;
        let Timestamp(expires_at) = row.try_get(0).map_err(db("renewing a lease"))?;
        Ok(Lease {
            expires_at,
            ..lease.clone()
        })
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        stmt(&self.statements().release)
            .bind(&lease.name)
            .bind(&lease.instance)
            .bind(token(lease))
            .execute(self.pool())
            .await
            .map_err(db("releasing a lease"))?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        group: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Vec<Member>, StoreError> {
        let pid = self.presence().await?;
        let rows = stmt(&self.statements().heartbeat)
            .bind(group)
            .bind(&holder.instance)
            .bind(&holder.owner)
            .bind(micros(ttl))
            .bind(pid)
            .fetch_all(self.pool())
            .await
            .map_err(db("sending a group heartbeat"))?;
        members_of(rows)
    }

    async fn leave(&self, group: &str, holder: &Holder) -> Result<(), StoreError> {
        stmt(&self.statements().leave)
            .bind(group)
            .bind(&holder.instance)
            .execute(self.pool())
            .await
            .map_err(db("leaving a group"))?;
        Ok(())
    }

    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let rows = stmt(&self.statements().members)
            .fetch_all(self.pool())
            .await
            .map_err(db("listing group members"))?;
        members_of(rows)
    }
}

/// A member row (alias `m`) that is live: not expired, and its presence
/// session, when recorded, still connected.
const LIVE_MEMBER: &str = "m.expires_at > now() AND (m.holder_pid IS NULL OR m.holder_start IS NULL \
     OR EXISTS (SELECT 1 FROM pg_stat_activity a \
     WHERE a.pid = m.holder_pid AND a.backend_start = m.holder_start))";

/// Member rows (group_name, owner, instance, joined_at, expires_at).
fn members_of(rows: Vec<PgRow>) -> Result<Vec<Member>, StoreError> {
    let failed = || db("reading group members");
    rows.iter()
        .map(|row| {
            let Timestamp(joined_at) = row.try_get(3).map_err(failed())?;
            let Timestamp(expires_at) = row.try_get(4).map_err(failed())?;
            Ok(Member {
                group: row.try_get(0).map_err(failed())?,
                owner: row.try_get(1).map_err(failed())?,
                instance: row.try_get(2).map_err(failed())?,
                joined_at,
                expires_at,
            })
        })
        .collect()
}

/// The current time, as bound.
pub(super) fn now() -> Timestamp {
    Timestamp(Utc::now())
}

/// Operators' reads (see [`crate::admin`]): plain queries, never a write.
#[async_trait]
impl crate::admin::Admin for PostgresStore {
    async fn group_members(&self) -> Result<Vec<Member>, StoreError> {
        LeaseStore::members(self).await
    }

    async fn deadlines(&self, limit: usize) -> Result<Vec<crate::process::Deadline>, StoreError> {
        self.all_deadlines(limit).await
    }

    async fn checkpoints(&self) -> Result<Vec<crate::admin::CheckpointRow>, StoreError> {
        let sql: Arc<str> = format!(
            "SELECT name, position::text, version, updated_at FROM \"{}\".checkpoints ORDER BY name",
            self.schema()
        )
        .into();
        let failed = || db("listing checkpoints");
        let found = stmt(&sql).fetch_all(self.pool()).await.map_err(failed())?;
        found
            .iter()
            .map(|row| {
                let position: String = row.try_get(1).map_err(failed())?;
                let version: Option<i32> = row.try_get(2).map_err(failed())?;
                let Timestamp(updated_at) = row.try_get(3).map_err(failed())?;
                Ok(crate::admin::CheckpointRow {
                    name: row.try_get(0).map_err(failed())?,
                    position: parse_position(&position, "checkpoints")?,
                    version: version.and_then(|v| u32::try_from(v).ok()),
                    updated_at,
                })
            })
            .collect()
    }

    async fn leases(&self) -> Result<Vec<crate::admin::LeaseRow>, StoreError> {
        let sql: Arc<str> = format!(
            "SELECT name, owner, instance, token, expires_at FROM \"{}\".leases ORDER BY name",
            self.schema()
        )
        .into();
        let failed = || db("listing leases");
        let found = stmt(&sql).fetch_all(self.pool()).await.map_err(failed())?;
        found
            .iter()
            .map(|row| {
                let token: i64 = row.try_get(3).map_err(failed())?;
                let Timestamp(expires_at) = row.try_get(4).map_err(failed())?;
                Ok(crate::admin::LeaseRow {
                    name: row.try_get(0).map_err(failed())?,
                    owner: row.try_get(1).map_err(failed())?,
                    instance: row.try_get(2).map_err(failed())?,
                    token: u64::try_from(token).unwrap_or(0),
                    expires_at,
                })
            })
            .collect()
    }

    async fn backlog(
        &self,
        after: Position,
        cap: u64,
    ) -> Result<crate::admin::Backlog, StoreError> {
        let schema = self.schema();
        let sql: Arc<str> = format!(
            "SELECT count(*), (SELECT recorded_at FROM \"{schema}\".events \
                               WHERE (transaction_id, seq) > ($1, $2) \
                               ORDER BY transaction_id, seq LIMIT 1) \
             FROM (SELECT 1 FROM \"{schema}\".events WHERE (transaction_id, seq) > ($1, $2) \
                   LIMIT $3) AS t"
        )
        .into();
        let (transaction, seq) = super::order::decode(after);
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        let failed = || db("counting the events after a checkpoint");
        let row = stmt(&sql)
            .bind(transaction)
            .bind(seq)
            .bind(cap)
            .fetch_one(self.pool())
            .await
            .map_err(failed())?;
        let events: i64 = row.try_get(0).map_err(failed())?;
        let oldest: Option<Timestamp> = row.try_get(1).map_err(failed())?;
        Ok(crate::admin::Backlog {
            events: u64::try_from(events).unwrap_or(0),
            capped: events >= cap,
            oldest: oldest.map(|Timestamp(t)| t),
        })
    }

    async fn streams(
        &self,
        category: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::admin::StreamInfo>, StoreError> {
        let sql: Arc<str> = format!(
            "SELECT stream, max(version), count(*), max(recorded_at) FROM \"{}\".events \
             WHERE $1::text IS NULL OR left(stream, length($1)) = $1 \
             GROUP BY stream ORDER BY stream LIMIT $2",
            self.schema()
        )
        .into();
        let prefix = category.map(|c| format!("{c}-"));
        let failed = || db("listing streams");
        let found = stmt(&sql)
            .bind(prefix)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(failed())?;
        found
            .iter()
            .map(|row| {
                let version: i64 = row.try_get(1).map_err(failed())?;
                let events: i64 = row.try_get(2).map_err(failed())?;
                let Timestamp(last_write) = row.try_get(3).map_err(failed())?;
                Ok(crate::admin::StreamInfo {
                    stream: row.try_get(0).map_err(failed())?,
                    version: u64::try_from(version).unwrap_or(0),
                    events: u64::try_from(events).unwrap_or(0),
                    last_write,
                })
            })
            .collect()
    }

    async fn parked_messages_info(
        &self,
    ) -> Result<Vec<crate::admin::ParkedMessageInfo>, StoreError> {
        let sql: Arc<str> = format!(
            "SELECT inbox, message_id, subject, error, parked_at FROM \"{}\".inbox_parked \
             ORDER BY parked_at, inbox, message_id",
            self.schema()
        )
        .into();
        let failed = || db("listing parked inbox messages");
        let found = stmt(&sql).fetch_all(self.pool()).await.map_err(failed())?;
        found
            .iter()
            .map(|row| {
                let Timestamp(parked_at) = row.try_get(4).map_err(failed())?;
                Ok(crate::admin::ParkedMessageInfo {
                    inbox: row.try_get(0).map_err(failed())?,
                    message_id: row.try_get(1).map_err(failed())?,
                    subject: row.try_get(2).map_err(failed())?,
                    error: row.try_get(3).map_err(failed())?,
                    parked_at,
                })
            })
            .collect()
    }
}
