//! Mounting `aftermath_cli::rebuild` in an application's own `main`: a
//! ledger whose `totals` projection (one row per account, in the store's
//! SQLite file) can be rebuilt from the log with a progress bar, stopped
//! with Ctrl-C and resumed.
//!
//! ```text
//! cargo run -p aftermath-cli --example rebuild -- ledger.db fill 200000
//! cargo run -p aftermath-cli --example rebuild -- ledger.db rebuild   # Ctrl-C stops it safely
//! cargo run -p aftermath-cli --example rebuild -- ledger.db resume
//! cargo run -p aftermath-cli --example rebuild -- ledger.db show
//! ```

use aftermath::EventData;
use aftermath::prelude::*;
use aftermath::projection::{HandlerError, Projection, ProjectionOptions, ProjectionRunner};
use aftermath::store::sqlite::SqliteTx;
use serde::{Deserialize, Serialize};

/// The ledger's one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "ledger")]
enum LedgerEvent {
    /// Money booked on the account of the stream.
    Posted { amount: i64 },
}

/// The `totals` read model: balance and postings per account.
struct Totals;

impl Projection for Totals {
    type Event = LedgerEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        "totals"
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS totals (
                 account  TEXT PRIMARY KEY,
                 balance  INTEGER NOT NULL,
                 postings INTEGER NOT NULL)",
        )?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch("DROP TABLE IF EXISTS totals")?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut SqliteTx,
        event: &Recorded<LedgerEvent>,
    ) -> Result<(), HandlerError> {
        let LedgerEvent::Posted { amount } = event.event;
        tx.prepare_cached(
            "INSERT INTO totals (account, balance, postings) VALUES (?1, ?2, 1)
             ON CONFLICT (account) DO UPDATE SET balance = balance + ?2, postings = postings + 1",
        )?
        .execute((event.stream.as_str(), amount))?;
        Ok(())
    }
}

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: rebuild FILE (fill N | rebuild | resume | show)";
    let (Some(file), Some(command)) = (args.first(), args.get(1)) else {
        return Err(usage.into());
    };
    let store = SqliteStore::open(file).await?;
    let runner = ProjectionRunner::new(Totals, store.clone(), store.clone())
        .options(ProjectionOptions::default().batch_size(500));
    match command.as_str() {
        "fill" => {
            let n: usize = args.get(2).ok_or(usage)?.parse()?;
            let before = store.head().await?;
            for chunk in 0..n.div_ceil(1000) {
                let batch: Vec<EventData> = (0..1000.min(n - chunk * 1000))
                    .map(|i| {
                        let amount = ((chunk * 1000 + i) % 97) as i64 - 40;
                        EventData::fresh(&LedgerEvent::Posted { amount })
                    })
                    .collect::<Result<_, _>>()?;
                store
                    .append(
                        &format!("account-{}", chunk % 50),
                        ExpectedVersion::Any,
                        batch,
                    )
                    .await?;
            }
            println!("appended {n} events after position {}", before.0);
        }
        "rebuild" => println!("{}", aftermath_cli::rebuild(&runner).await?),
        "resume" => println!("{}", aftermath_cli::resume(&runner).await?),
        "show" => {
            let rows: Vec<(String, i64, i64)> = store
                .read(|c| {
                    let rows = || -> aftermath::store::sqlite::rusqlite::Result<Vec<_>> {
                        let mut stmt = c.prepare(
                            "SELECT account, balance, postings FROM totals ORDER BY account",
                        )?;
                        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                        rows.collect()
                    };
                    rows().map_err(|e| aftermath::StoreError::database("reading totals", e))
                })
                .await?;
            for (account, balance, postings) in rows {
                println!("{account}: {balance} in {postings} posting(s)");
            }
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
