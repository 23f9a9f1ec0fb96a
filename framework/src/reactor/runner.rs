//! Runs a [`Reactor`]: reads its events, consults and writes the journal,
//! runs effects with retries and parking, moves the checkpoint.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::Utc;
use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use uuid::Uuid;

use super::{
    Effect, EffectContext, EffectJournal, EffectState, ParkPolicy, ReactError, Reactor,
    ReactorOptions, idempotency_key,
};
use crate::event::{Event, Position, StoredEvent};
use crate::store::{EventStore, StoreError};
use crate::subscription::engine::{self, Handled, PageHandler};
use crate::subscription::{CheckpointStore, Page, Partition, SubscriptionOptions};
use crate::trace::TraceContext;
use crate::worker::{RunContext, Subscriber, SubscriberError, panic_message};

/// Runs a reactor as a [`Subscriber`]: events from `store`, effects keyed in
/// `journal`, position in `checkpoints` (for SQLite, all three can be the
/// same [`SqliteStore`](crate::SqliteStore)).
pub struct ReactorRunner<R, S, J, C> {
    reactor: R,
    store: S,
    journal: J,
    checkpoints: C,
    options: ReactorOptions,
    partition: Option<Partition>,
    /// The checkpoint and lease key: the name, or `<name>#<i>of<n>`.
    key: String,
    /// Whether an effect may be waiting out a backoff (spares the journal
    /// query while nothing failed).
    failed_any: std::sync::atomic::AtomicBool,
}

/// The checkpoint key of a reactor's cleanup mark.
fn cleanup_key(reactor: &str) -> String {
    format!("{reactor}#cleaned")
}

/// How a lane (one stream's events of a page) ended.
struct LaneOutcome {
    /// Events the runner is finished with (the checkpoint may pass them).
    settled: Vec<Uuid>,
    /// Shutdown stopped the lane before its end.
    interrupted: bool,
}

/// How one effect ended.
enum Ran {
    Done,
    Parked,
    /// Failed transiently: recorded `Failed`, runs again after its backoff
    /// (from `release_held`); the stream waits behind it meanwhile.
    Waiting,
}

