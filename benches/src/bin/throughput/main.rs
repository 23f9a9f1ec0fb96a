//! The throughput report: aftermath beside a hand-written baseline on the
//! same database, for SQLite (plain rusqlite, same file) and PostgreSQL
//! (plain sqlx, same server, a schema of its own): appends, the repository,
//! catch-up reads and projections, live latency, and peak memory.
//!
//! ```text
//! cargo run --release -p aftermath-benches --bin throughput            # ~3 min
//! cargo run --release -p aftermath-benches --bin throughput -- --quick # ~15 s, for CI
//! AFTERMATH_PG_URL=postgres://postgres@127.0.0.1:5432/test cargo run ...  # adds PostgreSQL
//! AFTERMATH_BENCH_ONLY=postgres cargo run ...                             # one section (below)
//! ```
//!
//! The sections, in the order they run (`AFTERMATH_BENCH_ONLY=<section>`
//! runs one):
//!
//! - `sqlite`: appends, the repository, catch-up and projections, live
//!   latency, beside plain rusqlite;
//! - `postgres`: the same beside plain sqlx;
//! - `sagas`: the fulfillment saga (unpartitioned and partitioned 16 ways,
//!   in one process) beside the same commands by hand, in memory and SQLite;
//! - `scaleout`: consumer groups (#16) on PostgreSQL: a partitioned reactor
//!   with a 5 ms effect run by 1, 2 and 4 worker processes (also with a
//!   client that makes one call at a time per process), and the
//!   partitioned saga by 1 and 4 worker processes (beside the commands by
//!   hand); the workers are child processes of this binary;
//! - `telemetry`: commands and catch-up with and without an OpenTelemetry
//!   layer (each side in child processes of this binary).
//!
//! Without `AFTERMATH_PG_URL` the PostgreSQL rows (`postgres`, `scaleout`)
//! print as SKIPPED. Each PostgreSQL run works in fresh schemas
//! (`bench_am_*` for the store, `bench_raw_*` for the baseline, a
//! `bench_scale_*` per scale-out round) and drops them at the end.
//!
//! Each throughput measurement runs for a fixed time budget, split into
//! rounds that alternate the framework and the baseline so drift hurts both
//! alike; building the events is outside the timed part for single writers.
//! Latencies are `delivered - append started` for single events, one at a
//! time (see `aftermath_benches::live`). The SQLite catch-up rows each run
//! in a child process of this binary, so that the peak memory (`VmHWM`)
//! reported beside them is that of the catch-up alone.

use std::error::Error;
use std::time::Duration;

mod pg;
mod sagas;
mod scaleout;
mod sqlite;
mod telemetry;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Sizes of one run.
pub(crate) struct Plan {
    /// Wall time of one measurement (both sides of a comparison get this).
    budget: Duration,
    /// Rounds a comparison alternates between the two sides.
    rounds: u32,
    /// Concurrent appending tasks.
    tasks: usize,
    /// The most events one catch-up read reads (SQLite appends file).
    read_max: u64,
    /// Page size of catch-up reads.
    page: usize,
    /// Events in the SQLite catch-up / projection file.
    catch_up_events: u64,
    /// Events the PostgreSQL catch-up reads (both sides are topped up to
    /// this many).
    pg_read_events: u64,
    /// Latency samples with a woken (in-process or notified) reader.
    live_samples: usize,
    /// Latency samples with a polling reader.
    poll_samples: usize,
    /// The poll interval of polling readers.
    poll: Duration,
    /// Orders run through the fulfillment saga.
    sagas: usize,
    /// Events of the scale-out reactor's backlog.
    scaleout_events: usize,
    /// The same with a per-process client (one call at a time).
    scaleout_capped_events: usize,
}

impl Plan {
    fn full() -> Self {
        Plan {
            budget: Duration::from_millis(2000),
            rounds: 4,
            tasks: 8,
            read_max: 300_000,
            page: 1000,
            catch_up_events: 1_000_000,
            pg_read_events: 200_000,
            live_samples: 300,
            poll_samples: 100,
            poll: Duration::from_millis(100),
            sagas: 2_000,
            scaleout_events: 4_000,
            scaleout_capped_events: 2_000,
        }
    }

    fn quick() -> Self {
        Plan {
            budget: Duration::from_millis(250),
            rounds: 2,
            tasks: 8,
            read_max: 20_000,
            page: 1000,
            catch_up_events: 20_000,
            pg_read_events: 20_000,
            live_samples: 40,
            poll_samples: 10,
            poll: Duration::from_millis(100),
            sagas: 200,
            scaleout_events: 800,
            scaleout_capped_events: 400,
        }
    }

    fn round(&self) -> Duration {
        self.budget / self.rounds
    }
}

