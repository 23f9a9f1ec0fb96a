//! Projections of the bench domain into PostgreSQL, beside the store's
//! schema: one that does nothing (the runner's own cost: read, decode, one
//! transaction and a fenced checkpoint per batch) and one that upserts a row
//! per account in its batch transaction (a typical read model, and a
//! transaction with an id that is open most of the time).

use aftermath::projection::{HandlerError, Projection};
use aftermath::store::postgres::PgTx;
use aftermath::store::postgres::sqlx_core::executor::Executor;
use aftermath::store::postgres::sqlx_core::query::query;
use aftermath::store::postgres::sqlx_core::raw_sql::raw_sql;
use aftermath::store::postgres::sqlx_core::sql_str::AssertSqlSafe;
use aftermath::{PostgresStore, Recorded};

use crate::domain::AccountEvent;
use crate::projections::balance_change;

/// A PostgreSQL projection whose `apply` does nothing.
pub struct PgNoOp {
    name: String,
}

impl PgNoOp {
    /// A no-op projection checkpointed under `name`.
    pub fn new(name: impl Into<String>) -> Self {
        PgNoOp { name: name.into() }
    }
}

impl Projection for PgNoOp {
    type Event = AccountEvent;
    type Db = PostgresStore;

    fn name(&self) -> &str {
        &self.name
    }

    async fn reset(&self, _tx: &mut PgTx) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn apply(
        &self,
        _tx: &mut PgTx,
        _event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Balances per account in `<schema>.<name>`, upserted per event.
pub struct PgTotals {
    name: String,
    table: String,
    upsert: String,
}

impl PgTotals {
    /// A totals projection named `name` with its table in `schema`.
    pub fn new(schema: &str, name: &str) -> Self {
        let table = format!("\"{schema}\".\"{name}\"");
        PgTotals {
            name: name.to_owned(),
            upsert: format!(
                "INSERT INTO {table} (account, balance, events) VALUES ($1, $2, 1) \
                 ON CONFLICT (account) DO UPDATE SET balance = {table}.balance + excluded.balance, \
                 events = {table}.events + 1"
            ),
            table,
        }
    }
}

impl Projection for PgTotals {
    type Event = AccountEvent;
    type Db = PostgresStore;

    fn name(&self) -> &str {
        &self.name
    }

    async fn setup(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (account text PRIMARY KEY, balance bigint NOT NULL, \
             events bigint NOT NULL)",
            self.table
        );
        tx.conn().execute(raw_sql(AssertSqlSafe(sql))).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        let sql = format!("DROP TABLE IF EXISTS {}", self.table);
        tx.conn().execute(raw_sql(AssertSqlSafe(sql))).await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut PgTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        query(AssertSqlSafe(self.upsert.clone()))
            .bind(&event.stream)
            .bind(balance_change(&event.event))
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}
