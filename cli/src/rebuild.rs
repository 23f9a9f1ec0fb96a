//! Rebuilding a projection from the log, with progress and a safe stop.
//!
//! A rebuild resets the read model (the projection's `reset`, then `setup`,
//! with its checkpoint at the origin: [`ProjectionRunner::rebuild`]) and
//! replays `$all` into it up to the head as of the start. The replay
//! commits the read model and the checkpoint together, batch by batch, so
//! stopping it (Ctrl-C) after the batch in flight leaves a read model that
//! is exact up to its checkpoint: [`resume`] (or the application's own
//! runner, when it starts) continues from there.

use std::fmt;
use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use aftermath::projection::{Projection, ProjectionRunner, ReadModelDb};
use aftermath::store::EventStore;
use aftermath::worker::{RunContext, Subscriber, SubscriberError};
use aftermath::{Position, StoreError};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a rebuild (or a resumed one) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The read model is applied up to `position`, the head of `$all` when
    /// the run started (or later).
    Finished {
        /// The projection's checkpoint.
        position: Position,
        /// How long it took.
        elapsed: Duration,
    },
    /// Stopped on request after a committed batch: the read model is exact
    /// up to `position`; [`resume`] continues from there.
    Interrupted {
        /// The projection's checkpoint.
        position: Position,
        /// The head it was going to.
        head: Position,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Finished { position, elapsed } => write!(
                f,
                "rebuilt up to position {} in {:.1}s",
                position.0,
                elapsed.as_secs_f64()
            ),
            Outcome::Interrupted { position, head } => write!(
                f,
                "interrupted at position {} of {}: the read model is exact up to there; resume to continue",
                position.0, head.0
            ),
        }
    }
}

/// Rebuilds `runner`'s projection from the start of the log, until the
/// head (as of now) is applied or Ctrl-C is pressed. Stop every other
/// runner of the projection first.
pub async fn rebuild<P, S>(runner: &ProjectionRunner<P, S>) -> Result<Outcome, SubscriberError>
where
    P: Projection,
    S: EventStore + Clone,
{
    rebuild_until(runner, ctrl_c()).await
}

/// Continues an interrupted rebuild (or any run of `runner`) from its
/// checkpoint up to the head, until Ctrl-C.
pub async fn resume<P, S>(runner: &ProjectionRunner<P, S>) -> Result<Outcome, SubscriberError>
where
    P: Projection,
    S: EventStore + Clone,
{
    resume_until(runner, ctrl_c()).await
}

/// [`rebuild`], stopping when `stop` completes instead of on Ctrl-C.
pub async fn rebuild_until<P, S>(
    runner: &ProjectionRunner<P, S>,
    stop: impl Future<Output = ()>,
) -> Result<Outcome, SubscriberError>
where
    P: Projection,
    S: EventStore + Clone,
{
    runner.rebuild(None).await?;
    replay(runner, stop, "rebuilding").await
}

/// [`resume`], stopping when `stop` completes instead of on Ctrl-C.
pub async fn resume_until<P, S>(
    runner: &ProjectionRunner<P, S>,
    stop: impl Future<Output = ()>,
) -> Result<Outcome, SubscriberError>
where
    P: Projection,
    S: EventStore + Clone,
{
    replay(runner, stop, "resuming").await
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handler: never interrupted.
        std::future::pending::<()>().await;
    }
}

async fn checkpoint<P, S>(runner: &ProjectionRunner<P, S>) -> Result<Position, SubscriberError>
where
    P: Projection,
    S: EventStore + Clone,
{
    let name = Subscriber::name(runner);
    runner
        .db()
        .load_state(name)
        .await
        .map(|s| s.map_or(Position::ORIGIN, |s| s.position))
        .map_err(|e| store_error(name, e))
}

fn store_error(name: &str, source: StoreError) -> SubscriberError {
    SubscriberError::Store {
        subscriber: name.to_owned(),
        source,
    }
}

fn bar(start: Position, head: Position, verb: &str, name: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(head.0.saturating_sub(start.0)),
        if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} events of $all, {per_sec}, ETA {eta} (Ctrl-C stops safely)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("{verb} {name}"));
    bar
}

async fn replay<P, S>(
    runner: &ProjectionRunner<P, S>,
    stop: impl Future<Output = ()>,
    verb: &str,
) -> Result<Outcome, SubscriberError>
where
    P: Projection,
    S: EventStore + Clone,
{
    let name = Subscriber::name(runner).to_owned();
    let started = Instant::now();
    let head = runner
        .store()
        .head()
        .await
        .map_err(|e| store_error(&name, e))?;
    let start = checkpoint(runner).await?;
    let progress = bar(start, head, verb, &name);
    let (shutdown, watch) = tokio::sync::watch::channel(false);
    let mut ctx = RunContext::standalone(&name, watch);
    let run = Subscriber::run(runner, &mut ctx);
    tokio::pin!(run);
    tokio::pin!(stop);
    let mut interrupted = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let ran = loop {
        tokio::select! {
            ran = &mut run => break ran,
            () = &mut stop, if !interrupted => {
                interrupted = true;
                let _ = shutdown.send(true);
            }
            _ = tick.tick() => {
                let at = checkpoint(runner).await?;
                progress.set_position(at.0.saturating_sub(start.0));
                if at >= head && !*shutdown.borrow() {
                    let _ = shutdown.send(true);
                }
            }
        }
    };
    ran?;
    let position = checkpoint(runner).await?;
    progress.set_position(position.0.saturating_sub(start.0));
    if position >= head {
        progress.finish();
        Ok(Outcome::Finished {
            position,
            elapsed: started.elapsed(),
        })
    } else {
        progress.abandon();
        Ok(Outcome::Interrupted { position, head })
    }
}
