//! The process manager (saga) suite: the contracts of
//! [`ProcessRunner`](aftermath::process::ProcessRunner) written once, generic
//! over a [`ProcessBackend`] (the store, deadline store, checkpoint store and
//! effect journal a runner works with), instantiated per backend with
//! [`process_tests!`](crate::process_tests) (`tests/tests/process_memory.rs`,
//! `process_sqlite.rs`, `process_postgres.rs`).
//!
//! Time is a [`ManualClock`]; runners are driven by `catch_up` (directly or
//! through the process [`Harness`]), except where a test needs a worker's
//! status. The domains: the order fulfillment saga of `aftermath-examples`,
//! and two small test processes: [`Tally`] (inputs, timers, completion; one
//! [`Counter`] command per tick) and [`Chain`] (three steps, a refused
//! fourth, compensation).

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use aftermath::process::record::{InputRecord, stream_of};
use aftermath::process::testkit::{Harness, Settle};
use aftermath::process::{
    CommandBus, Deadline, DeadlineReached, DeadlineStore, Input, ManualClock, Outputs,
    ProcessManager, ProcessOptions, ProcessRecord, ProcessRunner, Route, TimelineEntry, timeline,
};
use aftermath::reactor::{
    EffectContext, EffectJournal, EffectState, ReactError, Reactor, ReactorRunner,
};
use aftermath::store::read_stream_all;
use aftermath::subscription::{CheckpointStore, Partition};
use aftermath::worker::{SubscriberError, SubscriberState, Worker};
use aftermath::{
    Aggregate, AppendResult, Direction, Event, EventData, EventStore, EventUnion, ExpectedVersion,
    Loaded, Metadata, Position, Recorded, Repository, Snapshot, StoreError, StoredEvent,
};
use aftermath_examples::fulfillment::aggregates::OrderStatus;
use aftermath_examples::fulfillment::reactors::{Carrier, CarrierBooking, CustomerMail, Mailbox};
use aftermath_examples::fulfillment::{
    Fulfillment, Inventory, InventoryCommand, Order, OrderCommand, Payment, Shipping, command_bus,
};
use async_trait::async_trait;
use chrono::{DateTime, Duration, TimeZone, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// What a process runner of one backend works with. For SQLite and
/// PostgreSQL all four are the same store; in memory they are four objects.
pub struct Parts<B: ProcessBackend> {
    /// The event store.
    pub store: B::Store,
    /// Where deadlines wait.
    pub deadlines: B::Deadlines,
    /// Runner and reactor checkpoints.
    pub checkpoints: B::Checkpoints,
    /// The reactors' effect journal (shared by every reactor of a test).
    pub journal: B::Journal,
    /// Dropped after the test: removes temp files, schemas.
    pub guard: Box<dyn Any + Send>,
}

/// A backend of the process suite.
#[async_trait]
pub trait ProcessBackend: Sized + Send + Sync + 'static {
    /// The event store.
    type Store: EventStore + Clone;
    /// The deadline store.
    type Deadlines: DeadlineStore + Clone;
    /// The checkpoint store.
    type Checkpoints: CheckpointStore + Clone;
    /// The effect journal.
    type Journal: EffectJournal + Clone;
    /// Name printed in skip messages.
    const NAME: &'static str;
    /// Fresh, empty parts, or the reason the backend cannot run here.
    async fn open() -> Result<Parts<Self>, String>;
    /// The same storage opened anew after every handle in `parts` is
    /// dropped: a process restart. (Memory keeps its handles: the data lives
    /// in them.) Callers drop every other clone first.
    async fn reopen(parts: Parts<Self>) -> Parts<Self>;
}

/// The in-memory backend: `MemoryStore`, `MemoryDeadlines`,
/// `MemoryCheckpoints` and one `MemoryJournal` shared by the reactors.
pub struct MemoryBackend;

#[async_trait]
impl ProcessBackend for MemoryBackend {
    type Store = aftermath::MemoryStore;
    type Deadlines = aftermath::process::MemoryDeadlines;
    type Checkpoints = aftermath::subscription::MemoryCheckpoints;
    type Journal = aftermath::reactor::MemoryJournal;
    const NAME: &'static str = "memory";

    async fn open() -> Result<Parts<Self>, String> {
        Ok(Parts {
            store: aftermath::MemoryStore::new(),
            deadlines: aftermath::process::MemoryDeadlines::new(),
            checkpoints: aftermath::subscription::MemoryCheckpoints::new(),
            journal: aftermath::reactor::MemoryJournal::new(),
            guard: Box::new(()),
        })
    }

    /// The data lives in the handles: a restart keeps them (everything the
    /// runner held in memory besides is gone with the runner).
    async fn reopen(parts: Parts<Self>) -> Parts<Self> {
        parts
    }
}

/// Opens fresh parts or prints why the test is skipped.
pub async fn open_process_or_skip<B: ProcessBackend>(test: &str) -> Option<Parts<B>> {
    match B::open().await {
        Ok(parts) => Some(parts),
        Err(reason) => {
            crate::skip_notice!("SKIPPED {}::process::{test}: {reason}", B::NAME);
            None
        }
    }
}

macro_rules! parts {
    ($b:ty, $name:literal) => {
        match open_process_or_skip::<$b>($name).await {
            Some(parts) => parts,
            None => return,
        }
    };
}

/// A process runner on a backend's parts.
pub type Runner<P, B> = ProcessRunner<
    P,
    <B as ProcessBackend>::Store,
    <B as ProcessBackend>::Deadlines,
    <B as ProcessBackend>::Checkpoints,
>;

/// The clock's start: 2026-03-01T09:00:00Z.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0)
        .single()
        .expect("a valid time")
}

/// Runner options for tests: deadlines and other processes' appends looked
/// at every 50 ms.
pub fn options() -> ProcessOptions {
    ProcessOptions::default()
        .deadline_poll(StdDuration::from_millis(50))
        .poll_interval(StdDuration::from_millis(50))
}

/// A runner of `process` on `parts`, timed by `clock`.
pub fn runner<P: ProcessManager, B: ProcessBackend>(
    parts: &Parts<B>,
    process: P,
    bus: CommandBus,
    clock: &ManualClock,
    options: ProcessOptions,
) -> Runner<P, B> {
    ProcessRunner::new(
        process,
        parts.store.clone(),
        bus,
        parts.deadlines.clone(),
        parts.checkpoints.clone(),
    )
    .clock(clock.clone())
    .options(options)
}

/// A runner of the `Tally` test process with the default test options.
pub fn tally_runner<B: ProcessBackend>(parts: &Parts<B>, clock: &ManualClock) -> Runner<Tally, B> {
    runner(parts, Tally, tally_bus(&parts.store), clock, options())
}

/// A runner shared between a [`Harness`] and the test.
pub struct Shared<T>(pub Arc<T>);

#[async_trait]
impl<T: Settle + 'static> Settle for Shared<T> {
    async fn settle_once(&self) -> Result<Position, SubscriberError> {
        self.0.settle_once().await
    }
}

/// Runs `runner` until a whole run appends nothing.
pub async fn settle<S: EventStore + Clone, T: Settle + 'static>(store: &S, runner: &Arc<T>) {
    Harness::new(store.clone())
        .with(Shared(runner.clone()))
        .settle()
        .await
        .expect("the runner settles");
}

// ---------------------------------------------------------------------------
// Reading what happened
// ---------------------------------------------------------------------------

/// Every event of `stream`, in order.
pub async fn stream<S: EventStore>(store: &S, stream: &str) -> Vec<StoredEvent> {
    read_stream_all(store, stream, 1, Direction::Forward, 500)
        .try_collect()
        .await
        .expect("read a stream")
}

/// The records of `instance` of `process`, in order.
pub async fn records<S: EventStore>(
    store: &S,
    process: &str,
    instance: &str,
) -> Vec<(StoredEvent, ProcessRecord)> {
    stream(store, &stream_of(process, instance))
        .await
        .into_iter()
        .map(|e| {
            let record = e
                .decode_known::<ProcessRecord>()
                .expect("an instance stream holds process records")
                .event;
            (e, record)
        })
        .collect()
}

/// The inputs recorded (`Received`), in order.
pub fn received(records: &[(StoredEvent, ProcessRecord)]) -> Vec<&InputRecord> {
    records
        .iter()
        .filter_map(|(_, r)| match r {
            ProcessRecord::Received { input } => Some(input),
            _ => None,
        })
        .collect()
}

/// The deadlines delivered (`Received` of kind `Deadline`), in order.
pub fn deadlines_received(records: &[(StoredEvent, ProcessRecord)]) -> Vec<DeadlineReached> {
    received(records)
        .into_iter()
        .filter_map(|i| match i {
            InputRecord::Deadline { deadline, .. } => Some(deadline.clone()),
            _ => None,
        })
        .collect()
}

/// Every event of `$all`, in order.
pub async fn all_events<S: EventStore>(store: &S) -> Vec<StoredEvent> {
    let mut events = Vec::new();
    let mut after = Position::ORIGIN;
    loop {
        let page = store.read_all(after, None, 500).await.expect("read $all");
        let short = page.len() < 500;
        if let Some(last) = page.last() {
            after = last.position;
        }
        events.extend(page);
        if short {
            return events;
        }
    }
}

/// Every stream's version.
pub async fn stream_versions<S: EventStore>(store: &S) -> HashMap<String, u64> {
    let mut versions = HashMap::new();
    for e in all_events(store).await {
        let v = versions.entry(e.stream).or_insert(0);
        *v = (*v).max(e.version);
    }
    versions
}

/// Appends `events` to `stream` (any version) as one batch; their ids.
pub async fn feed<S: EventStore, E: Event>(store: &S, stream: &str, events: &[E]) -> Vec<Uuid> {
    let data: Vec<EventData> = events
        .iter()
        .map(|e| {
            let id = Uuid::now_v7();
            EventData::encode(e, id, Metadata::caused_by(id)).expect("an input encodes")
        })
        .collect();
    let ids = data.iter().map(|d| d.id).collect();
    store
        .append(stream, ExpectedVersion::Any, data)
        .await
        .expect("append inputs");
    ids
}

/// Waits up to 20 s for `check` to hold.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---------------------------------------------------------------------------
// Test domain: Tally (+ Counter)
// ---------------------------------------------------------------------------

/// A counter that only takes the next number: a command dispatched twice
/// or out of order would show.
#[derive(Debug, Default)]
pub struct Counter {
    /// The numbers added, in order.
    pub added: Vec<u64>,
}

/// What a counter is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CounterCommand {
    /// Add `n`, which must be the number of numbers added so far.
    Add {
        /// The number.
        n: u64,
    },
}

/// What a counter records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "counter")]
pub enum CounterEvent {
    /// `n` was added.
    #[event(name = "CounterAdded")]
    Added {
        /// The number.
        n: u64,
    },
}

/// Why a counter refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CounterError {
    /// Not the next number.
    #[error("out of order: expected {expected}, got {got}")]
    OutOfOrder {
        /// The next number.
        expected: u64,
        /// What came.
        got: u64,
    },
}

impl Aggregate for Counter {
    const CATEGORY: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;

    fn decide(&self, command: CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
        let CounterCommand::Add { n } = command;
        let expected = self.added.len() as u64;
        if n != expected {
            return Err(CounterError::OutOfOrder { expected, got: n });
        }
        Ok(vec![CounterEvent::Added { n }])
    }

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added { n } = event;
        self.added.push(*n);
    }
}

/// The inputs of [`Tally`] (appended straight to the log by the tests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "tally")]
pub enum TallyEvent {
    /// Starts instance `tally` (strictly: an error if it exists).
    #[event(name = "TallyOpened")]
    Opened {
        /// The instance.
        tally: String,
    },
    /// Number `n`: recorded in the state and added to counter `tally`.
    #[event(name = "TallyTicked")]
    Ticked {
        /// The instance.
        tally: String,
        /// The number.
        n: u64,
    },
    /// Sets deadline `name` `after_secs` after the input's time.
    #[event(name = "TallyTimerSet")]
    TimerSet {
        /// The instance.
        tally: String,
        /// The deadline's name.
        name: String,
        /// Seconds.
        after_secs: i64,
    },
    /// Cancels deadline `name`.
    #[event(name = "TallyTimerCancelled")]
    TimerCancelled {
        /// The instance.
        tally: String,
        /// The deadline's name.
        name: String,
    },
    /// Completes the instance.
    #[event(name = "TallyClosed")]
    Closed {
        /// The instance.
        tally: String,
    },
}

