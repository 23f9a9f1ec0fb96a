//! The bench domain: a small bank account, the same shape as the account of
//! the integration tests (`tests/src/domain.rs`), with a serde state so that
//! snapshots work.

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
    #[event(name = "Withdrawn")]
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

/// An account's state. Serializable, so a repository can snapshot it.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Owner, once opened.
    pub owner: Option<String>,
    /// Balance.
    pub balance: u64,
    /// Number of events applied (folded from the stream or the snapshot).
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

/// Decodes a stored payload the way a hand-written application would: by
/// the stored type name, with plain serde structs of the variants' content
/// (what `#[derive(Event)]` stores). `None` for a type it does not know.
pub fn decode_raw(event_type: &str, payload: &[u8]) -> serde_json::Result<Option<AccountEvent>> {
    #[derive(Deserialize)]
    struct Owner {
        owner: String,
    }
    #[derive(Deserialize)]
    struct Amount {
        amount: u64,
    }
    Ok(Some(match event_type {
        "account.Opened" => AccountEvent::Opened {
            owner: serde_json::from_slice::<Owner>(payload)?.owner,
        },
        "account.Deposited" => AccountEvent::Deposited {
            amount: serde_json::from_slice::<Amount>(payload)?.amount,
        },
        "account.Withdrawn" => AccountEvent::Withdrew {
            amount: serde_json::from_slice::<Amount>(payload)?.amount,
        },
        _ => return Ok(None),
    }))
}

/// Folds raw `(event type, payload)` rows into an account, as a
/// hand-written command handler would.
pub fn fold_raw(history: &[(String, Vec<u8>)]) -> serde_json::Result<Account> {
    let mut account = Account::default();
    for (event_type, payload) in history {
        if let Some(event) = decode_raw(event_type, payload)? {
            account.apply(&event);
        }
    }
    Ok(account)
}
