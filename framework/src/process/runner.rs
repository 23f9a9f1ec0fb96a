//! Runs a [`ProcessManager`]: routes events to instances, records each
//! instance's decisions in its stream, dispatches them from the log, fires
//! deadlines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::FutureExt;
use futures::StreamExt;
use futures::TryStreamExt;
use futures::stream::FuturesUnordered;

use super::bus::{CommandBus, DispatchError, Dispatched};
use super::clock::{Clock, SystemClock};
use super::deadline::{Deadline, DeadlineStore};
use super::input::{CommandSpec, DeadlineReached, Input, Rejection, Route};
use super::instance::{Decision, Instance, Parking};
use super::record::{
    DISPATCHED_TYPES, InputRecord, ProcessRecord, check_name, control_id, instance_of, rejection_id,
};
use super::{ProcessManager, ProcessOptions};
use crate::aggregate::CommandMeta;
use crate::event::{Event, EventData, Metadata, Position, Recorded, StoredEvent};
use crate::store::{Direction, EventStore, ExpectedVersion, StoreError, read_stream_all};
use crate::subscription::engine::{self, Handled, PageEnd, PageHandler};
use crate::subscription::{CheckpointStore, Page, Partition, SubscriptionOptions, stopped};
use crate::worker::{RunContext, Subscriber, SubscriberError, panic_message};

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
    /// The instances this runner handles, when partitioned.
    partition: Option<Partition>,
    /// Its checkpoint and lease key: `P::NAME`, or the partition's key.
    key: String,
}