/// What a tally remembers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TallyState {
    /// The numbers ticked, in the order handled.
    pub ticks: Vec<u64>,
    /// The deadlines delivered, by name, in order.
    pub fired: Vec<String>,
    /// The errors of refused commands.
    pub rejections: Vec<String>,
}

/// A test process: one instance per tally.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally;

impl ProcessManager for Tally {
    const NAME: &'static str = "tally";
    type Input = TallyEvent;
    type State = TallyState;

    fn route(&self, event: &Recorded<TallyEvent>) -> Route {
        match &event.event {
            TallyEvent::Opened { tally } => Route::StartStrict(tally.clone()),
            TallyEvent::Ticked { tally, .. }
            | TallyEvent::TimerSet { tally, .. }
            | TallyEvent::TimerCancelled { tally, .. }
            | TallyEvent::Closed { tally } => Route::Continue(tally.clone()),
        }
    }

    fn apply(&self, state: &mut TallyState, input: &Input<TallyEvent>) {
        match input {
            Input::Event(e) => {
                if let TallyEvent::Ticked { n, .. } = &e.event {
                    state.ticks.push(*n);
                }
            }
            Input::Deadline(d) => state.fired.push(d.name.clone()),
            Input::Rejected(r) => state.rejections.push(r.error.clone()),
        }
    }

    fn handle(&self, _state: &TallyState, input: &Input<TallyEvent>, out: &mut Outputs) {
        let Input::Event(e) = input else { return };
        match &e.event {
            TallyEvent::Opened { .. } => {}
            TallyEvent::Ticked { tally, n } => {
                out.send::<Counter>(tally.clone(), CounterCommand::Add { n: *n })
            }
            TallyEvent::TimerSet {
                name, after_secs, ..
            } => out.set_deadline_after(name.clone(), Duration::seconds(*after_secs)),
            TallyEvent::TimerCancelled { name, .. } => out.cancel_deadline(name),
            TallyEvent::Closed { .. } => out.complete(),
        }
    }
}

fn tally_bus<S: EventStore + Clone>(store: &S) -> CommandBus {
    CommandBus::new().register(Repository::<Counter, _>::new(store.clone()))
}

fn opened(tally: &str) -> TallyEvent {
    TallyEvent::Opened {
        tally: tally.into(),
    }
}

fn ticked(tally: &str, n: u64) -> TallyEvent {
    TallyEvent::Ticked {
        tally: tally.into(),
        n,
    }
}

fn timer(tally: &str, name: &str, after_secs: i64) -> TallyEvent {
    TallyEvent::TimerSet {
        tally: tally.into(),
        name: name.into(),
        after_secs,
    }
}

/// The `DeadlineSet` records of an instance: (id, name, due).
fn deadlines_set(records: &[(StoredEvent, ProcessRecord)]) -> Vec<(Uuid, String, DateTime<Utc>)> {
    records
        .iter()
        .filter_map(|(_, r)| match r {
            ProcessRecord::DeadlineSet { id, name, due_at } => Some((*id, name.clone(), *due_at)),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Test domain: Chain (+ Step)
// ---------------------------------------------------------------------------

/// One step of a chain; step `fail` is always refused.
#[derive(Debug, Default)]
pub struct Step {
    /// Done.
    pub done: bool,
    /// Undone.
    pub undone: bool,
}

/// What a step is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepCommand {
    /// Do it.
    Do {
        /// The chain.
        chain: String,
        /// The step's name.
        step: String,
    },
    /// Undo it.
    Undo {
        /// The chain.
        chain: String,
        /// The step's name.
        step: String,
    },
}

/// What a step records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "step")]
pub enum StepEvent {
    /// It was done.
    #[event(name = "StepDone")]
    Done {
        /// The chain.
        chain: String,
        /// The step's name.
        step: String,
    },
    /// It was undone.
    #[event(name = "StepUndone")]
    Undone {
        /// The chain.
        chain: String,
        /// The step's name.
        step: String,
    },
}

/// Why a step refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// Step `fail`.
    #[error("step `{0}` refused")]
    Refused(String),
    /// Undo before do.
    #[error("step `{0}` was never done")]
    NotDone(String),
}

impl Aggregate for Step {
    const CATEGORY: &'static str = "step";
    type Command = StepCommand;
    type Event = StepEvent;
    type Error = StepError;

    fn decide(&self, command: StepCommand) -> Result<Vec<StepEvent>, StepError> {
        match command {
            StepCommand::Do { step, .. } if step == "fail" => Err(StepError::Refused(step)),
            StepCommand::Do { .. } if self.done => Ok(vec![]),
            StepCommand::Do { chain, step } => Ok(vec![StepEvent::Done { chain, step }]),
            StepCommand::Undo { step, .. } if !self.done => Err(StepError::NotDone(step)),
            StepCommand::Undo { .. } if self.undone => Ok(vec![]),
            StepCommand::Undo { chain, step } => Ok(vec![StepEvent::Undone { chain, step }]),
        }
    }

    fn apply(&mut self, event: &StepEvent) {
        match event {
            StepEvent::Done { .. } => self.done = true,
            StepEvent::Undone { .. } => self.undone = true,
        }
    }
}

/// Starts a chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "chain")]
pub enum ChainEvent {
    /// Start chain `chain`.
    #[event(name = "ChainStarted")]
    Started {
        /// The chain (the instance).
        chain: String,
    },
}

/// The inputs of [`Chain`].
#[derive(Debug, Clone, PartialEq, EventUnion)]
pub enum ChainInput {
    /// The trigger.
    Chain(ChainEvent),
    /// The steps' events.
    Step(StepEvent),
}

/// A test process: steps a, b, c, each registering its undo, then step
/// `fail`, which is refused: compensate (c, b, a) and complete.
#[derive(Debug, Clone, Copy, Default)]
pub struct Chain;

/// The steps in order, and the one after them (refused).
const CHAIN: [&str; 4] = ["a", "b", "c", "fail"];

fn step_id(chain: &str, step: &str) -> String {
    format!("{chain}-{step}")
}

impl ProcessManager for Chain {
    const NAME: &'static str = "chain";
    type Input = ChainInput;
    type State = Vec<String>;

    fn route(&self, event: &Recorded<ChainInput>) -> Route {
        match &event.event {
            ChainInput::Chain(ChainEvent::Started { chain }) => Route::StartStrict(chain.clone()),
            ChainInput::Step(StepEvent::Done { chain, .. }) => Route::Continue(chain.clone()),
            ChainInput::Step(StepEvent::Undone { .. }) => Route::Ignore,
        }
    }

    fn apply(&self, state: &mut Vec<String>, input: &Input<ChainInput>) {
        if let Some(ChainInput::Step(StepEvent::Done { step, .. })) = input.event() {
            state.push(step.clone());
        }
    }

    fn handle(&self, _state: &Vec<String>, input: &Input<ChainInput>, out: &mut Outputs) {
        let chain = out.instance().to_owned();
        let next = |out: &mut Outputs, step: &str| {
            out.send::<Step>(
                step_id(&chain, step),
                StepCommand::Do {
                    chain: chain.clone(),
                    step: step.into(),
                },
            )
        };
        match input {
            Input::Event(e) => match &e.event {
                ChainInput::Chain(ChainEvent::Started { .. }) => next(out, CHAIN[0]),
                ChainInput::Step(StepEvent::Done { step, .. }) => {
                    out.register_compensation::<Step>(
                        step_id(&chain, step),
                        StepCommand::Undo {
                            chain: chain.clone(),
                            step: step.clone(),
                        },
                    );
                    if let Some(i) = CHAIN.iter().position(|s| s == step) {
                        next(out, CHAIN[i + 1]);
                    }
                }
                ChainInput::Step(StepEvent::Undone { .. }) => {}
            },
            Input::Rejected(r) if !r.compensation => {
                out.compensate();
                out.complete();
            }
            Input::Rejected(_) | Input::Deadline(_) => {}
        }
    }
}

/// Writes down the steps undone, in the order it sees them.
#[derive(Clone, Default)]
pub struct UndoLog {
    /// The steps undone.
    pub undone: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl Reactor for UndoLog {
    type Event = StepEvent;

    fn name(&self) -> &str {
        "undo-log"
    }

    async fn react(
        &self,
        event: &Recorded<StepEvent>,
        _: &EffectContext,
    ) -> Result<(), ReactError> {
        if let StepEvent::Undone { step, .. } = &event.event {
            self.undone
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(step.clone());
        }
        Ok(())
    }
}

/// A chain run to its end: its parts, the correlation id of its start, the
/// undo log.
struct ChainRun<B: ProcessBackend> {
    parts: Parts<B>,
    correlation: Uuid,
    log: UndoLog,
    runner: Arc<Runner<Chain, B>>,
}

async fn run_chain<B: ProcessBackend>(parts: Parts<B>, chain: &str) -> ChainRun<B> {
    let clock = ManualClock::at(t0());
    let bus = CommandBus::new().register(Repository::<Step, _>::new(parts.store.clone()));
    let runner = Arc::new(runner(&parts, Chain, bus, &clock, options()));
    let log = UndoLog::default();
    let harness = Harness::new(parts.store.clone())
        .with(Shared(runner.clone()))
        .with(ReactorRunner::new(
            log.clone(),
            parts.store.clone(),
            parts.journal.clone(),
            parts.checkpoints.clone(),
        ));
    let ids = feed(
        &parts.store,
        &format!("chain-start-{chain}"),
        &[ChainEvent::Started {
            chain: chain.into(),
        }],
    )
    .await;
    harness.settle().await.expect("the chain settles");
    ChainRun {
        parts,
        correlation: ids[0],
        log,
        runner,
    }
}

// ---------------------------------------------------------------------------
// The fulfillment shop
// ---------------------------------------------------------------------------

/// The fulfillment saga with its reactors on one backend.
pub struct Shop<B: ProcessBackend> {
    /// The backend.
    pub parts: Parts<B>,
    /// Deadlines' time.
    pub clock: ManualClock,
    /// The saga's runner (also in the harness).
    pub saga: Arc<Runner<Fulfillment, B>>,
    /// Saga and reactors.
    pub harness: Harness<B::Store>,
    /// The fake carrier.
    pub carrier: Carrier,
    /// The fake mail provider.
    pub mailbox: Mailbox,
}

impl<B: ProcessBackend> Shop<B> {
    /// A shop on `parts` with the clock at [`t0`].
    pub fn new(parts: Parts<B>) -> Self {
        let clock = ManualClock::at(t0());
        let carrier = Carrier::new();
        let mailbox = Mailbox::new();
        let saga = Arc::new(runner(
            &parts,
            Fulfillment,
            command_bus(&parts.store),
            &clock,
            options(),
        ));
        let harness = Harness::new(parts.store.clone())
            .with(Shared(saga.clone()))
            .with(ReactorRunner::new(
                CarrierBooking {
                    carrier: carrier.clone(),
                },
                parts.store.clone(),
                parts.journal.clone(),
                parts.checkpoints.clone(),
            ))
            .with(ReactorRunner::new(
                CustomerMail {
                    mailbox: mailbox.clone(),
                },
                parts.store.clone(),
                parts.journal.clone(),
                parts.checkpoints.clone(),
            ));
        Shop {
            parts,
            clock,
            saga,
            harness,
            carrier,
            mailbox,
        }
    }

    async fn settle(&self) {
        self.harness.settle().await.expect("the shop settles");
    }

    async fn place(&self, order: &str, card: &str, address: &str, quantity: u32) {
        Repository::<Order, _>::new(self.parts.store.clone())
            .execute(
                order,
                OrderCommand::Place {
                    order: order.into(),
                    customer: format!("{order}@example.com"),
                    sku: "sku-1".into(),
                    quantity,
                    amount: 1_000,
                    card: card.into(),
                    address: address.into(),
                },
            )
            .await
            .expect("place an order");
    }

    async fn restock(&self, quantity: u32) {
        Repository::<Inventory, _>::new(self.parts.store.clone())
            .execute(
                "sku-1",
                InventoryCommand::Restock {
                    sku: "sku-1".into(),
                    quantity,
                },
            )
            .await
            .expect("restock");
    }

    async fn call_back(&self) -> usize {
        self.carrier
            .call_back(&Repository::new(self.parts.store.clone()))
            .await
    }

    async fn load<A: Aggregate>(&self, id: &str) -> Loaded<A> {
        Repository::<A, _>::new(self.parts.store.clone())
            .load(id)
            .await
            .expect("load an aggregate")
    }

    async fn status(&self, order: &str) -> OrderStatus {
        self.load::<Order>(order).await.state.status
    }

    async fn stock(&self) -> Inventory {
        self.load::<Inventory>("sku-1").await.state
    }

    async fn payment(&self, order: &str) -> Payment {
        self.load::<Payment>(order).await.state
    }

    async fn shipping(&self, order: &str) -> Shipping {
        self.load::<Shipping>(order).await.state
    }

    async fn records(&self, order: &str) -> Vec<(StoredEvent, ProcessRecord)> {
        records(&self.parts.store, "fulfillment", order).await
    }

    async fn head(&self) -> Position {
        self.parts.store.head().await.expect("head")
    }

    async fn pending(&self, order: &str) -> Vec<Deadline> {
        self.parts
            .deadlines
            .pending("fulfillment", order)
            .await
            .expect("pending deadlines")
    }
}

async fn shop<B: ProcessBackend>(test: &str) -> Option<Shop<B>> {
    Some(Shop::new(open_process_or_skip::<B>(test).await?))
}

macro_rules! shop {
    ($b:ty, $name:literal) => {
        match shop::<$b>($name).await {
            Some(shop) => shop,
            None => return,
        }
    };
}

/// The commands sent (target-id, compensation), in order.
fn sent(records: &[(StoredEvent, ProcessRecord)]) -> Vec<(String, bool)> {
    records
        .iter()
        .filter_map(|(_, r)| match r {
            ProcessRecord::CommandSent {
                command,
                compensation,
            } => Some((format!("{}-{}", command.target, command.id), *compensation)),
            _ => None,
        })
        .collect()
}

fn completed(records: &[(StoredEvent, ProcessRecord)]) -> bool {
    matches!(records.last(), Some((_, ProcessRecord::Completed {})))
}

fn rejections(records: &[(StoredEvent, ProcessRecord)]) -> Vec<(String, String)> {
    received(records)
        .into_iter()
        .filter_map(|i| match i {
            InputRecord::Rejected { rejection, .. } => Some((
                format!("{}-{}", rejection.command.target, rejection.command.id),
                rejection.error.clone(),
            )),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Fulfillment flows
// ---------------------------------------------------------------------------

/// Stock, payment, shipping, confirmation; the shipping deadline is
/// cancelled, so moving past it changes nothing.
pub async fn fulfillment_happy_path<B: ProcessBackend>() {
    let shop = shop!(B, "fulfillment_happy_path");
    shop.restock(5).await;
    shop.place("o-1", "visa", "1 Main St", 2).await;
    shop.settle().await;
    assert_eq!(shop.carrier.bookings().len(), 1);
    assert_eq!(shop.pending("o-1").await.len(), 1, "the shipping deadline");
    assert_eq!(shop.call_back().await, 1);
    shop.settle().await;

    assert_eq!(shop.status("o-1").await, OrderStatus::Confirmed);
    let s = shop.stock().await;
    assert_eq!((s.available, s.shipped, s.reserved.len()), (3, 2, 0));
    let p = shop.payment("o-1").await;
    assert_eq!((p.charged, p.refunded), (1_000, 0));
    let sh = shop.shipping("o-1").await;
    assert!(sh.shipped && !sh.cancelled);
    let mails = shop.mailbox.sent();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].subject.contains("on its way"), "{mails:?}");

    let recs = shop.records("o-1").await;
    assert!(completed(&recs));
    assert!(rejections(&recs).is_empty());
    assert!(recs.iter().any(
        |(_, r)| matches!(r, ProcessRecord::DeadlineCancelled { name, .. } if name == "shipping")
    ));
    assert_eq!(
        sent(&recs),
        [
            ("inventory-sku-1", false),
            ("payment-o-1", false),
            ("shipping-o-1", false),
            ("inventory-sku-1", false),
            ("order-o-1", false)
        ]
        .map(|(c, b)| (c.to_owned(), b))
    );
    assert!(shop.pending("o-1").await.is_empty());
    let inst = shop.saga.instance("o-1").await.unwrap();
    assert!(inst.completed && inst.state.shipped);

    let head = shop.head().await;
    shop.clock.advance(Duration::hours(72));
    shop.settle().await;
    assert_eq!(shop.head().await, head);
}

/// A declined card: the stock reservation is released, the order
/// cancelled; the rejection is an input of the saga with the error text.
pub async fn fulfillment_declined_payment<B: ProcessBackend>() {
    let shop = shop!(B, "fulfillment_declined_payment");
    shop.restock(5).await;
    shop.place("o-2", "declined", "1 Main St", 2).await;
    shop.settle().await;

    assert_eq!(shop.status("o-2").await, OrderStatus::Cancelled);
    let s = shop.stock().await;
    assert_eq!((s.available, s.shipped, s.reserved.len()), (5, 0, 0));
    let p = shop.payment("o-2").await;
    assert_eq!((p.charged, p.refunded), (0, 0));
    assert_eq!(shop.load::<Shipping>("o-2").await.version, 0);
    assert!(shop.carrier.bookings().is_empty());
    let mails = shop.mailbox.sent();
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].subject.contains("payment failed: card declined"),
        "{mails:?}"
    );

    let recs = shop.records("o-2").await;
    assert_eq!(
        rejections(&recs),
        vec![("payment-o-2".to_owned(), "card declined".to_owned())]
    );
    assert_eq!(
        sent(&recs),
        [
            ("inventory-sku-1", false),
            ("payment-o-2", false),
            ("inventory-sku-1", true),
            ("order-o-2", false)
        ]
        .map(|(c, b)| (c.to_owned(), b))
    );
    assert!(completed(&recs));
    assert!(shop.pending("o-2").await.is_empty());
}

/// Not enough stock: the order is cancelled, nothing to compensate.
pub async fn fulfillment_out_of_stock<B: ProcessBackend>() {
    let shop = shop!(B, "fulfillment_out_of_stock");
    shop.restock(1).await;
    shop.place("o-3", "visa", "1 Main St", 2).await;
    shop.settle().await;

    assert_eq!(shop.status("o-3").await, OrderStatus::Cancelled);
    let s = shop.stock().await;
    assert_eq!((s.available, s.reserved.len()), (1, 0));
    assert_eq!(shop.load::<Payment>("o-3").await.version, 0);
    let recs = shop.records("o-3").await;
    assert_eq!(
        rejections(&recs),
        vec![(
            "inventory-sku-1".to_owned(),
            "insufficient stock: 2 requested, 1 available".to_owned()
        )]
    );
    assert!(
        !recs
            .iter()
            .any(|(_, r)| matches!(r, ProcessRecord::Compensating { .. }))
    );
    assert_eq!(
        sent(&recs),
        [("inventory-sku-1", false), ("order-o-3", false)].map(|(c, b)| (c.to_owned(), b))
    );
    assert!(completed(&recs));
    let mails = shop.mailbox.sent();
    assert!(mails[0].subject.contains("out of stock"), "{mails:?}");
}

/// The carrier never confirms: the deadline fires once, the shipment is
/// called off, the payment refunded and the stock released (newest step
/// first), the order cancelled.
pub async fn fulfillment_missed_shipping_deadline<B: ProcessBackend>() {
    let shop = shop!(B, "fulfillment_missed_shipping_deadline");
    shop.restock(5).await;
    shop.place("o-4", "visa", "unreachable", 1).await;
    shop.settle().await;
    assert_eq!(shop.call_back().await, 0);
    assert_eq!(shop.payment("o-4").await.charged, 1_000);

    shop.clock.advance(Duration::hours(47));
    shop.settle().await;
    assert_eq!(shop.status("o-4").await, OrderStatus::Placed);
    assert_eq!(shop.pending("o-4").await.len(), 1);

    shop.clock.advance(Duration::hours(2));
    shop.settle().await;
    assert_eq!(shop.status("o-4").await, OrderStatus::Cancelled);
    let p = shop.payment("o-4").await;
    assert_eq!((p.charged, p.refunded), (0, 1_000));
    let s = shop.stock().await;
    assert_eq!((s.available, s.shipped, s.reserved.len()), (5, 0, 0));
    let sh = shop.shipping("o-4").await;
    assert!(sh.cancelled && !sh.shipped);

    let recs = shop.records("o-4").await;
    let fired = deadlines_received(&recs);
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].name, "shipping");
    assert_eq!(fired[0].due_at, t0() + Duration::hours(48));
    assert_eq!(
        sent(&recs),
        [
            ("inventory-sku-1", false),
            ("payment-o-4", false),
            ("shipping-o-4", false),
            ("shipping-o-4", false),
            ("payment-o-4", true),
            ("inventory-sku-1", true),
            ("order-o-4", false)
        ]
        .map(|(c, b)| (c.to_owned(), b))
    );
    assert!(completed(&recs));
    assert!(shop.pending("o-4").await.is_empty());
    let mails = shop.mailbox.sent();
    assert!(
        mails[0].subject.contains("not shipped within 48 hours"),
        "{mails:?}"
    );
}

