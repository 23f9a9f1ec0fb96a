//! The SQLite rows: appends, reads and the repository beside plain
//! rusqlite on the same file; live latency; catch-up and projections (each
//! in a child process, with its peak memory).

use std::time::{Duration, Instant};

use aftermath::projection::{ProjectionOptions, ProjectionRunner};
use aftermath::subscription::{CatchUp, SubscriptionOptions};
use aftermath::{
    EventStore, ExpectedVersion, MemoryStore, Position, Repository, SqliteOptions, SqliteStore,
};
use aftermath_benches::domain::{Account, AccountCommand};
use aftermath_benches::live::{LiveOptions, framework_latency};
use aftermath_benches::projections::{NoOp, Totals};
use aftermath_benches::raw::{RawStore, synchronous_pragma};
use aftermath_benches::{TempDb, deposits, peak_rss_kib, read_all_count, seed_account};

use super::{Plan, Result, Tally, header, latency_row, rounded, row, verdict};

/// Commands executed on one in-memory store before it is replaced.
const MEMORY_STORE_MAX: u64 = 20_000;

/// Appends `batch`-event batches to `stream` for `budget`.
async fn framework_appends(
    store: &SqliteStore,
    stream: &str,
    version: &mut u64,
    batch: usize,
    budget: Duration,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let start = Instant::now();
    while start.elapsed() < budget {
        let events = deposits(batch);
        let began = Instant::now();
        let done = store
            .append(stream, ExpectedVersion::Exact(*version), events)
            .await?;
        tally.record(batch, began.elapsed());
        *version = done.last_version;
    }
    Ok(tally)
}

/// The same with plain rusqlite.
fn raw_appends(
    raw: &mut RawStore,
    stream: &str,
    version: &mut u64,
    batch: usize,
    budget: Duration,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let start = Instant::now();
    while start.elapsed() < budget {
        let events = deposits(batch);
        let began = Instant::now();
        *version = raw.append(stream, ExpectedVersion::Exact(*version), &events)?;
        tally.record(batch, began.elapsed());
    }
    Ok(tally)
}

/// Framework vs raw appends of `batch`-event batches, alternating rounds.
fn compare_appends(
    rt: &tokio::runtime::Runtime,
    plan: &Plan,
    store: &SqliteStore,
    raw: &mut RawStore,
    batch: usize,
) -> Result<(Tally, Tally)> {
    let (fw_stream, raw_stream) = (format!("fw-{batch}"), format!("raw-{batch}"));
    let (mut fw_version, mut raw_version) = (0, 0);
    let warm_up = plan.round() / 4;
    rt.block_on(framework_appends(
        store,
        &fw_stream,
        &mut fw_version,
        batch,
        warm_up,
    ))?;
    raw_appends(raw, &raw_stream, &mut raw_version, batch, warm_up)?;
    let (mut fw, mut base) = (Tally::default(), Tally::default());
    for _ in 0..plan.rounds {
        fw.add(rt.block_on(framework_appends(
            store,
            &fw_stream,
            &mut fw_version,
            batch,
            plan.round(),
        ))?);
        base.add(raw_appends(
            raw,
            &raw_stream,
            &mut raw_version,
            batch,
            plan.round(),
        )?);
    }
    Ok((fw, base))
}

/// `tasks` tasks appending single events, each to its own stream, for
/// `budget`; the tally's time is the wall time.
async fn concurrent_appends(store: &SqliteStore, tasks: usize, budget: Duration) -> Result<Tally> {
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let stream = format!("concurrent-{task}-{}", uuid::Uuid::now_v7());
            let mut version = 0;
            let mut appended = 0u64;
            while start.elapsed() < budget {
                let done = store
                    .append(&stream, ExpectedVersion::Exact(version), deposits(1))
                    .await?;
                version = done.last_version;
                appended += 1;
            }
            Ok::<u64, aftermath::StoreError>(appended)
        }));
    }
    let mut items = 0;
    for handle in handles {
        items += handle.await??;
    }
    Ok(Tally {
        items,
        time: start.elapsed(),
    })
}

