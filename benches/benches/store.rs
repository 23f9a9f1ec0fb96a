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
//!   without snapshots and with snapshots every 100 events;
//! - `sqlite_live_latency`: append-to-delivery of one event to a caught-up
//!   `CatchUp` reader on the writer's handle (`watch_head`) and on a second
//!   handle on the file (polling every 50 ms);
//! - `sqlite_catch_up_10000`: 10,000 events in pages of 1,000: the raw
//!   rusqlite read, `CatchUp` with a no-op handler, `ProjectionRunner` with a
//!   no-op and an upsert projection, and a hand-written rusqlite upsert
//!   projection;
//! - with `AFTERMATH_PG_URL` set (else they print SKIPPED), PostgreSQL
//!   beside plain sqlx on the same server (`aftermath_benches::raw_pg`):
//!   `pg_append_1` / `pg_append_100`, `pg_append_1_8_writers`,
//!   `pg_execute_fresh`, `pg_catch_up_10000`, and `pg_live_latency` (in
//!   process, and across processes by LISTEN/NOTIFY).
//!
//! The memory benchmarks time each call and start a new store every 100,000
//! events (outside the timed part), so the ever-growing in-memory log
//! neither dominates the numbers nor exhausts the machine's memory.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aftermath::projection::{ProjectionOptions, ProjectionRunner};
use aftermath::subscription::{CatchUp, SubscriptionOptions};
use aftermath::{
    EventData, EventStore, ExpectedVersion, MemoryStore, Position, PostgresOptions, PostgresStore,
    Repository, SqliteOptions, SqliteStore,
};
use aftermath_benches::domain::{Account, AccountCommand, fold_raw};
use aftermath_benches::live::{LiveOptions, RawWake, framework_latency, raw_pg_latency};
use aftermath_benches::projections::{NoOp, Totals};
use aftermath_benches::raw::RawStore;
use aftermath_benches::raw_pg::RawPg;
use aftermath_benches::{
    TempDb, bench_schema, deposits, drop_store_schema, pg_url, read_all_count, seed_account,
    store_event_count,
};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

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

/// Latency samples of one `iter_custom` call: `iters` samples, the sum of
/// their latencies.
fn latency_options(iters: u64, poll: Duration, max_gap: Duration) -> LiveOptions {
    LiveOptions {
        samples: iters as usize,
        warm_up: 1,
        max_gap,
        poll,
        timeout: Duration::from_secs(10),
    }
}

/// Never fires within a run: only `watch_head` (or NOTIFY) wakes readers.
const NO_POLL: Duration = Duration::from_secs(30);

fn sqlite_live_latency(c: &mut Criterion) {
    let rt = runtime();
    let temp = TempDb::new("live");
    let store = open_sqlite(&rt, &temp);
    let other = open_sqlite(&rt, &temp);
    let mut group = c.benchmark_group("sqlite_live_latency");
    group.bench_function("in_process", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let store = store.clone();
            async move {
                let options = latency_options(iters, NO_POLL, Duration::from_millis(2));
                framework_latency(&store, store.clone(), "live", &options)
                    .await
                    .expect("latency run")
                    .total()
            }
        })
    });
    group.bench_function("cross_process_poll_50ms", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (store, other) = (store.clone(), other.clone());
            async move {
                let poll = Duration::from_millis(50);
                let options = latency_options(iters, poll, poll);
                framework_latency(&store, other, "live", &options)
                    .await
                    .expect("latency run")
                    .total()
            }
        })
    });
    group.finish();
}

/// Events of the catch-up benchmarks.
const CATCH_UP_EVENTS: u64 = 10_000;

fn sqlite_catch_up(c: &mut Criterion) {
    let rt = runtime();
    let temp = TempDb::new("catch-up");
    let store = open_sqlite(&rt, &temp);
    rt.block_on(async {
        for i in 0..CATCH_UP_EVENTS / 1000 {
            seed_account(&store, &format!("c{i}"), 1000, false).await?;
        }
        Ok::<_, aftermath::StoreError>(())
    })
    .expect("seed the catch-up file");
    let synchronous = SqliteOptions::default().get_synchronous();
    let mut raw = RawStore::open(temp.path(), synchronous).expect("open the raw connection");
    let options = ProjectionOptions::default().batch_size(1000);
    let noop = ProjectionRunner::new(NoOp::new("bench_noop"), store.clone(), store.clone())
        .options(options.clone());
    let upsert = ProjectionRunner::new(Totals::new("bench_totals"), store.clone(), store.clone())
        .options(options);

    let mut group = c.benchmark_group(format!("sqlite_catch_up_{CATCH_UP_EVENTS}"));
    group.throughput(Throughput::Elements(CATCH_UP_EVENTS));
    group.bench_function("raw_read", |b| {
        b.iter(|| {
            raw.read_all_count(Position::ORIGIN, 1000, CATCH_UP_EVENTS)
                .expect("raw read")
        })
    });
    group.bench_function("catch_up_noop_handler", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            async move {
                let options = SubscriptionOptions::default().batch_size(1000);
                let mut reader = CatchUp::new(store, None, Position::ORIGIN, options);
                let mut n = 0;
                loop {
                    let page = reader.next_page().await.expect("a page");
                    n += black_box(&page.events).len();
                    reader.advance(page.through);
                    if page.caught_up {
                        break n;
                    }
                }
            }
        })
    });
    for (name, runner) in [
        ("runner_noop", &noop as &dyn Rebuild),
        ("runner_upsert", &upsert),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    runner.reset().await;
                    let began = Instant::now();
                    runner.run().await;
                    timed += began.elapsed();
                }
                timed
            })
        });
    }
    group.bench_function("raw_upsert", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                raw.connection()
                    .execute_batch("DROP TABLE IF EXISTS raw_totals")
                    .expect("drop the raw read model");
                let began = Instant::now();
                black_box(raw.project_totals("raw_totals", 1000, CATCH_UP_EVENTS))
                    .expect("raw projection");
                timed += began.elapsed();
            }
            timed
        })
    });
    group.finish();
}