/// The carrier confirms at the moment the shipping deadline is due, in
/// either order: the order ships, nothing is refunded or released.
pub async fn fulfillment_shipping_races_its_deadline<B: ProcessBackend>() {
    // The deadline first: the saga handles it (and records Shipping::Cancel)
    // just before the carrier's confirmation lands; the cancellation is
    // refused (the parcel already left) and the confirmation completes the
    // order.
    let shop = shop!(B, "fulfillment_shipping_races_its_deadline");
    shop.restock(5).await;
    shop.place("o-6", "visa", "1 Main St", 1).await;
    shop.settle().await;
    shop.clock.advance(Duration::hours(48));
    shop.saga.catch_up().await.expect("the saga runs");
    assert_eq!(shop.call_back().await, 1);
    shop.settle().await;
    assert_eq!(shop.status("o-6").await, OrderStatus::Confirmed);
    let p = shop.payment("o-6").await;
    assert_eq!((p.charged, p.refunded), (1_000, 0));
    let s = shop.stock().await;
    assert_eq!((s.available, s.shipped, s.reserved.len()), (4, 1, 0));
    let sh = shop.shipping("o-6").await;
    assert!(sh.shipped && !sh.cancelled);
    let recs = shop.records("o-6").await;
    let inputs = received(&recs);
    let deadline_at = inputs
        .iter()
        .position(|i| matches!(i, InputRecord::Deadline { .. }))
        .expect("the deadline was delivered");
    let shipped_at = inputs
        .iter()
        .position(|i| matches!(i, InputRecord::Event { event_type, .. } if event_type == "shipping.Shipped"))
        .expect("the confirmation was handled");
    assert!(deadline_at < shipped_at, "{inputs:?}");
    assert_eq!(deadlines_received(&recs).len(), 1);
    assert!(completed(&recs));
    assert!(
        !recs
            .iter()
            .any(|(_, r)| matches!(r, ProcessRecord::Compensating { .. }))
    );
    assert!(shop.pending("o-6").await.is_empty());
    let head = shop.head().await;
    shop.settle().await;
    assert_eq!(shop.head().await, head);
    drop(shop);

    // The confirmation first: handled before the deadline is due; then the
    // clock reaches the due time: nothing fires.
    let shop = shop!(B, "fulfillment_shipping_races_its_deadline");
    shop.restock(5).await;
    shop.place("o-7", "visa", "1 Main St", 1).await;
    shop.settle().await;
    assert_eq!(shop.call_back().await, 1);
    shop.saga.catch_up().await.expect("the saga runs");
    assert!(shop.saga.instance("o-7").await.unwrap().completed);
    shop.clock.advance(Duration::hours(48));
    shop.settle().await;
    assert_eq!(shop.status("o-7").await, OrderStatus::Confirmed);
    let p = shop.payment("o-7").await;
    assert_eq!((p.charged, p.refunded), (1_000, 0));
    let recs = shop.records("o-7").await;
    assert!(deadlines_received(&recs).is_empty(), "{recs:?}");
    assert!(completed(&recs));
    assert!(shop.pending("o-7").await.is_empty());
}

// ---------------------------------------------------------------------------
// 2. Deadlines survive a restart
// ---------------------------------------------------------------------------

