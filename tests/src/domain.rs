//! A small bank domain shared by the integration tests.

use aftermath::prelude::*;
use serde::{Deserialize, Serialize};

/// Events of an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "account")]
pub enum AccountEvent {
    /// The account was opened.
    Opened {
        /// Who owns it.
        owner: String,
    },
    /// Money came in.
    Deposited {
        /// How much.
        amount: u64,
    },
    /// Money went out.
    #[event(name = "Withdrawn", alias = "MoneyWithdrawn")]
    Withdrew {
        /// How much.
        amount: u64,
    },
}

/// Commands of an account.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    /// Open the account.
    Open {
        /// Owner.
        owner: String,
    },
    /// Put money in.
    Deposit {
        /// How much.
        amount: u64,
    },
    /// Take money out.
    Withdraw {
        /// How much.
        amount: u64,
    },
}

/// Why an account refuses a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountError {
    /// Opening twice.
    #[error("account is already open")]
    AlreadyOpen,
    /// Using an account that does not exist.
    #[error("account is not open")]
    NotOpen,
    /// Not enough money.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Current balance.
        balance: u64,
        /// Requested amount.
        requested: u64,
    },
}

/// An account's state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Owner, once opened.
    pub owner: Option<String>,
    /// Balance.
    pub balance: u64,
    /// Number of events applied (to compare loads).
    pub applied: u64,
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn decide(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { owner } => match self.owner {
                Some(_) => Err(AccountError::AlreadyOpen),
                None => Ok(vec![AccountEvent::Opened { owner }]),
            },
            _ if self.owner.is_none() => Err(AccountError::NotOpen),
            AccountCommand::Deposit { amount } => Ok(vec![AccountEvent::Deposited { amount }]),
            AccountCommand::Withdraw { amount } if amount > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    requested: amount,
                })
            }
            AccountCommand::Withdraw { amount } => Ok(vec![AccountEvent::Withdrew { amount }]),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        self.applied += 1;
        match event {
            AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrew { amount } => self.balance -= amount,
        }
    }
}