/// Commands from `next` executed one after another for `budget`, at most
/// `max` of them.
async fn executes<S: EventStore>(
    repo: &Repository<Account, S>,
    budget: Duration,
    max: u64,
    mut next: impl FnMut(u64) -> (String, AccountCommand),
) -> Result<Tally> {
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget && n < max {
        n += 1;
        let (id, command) = next(n);
        let began = Instant::now();
        repo.execute(&id, command).await?;
        tally.record(1, began.elapsed());
    }
    Ok(tally)
}

/// A fresh account id and its `Open` command.
fn open_fresh(prefix: &'static str) -> impl FnMut(u64) -> (String, AccountCommand) {
    move |n| {
        let id = format!("{prefix}-{n}");
        let owner = id.clone();
        (id, AccountCommand::Open { owner })
    }
}

/// A deposit of 1 into account `id`.
fn deposit_into(id: &str) -> impl FnMut(u64) -> (String, AccountCommand) + '_ {
    move |_| (id.to_owned(), AccountCommand::Deposit { amount: 1 })
}

/// Catch-up reads of `$all` (up to `max` events), framework and raw
/// alternating, until each side spent about `budget` reading.
fn compare_reads(
    rt: &tokio::runtime::Runtime,
    plan: &Plan,
    store: &SqliteStore,
    raw: &RawStore,
    max: u64,
) -> Result<(Tally, Tally)> {
    // Warm both connections' caches once.
    rt.block_on(read_all_count(store, plan.page, max.min(10_000)))?;
    raw.read_all_count(Position::ORIGIN, plan.page, max.min(10_000))?;
    let (mut fw, mut base) = (Tally::default(), Tally::default());
    while fw.time < plan.budget || base.time < plan.budget {
        let began = Instant::now();
        let n = rt.block_on(read_all_count(store, plan.page, max))?;
        fw.record(n as usize, began.elapsed());
        let began = Instant::now();
        let n = raw.read_all_count(Position::ORIGIN, plan.page, max)?;
        base.record(n as usize, began.elapsed());
    }
    Ok((fw, base))
}