/// A deadline set before a restart fires after it, once: the instance
/// stream has one `Received` of kind `Deadline`, also when its row is still
/// there after delivery (a crash before the row was deleted).
pub async fn deadline_fires_once_after_restart<B: ProcessBackend>() {
    let parts = parts!(B, "deadline_fires_once_after_restart");
    {
        let clock = ManualClock::at(t0());
        let runner = Arc::new(tally_runner(&parts, &clock));
        feed(
            &parts.store,
            "tally-in-1",
            &[opened("t-1"), timer("t-1", "wake", 600)],
        )
        .await;
        settle(&parts.store, &runner).await;
    }
    let pending = parts.deadlines.pending("tally", "t-1").await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    let row = pending[0].clone();
    assert_eq!(
        (row.name.as_str(), row.due_at),
        ("wake", t0() + Duration::seconds(600))
    );
    assert!(
        deadlines_received(&records(&parts.store, "tally", "t-1").await).is_empty(),
        "not due yet"
    );

    // Restart: everything in memory is gone; time moved on meanwhile.
    let parts = B::reopen(parts).await;
    let clock = ManualClock::at(t0() + Duration::seconds(601));
    let runner = tally_runner(&parts, &clock);
    runner.catch_up().await.expect("the runner runs");
    let recs = records(&parts.store, "tally", "t-1").await;
    let fired = deadlines_received(&recs);
    assert_eq!(fired.len(), 1, "{recs:?}");
    assert_eq!((fired[0].id, fired[0].name.as_str()), (row.id, "wake"));
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty()
    );
    runner.catch_up().await.expect("the runner runs");
    assert_eq!(
        deadlines_received(&records(&parts.store, "tally", "t-1").await).len(),
        1
    );
    let version = recs.len();
    drop(runner);

    // Another restart, with the row back (the delete after delivery was lost).
    let parts = B::reopen(parts).await;
    parts.deadlines.schedule(&row).await.unwrap();
    let clock = ManualClock::at(t0() + Duration::seconds(700));
    let runner = Arc::new(self::tally_runner(&parts, &clock));
    settle(&parts.store, &runner).await;
    let recs = records(&parts.store, "tally", "t-1").await;
    assert_eq!(recs.len(), version, "nothing appended: {recs:?}");
    assert_eq!(deadlines_received(&recs).len(), 1);
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty()
    );
    let inst = runner.instance("t-1").await.unwrap();
    assert_eq!(inst.state.fired, vec!["wake".to_owned()]);
}

/// A cancellation already in the log when its deadline comes due wins: the
/// runner was down while the input was recorded and time passed; on restart
/// it handles the inputs waiting in the log before it fires deadlines.
pub async fn deadline_waits_for_inputs_already_in_the_log<B: ProcessBackend>() {
    let parts = parts!(B, "deadline_waits_for_inputs_already_in_the_log");
    let clock = ManualClock::at(t0());
    {
        let runner = Arc::new(tally_runner(&parts, &clock));
        feed(
            &parts.store,
            "tally-in-1",
            &[opened("t-1"), timer("t-1", "wake", 600)],
        )
        .await;
        settle(&parts.store, &runner).await;
    }
    // While the runner is down: the cancellation is recorded, then time passes.
    feed(
        &parts.store,
        "tally-in-1",
        &[TallyEvent::TimerCancelled {
            tally: "t-1".into(),
            name: "wake".into(),
        }],
    )
    .await;
    clock.advance(Duration::seconds(601));
    let runner = Arc::new(tally_runner(&parts, &clock));
    settle(&parts.store, &runner).await;
    let recs = records(&parts.store, "tally", "t-1").await;
    assert!(deadlines_received(&recs).is_empty(), "{recs:?}");
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------------------
// 3. Cancelled deadlines never fire
// ---------------------------------------------------------------------------

/// A cancelled (or replaced) deadline whose row is still in the deadline
/// store (a crash between the cancel record and the row delete) is
/// recognised against the instance stream and dropped when it comes due.
pub async fn cancelled_deadline_never_fires<B: ProcessBackend>() {
    let parts = parts!(B, "cancelled_deadline_never_fires");
    let clock = ManualClock::at(t0());
    let runner = Arc::new(tally_runner(&parts, &clock));
    feed(
        &parts.store,
        "tally-in-1",
        &[opened("t-1"), timer("t-1", "wake", 600)],
    )
    .await;
    settle(&parts.store, &runner).await;
    assert_eq!(
        parts.deadlines.pending("tally", "t-1").await.unwrap().len(),
        1
    );
    feed(
        &parts.store,
        "tally-in-1",
        &[TallyEvent::TimerCancelled {
            tally: "t-1".into(),
            name: "wake".into(),
        }],
    )
    .await;
    settle(&parts.store, &runner).await;
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty()
    );

    let recs = records(&parts.store, "tally", "t-1").await;
    assert!(recs.iter().any(
        |(_, r)| matches!(r, ProcessRecord::DeadlineCancelled { name, .. } if name == "wake")
    ));
    let (id, name, due_at) = deadlines_set(&recs).remove(0);
    let stale = Deadline {
        process: "tally".into(),
        instance: "t-1".into(),
        id,
        name,
        due_at,
    };
    parts.deadlines.schedule(&stale).await.unwrap();
    let head = parts.store.head().await.unwrap();
    clock.advance(Duration::seconds(601));
    settle(&parts.store, &runner).await;
    assert_eq!(parts.store.head().await.unwrap(), head, "nothing appended");
    let recs = records(&parts.store, "tally", "t-1").await;
    assert!(deadlines_received(&recs).is_empty(), "{recs:?}");
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty(),
        "the stale row was dropped"
    );

    // A replaced deadline: the old setting's row, put back, does not fire;
    // the new one fires once.
    feed(&parts.store, "tally-in-1", &[timer("t-1", "nap", 600)]).await;
    settle(&parts.store, &runner).await;
    feed(&parts.store, "tally-in-1", &[timer("t-1", "nap", 1200)]).await;
    settle(&parts.store, &runner).await;
    let recs = records(&parts.store, "tally", "t-1").await;
    let naps: Vec<_> = deadlines_set(&recs)
        .into_iter()
        .filter(|(_, n, _)| n == "nap")
        .collect();
    assert_eq!(naps.len(), 2);
    let pending = parts.deadlines.pending("tally", "t-1").await.unwrap();
    assert_eq!(
        pending.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![naps[1].0],
        "only the new setting is pending"
    );
    parts
        .deadlines
        .schedule(&Deadline {
            process: "tally".into(),
            instance: "t-1".into(),
            id: naps[0].0,
            name: "nap".into(),
            due_at: naps[0].2,
        })
        .await
        .unwrap();
    let head = parts.store.head().await.unwrap();
    clock.set(naps[0].2);
    settle(&parts.store, &runner).await;
    assert_eq!(
        parts.store.head().await.unwrap(),
        head,
        "the replaced one is dropped"
    );
    clock.set(naps[1].2);
    settle(&parts.store, &runner).await;
    let recs = records(&parts.store, "tally", "t-1").await;
    let fired = deadlines_received(&recs);
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].id, naps[1].0);
    assert_eq!(
        runner.instance("t-1").await.unwrap().state.fired,
        vec!["nap".to_owned()]
    );
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------------------
// 4. A deadline racing completion
// ---------------------------------------------------------------------------

/// The deadline fires, then the completing input arrives: the runner
/// delivers the deadline, then completes; nothing afterwards. (An input
/// already in the log when the deadline is due is handled first: see
/// `deadline_waits_for_inputs_already_in_the_log`.)
pub async fn deadline_due_with_completion_deadline_first<B: ProcessBackend>() {
    let parts = parts!(B, "deadline_due_with_completion_deadline_first");
    let clock = ManualClock::at(t0());
    let runner = Arc::new(tally_runner(&parts, &clock));
    feed(
        &parts.store,
        "tally-in-1",
        &[opened("t-1"), timer("t-1", "wake", 600)],
    )
    .await;
    settle(&parts.store, &runner).await;
    clock.advance(Duration::seconds(600));
    // One run: the deadline is delivered (its outputs not read back yet).
    runner.catch_up().await.expect("the runner runs");
    feed(
        &parts.store,
        "tally-in-1",
        &[TallyEvent::Closed {
            tally: "t-1".into(),
        }],
    )
    .await;
    settle(&parts.store, &runner).await;

    let recs = records(&parts.store, "tally", "t-1").await;
    let inputs = received(&recs);
    assert_eq!(inputs.len(), 4, "{inputs:?}");
    assert!(matches!(inputs[2], InputRecord::Deadline { deadline, .. } if deadline.name == "wake"));
    assert!(
        matches!(inputs[3], InputRecord::Event { event_type, .. } if event_type == "tally.TallyClosed")
    );
    assert!(completed(&recs));
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty()
    );
    let head = parts.store.head().await.unwrap();
    clock.advance(Duration::hours(1));
    settle(&parts.store, &runner).await;
    assert_eq!(parts.store.head().await.unwrap(), head);
}