/// A projection runner the catch-up benchmark can reset and run.
trait Rebuild: Sync {
    fn reset(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    fn run(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

impl<P> Rebuild for ProjectionRunner<P, SqliteStore>
where
    P: aftermath::projection::Projection<Db = SqliteStore>,
{
    fn reset(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move { self.rebuild(None).await.expect("rebuild") })
    }

    fn run(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.catch_up().await.expect("catch up");
        })
    }
}

/// The PostgreSQL store and the raw baseline, each in a fresh schema.
struct Pg {
    url: String,
    store: PostgresStore,
    raw: RawPg,
}

fn postgres(c: &mut Criterion) {
    let Some(url) = pg_url() else {
        eprintln!("SKIPPED PostgreSQL benchmarks: AFTERMATH_PG_URL is not set");
        return;
    };
    let rt = runtime();
    let pg = rt
        .block_on(async {
            let store = PostgresStore::connect_with(
                &url,
                PostgresOptions::default()
                    .schema(bench_schema("am"))
                    .max_connections(10),
            )
            .await?;
            let raw = RawPg::create(&url, &bench_schema("raw"), 10).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Pg {
                url: url.clone(),
                store,
                raw,
            })
        })
        .expect("connect to PostgreSQL");
    pg_append(c, &rt, &pg);
    pg_append_writers(c, &rt, &pg);
    pg_execute_fresh(c, &rt, &pg);
    pg_catch_up(c, &rt, &pg);
    pg_live_latency(c, &rt, &pg);
    rt.block_on(async {
        drop_store_schema(pg.store)
            .await
            .expect("drop the store's schema");
        pg.raw.drop_schema().await.expect("drop the raw schema");
    });
}

