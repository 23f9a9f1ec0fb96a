//! What the consumer-group runs (`tests/groups_multiprocess.rs` and the
//! `group_worker` binary) share: the three partitioned subscribers a worker
//! process runs, and the readers of what they left in the database.
//!
//! - [`PgGroupBalances`] / [`SqliteGroupBalances`]: the balances read model
//!   (`gbal_balances`), plus `gbal_applied`, one row per applied event
//!   (position unique, so a second apply fails its batch) recording, inside
//!   the projection's transaction, the partition, the worker process's tag
//!   and instance id, and the partition's lease row as it stands in that
//!   transaction (holder instance and fencing token). One value per
//!   partition: it knows its lease's name.
//! - [`GroupEffects`]: a reactor whose effect is an upsert into `gfx_effects`
//!   keyed by the effect's idempotency key (a cooperating receiver): one row
//!   per effect, `attempts` counting every call.
//! - [`Reserve`]: a two-step saga: `ticket.Placed` starts an instance that
//!   sends `Seat::Reserve`; the seat's `Reserved` completes it.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aftermath::process::{CommandBus, Input, Outputs, ProcessManager, Route};
use aftermath::projection::{HandlerError, Projection};
use aftermath::reactor::{EffectContext, ReactError, Reactor};
use aftermath::store::postgres::PgTx;
use aftermath::store::sqlite::SqliteTx;
use aftermath::{
    Aggregate, Event, EventData, EventStore, EventUnion, ExpectedVersion, PostgresStore, Recorded,
    Repository, SqliteStore, StoreError,
};
use serde::{Deserialize, Serialize};
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;

use crate::domain::AccountEvent;
use crate::projections::delta;

/// Partitions of each subscriber.
pub const COUNT: u32 = 16;
/// The projection's name.
pub const PROJECTION: &str = "gbal";
/// The reactor's name.
pub const REACTOR: &str = "gfx";

// ---------------------------------------------------------------------------
// The saga's domain.

/// A ticket to place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "ticket")]
pub enum TicketEvent {
    /// Placed: reserve its seat.
    Placed {
        /// The ticket (the saga instance).
        ticket: String,
    },
}

/// A seat, one per ticket (stream `seat-<ticket>`).
#[derive(Debug, Clone, Default)]
pub struct Seat {
    reserved: bool,
}

/// Commands of a seat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SeatCommand {
    /// Reserve it for `ticket` (again: nothing happens).
    Reserve {
        /// The ticket.
        ticket: String,
    },
}

/// Events of a seat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "seat")]
pub enum SeatEvent {
    /// Reserved for `ticket`.
    Reserved {
        /// The ticket.
        ticket: String,
    },
}

/// A seat never refuses.
#[derive(Debug, Clone, thiserror::Error)]
#[error("never")]
pub struct SeatError;

impl Aggregate for Seat {
    const CATEGORY: &'static str = "seat";
    type Command = SeatCommand;
    type Event = SeatEvent;
    type Error = SeatError;

    fn decide(&self, command: SeatCommand) -> Result<Vec<SeatEvent>, SeatError> {
        let SeatCommand::Reserve { ticket } = command;
        if self.reserved {
            Ok(vec![])
        } else {
            Ok(vec![SeatEvent::Reserved { ticket }])
        }
    }

    fn apply(&mut self, _: &SeatEvent) {
        self.reserved = true;
    }
}

/// The saga's inputs.
#[derive(Debug, Clone, PartialEq, EventUnion)]
pub enum ReserveInput {
    /// Starts an instance.
    Ticket(TicketEvent),
    /// Completes it.
    Seat(SeatEvent),
}

/// Placed -> Reserve the seat -> Reserved -> complete.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reserve;

impl ProcessManager for Reserve {
    const NAME: &'static str = "reserve";
    type Input = ReserveInput;
    type State = ();

    fn route(&self, event: &Recorded<ReserveInput>) -> Route {
        match &event.event {
            ReserveInput::Ticket(TicketEvent::Placed { ticket }) => Route::Start(ticket.clone()),
            ReserveInput::Seat(SeatEvent::Reserved { ticket }) => Route::Continue(ticket.clone()),
        }
    }

    fn apply(&self, _: &mut (), _: &Input<ReserveInput>) {}