/// The instance completes first, then its deadline comes due at that very
/// moment (its row still there: the `Completed` record is not read back
/// yet): nothing is appended. A row delivered long after completion is
/// ignored the same way.
pub async fn deadline_due_with_completion_completion_first<B: ProcessBackend>() {
    let parts = parts!(B, "deadline_due_with_completion_completion_first");
    let clock = ManualClock::at(t0());
    let runner = Arc::new(tally_runner(&parts, &clock));
    feed(
        &parts.store,
        "tally-in-1",
        &[opened("t-1"), timer("t-1", "wake", 600)],
    )
    .await;
    settle(&parts.store, &runner).await;
    let row = parts
        .deadlines
        .pending("tally", "t-1")
        .await
        .unwrap()
        .remove(0);
    feed(
        &parts.store,
        "tally-in-1",
        &[TallyEvent::Closed {
            tally: "t-1".into(),
        }],
    )
    .await;
    // One run: the input is handled (Completed appended), the Completed
    // record is read back by the next run.
    runner.catch_up().await.expect("the runner runs");
    assert!(runner.instance("t-1").await.unwrap().completed);
    let still_there = !parts
        .deadlines
        .pending("tally", "t-1")
        .await
        .unwrap()
        .is_empty();
    if !still_there {
        parts.deadlines.schedule(&row).await.unwrap();
    }
    let stream = stream_of("tally", "t-1");
    let version = parts.store.stream_version(&stream).await.unwrap();
    clock.set(row.due_at);
    runner.catch_up().await.expect("the runner runs");
    assert_eq!(
        parts.store.stream_version(&stream).await.unwrap(),
        version,
        "the deadline of a completed instance appends nothing"
    );
    settle(&parts.store, &runner).await;
    assert_eq!(parts.store.stream_version(&stream).await.unwrap(), version);
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty()
    );

    // Late: the row again (a lost delete), long after completion.
    parts.deadlines.schedule(&row).await.unwrap();
    let head = parts.store.head().await.unwrap();
    clock.advance(Duration::hours(5));
    settle(&parts.store, &runner).await;
    assert_eq!(
        parts.store.head().await.unwrap(),
        head,
        "nothing appended anywhere"
    );
    let recs = records(&parts.store, "tally", "t-1").await;
    assert!(deadlines_received(&recs).is_empty(), "{recs:?}");
    assert!(completed(&recs));
    assert!(
        parts
            .deadlines
            .pending("tally", "t-1")
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------------------
// 5. Redelivery
// ---------------------------------------------------------------------------

/// After every flow settled, the saga's checkpoint is reset to the origin
/// and it runs again (a new runner): the instance streams recognise every
/// input and the targets absorb every re-dispatched command, so nothing is
/// appended anywhere.
pub async fn redelivery_appends_nothing<B: ProcessBackend>() {
    let shop = shop!(B, "redelivery_appends_nothing");
    shop.restock(10).await;
    shop.place("o-1", "visa", "1 Main St", 1).await;
    shop.place("o-2", "declined", "1 Main St", 1).await;
    shop.place("o-3", "visa", "1 Main St", 50).await;
    shop.place("o-4", "visa", "unreachable", 1).await;
    shop.settle().await;
    assert_eq!(shop.call_back().await, 1);
    shop.settle().await;
    shop.clock.advance(Duration::hours(49));
    shop.settle().await;
    assert_eq!(shop.status("o-1").await, OrderStatus::Confirmed);
    for o in ["o-2", "o-3", "o-4"] {
        assert_eq!(shop.status(o).await, OrderStatus::Cancelled, "{o}");
    }
    let head = shop.head().await;
    let versions = stream_versions(&shop.parts.store).await;
    let mut aggregates = Vec::new();
    for o in ["o-1", "o-2", "o-3", "o-4"] {
        aggregates.push(shop.load::<Order>(o).await.version);
        aggregates.push(shop.load::<Payment>(o).await.version);
        aggregates.push(shop.load::<Shipping>(o).await.version);
    }
    aggregates.push(shop.load::<Inventory>("sku-1").await.version);
    let mails = shop.mailbox.sent().len();

    shop.parts
        .checkpoints
        .save("fulfillment", None, Position::ORIGIN, None)
        .await
        .unwrap();
    let again = Arc::new(runner(
        &shop.parts,
        Fulfillment,
        command_bus(&shop.parts.store),
        &shop.clock,
        options(),
    ));
    let through = again.catch_up().await.expect("the saga runs again");
    assert!(
        through >= head,
        "read everything again: {through:?} < {head:?}"
    );
    settle(&shop.parts.store, &again).await;
    // And the whole shop once more.
    shop.settle().await;

    assert_eq!(shop.head().await, head, "nothing appended");
    assert_eq!(stream_versions(&shop.parts.store).await, versions);
    let mut after = Vec::new();
    for o in ["o-1", "o-2", "o-3", "o-4"] {
        after.push(shop.load::<Order>(o).await.version);
        after.push(shop.load::<Payment>(o).await.version);
        after.push(shop.load::<Shipping>(o).await.version);
    }
    after.push(shop.load::<Inventory>("sku-1").await.version);
    assert_eq!(after, aggregates);
    assert_eq!(shop.mailbox.sent().len(), mails);
    for o in ["o-1", "o-2", "o-3", "o-4"] {
        assert!(shop.pending(o).await.is_empty(), "{o}");
    }
}

// ---------------------------------------------------------------------------
// 6. Rejection, compensation order, timeline
// ---------------------------------------------------------------------------

/// Compensations registered a, b, c are sent c, b, a after a rejection,
/// which is recorded as `Received(Rejected)` with the aggregate's error.
pub async fn compensations_run_newest_first_after_a_rejection<B: ProcessBackend>() {
    let parts = parts!(B, "compensations_run_newest_first_after_a_rejection");
    let run = run_chain(parts, "x").await;
    let store = &run.parts.store;
    let recs = records(store, "chain", "x").await;
    let registered: Vec<String> = recs
        .iter()
        .filter_map(|(_, r)| match r {
            ProcessRecord::CompensationRegistered { command } => Some(command.id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(registered, ["x-a", "x-b", "x-c"]);

    let at = recs
        .iter()
        .position(|(_, r)| {
            matches!(
                r,
                ProcessRecord::Received {
                    input: InputRecord::Rejected { .. }
                }
            )
        })
        .expect("the rejection is an input");
    let ProcessRecord::Received {
        input: InputRecord::Rejected { rejection, .. },
    } = &recs[at].1
    else {
        unreachable!()
    };
    assert_eq!(rejection.error, "step `fail` refused");
    assert_eq!(
        (
            rejection.command.target.as_str(),
            rejection.command.id.as_str()
        ),
        ("step", "x-fail")
    );
    assert!(!rejection.compensation);
    let refused = recs
        .iter()
        .find(|(e, _)| e.id == rejection.command_id)
        .expect("the rejection names the CommandSent record");
    assert!(
        matches!(&refused.1, ProcessRecord::CommandSent { command, .. } if command.id == "x-fail")
    );
    assert_eq!(rejections(&recs).len(), 1);

    let tail: Vec<String> = recs[at + 1..]
        .iter()
        .map(|(_, r)| match r {
            ProcessRecord::Compensating { steps } => format!("compensating {steps}"),
            ProcessRecord::CommandSent {
                command,
                compensation: true,
            } => format!("undo {}", command.id),
            ProcessRecord::Completed {} => "completed".to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        tail,
        [
            "compensating 3",
            "undo x-c",
            "undo x-b",
            "undo x-a",
            "completed"
        ]
    );

    // The targets: each step done then undone; the undos in $all order c, b, a,
    // each caused by its compensation command.
    let mut undone_at = Vec::new();
    for step in ["a", "b", "c"] {
        let events = stream(store, &format!("step-x-{step}")).await;
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["step.StepDone", "step.StepUndone"], "step {step}");
        let undo = recs
            .iter()
            .find(|(_, r)| matches!(r, ProcessRecord::CommandSent { command, compensation: true } if command.id == format!("x-{step}")))
            .expect("an undo command");
        assert_eq!(events[1].metadata.causation_id, undo.0.id);
        assert_eq!(events[1].metadata.correlation_id, run.correlation);
        undone_at.push(events[1].position);
    }
    assert!(
        undone_at[2] < undone_at[1] && undone_at[1] < undone_at[0],
        "undone in the order c, b, a: {undone_at:?}"
    );
    assert_eq!(store.stream_version("step-x-fail").await.unwrap(), 0);
    assert_eq!(
        *run.log.undone.lock().unwrap(),
        vec!["c".to_owned(), "b".to_owned(), "a".to_owned()]
    );
    let inst = run.runner.instance("x").await.unwrap();
    assert!(inst.completed);
    assert_eq!(inst.state, ["a", "b", "c"]);
    assert!(inst.compensations().is_empty());
}

/// The timeline of a conversation lists its aggregate events, process
/// records and reactor effects, each after its cause.
pub async fn timeline_in_causal_order<B: ProcessBackend>() {
    let parts = parts!(B, "timeline_in_causal_order");
    let run = run_chain(parts, "y").await;
    let store = &run.parts.store;
    let tl = timeline(store, &run.parts.journal, run.correlation)
        .await
        .expect("a timeline");
    let text = tl.to_string();
    // The printed tree names what happened in words.
    for words in [
        "received REJECTION of",
        "compensating 3 step(s)",
        "sent COMPENSATION",
        "COMPLETED",
        "caused by",
    ] {
        assert!(text.contains(words), "`{words}` missing from\n{text}");
    }

    let events: Vec<&StoredEvent> = tl.events().collect();
    assert_eq!(events[0].event_type, "chain.ChainStarted", "{text}");
    assert_eq!(events[0].id, run.correlation);
    let mut seen = HashSet::new();
    let mut last = Position::ORIGIN;
    for (i, e) in events.iter().enumerate() {
        assert!(e.position > last, "in $all order\n{text}");
        last = e.position;
        if i > 0 {
            assert!(
                seen.contains(&e.metadata.causation_id),
                "{} ({} v{}) comes before its cause\n{text}",
                e.event_type,
                e.stream,
                e.version
            );
        }
        seen.insert(e.id);
    }
    // Everything of the conversation is there.
    let recs = records(store, "chain", "y").await;
    let in_timeline: Vec<&ProcessRecord> = tl.records().collect();
    assert_eq!(
        in_timeline,
        recs.iter().map(|(_, r)| r).collect::<Vec<_>>(),
        "{text}"
    );
    let step_events: Vec<&StoredEvent> = events
        .iter()
        .copied()
        .filter(|e| e.stream.starts_with("step-"))
        .collect();
    assert_eq!(step_events.len(), 6, "{text}");
    assert_eq!(events.len(), 1 + recs.len() + 6, "{text}");

    // Effects: the reactor's, right after the event it handled.
    for (i, entry) in tl.entries.iter().enumerate() {
        if let TimelineEntry::Event { event, .. } = entry
            && event.stream.starts_with("step-")
        {
            match tl.entries.get(i + 1) {
                Some(TimelineEntry::Effect { effect, .. }) => {
                    assert_eq!(effect.event_id, event.id, "{text}");
                    assert_eq!(effect.reactor, "undo-log");
                    assert_eq!(effect.state, EffectState::Done);
                }
                other => panic!("no effect after {}: {other:?}\n{text}", event.event_type),
            }
        }
    }
    assert_eq!(tl.effects().count(), 6, "{text}");

    assert!(text.contains("REJECTION of step-y-fail"), "{text}");
    assert!(text.contains("step `fail` refused"), "{text}");
    assert!(text.contains("sent COMPENSATION step-y-c"), "{text}");
    assert!(text.contains("COMPLETED"), "{text}");
    assert!(text.contains("effect undo-log"), "{text}");
    let undo_c = text.find("sent COMPENSATION step-y-c").unwrap();
    let undo_b = text.find("sent COMPENSATION step-y-b").unwrap();
    let undo_a = text.find("sent COMPENSATION step-y-a").unwrap();
    assert!(undo_c < undo_b && undo_b < undo_a, "{text}");

    // Another conversation is not in it.
    let other = run_chain(run.parts, "z").await;
    let tl = timeline(&other.parts.store, &other.parts.journal, run.correlation)
        .await
        .unwrap();
    assert!(tl.events().all(|e| !e.stream.contains('z')));
    assert_eq!(tl.events().count(), events.len());
}

// ---------------------------------------------------------------------------
// 7. Two runners at once
// ---------------------------------------------------------------------------

/// Two runners of one process on one store at once, without leases: each
/// input (events, then deadlines both runners fire) is handled once per
/// instance (optimistic concurrency on the instance stream), each command
/// executed once.
pub async fn concurrent_runners_handle_each_input_once<B: ProcessBackend>() {
    const INSTANCES: usize = 24;
    const TICKS: u64 = 8;
    let parts = parts!(B, "concurrent_runners_handle_each_input_once");
    let clock = ManualClock::at(t0());
    let names: Vec<String> = (0..INSTANCES).map(|i| format!("t-{i}")).collect();
    let mut inputs: HashMap<String, HashSet<Uuid>> = HashMap::new();
    let opens: Vec<TallyEvent> = names.iter().map(|n| opened(n)).collect();
    for (id, n) in feed(&parts.store, "tally-feed-open", &opens)
        .await
        .into_iter()
        .zip(&names)
    {
        inputs.entry(n.clone()).or_default().insert(id);
    }
    for j in 0..TICKS {
        let ticks: Vec<TallyEvent> = names.iter().map(|n| ticked(n, j)).collect();
        let ids = feed(&parts.store, &format!("tally-feed-{}", j % 3), &ticks).await;
        for (id, n) in ids.into_iter().zip(&names) {
            inputs.entry(n.clone()).or_default().insert(id);
        }
    }
    let make = || {
        Arc::new(runner(
            &parts,
            Tally,
            tally_bus(&parts.store),
            &clock,
            options().concurrency(8).batch_size(50),
        ))
    };
    let (one, two) = (make(), make());
    run_both(&parts.store, &one, &two).await;
    // Every instance has a deadline; both runners fire them at once.
    let timers: Vec<TallyEvent> = names.iter().map(|n| timer(n, "wake", 600)).collect();
    for (id, n) in feed(&parts.store, "tally-feed-timers", &timers)
        .await
        .into_iter()
        .zip(&names)
    {
        inputs.entry(n.clone()).or_default().insert(id);
    }
    run_both(&parts.store, &one, &two).await;
    for name in &names {
        let set = deadlines_set(&records(&parts.store, "tally", name).await);
        assert_eq!(set.len(), 1, "{name}: {set:?}");
        inputs.entry(name.clone()).or_default().insert(set[0].0);
    }
    clock.advance(Duration::seconds(601));
    run_both(&parts.store, &one, &two).await;

    for name in &names {
        let recs = records(&parts.store, "tally", name).await;
        let ids: Vec<Uuid> = received(&recs).iter().map(|i| i.id()).collect();
        let unique: HashSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(ids.len(), unique.len(), "{name}: an input handled twice");
        assert_eq!(&unique, &inputs[name], "{name}: every input handled");
        let counter = Repository::<Counter, _>::new(parts.store.clone())
            .load(name)
            .await
            .unwrap();
        assert_eq!(
            counter.state.added,
            (0..TICKS).collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(counter.version, TICKS, "{name}: a command executed twice");
        let state = one.instance(name).await.unwrap().state;
        assert_eq!(state.ticks, (0..TICKS).collect::<Vec<_>>());
        assert!(
            state.rejections.is_empty(),
            "{name}: {:?}",
            state.rejections
        );
        assert_eq!(state.fired, vec!["wake".to_owned()], "{name}");
        assert!(
            parts
                .deadlines
                .pending("tally", name)
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
    }
}

/// Runs `catch_up` of both runners at once (in tasks) until a round of
/// both appends nothing.
async fn run_both<S, T>(store: &S, one: &Arc<T>, two: &Arc<T>)
where
    S: EventStore,
    T: Settle + 'static,
{
    for _ in 0..20 {
        let head = store.head().await.unwrap();
        let a = tokio::spawn({
            let one = one.clone();
            async move { one.settle_once().await }
        });
        let b = tokio::spawn({
            let two = two.clone();
            async move { two.settle_once().await }
        });
        a.await.unwrap().expect("runner one");
        b.await.unwrap().expect("runner two");
        if store.head().await.unwrap() == head {
            return;
        }
    }
    panic!("the two runners do not settle");
}

// ---------------------------------------------------------------------------
// 8. Strict routing
// ---------------------------------------------------------------------------

/// The inputs of the strict-routing tests: t-1 opened, opened again from
/// another stream, ticked. Returns the ids.
async fn misrouted_inputs<S: EventStore>(store: &S) -> [Uuid; 3] {
    let first = feed(store, "tally-in-1", &[opened("t-1")]).await[0];
    let again = feed(store, "tally-in-2", &[opened("t-1")]).await[0];
    let tick = feed(store, "tally-in-3", &[ticked("t-1", 0)]).await[0];
    [first, again, tick]
}

/// A completed instance receives nothing more, whatever the route: a strict
/// start for it is ignored, not an error.
pub async fn strict_start_of_completed_instance_is_ignored<B: ProcessBackend>() {
    let parts = parts!(B, "strict_start_of_completed_instance_is_ignored");
    let clock = ManualClock::at(t0());
    let runner = Arc::new(tally_runner(&parts, &clock));
    feed(
        &parts.store,
        "tally-in-1",
        &[
            opened("t-1"),
            TallyEvent::Closed {
                tally: "t-1".into(),
            },
        ],
    )
    .await;
    settle(&parts.store, &runner).await;
    let before = records(&parts.store, "tally", "t-1").await.len();
    feed(&parts.store, "tally-in-2", &[opened("t-1")]).await;
    settle(&parts.store, &runner).await;
    assert_eq!(records(&parts.store, "tally", "t-1").await.len(), before);
}

/// A `StartStrict` for an existing instance parks that instance with the
/// input and an error naming the event (the default): the runner goes on,
/// other instances keep flowing, the instance's later inputs are held, and
/// an operator's skip drops the misrouted input and releases the rest.
pub async fn strict_start_of_existing_instance_parks_it<B: ProcessBackend>() {
    let parts = parts!(B, "strict_start_of_existing_instance_parks_it");
    let clock = ManualClock::at(t0());
    let [first, again, tick] = misrouted_inputs(&parts.store).await;
    let other = feed(&parts.store, "tally-in-4", &[opened("t-2")]).await[0];
    let runner = tally_runner(&parts, &clock);
    // Twice: a restart neither stops on it nor parks it again.
    for _ in 0..2 {
        runner
            .catch_up()
            .await
            .expect("a misroute is the instance's failure, not the runner's");
    }
    let parked = runner.parked().await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let (instance, parking) = &parked[0];
    assert_eq!(instance, "t-1");
    assert_eq!(parking.input.as_ref().map(|i| i.id()), Some(again));
    for part in ["StartStrict", "already exists", "tally-in-2", "TallyOpened"] {
        assert!(parking.error.contains(part), "{}", parking.error);
    }
    assert_eq!(parking.held, 1, "the tick waits behind the parking");
    let ids = |recs: &[(StoredEvent, ProcessRecord)]| -> Vec<Uuid> {
        received(recs).iter().map(|i| i.id()).collect()
    };
    assert_eq!(
        ids(&records(&parts.store, "tally", "t-1").await),
        vec![first]
    );
    assert_eq!(
        ids(&records(&parts.store, "tally", "t-2").await),
        vec![other],
        "another instance is not held back"
    );

    assert!(runner.skip("t-1").await.unwrap());
    runner.catch_up().await.unwrap();
    assert!(runner.parked().await.unwrap().is_empty());
    assert_eq!(
        ids(&records(&parts.store, "tally", "t-1").await),
        vec![first, tick],
        "skipped the misrouted input, then handled the held tick"
    );
}

/// An operator's release written straight to the store (what the
/// `aftermath` tool does, without the process manager's types:
/// `admin::release_process`) is carried out by the runner like its own
/// `retry`/`skip`: here a skip drops the misrouted input, the held tick
/// follows, and a second release finds nothing parked.
pub async fn operator_release_through_the_store_is_carried_out<B: ProcessBackend>() {
    let parts = parts!(B, "operator_release_through_the_store_is_carried_out");
    let clock = ManualClock::at(t0());
    let [first, _again, tick] = misrouted_inputs(&parts.store).await;
    let runner = tally_runner(&parts, &clock);
    runner.catch_up().await.unwrap();
    assert_eq!(runner.parked().await.unwrap().len(), 1);
    let stream = stream_of("tally", "t-1");
    let listed = aftermath::admin::parked_processes(&parts.store)
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|p| p.stream.as_str()).collect::<Vec<_>>(),
        vec![stream.as_str()]
    );
    // The runner has the instance cached; the release comes from outside.
    assert!(
        aftermath::admin::release_process(&parts.store, &stream, true)
            .await
            .unwrap()
    );
    assert!(
        !aftermath::admin::release_process(&parts.store, &stream, true)
            .await
            .unwrap(),
        "released already: nothing parked"
    );
    runner.catch_up().await.unwrap();
    assert!(runner.parked().await.unwrap().is_empty());
    assert!(
        aftermath::admin::parked_processes(&parts.store)
            .await
            .unwrap()
            .is_empty()
    );
    let ids: Vec<Uuid> = received(&records(&parts.store, "tally", "t-1").await)
        .iter()
        .map(|i| i.id())
        .collect();
    assert_eq!(
        ids,
        vec![first, tick],
        "skipped the misrouted input, then handled the held tick"
    );
    let bad = aftermath::admin::release_process(&parts.store, "tally-in-2", false).await;
    assert!(
        matches!(bad, Err(aftermath::StoreError::InvalidStream { .. })),
        "{bad:?}"
    );
}

/// With `skip_misrouted(true)` the event is skipped, counted in the
/// status, and the runner goes on.
pub async fn misrouted_event_skipped_and_counted<B: ProcessBackend>() {
    let parts = parts!(B, "misrouted_event_skipped_and_counted");
    let clock = ManualClock::at(t0());
    let [first, _, tick] = misrouted_inputs(&parts.store).await;
    let skipping = || {
        runner(
            &parts,
            Tally,
            tally_bus(&parts.store),
            &clock,
            options().skip_misrouted(true),
        )
    };
    let worker = Worker::new()
        .add_subscriber(skipping())
        .start()
        .expect("unique subscriber names");
    let store = parts.store.clone();
    eventually("the counter to get its command", || {
        let store = store.clone();
        async move { store.stream_version("counter-t-1").await.unwrap() == 1 }
    })
    .await;
    let status = worker.status_of("tally").unwrap();
    assert_eq!(status.skipped, 1, "{status:?}");
    assert!(
        !matches!(status.state, SubscriberState::Stopped(_)),
        "{status:?}"
    );
    worker.shutdown().await;

    let recs = records(&parts.store, "tally", "t-1").await;
    let ids: Vec<Uuid> = received(&recs).iter().map(|i| i.id()).collect();
    assert_eq!(ids, vec![first, tick]);
    // From the origin again: skipped again, never an error.
    parts
        .checkpoints
        .save("tally", None, Position::ORIGIN, None)
        .await
        .unwrap();
    let head = parts.store.head().await.unwrap();
    skipping().catch_up().await.expect("skips, does not stop");
    assert_eq!(parts.store.head().await.unwrap(), head);
}

// ---------------------------------------------------------------------------
// 9. Parallel instances, one input at a time each
// ---------------------------------------------------------------------------

/// Counts appends in flight, per instance stream and overall.
#[derive(Clone)]
pub struct Probe<S> {
    inner: S,
    counts: Arc<Mutex<ProbeCounts>>,
}

#[derive(Default)]
struct ProbeCounts {
    in_flight: HashMap<String, usize>,
    total: usize,
    max_per_stream: usize,
    max_total: usize,
}

struct InFlight<'a> {
    counts: &'a Mutex<ProbeCounts>,
    stream: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.in_flight.get_mut(self.stream) {
            *n -= 1;
        }
    }
}

impl<S> Probe<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Probe {
            inner,
            counts: Arc::default(),
        }
    }

    /// (most appends in flight to one stream, most in flight overall).
    pub fn maxima(&self) -> (usize, usize) {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (c.max_per_stream, c.max_total)
    }
}

