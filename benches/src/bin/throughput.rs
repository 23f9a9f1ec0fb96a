//! The throughput report: events (or commands) per second of the SQLite
//! store beside a plain-rusqlite baseline on the same file, the repository
//! on fresh and long streams, catch-up reads, and the peak memory.
//!
//! ```text
//! cargo run --release -p aftermath-benches --bin throughput            # ~40 s
//! cargo run --release -p aftermath-benches --bin throughput -- --quick # ~5 s, for CI
//! ```
//!
//! Each measurement runs for a fixed time budget (split into rounds that
//! alternate the framework and the baseline, so drift hurts both alike);
//! building the events is outside the timed part for both.

use std::error::Error;
use std::time::{Duration, Instant};

use aftermath::{
    EventStore, ExpectedVersion, MemoryStore, Position, Repository, SqliteOptions, SqliteStore,
};
use aftermath_benches::domain::{Account, AccountCommand};
use aftermath_benches::raw::{RawStore, synchronous_pragma};
use aftermath_benches::{TempDb, deposits, peak_rss_kib, read_all_count, seed_account};

/// Commands executed on one in-memory store before it is replaced.
const MEMORY_STORE_MAX: u64 = 20_000;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Sizes of one run.
struct Plan {
    /// Wall time of one measurement (both sides of a comparison get this).
    budget: Duration,
    /// Rounds a comparison alternates between the two sides.
    rounds: u32,
    /// Concurrent appending tasks.
    tasks: usize,
    /// The most events one catch-up read reads.
    read_max: u64,
    /// Page size of catch-up reads.
    page: usize,
}

impl Plan {
    fn full() -> Self {
        Plan {
            budget: Duration::from_millis(2000),
            rounds: 4,
            tasks: 8,
            read_max: 300_000,
            page: 1000,
        }
    }

    fn quick() -> Self {
        Plan {
            budget: Duration::from_millis(250),
            rounds: 2,
            tasks: 8,
            read_max: 20_000,
            page: 1000,
        }
    }

    fn round(&self) -> Duration {
        self.budget / self.rounds
    }
}

/// Items done and the time measured doing them.
#[derive(Default, Clone, Copy)]
struct Tally {
    items: u64,
    time: Duration,
}

impl Tally {
    fn record(&mut self, items: usize, time: Duration) {
        self.items += items as u64;
        self.time += time;
    }

    fn add(&mut self, other: Tally) {
        self.items += other.items;
        self.time += other.time;
    }

    fn rate(&self) -> f64 {
        self.items as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

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

/// Rounds to three significant digits and groups thousands: 123456.7 -> "123,000".
fn rounded(value: f64) -> String {
    if !value.is_finite() || value <= 0.0 {
        return "0".to_owned();
    }
    let digits = value.log10().floor() as i32;
    let scale = 10f64.powi((digits - 2).max(0));
    let n = ((value / scale).round() * scale) as u64;
    let plain = n.to_string();
    let mut out = String::new();
    for (i, c) in plain.chars().enumerate() {
        if i > 0 && (plain.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints one row: measurement, unit, aftermath, baseline, ratio, note.
fn row(name: &str, unit: &str, value: f64, baseline: Option<f64>, note: &str) {
    let (base, ratio) = match baseline {
        Some(b) => (rounded(b), format!("{:.0}%", 100.0 * value / b)),
        None => ("-".to_owned(), "-".to_owned()),
    };
    println!(
        "{name:<46} {unit:<11} {:>11} {base:>11} {ratio:>6}  {note}",
        rounded(value)
    );
}

fn main() -> Result<()> {
    let mut quick = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "--help" | "-h" => {
                println!("usage: throughput [--quick]");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}` (try --quick)").into()),
        }
    }
    let plan = if quick { Plan::quick() } else { Plan::full() };
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; numbers mean little without --release");
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let synchronous = SqliteOptions::default().get_synchronous();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "aftermath throughput report: {} run, SQLite {}, synchronous={}, WAL, {cores} cores, {:.1} s per measurement",
        if quick { "quick" } else { "full" },
        rusqlite::version(),
        synchronous_pragma(synchronous),
        plan.budget.as_secs_f64(),
    );
    println!(
        "baseline = plain rusqlite, one connection, same file, schema and pragmas; ratio = aftermath / baseline"
    );
    println!();
    println!(
        "{:<46} {:<11} {:>11} {:>11} {:>6}  note",
        "measurement", "unit", "aftermath", "baseline", "ratio"
    );

    // Appends: the store and the raw connection on one file.
    let appends_db = TempDb::new("appends");
    let store = rt.block_on(SqliteStore::open(appends_db.path()))?;
    let mut raw = RawStore::open(appends_db.path(), synchronous)?;

    let (fw, base) = compare_appends(&rt, &plan, &store, &mut raw, 1)?;
    let raw_single = base.rate();
    row(
        "SQLite append, 1 event per batch",
        "events/s",
        fw.rate(),
        Some(base.rate()),
        "",
    );

    let (fw, base) = compare_appends(&rt, &plan, &store, &mut raw, 100)?;
    let ratio = fw.rate() / base.rate();
    let verdict = if ratio >= 0.7 {
        "target >= 70%: met"
    } else {
        "target >= 70%: MISSED"
    };
    row(
        "SQLite append, 100 events per batch",
        "events/s",
        fw.rate(),
        Some(base.rate()),
        verdict,
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
    let (fw, base) = compare_reads(&rt, &plan, &store, &raw, max)?;
    row(
        &format!("catch-up read $all, pages of {}", plan.page),
        "events/s",
        fw.rate(),
        Some(base.rate()),
        &format!("{max} events, decoded to StoredEvent on both sides"),
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
        "execute, fresh aggregate, SQLite",
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
        "execute, fresh aggregate, memory",
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
                &format!("execute, {} events, {label}", rounded(events as f64)),
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

    match peak_rss_kib() {
        Some(kib) => println!(
            "{:<46} {:<11} {:>11}",
            "peak RSS (VmHWM)",
            "MiB",
            rounded(kib as f64 / 1024.0)
        ),
        None => println!("{:<46} {:<11} {:>11}", "peak RSS (VmHWM)", "MiB", "n/a"),
    }
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
