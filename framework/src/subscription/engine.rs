//! The one catch-up loop every subscriber kind runs.
//!
//! Projections, external projections, reactors and process runners differ in
//! what they do with a page and where their checkpoint lives; everything else
//! is this engine:
//!
//! ```text
//! start (resume the checkpoint, prepare)            ── PageHandler::start
//! loop:
//!   work that does not come from the log            ── PageHandler::before_page
//!   read a page (types and partition in the query),
//!     or take the one read ahead
//!   report CatchingUp (a live subscriber stays Live)
//!   handle it                                       ── PageHandler::handle
//!     (a full page: read the next one meanwhile)
//!   fenced checkpoint from the one the run holds    ── PageHandler::commit
//!   report the lag; Live only now, once committed
//!   work due after the page (deadlines)             ── PageHandler::after_page
//!   caught up: wait for an append, a poll, or work falling due
//! ```
//!
//! The rules live here once:
//! - Every checkpoint write is a compare-and-set from the checkpoint the run
//!   holds. A lost race ([`StoreError::CheckpointMoved`]) is not a failure:
//!   another writer's work is committed and this run's batch rolled back, so
//!   the run starts over from the stored checkpoint.
//! - A subscriber is reported `Live` only after the page that reached the
//!   head is committed, so "wait until live, then read the model" reads what
//!   was there when the wait ended.
//! - While the engine works on a page the run context counts as busy; each
//!   report is progress. A worker with leases gives a lease up when a busy run
//!   makes no progress for its stall limit (a hung call), so another process
//!   takes over; idle waiting is never a stall.
//! - Progress a handler deferred (an external projection's checkpoint policy)
//!   is saved on shutdown and on failure, unless the failure is a lost race.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::Instrument;

use super::{CatchUp, CheckpointStore, Page, Partition, SubscriptionOptions, stopped};
use crate::event::Position;
use crate::store::{EventStore, StoreError};
use crate::worker::{RunContext, SubscriberError, SubscriberState};

/// What [`PageHandler::handle`] did with a page.
pub(crate) struct Handled {
    /// The checkpoint the handler committed itself (a projection commits its
    /// batches with their checkpoint): at least the one the run held.
    pub committed: Position,
    /// How far the checkpoint may move now: the page's `through` when the
    /// whole page is done, less when it stopped early.
    pub through: Position,
    /// Shutdown stopped the page before its end: the run returns.
    pub interrupted: bool,
}

impl Handled {
    /// The whole page is done; the engine commits its checkpoint.
    pub fn page(saved: Position, page: &Page) -> Self {
        Handled {
            committed: saved,
            through: page.through,
            interrupted: false,
        }
    }

    /// Stopped by shutdown; the checkpoint may move through `through`.
    pub fn interrupted(saved: Position, through: Position) -> Self {
        Handled {
            committed: saved,
            through: through.max(saved),
            interrupted: true,
        }
    }
}

/// How a page ended, for [`PageHandler::after_page`].
pub(crate) struct PageEnd {
    /// The page reached the head.
    pub caught_up: bool,
    /// When the page's last event was recorded (none for an empty page).
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// What differs between subscriber kinds; the engine ([`drive`]) does the rest.
#[async_trait]
pub(crate) trait PageHandler: Send + Sync {
    /// State of one run (from `start` until the run returns).
    type Run: Send;

    /// The checkpoint and lease key (the subscriber's name).
    fn key(&self) -> &str;

    /// Page size, poll interval.
    fn subscription(&self) -> &SubscriptionOptions;

    /// The event types read (pushed into the store's query).
    fn types(&self) -> Vec<&'static str>;

    /// The partition read, if any.
    fn partition(&self) -> Option<Partition>;

    /// Whether `catch_up` waits for work falling due ([`PageHandler::due_in`])
    /// before it returns (a reactor's retries), rather than only for the log.
    const CATCH_UP_WAITS_FOR_DUE: bool = false;

    /// A store error of this subscriber.
    fn store_error(&self, source: StoreError) -> SubscriberError {
        SubscriberError::Store {
            subscriber: self.key().to_owned(),
            source,
        }
    }

    /// Prepares a run; returns the checkpoint to continue after.
    /// `catch_up` is true for a run that returns once caught up.
    async fn start(
        &self,
        ctx: &RunContext,
        catch_up: bool,
    ) -> Result<(Position, Self::Run), SubscriberError>;