#[async_trait]
impl<S: EventStore + Clone> EventStore for Probe<S> {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let _guard = {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let n = c.in_flight.entry(stream.to_owned()).or_default();
            *n += 1;
            let n = *n;
            c.total += 1;
            c.max_per_stream = c.max_per_stream.max(n);
            c.max_total = c.max_total.max(c.total);
            InFlight {
                counts: &self.counts,
                stream,
            }
        };
        // Give other lanes a chance to start theirs meanwhile.
        tokio::task::yield_now().await;
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_stream(stream, from, direction, limit).await
    }

    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_all(after, types, limit).await
    }

    async fn read_all_partition(
        &self,
        after: Position,
        types: Option<&[&str]>,
        partition: Partition,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner
            .read_all_partition(after, types, partition, limit)
            .await
    }

    async fn read_correlation(
        &self,
        correlation_id: Uuid,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner
            .read_correlation(correlation_id, after, limit)
            .await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }

    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        self.inner.find_event(id).await
    }

    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        self.inner.watch_head()
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(snapshot).await
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream).await
    }
}

/// Many instances with many inputs each, concurrency 8: every instance
/// handles its inputs one at a time, in their `$all` order, and its
/// commands reach the target in that order; instances overlap.
pub async fn instances_run_in_parallel_inputs_in_order<B: ProcessBackend>() {
    const INSTANCES: usize = 12;
    const TICKS: u64 = 30;
    let parts = parts!(B, "instances_run_in_parallel_inputs_in_order");
    let clock = ManualClock::at(t0());
    let names: Vec<String> = (0..INSTANCES).map(|i| format!("t-{i}")).collect();
    let opens: Vec<TallyEvent> = names.iter().map(|n| opened(n)).collect();
    feed(&parts.store, "tally-feed-open", &opens).await;
    for j in 0..TICKS {
        // A different interleaving each round, from several streams.
        let ticks: Vec<TallyEvent> = (0..INSTANCES)
            .map(|k| ticked(&names[(k * 5 + j as usize) % INSTANCES], j))
            .collect();
        feed(&parts.store, &format!("tally-feed-{}", j % 5), &ticks).await;
    }
    let probe = Probe::new(parts.store.clone());
    let runner = Arc::new(
        ProcessRunner::new(
            Tally,
            probe.clone(),
            tally_bus(&parts.store),
            parts.deadlines.clone(),
            parts.checkpoints.clone(),
        )
        .clock(clock.clone())
        .options(options().concurrency(8).batch_size(40)),
    );
    settle(&parts.store, &runner).await;

    // The inputs of each instance, in $all order.
    let mut expected: HashMap<String, Vec<(Uuid, u64)>> = HashMap::new();
    for e in all_events(&parts.store).await {
        if let Some(input) = e.decode::<TallyEvent>().unwrap() {
            let (TallyEvent::Opened { tally } | TallyEvent::Ticked { tally, .. }) = &input.event
            else {
                continue;
            };
            expected
                .entry(tally.clone())
                .or_default()
                .push((e.id, e.position.0));
        }
    }
    for name in &names {
        let recs = records(&parts.store, "tally", name).await;
        let handled: Vec<(Uuid, u64)> = received(&recs)
            .into_iter()
            .map(|i| match i {
                InputRecord::Event { id, position, .. } => (*id, *position),
                other => panic!("{name}: unexpected input {other:?}"),
            })
            .collect();
        assert_eq!(handled, expected[name], "{name}: inputs in $all order");
        let state = runner.instance(name).await.unwrap().state;
        assert_eq!(state.ticks, (0..TICKS).collect::<Vec<_>>(), "{name}");
        assert!(
            state.rejections.is_empty(),
            "{name}: {:?}",
            state.rejections
        );
        let counter = Repository::<Counter, _>::new(parts.store.clone())
            .load(name)
            .await
            .unwrap();
        assert_eq!(
            counter.state.added,
            (0..TICKS).collect::<Vec<_>>(),
            "{name}"
        );
    }
    let (per_stream, total) = probe.maxima();
    assert_eq!(per_stream, 1, "an instance handled two inputs at once");
    // The probe yields before each append, so lanes running side by side
    // always overlap there, whatever the backend.
    assert!(
        total > 1,
        "instances never ran in parallel (at most {total} append in flight)"
    );
}

// ---------------------------------------------------------------------------
// The macro
// ---------------------------------------------------------------------------