/// Items done and the time measured doing them.
#[derive(Default, Clone, Copy)]
pub(crate) struct Tally {
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

/// Milliseconds with two decimals below 10 ms, one below 100, none above.
fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// Width of the measurement column.
const NAME: usize = 54;

/// Prints the table's header.
fn header() {
    println!(
        "{:<NAME$} {:<11} {:>11} {:>11} {:>6}  note",
        "measurement", "unit", "aftermath", "baseline", "ratio"
    );
}

/// Prints one row: measurement, unit, aftermath, baseline, ratio, note.
fn row(name: &str, unit: &str, value: f64, baseline: Option<f64>, note: &str) {
    let (base, ratio) = match baseline {
        Some(b) => (rounded(b), format!("{:.0}%", 100.0 * value / b)),
        None => ("-".to_owned(), "-".to_owned()),
    };
    println!(
        "{name:<NAME$} {unit:<11} {:>11} {base:>11} {ratio:>6}  {note}",
        rounded(value)
    );
}

/// Prints a latency row in milliseconds (lower is better, so no ratio).
fn latency_row(name: &str, value: Duration, baseline: Option<Duration>, note: &str) {
    let base = baseline.map_or_else(|| "-".to_owned(), millis);
    println!(
        "{name:<NAME$} {:<11} {:>11} {base:>11} {:>6}  {note}",
        "ms",
        millis(value),
        "-"
    );
}

/// Prints a row that did not run.
fn skipped(name: &str, why: &str) {
    println!("{name:<NAME$} SKIPPED: {why}");
}

/// "met" or "MISSED" for a target.
fn verdict(target: &str, met: bool) -> String {
    format!("target {target}: {}", if met { "met" } else { "MISSED" })
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".to_owned())
}

/// What a child process of this binary printed: `name=value` fields.
pub(crate) struct ChildOutput {
    what: String,
    stdout: String,
}

impl ChildOutput {
    /// Runs this binary with `args` (a child flag first); `what` names the
    /// child in errors.
    pub(crate) fn run(args: &[&str], what: &str) -> Result<ChildOutput> {
        let output = std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(format!(
                "child `{what}` failed ({}): {stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        Ok(ChildOutput {
            what: what.to_owned(),
            stdout,
        })
    }

    /// The number printed as `name=<number>`.
    pub(crate) fn field(&self, name: &str) -> Result<f64> {
        let (what, stdout) = (&self.what, &self.stdout);
        stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| format!("child `{what}` printed no `{name}`: {stdout}"))?
            .parse::<f64>()
            .map_err(Into::into)
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(sqlite::CHILD_FLAG) {
        return sqlite::child(&args[1..]);
    }
    if args.first().map(String::as_str) == Some(telemetry::CHILD_FLAG) {
        return telemetry::child(&args[1..]);
    }
    if args.first().map(String::as_str) == Some(scaleout::CHILD_FLAG) {
        return scaleout::child(&args[1..]);
    }
    let mut quick = false;
    for arg in &args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--help" | "-h" => {
                println!("usage: throughput [--quick]   (PostgreSQL rows need AFTERMATH_PG_URL)");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}` (try --quick)").into()),
        }
    }
    let plan = if quick { Plan::quick() } else { Plan::full() };
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; numbers mean little without --release");
    }
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "aftermath throughput report: {} run, {cores} cores, {:.1} s per measurement, load average at start {}",
        if quick { "quick" } else { "full" },
        plan.budget.as_secs_f64(),
        load_average(),
    );
    println!(
        "ratio = aftermath / baseline (throughput rows); latency rows are milliseconds, lower is better"
    );

    // One section only: AFTERMATH_BENCH_ONLY=sqlite|postgres|sagas|scaleout|telemetry.
    let only = match std::env::var("AFTERMATH_BENCH_ONLY") {
        Ok(section) => Some(section),
        Err(_) if std::env::var_os("AFTERMATH_BENCH_ONLY_SAGAS").is_some() => Some("sagas".into()),
        Err(_) => None,
    };
    let runs = |section: &str| only.as_deref().is_none_or(|only| only == section);
    if let Some(section) = only.as_deref()
        && !["sqlite", "postgres", "sagas", "scaleout", "telemetry"].contains(&section)
    {
        return Err(format!(
            "AFTERMATH_BENCH_ONLY={section}: use sqlite, postgres, sagas, scaleout or telemetry"
        )
        .into());
    }
    if runs("sqlite") {
        sqlite::run(&rt, &plan)?;
    }
    if runs("postgres") {
        pg::run(&rt, &plan)?;
    }
    if runs("sagas") {
        sagas::run(&rt, &plan)?;
    }
    if runs("scaleout") {
        scaleout::run(&rt, &plan)?;
    }
    if runs("telemetry") {
        telemetry::run(&plan)?;
    }

    println!();
    match aftermath_benches::peak_rss_kib() {
        Some(kib) => println!(
            "{:<NAME$} {:<11} {:>11}",
            "peak RSS of this process (VmHWM)",
            "MiB",
            rounded(kib as f64 / 1024.0)
        ),
        None => println!("{:<NAME$} {:<11} {:>11}", "peak RSS (VmHWM)", "MiB", "n/a"),
    }
    println!();
    println!(
        "total {:.1} s, load average at end {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    Ok(())
}