    fn handle(&self, _: &(), input: &Input<ReserveInput>, out: &mut Outputs) {
        match input.event() {
            Some(ReserveInput::Ticket(TicketEvent::Placed { ticket })) => out.send::<Seat>(
                ticket.clone(),
                SeatCommand::Reserve {
                    ticket: ticket.clone(),
                },
            ),
            Some(ReserveInput::Seat(SeatEvent::Reserved { .. })) => out.complete(),
            None => {}
        }
    }
}

/// The saga's command bus on `store`.
pub fn command_bus<S: EventStore + Clone>(store: &S) -> CommandBus {
    CommandBus::new().register(Repository::<Seat, _>::new(store.clone()))
}

/// Appends ticket `n` (`ticket.Placed` to stream `ticket-<n>`).
pub async fn place_ticket<S: EventStore>(store: &S, n: u64) {
    let ticket = format!("t{n}");
    store
        .append(
            &format!("ticket-{ticket}"),
            ExpectedVersion::NoStream,
            vec![EventData::fresh(&TicketEvent::Placed { ticket }).expect("encode")],
        )
        .await
        .expect("append a ticket");
}

// ---------------------------------------------------------------------------
// The projection.

/// Who applies: the worker process's tag and its worker's instance id (set
/// right after the worker starts, before any partition can hold a lease).
#[derive(Clone)]
pub struct Applier {
    /// The process's tag (`w0`, `w1`, ...).
    pub tag: String,
    /// The worker's instance id.
    pub instance: Arc<OnceLock<String>>,
}

impl Applier {
    fn instance(&self) -> Result<String, HandlerError> {
        // A partition starts only after a heartbeat and a lease round trip,
        // long after `start` returned; wait a little in case it did not.
        for _ in 0..1000 {
            if let Some(i) = self.instance.get() {
                return Ok(i.clone());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(HandlerError::msg("the worker's instance id was never set"))
    }
}

/// The balances projection with its `applied` ledger, on PostgreSQL. See
/// the module docs.
#[derive(Clone)]
pub struct PgGroupBalances {
    key: String,
    who: Applier,
    create: String,
    drop: String,
    upsert: String,
    insert_applied: String,
}

fn pg_tables(schema: &str) -> (String, String, String) {
    (
        format!("\"{schema}\".{PROJECTION}_balances"),
        format!("\"{schema}\".{PROJECTION}_applied"),
        format!("\"{schema}\".leases"),
    )
}

impl PgGroupBalances {
    /// Partition `key`'s projection, tables in `schema`.
    pub fn new(schema: &str, key: &str, who: Applier) -> Self {
        let (balances, applied, leases) = pg_tables(schema);
        PgGroupBalances {
            key: key.to_owned(),
            who,
            create: format!(
                "CREATE TABLE IF NOT EXISTS {balances} (
                     account text PRIMARY KEY, balance bigint NOT NULL, events bigint NOT NULL);
                 CREATE TABLE IF NOT EXISTS {applied} (
                     seq bigserial PRIMARY KEY,
                     position bigint NOT NULL UNIQUE,
                     stream text NOT NULL,
                     version bigint NOT NULL,
                     partition text NOT NULL,
                     tag text NOT NULL,
                     instance text NOT NULL,
                     lease_instance text,
                     token bigint);"
            ),
            drop: format!("DROP TABLE IF EXISTS {balances}; DROP TABLE IF EXISTS {applied};"),
            upsert: format!(
                "INSERT INTO {balances} AS b (account, balance, events) VALUES ($1, $2, 1)
                 ON CONFLICT (account) DO UPDATE SET
                     balance = b.balance + excluded.balance, events = b.events + 1"
            ),
            // The lease row as this transaction sees it (NULLs if none).
            insert_applied: format!(
                "INSERT INTO {applied}
                     (position, stream, version, partition, tag, instance, lease_instance, token)
                 SELECT $1, $2, $3, $4, $5, $6, l.instance, l.token
                   FROM (VALUES (1)) AS one
                   LEFT JOIN {leases} l ON l.name = $4"
            ),
        }
    }
}

impl Projection for PgGroupBalances {
    type Event = AccountEvent;
    type Db = PostgresStore;

    fn name(&self) -> &str {
        PROJECTION
    }

    async fn setup(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        crate::postgres::create_one_at_a_time(tx, &self.create).await
    }

