//! Helper process for the multi-process subscription tests. Prints one
//! machine-readable line per fact on stdout.
//!
//! ```text
//! sub_helper append  <db> <first> <count> <per_append> <accounts> <delay_ms>
//!     appends generated account events        -> "DONE <head>"
//! sub_helper worker  <db> <name> <owner> <ttl_ms> <batch> <apply_delay_us>
//!     runs the balances projection in a Worker with leases (owner `owner`)
//!     until a line "stop" (or EOF) on stdin   -> "STATE <kind>" on every change,
//!                                                "LIVE <position>" when caught up,
//!                                                "STOPPED <checkpoint>" after shutdown
//! sub_helper project <db> <name> <batch> <pause_every> <pause_us>
//!     catches the balances projection up once, sleeping `pause_us` in the
//!     apply of every `pause_every`-th position -> "CAUGHT_UP <position>"
//! sub_helper pgworker <url> <schema> <name> <owner> <ttl_ms> <batch> <apply_delay_us> <count> <first>
//!     PostgreSQL: runs the partitions of the PgBalances projection split in
//!     `count`, with leases in the store (owner `owner`): at once the ones in
//!     `first` (comma-separated indices), the others after a line "others"
//!     on stdin; until a line "stop" (or EOF) -> "STATE <key> <kind>" on
//!     every change, "LIVE <key> <position>" when caught up, "STOPPED"
//!     after shutdown
//! sub_helper pgproject <url> <schema> <name> <tag> <batch>
//!     PostgreSQL, no leases: catches the PgBalances projection `name`
//!     (rows tagged `tag`) up once            -> "CAUGHT_UP <position>"
//! ```

use std::io::BufRead;
use std::time::Duration;

use aftermath::projection::{ProjectionOptions, ProjectionRunner, ReadModelDb};
use aftermath::worker::{Backoff, RunningWorker, SubscriberState, Worker};
use aftermath::{SqliteStore, StoreError};
use aftermath_tests::postgres::PgBalances;
use aftermath_tests::projections::{Balances, append_accounts};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or invalid: {args:?}"))
}

fn kind(state: &SubscriberState) -> &'static str {
    match state {
        SubscriberState::Starting => "Starting",
        SubscriberState::Standby => "Standby",
        SubscriberState::CatchingUp => "CatchingUp",
        SubscriberState::Live => "Live",
        SubscriberState::Retrying { .. } => "Retrying",
        SubscriberState::Stopped(None) => "Stopped",
        SubscriberState::Stopped(Some(_)) => "Failed",
    }
}

