//! The scale-out rows (#16): a partitioned subscriber shared by 1, 2 or 4
//! worker processes (children of this binary) through its consumer group on
//! PostgreSQL. Only with `AFTERMATH_PG_URL`.
//!
//! Each round works in a fresh schema: the parent creates the store, starts
//! the workers, waits until the group has settled (every worker runs its
//! `16 / N` partitions and nothing moved for a lease ttl), then appends the
//! work (a backlog of events, or orders) and times until it is all done:
//! effects recorded done in the journal, or orders confirmed. A worker is
//! stopped by closing its stdin (a graceful shutdown: it leaves the group).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aftermath::process::ProcessOptions;
use aftermath::reactor::{EffectContext, ReactError, Reactor, ReactorOptions};
use aftermath::worker::{SubscriberState, Worker};
use aftermath::{
    EventStore, ExpectedVersion, PostgresOptions, PostgresStore, Recorded, Repository,
};
use aftermath_benches::domain::AccountEvent;
use aftermath_benches::{bench_schema, deposits, drop_store_schema, pg_url};
use aftermath_examples::fulfillment::{Fulfillment, command_bus};

use super::sagas::{AutoCarrier, Confirmations, PARTITIONS, by_hand, orders, place_all, restock};
use super::{Plan, Result, header, row, skipped, verdict};

/// The argument that makes this binary run one worker process.
pub(crate) const CHILD_FLAG: &str = "--scaleout-worker-child";

/// What the slow reactor's effect waits (an I/O-bound call): 5 ms, or
/// `AFTERMATH_SCALEOUT_EFFECT_MS` (inherited by the worker processes).
fn effect() -> Duration {
    static EFFECT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *EFFECT.get_or_init(|| {
        let ms = std::env::var("AFTERMATH_SCALEOUT_EFFECT_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(5);
        Duration::from_millis(ms)
    })
}

/// The workers' lease (and group membership) ttl: heartbeats every third.
const TTL: Duration = Duration::from_secs(2);

/// Events in each stream of the reactor's backlog.
const PER_STREAM: usize = 10;

/// The reactor's name.
const REACTOR: &str = "scaleout_slow";

/// A reactor whose effect is a wait ([`effect`]).
#[derive(Clone)]
struct SlowEffect;

/// Calls the capped variant allows at once per process
/// ([`ReactorOptions::per_process_limit`]: a per-process client).
const CLIENT_CALLS: usize = 1;

#[async_trait::async_trait]
impl Reactor for SlowEffect {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        REACTOR
    }
    async fn react(
        &self,
        _: &Recorded<AccountEvent>,
        _: &EffectContext,
    ) -> std::result::Result<(), ReactError> {
        tokio::time::sleep(effect()).await;
        Ok(())
    }
}

/// Worker processes, each running `kind` on the schema.
struct Workers {
    children: Vec<(Child, Option<ChildStdin>)>,
    /// Partitions each one runs (its last report).
    running: Arc<Mutex<Vec<u32>>>,
    /// Reports received in all, and when the group settled.
    reports: Arc<std::sync::atomic::AtomicU64>,
    settled_at: u64,
    /// Each one's other output.
    readers: Vec<JoinHandle<String>>,
}

impl Workers {
    fn spawn(kind: &str, url: &str, schema: &str, n: usize) -> Result<Self> {
        let running = Arc::new(Mutex::new(vec![0u32; n]));
        let mut workers = Workers {
            children: Vec::new(),
            running: running.clone(),
            reports: Default::default(),
            settled_at: 0,
            readers: Vec::new(),
        };
        for i in 0..n {
            let mut child = Command::new(std::env::current_exe()?)
                .arg(CHILD_FLAG)
                .arg(kind)
                .arg(url)
                .arg(schema)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let stdin = child.stdin.take();
            workers.children.push((child, stdin));
            let running = running.clone();
            let reports = workers.reports.clone();
            workers.readers.push(std::thread::spawn(move || {
                let mut rest = String::new();
                for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    match line.strip_prefix("running=").map(str::parse::<u32>) {
                        Some(Ok(n)) => {
                            running.lock().unwrap_or_else(|e| e.into_inner())[i] = n;
                            reports.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        _ => {
                            rest.push_str(&line);
                            rest.push('\n');
                        }
                    }
                }
                rest
            }));
        }
        Ok(workers)
    }

