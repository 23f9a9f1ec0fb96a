//! A small bank: accounts that can be opened, credited and debited.
//!
//! The aggregate only decides; the rules (no overdraft, open once) live in
//! `decide`, and `apply` folds facts without judging them. The [`Balances`]
//! projection (SQLite) and [`PgBalances`] (PostgreSQL) turn the events into
//! a table that is cheap to query.

use std::sync::Arc;

// The prelude has what projections need for raw SQL on either backend:
// `SqliteTx`, `rusqlite`, `PgTx`, `pg_query`, `AssertSqlSafe`, `Row`'s methods.
use aftermath::prelude::*;
use aftermath::store::postgres::sqlx_core;
use aftermath::store::postgres::sqlx_postgres::PgPool;
use serde::{Deserialize, Serialize};

// ANCHOR: events
/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "account")]
pub enum AccountEvent {
    /// The account was opened for an owner.
    Opened {
        /// Account holder.
        owner: String,
    },
    /// Money was paid in.
    Deposited {
        /// Amount in cents.
        amount: u64,
    },
    /// Money was paid out. Stored as "account.Withdrawn"; early versions stored
    /// "account.MoneyWithdrawn", which still decodes.
    #[event(name = "Withdrawn", alias = "MoneyWithdrawn")]
    Withdrew {
        /// Amount in cents.
        amount: u64,
    },
}

// ANCHOR_END: events

// ANCHOR: commands
/// What an account can be asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    /// Open the account.
    Open {
        /// Account holder.
        owner: String,
    },
    /// Pay money in.
    Deposit {
        /// Amount in cents.
        amount: u64,
    },
    /// Pay money out.
    Withdraw {
        /// Amount in cents.
        amount: u64,
    },
}

/// Why an account refuses a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountError {
    /// The account was opened before.
    #[error("the account is already open")]
    AlreadyOpen,
    /// The account does not exist yet.
    #[error("the account is not open")]
    NotOpen,
    /// The amount must be positive.
    #[error("amounts must be greater than zero")]
    ZeroAmount,
    /// Not enough money for the withdrawal.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Balance in cents.
        balance: u64,
        /// Requested amount in cents.
        requested: u64,
    },
}

// ANCHOR_END: commands

// ANCHOR: aggregate
/// An account's state, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Holder, once opened.
    pub owner: Option<String>,
    /// Balance in cents.
    pub balance: u64,
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn decide(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        use AccountCommand::*;
        match command {
            Open { .. } if self.owner.is_some() => Err(AccountError::AlreadyOpen),
            Open { owner } => Ok(vec![AccountEvent::Opened { owner }]),
            _ if self.owner.is_none() => Err(AccountError::NotOpen),
            Deposit { amount: 0 } | Withdraw { amount: 0 } => Err(AccountError::ZeroAmount),
            Deposit { amount } => Ok(vec![AccountEvent::Deposited { amount }]),
            Withdraw { amount } if amount > self.balance => Err(AccountError::InsufficientFunds {
                balance: self.balance,
                requested: amount,
            }),
            Withdraw { amount } => Ok(vec![AccountEvent::Withdrew { amount }]),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrew { amount } => self.balance -= amount,
        }
    }
}

// ANCHOR_END: aggregate

// ANCHOR: projection
/// The `balances` read model: one row per account, kept by a projection in
/// the same SQLite file as the events. Rows and checkpoint commit in one
/// transaction, so each event is applied exactly once, even across crashes.
#[derive(Debug, Clone, Copy)]
pub struct Balances;

impl Balances {
    /// Reads the read model: (account, owner, balance, movements), by account.
    pub fn rows(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(String, String, i64, i64)>> {
        let mut stmt = conn
            .prepare("SELECT account, owner, balance, movements FROM balances ORDER BY account")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        rows.collect()
    }
}

impl Projection for Balances {
    type Event = AccountEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        "balances"
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS balances (
                 account   TEXT PRIMARY KEY,
                 owner     TEXT NOT NULL,
                 balance   INTEGER NOT NULL,
                 movements INTEGER NOT NULL
             )",
        )?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch("DROP TABLE IF EXISTS balances")?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut SqliteTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        let account = account_of(&event.stream);
        let (sql, amount): (&str, i64) = match &event.event {
            AccountEvent::Opened { owner } => {
                tx.prepare_cached(
                    "INSERT INTO balances (account, owner, balance, movements) VALUES (?1, ?2, 0, 0)",
                )?
                .execute((account, owner))?;
                return Ok(());
            }
            AccountEvent::Deposited { amount } => (
                "UPDATE balances SET balance = balance + ?2, movements = movements + 1 WHERE account = ?1",
                i64::try_from(*amount)?,
            ),
            AccountEvent::Withdrew { amount } => (
                "UPDATE balances SET balance = balance - ?2, movements = movements + 1 WHERE account = ?1",
                i64::try_from(*amount)?,
            ),
        };
        tx.prepare_cached(sql)?.execute((account, amount))?;
        Ok(())
    }
}

