//! Runs a [`ProcessManager`]: routes events to instances, records each
//! instance's decisions in its stream, dispatches them from the log, fires
//! deadlines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use futures::TryStreamExt;
use futures::stream::FuturesUnordered;

use super::bus::{CommandBus, DispatchError, Dispatched};
use super::clock::{Clock, SystemClock};
use super::deadline::{Deadline, DeadlineStore};
use super::input::{CommandSpec, DeadlineReached, Input, Rejection, Route};
use super::instance::{Decision, Instance};
use super::record::{
    DISPATCHED_TYPES, InputRecord, ProcessRecord, check_name, instance_of, rejection_id,
};
use super::{ProcessManager, ProcessOptions};
use crate::aggregate::CommandMeta;
use crate::event::{Event, Position, Recorded, StoredEvent};
use crate::store::{Direction, EventStore, ExpectedVersion, StoreError, read_stream_all};
use crate::subscription::{CatchUp, CheckpointStore, resume, stopped};
use crate::worker::{RunContext, Subscriber, SubscriberError, SubscriberState};

/// Appends retried after a version conflict on an instance's stream.
const CONFLICT_ATTEMPTS: u32 = 5;

/// Runs process manager `P` as a [`Subscriber`]: events from `store`,
/// commands through `bus`, deadlines in `deadlines`, position in
/// `checkpoints` (for SQLite, store, deadlines and checkpoints can all be
/// the same [`SqliteStore`](crate::SqliteStore)).
pub struct ProcessRunner<P: ProcessManager, S, D, C> {
    process: P,
    store: S,
    bus: CommandBus,
    deadlines: D,
    checkpoints: C,
    clock: Arc<dyn Clock>,
    options: ProcessOptions,
    cache: Mutex<HashMap<String, Instance<P>>>,
    /// Command ids this runner recorded and has not dispatched yet: their
    /// first dispatch skips the target's command-inbox lookup.
    fresh: Mutex<std::collections::HashSet<uuid::Uuid>>,
}

/// One event of a page, for one instance's lane.
enum Item<'a, I> {
    Input {
        stored: &'a StoredEvent,
        event: Recorded<I>,
        route: Route,
    },
    Record(&'a StoredEvent),
}

