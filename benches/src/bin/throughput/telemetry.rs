//! The telemetry rows: commands/s and a projection's catch-up events/s on
//! SQLite with an OpenTelemetry layer at INFO whose provider has no
//! exporter (every span is built and dropped: the cost the `otel` feature
//! adds before anything is exported), against the same work without it.
//!
//! A global subscriber cannot be removed, so the measurement runs in a
//! child process of this binary that installs the layer behind a filter it
//! can switch: `OFF` is the no-telemetry side (every `tracing` callsite is
//! disabled, as with no subscriber at all, and commands store no trace
//! context), `INFO` the telemetry side. The sides alternate in short
//! slices inside the one process, each on its own store, so scheduling
//! and disk noise fall on both alike; the parent runs a few such children
//! and keeps each side's best.

use std::time::{Duration, Instant};

use aftermath::projection::{ProjectionOptions, ProjectionRunner};
use aftermath::subscription::SubscriptionOptions;
use aftermath::trace::TraceContext;
use aftermath::{Repository, SqliteStore};
use aftermath_benches::TempDb;
use aftermath_benches::domain::{Account, AccountCommand};
use aftermath_benches::projections::NoOp;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;

use super::{Plan, Result, Tally, header, row, verdict};

/// How long one side runs before the other takes over.
const SLICE: Duration = Duration::from_millis(250);
/// How many projections catch up per side in each child (a catch-up of
/// 20k events takes tens of milliseconds, short enough for one preempted
/// thread to cost it a tenth; the best counts).
const CATCH_UPS: usize = 15;

/// The three sides, each with its own store.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// Filter `OFF`: no spans, no stored context.
    Off,
    /// Filter `INFO`: the layer builds every INFO span; events carry the
    /// command span's context.
    On,
    /// Filter `OFF`, but every command runs in a fixed trace context, so
    /// its events carry one: the stored context's cost without spans.
    OffTraced,
}

const SIDES: [Side; 3] = [Side::Off, Side::On, Side::OffTraced];

struct Bench {
    store: SqliteStore,
    repo: Repository<Account, SqliteStore>,
    commands: Tally,
    sent: u64,
    catch_up: f64,
    _db: TempDb,
}

impl Bench {
    async fn new(label: &str) -> Result<Bench> {
        let db = TempDb::new(label);
        let store = SqliteStore::open(db.path()).await?;
        Ok(Bench {
            repo: Repository::new(store.clone()),
            store,
            commands: Tally::default(),
            sent: 0,
            catch_up: 0.0,
            _db: db,
        })
    }

    /// Commands for one slice.
    async fn commands(&mut self, traced: bool) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < SLICE {
            let n = self.sent;
            let id = format!("a-{}", n % 1000);
            let command = if n < 1000 {
                AccountCommand::Open { owner: id.clone() }
            } else {
                AccountCommand::Deposit { amount: 1 }
            };
            let began = Instant::now();
            let context = traced.then(|| {
                TraceContext::parse(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    None,
                )
                .expect("a valid traceparent")
            });
            aftermath::trace::with_context(context, self.repo.execute(&id, command)).await?;
            self.commands.record(1, began.elapsed());
            self.sent += 1;
        }
        Ok(())
    }

    /// One projection's catch-up of every event in the store.
    async fn catch_up(&mut self, round: usize) -> Result<()> {
        let runner = ProjectionRunner::new(
            NoOp::new(format!("telemetry_noop_{round}")),
            self.store.clone(),
            self.store.clone(),
        )
        .options(ProjectionOptions {
            subscription: SubscriptionOptions::default().batch_size(1000),
            ..ProjectionOptions::default()
        });
        let began = Instant::now();
        runner.catch_up().await?;
        let rate = self.sent as f64 / began.elapsed().as_secs_f64().max(1e-9);
        self.catch_up = self.catch_up.max(rate);
        Ok(())
    }
}

type Filter = reload::Handle<LevelFilter, tracing_subscriber::Registry>;

fn set(filter: &Filter, side: Side) -> Result<()> {
    let level = match side {
        Side::On => LevelFilter::INFO,
        Side::Off | Side::OffTraced => LevelFilter::OFF,
    };
    filter.reload(level)?;
    Ok(())
}