    /// Waits until every worker runs `each` partitions and nothing moved
    /// for a lease ttl; returns the time it took.
    fn settle(&mut self, each: u32, timeout: Duration) -> Result<Duration> {
        let began = Instant::now();
        let mut since: Option<Instant> = None;
        loop {
            let running = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if running.iter().all(|&r| r == each) {
                let at = *since.get_or_insert_with(Instant::now);
                if at.elapsed() >= TTL {
                    self.settled_at = self.reports.load(std::sync::atomic::Ordering::SeqCst);
                    return Ok(began.elapsed());
                }
            } else {
                since = None;
            }
            for (child, _) in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    return Err(format!("a worker process exited early ({status})").into());
                }
            }
            if began.elapsed() > timeout {
                return Err(format!(
                    "the group did not settle at {each} partitions per worker in {timeout:?}: {running:?}"
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How often a worker's partition count changed since the group
    /// settled (0: no partition moved).
    fn changes(&self) -> u64 {
        self.reports.load(std::sync::atomic::Ordering::SeqCst) - self.settled_at
    }

    /// Stops every worker (closes their stdin) and returns how many events
    /// each handled.
    fn stop(mut self) -> Result<Vec<u64>> {
        for (_, stdin) in &mut self.children {
            drop(stdin.take());
        }
        let mut failed = Vec::new();
        for (child, _) in &mut self.children {
            let status = child.wait()?;
            if !status.success() {
                failed.push(status.to_string());
            }
        }
        self.children.clear();
        let mut handled = Vec::new();
        for reader in self.readers.drain(..) {
            let out = reader.join().map_err(|_| "a reader thread panicked")?;
            let n = out
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("handled="))
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("a worker printed no `handled=`: {out}"))?;
            handled.push(n);
        }
        if !failed.is_empty() {
            return Err(format!("worker processes failed: {}", failed.join(", ")).into());
        }
        Ok(handled)
    }
}

impl Drop for Workers {
    /// On an error path: kills the workers this spawned.
    fn drop(&mut self) {
        for (child, stdin) in &mut self.children {
            drop(stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fresh store schema for one round.
async fn fresh_store(url: &str) -> Result<PostgresStore> {
    Ok(PostgresStore::connect_with(
        url,
        PostgresOptions::default().schema(bench_schema("scale")),
    )
    .await?)
}

/// Runs `f` on a fresh schema, dropping it afterwards whatever happened.
fn in_fresh_schema<T>(
    rt: &tokio::runtime::Runtime,
    url: &str,
    f: impl FnOnce(&PostgresStore) -> Result<T>,
) -> Result<T> {
    let store = rt.block_on(fresh_store(url))?;
    let outcome = f(&store);
    let dropped = rt.block_on(drop_store_schema(store));
    let value = outcome?;
    dropped?;
    Ok(value)
}

/// Appends `events` deposits, `PER_STREAM` per stream, from 8 tasks.
async fn backlog(store: &PostgresStore, events: usize) -> Result<()> {
    let streams = events.div_ceil(PER_STREAM);
    let tasks = 8;
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                for s in (task..streams).step_by(tasks) {
                    store
                        .append(
                            &format!("account-scale-{s}"),
                            ExpectedVersion::NoStream,
                            deposits(PER_STREAM),
                        )
                        .await?;
                }
                Ok::<(), aftermath::StoreError>(())
            })
        })
        .collect();
    for handle in handles {
        handle.await??;
    }
    Ok(())
}

/// Effects of the slow reactor recorded done.
async fn done_effects(store: &PostgresStore) -> Result<u64> {
    use aftermath::store::postgres::sqlx_core::{query::query, row::Row, sql_str::AssertSqlSafe};
    let sql = format!(
        "SELECT count(*) FROM \"{}\".effects WHERE reactor = '{REACTOR}' AND state = 'done'",
        store.schema()
    );
    let n: i64 = query(AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await?
        .try_get(0)?;
    Ok(n as u64)
}

/// One round of the reactor (`kind`: `reactor`, or `reactor-capped` with
/// a per-process client): `workers` processes, `events` events. Returns
/// the time and the events each worker handled.
fn reactor_round(
    rt: &tokio::runtime::Runtime,
    url: &str,
    kind: &str,
    workers: usize,
    events: usize,
) -> Result<Round> {
    in_fresh_schema(rt, url, |store| {
        let mut group = Workers::spawn(kind, url, store.schema(), workers)?;
        let settle = group.settle(PARTITIONS / workers as u32, Duration::from_secs(120))?;
        let (began, cpu) = (Instant::now(), cpu_times());
        rt.block_on(async {
            backlog(store, events).await?;
            while done_effects(store).await? < events as u64 {
                if began.elapsed() > Duration::from_secs(600) {
                    return Err("the backlog was not done in 10 minutes".into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })?;
        let (elapsed, cpu) = (began.elapsed(), busy(cpu, cpu_times()));
        let changes = group.changes();
        Ok(Round {
            elapsed,
            handled: group.stop()?,
            cpu,
            changes,
            settle,
        })
    })
}

/// One round of the saga: `workers` processes, every order placed from
/// here (`CONCURRENCY` at a time) once the group settled, timed until every
/// order is confirmed.
fn saga_round(
    rt: &tokio::runtime::Runtime,
    url: &str,
    workers: usize,
    orders: &[String],
) -> Result<Round> {
    in_fresh_schema(rt, url, |store| {
        rt.block_on(restock(store, orders))?;
        let mut group = Workers::spawn("saga", url, store.schema(), workers)?;
        // The process and the carrier: two partitioned subscribers.
        let settle = group.settle(2 * PARTITIONS / workers as u32, Duration::from_secs(120))?;
        let (began, cpu) = (Instant::now(), cpu_times());
        rt.block_on(async {
            place_all(store, orders).await?;
            Confirmations::default()
                .wait(store, orders.len() as u64, Duration::from_secs(600))
                .await
        })?;
        let (elapsed, cpu) = (began.elapsed(), busy(cpu, cpu_times()));
        let changes = group.changes();
        Ok(Round {
            elapsed,
            handled: group.stop()?,
            cpu,
            changes,
            settle,
        })
    })
}

/// The machine's CPU time so far, busy and in all (jiffies, `/proc/stat`).
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle + iowait
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// How busy the machine's CPUs were (all processes) between two samples.
fn busy(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> String {
    match (before, after) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            format!(
                "CPU {:.0}% busy",
                100.0 * (b1 - b0) as f64 / (t1 - t0) as f64
            )
        }
        _ => "CPU n/a".to_owned(),
    }
}

/// A timed round: its time, the events each worker handled, and how busy
/// the CPUs were meanwhile.
struct Round {
    elapsed: Duration,
    handled: Vec<u64>,
    cpu: String,
    /// Partition-count changes of the workers while timed.
    changes: u64,
    /// From starting the workers until the group settled (untimed).
    settle: Duration,
}

/// Runs a round, once more after a pause if it fails: the server is
/// shared (a full `max_connections` shows as a pool timeout).
fn retried<T>(mut round: impl FnMut() -> Result<T>) -> Result<T> {
    match round() {
        Ok(value) => Ok(value),
        Err(e) => {
            eprintln!("  (a scale-out round failed: {e}; once more in 5 s)");
            std::thread::sleep(Duration::from_secs(5));
            round()
        }
    }
}

/// Prints a row whose measurement failed (the report goes on).
fn failed(name: &str, error: &dyn std::fmt::Display) {
    println!("{name:<w$} FAILED: {error}", w = super::NAME);
}

/// "1 worker process", "4 worker processes".
fn processes(n: usize) -> String {
    if n == 1 {
        "1 worker process".to_owned()
    } else {
        format!("{n} worker processes")
    }
}

impl Round {
    /// Events handled per worker, and the moves while timed.
    fn per_worker(&self) -> String {
        let handled = self
            .handled
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("/");
        format!(
            "handled per worker {handled} ({} partition-count changes while timed; group settled {:.1} s after start, untimed)",
            self.changes,
            self.settle.as_secs_f64()
        )
    }
}

/// Runs the scale-out section (or prints why not).
pub(crate) fn run(rt: &tokio::runtime::Runtime, plan: &Plan) -> Result<()> {
    println!();
    let concurrency = ReactorOptions::default().concurrency;
    println!(
        "== scale-out (#16): consumer groups on PostgreSQL, {PARTITIONS} partitions shared by N worker processes (children of this binary), lease ttl {} s, pools of {}",
        TTL.as_secs(),
        PostgresOptions::default().get_max_connections()
    );
    let Some(url) = pg_url() else {
        skipped(
            "scale-out rows",
            "AFTERMATH_PG_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/test)",
        );
        return Ok(());
    };
    header();

    // 1. A reactor with an I/O-bound effect.
    let events = plan.scaleout_events;
    let mut one = None;
    for workers in [1usize, 2, 4] {
        let name = format!(
            "Postgres reactor, {} ms effect, {}",
            effect().as_millis(),
            processes(workers)
        );
        let round = match retried(|| reactor_round(rt, &url, "reactor", workers, events)) {
            Ok(round) => round,
            Err(e) => {
                failed(&name, &e);
                continue;
            }
        };
        let rate = events as f64 / round.elapsed.as_secs_f64();
        if workers == 1 {
            one = Some(rate);
        }
        let base = one.filter(|_| workers > 1);
        let mut note = format!(
            "{events} events in {} streams; ReactorOptions::concurrency {concurrency} (default) per partition, so {} effects in flight in all whatever N; {}; {}",
            events.div_ceil(PER_STREAM),
            PARTITIONS as usize * concurrency,
            round.per_worker(),
            round.cpu
        );
        if let Some(base) = base {
            let speedup = rate / base;
            note = format!("{speedup:.2}x 1 worker; {note}");
            if workers == 4 {
                note = format!("{}; {note}", verdict(">= 3.2x", speedup >= 3.2));
            }
        }
        row(&name, "events/s", rate, base, &note);
    }

    // The same where a process's own capacity is the limit: a client that
    // makes one call at a time per process, whatever the partitions.
    let events = plan.scaleout_capped_events;
    let mut one = None;
    for workers in [1usize, 2, 4] {
        let name = format!(
            "Postgres reactor, {} ms, 1 call/process, {workers} process(es)",
            effect().as_millis(),
        );
        let round = match retried(|| reactor_round(rt, &url, "reactor-capped", workers, events)) {
            Ok(round) => round,
            Err(e) => {
                failed(&name, &e);
                continue;
            }
        };
        let rate = events as f64 / round.elapsed.as_secs_f64();
        if workers == 1 {
            one = Some(rate);
        }
        let base = one.filter(|_| workers > 1);
        let mut note = format!(
            "{events} events; {CLIENT_CALLS} call at a time per process (a per-process client), so N in flight; {}; {}",
            round.per_worker(),
            round.cpu
        );
        if let Some(base) = base {
            note = format!("{:.2}x 1 worker; {note}", rate / base);
        }
        row(&name, "events/s", rate, base, &note);
    }

    // 2 and 3. The fulfillment saga, partitioned; by hand in this process.
    let n = plan.sagas;
    let hand = retried(|| {
        in_fresh_schema(rt, &url, |store| {
            rt.block_on(by_hand(store.clone(), &orders(n, "ph")))
        })
    });
    let hand_rate = match hand {
        Ok(hand) => Some(n as f64 / hand.as_secs_f64()),
        Err(e) => {
            eprintln!("  (the saga's by-hand baseline failed: {e})");
            None
        }
    };
    let process = ProcessOptions::default();
    let mut one = None;
    for workers in [1usize, 4] {
        let name = format!(
            "Postgres saga, {PARTITIONS} partitions, {}",
            processes(workers)
        );
        let round = match retried(|| saga_round(rt, &url, workers, &orders(n, "pw"))) {
            Ok(round) => round,
            Err(e) => {
                failed(&name, &e);
                continue;
            }
        };
        let rate = n as f64 / round.elapsed.as_secs_f64();
        if workers == 1 {
            one = Some(rate);
        }
        let base = one.filter(|_| workers > 1);
        let defaults = format!(
            "ProcessOptions::concurrency {} and carrier ReactorOptions::concurrency {concurrency} (defaults) per partition; events {}; {}",
            process.concurrency,
            round.per_worker(),
            round.cpu
        );
        if workers == 1 {
            row(
                &name,
                "sagas/s",
                rate,
                hand_rate,
                &format!(
                    "{n} orders; baseline: the 7 commands by hand, {} at a time, one process; {defaults}",
                    super::sagas::CONCURRENCY
                ),
            );
        } else {
            let speedup = base.map_or_else(|| "-".to_owned(), |b| format!("{:.2}", rate / b));
            row(
                &name,
                "sagas/s",
                rate,
                base,
                &format!("{speedup}x 1 worker; {n} orders; {defaults}"),
            );
        }
    }
    Ok(())
}

/// The child side: `<reactor|saga> <url> <schema>`. Runs a leased worker
/// with the partitioned subscriber(s), prints `running=<n>` (the partitions
/// it runs) whenever that changes, and on the end of stdin shuts down and
/// prints `handled=<events>`.
pub(crate) fn child(args: &[String]) -> Result<()> {
    let [kind, url, schema] = args else {
        return Err(format!("usage: throughput {CHILD_FLAG} <reactor|saga> <url> <schema>").into());
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store =
            PostgresStore::connect_with(url, PostgresOptions::default().schema(schema)).await?;
        let worker = Worker::on(store.clone()).leased(TTL);
        let worker = match kind.as_str() {
            "reactor" | "reactor-capped" => {
                let options = if kind == "reactor-capped" {
                    ReactorOptions::default().per_process_limit(CLIENT_CALLS)
                } else {
                    ReactorOptions::default()
                };
                worker.partitioned_reactor(SlowEffect, PARTITIONS, options)
            }
            "saga" => worker
                .partitioned_process(
                    Fulfillment,
                    command_bus(&store),
                    PARTITIONS,
                    ProcessOptions::default(),
                )
                .partitioned_reactor(
                    AutoCarrier(Repository::new(store.clone())),
                    PARTITIONS,
                    ReactorOptions::default(),
                ),
            other => return Err(format!("unknown worker kind `{other}`").into()),
        };
        let worker = worker.start()?;
        let (tx, mut eof) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            let _ = tx.send(());
        });
        let mut last = None;
        loop {
            let running = worker
                .status()
                .iter()
                .filter(|s| matches!(s.state, SubscriberState::CatchingUp | SubscriberState::Live))
                .count();
            if last != Some(running) {
                println!("running={running}");
                std::io::stdout().flush()?;
                last = Some(running);
            }
            tokio::select! {
                _ = &mut eof => break,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let handled: u64 = worker.status().iter().map(|s| s.handled).sum();
        worker.shutdown().await;
        println!("handled={handled}");
        Ok(())
    })
}
