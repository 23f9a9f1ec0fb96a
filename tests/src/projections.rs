//! Read models for the subscription, projection and worker tests: a
//! `balances` projection over the [`AccountEvent`] domain (also run by the
//! `sub_helper` binary in other processes), the expected read model folded
//! straight from the log, and helpers to fill a store.
//!
//! Each [`Balances`] instance owns two tables named after the projection:
//!
//! - `<name>_balances (account PRIMARY KEY, balance, events)`: every event is
//!   an upsert of its account's row (`balance += delta, events += 1`);
//! - `<name>_applied (position INTEGER PRIMARY KEY, applied_by)`: one row per
//!   applied event, so applying an event twice violates the primary key (the
//!   handler fails) and a lost event shows as a missing row. `applied_by` is
//!   the projection's tag (e.g. the worker process that applied it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aftermath::projection::{HandlerError, Projection};
use aftermath::store::read_all_pages;
use aftermath::store::sqlite::SqliteTx;
use aftermath::{
    Event, EventData, EventStore, ExpectedVersion, Position, Recorded, SqliteStore, StoreError,
    StoredEvent,
};
use futures::TryStreamExt;

use crate::domain::AccountEvent;

/// A hook run before each `apply` (on the writer thread, inside the batch's
/// transaction): fault injection and slow handlers for the tests.
pub type Hook = Arc<dyn Fn(&Recorded<AccountEvent>) -> Result<(), HandlerError> + Send + Sync>;

/// The balances projection. See the module docs for its tables.
#[derive(Clone)]
pub struct Balances {
    name: String,
    version: u32,
    tag: String,
    hook: Option<Hook>,
    resets: Arc<AtomicU64>,
    applies: Arc<AtomicU64>,
    create: String,
    drop: String,
    upsert: String,
    insert_applied: String,
}

impl Balances {
    /// A projection named `name` (letters, digits and `_` only: it prefixes
    /// table names), version 1, tagging its rows with `tag`.
    pub fn new(name: &str, tag: &str) -> Self {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "projection name `{name}` must be a plain SQL identifier"
        );
        Balances {
            name: name.to_owned(),
            version: 1,
            tag: tag.to_owned(),
            hook: None,
            resets: Arc::default(),
            applies: Arc::default(),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {name}_balances (
                     account TEXT PRIMARY KEY,
                     balance INTEGER NOT NULL,
                     events  INTEGER NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS {name}_applied (
                     position   INTEGER PRIMARY KEY,
                     applied_by TEXT NOT NULL
                 );"
            ),
            drop: format!(
                "DROP TABLE IF EXISTS {name}_balances; DROP TABLE IF EXISTS {name}_applied;"
            ),
            upsert: format!(
                "INSERT INTO {name}_balances (account, balance, events) VALUES (?1, ?2, 1)
                 ON CONFLICT (account) DO UPDATE SET
                     balance = balance + excluded.balance, events = events + 1"
            ),
            insert_applied: format!(
                "INSERT INTO {name}_applied (position, applied_by) VALUES (?1, ?2)"
            ),
        }
    }

    /// Sets the read model's version (bumping it rebuilds on start).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Runs `hook` before every apply; its error fails the apply.
    pub fn hook(
        mut self,
        hook: impl Fn(&Recorded<AccountEvent>) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// How many times `reset` ran (shared by clones).
    pub fn resets(&self) -> Arc<AtomicU64> {
        self.resets.clone()
    }

    /// How many times `apply` was called, including failed and rolled-back
    /// calls (shared by clones).
    pub fn applies(&self) -> Arc<AtomicU64> {
        self.applies.clone()
    }
}

/// What an account event does to its account's balance.
pub fn delta(event: &AccountEvent) -> i64 {
    match event {
        AccountEvent::Opened { .. } => 0,
        AccountEvent::Deposited { amount } => *amount as i64,
        AccountEvent::Withdrew { amount } => -(*amount as i64),
    }
}

impl Projection for Balances {
    type Event = AccountEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> u32 {
        self.version
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(&self.create)?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        tx.execute_batch(&self.drop)?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut SqliteTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        self.applies.fetch_add(1, Ordering::SeqCst);
        if let Some(hook) = &self.hook {
            hook(event)?;
        }
        tx.prepare_cached(&self.upsert)?
            .execute((&event.stream, delta(&event.event)))?;
        tx.prepare_cached(&self.insert_applied)?
            .execute((event.position.0 as i64, &self.tag))?;
        Ok(())
    }
}

/// A read model as stored, or as it should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Account (stream) -> (balance, events applied).
    pub balances: BTreeMap<String, (i64, u64)>,
    /// Positions applied, ascending.
    pub applied: Vec<u64>,
}

