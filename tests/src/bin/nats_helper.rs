//! Helper process for the NATS tests: runs an outbox or an inbox in a
//! [`Worker`] on a SQLite file, so the test can SIGKILL it at any moment (or
//! let it crash on purpose). Stops gracefully when its stdin closes. Prints
//! one machine-readable line per fact.
//!
//! ```text
//! nats_helper outbox <db> <nats url> <subject prefix> <reactor name> <concurrency> <batch>
//!     publishes every account event through a NatsOutbox   -> "STARTED", "STOPPED"
//! nats_helper inbox <db> <nats url> <stream> <consumer> <abort after append n | 0>
//!     executes command messages through a NatsInbox; with n > 0 the process
//!     aborts right after its nth append commits, before the ack
//!                                   -> "STARTED", "ABORT_AFTER_APPEND <stream> <version>", "STOPPED"
//! ```

use std::io::Read;
use std::time::Duration;

use aftermath::nats::{NatsInbox, NatsOutbox};
use aftermath::reactor::{ReactorOptions, ReactorRunner};
use aftermath::worker::{Backoff, Worker};
use aftermath::{Repository, SqliteStore};
use aftermath_tests::domain::Account;
use aftermath_tests::nats::{
    AfterCommit, LoseReplies, connect_patiently, jetstream, map_message, subject_of,
};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or invalid: {args:?}"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode: String = arg(&args, 0, "mode");
    let db: String = arg(&args, 1, "database path");
    let url: String = arg(&args, 2, "NATS url");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let store = SqliteStore::open(&db).await.expect("open the store");
        let client = connect_patiently(&url).await;
        let js = jetstream(client, Duration::from_secs(2));
        let worker = Worker::new().backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        });
        let worker = match mode.as_str() {
            "outbox" => {
                let prefix: String = arg(&args, 3, "subject prefix");
                let name: String = arg(&args, 4, "reactor name");
                let concurrency: usize = arg(&args, 5, "concurrency");
                let batch: usize = arg(&args, 6, "batch");
                let outbox = NatsOutbox::new(name, js, move |e| Some(subject_of(&prefix, e)))
                    .ack_timeout(Duration::from_secs(2));
                let runner = ReactorRunner::new(outbox, store.clone(), store.clone(), store)
                    .options(
                        ReactorOptions::default()
                            .concurrency(concurrency)
                            .batch_size(batch)
                            .poll_interval(Duration::from_millis(20))
                            // A server restart must not park anything.
                            .max_attempts(100_000)
                            .retry_delay(Duration::from_millis(5), Duration::from_millis(200)),
                    );
                worker.add_subscriber(runner)
            }
            "inbox" => {
                let stream: String = arg(&args, 3, "stream");
                let consumer: String = arg(&args, 4, "consumer");
                let abort_after: u64 = arg(&args, 5, "abort after append n");
                let consumer = js
                    .get_stream(&stream)
                    .await
                    .expect("get the stream")
                    .get_consumer(&consumer)
                    .await
                    .expect("get the consumer");
                let lossy = LoseReplies::new(store.clone(), [abort_after], AfterCommit::Abort);
                let inbox = NatsInbox::new(
                    "commands",
                    consumer,
                    Repository::<Account, _>::new(lossy),
                    store,
                    map_message,
                );
                worker.add_subscriber(inbox)
            }
            other => panic!("unknown mode `{other}`"),
        };
        let running = worker.start().expect("unique subscriber names");
        println!("STARTED");
        // Until stdin closes.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
        running.shutdown().await;
        println!("STOPPED");
    });
}