/// Runs the SQLite section.
pub(crate) fn run(rt: &tokio::runtime::Runtime, plan: &Plan) -> Result<()> {
    let synchronous = SqliteOptions::default().get_synchronous();
    println!();
    println!(
        "== SQLite {}, synchronous={}, WAL; baseline = plain rusqlite, one connection, same file, schema and pragmas",
        rusqlite::version(),
        synchronous_pragma(synchronous),
    );
    header();

    // Appends: the store and the raw connection on one file.
    let appends_db = TempDb::new("appends");
    let store = rt.block_on(SqliteStore::open(appends_db.path()))?;
    let mut raw = RawStore::open(appends_db.path(), synchronous)?;

    let (fw, base) = compare_appends(rt, plan, &store, &mut raw, 1)?;
    let raw_single = base.rate();
    row(
        "SQLite append, 1 event per batch",
        "events/s",
        fw.rate(),
        Some(base.rate()),
        "",
    );

    let (fw, base) = compare_appends(rt, plan, &store, &mut raw, 100)?;
    let ratio = fw.rate() / base.rate();
    row(
        "SQLite append, 100 events per batch",
        "events/s",
        fw.rate(),
        Some(base.rate()),
        &verdict(">= 70%", ratio >= 0.7),
    );

    rt.block_on(concurrent_appends(&store, plan.tasks, plan.round() / 4))?;
    let fw = rt.block_on(concurrent_appends(&store, plan.tasks, plan.budget))?;
    row(
        &format!("SQLite append, 1 event, {} tasks", plan.tasks),
        "events/s",
        fw.rate(),
        Some(raw_single),
        "group commit; baseline: raw 1 event/tx, 1 connection",
    );

    // Catch-up read of everything appended so far.
    let head = rt.block_on(store.head())?.value();
    let max = head.min(plan.read_max);
    let (fw, base) = compare_reads(rt, plan, &store, &raw, max)?;
    row(
        &format!("SQLite catch-up read $all, pages of {}", plan.page),
        "events/s",
        fw.rate(),
        Some(base.rate()),
        &format!("{max} events, decoded to StoredEvent on both sides; baseline raw SELECT"),
    );
    drop(raw);
    drop(store);
    drop(appends_db);

    // The repository.
    let repo_db = TempDb::new("repository");
    let store = rt.block_on(SqliteStore::open(repo_db.path()))?;
    let sqlite = Repository::<Account, _>::new(store.clone());
    rt.block_on(executes(
        &sqlite,
        plan.round() / 4,
        u64::MAX,
        open_fresh("warm"),
    ))?;
    let fw = rt.block_on(executes(
        &sqlite,
        plan.budget,
        u64::MAX,
        open_fresh("fresh"),
    ))?;
    row(
        "SQLite execute, fresh aggregate",
        "commands/s",
        fw.rate(),
        None,
        "load (empty) + decide + append",
    );

    // The memory store keeps every event: a new one every `MEMORY_STORE_MAX`
    // commands keeps the peak memory about the framework, not this loop.
    let memory = Repository::<Account, _>::new(MemoryStore::new());
    rt.block_on(executes(
        &memory,
        plan.round() / 4,
        MEMORY_STORE_MAX,
        open_fresh("warm"),
    ))?;
    drop(memory);
    let mut fw = Tally::default();
    while fw.time < plan.budget {
        let memory = Repository::<Account, _>::new(MemoryStore::new());
        let left = plan.budget - fw.time;
        fw.add(rt.block_on(executes(
            &memory,
            left,
            MEMORY_STORE_MAX,
            open_fresh("fresh"),
        ))?);
    }
    row(
        "memory execute, fresh aggregate",
        "commands/s",
        fw.rate(),
        None,
        &format!("a new store every {MEMORY_STORE_MAX} commands"),
    );

    let snapshotted = Repository::<Account, _>::new(store.clone()).with_snapshots(100);
    for (label, repo, snapshot) in [
        ("no snapshots", &sqlite, false),
        ("snapshots every 100", &snapshotted, true),
    ] {
        let mut short_rate = None;
        for events in [1_000usize, 10_000] {
            let id = format!("long-{events}-{snapshot}");
            rt.block_on(seed_account(&store, &id, events, snapshot))?;
            rt.block_on(executes(
                repo,
                plan.round() / 4,
                u64::MAX,
                deposit_into(&id),
            ))?;
            let fw = rt.block_on(executes(repo, plan.budget, u64::MAX, deposit_into(&id)))?;
            let note = match short_rate {
                Some(short) => format!("{:.2}x the 1,000-event rate", fw.rate() / short),
                None => String::new(),
            };
            short_rate = Some(fw.rate());
            row(
                &format!("SQLite execute, {} events, {label}", rounded(events as f64)),
                "commands/s",
                fw.rate(),
                None,
                &note,
            );
        }
    }
    drop(snapshotted);
    drop(sqlite);
    drop(store);
    drop(repo_db);

    live_latency(rt, plan)?;
    catch_up(rt, plan)?;
    Ok(())
}

/// Append-to-delivery latency of a caught-up `CatchUp` reader: on the
/// writer's own handle (woken by `watch_head`), and on a second handle on
/// the same file (what another process has: it learns by polling).
fn live_latency(rt: &tokio::runtime::Runtime, plan: &Plan) -> Result<()> {
    let temp = TempDb::new("live");
    let store = rt.block_on(SqliteStore::open(temp.path()))?;
    let woken = LiveOptions {
        samples: plan.live_samples,
        warm_up: 5,
        max_gap: Duration::from_millis(5),
        // Long enough never to fire: only `watch_head` wakes the reader.
        poll: Duration::from_secs(30),
        timeout: Duration::from_secs(10),
    };
    let l = rt.block_on(framework_latency(
        &store,
        store.clone(),
        "live-in-process",
        &woken,
    ))?;
    let note = format!(
        "{} samples; same handle, woken by watch_head (CatchUp poll off)",
        l.len()
    );
    latency_row(
        "SQLite live latency, in-process, p50",
        l.percentile(50.0),
        None,
        &note,
    );
    latency_row(
        "SQLite live latency, in-process, p99",
        l.percentile(99.0),
        None,
        "",
    );

    let other = rt.block_on(SqliteStore::open(temp.path()))?;
    let polled = LiveOptions {
        samples: plan.poll_samples,
        warm_up: 2,
        max_gap: plan.poll,
        poll: plan.poll,
        timeout: Duration::from_secs(10),
    };
    let l = rt.block_on(framework_latency(
        &store,
        other.clone(),
        "live-cross-process",
        &polled,
    ))?;
    let note = format!(
        "{} samples; second SqliteStore on the file, CatchUp poll every {} ms (default {} ms)",
        l.len(),
        plan.poll.as_millis(),
        SubscriptionOptions::default().poll_interval.as_millis()
    );
    latency_row(
        "SQLite live latency, cross-process (poll), p50",
        l.percentile(50.0),
        None,
        &note,
    );
    latency_row(
        "SQLite live latency, cross-process (poll), p99",
        l.percentile(99.0),
        None,
        "",
    );
    drop(other);
    drop(store);
    Ok(())
}