impl<P, S, D, C> ProcessRunner<P, S, D, C>
where
    P: ProcessManager,
    S: EventStore + Clone,
    D: DeadlineStore,
    C: CheckpointStore,
{
    /// A runner with default options and the system clock.
    pub fn new(process: P, store: S, bus: CommandBus, deadlines: D, checkpoints: C) -> Self {
        ProcessRunner {
            process,
            store,
            bus,
            deadlines,
            checkpoints,
            clock: Arc::new(SystemClock),
            options: ProcessOptions::default(),
            cache: Mutex::new(HashMap::new()),
            fresh: Mutex::default(),
        }
    }

    /// Sets the options.
    pub fn options(mut self, options: ProcessOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the clock deadlines are due by (a [`ManualClock`](super::ManualClock) in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The process.
    pub fn process(&self) -> &P {
        &self.process
    }

    /// The deadline store.
    pub fn deadlines(&self) -> &D {
        &self.deadlines
    }

    /// Loads instance `id` from its stream (for inspection and tests).
    pub async fn instance(&self, id: &str) -> Result<Instance<P>, SubscriberError> {
        self.load(id).await
    }

    /// Runs until caught up with the head as of now, firing the deadlines
    /// due by the clock, then returns the checkpoint. For tests, tools and
    /// examples; outputs recorded meanwhile are dispatched by the next call.
    pub async fn catch_up(&self) -> Result<Position, SubscriberError> {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let mut ctx = RunContext::standalone(P::NAME, rx);
        self.run_loop(&mut ctx, true).await
    }

    fn store_error(&self, source: StoreError) -> SubscriberError {
        SubscriberError::Store {
            subscriber: P::NAME.to_owned(),
            source,
        }
    }

    fn event_error(&self, stored: &StoredEvent, message: impl Into<String>) -> SubscriberError {
        SubscriberError::Event {
            subscriber: P::NAME.to_owned(),
            position: stored.position,
            stream: stored.stream.clone(),
            version: stored.version,
            event_type: stored.event_type.clone(),
            message: message.into(),
        }
    }

    fn instance_error(
        &self,
        inst: &Instance<P>,
        what: &str,
        message: impl Into<String>,
    ) -> SubscriberError {
        SubscriberError::Event {
            subscriber: P::NAME.to_owned(),
            position: Position::ORIGIN,
            stream: inst.stream(),
            version: inst.version,
            event_type: what.to_owned(),
            message: message.into(),
        }
    }

    fn check_config(&self) -> Result<(), SubscriberError> {
        let config = |message| SubscriberError::Config {
            subscriber: P::NAME.to_owned(),
            message,
        };
        check_name(P::NAME).map_err(config)?;
        let types = P::Input::event_types();
        for (i, t) in types.iter().enumerate() {
            if types[..i].contains(t) {
                return Err(config(format!(
                    "input type name `{t}` is decoded by two members of the input enum; \
                     rename one with #[event(name = \"..\")]"
                )));
            }
            if t.starts_with("aftermath.process.") {
                return Err(config(format!(
                    "input type name `{t}` is reserved for process records"
                )));
            }
        }
        Ok(())
    }

    /// Folds instance `id` from its stream.
    async fn load(&self, id: &str) -> Result<Instance<P>, SubscriberError> {
        let mut inst = Instance::<P>::new(id);
        let stream = inst.stream();
        let mut events = std::pin::pin!(read_stream_all(
            &self.store,
            &stream,
            1,
            Direction::Forward,
            self.options.subscription.batch_size.max(1),
        ));
        while let Some(stored) = events.try_next().await.map_err(|e| self.store_error(e))? {
            let record = stored
                .decode_known::<ProcessRecord>()
                .map_err(|e| self.event_error(&stored, e.message))?;
            inst.fold_stored(
                &self.process,
                &record.event,
                &stored.metadata,
                stored.version,
                &|e| self.store.upcast(e),
            )
            .map_err(|m| self.event_error(&stored, m))?;
        }
        Ok(inst)
    }

    async fn take(&self, id: &str) -> Result<Instance<P>, SubscriberError> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        match cached {
            Some(inst) => Ok(inst),
            None => self.load(id).await,
        }
    }

    fn put(&self, inst: Instance<P>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(inst.id.clone(), inst);
        let cap = self.options.cache_size.max(1);
        if cache.len() > cap {
            // Down to 90%, so this scan runs once per cap/10 inserts.
            cache.retain(|_, i| !i.completed);
            let extra = cache.len().saturating_sub(cap - cap / 10);
            let evict: Vec<String> = cache.keys().take(extra).cloned().collect();
            for k in evict {
                cache.remove(&k);
            }
        }
    }

    async fn run_loop(
        &self,
        ctx: &mut RunContext,
        until_caught_up: bool,
    ) -> Result<Position, SubscriberError> {
        self.check_config()?;
        if !until_caught_up {
            // A new run may follow another owner: forget what was cached.
            // (A stale instance would only cost a version conflict and a
            // reload; `catch_up` keeps the cache between calls.)
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
            self.fresh.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let start = resume(
            &self.checkpoints,
            P::NAME,
            self.options.subscription.start_from,
            &self.store,
            ctx.lease.as_ref(),
        )
        .await
        .map_err(|e| self.store_error(e))?;
        let mut types: Vec<&'static str> = P::Input::event_types().to_vec();
        types.extend_from_slice(DISPATCHED_TYPES);
        let mut reader = CatchUp::new(
            self.store.clone(),
            Some(types),
            start,
            self.options.subscription.clone(),
        );
        let mut jumps = self.clock.jumps();
        let mut saved = start;
        loop {
            if ctx.stopping() {
                return Ok(saved);
            }
            let page = reader.next_page().await.map_err(|e| self.store_error(e))?;
            let caught_up = page.caught_up;
            let lag = reader.lag();
            ctx.report(|s| {
                s.lag = lag;
                s.state = if caught_up {
                    SubscriberState::Live
                } else {
                    SubscriberState::CatchingUp
                };
            });
            if !page.events.is_empty() && !self.process_page(ctx, &page.events).await? {
                return Ok(saved);
            }
            if page.through > saved {
                match self
                    .checkpoints
                    .save(P::NAME, Some(saved), page.through, ctx.lease.as_ref())
                    .await
                {
                    Ok(()) => saved = page.through,
                    // Another runner moved it (inputs are idempotent per
                    // instance stream): continue from what is stored.
                    Err(StoreError::CheckpointMoved { .. }) => {
                        saved = self
                            .checkpoints
                            .load(P::NAME)
                            .await
                            .map_err(|e| self.store_error(e))?
                            .unwrap_or(saved);
                    }
                    Err(e) => return Err(self.store_error(e)),
                }
            }
            reader.advance(page.through);
            let lag = reader.lag();
            ctx.report_progress(lag);
            // Deadlines come after the inputs recorded before they were due:
            // while behind, only those due by the last event handled fire (a
            // cancellation waiting in the log must win over its deadline).
            let now = self.clock.now();
            let cutoff = match page.events.last() {
                Some(last) if !caught_up => now.min(last.recorded_at),
                _ => now,
            };
            if !self.fire_deadlines(ctx, cutoff).await? {
                return Ok(saved);
            }
            if caught_up {
                if until_caught_up {
                    return Ok(saved);
                }
                let wait = self.until_next_deadline().await?;
                let mut stop = ctx.shutdown.clone();
                tokio::select! {
                    more = reader.wait_for_more(&mut stop) => {
                        if !more {
                            return Ok(saved);
                        }
                    }
                    _ = tokio::time::sleep(wait) => {}
                    _ = async {
                        match jumps.as_mut() {
                            Some(j) => { let _ = j.changed().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {}
                }
            }
        }
    }

    /// How long to sleep before looking at deadlines again.
    async fn until_next_deadline(&self) -> Result<std::time::Duration, SubscriberError> {
        let poll = self.options.deadline_poll;
        let next = self
            .deadlines
            .next_due(P::NAME)
            .await
            .map_err(|e| self.store_error(e))?;
        Ok(match next {
            Some(due) => (due - self.clock.now())
                .to_std()
                .unwrap_or(std::time::Duration::ZERO)
                .min(poll),
            None => poll,
        })
    }

    /// Delivers the deadlines due by `cutoff`. Returns false on shutdown.
    async fn fire_deadlines(
        &self,
        ctx: &RunContext,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, SubscriberError> {
        let batch = self.options.subscription.batch_size.max(1);
        loop {
            let due = self
                .deadlines
                .due(P::NAME, cutoff, batch)
                .await
                .map_err(|e| self.store_error(e))?;
            let n = due.len();
            for deadline in due {
                if ctx.stopping() {
                    return Ok(false);
                }
                self.fire(ctx, &deadline).await?;
            }
            if n < batch {
                return Ok(true);
            }
        }
    }

    async fn fire(&self, ctx: &RunContext, deadline: &Deadline) -> Result<(), SubscriberError> {
        let mut inst = self.take(&deadline.instance).await?;
        if inst.exists() {
            let reached = DeadlineReached {
                id: deadline.id,
                name: deadline.name.clone(),
                due_at: deadline.due_at,
            };
            let record = InputRecord::Deadline {
                at: reached.due_at,
                deadline: reached.clone(),
            };
            let correlation = inst.correlation_id;
            self.handle_input(
                ctx,
                &mut inst,
                Input::Deadline(reached),
                record,
                false,
                correlation,
            )
            .await?;
        }
        self.put(inst);
        // Delivered (or recognised as stale): the row has done its job.
        self.deadlines
            .cancel(P::NAME, deadline.id)
            .await
            .map_err(|e| self.store_error(e))
    }

    /// Runs a page: lanes per instance, in parallel up to the concurrency
    /// limit. Returns false when shutdown interrupted it.
    async fn process_page(
        &self,
        ctx: &RunContext,
        events: &[StoredEvent],
    ) -> Result<bool, SubscriberError> {
        let mut order: Vec<String> = Vec::new();
        let mut lanes: HashMap<String, Vec<Item<'_, P::Input>>> = HashMap::new();
        for stored in events {
            let (instance, item) = if let Some(instance) = instance_of(P::NAME, &stored.stream) {
                (instance.to_owned(), Item::Record(stored))
            } else if DISPATCHED_TYPES.contains(&stored.event_type.as_str()) {
                // Another process's record.
                continue;
            } else {
                let event = match stored.decode::<P::Input>() {
                    Ok(Some(e)) => e,
                    // Read because its type is one of the inputs' names.
                    Ok(None) => {
                        return Err(self.event_error(
                            stored,
                            "the input enum lists this type in event_types() but does not decode it",
                        ));
                    }
                    Err(e) => return Err(self.event_error(stored, e.message)),
                };
                let route = self.process.route(&event);
                let Some(instance) = route.instance() else {
                    continue;
                };
                (
                    instance.to_owned(),
                    Item::Input {
                        stored,
                        event,
                        route,
                    },
                )
            };
            lanes
                .entry(instance)
                .or_insert_with_key(|k| {
                    order.push(k.clone());
                    Vec::new()
                })
                .push(item);
        }
        let mut waiting = order.into_iter();
        let mut running = FuturesUnordered::new();
        let mut complete = true;
        let mut failure = None;
        loop {
            while running.len() < self.options.concurrency.max(1) && failure.is_none() {
                let Some(instance) = waiting.next() else {
                    break;
                };
                let items = lanes.remove(&instance).unwrap_or_default();
                running.push(self.run_lane(ctx, instance, items));
            }
            match running.next().await {
                Some(Ok(done)) => complete &= done,
                Some(Err(e)) => failure = Some(e),
                None => break,
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(complete),
        }
    }

    async fn run_lane(
        &self,
        ctx: &RunContext,
        instance: String,
        items: Vec<Item<'_, P::Input>>,
    ) -> Result<bool, SubscriberError> {
        let mut inst = self.take(&instance).await?;
        for item in items {
            if ctx.stopping() {
                self.put(inst);
                return Ok(false);
            }
            match item {
                Item::Input {
                    stored,
                    event,
                    route,
                } => self.on_event(ctx, &mut inst, stored, event, route).await?,
                Item::Record(stored) => {
                    if !self.on_record(ctx, &mut inst, stored).await? {
                        self.put(inst);
                        return Ok(false);
                    }
                }
            }
        }
        self.put(inst);
        Ok(true)
    }

    async fn on_event(
        &self,
        ctx: &RunContext,
        inst: &mut Instance<P>,
        stored: &StoredEvent,
        event: Recorded<P::Input>,
        route: Route,
    ) -> Result<(), SubscriberError> {
        if inst.has_handled(stored.id) {
            return Ok(());
        }
        if inst.completed {
            tracing::debug!(process = P::NAME, instance = %inst.id, event_id = %stored.id, "event for a completed instance ignored");
            return Ok(());
        }
        let exists = inst.exists();
        let misrouted = match &route {
            Route::StartStrict(_) if exists => Some("the instance already exists"),
            Route::ContinueStrict(_) | Route::StopStrict(_) if !exists => {
                Some("the instance does not exist")
            }
            Route::Continue(_) | Route::Stop(_) if !exists => {
                tracing::debug!(process = P::NAME, instance = %inst.id, event_id = %stored.id, "event for an instance that does not exist ignored");
                return Ok(());
            }
            _ => None,
        };
        if let Some(why) = misrouted {
            let message = format!("routed with {route:?}, but {why}");
            if self.options.skip_misrouted {
                tracing::error!(process = P::NAME, event_id = %stored.id, stream = %stored.stream, position = %stored.position, %message, "misrouted event skipped");
                ctx.report(|s| s.skipped += 1);
                return Ok(());
            }
            return Err(self.event_error(stored, message));
        }
        let record = InputRecord::of_event(stored, self.clock.now())
            .map_err(|m| self.event_error(stored, m))?;
        let correlation = stored.metadata.correlation_id;
        self.handle_input(
            ctx,
            inst,
            Input::Event(event),
            record,
            route.stops(),
            correlation,
        )
        .await
    }

    /// Decides and appends one input, reloading on a version conflict.
    async fn handle_input(
        &self,
        ctx: &RunContext,
        inst: &mut Instance<P>,
        input: Input<P::Input>,
        record: InputRecord,
        stop: bool,
        correlation_if_new: uuid::Uuid,
    ) -> Result<(), SubscriberError> {
        let input_id = record.id();
        for _ in 0..CONFLICT_ATTEMPTS {
            let decision = inst
                .decide(&self.process, &input, record.clone(), stop)
                .map_err(|m| {
                    self.instance_error(inst, "handle", format!("input {input_id}: {m}"))
                })?;
            let (records, state) = match decision {
                Decision::Duplicate => return Ok(()),
                Decision::Ignored(why) => {
                    tracing::debug!(process = P::NAME, instance = %inst.id, input = %input_id, why, "input ignored");
                    return Ok(());
                }
                Decision::Append { records, state } => (records, state),
            };
            let correlation = if inst.exists() {
                inst.correlation_id
            } else {
                correlation_if_new
            };
            let data = inst
                .event_data(correlation, &records)
                .map_err(|e| self.instance_error(inst, "encode", e.to_string()))?;
            let stream = inst.stream();
            let ids: Vec<uuid::Uuid> = data.iter().map(|d| d.id).collect();
            match self
                .store
                .append(&stream, ExpectedVersion::Exact(inst.version), data)
                .await
            {
                Ok(done) => {
                    if !done.duplicate {
                        let mut fresh = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
                        for (r, d) in records.iter().zip(&ids) {
                            if matches!(r, ProcessRecord::CommandSent { .. }) {
                                fresh.insert(*d);
                            }
                        }
                    }
                    inst.commit(&records, state, correlation, done.last_version);
                    ctx.report(|s| s.handled += 1);
                    return Ok(());
                }
                Err(
                    StoreError::WrongExpectedVersion { .. } | StoreError::DuplicateEventId { .. },
                ) => {
                    // Another owner (or an earlier run) appended: fold what it did.
                    *inst = self.load(&inst.id).await?;
                }
                Err(e) => return Err(self.store_error(e)),
            }
        }
        Err(self.store_error(StoreError::database(
            "appending to a process instance",
            std::io::Error::other(format!(
                "stream `{}` kept changing: gave up after {CONFLICT_ATTEMPTS} attempts",
                inst.stream()
            )),
        )))
    }

    /// Carries out one recorded output. Returns false on shutdown.
    async fn on_record(
        &self,
        ctx: &RunContext,
        inst: &mut Instance<P>,
        stored: &StoredEvent,
    ) -> Result<bool, SubscriberError> {
        if inst.version < stored.version {
            *inst = self.load(&inst.id).await?;
        }
        let record = stored
            .decode_known::<ProcessRecord>()
            .map_err(|e| self.event_error(stored, e.message))?
            .event;
        let db = |e| self.store_error(e);
        match record {
            ProcessRecord::CommandSent {
                command,
                compensation,
            } => {
                let rejected = rejection_id(stored.id);
                if inst.has_handled(rejected) {
                    return Ok(true);
                }
                let mut meta = CommandMeta::with_id(stored.id)
                    .correlation(stored.metadata.correlation_id)
                    .causation(stored.id);
                if self
                    .fresh
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&stored.id)
                {
                    meta = meta.fresh();
                }
                let Some(outcome) = self.dispatch(ctx, stored, &command, meta).await? else {
                    return Ok(false);
                };
                if let Dispatched::Rejected(error) = outcome {
                    tracing::info!(process = P::NAME, instance = %inst.id, command_id = %stored.id, target = %command.target, id = %command.id, %error, "command rejected");
                    if inst.completed {
                        tracing::warn!(process = P::NAME, instance = %inst.id, command_id = %stored.id, "a command of a completed instance was rejected; recorded, nothing handles it");
                    }
                    let rejection = Rejection {
                        command_id: stored.id,
                        command,
                        compensation,
                        error,
                    };
                    let record = InputRecord::Rejected {
                        id: rejected,
                        at: self.clock.now(),
                        rejection: rejection.clone(),
                    };
                    let correlation = inst.correlation_id;
                    self.handle_input(
                        ctx,
                        inst,
                        Input::Rejected(rejection),
                        record,
                        false,
                        correlation,
                    )
                    .await?;
                }
            }
            ProcessRecord::DeadlineSet { id, name, due_at } => {
                if inst.deadline_active(id) {
                    self.deadlines
                        .schedule(&Deadline {
                            process: P::NAME.to_owned(),
                            instance: inst.id.clone(),
                            id,
                            name,
                            due_at,
                        })
                        .await
                        .map_err(db)?;
                }
            }
            ProcessRecord::DeadlineCancelled { id, .. } => {
                self.deadlines.cancel(P::NAME, id).await.map_err(db)?
            }
            ProcessRecord::Completed {} => self
                .deadlines
                .cancel_instance(P::NAME, &inst.id)
                .await
                .map_err(db)?,
            ProcessRecord::Received { .. }
            | ProcessRecord::CompensationRegistered { .. }
            | ProcessRecord::Compensating { .. } => {}
        }
        Ok(true)
    }

    /// Dispatches with retries of transient failures; `None` on shutdown.
    async fn dispatch(
        &self,
        ctx: &RunContext,
        stored: &StoredEvent,
        command: &CommandSpec,
        meta: CommandMeta,
    ) -> Result<Option<Dispatched>, SubscriberError> {
        let attempts = self.options.dispatch_attempts.max(1);
        let mut delay = self.options.dispatch_retry_delay;
        let mut stop = ctx.shutdown.clone();
        for attempt in 1..=attempts {
            let span = tracing::info_span!("dispatch", process = P::NAME, command_id = %stored.id, target = %command.target, id = %command.id, attempt);
            let result =
                tracing::Instrument::instrument(self.bus.dispatch(command, meta.clone()), span)
                    .await;
            match result {
                Ok(outcome) => return Ok(Some(outcome)),
                Err(DispatchError::Store { source, .. }) if attempt == attempts => {
                    return Err(self.store_error(source));
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(process = P::NAME, command_id = %stored.id, attempt, error = %e, "dispatch failed; retrying");
                    tokio::select! {
                        _ = stopped(&mut stop) => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = delay.saturating_mul(2);
                }
                Err(e) => return Err(self.event_error(stored, e.to_string())),
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl<P, S, D, C> Subscriber for ProcessRunner<P, S, D, C>
where
    P: ProcessManager,
    S: EventStore + Clone,
    D: DeadlineStore,
    C: CheckpointStore,
{
    fn name(&self) -> &str {
        P::NAME
    }

    async fn run(&self, ctx: &mut RunContext) -> Result<(), SubscriberError> {
        self.run_loop(ctx, false).await.map(|_| ())
    }
}