    async fn reset(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        raw_sql(AssertSqlSafe(self.drop.clone()))
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut PgTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        let instance = self.who.instance()?;
        query(AssertSqlSafe(self.upsert.clone()))
            .bind(&event.stream)
            .bind(delta(&event.event))
            .execute(tx.conn())
            .await?;
        query(AssertSqlSafe(self.insert_applied.clone()))
            .bind(event.position.0 as i64)
            .bind(&event.stream)
            .bind(event.version as i64)
            .bind(&self.key)
            .bind(&self.who.tag)
            .bind(instance)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// The same projection on SQLite (lease table `aftermath_leases`).
#[derive(Clone)]
pub struct SqliteGroupBalances {
    key: String,
    who: Applier,
}

impl SqliteGroupBalances {
    /// Partition `key`'s projection.
    pub fn new(key: &str, who: Applier) -> Self {
        SqliteGroupBalances {
            key: key.to_owned(),
            who,
        }
    }
}

impl Projection for SqliteGroupBalances {
    type Event = AccountEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        PROJECTION
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {PROJECTION}_balances (
                 account TEXT PRIMARY KEY, balance INTEGER NOT NULL, events INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS {PROJECTION}_applied (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 position INTEGER NOT NULL UNIQUE,
                 stream TEXT NOT NULL,
                 version INTEGER NOT NULL,
                 partition TEXT NOT NULL,
                 tag TEXT NOT NULL,
                 instance TEXT NOT NULL,
                 lease_instance TEXT,
                 token INTEGER);"
        ))?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(&format!(
            "DROP TABLE IF EXISTS {PROJECTION}_balances; DROP TABLE IF EXISTS {PROJECTION}_applied;"
        ))?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut SqliteTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        let instance = self.who.instance()?;
        tx.prepare_cached(&format!(
            "INSERT INTO {PROJECTION}_balances (account, balance, events) VALUES (?1, ?2, 1)
             ON CONFLICT (account) DO UPDATE SET
                 balance = balance + excluded.balance, events = events + 1"
        ))?
        .execute((&event.stream, delta(&event.event)))?;
        tx.prepare_cached(&format!(
            "INSERT INTO {PROJECTION}_applied
                 (position, stream, version, partition, tag, instance, lease_instance, token)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, l.instance, l.token
               FROM (SELECT 1) AS one
               LEFT JOIN aftermath_leases l ON l.name = ?4"
        ))?
        .execute((
            event.position.0 as i64,
            &event.stream,
            event.version as i64,
            &self.key,
            &self.who.tag,
            instance,
        ))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The reactor.

/// Where [`GroupEffects`] applies its effects.
#[derive(Clone)]
pub enum EffectsDb {
    /// In the store's schema, through its pool.
    Pg(PostgresStore),
    /// In the store's file, through its writer.
    Sqlite(SqliteStore),
}

const EFFECTS_SQLITE: &str = "CREATE TABLE IF NOT EXISTS gfx_effects (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    position INTEGER NOT NULL,
    tag TEXT NOT NULL,
    attempts INTEGER NOT NULL)";

impl EffectsDb {
    /// Creates the effects table (call once, before the workers start).
    pub async fn create(&self) {
        match self {
            EffectsDb::Pg(store) => {
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS \"{}\".gfx_effects (
                         seq bigserial PRIMARY KEY,
                         key text NOT NULL UNIQUE,
                         stream text NOT NULL,
                         version bigint NOT NULL,
                         position bigint NOT NULL,
                         tag text NOT NULL,
                         attempts bigint NOT NULL)",
                    store.schema()
                );
                store
                    .pool()
                    .execute(raw_sql(AssertSqlSafe(sql)))
                    .await
                    .expect("create the effects table");
            }
            EffectsDb::Sqlite(store) => store
                .write(|conn| {
                    conn.execute_batch(EFFECTS_SQLITE)
                        .map_err(|e| StoreError::database("create the effects table", e))
                })
                .await
                .expect("create the effects table"),
        }
    }
}

/// The reactor: an idempotent upsert per effect, keyed by its idempotency key.
#[derive(Clone)]
pub struct GroupEffects {
    /// Where the effects land.
    pub db: EffectsDb,
    /// The process's tag.
    pub tag: String,
}

#[async_trait::async_trait]
impl Reactor for GroupEffects {
    type Event = AccountEvent;

