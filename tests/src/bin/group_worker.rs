//! Helper process for the consumer-group tests (`tests/groups_multiprocess.rs`):
//! ONE worker with leases running three subscribers split into 16
//! partitions each, as a member of their consumer groups: the
//! [`PgGroupBalances`]/[`SqliteGroupBalances`] projection (`gbal`), the
//! [`GroupEffects`] reactor (`gfx`) and the [`Reserve`] saga (`reserve`).
//! Prints one machine-readable line per fact on stdout.
//!
//! ```text
//! group_worker pg     <url> <schema> <tag> <ttl_ms>
//! group_worker sqlite <db file>      <tag> <ttl_ms>
//!     runs until a line "stop" (or EOF) on stdin
//!         -> "STARTED <tag> <instance>",
//!            "RUNNING gbal=<n> gfx=<n> reserve=<n>" when the number of
//!            partitions running here changes,
//!            "FAILED <subscriber> <error>" when one stops with an error,
//!            "STOPPED" after a graceful shutdown
//! ```

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aftermath::process::{ProcessOptions, ProcessRunner};
use aftermath::projection::{Projection, ProjectionOptions, ProjectionRunner};
use aftermath::reactor::{ReactorOptions, ReactorRunner};
use aftermath::worker::{Backend, Backoff, Partitioned, RunningWorker, SubscriberState, Worker};
use aftermath::{PostgresOptions, PostgresStore, SqliteStore};
use aftermath_tests::groups::{
    Applier, COUNT, EffectsDb, GroupEffects, PROJECTION, PgGroupBalances, REACTOR, Reserve,
    SqliteGroupBalances, command_bus,
};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or invalid: {args:?}"))
}

fn projection_options() -> ProjectionOptions {
    ProjectionOptions::default()
        .batch_size(100)
        .poll_interval(Duration::from_millis(50))
}

fn reactor_options() -> ReactorOptions {
    ReactorOptions::default()
        .concurrency(8)
        .batch_size(100)
        .max_attempts(1000)
        .retry_delay(Duration::from_millis(5), Duration::from_millis(200))
        .poll_interval(Duration::from_millis(50))
}

fn process_options() -> ProcessOptions {
    ProcessOptions::default()
        .concurrency(8)
        .batch_size(100)
        .poll_interval(Duration::from_millis(50))
        .deadline_poll(Duration::from_millis(200))
}

/// The worker: leases with `ttl`, a short standby poll and backoff.
fn worker(tag: &str, ttl: Duration, leases: impl aftermath::subscription::LeaseStore) -> Worker {
    Worker::new()
        .owner(tag)
        .with_leases(leases, ttl)
        .standby_poll(Duration::from_millis(100))
        .backoff(Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        })
}

fn pg_worker(store: PostgresStore, tag: &str, ttl: Duration, who: &Applier) -> Worker {
    let schema = store.schema().to_owned();
    let db = EffectsDb::Pg(store.clone());
    on(store, tag, ttl, db, |key| {
        PgGroupBalances::new(&schema, key, who.clone())
    })
}

fn sqlite_worker(store: SqliteStore, tag: &str, ttl: Duration, who: &Applier) -> Worker {
    let db = EffectsDb::Sqlite(store.clone());
    on(store, tag, ttl, db, |key| {
        SqliteGroupBalances::new(key, who.clone())
    })
}