/// The argument that makes this binary run one catch-up and exit.
pub(crate) const CHILD_FLAG: &str = "--sqlite-catch-up-child";

/// What a child reports.
struct ChildRun {
    events: u64,
    seconds: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

impl ChildRun {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }

    fn mib(&self) -> String {
        format!(
            "VmHWM {} MiB (RSS {} MiB before)",
            rounded(self.hwm_kib as f64 / 1024.0),
            rounded(self.rss_kib as f64 / 1024.0)
        )
    }
}

/// Runs catch-up `variant` over the first `events` events of `path` in a
/// child process of this binary.
fn run_child(variant: &str, path: &std::path::Path, events: u64) -> Result<ChildRun> {
    let path = path.to_string_lossy();
    let events = events.to_string();
    let out = super::ChildOutput::run(&[CHILD_FLAG, variant, &path, &events], variant)?;
    Ok(ChildRun {
        events: out.field("events")? as u64,
        seconds: out.field("seconds")?,
        rss_kib: out.field("rss_kib")? as u64,
        hwm_kib: out.field("hwm_kib")? as u64,
    })
}

/// Catch-up of a file of `plan.catch_up_events` events (1,000 accounts of
/// 1,000 events in the full run): the raw read, a `CatchUp` reader with a
/// no-op handler, `ProjectionRunner` with a no-op and with an upsert
/// projection, and a hand-written upsert projection; each in its own
/// process, in pages (and transactions) of 1,000 events.
fn catch_up(rt: &tokio::runtime::Runtime, plan: &Plan) -> Result<()> {
    let events = plan.catch_up_events;
    let temp = TempDb::new("catch-up");
    let seeding = Instant::now();
    let store = rt.block_on(SqliteStore::open(temp.path()))?;
    let accounts = events.div_ceil(1000);
    for i in 0..accounts {
        let n = (events - i * 1000).min(1000) as usize;
        rt.block_on(seed_account(&store, &format!("c{i}"), n, false))?;
    }
    drop(store);
    let synchronous = SqliteOptions::default().get_synchronous();
    // Warm the page cache, untimed, so the first child is not the only one
    // reading from disk.
    RawStore::open(temp.path(), synchronous)?.read_all_count(
        Position::ORIGIN,
        plan.page,
        events,
    )?;
    println!(
        "  (catch-up file: {} events in {accounts} streams, {} MiB, seeded in {:.1} s; pages of {}; each row in its own process)",
        rounded(events as f64),
        rounded(temp.size_bytes() as f64 / (1024.0 * 1024.0)),
        seeding.elapsed().as_secs_f64(),
        plan.page,
    );

    let raw = run_child("raw-read", temp.path(), events)?;
    let catch_up = run_child("catch-up", temp.path(), events)?;
    let noop = run_child("runner-noop", temp.path(), events)?;
    let upsert = run_child("runner-upsert", temp.path(), events)?;
    let raw_upsert = run_child("raw-upsert", temp.path(), events)?;
    let n = rounded(events as f64);
    row(
        &format!("SQLite catch-up {n}, raw read (the baseline)"),
        "events/s",
        raw.rate(),
        Some(raw.rate()),
        &raw.mib(),
    );
    row(
        &format!("SQLite catch-up {n}, CatchUp, no-op handler"),
        "events/s",
        catch_up.rate(),
        Some(raw.rate()),
        &format!(
            "{}; {}",
            verdict(">= 50%", catch_up.rate() >= 0.5 * raw.rate()),
            catch_up.mib()
        ),
    );
    row(
        &format!("SQLite catch-up {n}, ProjectionRunner, no-op apply"),
        "events/s",
        noop.rate(),
        Some(raw.rate()),
        &format!(
            "{}; {}",
            verdict(">= 50%", noop.rate() >= 0.5 * raw.rate()),
            noop.mib()
        ),
    );
    row(
        &format!("SQLite catch-up {n}, ProjectionRunner, SQL upsert"),
        "events/s",
        upsert.rate(),
        Some(raw.rate()),
        &upsert.mib(),
    );
    row(
        &format!("SQLite catch-up {n}, upsert vs raw read+upsert"),
        "events/s",
        upsert.rate(),
        Some(raw_upsert.rate()),
        &format!(
            "baseline: rusqlite read + upsert + checkpoint, 1 tx/page; {}",
            raw_upsert.mib()
        ),
    );
    println!(
        "{:<w$} {:<11} {:>11}  while catching up {n} events with the upsert projection (raw: {} MiB)",
        "peak RSS, ProjectionRunner catch-up (VmHWM)",
        "MiB",
        rounded(upsert.hwm_kib as f64 / 1024.0),
        rounded(raw_upsert.hwm_kib as f64 / 1024.0),
        w = super::NAME,
    );
    Ok(())
}