impl<R, S, J, C> ReactorRunner<R, S, J, C>
where
    R: Reactor,
    S: EventStore + Clone,
    J: EffectJournal,
    C: CheckpointStore,
{
    /// A runner with default options (one effect at a time, 5 attempts).
    pub fn new(reactor: R, store: S, journal: J, checkpoints: C) -> Self {
        let key = reactor.name().to_owned();
        ReactorRunner {
            reactor,
            store,
            journal,
            checkpoints,
            options: ReactorOptions::default(),
            partition: None,
            key,
            // A previous run may have left `Failed` entries.
            failed_any: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Runs only partition `index` of `count`: the events of the streams
    /// [`Partition::of`] puts there (per-stream order, parking and held
    /// streams work as unpartitioned), with its own checkpoint and lease
    /// under `<name>#<index>of<count>` (also its name as a [`Subscriber`]).
    /// Journal entries and idempotency keys stay keyed by the reactor's
    /// name, so an effect recorded done never runs again, whatever the
    /// partitioning; changing `count` only makes the new partitions read
    /// the log again from [`StartFrom`](crate::subscription::StartFrom), finding their effects in the
    /// journal.
    ///
    /// While runners of two counts run at once (a rolling deploy that
    /// changes the count), they hold different leases, so both may start an
    /// effect that neither has finished: it runs twice with the same
    /// idempotency key, as after a crash. Stop the old count before starting
    /// the new one where the receiver does not deduplicate by that key. Run
    /// every partition with
    /// [`Worker::add_partitioned`](crate::worker::Worker::add_partitioned),
    /// which shares them among the workers of a group.
    ///
    /// # Panics
    ///
    /// When `count` is 0 or `index >= count`.
    pub fn partition(mut self, index: u32, count: u32) -> Self {
        let partition = Partition::new(index, count);
        self.key = partition.key(self.reactor.name());
        self.partition = Some(partition);
        self
    }

    /// Sets the options.
    pub fn options(mut self, options: ReactorOptions) -> Self {
        self.options = options;
        self
    }

    /// The reactor.
    pub fn reactor(&self) -> &R {
        &self.reactor
    }

    /// The journal (for the dead-letter API).
    pub fn journal(&self) -> &J {
        &self.journal
    }

    /// Deletes this reactor's finished journal entries (done and skipped,
    /// last changed before `before`) up to the position that every
    /// partition of this runner's layout has passed; returns how many.
    ///
    /// That position is recorded first (under the checkpoint key
    /// `<name>#cleaned`), and every runner of the reactor starts after it:
    /// so a later change of the partition count, whose new partitions start
    /// without checkpoints, never reads a cleaned-up event again and never
    /// runs its effect twice. Entries past it are kept, however old. Call it
    /// from any runner of the layout that is running (not during a change
    /// of the partition count: a runner of the new layout that started
    /// before the mark was raised could read cleaned-up events).
    pub async fn cleanup(&self, before: chrono::DateTime<Utc>) -> Result<u64, SubscriberError> {
        let name = self.name();
        let keys: Vec<String> = match self.partition {
            None => vec![name.to_owned()],
            Some(p) => (0..p.count)
                .map(|i| Partition::new(i, p.count).key(name))
                .collect(),
        };
        let mut floor = Position(u64::MAX);
        for key in &keys {
            let at = self
                .checkpoints
                .load_checkpoint(key)
                .await
                .map_err(|e| self.store_error(e))?;
            floor = floor.min(at.unwrap_or(Position::ORIGIN));
        }
        let mark = self.cleanup_mark().await?;
        if floor > mark {
            self.checkpoints
                .save(&cleanup_key(name), Some(mark), floor, None)
                .await
                .map_err(|e| self.store_error(e))?;
        }
        self.journal
            .cleanup(name, before, floor.max(mark))
            .await
            .map_err(|e| self.store_error(e))
    }

    /// The position through which [`ReactorRunner::cleanup`] may have
    /// deleted entries (the origin when it never ran).
    async fn cleanup_mark(&self) -> Result<Position, SubscriberError> {
        Ok(self
            .checkpoints
            .load_checkpoint(&cleanup_key(self.name()))
            .await
            .map_err(|e| self.store_error(e))?
            .unwrap_or(Position::ORIGIN))
    }

    /// The reactor's name: the key of its journal entries and idempotency
    /// keys (shared by its partitions).
    fn name(&self) -> &str {
        self.reactor.name()
    }

    fn store_error(&self, source: StoreError) -> SubscriberError {
        SubscriberError::Store {
            subscriber: self.key.clone(),
            source,
        }
    }

    /// The entries holding streams of this runner's partition.
    async fn held(&self) -> Result<Vec<Effect>, SubscriberError> {
        let mut held = self
            .journal
            .held(self.name())
            .await
            .map_err(|e| self.store_error(e))?;
        if let Some(p) = self.partition {
            held.retain(|e| p.contains(&e.stream));
        }
        Ok(held)
    }

    /// Runs until caught up with the head as of now (including operator
    /// retries), then returns the checkpoint. For tests, tools and examples.
    pub async fn catch_up(&self) -> Result<Position, SubscriberError> {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let mut ctx = RunContext::standalone(&self.key, rx);
        engine::drive(self, &self.store, &mut ctx, true).await
    }

    /// Runs a page: lanes per stream, in parallel up to the concurrency
    /// limit. Returns the last position of the contiguous prefix of settled
    /// events (if any) and whether shutdown interrupted it.
    async fn process_page(
        &self,
        ctx: &RunContext,
        saved: Position,
        events: &[StoredEvent],
    ) -> Result<(Option<Position>, bool), SubscriberError> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let journal = self
            .journal
            .load(self.name(), &ids)
            .await
            .map_err(|e| self.store_error(e))?;
        let held: HashSet<String> = match self.options.park_policy {
            ParkPolicy::Continue => HashSet::new(),
            // Only entries that hold their stream; started or failed ones
            // are being (or will be) run again, they do not hold it.
            ParkPolicy::HoldStream => self
                .held()
                .await?
                .into_iter()
                .filter(|e| {
                    matches!(
                        e.state,
                        EffectState::Parked
                            | EffectState::RetryRequested
                            | EffectState::Blocked
                            | EffectState::Failed
                    )
                })
                .map(|e| e.stream)
                .collect(),
        };
        // One lane per stream, in order of first appearance.
        let mut order: Vec<&str> = Vec::new();
        let mut lanes: HashMap<&str, Vec<&StoredEvent>> = HashMap::new();
        for event in events {
            lanes
                .entry(event.stream.as_str())
                .or_insert_with(|| {
                    order.push(event.stream.as_str());
                    Vec::new()
                })
                .push(event);
        }
        let mut waiting = order.into_iter();
        let mut running = FuturesUnordered::new();
        let mut outcomes: Vec<Result<LaneOutcome, SubscriberError>> = Vec::new();
        loop {
            while running.len() < self.options.concurrency.max(1) {
                let Some(stream) = waiting.next() else { break };
                let lane = lanes.remove(stream).unwrap_or_default();
                running.push(self.run_lane(ctx, lane, &journal, held.contains(stream)));
            }
            match running.next().await {
                Some(outcome) => outcomes.push(outcome),
                None => break,
            }
        }
        let mut settled = HashSet::new();
        let mut interrupted = false;
        let mut failure = None;
        for outcome in outcomes {
            match outcome {
                Ok(o) => {
                    settled.extend(o.settled);
                    interrupted |= o.interrupted;
                }
                Err(e) => failure = Some(e),
            }
        }
        let prefix = events
            .iter()
            .take_while(|e| settled.contains(&e.id))
            .last()
            .map(|e| e.position);
        match failure {
            // The journal holds what was done; the checkpoint may still move
            // past the settled prefix before the error restarts the run.
            Some(e) => {
                if let Some(p) = prefix {
                    let _ = self
                        .checkpoints
                        .save(&self.key, Some(saved), p, ctx.lease.as_ref())
                        .await;
                }
                Err(e)
            }
            None => Ok((prefix, interrupted || settled.len() < events.len())),
        }
    }

    async fn run_lane(
        &self,
        ctx: &RunContext,
        events: Vec<&StoredEvent>,
        journal: &HashMap<Uuid, Effect>,
        mut blocked: bool,
    ) -> Result<LaneOutcome, SubscriberError> {
        let mut settled = Vec::with_capacity(events.len());
        for stored in events {
            let existing = journal.get(&stored.id);
            // A `Failed` entry waits out its backoff in `release_held`.
            if let Some(entry) = existing
                && entry.state.is_settled()
            {
                if self.options.park_policy == ParkPolicy::HoldStream
                    && matches!(
                        entry.state,
                        EffectState::Parked
                            | EffectState::RetryRequested
                            | EffectState::Blocked
                            | EffectState::Failed
                    )
                {
                    blocked = true;
                }
                settled.push(stored.id);
                continue;
            }
            if ctx.stopping() {
                return Ok(LaneOutcome {
                    settled,
                    interrupted: true,
                });
            }
            let attempts = existing.map_or(0, |e| e.attempts);
            if blocked {
                let entry = self.entry(
                    stored,
                    EffectState::Blocked,
                    attempts,
                    Some("held behind a parked event of its stream".into()),
                );
                self.record(&entry, ctx).await?;
                settled.push(stored.id);
                continue;
            }
            match self.run_effect(ctx, stored, attempts).await? {
                Ran::Done => settled.push(stored.id),
                Ran::Parked | Ran::Waiting => {
                    settled.push(stored.id);
                    blocked = self.options.park_policy == ParkPolicy::HoldStream;
                }
            }
        }
        Ok(LaneOutcome {
            settled,
            interrupted: false,
        })
    }

    fn entry(
        &self,
        stored: &StoredEvent,
        state: EffectState,
        attempts: u32,
        last_error: Option<String>,
    ) -> Effect {
        let now = Utc::now();
        Effect {
            reactor: self.name().to_owned(),
            event_id: stored.id,
            position: stored.position,
            stream: stored.stream.clone(),
            event_type: stored.event_type.clone(),
            state,
            attempts,
            last_error,
            created_at: now,
            updated_at: now,
        }
    }

    async fn record(&self, effect: &Effect, ctx: &RunContext) -> Result<(), SubscriberError> {
        self.journal
            .record(effect, ctx.lease.as_ref())
            .await
            .map_err(|e| self.store_error(e))
    }

    /// Runs one effect until done, parked, or interrupted by shutdown during
    /// a backoff. `attempts` is how many were started before (across crashes).
    async fn run_effect(
        &self,
        ctx: &RunContext,
        stored: &StoredEvent,
        mut attempts: u32,
    ) -> Result<Ran, SubscriberError> {
        let event = match stored.decode::<R::Event>() {
            Ok(Some(event)) => event,
            Ok(None) => {
                let message = format!(
                    "event type `{}` is not one of this reactor's",
                    stored.event_type
                );
                self.record(
                    &self.entry(stored, EffectState::Parked, attempts, Some(message)),
                    ctx,
                )
                .await?;
                return Ok(Ran::Parked);
            }
            Err(e) => {
                let message = format!("does not decode: {}", e.message);
                self.record(
                    &self.entry(stored, EffectState::Parked, attempts, Some(message)),
                    ctx,
                )
                .await?;
                return Ok(Ran::Parked);
            }
        };
        let key = idempotency_key(self.name(), stored.id);
        if attempts >= self.options.max_attempts {
            // Every attempt so far was started and none finished: the
            // process stopped during the call each time (a crash, an abort,
            // an OOM kill). Running it again could only loop.
            let message = format!(
                "gave up after {attempts} attempts: the last one(s) started and never finished \
                 (the process stopped during the call)"
            );
            tracing::error!(reactor = %self.name(), event_id = %stored.id, stream = %stored.stream, error = %message, "effect parked");
            self.record(
                &self.entry(stored, EffectState::Parked, attempts, Some(message)),
                ctx,
            )
            .await?;
            ctx.report(|s| s.skipped += 1);
            return Ok(Ran::Parked);
        }
        // A slot of the process-wide limit, if any, before the effect is
        // recorded as started (waiting is not an attempt).
        let _slot = match &self.options.process_limit {
            Some(limit) => Some(
                limit
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the limit's semaphore is never closed"),
            ),
            None => None,
        };
        {
            attempts += 1;
            self.record(
                &self.entry(stored, EffectState::Started, attempts, None),
                ctx,
            )
            .await?;
            let span = tracing::info_span!(
                "aftermath.effect",
                otel.name = %format_args!("effect {}", self.name()),
                otel.kind = "consumer",
                otel.status_code = tracing::field::Empty,
                aftermath.reactor = %self.name(),
                messaging.message.id = %stored.id,
                messaging.destination.name = %stored.stream,
                aftermath.idempotency_key = %key,
                aftermath.attempt = attempts,
                aftermath.outcome = tracing::field::Empty,
            );
            let parent = stored.metadata.trace.clone();
            let timeout = self.options.call_timeout;
            let call = std::panic::AssertUnwindSafe(crate::trace::continue_in(
                span.clone(),
                parent,
                async {
                    // Inside the effect's span: its context is the one the
                    // reactor hands on to the outside system.
                    let effect_ctx = EffectContext {
                        reactor: self.name().to_owned(),
                        event_id: stored.id,
                        correlation_id: stored.metadata.correlation_id,
                        causation_id: stored.metadata.causation_id,
                        attempt: attempts,
                        idempotency_key: key.clone(),
                        trace: TraceContext::current(),
                    };
                    self.reactor.react(&event, &effect_ctx).await
                },
            ))
            .catch_unwind();
            // A panic is a fatal failure of this event; a hung call a
            // transient one: neither stops the runner.
            let result = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => Err(ReactError::Fatal(format!(
                    "react panicked: {}",
                    panic_message(panic.as_ref())
                ))),
                Err(_) => Err(ReactError::Retry(format!(
                    "react timed out after {timeout:?}"
                ))),
            };
            let outcome = match &result {
                Ok(()) => "done",
                Err(ReactError::Retry(_)) if attempts < self.options.max_attempts => "retry",
                Err(_) => "parked",
            };
            span.record("aftermath.outcome", outcome);
            if outcome != "done" {
                span.record("otel.status_code", "ERROR");
            }
            metrics::counter!(crate::trace::EFFECT_ATTEMPTS, "reactor" => self.name().to_owned(), "outcome" => outcome)
                .increment(1);
            match result {
                Ok(()) => {
                    self.record(&self.entry(stored, EffectState::Done, attempts, None), ctx)
                        .await?;
                    ctx.report(|s| s.handled += 1);
                    Ok(Ran::Done)
                }
                Err(ReactError::Retry(message)) if attempts < self.options.max_attempts => {
                    tracing::warn!(reactor = %self.name(), event_id = %stored.id, attempts, error = %message, "effect failed; retrying");
                    // Recorded and left: the backoff runs in `release_held`,
                    // so it holds this stream only, never the page.
                    self.record(
                        &self.entry(stored, EffectState::Failed, attempts, Some(message)),
                        ctx,
                    )
                    .await?;
                    self.failed_any
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok(Ran::Waiting)
                }
                Err(error) => {
                    let message = match &error {
                        ReactError::Retry(m) => format!("gave up after {attempts} attempts: {m}"),
                        ReactError::Fatal(m) => m.clone(),
                    };
                    tracing::error!(reactor = %self.name(), event_id = %stored.id, stream = %stored.stream, error = %message, "effect parked");
                    self.record(
                        &self.entry(stored, EffectState::Parked, attempts, Some(message)),
                        ctx,
                    )
                    .await?;
                    ctx.report(|s| s.skipped += 1);
                    Ok(Ran::Parked)
                }
            }
        }
    }

    /// When the earliest effect waiting out its backoff is due.
    async fn next_due(&self) -> Result<Option<chrono::DateTime<Utc>>, SubscriberError> {
        if !self
            .failed_any
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(None);
        }
        let due = self
            .held()
            .await?
            .into_iter()
            .filter(|e| e.state == EffectState::Failed)
            .map(|e| self.due(&e))
            .min();
        if due.is_some() {
            self.failed_any
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(due)
    }

    /// When a `Failed` entry's next attempt is due.
    fn due(&self, entry: &Effect) -> chrono::DateTime<Utc> {
        entry.updated_at
            + chrono::Duration::from_std(self.options.delay(entry.attempts))
                .unwrap_or(chrono::Duration::MAX)
    }

    /// Runs what operators released (retried parked effects, then the events
    /// held behind them) and effects left started or failed by a stopped run,
    /// per stream in order. Returns false on shutdown.
    async fn release_held(&self, ctx: &RunContext) -> Result<bool, SubscriberError> {
        let held = self.held().await?;
        let mut current_stream: Option<String> = None;
        let mut stream_blocked = false;
        for entry in held {
            if current_stream.as_deref() != Some(entry.stream.as_str()) {
                current_stream = Some(entry.stream.clone());
                stream_blocked = false;
            }
            if stream_blocked {
                continue;
            }
            let runnable = match entry.state {
                EffectState::Parked => false,
                EffectState::RetryRequested => true,
                // Blocked entries run once nothing before them is parked
                // (or when the policy no longer holds streams).
                EffectState::Blocked => true,
                // Under way when a run stopped (crash, failed journal write,
                // shutdown during a backoff): run again with the same key,
                // even if the checkpoint is already past it.
                EffectState::Started => true,
                // A failed attempt runs again once its backoff is over.
                EffectState::Failed => {
                    self.failed_any
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    if self.due(&entry) > Utc::now() {
                        // Later events of its stream wait behind it.
                        stream_blocked = self.options.park_policy == ParkPolicy::HoldStream;
                        continue;
                    }
                    true
                }
                EffectState::Done | EffectState::Skipped => continue,
            };
            if !runnable {
                stream_blocked = self.options.park_policy == ParkPolicy::HoldStream;
                continue;
            }
            if ctx.stopping() {
                return Ok(false);
            }
            let Some(stored) = self
                .store
                .find_event(entry.event_id)
                .await
                .map_err(|e| self.store_error(e))?
            else {
                let gone = Effect {
                    state: EffectState::Parked,
                    last_error: Some("the event is no longer in the store".into()),
                    updated_at: Utc::now(),
                    ..entry
                };
                self.record(&gone, ctx).await?;
                stream_blocked = self.options.park_policy == ParkPolicy::HoldStream;
                continue;
            };
            // An operator retry starts a fresh round of attempts.
            let attempts = if entry.state == EffectState::RetryRequested {
                0
            } else {
                entry.attempts
            };
            match self.run_effect(ctx, &stored, attempts).await? {
                Ran::Done => {}
                Ran::Parked => stream_blocked = self.options.park_policy == ParkPolicy::HoldStream,
                Ran::Waiting => {
                    stream_blocked = self.options.park_policy == ParkPolicy::HoldStream;
                }
            }
        }
        Ok(true)
    }
}