impl Model {
    /// Folds `event` into the model.
    pub fn fold(&mut self, event: &Recorded<AccountEvent>) {
        let row = self.balances.entry(event.stream.clone()).or_default();
        row.0 += delta(&event.event);
        row.1 += 1;
        self.applied.push(event.position.0);
    }
}

/// The read model every event of the log after `after` and through
/// `through` should produce.
pub async fn expected<S: EventStore>(store: &S, after: Position, through: Position) -> Model {
    let mut model = Model::default();
    let types = AccountEvent::event_types();
    let events: Vec<StoredEvent> = read_all_pages(store, after, Some(types), 1000)
        .try_collect()
        .await
        .expect("read $all");
    for stored in events.iter().filter(|e| e.position <= through) {
        let event = stored
            .decode_known::<AccountEvent>()
            .expect("every account event of the log decodes");
        model.fold(&event);
    }
    model
}

/// The whole log's read model.
pub async fn expected_all<S: EventStore>(store: &S) -> Model {
    expected(store, Position::ORIGIN, Position(u64::MAX)).await
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::database("reading the test read model", e)
}

/// Reads the read model of projection `name` (empty if its tables do not
/// exist).
pub fn read_model_conn(conn: &rusqlite::Connection, name: &str) -> Result<Model, StoreError> {
    let exists: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
            [format!("{name}_applied")],
            |row| row.get(0),
        )
        .map_err(db)?;
    if !exists {
        return Ok(Model::default());
    }
    let mut model = Model::default();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT account, balance, events FROM {name}_balances ORDER BY account"
        ))
        .map_err(db)?;
    let rows = stmt
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .map_err(db)?;
    for row in rows {
        let (account, balance, events) = row.map_err(db)?;
        model.balances.insert(account, (balance, events as u64));
    }
    model.applied = applied_by(conn, name)?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    Ok(model)
}

/// `(position, applied_by)` of every applied event, ascending.
pub fn applied_by(
    conn: &rusqlite::Connection,
    name: &str,
) -> Result<Vec<(u64, String)>, StoreError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT position, applied_by FROM {name}_applied ORDER BY position"
        ))
        .map_err(db)?;
    let rows = stmt
        .query_map([], |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)))
        .map_err(db)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db)
}

/// Reads the read model of projection `name` through `store`'s read pool.
pub async fn read_model(store: &SqliteStore, name: &str) -> Model {
    let name = name.to_owned();
    store
        .read(move |conn| read_model_conn(conn, &name))
        .await
        .expect("read the read model")
}

/// The `applied_by` tags of projection `name`, by position.
pub async fn read_applied_by(store: &SqliteStore, name: &str) -> Vec<(u64, String)> {
    let name = name.to_owned();
    store
        .read(move |conn| applied_by(conn, &name))
        .await
        .expect("read the applied table")
}

/// The `k`-th generated account event: the first `accounts` events open the
/// accounts, then deposits, with a withdrawal every seventh event.
pub fn account_event(k: u64, accounts: u64) -> AccountEvent {
    if k < accounts {
        AccountEvent::Opened {
            owner: format!("owner-{k}"),
        }
    } else if k % 7 == 3 {
        AccountEvent::Withdrew { amount: k % 13 + 1 }
    } else {
        AccountEvent::Deposited {
            amount: k % 100 + 1,
        }
    }
}

/// Appends `count` generated account events (numbered from `first`), in
/// appends of `per_append` events to stream `account-<append index %
/// accounts>`. Returns the head after the last append.
pub async fn append_accounts<S: EventStore>(
    store: &S,
    first: u64,
    count: u64,
    per_append: u64,
    accounts: u64,
) -> Position {
    let per_append = per_append.max(1);
    let mut head = store.head().await.expect("head");
    let mut k = first;
    while k < first + count {
        let n = per_append.min(first + count - k);
        let stream = format!("account-{}", (k / per_append) % accounts.max(1));
        let events: Vec<EventData> = (k..k + n)
            .map(|i| EventData::fresh(&account_event(i, accounts)).expect("encode"))
            .collect();
        let done = store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .expect("append account events");
        head = done.last_position.expect("appended");
        k += n;
    }
    head
}

/// Polls `probe` every few milliseconds until it returns `Some`, failing the
/// test after `timeout` (a bound for a guarantee, not a timing assumption).
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// [`eventually`] for a synchronous probe.
pub async fn until<T>(
    what: &str,
    timeout: std::time::Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    eventually(what, timeout, || std::future::ready(probe())).await
}