    fn name(&self) -> &str {
        REACTOR
    }

    async fn react(
        &self,
        event: &Recorded<AccountEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let key = ctx.idempotency_key.clone();
        let (stream, version, position) = (
            event.stream.clone(),
            event.version as i64,
            event.position.0 as i64,
        );
        let tag = self.tag.clone();
        match &self.db {
            EffectsDb::Pg(store) => query(AssertSqlSafe(format!(
                "INSERT INTO \"{}\".gfx_effects AS e (key, stream, version, position, tag, attempts)
                 VALUES ($1, $2, $3, $4, $5, 1)
                 ON CONFLICT (key) DO UPDATE SET attempts = e.attempts + 1",
                store.schema()
            )))
            .bind(key)
            .bind(stream)
            .bind(version)
            .bind(position)
            .bind(tag)
            .execute(store.pool())
            .await
            .map(|_| ())
            .map_err(ReactError::retry),
            EffectsDb::Sqlite(store) => store
                .write(move |conn| {
                    conn.prepare_cached(
                        "INSERT INTO gfx_effects (key, stream, version, position, tag, attempts)
                         VALUES (?1, ?2, ?3, ?4, ?5, 1)
                         ON CONFLICT (key) DO UPDATE SET attempts = attempts + 1",
                    )
                    .and_then(|mut s| s.execute((key, stream, version, position, tag)))
                    .map(|_| ())
                    .map_err(|e| StoreError::database("apply an effect", e))
                })
                .await
                .map_err(ReactError::retry),
        }
    }
}

// ---------------------------------------------------------------------------
// Reading the results.

/// A row of `gbal_applied`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Apply order (a sequence taken at insert).
    pub seq: i64,
    /// The event's position.
    pub position: u64,
    /// Its stream.
    pub stream: String,
    /// Its version.
    pub version: u64,
    /// The partition key (the lease's name).
    pub partition: String,
    /// The applying process's tag.
    pub tag: String,
    /// The applying worker's instance id.
    pub instance: String,
    /// The lease's holder, as the transaction saw the lease row.
    pub lease_instance: Option<String>,
    /// The lease's fencing token, likewise.
    pub token: Option<i64>,
}

/// A row of `gfx_effects`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// Order of first application.
    pub seq: i64,
    /// The idempotency key.
    pub key: String,
    /// The event's stream.
    pub stream: String,
    /// Its version.
    pub version: u64,
    /// Its position.
    pub position: u64,
    /// The process that applied it first.
    pub tag: String,
    /// Calls with this key.
    pub attempts: i64,
}

/// What the workers left, read back from a store.
#[async_trait::async_trait]
pub trait GroupResults: EventStore + aftermath::admin::Admin + Clone + 'static {
    /// Every `gbal_applied` row, by `seq`.
    async fn applied(&self) -> Vec<Applied>;
    /// Every `gfx_effects` row, by `seq`.
    async fn effects(&self) -> Vec<Effect>;
    /// `gbal_balances`: account -> (balance, events).
    async fn balances(&self) -> BTreeMap<String, (i64, u64)>;
    /// (applied rows, effect rows, completed saga instances): for polling.
    async fn progress(&self) -> (u64, u64, u64);
}

const APPLIED_COLUMNS: &str =
    "seq, position, stream, version, partition, tag, instance, lease_instance, token";
const EFFECT_COLUMNS: &str = "seq, key, stream, version, position, tag, attempts";
const COMPLETED: &str = "aftermath.process.Completed";

#[async_trait::async_trait]
impl GroupResults for PostgresStore {
    async fn applied(&self) -> Vec<Applied> {
        let (_, applied, _) = pg_tables(self.schema());
        query(AssertSqlSafe(format!(
            "SELECT {APPLIED_COLUMNS} FROM {applied} ORDER BY seq"
        )))
        .fetch_all(self.pool())
        .await
        .expect("read gbal_applied")
        .iter()
        .map(|r| Applied {
            seq: r.get(0),
            position: r.get::<i64, _>(1) as u64,
            stream: r.get(2),
            version: r.get::<i64, _>(3) as u64,
            partition: r.get(4),
            tag: r.get(5),
            instance: r.get(6),
            lease_instance: r.get(7),
            token: r.get(8),
        })
        .collect()
    }