    /// Work before each page read that does not come from the log (a
    /// reactor's released and retried effects). False on shutdown.
    async fn before_page(
        &self,
        _ctx: &RunContext,
        _run: &mut Self::Run,
    ) -> Result<bool, SubscriberError> {
        Ok(true)
    }

    /// Handles a page with events, read after `saved`.
    async fn handle(
        &self,
        ctx: &mut RunContext,
        run: &mut Self::Run,
        saved: Position,
        page: &Page,
    ) -> Result<Handled, SubscriberError>;

    /// Whether the checkpoint should be saved now (false defers it to a
    /// later page, to shutdown or to a failure).
    fn commit_due(&self, _run: &mut Self::Run) -> bool {
        true
    }

    /// Moves the checkpoint from `from` (the one the run holds) to `to`,
    /// fenced: [`StoreError::CheckpointMoved`] when another writer moved it.
    async fn commit(
        &self,
        ctx: &RunContext,
        run: &mut Self::Run,
        from: Position,
        to: Position,
    ) -> Result<(), SubscriberError>;

    /// Work after a page is committed (a process manager's deadlines).
    /// False on shutdown.
    async fn after_page(
        &self,
        _ctx: &RunContext,
        _run: &mut Self::Run,
        _end: PageEnd,
    ) -> Result<bool, SubscriberError> {
        Ok(true)
    }

    /// When work that does not come from the log falls due (a retry's
    /// backoff, a deadline): the engine wakes then, also without appends.
    async fn due_in(&self, _run: &mut Self::Run) -> Result<Option<Duration>, SubscriberError> {
        Ok(None)
    }