/// One event of a page, for one instance's lane.
// Built once per event of a page and moved into its lane: boxing the large
// variant would allocate per event to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
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
            partition: None,
            key: P::NAME.to_owned(),
        }
    }

    /// Handles only the instances in partition `index` of `count`: those
    /// whose stream (`<process>.process-<instance>`) has its
    /// [`stream_hash`](crate::subscription::stream_hash) in that partition,
    /// so the instances of a process run on up to `count` workers in
    /// parallel while each instance's inputs stay in order, in one
    /// partition. The checkpoint and lease key become
    /// `<process>#<index>of<count>`, and the partition fires only its own
    /// instances' deadlines. Run every partition with
    /// [`Worker::add_partitioned`](crate::worker::Worker::add_partitioned),
    /// which spreads them over the workers of a group.
    ///
    /// Each partition reads every input event (an input's partition is
    /// known only once it is routed to its instance) and keeps those of its
    /// instances; its own records are filtered by stream.
    ///
    /// Changing `count` gives every partition a fresh checkpoint: the new
    /// partitions read the log again from
    /// [`SubscriptionOptions::start_from`](crate::subscription::SubscriptionOptions),
    /// which repeats nothing (an instance's stream records the inputs it
    /// handled, commands carry derived ids the targets deduplicate, and
    /// deadline rows are keyed by id) but costs a read of the log. While
    /// runners of the old and the new count overlap (a rolling deploy), both
    /// may handle one instance: its stream's expected version serializes
    /// them, and the loser reloads and finds the input handled.
    ///
    /// # Panics
    ///
    /// When `count` is 0 or `index >= count`.
    pub fn partition(mut self, index: u32, count: u32) -> Self {
        let partition = Partition::new(index, count);
        self.key = partition.key(P::NAME);
        self.partition = Some(partition);
        self
    }

    /// Whether instance `id` is this runner's (always when unpartitioned).
    fn owns(&self, instance: &str) -> bool {
        self.partition
            .is_none_or(|p| p.contains(&super::record::stream_of(P::NAME, instance)))
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
        let mut ctx = RunContext::standalone(&self.key, rx);
        engine::drive(self, &self.store, &mut ctx, true).await
    }

    fn store_error(&self, source: StoreError) -> SubscriberError {
        SubscriberError::Store {
            subscriber: self.key.clone(),
            source,
        }
    }

    /// An instance stream that kept changing under `operation` (another
    /// runner appending to it): a store error, retried by the worker.
    fn kept_changing(&self, operation: &'static str, stream: &str) -> SubscriberError {
        self.store_error(StoreError::database(
            operation,
            std::io::Error::other(format!(
                "stream `{stream}` kept changing: gave up after {CONFLICT_ATTEMPTS} attempts"
            )),
        ))
    }

    fn event_error(&self, stored: &StoredEvent, message: impl Into<String>) -> SubscriberError {
        SubscriberError::Event {
            subscriber: self.key.clone(),
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
            subscriber: self.key.clone(),
            position: Position::ORIGIN,
            stream: inst.stream(),
            version: inst.version,
            event_type: what.to_owned(),
            message: message.into(),
        }
    }

    fn check_config(&self) -> Result<(), SubscriberError> {
        let config = |message| SubscriberError::Config {
            subscriber: self.key.clone(),
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
            // `apply` is user code: a panic is an error of this instance's
            // load (the runner restarts with backoff), never a crash.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                inst.fold_stored(
                    &self.process,
                    &record.event,
                    &stored.metadata,
                    stored.version,
                    &|e| self.store.upcast(e),
                )
            }))
            .unwrap_or_else(|panic| {
                Err(format!(
                    "apply panicked while loading: {}",
                    panic_message(panic.as_ref())
                ))
            })
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

    /// How long to sleep before looking at deadlines again.
    async fn until_next_deadline(&self) -> Result<std::time::Duration, SubscriberError> {
        let poll = self.options.deadline_poll;
        let next = self
            .deadlines
            .next_due(P::NAME, self.partition)
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
                .due(P::NAME, self.partition, cutoff, batch)
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
            let span = tracing::info_span!(
                "aftermath.deadline",
                otel.name = %format_args!("deadline {}", deadline.name),
                otel.kind = "internal",
                aftermath.process = P::NAME,
                aftermath.instance = %deadline.instance,
                aftermath.deadline = %deadline.name,
            );
            let parent = inst.trace.clone();
            crate::trace::continue_in(
                span,
                parent,
                self.handle_input(
                    ctx,
                    &mut inst,
                    Input::Deadline(reached),
                    record,
                    false,
                    correlation,
                    None,
                ),
            )
            .await?;
            metrics::counter!(crate::trace::DEADLINES_FIRED, "process" => P::NAME).increment(1);
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
                if !self.owns(instance) {
                    continue;
                }
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
                if !self.owns(instance) {
                    continue;
                }
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
            let stored = match &item {
                Item::Input { stored, .. } | Item::Record(stored) => *stored,
            };
            let span = crate::trace::handle_span(
                P::NAME,
                &stored.event_type,
                stored.id,
                &stored.stream,
                stored.position,
            );
            let parent = stored.metadata.trace.clone();
            match item {
                Item::Input {
                    stored,
                    event,
                    route,
                } => {
                    crate::trace::continue_in(
                        span,
                        parent,
                        self.on_event(ctx, &mut inst, stored, event, route),
                    )
                    .await?
                }
                Item::Record(stored) => {
                    let carried = crate::trace::continue_in(
                        span,
                        parent,
                        self.on_record(ctx, &mut inst, stored),
                    )
                    .await?;
                    if !carried {
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
        let record = InputRecord::of_event(stored, self.clock.now())
            .map_err(|m| self.event_error(stored, m))?;
        let correlation = stored.metadata.correlation_id;
        // A parked instance holds every input, misrouted or not.
        if let Some(why) = misrouted
            && inst.parked.is_none()
        {
            let message = format!(
                "event {} ({} v{}, `{}`) routed with {route:?}, but {why}",
                stored.id, stored.stream, stored.version, stored.event_type
            );
            if self.options.skip_misrouted {
                tracing::error!(process = P::NAME, event_id = %stored.id, stream = %stored.stream, position = %stored.position, %message, "misrouted event skipped");
                ctx.report(|s| s.skipped += 1);
                return Ok(());
            }
            // The instance's failure, not the runner's: parked with the
            // input, for an operator's retry (handles it as routed) or skip.
            return self
                .park(
                    ctx,
                    inst,
                    Some((record, route.stops())),
                    None,
                    message,
                    correlation,
                    None,
                )
                .await;
        }
        self.handle_input(
            ctx,
            inst,
            Input::Event(event),
            record,
            route.stops(),
            correlation,
            None,
        )
        .await
    }

    /// Decides and appends one input, reloading on a version conflict. An
    /// input for a parked instance is recorded `Held`; an input whose
    /// `apply`/`handle` fails or panics, or whose outputs do not serialize,
    /// parks the instance (`floor`: see [`Self::park`]).
    #[allow(clippy::too_many_arguments)]
    async fn handle_input(
        &self,
        ctx: &RunContext,
        inst: &mut Instance<P>,
        input: Input<P::Input>,
        record: InputRecord,
        stop: bool,
        correlation_if_new: uuid::Uuid,
        floor: Option<u64>,
    ) -> Result<(), SubscriberError> {
        let input_id = record.id();
        for _ in 0..CONFLICT_ATTEMPTS {
            if inst.has_handled(input_id) {
                return Ok(());
            }
            if inst.parked.is_some() {
                if inst.is_held(input_id) {
                    return Ok(());
                }
                let held = ProcessRecord::Held {
                    input: record.clone(),
                    stop,
                };
                if self
                    .append_control(inst, "held", held, record.cause(), correlation_if_new)
                    .await?
                {
                    tracing::info!(process = P::NAME, instance = %inst.id, input = %input_id, "input held behind a parked instance");
                    return Ok(());
                }
                continue;
            }
            let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                inst.decide(&self.process, &input, record.clone(), stop)
            }))
            .unwrap_or_else(|panic| {
                Err(format!(
                    "apply/handle panicked: {}",
                    panic_message(panic.as_ref())
                ))
            });
            let decision = match decided {
                Ok(d) => d,
                Err(m) => {
                    let error = format!("input {input_id}: {m}");
                    return self
                        .park(
                            ctx,
                            inst,
                            Some((record, stop)),
                            None,
                            error,
                            correlation_if_new,
                            floor,
                        )
                        .await;
                }
            };
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
            let data = match inst.event_data(correlation, &records) {
                Ok(data) => data,
                Err(e) => {
                    let error = format!("input {input_id}: an output does not serialize: {e}");
                    return self
                        .park(
                            ctx,
                            inst,
                            Some((record, stop)),
                            None,
                            error,
                            correlation_if_new,
                            floor,
                        )
                        .await;
                }
            };
            let stream = inst.stream();
            match self
                .store
                .append(&stream, ExpectedVersion::Exact(inst.version), data)
                .await
            {
                Ok(done) => {
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
        Err(self.kept_changing("appending to a process instance", &inst.stream()))
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
        if let ProcessRecord::Released {
            from_version,
            parked_version,
            skip,
        } = record
        {
            return self
                .release(ctx, inst, stored, from_version, parked_version, skip)
                .await;
        }
        // A parked instance does nothing from its parking on: what is
        // passed over here is carried out when an operator releases it.
        if let Some(p) = &inst.parked
            && stored.version >= p.from_version
        {
            return Ok(true);
        }
        self.carry_out(ctx, inst, stored, record, None).await
    }

    /// Carries out one decoded record (see [`Self::on_record`]).
    async fn carry_out(
        &self,
        ctx: &RunContext,
        inst: &mut Instance<P>,
        stored: &StoredEvent,
        record: ProcessRecord,
        floor: Option<u64>,
    ) -> Result<bool, SubscriberError> {
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
                let meta = CommandMeta::with_id(stored.id)
                    .correlation(stored.metadata.correlation_id)
                    .causation(stored.id);
                let dispatched = self.dispatch(ctx, stored, &command, meta).await?;
                let counted = match &dispatched {
                    None => None,
                    Some(Ok(Dispatched::Rejected(_))) => Some("rejected"),
                    Some(Ok(_)) => Some("accepted"),
                    Some(Err(_)) => Some("parked"),
                };
                if let Some(outcome) = counted {
                    metrics::counter!(crate::trace::PROCESS_COMMANDS, "process" => P::NAME, "outcome" => outcome)
                        .increment(1);
                }
                let outcome = match dispatched {
                    None => return Ok(false),
                    Some(Ok(outcome)) => outcome,
                    Some(Err(error)) => {
                        let correlation = inst.correlation_id;
                        self.park(
                            ctx,
                            inst,
                            None,
                            Some((stored.id, stored.version)),
                            error,
                            correlation,
                            floor,
                        )
                        .await?;
                        return Ok(true);
                    }
                };
                if let Dispatched::Rejected(error) = outcome {
                    tracing::info!(process = P::NAME, instance = %inst.id, command_id = %stored.id, target = %command.target, id = %command.id, %error, "command rejected");
                    if inst.completed {
                        tracing::debug!(process = P::NAME, instance = %inst.id, command_id = %stored.id, "a command of a completed instance was rejected (an expected race); recorded, nothing handles it");
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
                        floor,
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
            | ProcessRecord::Compensating { .. }
            | ProcessRecord::Parked { .. }
            | ProcessRecord::Held { .. }
            | ProcessRecord::Released { .. } => {}
        }
        Ok(true)
    }

    /// Appends one `Parked`/`Held`/`Released` record at the instance's
    /// version. `Ok(false)` after a version conflict: `inst` is reloaded.
    async fn append_control(
        &self,
        inst: &mut Instance<P>,
        kind: &str,
        record: ProcessRecord,
        causation: uuid::Uuid,
        correlation_if_new: uuid::Uuid,
    ) -> Result<bool, SubscriberError> {
        let correlation = if inst.exists() {
            inst.correlation_id
        } else {
            correlation_if_new
        };
        let id = control_id(P::NAME, &inst.id, kind, inst.version + 1);
        let mut metadata = Metadata {
            correlation_id: correlation,
            causation_id: causation,
            trace: None,
            extra: Default::default(),
        };
        crate::trace::inject_current(&mut metadata);
        let data = EventData::encode(&record, id, metadata)
            .map_err(|e| self.instance_error(inst, kind, e.to_string()))?;
        match self
            .store
            .append(
                &inst.stream(),
                ExpectedVersion::Exact(inst.version),
                vec![data],
            )
            .await
        {
            Ok(done) => {
                let state = inst.state.clone();
                inst.commit(&[record], state, correlation, done.last_version);
                Ok(true)
            }
            Err(StoreError::WrongExpectedVersion { .. } | StoreError::DuplicateEventId { .. }) => {
                *inst = self.load(&inst.id).await?;
                Ok(false)
            }
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Parks the instance: `input` (with its stop flag) failed, or the
    /// dispatch of command `(id, version of its CommandSent record)` did.
    /// `floor`: the parking being released when this failure happened
    /// (its `from_version`), so the new parking passes over (and its
    /// release carries out again) everything the first one did.
    #[allow(clippy::too_many_arguments)]
    async fn park(
        &self,
        ctx: &RunContext,
        inst: &mut Instance<P>,
        input: Option<(InputRecord, bool)>,
        command: Option<(uuid::Uuid, u64)>,
        error: String,
        correlation_if_new: uuid::Uuid,
        floor: Option<u64>,
    ) -> Result<(), SubscriberError> {
        let causation = match (&input, command) {
            (Some((r, _)), _) => r.cause(),
            (None, Some((c, _))) => c,
            (None, None) => inst.correlation_id,
        };
        for _ in 0..CONFLICT_ATTEMPTS {
            if inst.parked.is_some() {
                return Ok(());
            }
            if let Some((r, _)) = &input
                && inst.has_handled(r.id())
            {
                // Another runner handled it meanwhile.
                return Ok(());
            }
            let from = command.map_or(inst.version + 1, |(_, v)| v);
            let from = floor.map_or(from, |f| f.min(from));
            let record = ProcessRecord::Parked {
                input: input.as_ref().map(|(r, _)| r.clone()),
                stop: input.as_ref().is_some_and(|(_, s)| *s),
                command: command.map(|(c, _)| c),
                from_version: from,
                error: error.clone(),
            };
            if self
                .append_control(inst, "parked", record, causation, correlation_if_new)
                .await?
            {
                tracing::error!(process = P::NAME, instance = %inst.id, %error, "process instance parked: its later inputs wait for an operator's retry or skip; other instances go on");
                ctx.report(|s| s.skipped += 1);
                return Ok(());
            }
        }
        Err(self.kept_changing("parking a process instance", &inst.stream()))
    }

    /// Carries out an operator's release (the `Released` record `stored`):
    /// the parked input again (unless skipped), what was passed over, the
    /// held inputs, in stream order. Repeating it (a crash before the
    /// checkpoint moved) repeats nothing: inputs are recognised by id,
    /// commands by the target's inbox. Returns false on shutdown.
    async fn release(
        &self,
        ctx: &RunContext,
        inst: &mut Instance<P>,
        stored: &StoredEvent,
        from_version: u64,
        parked_version: u64,
        skip: bool,
    ) -> Result<bool, SubscriberError> {
        if inst.parked.is_some() {
            // Parked again after this release (its retry failed): the next
            // release carries it out from the same floor.
            return Ok(true);
        }
        tracing::info!(process = P::NAME, instance = %inst.id, skip, "released by an operator");
        let stream = inst.stream();
        let passed: Vec<StoredEvent> = read_stream_all(
            &self.store,
            &stream,
            from_version.max(1),
            Direction::Forward,
            self.options.subscription.batch_size.max(1),
        )
        .try_take_while(|e| std::future::ready(Ok(e.version < stored.version)))
        .try_collect()
        .await
        .map_err(|e| self.store_error(e))?;
        let floor = Some(from_version);
        // The parked input first: every input held after it came later.
        let Some(parked) = passed.iter().find(|e| e.version == parked_version) else {
            return Err(self.instance_error(
                inst,
                "aftermath.process.Released",
                format!("released parking at version {parked_version} is not a `Parked` record"),
            ));
        };
        let ProcessRecord::Parked {
            input,
            stop,
            command,
            ..
        } = parked
            .decode_known::<ProcessRecord>()
            .map_err(|e| self.event_error(parked, e.message))?
            .event
        else {
            return Err(self.event_error(
                parked,
                format!("released parking at version {parked_version} is not a `Parked` record"),
            ));
        };
        if let Some(input) = input
            && !skip
        {
            let typed = input
                .decode::<P::Input>(&|e| self.store.upcast(e))
                .map_err(|m| self.event_error(parked, m))?;
            let correlation = inst.correlation_id;
            // In the trace of the parked input (the `Parked` record carries
            // it), not the operator's release.
            crate::trace::continue_in(
                released_span(P::NAME, parked),
                parked.metadata.trace.clone(),
                self.handle_input(ctx, inst, typed, input, stop, correlation, floor),
            )
            .await?;
        }
        for earlier in passed {
            if inst.parked.is_some() {
                break;
            }
            if ctx.stopping() {
                return Ok(false);
            }
            let record = earlier
                .decode_known::<ProcessRecord>()
                .map_err(|e| self.event_error(&earlier, e.message))?
                .event;
            let held = match record {
                ProcessRecord::Held { input, stop } => Some((input, stop)),
                ProcessRecord::CommandSent { .. } if skip && command == Some(earlier.id) => {
                    tracing::warn!(process = P::NAME, instance = %inst.id, command_id = %earlier.id, "parked command skipped by an operator: not dispatched");
                    None
                }
                ProcessRecord::CommandSent { .. }
                | ProcessRecord::DeadlineSet { .. }
                | ProcessRecord::DeadlineCancelled { .. }
                | ProcessRecord::Completed {} => {
                    let carried = crate::trace::continue_in(
                        released_span(P::NAME, &earlier),
                        earlier.metadata.trace.clone(),
                        self.carry_out(ctx, inst, &earlier, record, floor),
                    )
                    .await?;
                    if !carried {
                        return Ok(false);
                    }
                    None
                }
                _ => None,
            };
            if let Some((input, stop)) = held {
                let typed = input
                    .decode::<P::Input>(&|e| self.store.upcast(e))
                    .map_err(|m| self.event_error(&earlier, m))?;
                let correlation = inst.correlation_id;
                crate::trace::continue_in(
                    released_span(P::NAME, &earlier),
                    earlier.metadata.trace.clone(),
                    self.handle_input(ctx, inst, typed, input, stop, correlation, floor),
                )
                .await?;
            }
        }
        Ok(true)
    }

    /// The parked instances of this process, oldest parking first, for
    /// operators. Scans the `Parked` records of the log (a parking is rare:
    /// each is a failure someone has to look at) and keeps the instances
    /// still parked.
    pub async fn parked(&self) -> Result<Vec<(String, Parking)>, SubscriberError> {
        let mut seen = std::collections::HashSet::new();
        let mut found = Vec::new();
        let mut from = Position::ORIGIN;
        let batch = self.options.subscription.batch_size.max(1);
        loop {
            let page = self
                .store
                .read_all(from, Some(&["aftermath.process.Parked"]), batch)
                .await
                .map_err(|e| self.store_error(e))?;
            let n = page.len();
            for e in page {
                from = e.position;
                if let Some(id) = instance_of(P::NAME, &e.stream)
                    && seen.insert(id.to_owned())
                {
                    let inst = self.load(id).await?;
                    if let Some(p) = inst.parked {
                        found.push((inst.id, p));
                    }
                }
            }
            if n < batch {
                return Ok(found);
            }
        }
    }

    /// Operator retry: the parked input (or command) of `instance` is
    /// handled (dispatched) again, then what waited behind it. `false`
    /// when the instance is not parked.
    pub async fn retry(&self, instance: &str) -> Result<bool, SubscriberError> {
        self.release_parked(instance, false).await
    }

    /// Operator skip: the parked input (or command) of `instance` is given
    /// up, what waited behind it runs. `false` when it is not parked.
    pub async fn skip(&self, instance: &str) -> Result<bool, SubscriberError> {
        self.release_parked(instance, true).await
    }

    async fn release_parked(&self, instance: &str, skip: bool) -> Result<bool, SubscriberError> {
        let mut inst = self.load(instance).await?;
        for _ in 0..CONFLICT_ATTEMPTS {
            let Some(p) = inst.parked.clone() else {
                return Ok(false);
            };
            let record = ProcessRecord::Released {
                from_version: p.from_version,
                parked_version: p.parked_version,
                skip,
            };
            let correlation = inst.correlation_id;
            if self
                .append_control(&mut inst, "released", record, correlation, correlation)
                .await?
            {
                return Ok(true);
            }
        }
        Err(self.kept_changing("releasing a process instance", &inst.stream()))
    }

    /// Dispatches with retries of transient failures: `Some(Ok(outcome))`,
    /// `Some(Err(why))` when the instance must be parked (a permanent
    /// error, a panic, timeouts on every attempt), `None` on shutdown. A
    /// store error on the last attempt stops the runner (restarted with
    /// the worker's backoff): the database is likely down for everyone.
    async fn dispatch(
        &self,
        ctx: &RunContext,
        stored: &StoredEvent,
        command: &CommandSpec,
        meta: CommandMeta,
    ) -> Result<Option<Result<Dispatched, String>>, SubscriberError> {
        let attempts = self.options.dispatch_attempts.max(1);
        let mut delay = self.options.dispatch_retry_delay;
        let mut stop = ctx.shutdown.clone();
        let timeout = self.options.call_timeout;
        for attempt in 1..=attempts {
            let span = tracing::info_span!(
                "aftermath.dispatch",
                otel.name = %format_args!("send {}", command.target),
                otel.kind = "producer",
                aftermath.process = P::NAME,
                aftermath.command_id = %stored.id,
                aftermath.target = %command.target,
                aftermath.target_id = %command.id,
                aftermath.attempt = attempt,
            );
            let call = std::panic::AssertUnwindSafe(tracing::Instrument::instrument(
                self.bus.dispatch(command, meta.clone()),
                span,
            ))
            .catch_unwind();
            let why = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(Ok(outcome))) => return Ok(Some(Ok(outcome))),
                Ok(Err(panic)) => {
                    return Ok(Some(Err(format!(
                        "command {}: dispatch panicked: {}",
                        stored.id,
                        panic_message(panic.as_ref())
                    ))));
                }
                Ok(Ok(Err(DispatchError::Store { source, .. }))) if attempt == attempts => {
                    return Err(self.store_error(source));
                }
                Ok(Ok(Err(e))) if e.is_transient() => e.to_string(),
                Ok(Ok(Err(e))) => return Ok(Some(Err(format!("command {}: {e}", stored.id)))),
                Err(_) if attempt == attempts => {
                    return Ok(Some(Err(format!(
                        "command {}: dispatch timed out ({timeout:?}) on all {attempts} attempts",
                        stored.id
                    ))));
                }
                Err(_) => format!("timed out after {timeout:?}"),
            };
            tracing::warn!(process = P::NAME, command_id = %stored.id, attempt, error = %why, "dispatch failed; retrying");
            tokio::select! {
                _ = stopped(&mut stop) => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = delay.saturating_mul(2);
        }
        Ok(None)
    }
}

/// The span of a record carried out after an operator's release.
fn released_span(process: &str, record: &StoredEvent) -> tracing::Span {
    crate::trace::handle_span(
        process,
        &record.event_type,
        record.id,
        &record.stream,
        record.position,
    )
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
        &self.key
    }

    async fn run(&self, ctx: &mut RunContext) -> Result<(), SubscriberError> {
        engine::drive(self, &self.store, ctx, false)
            .await
            .map(|_| ())
    }
}

/// One run of a [`ProcessRunner`]: when the page in hand was read, and the
/// clock's jumps (a manual clock's).
pub(crate) struct ProcessRun {
    read_started: chrono::DateTime<chrono::Utc>,
    jumps: Option<tokio::sync::watch::Receiver<chrono::DateTime<chrono::Utc>>>,
}

#[async_trait]
impl<P, S, D, C> PageHandler for ProcessRunner<P, S, D, C>
where
    P: ProcessManager,
    S: EventStore + Clone,
    D: DeadlineStore,
    C: CheckpointStore,
{
    type Run = ProcessRun;

    fn key(&self) -> &str {
        &self.key
    }

    fn subscription(&self) -> &SubscriptionOptions {
        &self.options.subscription
    }

    fn types(&self) -> Vec<&'static str> {
        let mut types: Vec<&'static str> = P::Input::event_types().to_vec();
        types.extend_from_slice(DISPATCHED_TYPES);
        types
    }

    /// Not pushed into the read: an input's partition is its instance's,
    /// known only once routed (see [`ProcessRunner::partition`]).
    fn partition(&self) -> Option<Partition> {
        None
    }

    async fn start(
        &self,
        ctx: &RunContext,
        catch_up: bool,
    ) -> Result<(Position, ProcessRun), SubscriberError> {
        self.check_config()?;
        if !catch_up {
            // A new run may follow another owner: forget what was cached.
            // (A stale instance would only cost a version conflict and a
            // reload; `catch_up` keeps the cache between calls.)
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let start = engine::resume_in(self, &self.checkpoints, &self.store, ctx).await?;
        let run = ProcessRun {
            read_started: self.clock.now(),
            jumps: self.clock.jumps(),
        };
        Ok((start, run))
    }

    async fn before_page(
        &self,
        _ctx: &RunContext,
        run: &mut ProcessRun,
    ) -> Result<bool, SubscriberError> {
        // Deadlines never beat the log: the cutoff is the clock BEFORE the
        // page is read (see `after_page`).
        run.read_started = self.clock.now();
        Ok(true)
    }

    async fn handle(
        &self,
        ctx: &mut RunContext,
        _run: &mut ProcessRun,
        saved: Position,
        page: &Page,
    ) -> Result<Handled, SubscriberError> {
        Ok(if self.process_page(ctx, &page.events).await? {
            Handled::page(saved, page)
        } else {
            Handled::interrupted(saved, saved)
        })
    }

    /// Fenced: from the checkpoint this run saved last. A lost race makes
    /// the run start over from what is stored (inputs are idempotent per
    /// instance stream).
    async fn commit(
        &self,
        ctx: &RunContext,
        _run: &mut ProcessRun,
        from: Position,
        to: Position,
    ) -> Result<(), SubscriberError> {
        engine::save_in(self, &self.checkpoints, ctx, from, to).await
    }

    /// Fires the deadlines due. Deadlines never beat the log: a deadline
    /// due at `t` fires only once every input recorded before `t` has been
    /// handled:
    /// - caught up: the cutoff is the clock taken before this page was read.
    ///   An input recorded before that instant was visible to the read, so
    ///   it is on this page (handled already); one recorded later is read by
    ///   the next round before any deadline due after the cutoff fires.
    ///   Taking the clock after the page let an input recorded while a large
    ///   page was being dispatched lose to a deadline that fell due meanwhile.
    /// - behind: also no later than the last event handled (a cancellation
    ///   waiting further on in the log must win).
    ///
    /// On PostgreSQL "visible to the read" is the store's horizon: an append
    /// committed before the read but behind a still-running earlier append is
    /// read next round, and the caught-up page that reaches it is read after
    /// it is final, so it still wins unless the deadline fell due before that
    /// earlier append finished. The instance's own time stays `now()` of the
    /// input it handles.
    async fn after_page(
        &self,
        ctx: &RunContext,
        run: &mut ProcessRun,
        end: PageEnd,
    ) -> Result<bool, SubscriberError> {
        let cutoff = match end.last_recorded_at {
            Some(last) if !end.caught_up => run.read_started.min(last),
            _ => run.read_started,
        };
        self.fire_deadlines(ctx, cutoff).await
    }

    async fn due_in(
        &self,
        _run: &mut ProcessRun,
    ) -> Result<Option<std::time::Duration>, SubscriberError> {
        self.until_next_deadline().await.map(Some)
    }

    async fn nudged(&self, run: &mut ProcessRun) {
        match run.jumps.as_mut() {
            Some(jumps) => {
                let _ = jumps.changed().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
}