    async fn effects(&self) -> Vec<Effect> {
        query(AssertSqlSafe(format!(
            "SELECT {EFFECT_COLUMNS} FROM \"{}\".gfx_effects ORDER BY seq",
            self.schema()
        )))
        .fetch_all(self.pool())
        .await
        .expect("read gfx_effects")
        .iter()
        .map(|r| Effect {
            seq: r.get(0),
            key: r.get(1),
            stream: r.get(2),
            version: r.get::<i64, _>(3) as u64,
            position: r.get::<i64, _>(4) as u64,
            tag: r.get(5),
            attempts: r.get(6),
        })
        .collect()
    }

    async fn balances(&self) -> BTreeMap<String, (i64, u64)> {
        let (balances, _, _) = pg_tables(self.schema());
        query(AssertSqlSafe(format!(
            "SELECT account, balance, events FROM {balances}"
        )))
        .fetch_all(self.pool())
        .await
        .expect("read gbal_balances")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get::<i64, _>(2) as u64)))
        .collect()
    }

    async fn progress(&self) -> (u64, u64, u64) {
        let schema = self.schema();
        let (_, applied, _) = pg_tables(schema);
        let count = |sql: String| async move {
            match query(AssertSqlSafe(sql)).fetch_one(self.pool()).await {
                Ok(row) => row.get::<i64, _>(0) as u64,
                // The table is not there yet.
                Err(_) => 0,
            }
        };
        (
            count(format!("SELECT count(*) FROM {applied}")).await,
            count(format!("SELECT count(*) FROM \"{schema}\".gfx_effects")).await,
            count(format!(
                "SELECT count(*) FROM \"{schema}\".events WHERE event_type = '{COMPLETED}'"
            ))
            .await,
        )
    }
}

async fn read_rows<T: Send + 'static>(
    store: &SqliteStore,
    sql: String,
    map: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Vec<T> {
    store
        .read(move |conn| {
            let mut stmt = conn
                .prepare(&sql)
                .map_err(|e| StoreError::database("prepare", e))?;
            let rows = stmt
                .query_map([], map)
                .map_err(|e| StoreError::database("query", e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::database("read", e))
        })
        .await
        .expect("read the results")
}

#[async_trait::async_trait]
impl GroupResults for SqliteStore {
    async fn applied(&self) -> Vec<Applied> {
        read_rows(
            self,
            format!("SELECT {APPLIED_COLUMNS} FROM {PROJECTION}_applied ORDER BY seq"),
            |r| {
                Ok(Applied {
                    seq: r.get(0)?,
                    position: r.get::<_, i64>(1)? as u64,
                    stream: r.get(2)?,
                    version: r.get::<_, i64>(3)? as u64,
                    partition: r.get(4)?,
                    tag: r.get(5)?,
                    instance: r.get(6)?,
                    lease_instance: r.get(7)?,
                    token: r.get(8)?,
                })
            },
        )
        .await
    }

    async fn effects(&self) -> Vec<Effect> {
        read_rows(
            self,
            format!("SELECT {EFFECT_COLUMNS} FROM gfx_effects ORDER BY seq"),
            |r| {
                Ok(Effect {
                    seq: r.get(0)?,
                    key: r.get(1)?,
                    stream: r.get(2)?,
                    version: r.get::<_, i64>(3)? as u64,
                    position: r.get::<_, i64>(4)? as u64,
                    tag: r.get(5)?,
                    attempts: r.get(6)?,
                })
            },
        )
        .await
    }

    async fn balances(&self) -> BTreeMap<String, (i64, u64)> {
        read_rows(
            self,
            format!("SELECT account, balance, events FROM {PROJECTION}_balances"),
            |r| Ok((r.get(0)?, (r.get(1)?, r.get::<_, i64>(2)? as u64))),
        )
        .await
        .into_iter()
        .collect()
    }

    async fn progress(&self) -> (u64, u64, u64) {
        self.read(|conn| {
            let count = |sql: &str| {
                conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                    .map_or(0, |n| n as u64)
            };
            Ok((
                count(&format!("SELECT count(*) FROM {PROJECTION}_applied")),
                count("SELECT count(*) FROM gfx_effects"),
                count(&format!(
                    "SELECT count(*) FROM events WHERE event_type = '{COMPLETED}'"
                )),
            ))
        })
        .await
        .expect("read the progress")
    }
}
