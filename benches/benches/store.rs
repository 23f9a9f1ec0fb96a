//! Criterion benchmarks of the event store and the repository.
//!
//! `cargo bench -p aftermath-benches --bench store` (a couple of minutes):
//!
//! - `sqlite_append_1` / `sqlite_append_100`: appends of 1 and 100 events per
//!   batch through `SqliteStore`, beside the plain-rusqlite baseline on the
//!   same file (`aftermath_benches::raw`);
//! - `memory_append`: the same batches into `MemoryStore`;
//! - `execute_fresh`: `Repository::execute` opening a new account (SQLite,
//!   memory);
//! - `execute_10000_events`: a command on an account with 10,000 events,
//!   without snapshots and with snapshots every 100 events.
//!
//! The memory benchmarks time each call and start a new store every 100,000
//! events (outside the timed part), so the ever-growing in-memory log
//! neither dominates the numbers nor exhausts the machine's memory.

use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use aftermath::{EventStore, ExpectedVersion, MemoryStore, Repository, SqliteOptions, SqliteStore};
use aftermath_benches::domain::{Account, AccountCommand};
use aftermath_benches::raw::RawStore;
use aftermath_benches::{TempDb, deposits, seed_account};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Opens a fresh SQLite store with default options in `temp`.
fn open_sqlite(rt: &Runtime, temp: &TempDb) -> SqliteStore {
    rt.block_on(SqliteStore::open(temp.path()))
        .expect("open a SQLite store")
}

fn sqlite_append(c: &mut Criterion) {
    let rt = runtime();
    for batch in [1usize, 100] {
        let temp = TempDb::new("append");
        let store = open_sqlite(&rt, &temp);
        let synchronous = SqliteOptions::default().get_synchronous();
        let mut raw = RawStore::open(temp.path(), synchronous).expect("open the raw connection");

        let mut group = c.benchmark_group(format!("sqlite_append_{batch}"));
        group.throughput(Throughput::Elements(batch as u64));
        let store_ref = &store;
        group.bench_function("aftermath", |b| {
            b.to_async(&rt).iter_batched(
                || deposits(batch),
                |events| async move {
                    store_ref
                        .append("bench-aftermath", ExpectedVersion::Any, events)
                        .await
                        .expect("append")
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_function("raw_rusqlite", |b| {
            b.iter_batched(
                || deposits(batch),
                |events| {
                    raw.append("bench-raw", ExpectedVersion::Any, &events)
                        .expect("raw append")
                },
                BatchSize::SmallInput,
            )
        });
        group.finish();
        drop(raw);
        drop(store);
    }
}

/// The memory store keeps everything: each measurement starts a new store
/// after this many events, outside the timed part, so the log stays small.
const MEMORY_STORE_EVENTS: u64 = 100_000;

fn memory_append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("memory_append");
    for batch in [1usize, 100] {
        let per_store = MEMORY_STORE_EVENTS / batch as u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("{batch}_per_batch"), |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut store = MemoryStore::new();
                let mut timed = Duration::ZERO;
                for i in 0..iters {
                    if i > 0 && i % per_store == 0 {
                        store = MemoryStore::new();
                    }
                    let events = deposits(batch);
                    let began = Instant::now();
                    let done = store
                        .append("bench-memory", ExpectedVersion::Any, events)
                        .await;
                    timed += began.elapsed();
                    black_box(done).expect("append");
                }
                timed
            })
        });
    }
    group.finish();
}

fn execute_fresh(c: &mut Criterion) {
    let rt = runtime();
    let temp = TempDb::new("execute-fresh");
    let sqlite = Repository::<Account, _>::new(open_sqlite(&rt, &temp));
    let next = Cell::new(0u64);
    let fresh_id = || {
        next.set(next.get() + 1);
        format!("fresh-{}", next.get())
    };

    let mut group = c.benchmark_group("execute_fresh");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sqlite", |b| {
        b.to_async(&rt).iter(|| {
            let id = fresh_id();
            let repo = &sqlite;
            async move {
                let owner = id.clone();
                black_box(repo.execute(&id, AccountCommand::Open { owner }).await).expect("execute")
            }
        })
    });
    group.bench_function("memory", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut memory = Repository::<Account, _>::new(MemoryStore::new());
            let mut timed = Duration::ZERO;
            for i in 0..iters {
                if i > 0 && i % MEMORY_STORE_EVENTS == 0 {
                    memory = Repository::new(MemoryStore::new());
                }
                let id = format!("fresh-{i}");
                let owner = id.clone();
                let began = Instant::now();
                let done = memory.execute(&id, AccountCommand::Open { owner }).await;
                timed += began.elapsed();
                black_box(done).expect("execute");
            }
            timed
        })
    });
    group.finish();
}

fn execute_long_stream(c: &mut Criterion) {
    const EVENTS: usize = 10_000;
    let rt = runtime();
    let temp = TempDb::new("execute-long");
    let store = open_sqlite(&rt, &temp);
    rt.block_on(async {
        seed_account(&store, "plain", EVENTS, false).await?;
        seed_account(&store, "snapshotted", EVENTS, true).await
    })
    .expect("seed the long streams");
    let plain = Repository::<Account, _>::new(store.clone());
    let snapshotted = Repository::<Account, _>::new(store.clone()).with_snapshots(100);

    let mut group = c.benchmark_group(format!("execute_{EVENTS}_events"));
    group.throughput(Throughput::Elements(1));
    for (name, repo, id) in [
        ("no_snapshots", &plain, "plain"),
        ("snapshots_every_100", &snapshotted, "snapshotted"),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async move {
                black_box(
                    repo.execute(id, AccountCommand::Deposit { amount: 1 })
                        .await,
                )
                .expect("execute")
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
}

criterion_group! {
    name = benches;
    config = config();
    targets = sqlite_append, memory_append, execute_fresh, execute_long_stream
}
criterion_main!(benches);
