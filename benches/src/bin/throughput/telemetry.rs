//! The telemetry rows: commands/s and a projection's catch-up events/s on
//! SQLite with no `tracing` subscriber, then again with an OpenTelemetry
//! layer at INFO installed whose provider has no exporter (every span is
//! built and dropped: the cost the `otel` feature adds before anything is
//! exported).
//! The layer is installed globally and cannot be removed, so each side runs
//! in a child process of this binary, alternating, best of the rounds.

use std::time::{Duration, Instant};

use aftermath::projection::{ProjectionOptions, ProjectionRunner};
use aftermath::subscription::SubscriptionOptions;
use aftermath::{Repository, SqliteStore};
use aftermath_benches::TempDb;
use aftermath_benches::domain::{Account, AccountCommand};
use aftermath_benches::projections::NoOp;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;

use super::{Plan, Result, Tally, header, row, verdict};

struct Rates {
    commands: f64,
    catch_up: f64,
}

/// `traced`: every command runs in a fixed trace context, so its events
/// carry one, as they do with a layer installed.
async fn measure(budget: Duration, events: u64, traced: bool) -> Result<Rates> {
    let db = TempDb::new("telemetry");
    let store = SqliteStore::open(db.path()).await?;
    let repo = Repository::<Account, _>::new(store.clone());
    let mut commands = Tally::default();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget || n < events {
        let id = format!("a-{}", n % 1000);
        let command = if n < 1000 {
            AccountCommand::Open { owner: id.clone() }
        } else {
            AccountCommand::Deposit { amount: 1 }
        };
        let began = Instant::now();
        let context = traced.then(|| {
            aftermath::trace::TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            )
            .expect("a valid traceparent")
        });
        aftermath::trace::with_context(context, repo.execute(&id, command)).await?;
        commands.record(1, began.elapsed());
        n += 1;
    }
    let runner = ProjectionRunner::new(NoOp::new("telemetry_noop"), store.clone(), store).options(
        ProjectionOptions {
            subscription: SubscriptionOptions::default().batch_size(1000),
            ..ProjectionOptions::default()
        },
    );
    let began = Instant::now();
    runner.catch_up().await?;
    let catch_up = n as f64 / began.elapsed().as_secs_f64().max(1e-9);
    Ok(Rates {
        commands: commands.rate(),
        catch_up,
    })
}

/// The argument that makes the binary a telemetry child: `on` or `off`,
/// then the budget in milliseconds and the minimum number of commands.
pub(crate) const CHILD_FLAG: &str = "--telemetry-child";

/// A child's side: `on` installs the OpenTelemetry layer (INFO, a provider
/// without exporter) before measuring, `off` installs nothing. Prints
/// `commands=<per s> catch_up=<per s>`.
pub(crate) fn child(args: &[String]) -> Result<()> {
    let [side, budget_ms, events] = args else {
        return Err(format!("usage: {CHILD_FLAG} on|off <budget ms> <events>").into());
    };
    let budget = Duration::from_millis(budget_ms.parse()?);
    let events: u64 = events.parse()?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    match side.as_str() {
        "on" => {
            // The usual setting of an exporting layer: INFO and above.
            let subscriber = tracing_subscriber::registry().with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("bench"))
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            );
            tracing::subscriber::set_global_default(subscriber)?;
        }
        "off" | "off-traced" => {}
        other => {
            return Err(format!("telemetry child side `{other}`: on, off or off-traced").into());
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rates = rt.block_on(measure(budget, events, side == "off-traced"))?;
    println!("commands={} catch_up={}", rates.commands, rates.catch_up);
    drop(provider);
    Ok(())
}

/// One side measured in a fresh child process.
fn run_child(side: &str, budget: Duration, events: u64) -> Result<Rates> {
    let budget = budget.as_millis().to_string();
    let events = events.to_string();
    let out = super::ChildOutput::run(&[CHILD_FLAG, side, &budget, &events], side)?;
    Ok(Rates {
        commands: out.field("commands")?,
        catch_up: out.field("catch_up")?,
    })
}

pub(crate) fn run(plan: &Plan) -> Result<()> {
    println!();
    println!(
        "== telemetry (SQLite): an OpenTelemetry layer without exporter vs no subscriber, alternating child processes =="
    );
    header();
    let events = plan.catch_up_events.min(20_000);
    // Each side in its own process (a global subscriber cannot be removed),
    // alternating, best of the rounds per side: noise on a shared machine
    // only ever slows a run down.
    let (mut off, mut on, mut traced) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.rounds.max(3) {
        off.push(run_child("off", plan.budget, events)?);
        on.push(run_child("on", plan.budget, events)?);
        traced.push(run_child("off-traced", plan.budget, events)?);
    }
    let best = |rates: &[Rates], f: fn(&Rates) -> f64| rates.iter().map(f).fold(0.0, f64::max);
    let note = |on: f64, off: f64| verdict(">= 95%", on >= 0.95 * off);
    let (on_c, off_c) = (best(&on, |r| r.commands), best(&off, |r| r.commands));
    let (on_p, off_p) = (best(&on, |r| r.catch_up), best(&off, |r| r.catch_up));
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
    // Where the catch-up difference comes from: the same work without a
    // layer, over events that carry a trace context (as the layer's
    // commands write them): the cost of reading and continuing the stored
    // context, which a layer does not add to.
    let traced_p = best(&traced, |r| r.catch_up);
    row(
        "projection catch-up of traced events, no layer vs none",
        "events/s",
        traced_p,
        Some(off_p),
        "the stored context's cost without any layer",
    );
    Ok(())
}