/// Instantiates every process test for a [`ProcessBackend`] as
/// `#[tokio::test]`s.
#[macro_export]
macro_rules! process_tests {
    ($backend:ty) => {
        $crate::process_tests!(@each $backend;
            fulfillment_happy_path,
            fulfillment_declined_payment,
            fulfillment_out_of_stock,
            fulfillment_missed_shipping_deadline,
            fulfillment_shipping_races_its_deadline,
            deadline_fires_once_after_restart,
            cancelled_deadline_never_fires,
            deadline_due_with_completion_deadline_first,
            deadline_due_with_completion_completion_first,
            deadline_waits_for_inputs_already_in_the_log,
            strict_start_of_completed_instance_is_ignored,
            redelivery_appends_nothing,
            compensations_run_newest_first_after_a_rejection,
            timeline_in_causal_order,
            concurrent_runners_handle_each_input_once,
            strict_start_of_existing_instance_parks_it,
            operator_release_through_the_store_is_carried_out,
            misrouted_event_skipped_and_counted,
            instances_run_in_parallel_inputs_in_order,
            deadline_never_beats_an_input_recorded_before_it_is_due,
            panicking_instance_is_parked_others_flow,
            noop_command_redispatched_after_a_crash_has_no_second_outcome,
            reactor_failures_are_isolated,
            partitioned_runners_split_instances_and_their_deadlines,
        );
    };
    (@each $backend:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                $crate::process::$name::<$backend>().await;
            }
        )*
    };
}

/// Partitioned runners (issue 16): each handles only the instances whose
/// stream hash is in its partition, with their inputs, commands and
/// deadlines; together they handle every instance exactly as one runner
/// would, and each keeps its own checkpoint.
pub async fn partitioned_runners_split_instances_and_their_deadlines<B: ProcessBackend>() {
    let parts = parts!(B, "partitioned_runners_split_instances_and_their_deadlines");
    let clock = ManualClock::at(t0());
    const COUNT: u32 = 3;
    let tallies: Vec<String> = (0..12).map(|i| format!("t-{i}")).collect();
    for t in &tallies {
        feed(
            &parts.store,
            &format!("tally-in-{t}"),
            &[opened(t), ticked(t, 0), timer(t, "wake", 60)],
        )
        .await;
    }
    let owner = |t: &str| Partition::of(&stream_of("tally", t), COUNT);
    assert!(
        (0..COUNT).all(|p| tallies.iter().any(|t| owner(t) == p)),
        "12 instances fill 3 partitions"
    );
    let runners: Vec<_> = (0..COUNT)
        .map(|i| Arc::new(tally_runner(&parts, &clock).partition(i, COUNT)))
        .collect();
    assert_eq!(
        aftermath::worker::Subscriber::name(runners[1].as_ref()),
        "tally#1of3"
    );
    // Partition 0 alone: its instances, nobody else's.
    settle(&parts.store, &runners[0]).await;
    for t in &tallies {
        let inst = runners[0].instance(t).await.unwrap();
        if owner(t) == 0 {
            assert_eq!(inst.state.ticks, vec![0], "{t}");
            assert_eq!(
                parts.deadlines.pending("tally", t).await.unwrap().len(),
                1,
                "{t}"
            );
        } else {
            assert!(!inst.exists(), "{t} belongs to partition {}", owner(t));
            assert!(
                parts
                    .deadlines
                    .pending("tally", t)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    }
    // The others, then time passes: each fires only its own deadlines.
    for runner in &runners[1..] {
        settle(&parts.store, runner).await;
    }
    clock.advance(Duration::seconds(61));
    runners[2].catch_up().await.unwrap();
    for t in &tallies {
        let fired = deadlines_received(&records(&parts.store, "tally", t).await).len();
        assert_eq!(
            fired,
            usize::from(owner(t) == 2),
            "{t} in partition {}",
            owner(t)
        );
    }
    for runner in &runners {
        settle(&parts.store, runner).await;
    }
    for t in &tallies {
        let recs = records(&parts.store, "tally", t).await;
        assert_eq!(deadlines_received(&recs).len(), 1, "{t}: {recs:?}");
        let inst = runners[owner(t) as usize].instance(t).await.unwrap();
        assert_eq!(inst.state.ticks, vec![0]);
        assert!(
            inst.state.rejections.is_empty(),
            "{t}: {:?}",
            inst.state.rejections
        );
        assert_eq!(inst.state.fired, vec!["wake".to_owned()]);
        // The tick's command went out once.
        let counter = stream(&parts.store, &format!("counter-{t}")).await;
        assert_eq!(counter.len(), 1, "{t}: {counter:?}");
    }
    for i in 0..COUNT {
        let key = Partition::new(i, COUNT).key("tally");
        assert!(
            parts
                .checkpoints
                .load_checkpoint(&key)
                .await
                .unwrap()
                .is_some(),
            "{key} keeps its own checkpoint"
        );
    }
    assert_eq!(
        parts.checkpoints.load_checkpoint("tally").await.unwrap(),
        None
    );
}

// ---------------------------------------------------------------------------
// Issue 12: deadlines never beat the log, failure isolation, recorded
// dispatch outcomes
// ---------------------------------------------------------------------------

type Hook = Box<dyn FnOnce() + Send>;

/// [`Tally`] with hooks: handling `Ticked { tally, n }` first runs the hook
/// registered for `(tally, n)` once, and panics while `(tally, n)` is in
/// `panics`.
#[derive(Clone, Default)]
pub struct Hooked {
    hooks: Arc<Mutex<HashMap<(String, u64), Hook>>>,
    panics: Arc<Mutex<HashSet<(String, u64)>>>,
    /// Every `handle` of a `Ticked` input: (tally, n).
    pub handled: Arc<Mutex<Vec<(String, u64)>>>,
}

impl Hooked {
    /// Runs `hook` (once) when `Ticked { tally, n }` is handled.
    pub fn hook(&self, tally: &str, n: u64, hook: impl FnOnce() + Send + 'static) {
        self.hooks
            .lock()
            .unwrap()
            .insert((tally.to_owned(), n), Box::new(hook));
    }

    /// Makes handling `Ticked { tally, n }` panic (or stop panicking).
    pub fn panic_on(&self, tally: &str, n: u64, panics: bool) {
        let mut set = self.panics.lock().unwrap();
        if panics {
            set.insert((tally.to_owned(), n));
        } else {
            set.remove(&(tally.to_owned(), n));
        }
    }

    /// How often `Ticked { tally, n }` was handled (including panics).
    pub fn times(&self, tally: &str, n: u64) -> usize {
        self.handled
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, m)| t == tally && *m == n)
            .count()
    }
}

impl ProcessManager for Hooked {
    const NAME: &'static str = "hooked";
    type Input = TallyEvent;
    type State = TallyState;

    fn route(&self, event: &Recorded<TallyEvent>) -> Route {
        Tally.route(event)
    }

    fn apply(&self, state: &mut TallyState, input: &Input<TallyEvent>) {
        Tally.apply(state, input)
    }

    fn handle(&self, state: &TallyState, input: &Input<TallyEvent>, out: &mut Outputs) {
        if let Input::Event(e) = input
            && let TallyEvent::Ticked { tally, n } = &e.event
        {
            let key = (tally.clone(), *n);
            self.handled.lock().unwrap().push(key.clone());
            let hook = self.hooks.lock().unwrap().remove(&key);
            if let Some(hook) = hook {
                hook();
            }
            if self.panics.lock().unwrap().contains(&key) {
                panic!("boom: {tally} #{n}");
            }
        }
        Tally.handle(state, input, out)
    }
}

/// Issue 12, item 4. Instance `r` has a deadline due at t. While the runner
/// is busy with a large page (many instances ticking) that it read as caught
/// up, the cancellation of `r`'s deadline is recorded and the clock passes
/// t. The cancellation was recorded before the deadline was due, so it
/// wins: the deadline is never delivered. (Before the fix the cutoff was the
/// clock after the page: the deadline fired first.) Ten rounds.
pub async fn deadline_never_beats_an_input_recorded_before_it_is_due<B: ProcessBackend>() {
    let parts = parts!(B, "deadline_never_beats_an_input_recorded_before_it_is_due");
    let clock = ManualClock::at(t0());
    let hooked = Hooked::default();
    let runner = Arc::new(runner(
        &parts,
        hooked.clone(),
        tally_bus(&parts.store),
        &clock,
        // One lane at a time: while the hook blocks its lane, no other lane
        // of the runner's task holds a connection or the append lock.
        options().batch_size(500).concurrency(1),
    ));
    for round in 0..10 {
        let r = format!("r-{round}");
        let input = format!("tally-in-{r}");
        feed(&parts.store, &input, &[opened(&r), timer(&r, "wake", 60)]).await;
        settle(&parts.store, &runner).await;
        // The cancellation lands while the busy page is being handled, a
        // moment before the deadline is due; then the clock passes it.
        let busy = format!("busy-{round}");
        let (store, moved, cancelled) = (parts.store.clone(), clock.clone(), r.clone());
        hooked.hook(&busy, 0, move || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(feed(
                    &store,
                    &format!("tally-in-{cancelled}"),
                    &[TallyEvent::TimerCancelled {
                        tally: cancelled.clone(),
                        name: "wake".into(),
                    }],
                ))
            });
            moved.advance(Duration::seconds(61));
        });
        let mut page = vec![opened(&busy), ticked(&busy, 0)];
        for i in 0..40 {
            let other = format!("{busy}-{i}");
            page.push(opened(&other));
            page.push(ticked(&other, 0));
        }
        feed(&parts.store, &format!("tally-in-{busy}"), &page).await;
        settle(&parts.store, &runner).await;
        assert_eq!(hooked.times(&busy, 0), 1, "round {round}: the hook ran");
        let recs = records(&parts.store, "hooked", &r).await;
        assert!(
            deadlines_received(&recs).is_empty(),
            "round {round}: the deadline beat the cancellation recorded before it was due: {recs:#?}"
        );
        assert!(
            parts
                .deadlines
                .pending("hooked", &r)
                .await
                .unwrap()
                .is_empty(),
            "round {round}"
        );
    }
}

/// Issue 12, item 5. An instance whose `handle` panics is parked; the
/// runner goes on with the other instances; the parked instance's later
/// inputs are held; it is listed for operators with the panic's message; a
/// restart does not run the panicking input again; an operator retry runs
/// it and the held inputs in order (after the bug is fixed), and a skip
/// gives it up and runs the held inputs.
pub async fn panicking_instance_is_parked_others_flow<B: ProcessBackend>() {
    let parts = parts!(B, "panicking_instance_is_parked_others_flow");
    let clock = ManualClock::at(t0());
    let hooked = Hooked::default();
    hooked.panic_on("bad", 1, true);
    hooked.panic_on("lost", 1, true);
    let new_runner = || {
        Arc::new(runner(
            &parts,
            hooked.clone(),
            tally_bus(&parts.store),
            &clock,
            options(),
        ))
    };
    let first = new_runner();
    feed(
        &parts.store,
        "tally-in-1",
        &[
            opened("good"),
            opened("bad"),
            opened("lost"),
            ticked("bad", 0),
            ticked("lost", 0),
            ticked("bad", 1),
            ticked("lost", 1),
            ticked("good", 0),
            ticked("bad", 2),
            ticked("lost", 2),
            ticked("good", 1),
        ],
    )
    .await;
    settle(&parts.store, &first).await;
    // The others flow.
    assert_eq!(
        first.instance("good").await.unwrap().state.ticks,
        vec![0, 1]
    );
    // The culprits are parked at the panicking input, listed with the panic.
    let mut parked = first.parked().await.unwrap();
    parked.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        parked.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
        vec!["bad", "lost"]
    );
    for (instance, parking) in &parked {
        assert!(parking.error.contains("panicked"), "{}", parking.error);
        assert!(
            parking.error.contains(&format!("boom: {instance} #1")),
            "{}",
            parking.error
        );
        assert_eq!(parking.held, 1, "{instance}: #2 waits behind #1");
    }
    let bad = first.instance("bad").await.unwrap();
    assert_eq!(bad.state.ticks, vec![0]);
    assert_eq!(hooked.times("bad", 1), 1);
    assert_eq!(hooked.times("bad", 2), 0, "held, not handled");

    // A restart does not run the panicking input again.
    drop(first);
    let second = new_runner();
    settle(&parts.store, &second).await;
    assert_eq!(hooked.times("bad", 1), 1);
    assert_eq!(second.parked().await.unwrap().len(), 2);

    // A retry while still broken parks it again, once.
    assert!(second.retry("bad").await.unwrap());
    settle(&parts.store, &second).await;
    assert_eq!(hooked.times("bad", 1), 2);
    assert_eq!(hooked.times("bad", 2), 0);
    assert_eq!(second.parked().await.unwrap().len(), 2);

    // Fixed: a retry runs the input, then the held one, in order.
    hooked.panic_on("bad", 1, false);
    assert!(second.retry("bad").await.unwrap());
    settle(&parts.store, &second).await;
    assert_eq!(
        second.instance("bad").await.unwrap().state.ticks,
        vec![0, 1, 2]
    );
    let counter = Repository::<Counter, _>::new(parts.store.clone());
    assert_eq!(
        counter.load("bad").await.unwrap().state.added,
        vec![0, 1, 2]
    );

    // Skip: the panicking input is given up, the held one runs (the
    // counter refuses 2 after 0: recorded as a rejection).
    assert!(second.skip("lost").await.unwrap());
    settle(&parts.store, &second).await;
    let lost = second.instance("lost").await.unwrap();
    assert_eq!(lost.state.ticks, vec![0, 2]);
    assert_eq!(lost.state.rejections.len(), 1, "{:?}", lost.state);
    assert_eq!(hooked.times("lost", 1), 1, "skipped, not run again");
    assert!(second.parked().await.unwrap().is_empty());
    assert!(!second.retry("lost").await.unwrap(), "nothing to release");
    // Redelivered from the start: nothing runs twice.
    let third = ProcessRunner::new(
        hooked.clone(),
        parts.store.clone(),
        tally_bus(&parts.store),
        parts.deadlines.clone(),
        aftermath::subscription::MemoryCheckpoints::new(),
    )
    .clock(clock.clone())
    .options(options());
    third.catch_up().await.unwrap();
    third.catch_up().await.unwrap();
    assert_eq!(hooked.times("lost", 1), 1);
    assert_eq!(hooked.times("bad", 1), 3);
    assert_eq!(
        counter.load("bad").await.unwrap().state.added,
        vec![0, 1, 2]
    );
}