// ANCHOR_END: projection

/// The account of a stream `account-<id>`.
fn account_of(stream: &str) -> &str {
    stream.strip_prefix("account-").unwrap_or(stream)
}

/// The same `balances` read model in PostgreSQL, in a table of the event
/// store's schema: rows and checkpoint commit in one transaction of the
/// store's pool ([`PgTx`]), so each event is applied exactly once.
pub struct PgBalances {
    table: String,
    create: Arc<str>,
    drop: Arc<str>,
    open: Arc<str>,
    deposit: Arc<str>,
    withdraw: Arc<str>,
}

impl PgBalances {
    /// The read model as table `balances` in `schema` (a plain lowercase
    /// identifier, like the store's schema name).
    pub fn in_schema(schema: &str) -> Self {
        let table = format!("\"{schema}\".balances");
        let sql = |s: String| -> Arc<str> { s.into() };
        PgBalances {
            create: sql(format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                     account   text   PRIMARY KEY,
                     owner     text   NOT NULL,
                     balance   bigint NOT NULL,
                     movements bigint NOT NULL
                 )"
            )),
            drop: sql(format!("DROP TABLE IF EXISTS {table}")),
            open: sql(format!(
                "INSERT INTO {table} (account, owner, balance, movements) VALUES ($1, $2, 0, 0)"
            )),
            deposit: sql(format!(
                "UPDATE {table} SET balance = balance + $2, movements = movements + 1 WHERE account = $1"
            )),
            withdraw: sql(format!(
                "UPDATE {table} SET balance = balance - $2, movements = movements + 1 WHERE account = $1"
            )),
            table,
        }
    }

    /// Reads the read model: (account, owner, balance, movements), by account.
    pub async fn rows(&self, pool: &PgPool) -> sqlx_core::Result<Vec<(String, String, i64, i64)>> {
        let sql = format!(
            "SELECT account, owner, balance, movements FROM {} ORDER BY account",
            self.table
        );
        pg_query(AssertSqlSafe(sql))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect()
    }
}

impl Projection for PgBalances {
    type Event = AccountEvent;
    type Db = PostgresStore;

    fn name(&self) -> &str {
        "balances"
    }

    async fn setup(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        pg_query(AssertSqlSafe(self.create.clone()))
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        pg_query(AssertSqlSafe(self.drop.clone()))
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut PgTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        let account = account_of(&event.stream);
        let (sql, amount) = match &event.event {
            AccountEvent::Opened { owner } => {
                pg_query(AssertSqlSafe(self.open.clone()))
                    .bind(account)
                    .bind(owner)
                    .execute(tx.conn())
                    .await?;
                return Ok(());
            }
            AccountEvent::Deposited { amount } => (&self.deposit, i64::try_from(*amount)?),
            AccountEvent::Withdrew { amount } => (&self.withdraw, i64::try_from(*amount)?),
        };
        pg_query(AssertSqlSafe(sql.clone()))
            .bind(account)
            .bind(amount)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aftermath::testing::AggregateTest;

    #[test]
    fn opens_once() {
        AggregateTest::<Account>::given_nothing()
            .when(AccountCommand::Open {
                owner: "ann".into(),
            })
            .then([AccountEvent::Opened {
                owner: "ann".into(),
            }]);
        AggregateTest::<Account>::given([AccountEvent::Opened {
            owner: "ann".into(),
        }])
        .when(AccountCommand::Open {
            owner: "bob".into(),
        })
        .then_error(AccountError::AlreadyOpen);
    }

    // ANCHOR: test
    #[test]
    fn never_overdraws() {
        let opened = AccountEvent::Opened {
            owner: "ann".into(),
        };
        let state = AggregateTest::<Account>::given([
            opened.clone(),
            AccountEvent::Deposited { amount: 10 },
        ])
        .when(AccountCommand::Withdraw { amount: 10 })
        .then([AccountEvent::Withdrew { amount: 10 }]);
        assert_eq!(state.balance, 0);
        AggregateTest::<Account>::given([opened, AccountEvent::Deposited { amount: 10 }])
            .when(AccountCommand::Withdraw { amount: 11 })
            .then_error(AccountError::InsufficientFunds {
                balance: 10,
                requested: 11,
            });
    }
    // ANCHOR_END: test

    #[test]
    fn needs_an_open_account_and_a_positive_amount() {
        AggregateTest::<Account>::given_nothing()
            .when(AccountCommand::Deposit { amount: 1 })
            .then_error(AccountError::NotOpen);
        AggregateTest::<Account>::given([AccountEvent::Opened {
            owner: "ann".into(),
        }])
        .when(AccountCommand::Deposit { amount: 0 })
        .then_error(AccountError::ZeroAmount);
    }
}