/// The `pgworker` mode (see the module docs).
async fn pg_worker(args: &[String]) -> Result<(), StoreError> {
    let url: String = arg(args, 1, "url");
    let schema: String = arg(args, 2, "schema");
    let name: String = arg(args, 3, "name");
    let owner: String = arg(args, 4, "owner");
    let ttl = Duration::from_millis(arg(args, 5, "ttl_ms"));
    let batch: usize = arg(args, 6, "batch");
    let delay = Duration::from_micros(arg(args, 7, "apply_delay_us"));
    let count: u32 = arg(args, 8, "count");
    let first: String = arg(args, 9, "first");
    let first: Vec<u32> = first
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("a partition index"))
        .collect();
    let store = aftermath_tests::postgres::connect(&url, &schema).await;
    let worker = |indices: Vec<u32>| {
        let mut worker = Worker::new()
            .owner(owner.clone())
            .with_leases(store.clone(), ttl)
            .backoff(Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(500),
            });
        for index in indices {
            let projection = PgBalances::new(&schema, &name, &owner).delay(delay);
            worker = worker.add_subscriber(
                ProjectionRunner::new(projection, store.clone(), store.clone())
                    .options(
                        ProjectionOptions::default()
                            .batch_size(batch)
                            .poll_interval(Duration::from_millis(50)),
                    )
                    .partition(index, count),
            );
        }
        worker.start().expect("unique subscriber names")
    };
    let others: Vec<u32> = (0..count).filter(|i| !first.contains(i)).collect();
    let mut workers: Vec<RunningWorker> = vec![worker(first)];
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    let mut others = Some(others);
    let mut last: std::collections::HashMap<String, (&'static str, Option<aftermath::Position>)> =
        Default::default();
    loop {
        for worker in &workers {
            for status in worker.status() {
                let now = kind(&status.state);
                let seen = last.entry(status.name.clone()).or_insert(("", None));
                if seen.0 != now {
                    println!("STATE {} {now}", status.name);
                    if let SubscriberState::Retrying { error, .. }
                    | SubscriberState::Stopped(Some(error)) = &status.state
                    {
                        eprintln!("{} {now}: {error}", status.name);
                    }
                    seen.0 = now;
                }
                if status.state == SubscriberState::Live
                    && status.lag.events == 0
                    && seen.1 != Some(status.lag.position)
                {
                    println!("LIVE {} {}", status.name, status.lag.position);
                    seen.1 = Some(status.lag.position);
                }
            }
        }
        tokio::select! {
            line = lines.recv() => match line.as_deref() {
                Some("others") => {
                    if let Some(others) = others.take() {
                        workers.push(worker(others));
                    }
                }
                Some("stop") | None => break,
                Some(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    for worker in workers {
        worker.shutdown().await;
    }
    println!("STOPPED");
    Ok(())
}

fn main() -> Result<(), StoreError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mode: String = arg(&args, 0, "mode");
    if mode == "pgworker" {
        return runtime.block_on(pg_worker(&args));
    }
    if mode == "pgproject" {
        return runtime.block_on(async {
            let url: String = arg(&args, 1, "url");
            let schema: String = arg(&args, 2, "schema");
            let name: String = arg(&args, 3, "name");
            let tag: String = arg(&args, 4, "tag");
            let batch: usize = arg(&args, 5, "batch");
            let store = aftermath_tests::postgres::connect(&url, &schema).await;
            let runner =
                ProjectionRunner::new(PgBalances::new(&schema, &name, &tag), store.clone(), store)
                    .options(ProjectionOptions::default().batch_size(batch));
            match runner.catch_up().await {
                Ok(position) => println!("CAUGHT_UP {position}"),
                Err(e) => {
                    println!("ERROR {e}");
                    std::process::exit(2);
                }
            }
            Ok(())
        });
    }
    let db: String = arg(&args, 1, "database path");
    runtime.block_on(async move {
        let store = SqliteStore::open(&db).await?;
        match mode.as_str() {
            "append" => {
                let first: u64 = arg(&args, 2, "first");
                let count: u64 = arg(&args, 3, "count");
                let per_append: u64 = arg(&args, 4, "per_append");
                let accounts: u64 = arg(&args, 5, "accounts");
                let delay = Duration::from_millis(arg(&args, 6, "delay_ms"));
                let mut head = aftermath::Position::ORIGIN;
                let mut k = first;
                while k < first + count {
                    let n = per_append.min(first + count - k);
                    head = append_accounts(&store, k, n, per_append, accounts).await;
                    k += n;
                    tokio::time::sleep(delay).await;
                }
                println!("DONE {head}");
            }
            "worker" => {
                let name: String = arg(&args, 2, "name");
                let owner: String = arg(&args, 3, "owner");
                let ttl = Duration::from_millis(arg(&args, 4, "ttl_ms"));
                let batch: usize = arg(&args, 5, "batch");
                let delay = Duration::from_micros(arg(&args, 6, "apply_delay_us"));
                let projection = Balances::new(&name, &owner).hook(move |_| {
                    if !delay.is_zero() {
                        std::thread::sleep(delay);
                    }
                    Ok(())
                });
                let runner = ProjectionRunner::new(projection, store.clone(), store.clone())
                    .options(
                        ProjectionOptions::default()
                            .batch_size(batch)
                            .poll_interval(Duration::from_millis(50)),
                    );
                let worker = Worker::new()
                    .owner(owner)
                    .with_leases(store.clone(), ttl)
                    .backoff(Backoff {
                        initial: Duration::from_millis(50),
                        max: Duration::from_millis(500),
                    })
                    .add_subscriber(runner)
                    .start()
                    .expect("unique subscriber names");
                let mut stop_rx = aftermath_tests::child::stop_on_stdin();
                let mut last_kind = "";
                let mut last_live = None;
                loop {
                    let status = worker.status_of(&name).expect("the subscriber's status");
                    let now = kind(&status.state);
                    if now != last_kind {
                        println!("STATE {now}");
                        last_kind = now;
                    }
                    if status.state == SubscriberState::Live
                        && status.lag.events == 0
                        && last_live != Some(status.lag.position)
                    {
                        println!("LIVE {}", status.lag.position);
                        last_live = Some(status.lag.position);
                    }
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                    }
                }
                worker.shutdown().await;
                let checkpoint = match ReadModelDb::load_state(&store, &name).await? {
                    Some(state) => state.position.to_string(),
                    None => "none".to_owned(),
                };
                println!("STOPPED {checkpoint}");
            }
            "project" => {
                let name: String = arg(&args, 2, "name");
                let batch: usize = arg(&args, 3, "batch");
                let pause_every: u64 = arg(&args, 4, "pause_every");
                let pause = Duration::from_micros(arg(&args, 5, "pause_us"));
                let projection = Balances::new(&name, "project").hook(move |event| {
                    if pause_every > 0 && event.position.0 % pause_every == 0 {
                        std::thread::sleep(pause);
                    }
                    Ok(())
                });
                let runner = ProjectionRunner::new(projection, store.clone(), store)
                    .options(ProjectionOptions::default().batch_size(batch));
                match runner.catch_up().await {
                    Ok(position) => println!("CAUGHT_UP {position}"),
                    Err(e) => {
                        println!("ERROR {e}");
                        std::process::exit(2);
                    }
                }
            }
            other => panic!("unknown mode `{other}`"),
        }
        Ok(())
    })
}