/// The child side of [`catch_up`]: `<variant> <path> <events>`; prints
/// `events= seconds= rss_kib= hwm_kib=`.
pub(crate) fn child(args: &[String]) -> Result<()> {
    let [variant, path, events] = args else {
        return Err(format!("usage: throughput {CHILD_FLAG} <variant> <path> <events>").into());
    };
    let events: u64 = events.parse()?;
    let path = std::path::Path::new(path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let synchronous = SqliteOptions::default().get_synchronous();
    let options = ProjectionOptions::default().batch_size(1000);
    let rss = || aftermath_benches::rss_kib().unwrap_or(0);
    let (handled, seconds, rss_before) = match variant.as_str() {
        "raw-read" => {
            let raw = RawStore::open(path, synchronous)?;
            let before = rss();
            let began = Instant::now();
            let n = raw.read_all_count(Position::ORIGIN, 1000, events)?;
            (n, began.elapsed(), before)
        }
        "raw-upsert" => {
            let mut raw = RawStore::open(path, synchronous)?;
            let before = rss();
            let began = Instant::now();
            let n = raw.project_totals("raw_totals", 1000, events)?;
            let elapsed = began.elapsed();
            check_totals(&raw, "raw_totals", n)?;
            (n, elapsed, before)
        }
        "catch-up" => rt.block_on(async {
            let store = SqliteStore::open(path).await?;
            let before = rss();
            let began = Instant::now();
            let options = SubscriptionOptions::default().batch_size(1000);
            let mut reader = CatchUp::new(store, None, Position::ORIGIN, options);
            let mut n = 0u64;
            loop {
                let page = reader.next_page().await?;
                n += std::hint::black_box(&page.events).len() as u64;
                reader.advance(page.through);
                if page.caught_up || n >= events {
                    break;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((n, began.elapsed(), before))
        })?,
        "runner-noop" => rt.block_on(async {
            let store = SqliteStore::open(path).await?;
            let runner = ProjectionRunner::new(NoOp::new("bench_noop"), store.clone(), store)
                .options(options);
            let before = rss();
            let began = Instant::now();
            runner.catch_up().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((events, began.elapsed(), before))
        })?,
        "runner-upsert" => rt.block_on(async {
            let store = SqliteStore::open(path).await?;
            let runner =
                ProjectionRunner::new(Totals::new("bench_totals"), store.clone(), store.clone())
                    .options(options);
            let before = rss();
            let began = Instant::now();
            runner.catch_up().await?;
            let elapsed = began.elapsed();
            drop(runner);
            drop(store);
            check_totals(&RawStore::open(path, synchronous)?, "bench_totals", events)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((events, elapsed, before))
        })?,
        other => return Err(format!("unknown catch-up variant `{other}`").into()),
    };
    println!(
        "events={handled} seconds={} rss_kib={rss_before} hwm_kib={}",
        seconds.as_secs_f64(),
        peak_rss_kib().unwrap_or(0)
    );
    Ok(())
}

/// Checks that read model `table` counted `events` events.
fn check_totals(raw: &RawStore, table: &str, events: u64) -> Result<()> {
    let counted: i64 = raw.connection().query_row(
        &format!("SELECT coalesce(sum(events), 0) FROM {table}"),
        [],
        |row| row.get(0),
    )?;
    if counted as u64 != events {
        return Err(format!("read model `{table}` counted {counted} events, not {events}").into());
    }
    Ok(())
}
