//! Helper process for the reactor crash tests: runs the [`Notifier`] reactor
//! on a SQLite file against the HTTP effects service, so the test can
//! SIGKILL it at any moment. Prints one machine-readable line per fact.
//!
//! ```text
//! reactor_helper run <db> <service addr> <name> <concurrency> <batch>
//!     runs the reactor until caught up, restarting after store errors as a
//!     worker would                          -> "STARTED", then "CAUGHT_UP <checkpoint>"
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use aftermath::SqliteStore;
use aftermath::reactor::{ReactorOptions, ReactorRunner};
use aftermath_tests::reactors::Notifier;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or invalid: {args:?}"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode: String = arg(&args, 0, "mode");
    assert_eq!(mode, "run", "unknown mode `{mode}`");
    let db: String = arg(&args, 1, "database path");
    let addr: SocketAddr = arg(&args, 2, "service address");
    let name: String = arg(&args, 3, "reactor name");
    let concurrency: usize = arg(&args, 4, "concurrency");
    let batch: usize = arg(&args, 5, "batch");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let store = SqliteStore::open(&db).await.expect("open the store");
        let runner = ReactorRunner::new(
            Notifier::new(&name, addr).timeout(Duration::from_secs(1)),
            store.clone(),
            store.clone(),
            store,
        )
        .options(
            ReactorOptions::default()
                .concurrency(concurrency)
                .batch_size(batch)
                // Transient faults must not park anything in this test.
                .max_attempts(1000)
                .retry_delay(Duration::from_millis(2), Duration::from_millis(20)),
        );
        println!("STARTED");
        loop {
            match runner.catch_up().await {
                Ok(position) => {
                    println!("CAUGHT_UP {position}");
                    break;
                }
                Err(e) => {
                    eprintln!("run failed, restarting: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
}