/// Alternates the sides: commands in slices until each side has sent
/// `events` and `budget` has passed, then catch-ups.
async fn measure(filter: &Filter, budget: Duration, events: u64) -> Result<Vec<Bench>> {
    let mut benches = Vec::new();
    for label in ["telemetry-off", "telemetry-on", "telemetry-traced"] {
        benches.push(Bench::new(label).await?);
    }
    // Each round starts with the next side, so whatever one slice leaves
    // behind (a WAL checkpoint, the writer's backlog) falls on every side.
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() < budget || benches.iter().any(|b| b.sent < events) {
        for k in 0..SIDES.len() {
            let i = (round + k) % SIDES.len();
            set(filter, SIDES[i])?;
            benches[i].commands(SIDES[i] == Side::OffTraced).await?;
        }
        round += 1;
    }
    for round in 0..CATCH_UPS {
        for k in 0..SIDES.len() {
            let i = (round + k) % SIDES.len();
            set(filter, SIDES[i])?;
            benches[i].catch_up(round).await?;
        }
    }
    set(filter, Side::Off)?;
    Ok(benches)
}

/// The argument that makes the binary a telemetry child, followed by the
/// budget in milliseconds and the minimum number of commands per side.
pub(crate) const CHILD_FLAG: &str = "--telemetry-child";

/// A child: installs the OpenTelemetry layer (a provider without
/// exporter) behind a reloadable filter, measures, and prints
/// `<side>_commands=<per s> <side>_catch_up=<per s>` for each side.
pub(crate) fn child(args: &[String]) -> Result<()> {
    let [budget_ms, events] = args else {
        return Err(format!("usage: {CHILD_FLAG} <budget ms> <events>").into());
    };
    let budget = Duration::from_millis(budget_ms.parse()?);
    let events: u64 = events.parse()?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let (filter, handle) = reload::Layer::new(LevelFilter::OFF);
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("bench"))
            .with_filter(filter),
    );
    tracing::subscriber::set_global_default(subscriber)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let benches = rt.block_on(measure(&handle, budget, events))?;
    for (name, bench) in ["off", "on", "traced"].iter().zip(&benches) {
        print!(
            "{name}_commands={} {name}_catch_up={} ",
            bench.commands.rate(),
            bench.catch_up
        );
    }
    println!();
    drop(provider);
    Ok(())
}

pub(crate) fn run(plan: &Plan) -> Result<()> {
    println!();
    println!(
        "== telemetry (SQLite): an OpenTelemetry layer without exporter at INFO vs the same layer filtered OFF (no spans, no stored context), alternating in one process =="
    );
    header();
    let events = plan.catch_up_events.min(20_000);
    let budget = plan.budget.as_millis().to_string();
    let events = events.to_string();
    // Best per side over a few children: noise only ever slows a run down.
    let mut best = [0.0f64; 6];
    for _ in 0..plan.rounds.clamp(2, 3) {
        let out = super::ChildOutput::run(&[CHILD_FLAG, &budget, &events], "telemetry")?;
        for (slot, field) in best.iter_mut().zip([
            "off_commands",
            "on_commands",
            "traced_commands",
            "off_catch_up",
            "on_catch_up",
            "traced_catch_up",
        ]) {
            *slot = slot.max(out.field(field)?);
        }
    }
    let [off_c, on_c, _, off_p, on_p, traced_p] = best;
    let note = |on: f64, off: f64| verdict(">= 95%", on >= 0.95 * off);
    row(
        "commands/s, otel layer vs none (baseline)",
        "commands/s",
        on_c,
        Some(off_c),
        &note(on_c, off_c),
    );
    row(
        "projection catch-up, otel layer vs none (baseline)",
        "events/s",
        on_p,
        Some(off_p),
        &note(on_p, off_p),
    );
    // Where the catch-up difference comes from: the same work without
    // spans, over events that carry a trace context (as the layer's
    // commands write them): the cost of reading and continuing the stored
    // context, which the layer does not add to.
    row(
        "projection catch-up of traced events, no layer vs none",
        "events/s",
        traced_p,
        Some(off_p),
        "the stored context's cost without any layer",
    );
    Ok(())
}
