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
use crate::subscription::{CheckpointStore, Lease, LeaseStore};

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
    record_skip: Arc<str>,
    skipped: Arc<str>,
    acquire: Arc<str>,
    renew: Arc<str>,
    release: Arc<str>,
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
}

/// The columns [`super::journal`] reads, in its order.
pub(super) const EFFECT_COLUMNS: &str = "reactor, event_id, position::text, stream, event_type, \
                                         state, attempts, last_error, created_at, updated_at";

/// `WITH fence AS (...)`: the lease row, share-locked, when the lease named
/// by parameters `$n`, `$n+1`, `$n+2` (name, owner, token) is current.
fn fence_cte(schema: &str, n: usize) -> String {
    format!(
        "WITH fence AS (SELECT 1 FROM {schema}.leases \
         WHERE name = ${n} AND owner = ${} AND token = ${} FOR SHARE) ",
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
            // the share lock is held until it commits.
            save_checkpoint: s(format!(
                "{}INSERT INTO {schema}.checkpoints (name, position, version, updated_at) \
                 SELECT $1, $2::numeric, $3, now() \
                 WHERE $4::text IS NULL OR EXISTS (SELECT 1 FROM fence) {upsert_checkpoint}",
                fence_cte(schema, 4)
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
            // Free, expired, or already ours: take it; a new owner bumps the
            // token. The row lock of the update waits for fenced writes in
            // flight (their share lock).
            acquire: s(format!(
                "INSERT INTO {schema}.leases AS l (name, owner, token, expires_at) \
                 VALUES ($1, $2, 1, now() + $3::bigint * interval '1 microsecond') \
                 ON CONFLICT (name) DO UPDATE SET \
                   token = CASE WHEN l.owner = excluded.owner THEN l.token ELSE l.token + 1 END, \
                   owner = excluded.owner, expires_at = excluded.expires_at \
                 WHERE l.owner = excluded.owner OR l.expires_at <= now() \
                 RETURNING token, expires_at"
            )),
            renew: s(format!(
                "UPDATE {schema}.leases SET expires_at = now() + $4::bigint * interval '1 microsecond' \
                 WHERE name = $1 AND owner = $2 AND token = $3 RETURNING expires_at"
            )),
            release: s(format!(
                "UPDATE {schema}.leases SET expires_at = 'epoch' \
                 WHERE name = $1 AND owner = $2 AND token = $3"
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
            // keeps the entry's creation time.
            effects_record: s(format!(
                "{}INSERT INTO {schema}.effects (reactor, event_id, position, stream, event_type, \
                   state, attempts, last_error, created_at, updated_at) \
                 SELECT $1, $2, $3::numeric, $4, $5, $6, $7, $8, $9, $10 \
                 WHERE $11::text IS NULL OR EXISTS (SELECT 1 FROM fence) \
                 ON CONFLICT (reactor, event_id) DO UPDATE SET state = excluded.state, \
                   attempts = excluded.attempts, last_error = excluded.last_error, \
                   updated_at = excluded.updated_at",
                fence_cte(schema, 11)
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
                "DELETE FROM {schema}.effects WHERE state IN ('done', 'skipped') AND updated_at < $1"
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
        .bind(lease.map(|l| l.owner.clone()))
        .bind(lease.map(token))
}

impl PostgresStore {
    fn statements(&self) -> &Statements {
        &self.shared.statements
    }

    /// Saves a checkpoint (fenced by `lease` when given) in one statement.
    async fn save_checkpoint(
        &self,
        name: &str,
        at: Position,
        version: Option<u32>,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        let query = stmt(&self.statements().save_checkpoint)
            .bind(name)
            .bind(position_text(at))
            .bind(version.map(|v| v as i32));
        let done = bind_fence(query, lease)
            .execute(self.pool())
            .await
            .map_err(db("saving a checkpoint"))?;
        match lease {
            Some(lease) if done.rows_affected() == 0 => Err(lease_lost(lease)),
            _ => Ok(()),
        }
    }

    /// The commit of a projection batch, inside its transaction: fence,
    /// checkpoint, skip record.
    async fn finish(&self, tx: &mut PgTx, commit: &Commit) -> Result<(), StoreError> {
        // The fenced upsert share-locks the lease row until the commit.
        let query = stmt(&self.statements().save_checkpoint)
            .bind(&commit.projection)
            .bind(position_text(commit.position))
            .bind(commit.version as i32);
        let done = bind_fence(query, commit.lease.as_ref())
            .execute(tx.conn())
            .await
            .map_err(db("saving a checkpoint"))?;
        if let Some(lease) = &commit.lease
            && done.rows_affected() == 0
        {
            return Err(lease_lost(lease));
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
        let Some(row) = stmt(&self.statements().load_state)
            .bind(projection)
            .fetch_optional(self.pool())
            .await
            .map_err(db("loading a projection's checkpoint"))?
        else {
            return Ok(None);
        };
        let failed = || db("loading a projection's checkpoint");
        let position: String = row.try_get(0).map_err(failed())?;
        let version: Option<i32> = row.try_get(1).map_err(failed())?;
        Ok(Some(ProjectionState {
            position: parse_position(&position, "checkpoints")?,
            version: version.and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
        }))
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
    async fn load(&self, subscriber: &str) -> Result<Option<Position>, StoreError> {
        Ok(ReadModelDb::load_state(self, subscriber)
            .await?
            .map(|s| s.position))
    }

    /// One statement: the fence check and the upsert commit together.
    async fn save(
        &self,
        subscriber: &str,
        at: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        self.save_checkpoint(subscriber, at, None, lease).await
    }
}

/// Leases in the store's schema, timed by the database's clock: one
/// statement each, no session state, so they work through poolers.
#[async_trait]
impl LeaseStore for PostgresStore {
    async fn acquire(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let Some(row) = stmt(&self.statements().acquire)
            .bind(name)
            .bind(owner)
            .bind(micros(ttl))
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
            owner: owner.to_owned(),
            token: u64::try_from(token).unwrap_or(0),
            expires_at,
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError> {
        let row = stmt(&self.statements().renew)
            .bind(&lease.name)
            .bind(&lease.owner)
            .bind(token(lease))
            .bind(micros(ttl))
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
            .bind(&lease.owner)
            .bind(token(lease))
            .execute(self.pool())
            .await
            .map_err(db("releasing a lease"))?;
        Ok(())
    }
}

/// The current time, as bound.
pub(super) fn now() -> Timestamp {
    Timestamp(Utc::now())
}