fn pg_append(c: &mut Criterion, rt: &Runtime, pg: &Pg) {
    for batch in [1usize, 100] {
        let mut group = c.benchmark_group(format!("pg_append_{batch}"));
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function("aftermath", |b| {
            b.to_async(rt).iter_batched(
                || deposits(batch),
                |events| async move {
                    pg.store
                        .append("bench-aftermath", ExpectedVersion::Any, events)
                        .await
                        .expect("append")
                },
                BatchSize::SmallInput,
            )
        });
        let version = Cell::new(0u64);
        let version = &version;
        group.bench_function("raw_sqlx", |b| {
            b.to_async(rt).iter_batched(
                || deposits(batch),
                |events| async move {
                    let done = pg
                        .raw
                        .append(
                            &format!("bench-raw-{batch}"),
                            ExpectedVersion::Exact(version.get()),
                            &events,
                        )
                        .await
                        .expect("raw append");
                    version.set(done);
                },
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }
}

/// Writers of `pg_append_1_8_writers`.
const WRITERS: u64 = 8;

fn pg_append_writers(c: &mut Criterion, rt: &Runtime, pg: &Pg) {
    let mut group = c.benchmark_group(format!("pg_append_1_{WRITERS}_writers"));
    group.throughput(Throughput::Elements(1));
    group.bench_function("aftermath", |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let began = Instant::now();
            let tasks: Vec<_> = (0..WRITERS)
                .map(|task| {
                    let store = pg.store.clone();
                    let n = iters.div_ceil(WRITERS);
                    tokio::spawn(async move {
                        let stream = format!("w{task}-{}", uuid::Uuid::now_v7().simple());
                        for _ in 0..n {
                            store
                                .append(&stream, ExpectedVersion::Any, deposits(1))
                                .await
                                .expect("append");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("a writer");
            }
            began.elapsed()
        })
    });
    group.bench_function("raw_sqlx", |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let began = Instant::now();
            let tasks: Vec<_> = (0..WRITERS)
                .map(|task| {
                    let raw = pg.raw.clone();
                    let n = iters.div_ceil(WRITERS);
                    tokio::spawn(async move {
                        let stream = format!("w{task}-{}", uuid::Uuid::now_v7().simple());
                        let mut version = 0;
                        for _ in 0..n {
                            version = raw
                                .append(&stream, ExpectedVersion::Exact(version), &deposits(1))
                                .await
                                .expect("raw append");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("a writer");
            }
            began.elapsed()
        })
    });
    group.finish();
}

fn pg_execute_fresh(c: &mut Criterion, rt: &Runtime, pg: &Pg) {
    let repo = Repository::<Account, _>::new(pg.store.clone());
    let next = Cell::new(0u64);
    let fresh_id = || {
        next.set(next.get() + 1);
        format!("fresh-{}-{}", std::process::id(), next.get())
    };
    let mut group = c.benchmark_group("pg_execute_fresh");
    group.throughput(Throughput::Elements(1));
    group.bench_function("aftermath", |b| {
        b.to_async(rt).iter(|| {
            let id = fresh_id();
            let repo = &repo;
            async move {
                let owner = id.clone();
                black_box(repo.execute(&id, AccountCommand::Open { owner }).await).expect("execute")
            }
        })
    });
    group.bench_function("raw_sqlx", |b| {
        b.to_async(rt).iter(|| {
            let stream = format!("account-{}", fresh_id());
            async move {
                let owner = stream.clone();
                pg.raw
                    .execute(&stream, |history| {
                        let state = fold_raw(history).expect("history decodes");
                        aftermath::Aggregate::decide(&state, AccountCommand::Open { owner })
                            .expect("opens")
                            .iter()
                            .map(|e| EventData::fresh(e).expect("encodes"))
                            .collect()
                    })
                    .await
                    .expect("raw execute")
            }
        })
    });
    group.finish();
}

fn pg_catch_up(c: &mut Criterion, rt: &Runtime, pg: &Pg) {
    rt.block_on(async {
        let mut have = store_event_count(&pg.store).await?;
        while have < CATCH_UP_EVENTS {
            pg.store
                .append("fill", ExpectedVersion::Any, deposits(1000))
                .await?;
            have += 1000;
        }
        let mut have = pg.raw.count().await?;
        let mut version = pg.raw.stream_version("fill").await?;
        while have < CATCH_UP_EVENTS {
            version = pg
                .raw
                .append("fill", ExpectedVersion::Exact(version), &deposits(1000))
                .await?;
            have += 1000;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .expect("seed the catch-up tables");
    let mut group = c.benchmark_group(format!("pg_catch_up_{CATCH_UP_EVENTS}"));
    group.throughput(Throughput::Elements(CATCH_UP_EVENTS));
    group.bench_function("aftermath", |b| {
        b.to_async(rt).iter(|| async {
            read_all_count(&pg.store, 1000, CATCH_UP_EVENTS)
                .await
                .expect("read")
        })
    });
    group.bench_function("raw_sqlx", |b| {
        b.to_async(rt).iter(|| async {
            pg.raw
                .read_all_count(1000, CATCH_UP_EVENTS)
                .await
                .expect("raw read")
        })
    });
    group.finish();
}

fn pg_live_latency(c: &mut Criterion, rt: &Runtime, pg: &Pg) {
    let (reader, raw_reader) = rt
        .block_on(async {
            let options = PostgresOptions::default()
                .schema(pg.store.schema())
                .max_connections(4)
                .poll_interval(NO_POLL);
            let reader = PostgresStore::connect_with(&pg.url, options).await?;
            let raw_reader = RawPg::connect(&pg.url, pg.raw.schema(), 4).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((reader, raw_reader))
        })
        .expect("connect the readers");
    let notify = Arc::new(Notify::new());
    let channel = format!("{}_events", pg.raw.schema());
    let notifying = pg.raw.clone().with_notify(&channel);
    let gap = Duration::from_millis(2);
    let mut group = c.benchmark_group("pg_live_latency");
    group.bench_function("in_process/aftermath", |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let options = latency_options(iters, NO_POLL, gap);
            framework_latency(&pg.store, pg.store.clone(), "live", &options)
                .await
                .expect("latency run")
                .total()
        })
    });
    group.bench_function("in_process/raw_sqlx", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let notify = notify.clone();
            async move {
                let options = latency_options(iters, NO_POLL, gap);
                let wake = RawWake::InProcess(notify);
                raw_pg_latency(&pg.raw, pg.raw.clone(), wake, "live", &options)
                    .await
                    .expect("latency run")
                    .total()
            }
        })
    });
    group.bench_function("listen_notify/aftermath", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let reader = reader.clone();
            async move {
                let options = latency_options(iters, NO_POLL, gap);
                framework_latency(&pg.store, reader, "live", &options)
                    .await
                    .expect("latency run")
                    .total()
            }
        })
    });
    group.bench_function("listen_notify/raw_sqlx", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (writer, reader) = (notifying.clone(), raw_reader.clone());
            let wake = RawWake::Listen(channel.clone());
            async move {
                let options = latency_options(iters, NO_POLL, gap);
                raw_pg_latency(&writer, reader, wake, "live-listen", &options)
                    .await
                    .expect("latency run")
                    .total()
            }
        })
    });
    group.finish();
    drop(reader);
    rt.block_on(raw_reader.close());
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
    targets = sqlite_append, memory_append, execute_fresh, execute_long_stream,
        sqlite_live_latency, sqlite_catch_up, postgres
}
criterion_main!(benches);