    /// Completes when something else says there may be work (a virtual
    /// clock that jumped).
    async fn nudged(&self, _run: &mut Self::Run) {
        std::future::pending::<()>().await
    }
}

/// Where a run of `handler` resumes when its checkpoint is kept in
/// `checkpoints` (see [`resume`](super::resume)).
pub(crate) async fn resume_in<H, C, S>(
    handler: &H,
    checkpoints: &C,
    store: &S,
    ctx: &RunContext,
) -> Result<Position, SubscriberError>
where
    H: PageHandler,
    C: CheckpointStore,
    S: EventStore,
{
    super::resume(
        checkpoints,
        handler.key(),
        handler.subscription().start_from,
        store,
        ctx.lease.as_ref(),
    )
    .await
    .map_err(|e| handler.store_error(e))
}

/// The fenced save (compared with `from`) of a handler whose checkpoint is
/// kept in `checkpoints`.
pub(crate) async fn save_in<H, C>(
    handler: &H,
    checkpoints: &C,
    ctx: &RunContext,
    from: Position,
    to: Position,
) -> Result<(), SubscriberError>
where
    H: PageHandler,
    C: CheckpointStore,
{
    checkpoints
        .save(handler.key(), Some(from), to, ctx.lease.as_ref())
        .await
        .map_err(|e| handler.store_error(e))
}

/// The metrics of a committed page (see [`crate::trace`]).
fn record_page_metrics(subscriber: &str, handled: usize, lag: &super::Lag) {
    let name = subscriber.to_owned();
    if handled > 0 {
        metrics::counter!(crate::trace::EVENTS_HANDLED, "subscriber" => name.clone())
            .increment(handled as u64);
    }
    metrics::gauge!(crate::trace::LAG_EVENTS, "subscriber" => name.clone()).set(lag.events as f64);
    metrics::gauge!(crate::trace::LAG_SECONDS, "subscriber" => name).set(lag.seconds);
}

/// Runs `handler` over `store` until shutdown (or, with `catch_up`, until it
/// has caught up with the head), starting over from the stored checkpoint
/// after a lost race. Returns the checkpoint saved last.
pub(crate) async fn drive<H, S>(
    handler: &H,
    store: &S,
    ctx: &mut RunContext,
    catch_up: bool,
) -> Result<Position, SubscriberError>
where
    H: PageHandler,
    S: EventStore + Clone,
{
    loop {
        match drive_once(handler, store, ctx, catch_up).await {
            Err(SubscriberError::Store {
                source: source @ StoreError::CheckpointMoved { .. },
                ..
            }) => {
                tracing::info!(subscriber = %handler.key(), error = %source, "another writer committed first; re-reading the checkpoint");
            }
            other => {
                ctx.set_busy(false);
                return other;
            }
        }
    }
}

async fn drive_once<H, S>(
    handler: &H,
    store: &S,
    ctx: &mut RunContext,
    catch_up: bool,
) -> Result<Position, SubscriberError>
where
    H: PageHandler,
    S: EventStore + Clone,
{
    ctx.set_busy(true);
    let (start, mut run) = handler.start(ctx, catch_up).await?;
    let mut reader = CatchUp::new(
        store.clone(),
        Some(handler.types()),
        start,
        handler.subscription().clone(),
    );
    if let Some(p) = handler.partition() {
        reader = reader.partition(p.index, p.count);
    }
    let mut saved = start;
    // Handled through here; saved when the handler says it is due.
    let mut pending = start;
    let result = async {
        loop {
            if ctx.stopping() || !handler.before_page(ctx, &mut run).await? {
                return Ok(());
            }
            let page = reader
                .next_page()
                .await
                .map_err(|e| handler.store_error(e))?;
            let caught_up = page.caught_up;
            let lag = reader.lag();
            ctx.report(|s| {
                s.lag = lag;
                // Live only once a page that reached the head is committed.
                if !(caught_up && s.state == SubscriberState::Live) {
                    s.state = SubscriberState::CatchingUp;
                }
            });
            let handled = if page.events.is_empty() {
                Handled::page(saved, &page)
            } else {
                let span = tracing::info_span!(
                    "aftermath.page",
                    otel.name = %format_args!("process {}", handler.key()),
                    otel.kind = "consumer",
                    messaging.system = "aftermath",
                    messaging.operation.type = "process",
                    messaging.consumer.group.name = %handler.key(),
                    messaging.batch.message_count = page.events.len(),
                    aftermath.from = saved.0,
                    aftermath.to = page.through.0,
                );
                let handling = handler.handle(ctx, &mut run, saved, &page).instrument(span);
                if reader.is_behind() {
                    // A full page: read the next one while this one is
                    // handled (kept only if the handler gets through it).
                    let (handled, ahead) = tokio::join!(handling, reader.read_after(page.through));
                    reader.keep_ahead(page.through, ahead);
                    handled?
                } else {
                    handling.await?
                }
            };
            let done = page
                .events
                .iter()
                .filter(|e| e.position <= handled.through)
                .count();
            saved = saved.max(handled.committed);
            pending = pending.max(handled.through).max(saved);
            if pending > saved && (handled.interrupted || handler.commit_due(&mut run)) {
                handler.commit(ctx, &mut run, saved, pending).await?;
                saved = pending;
            }
            if handled.interrupted {
                return Ok(());
            }
            reader.advance(pending);
            let lag = reader.lag();
            record_page_metrics(handler.key(), done, &lag);
            ctx.report_progress(lag);
            if caught_up {
                ctx.report(|s| s.state = SubscriberState::Live);
            }
            let end = PageEnd {
                caught_up,
                last_recorded_at: page.events.last().map(|e| e.recorded_at),
            };
            if !handler.after_page(ctx, &mut run, end).await? {
                return Ok(());
            }
            if !caught_up {
                continue;
            }
            let due = handler.due_in(&mut run).await?;
            if catch_up {
                match due {
                    Some(wait) if H::CATCH_UP_WAITS_FOR_DUE => {
                        let mut stop = ctx.shutdown.clone();
                        tokio::select! {
                            _ = stopped(&mut stop) => return Ok(()),
                            _ = tokio::time::sleep(wait) => continue,
                        }
                    }
                    _ => return Ok(()),
                }
            }
            ctx.set_busy(false);
            let mut stop = ctx.shutdown.clone();
            let more = tokio::select! {
                more = reader.wait_for_more(&mut stop) => more,
                _ = async {
                    match due {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => std::future::pending::<()>().await,
                    }
                } => true,
                _ = handler.nudged(&mut run) => true,
            };
            ctx.set_busy(true);
            if !more {
                return Ok(());
            }
        }
    }
    .await;
    // Save deferred progress on shutdown and on failure alike, unless the
    // failure is that another writer moved the checkpoint.
    let moved = matches!(
        &result,
        Err(SubscriberError::Store {
            source: StoreError::CheckpointMoved { .. },
            ..
        })
    );
    if pending > saved && !moved {
        match handler.commit(ctx, &mut run, saved, pending).await {
            Ok(()) => saved = pending,
            Err(e) if result.is_ok() => return Err(e),
            // The run's own failure is what the caller must see (a handler
            // may have saved part of the failing page itself, so the compare
            // can find the checkpoint moved).
            Err(e) => {
                tracing::warn!(subscriber = %handler.key(), error = %e, "saving the progress before a failure did not succeed");
            }
        }
    }
    result.map(|()| saved)
}