/// The worker on `store`: the projection made by `projection(partition
/// key)`, the reactor writing its effects to `db`, and the saga, each in
/// `COUNT` partitions.
fn on<S: Backend, P: Projection<Db = S>>(
    store: S,
    tag: &str,
    ttl: Duration,
    db: EffectsDb,
    projection: impl Fn(&str) -> P,
) -> Worker {
    let s = store.clone();
    let projection = Partitioned::new(PROJECTION, COUNT, |p| {
        ProjectionRunner::new(projection(&p.key(PROJECTION)), s.clone(), s.clone())
            .options(projection_options())
            .partition(p.index, p.count)
    });
    let effects = GroupEffects {
        db,
        tag: tag.to_owned(),
    };
    let reactor = Partitioned::new(REACTOR, COUNT, |p| {
        ReactorRunner::new(effects.clone(), s.clone(), s.clone(), s.clone())
            .options(reactor_options())
            .partition(p.index, p.count)
    });
    let bus = command_bus(&store);
    let saga = Partitioned::new(
        <Reserve as aftermath::process::ProcessManager>::NAME,
        COUNT,
        |p| {
            ProcessRunner::new(Reserve, s.clone(), bus.clone(), s.clone(), s.clone())
                .options(process_options())
                .partition(p.index, p.count)
        },
    );
    worker(tag, ttl, store)
        .add_partitioned(projection)
        .add_partitioned(reactor)
        .add_partitioned(saga)
}

/// Reports changes until a line "stop" (or EOF) on stdin.
async fn report(worker: &RunningWorker) {
    let mut stop_rx = aftermath_tests::child::stop_on_stdin();
    let mut last_running = String::new();
    let mut failed = std::collections::HashSet::new();
    let mut retrying = std::collections::HashSet::new();
    loop {
        let mut running = [0usize; 3];
        for status in worker.status() {
            let group = ["gbal#", "gfx#", "reserve#"]
                .iter()
                .position(|g| status.name.starts_with(g))
                .expect("one of the three subscribers");
            match &status.state {
                SubscriberState::Live | SubscriberState::CatchingUp => running[group] += 1,
                SubscriberState::Retrying { error, .. }
                    if retrying.insert((status.name.clone(), error.clone())) =>
                {
                    eprintln!("group_worker: {} retrying: {error}", status.name);
                }
                SubscriberState::Stopped(Some(error)) if failed.insert(status.name.clone()) => {
                    println!("FAILED {} {}", status.name, error.replace('\n', " "));
                }
                _ => {}
            }
        }
        let line = format!(
            "RUNNING gbal={} gfx={} reserve={}",
            running[0], running[1], running[2]
        );
        if line != last_running {
            println!("{line}");
            last_running = line;
        }
        tokio::select! {
            _ = &mut stop_rx => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode: String = arg(&args, 0, "mode");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let who = Applier {
            tag: String::new(),
            instance: Arc::new(OnceLock::new()),
        };
        let (worker, who) = match mode.as_str() {
            "pg" => {
                let url: String = arg(&args, 1, "url");
                let schema: String = arg(&args, 2, "schema");
                let tag: String = arg(&args, 3, "tag");
                let ttl = Duration::from_millis(arg(&args, 4, "ttl_ms"));
                let store = PostgresStore::connect_with(
                    &url,
                    PostgresOptions::default()
                        .schema(&schema)
                        .max_connections(10)
                        .poll_interval(Duration::from_millis(50)),
                )
                .await
                .expect("connect to PostgreSQL");
                let who = Applier {
                    tag: tag.clone(),
                    ..who
                };
                (pg_worker(store, &tag, ttl, &who), who)
            }
            "sqlite" => {
                let db: String = arg(&args, 1, "database path");
                let tag: String = arg(&args, 2, "tag");
                let ttl = Duration::from_millis(arg(&args, 3, "ttl_ms"));
                let store = SqliteStore::open(&db).await.expect("open the store");
                let who = Applier {
                    tag: tag.clone(),
                    ..who
                };
                (sqlite_worker(store, &tag, ttl, &who), who)
            }
            other => panic!("unknown mode `{other}`"),
        };
        let worker = worker.start().expect("unique subscriber names");
        who.instance
            .set(worker.instance().to_owned())
            .expect("set once");
        println!("STARTED {} {}", who.tag, worker.instance());
        report(&worker).await;
        worker.shutdown().await;
        println!("STOPPED");
    });
}