/// A lamp: turning it on when it is on is accepted without events.
#[derive(Debug, Default)]
pub struct Lamp {
    /// Whether it is on.
    pub on: bool,
}

/// What a lamp is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LampCommand {
    /// Turn it on.
    On,
    /// Turn it off.
    Off,
}

/// What a lamp records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "lamp")]
pub enum LampEvent {
    /// Turned on.
    On {},
    /// Turned off.
    Off {},
}

impl Aggregate for Lamp {
    const CATEGORY: &'static str = "lamp";
    type Command = LampCommand;
    type Event = LampEvent;
    type Error = std::convert::Infallible;

    fn decide(&self, command: LampCommand) -> Result<Vec<LampEvent>, Self::Error> {
        Ok(match command {
            LampCommand::On if !self.on => vec![LampEvent::On {}],
            LampCommand::Off if self.on => vec![LampEvent::Off {}],
            _ => vec![],
        })
    }

    fn apply(&mut self, event: &LampEvent) {
        self.on = matches!(event, LampEvent::On {});
    }
}

/// Turns lamp `tally` on when tally `tally` opens.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lighter;

impl ProcessManager for Lighter {
    const NAME: &'static str = "lighter";
    type Input = TallyEvent;
    type State = ();

    fn route(&self, event: &Recorded<TallyEvent>) -> Route {
        match &event.event {
            TallyEvent::Opened { tally } => Route::Start(tally.clone()),
            _ => Route::Ignore,
        }
    }

    fn apply(&self, _: &mut (), _: &Input<TallyEvent>) {}

    fn handle(&self, _: &(), input: &Input<TallyEvent>, out: &mut Outputs) {
        if let Some(TallyEvent::Opened { tally }) = input.event() {
            out.send::<Lamp>(tally.clone(), LampCommand::On);
        }
    }
}

/// Issue 12, item 8. A process's command is accepted without events (the
/// lamp is on already); the lamp is then turned off; the process runner
/// crashes and loses its checkpoint, so it dispatches the command again.
/// It is recognised as executed, not decided again against the newer
/// state (which would turn the lamp on late).
pub async fn noop_command_redispatched_after_a_crash_has_no_second_outcome<B: ProcessBackend>() {
    let parts = parts!(
        B,
        "noop_command_redispatched_after_a_crash_has_no_second_outcome"
    );
    let clock = ManualClock::at(t0());
    let lamps = Repository::<Lamp, _>::new(parts.store.clone());
    let bus = || CommandBus::new().register(Repository::<Lamp, _>::new(parts.store.clone()));
    lamps.execute("l-1", LampCommand::On).await.unwrap();
    feed(&parts.store, "tally-in-1", &[opened("l-1")]).await;
    let first = Arc::new(runner(&parts, Lighter, bus(), &clock, options()));
    settle(&parts.store, &first).await;
    lamps.execute("l-1", LampCommand::Off).await.unwrap();
    // The restart after a crash that lost the checkpoint reads the command
    // again and dispatches it: decided against the lamp that is off now, it
    // would turn it on, but the store refuses its derived ids and the first
    // result (accepted, no events) comes back.
    let restarted = ProcessRunner::new(
        Lighter,
        parts.store.clone(),
        bus(),
        parts.deadlines.clone(),
        aftermath::subscription::MemoryCheckpoints::new(),
    )
    .clock(clock.clone())
    .options(options());
    restarted.catch_up().await.unwrap();
    restarted.catch_up().await.unwrap();
    let types: Vec<String> = stream(&parts.store, "lamp-l-1")
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        types,
        vec!["lamp.On", aftermath::COMMAND_ACCEPTED, "lamp.Off"],
        "the resent command took effect again"
    );
    let lamp = lamps.load("l-1").await.unwrap();
    assert!(!lamp.state.on);
    assert_eq!(lamp.version, 3);
}

/// A reactor for the isolation test: panics on stream `touchy-panic` and
/// hangs on `touchy-hang` while `broken`; fails once on `touchy-slow`.
#[derive(Clone, Default)]
pub struct Touchy {
    /// (stream, attempt) of every call, in order.
    pub calls: Arc<Mutex<Vec<(String, u32)>>>,
    /// Whether the panicking and hanging streams misbehave.
    pub broken: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl Reactor for Touchy {
    type Event = TallyEvent;

    fn name(&self) -> &str {
        "touchy"
    }

    async fn react(
        &self,
        event: &Recorded<TallyEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        self.calls
            .lock()
            .unwrap()
            .push((event.stream.clone(), ctx.attempt));
        let broken = self.broken.load(std::sync::atomic::Ordering::SeqCst);
        match event.stream.as_str() {
            "touchy-panic" if broken => panic!("boom in react"),
            "touchy-hang" if broken => std::future::pending().await,
            "touchy-slow" if ctx.attempt == 1 => Err(ReactError::retry("busy")),
            _ => Ok(()),
        }
    }
}

/// Issue 12, item 5, reactors. A panicking `react` parks its event (with
/// the panic's message) and holds its stream; a hanging one times out and
/// is parked after its attempts; a transient failure's backoff does not
/// hold the other streams; an effect whose attempts all started and never
/// finished (the process died during each call) is parked on restart
/// instead of being run again; operator retry and skip release them.
pub async fn reactor_failures_are_isolated<B: ProcessBackend>() {
    let parts = parts!(B, "reactor_failures_are_isolated");
    let touchy = Touchy::default();
    touchy
        .broken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let runner = || {
        ReactorRunner::new(
            touchy.clone(),
            parts.store.clone(),
            parts.journal.clone(),
            parts.checkpoints.clone(),
        )
        .options(
            aftermath::reactor::ReactorOptions::default()
                .max_attempts(2)
                .retry_delay(StdDuration::from_millis(300), StdDuration::from_millis(300))
                .call_timeout(StdDuration::from_millis(200))
                .poll_interval(StdDuration::from_millis(50)),
        )
    };
    feed(&parts.store, "touchy-slow", &[opened("s")]).await;
    feed(&parts.store, "touchy-panic", &[opened("p"), ticked("p", 0)]).await;
    feed(&parts.store, "touchy-hang", &[opened("h")]).await;
    feed(&parts.store, "touchy-ok", &[opened("o"), ticked("o", 0)]).await;
    let crashed = feed(&parts.store, "touchy-crash", &[opened("c")]).await[0];
    // The process died during each of the 2 attempts of this effect.
    let crashed_event = parts.store.find_event(crashed).await.unwrap().unwrap();
    let now = Utc::now();
    parts
        .journal
        .record(
            &aftermath::reactor::Effect {
                reactor: "touchy".into(),
                event_id: crashed,
                position: crashed_event.position,
                stream: crashed_event.stream.clone(),
                event_type: crashed_event.event_type.clone(),
                state: EffectState::Started,
                attempts: 2,
                last_error: None,
                created_at: now,
                updated_at: now,
            },
            None,
        )
        .await
        .unwrap();
    let events = all_events(&parts.store).await;
    let id = |stream: &str, version: u64| {
        events
            .iter()
            .find(|e| e.stream == stream && e.version == version)
            .unwrap()
            .id
    };
    runner().catch_up().await.expect("the runner survives");
    let state = |stream: &'static str, version: u64| {
        let journal = parts.journal.clone();
        let event = id(stream, version);
        async move {
            let entries = journal.load("touchy", &[event]).await.unwrap();
            entries.get(&event).cloned().expect("journaled")
        }
    };
    // The others flow.
    assert_eq!(state("touchy-ok", 1).await.state, EffectState::Done);
    assert_eq!(state("touchy-ok", 2).await.state, EffectState::Done);
    let slow = state("touchy-slow", 1).await;
    assert_eq!((slow.state, slow.attempts), (EffectState::Done, 2));
    // The backoff of touchy-slow did not hold the page: touchy-ok ran
    // before its second attempt.
    let calls = touchy.calls.lock().unwrap().clone();
    let at = |stream: &str, attempt: u32| {
        calls
            .iter()
            .position(|(s, a)| s == stream && *a == attempt)
            .unwrap_or_else(|| panic!("{stream} attempt {attempt} in {calls:?}"))
    };
    assert!(at("touchy-ok", 1) < at("touchy-slow", 2), "{calls:?}");
    // The culprits are parked and listed.
    let panicked = state("touchy-panic", 1).await;
    assert_eq!(panicked.state, EffectState::Parked);
    assert!(
        panicked
            .last_error
            .as_deref()
            .unwrap()
            .contains("boom in react"),
        "{panicked:?}"
    );
    assert_eq!(state("touchy-panic", 2).await.state, EffectState::Blocked);
    let hung = state("touchy-hang", 1).await;
    assert_eq!((hung.state, hung.attempts), (EffectState::Parked, 2));
    assert!(
        hung.last_error.as_deref().unwrap().contains("timed out"),
        "{hung:?}"
    );
    let gave_up = state("touchy-crash", 1).await;
    assert_eq!(gave_up.state, EffectState::Parked);
    assert!(
        !calls.iter().any(|(s, _)| s == "touchy-crash"),
        "an effect that started {} times and never finished ran again",
        gave_up.attempts
    );
    let mut listed: Vec<Uuid> = parts
        .journal
        .parked(Some("touchy"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    listed.sort();
    let mut expected = vec![
        id("touchy-panic", 1),
        id("touchy-hang", 1),
        id("touchy-crash", 1),
    ];
    expected.sort();
    assert_eq!(listed, expected);

    // A restart does not run them again.
    let before = touchy.calls.lock().unwrap().len();
    runner().catch_up().await.unwrap();
    assert_eq!(touchy.calls.lock().unwrap().len(), before);

    // Operators: retry the panicking one (fixed) and the crashed one, skip
    // the hanging one.
    touchy
        .broken
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(
        parts
            .journal
            .retry("touchy", id("touchy-panic", 1))
            .await
            .unwrap()
    );
    assert!(
        parts
            .journal
            .retry("touchy", id("touchy-crash", 1))
            .await
            .unwrap()
    );
    assert!(
        parts
            .journal
            .skip("touchy", id("touchy-hang", 1))
            .await
            .unwrap()
    );
    runner().catch_up().await.unwrap();
    assert_eq!(state("touchy-panic", 1).await.state, EffectState::Done);
    assert_eq!(state("touchy-panic", 2).await.state, EffectState::Done);
    assert_eq!(state("touchy-crash", 1).await.state, EffectState::Done);
    assert_eq!(state("touchy-hang", 1).await.state, EffectState::Skipped);
    let calls = touchy.calls.lock().unwrap().clone();
    assert_eq!(
        calls.iter().filter(|(s, _)| s == "touchy-hang").count(),
        2,
        "skipped: not called again"
    );
    assert!(
        parts
            .journal
            .parked(Some("touchy"))
            .await
            .unwrap()
            .is_empty()
    );
}
