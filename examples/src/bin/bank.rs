//! A small bank on the embedded SQLite store, or on PostgreSQL.
//!
//! Run:
//!
//! ```text
//! cargo run -p aftermath-examples --bin bank [path/to/bank.db]       # SQLite (default: bank.db)
//! cargo run -p aftermath-examples --bin bank -- postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! An argument that starts with `postgres://` or `postgresql://` selects
//! PostgreSQL: the events, the command inbox, the projection's checkpoint
//! and the `balances` read model all live in the schema `bank` of that
//! database (created on first run). Anything else is the path of a SQLite
//! file.
//!
//! It executes a script of commands, each with a command id derived from its
//! name, so running the example again changes nothing: every command is
//! recognised as already executed (the command inbox). It shows a rejected
//! command, an explicit retry of the same command, prints the stored
//! streams, and brings the `balances` read model up to date with a
//! projection whose rows commit together with its checkpoint.

use std::str::FromStr;

use aftermath::prelude::*;
use aftermath::projection::{ProjectionRunner, ReadModelDb};
use aftermath::store::postgres::sqlx_postgres::PgConnectOptions;
use aftermath::store::read_all_pages;
use aftermath::{PostgresOptions, PostgresStore, StoreError};
use aftermath_examples::bank::{Account, AccountCommand, Balances, PgBalances};
use futures::TryStreamExt;
use uuid::Uuid;

/// Namespace for the example's deterministic command ids.
const COMMANDS: Uuid = Uuid::from_u128(0x6166_7465_726d_6174_6800_0000_0000_0001);

/// The PostgreSQL schema of the example's store and read model.
const PG_SCHEMA: &str = "bank";

fn command_id(name: &str) -> Uuid {
    Uuid::new_v5(&COMMANDS, name.as_bytes())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "bank.db".to_owned());
    if target.starts_with("postgres://") || target.starts_with("postgresql://") {
        let store =
            PostgresStore::connect_with(&target, PostgresOptions::default().schema(PG_SCHEMA))
                .await?;
        println!(
            "event store: {} (PostgreSQL, schema {PG_SCHEMA})\n",
            without_password(&target)
        );
        commands(&store).await?;
        project_postgres(&store).await?;
    } else {
        let store = SqliteStore::open(&target).await?;
        println!("event store: {target} (SQLite, WAL)\n");
        commands(&store).await?;
        project_sqlite(&store).await?;
    }
    println!("\nRun me again: every command is recognised by its id, nothing is appended twice,");
    println!("and the projection continues from its checkpoint.");
    Ok(())
}

/// The URL without its password, to print.
fn without_password(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!(
            "postgres://{}@{}:{}/{}",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_default()
        ),
        Err(_) => "PostgreSQL".to_owned(),
    }
}

/// The command script, a retried command, the streams and `$all`: the same
/// on every store.
async fn commands<S: EventStore + Clone>(store: &S) -> Result<(), Box<dyn std::error::Error>> {
    let accounts = Repository::<Account, _>::new(store.clone()).with_snapshots(100);
    let script = [
        (
            "ann",
            "open ann",
            AccountCommand::Open {
                owner: "Ann".into(),
            },
        ),
        (
            "ann",
            "salary ann",
            AccountCommand::Deposit { amount: 250_000 },
        ),
        (
            "bob",
            "open bob",
            AccountCommand::Open {
                owner: "Bob".into(),
            },
        ),
        ("bob", "gift bob", AccountCommand::Deposit { amount: 5_000 }),
        (
            "ann",
            "rent ann",
            AccountCommand::Withdraw { amount: 90_000 },
        ),
        // Bob cannot pay 9,000 from 5,000: decide refuses, nothing is stored.
        (
            "bob",
            "bike bob",
            AccountCommand::Withdraw { amount: 9_000 },
        ),
        // Carol never opened an account.
        (
            "carol",
            "coffee carol",
            AccountCommand::Deposit { amount: 300 },
        ),
    ];
    println!("== commands");
    // ANCHOR: execute
    for (account, name, command) in script {
        let meta = CommandMeta::with_id(command_id(name));
        match accounts.execute_with(account, command, meta).await {
            Ok(done) if done.duplicate => println!(
                "  {name:<14} already executed: version {}, nothing changed (idempotent)",
                done.version
            ),
            Ok(done) => println!(
                "  {name:<14} decided {:?} -> version {}, balance {}",
                done.events, done.version, done.state.balance
            ),
            Err(ExecuteError::Rejected(reason)) => println!("  {name:<14} rejected: {reason}"),
            Err(e) => return Err(e.into()),
        }
    }
    // ANCHOR_END: execute

    println!("\n== a client retries after a timeout (same command id)");
    let retry = accounts
        .execute_with(
            "ann",
            AccountCommand::Deposit { amount: 250_000 },
            CommandMeta::with_id(command_id("salary ann")),
        )
        .await?;
    println!(
        "  salary ann     duplicate = {}, version {}, balance still {}",
        retry.duplicate, retry.version, retry.state.balance
    );

    println!("\n== streams");
    for account in ["ann", "bob", "carol"] {
        let loaded = accounts.load(account).await?;
        println!(
            "  {}: version {}, owner {:?}, balance {}",
            Account::stream_name(account),
            loaded.version,
            loaded.state.owner,
            loaded.state.balance
        );
    }

    println!("\n== $all (global order)");
    let mut all = std::pin::pin!(read_all_pages(store, Position::ORIGIN, None, 256));
    while let Some(event) = all.try_next().await? {
        println!(
            "  #{:<3} {:<12} v{:<2} {:<10} {}",
            event.position,
            event.stream,
            event.version,
            event.event_type,
            String::from_utf8_lossy(&event.payload)
        );
    }
    Ok(())
}

/// Where the projection starts this run.
async fn report_checkpoint<D: ReadModelDb>(db: &D) -> Result<(), StoreError> {
    match db.load_state("balances").await? {
        Some(state) => println!("  resuming after checkpoint {}", state.position),
        None => println!("  first run: projecting from the start of the log"),
    }
    Ok(())
}

fn print_balances(rows: Vec<(String, String, i64, i64)>) {
    for (account, owner, balance, movements) in rows {
        println!("  {account:<6} {owner:<5} balance {balance:>7}  ({movements} movements)");
    }
}

/// The `balances` read model in the SQLite file, beside the events.
async fn project_sqlite(store: &SqliteStore) -> Result<(), Box<dyn std::error::Error>> {
    println!("\n== read model `balances` (a projection in the same file)");
    report_checkpoint(store).await?;
    // ANCHOR: catch_up
    let runner = ProjectionRunner::new(Balances, store.clone(), store.clone());
    let reached = runner.catch_up().await?;
    // ANCHOR_END: catch_up
    println!("  caught up through position {reached}");
    let rows = store
        .read(|conn| Balances::rows(conn).map_err(|e| StoreError::database("reading balances", e)))
        .await?;
    print_balances(rows);
    Ok(())
}

/// The `balances` read model in the store's PostgreSQL schema, written in
/// the same transactions as the projection's checkpoint.
async fn project_postgres(store: &PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
    println!("\n== read model `balances` (a projection in the same database, schema {PG_SCHEMA})");
    report_checkpoint(store).await?;
    let balances = PgBalances::in_schema(PG_SCHEMA);
    let runner = ProjectionRunner::new(balances, store.clone(), store.clone());
    let reached = runner.catch_up().await?;
    println!("  caught up through position {reached}");
    let rows = runner.projection().rows(store.pool()).await?;
    print_balances(rows);
    Ok(())
}
