//! Projections of the bench domain into the SQLite file of the store, for
//! the catch-up benchmarks: one that does nothing (the runner's own cost:
//! read, decode, one transaction and checkpoint per batch) and one that
//! upserts a row per account (a typical read model).

use aftermath::Recorded;
use aftermath::SqliteStore;
use aftermath::projection::{HandlerError, Projection};
use aftermath::store::sqlite::SqliteTx;

use crate::domain::AccountEvent;

/// A projection whose `apply` does nothing.
pub struct NoOp {
    name: String,
}

impl NoOp {
    /// A no-op projection checkpointed under `name`.
    pub fn new(name: impl Into<String>) -> Self {
        NoOp { name: name.into() }
    }
}

impl Projection for NoOp {
    type Event = AccountEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        &self.name
    }

    async fn reset(&self, _tx: &mut SqliteTx) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn apply(
        &self,
        _tx: &mut SqliteTx,
        _event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// The signed change of an account's balance an event makes.
pub fn balance_change(event: &AccountEvent) -> i64 {
    match event {
        AccountEvent::Opened { .. } => 0,
        AccountEvent::Deposited { amount } => *amount as i64,
        AccountEvent::Withdrew { amount } => -(*amount as i64),
    }
}

/// `CREATE TABLE` of an upsert read model named `table`: one row per
/// account with its balance and event count.
pub fn totals_table_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             account TEXT PRIMARY KEY,
             balance INTEGER NOT NULL,
             events  INTEGER NOT NULL
         )"
    )
}

/// The upsert of one event into the read model `table`:
/// `?1` = stream, `?2` = balance change.
pub fn totals_upsert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (account, balance, events) VALUES (?1, ?2, 1) \
         ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance, \
         events = events + 1"
    )
}

/// A projection that upserts one row per account (balance and event count)
/// into its own table, through the runner's transaction.
pub struct Totals {
    name: String,
    create: String,
    drop: String,
    upsert: String,
}

impl Totals {
    /// An upsert projection named `name`, writing to table `name` (a plain
    /// SQL identifier).
    pub fn new(name: &str) -> Self {
        Totals {
            name: name.to_owned(),
            create: totals_table_sql(name),
            drop: format!("DROP TABLE IF EXISTS {name}"),
            upsert: totals_upsert_sql(name),
        }
    }
}

impl Projection for Totals {
    type Event = AccountEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        &self.name
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(&self.create)?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(&self.drop)?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut SqliteTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        tx.prepare_cached(&self.upsert)?
            .execute((&event.stream, balance_change(&event.event)))?;
        Ok(())
    }
}
