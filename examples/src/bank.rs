//! A small bank: accounts that can be opened, credited and debited.
//!
//! The aggregate only decides; the rules (no overdraft, open once) live in
//! `decide`, and `apply` folds facts without judging them. The [`Balances`]
//! projection turns the events into a table that is cheap to query.

use aftermath::prelude::*;
use aftermath::projection::{HandlerError, Projection};
use aftermath::store::sqlite::{SqliteTx, rusqlite};
use serde::{Deserialize, Serialize};

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
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
    /// Money was paid out. Stored as "Withdrawn"; early versions stored
    /// "MoneyWithdrawn", which still decodes.
    #[event(name = "Withdrawn", alias = "MoneyWithdrawn")]
    Withdrew {
        /// Amount in cents.
        amount: u64,
    },
}

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

/// The `balances` read model: one row per account, kept by a projection in
/// the same SQLite file as the events. Rows and checkpoint commit in one
/// transaction, so each event is applied exactly once, even across crashes.
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
        let account = event
            .stream
            .strip_prefix("account-")
            .unwrap_or(&event.stream);
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
