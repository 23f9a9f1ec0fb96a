//! The telemetry rows: commands/s and a projection's catch-up events/s on
//! SQLite with no `tracing` subscriber, then again with an OpenTelemetry
//! layer at INFO installed whose provider has no exporter (every span is
//! built and dropped: the cost the `otel` feature adds before anything is
//! exported).
//! The layer is installed globally and cannot be removed, so this section
//! runs last and its two sides run one after the other, not alternating.

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

async fn measure(budget: Duration, events: u64) -> Result<Rates> {
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
        repo.execute(&id, command).await?;
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

pub(crate) fn run(rt: &tokio::runtime::Runtime, plan: &Plan) -> Result<()> {
    println!();
    println!(
        "== telemetry (SQLite): spans through an OpenTelemetry layer without exporter vs no subscriber =="
    );
    header();
    let events = plan.catch_up_events.min(20_000);
    let off = rt.block_on(measure(plan.budget, events))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    // The usual setting of an exporting layer: INFO and above.
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("bench"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
    );
    tracing::subscriber::set_global_default(subscriber)?;
    let on = rt.block_on(measure(plan.budget, events))?;
    let note = |on: f64, off: f64| verdict(">= 95%", on >= 0.95 * off);
    row(
        "commands/s, otel layer vs none (baseline)",
        "commands/s",
        on.commands,
        Some(off.commands),
        &note(on.commands, off.commands),
    );
    row(
        "projection catch-up, otel layer vs none (baseline)",
        "events/s",
        on.catch_up,
        Some(off.catch_up),
        &note(on.catch_up, off.catch_up),
    );
    drop(provider);
    Ok(())
}
