//! Helper process for the saga crash test (`tests/process_crash.rs`): runs
//! the order fulfillment saga and a fake carrier on a SQLite file in a
//! [`Worker`] with leases, so the test can SIGKILL it at any moment and
//! start it again. Prints one machine-readable line per fact on stdout.
//!
//! ```text
//! saga_helper run <db> <epoch_ms> <speed> <concurrency> <ttl_ms>
//!     runs the `Fulfillment` process runner and the `carrier` reactor until
//!     a line "stop" (or EOF) on stdin     -> "STARTED",
//!                                            "STATE <subscriber> <kind>" on every change,
//!                                            "FAILED <subscriber> <error>" when one stops
//!                                            with an error,
//!                                            "STOPPED" after a graceful shutdown
//! ```
//!
//! Time: the saga sees a virtual clock, `epoch + (wall time - epoch) × speed`
//! (epoch in Unix milliseconds, given by the test), so it moves on while no
//! helper runs and never goes back across restarts; with a speed of 60,000
//! the saga's 48 h shipping deadline passes in under 3 s.
//!
//! The carrier: for every `shipping.Requested` whose address is not
//! `"unreachable"` the `carrier` reactor executes `Shipping::Confirm` with a
//! command id derived from the shipping stream ([`carrier_command_id`]), so a
//! repeated confirmation (after a crash between the append and the journal
//! write) is absorbed by the aggregate's command inbox.

use std::time::Duration;

use aftermath::process::{Clock, ProcessOptions, ProcessRunner};
use aftermath::reactor::{EffectContext, ReactError, Reactor, ReactorOptions, ReactorRunner};
use aftermath::worker::{Backoff, SubscriberState, Worker};
use aftermath::{CommandMeta, ExecuteError, Recorded, Repository, SqliteStore};
use aftermath_examples::fulfillment::{
    Fulfillment, Shipping, ShippingCommand, ShippingEvent, command_bus,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or invalid: {args:?}"))
}

/// `epoch + (now - epoch) × speed`: monotonic across restarts of the helper,
/// as long as every run is given the same epoch.
struct FastClock {
    epoch: DateTime<Utc>,
    speed: i64,
}

impl Clock for FastClock {
    fn now(&self) -> DateTime<Utc> {
        let real = (Utc::now() - self.epoch)
            .num_microseconds()
            .expect("the test runs for minutes, not centuries");
        self.epoch + chrono::Duration::microseconds(real.saturating_mul(self.speed))
    }
}

/// The command id of the carrier's confirmation of shipping stream `stream`
/// (the test derives it the same way).
fn carrier_command_id(stream: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("carrier-confirm:{stream}").as_bytes(),
    )
}

/// The fake carrier: picks up every parcel it can reach, and says so by
/// executing `Shipping::Confirm` (its webhook).
struct CarrierWebhook {
    shipping: Repository<Shipping, SqliteStore>,
}

#[async_trait::async_trait]
impl Reactor for CarrierWebhook {
    type Event = ShippingEvent;

    fn name(&self) -> &str {
        "carrier"
    }

    async fn react(
        &self,
        event: &Recorded<ShippingEvent>,
        _ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let ShippingEvent::Requested { order, address } = &event.event else {
            return Ok(());
        };
        if address == "unreachable" {
            return Ok(());
        }
        let meta = CommandMeta::with_id(carrier_command_id(&event.stream))
            .correlation(event.metadata.correlation_id)
            .causation(event.id);
        match self
            .shipping
            .execute_with(order, ShippingCommand::Confirm, meta)
            .await
        {
            Ok(_) => Ok(()),
            // The saga called the pickup off first (its deadline passed):
            // the carrier's answer is "too late", which is an answer too.
            Err(ExecuteError::Rejected(_)) => Ok(()),
            Err(e) => Err(ReactError::retry(e)),
        }
    }
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode: String = arg(&args, 0, "mode");
    assert_eq!(mode, "run", "unknown mode `{mode}`");
    let db: String = arg(&args, 1, "database path");
    let epoch_ms: i64 = arg(&args, 2, "epoch_ms");
    let speed: i64 = arg(&args, 3, "speed");
    let concurrency: usize = arg(&args, 4, "concurrency");
    let ttl = Duration::from_millis(arg(&args, 5, "ttl_ms"));
    let epoch = DateTime::<Utc>::from_timestamp_millis(epoch_ms).expect("epoch in range");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let store = SqliteStore::open(&db).await.expect("open the store");
        let saga = ProcessRunner::new(
            Fulfillment,
            store.clone(),
            command_bus(&store),
            store.clone(),
            store.clone(),
        )
        .options(
            ProcessOptions::default()
                .concurrency(concurrency)
                .deadline_poll(Duration::from_millis(25))
                .poll_interval(Duration::from_millis(25)),
        )
        .clock(FastClock { epoch, speed });
        let carrier = ReactorRunner::new(
            CarrierWebhook {
                shipping: Repository::new(store.clone()),
            },
            store.clone(),
            store.clone(),
            store.clone(),
        )
        .options(
            ReactorOptions::default()
                .concurrency(concurrency)
                .max_attempts(1000)
                .retry_delay(Duration::from_millis(5), Duration::from_millis(100))
                .poll_interval(Duration::from_millis(25)),
        );
        let worker = Worker::new()
            .with_leases(store.clone(), ttl)
            .backoff(Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(300),
            })
            .add_subscriber(saga)
            .add_subscriber(carrier)
            .start()
            .expect("unique subscriber names");
        println!("STARTED {}", worker.owner());
        let mut stop_rx = aftermath_tests::child::stop_on_stdin();
        let mut last: std::collections::HashMap<String, &'static str> = Default::default();
        loop {
            for status in worker.status() {
                let now = kind(&status.state);
                let seen = last.entry(status.name.clone()).or_insert("");
                if *seen != now {
                    println!("STATE {} {now}", status.name);
                    *seen = now;
                    match &status.state {
                        SubscriberState::Retrying { error, .. } => {
                            eprintln!("saga_helper: {} retrying: {error}", status.name)
                        }
                        SubscriberState::Stopped(Some(error)) => {
                            println!("FAILED {} {}", status.name, error.replace('\n', " "))
                        }
                        _ => {}
                    }
                }
            }
            tokio::select! {
                _ = &mut stop_rx => break,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        worker.shutdown().await;
        println!("STOPPED");
    });
}