#[async_trait]
impl<R, S, J, C> Subscriber for ReactorRunner<R, S, J, C>
where
    R: Reactor,
    S: EventStore + Clone,
    J: EffectJournal,
    C: CheckpointStore,
{
    fn name(&self) -> &str {
        &self.key
    }

    async fn run(&self, ctx: &mut RunContext) -> Result<(), SubscriberError> {
        engine::drive(self, &self.store, ctx, false)
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl<R, S, J, C> PageHandler for ReactorRunner<R, S, J, C>
where
    R: Reactor,
    S: EventStore + Clone,
    J: EffectJournal,
    C: CheckpointStore,
{
    type Run = ();

    /// `catch_up` includes the retries of what failed.
    const CATCH_UP_WAITS_FOR_DUE: bool = true;

    fn key(&self) -> &str {
        &self.key
    }

    fn subscription(&self) -> &SubscriptionOptions {
        &self.options.subscription
    }

    fn types(&self) -> Vec<&'static str> {
        R::Event::event_types().to_vec()
    }

    fn partition(&self) -> Option<Partition> {
        self.partition
    }

    /// Resumes the checkpoint, raised to the journal's cleanup mark: every
    /// event up to the mark was handled by every partition of the layout
    /// that was cleaned up, and its entries may be gone, so a runner of a
    /// new layout (whose partitions start without checkpoints) must not read
    /// them again.
    async fn start(
        &self,
        ctx: &RunContext,
        _catch_up: bool,
    ) -> Result<(Position, ()), SubscriberError> {
        let start = engine::resume_in(self, &self.checkpoints, &self.store, ctx).await?;
        let mark = self.cleanup_mark().await?;
        if start >= mark {
            return Ok((start, ()));
        }
        tracing::info!(reactor = %self.key, from = %start, to = %mark, "starting after the journal's cleanup mark");
        engine::save_in(self, &self.checkpoints, ctx, start, mark).await?;
        Ok((mark, ()))
    }

    async fn before_page(&self, ctx: &RunContext, _run: &mut ()) -> Result<bool, SubscriberError> {
        self.release_held(ctx).await
    }

    async fn handle(
        &self,
        ctx: &mut RunContext,
        _run: &mut (),
        saved: Position,
        page: &Page,
    ) -> Result<Handled, SubscriberError> {
        let (prefix, interrupted) = self.process_page(ctx, saved, &page.events).await?;
        Ok(if interrupted {
            Handled::interrupted(saved, prefix.unwrap_or(saved))
        } else {
            Handled::page(saved, page)
        })
    }

    /// Fenced: from the checkpoint this run saved last (a lost race fails
    /// with `CheckpointMoved`; the run starts over from what is stored).
    async fn commit(
        &self,
        ctx: &RunContext,
        _run: &mut (),
        from: Position,
        to: Position,
    ) -> Result<(), SubscriberError> {
        engine::save_in(self, &self.checkpoints, ctx, from, to).await
    }

    /// When an effect's backoff is over (a `Failed` entry of a page or of
    /// `release_held`).
    async fn due_in(&self, _run: &mut ()) -> Result<Option<std::time::Duration>, SubscriberError> {
        Ok(self.next_due().await?.map(|due| {
            (due - Utc::now())
                .to_std()
                .unwrap_or(std::time::Duration::ZERO)
        }))
    }
}
