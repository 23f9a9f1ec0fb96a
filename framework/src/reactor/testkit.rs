//! A test kit for your own reactors: delivers every event twice and crashes
//! the runner at every step, then reports what your reactor was asked to do.
//!
//! [`ReactorTest`] runs a [`Reactor`] over a list of events, once per
//! [`Scenario`], each on fresh stores (in memory by default, or stores you
//! open, e.g. SQLite files) with fresh event ids:
//!
//! - [`Scenario::Redelivery`]: run to completion, reset the checkpoint to the
//!   origin and run again. Every event is delivered twice; no effect may run
//!   twice.
//! - [`Scenario::JournalLost`]: run to completion, lose the journal's done
//!   entries (as after restoring an old backup), reset the checkpoint and run
//!   again. Your reactor sees every idempotency key a second time and must
//!   rely on the receiver to drop the repeats.
//! - [`Scenario::Crash`]: the Nth journal write of `Started` fails (the crash
//!   lands before the call), or of `Done` (after the call, before the journal
//!   knows), or the Nth checkpoint save (after `Done`, before the checkpoint
//!   moves). The runner is restarted after each failure, as a
//!   [`Worker`](crate::worker::Worker) would, until it finishes; then every
//!   event is delivered again as in `Redelivery`. One scenario per N, for
//!   every write a clean run makes (or a sample, see
//!   [`ReactorTest::crashes_per_step`]).
//!
//! The [`Report`] lists every call your reactor got (event, attempt,
//! idempotency key, result) and the final journal entries, and checks the
//! runner's promises: every effect settles, one key per effect, a key per
//! effect of its own, no call after the effect was recorded done, attempts
//! that only go up, per-stream order, and a checkpoint that never passes an
//! unsettled event. What it cannot see is your receiver: check it yourself
//! (each key applied once), as below.
//!
//! The failures are injected with [`FaultyJournal`] and [`FaultyCheckpoints`],
//! wrappers around any [`EffectJournal`] and [`CheckpointStore`] that fail the
//! Nth matching write ([`Faults`]); use them directly to build your own
//! crash tests.
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//!
//! use aftermath::prelude::*;
//! use aftermath::reactor::testkit::ReactorTest;
//! use aftermath::reactor::{EffectContext, ReactError, Reactor};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, Event)]
//! #[event(prefix = "order")]
//! enum OrderEvent { Placed { email: String } }
//!
//! /// A fake mail provider that, like a real one, drops repeats of a key.
//! #[derive(Default)]
//! struct Mailer { sent: Mutex<HashMap<String, String>> }
//!
//! struct ConfirmationMail { mailer: Arc<Mailer> }
//!
//! #[async_trait::async_trait]
//! impl Reactor for ConfirmationMail {
//!     type Event = OrderEvent;
//!     fn name(&self) -> &str { "confirmation-mail" }
//!     async fn react(&self, event: &Recorded<OrderEvent>, ctx: &EffectContext) -> Result<(), ReactError> {
//!         let OrderEvent::Placed { email } = &event.event;
//!         let mut sent = self.mailer.sent.lock().unwrap();
//!         sent.entry(ctx.idempotency_key.clone()).or_insert_with(|| email.clone());
//!         Ok(())
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let mailer = Arc::new(Mailer::default());
//! let report = ReactorTest::new(ConfirmationMail { mailer: mailer.clone() })
//!     .event("order-1", OrderEvent::Placed { email: "ann@example.com".into() })
//!     .event("order-2", OrderEvent::Placed { email: "bob@example.com".into() })
//!     .event("order-1", OrderEvent::Placed { email: "ann@example.com".into() })
//!     .run()
//!     .await
//!     .unwrap();
//! report.assert_each_effect_keyed_once();
//! report.assert_all_done();
//! // Crashes between the call and its journal write made the reactor send
//! // some keys twice; the mailer kept one mail per key.
//! assert!(report.repeated_calls() > 0);
//! assert_eq!(mailer.sent.lock().unwrap().len(), report.distinct_keys());
//! println!("{report}");
//! # });
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    Effect, EffectContext, EffectJournal, EffectState, MemoryJournal, ReactError, Reactor,
    ReactorOptions, ReactorRunner, idempotency_key,
};
use crate::event::{EventData, Position, Recorded};
use crate::store::memory::MemoryStore;
use crate::store::{EventStore, ExpectedVersion, StoreError};
use crate::subscription::{CheckpointStore, Lease, MemoryCheckpoints};

/// A write the runner makes, where a crash can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// The journal write of `Started`: the crash lands before the external call.
    BeforeCall,
    /// The journal write of `Done`: after the call, before the journal records it.
    AfterCall,
    /// A checkpoint save: after `Done`, before the checkpoint moves.
    BeforeCheckpoint,
}

impl Step {
    /// Every step, in the order they happen for one event.
    pub const ALL: [Step; 3] = [Step::BeforeCall, Step::AfterCall, Step::BeforeCheckpoint];

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::BeforeCall => "before the call (Started write)",
            Step::AfterCall => "after the call (Done write)",
            Step::BeforeCheckpoint => "before the checkpoint (checkpoint save)",
        })
    }
}

/// The error behind an injected failure, inside [`StoreError::Database`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected fault: {step}, write #{nth}")]
pub struct InjectedFault {
    /// Where.
    pub step: Step,
    /// Which matching write (1-based).
    pub nth: usize,
}

impl InjectedFault {
    /// The injected fault behind `error`, if it is one.
    pub fn find(error: &StoreError) -> Option<&InjectedFault> {
        match error {
            StoreError::Database { source, .. } => source.downcast_ref::<InjectedFault>(),
            _ => None,
        }
    }
}

/// A fault that was injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// Where.
    pub step: Step,
    /// Which matching write (1-based).
    pub nth: usize,
    /// The event whose journal write failed (`None` for a checkpoint save).
    pub event_id: Option<Uuid>,
}

#[derive(Default)]
struct FaultState {
    plan: Vec<(Step, usize)>,
    seen: [usize; 3],
    fired: Vec<Fired>,
    done: HashSet<Uuid>,
}

/// A crash plan shared by [`FaultyJournal`] and [`FaultyCheckpoints`]: which
/// matching writes fail, plus what they saw. Clones share state.
///
/// Writes are counted per [`Step`] from 1, across restarts; the Nth write of
/// a planned step fails with a [`StoreError::Database`] wrapping
/// [`InjectedFault`] and writes nothing, as if the process had died just
/// before it.
#[derive(Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
}

impl Faults {
    /// No faults planned.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also fails the `nth` (1-based) write of `step`.
    pub fn fail(self, step: Step, nth: usize) -> Self {
        self.add(step, nth);
        self
    }

    /// Plans one more failure while running.
    pub fn add(&self, step: Step, nth: usize) {
        self.lock().plan.push((step, nth));
    }

    /// Cancels the failures that have not fired yet.
    pub fn disarm(&self) {
        self.lock().plan.clear();
    }

    /// Writes of `step` attempted so far (including failed ones).
    pub fn seen(&self, step: Step) -> usize {
        self.lock().seen[step.index()]
    }

    /// The failures injected so far.
    pub fn fired(&self) -> Vec<Fired> {
        self.lock().fired.clone()
    }

    /// Whether a `Done` write for `event_id` succeeded through a
    /// [`FaultyJournal`] sharing these faults.
    pub fn recorded_done(&self, event_id: Uuid) -> bool {
        self.lock().done.contains(&event_id)
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hit(&self, step: Step, event_id: Option<Uuid>) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.seen[step.index()] += 1;
        let nth = state.seen[step.index()];
        let Some(i) = state.plan.iter().position(|p| *p == (step, nth)) else {
            return Ok(());
        };
        state.plan.remove(i);
        state.fired.push(Fired {
            step,
            nth,
            event_id,
        });
        Err(StoreError::database(
            "injected fault",
            InjectedFault { step, nth },
        ))
    }

    fn forget_done(&self) {
        self.lock().done.clear();
    }
}

/// An [`EffectJournal`] whose writes of `Started` and `Done` fail as planned
/// in its [`Faults`] ([`Step::BeforeCall`], [`Step::AfterCall`]).
#[derive(Clone)]
pub struct FaultyJournal<J> {
    inner: J,
    faults: Faults,
}

impl<J> FaultyJournal<J> {
    /// Wraps `inner`.
    pub fn new(inner: J, faults: Faults) -> Self {
        FaultyJournal { inner, faults }
    }

    /// The wrapped journal.
    pub fn inner(&self) -> &J {
        &self.inner
    }
}

#[async_trait]
impl<J: EffectJournal> EffectJournal for FaultyJournal<J> {
    async fn load(
        &self,
        reactor: &str,
        events: &[Uuid],
    ) -> Result<HashMap<Uuid, Effect>, StoreError> {
        self.inner.load(reactor, events).await
    }

    async fn effects_for(&self, event_ids: &[Uuid]) -> Result<Vec<Effect>, StoreError> {
        self.inner.effects_for(event_ids).await
    }

    async fn record(&self, effect: &Effect, lease: Option<&Lease>) -> Result<(), StoreError> {
        match effect.state {
            EffectState::Started => self.faults.hit(Step::BeforeCall, Some(effect.event_id))?,
            EffectState::Done => self.faults.hit(Step::AfterCall, Some(effect.event_id))?,
            _ => {}
        }
        self.inner.record(effect, lease).await?;
        if effect.state == EffectState::Done {
            self.faults.lock().done.insert(effect.event_id);
        }
        Ok(())
    }

    async fn held(&self, reactor: &str) -> Result<Vec<Effect>, StoreError> {
        self.inner.held(reactor).await
    }

    async fn parked(&self, reactor: Option<&str>) -> Result<Vec<Effect>, StoreError> {
        self.inner.parked(reactor).await
    }

    async fn retry(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError> {
        self.inner.retry(reactor, event_id).await
    }

    async fn retry_all(&self, reactor: &str) -> Result<u64, StoreError> {
        self.inner.retry_all(reactor).await
    }

    async fn skip(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError> {
        self.inner.skip(reactor, event_id).await
    }

    async fn cleanup(
        &self,
        reactor: &str,
        before: DateTime<Utc>,
        through: Position,
    ) -> Result<u64, StoreError> {
        self.inner.cleanup(reactor, before, through).await
    }
}

/// A [`CheckpointStore`] whose saves fail as planned in its [`Faults`]
/// ([`Step::BeforeCheckpoint`]).
#[derive(Clone)]
pub struct FaultyCheckpoints<C> {
    inner: C,
    faults: Faults,
}

impl<C> FaultyCheckpoints<C> {
    /// Wraps `inner`.
    pub fn new(inner: C, faults: Faults) -> Self {
        FaultyCheckpoints { inner, faults }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &C {
        &self.inner
    }
}

#[async_trait]
impl<C: CheckpointStore> CheckpointStore for FaultyCheckpoints<C> {
    async fn load_checkpoint(&self, subscriber: &str) -> Result<Option<Position>, StoreError> {
        self.inner.load_checkpoint(subscriber).await
    }

    async fn save(
        &self,
        subscriber: &str,
        expected: Option<Position>,
        position: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        self.faults.hit(Step::BeforeCheckpoint, None)?;
        self.inner.save(subscriber, expected, position, lease).await
    }
}

/// What a scenario does; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// Run to completion, reset the checkpoint to the origin, run again.
    Redelivery,
    /// Run to completion, lose the journal's done entries, reset the
    /// checkpoint, run again: the reactor sees every key twice.
    JournalLost,
    /// Fail the `nth` write of `step`, restart until done, then redeliver.
    Crash {
        /// Where the crash lands.
        step: Step,
        /// Which matching write fails (1-based).
        nth: usize,
    },
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Redelivery => f.write_str("redelivery"),
            Scenario::JournalLost => f.write_str("journal lost"),
            Scenario::Crash { step, nth } => write!(f, "crash {step} #{nth}"),
        }
    }
}

/// Which delivery of the events a call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Phase {
    /// The first run, with its crashes and restarts.
    #[default]
    Run,
    /// The second delivery, after the checkpoint was reset (and, for
    /// [`Scenario::JournalLost`], the journal lost).
    Redelivery,
}

/// One call of the reactor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Start order within the scenario (0-based).
    pub seq: usize,
    /// Index of the event in the list given to [`ReactorTest`].
    pub event: usize,
    /// The event's id in this scenario.
    pub event_id: Uuid,
    /// [`EffectContext::attempt`].
    pub attempt: u32,
    /// [`EffectContext::idempotency_key`].
    pub idempotency_key: String,
    /// Which delivery.
    pub phase: Phase,
    /// Whether the journal had already recorded the effect done.
    pub after_done: bool,
    /// What the reactor returned.
    pub result: Result<(), ReactError>,
}

/// An event as appended in one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    /// Index in the list given to [`ReactorTest`].
    pub index: usize,
    /// Its id in this scenario (fresh per scenario).
    pub id: Uuid,
    /// Its stream.
    pub stream: String,
    /// Its position.
    pub position: Position,
    /// The idempotency key of its effect.
    pub idempotency_key: String,
}

/// What happened in one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// The scenario.
    pub scenario: Scenario,
    /// The events, as appended.
    pub events: Vec<EventRef>,
    /// Every call of the reactor, in the order they returned.
    pub calls: Vec<Call>,
    /// Runner restarts after a failed run.
    pub restarts: u32,
    /// The errors that caused them.
    pub errors: Vec<String>,
    /// The injected failures that fired.
    pub fired: Vec<Fired>,
    /// Matching writes of each step during the first run (attempted, failed
    /// or not), in the order of [`Step::ALL`].
    pub writes: [usize; 3],
    /// The final journal entry of each event (by index).
    pub effects: Vec<Option<Effect>>,
    /// Broken promises, in words. Empty when all is well.
    pub violations: Vec<String>,
}

impl ScenarioReport {
    /// The calls for event `index`.
    pub fn calls_for(&self, index: usize) -> Vec<&Call> {
        self.calls.iter().filter(|c| c.event == index).collect()
    }

    /// The final journal state of event `index`.
    pub fn state_of(&self, index: usize) -> Option<EffectState> {
        self.effects
            .get(index)
            .and_then(|e| e.as_ref().map(|e| e.state))
    }

    /// Calls that re-sent a key the reactor had already been called with.
    pub fn repeated_calls(&self) -> usize {
        let mut seen = HashSet::new();
        self.calls
            .iter()
            .filter(|c| !seen.insert(c.idempotency_key.as_str()))
            .count()
    }
}

/// What happened in every scenario.
#[derive(Debug, Clone)]
pub struct Report {
    /// The reactor's name.
    pub reactor: String,
    /// One entry per scenario, in the order they ran.
    pub scenarios: Vec<ScenarioReport>,
}

impl Report {
    /// Every broken promise, prefixed with its scenario.
    pub fn violations(&self) -> Vec<String> {
        self.scenarios
            .iter()
            .flat_map(|s| {
                s.violations
                    .iter()
                    .map(move |v| format!("[{}] {v}", s.scenario))
            })
            .collect()
    }

    /// Panics, listing them, unless no scenario broke a promise: every
    /// effect settled, each with one idempotency key of its own, none run
    /// after it was recorded done, attempts increasing, per-stream order
    /// kept, the checkpoint never past an unsettled event.
    #[track_caller]
    pub fn assert_each_effect_keyed_once(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "reactor `{}` broke {} promise(s):\n  {}\n{self}",
            self.reactor,
            violations.len(),
            violations.join("\n  ")
        );
    }

    /// Panics unless every event's effect ended `Done` in every scenario
    /// (nothing parked, blocked or skipped).
    #[track_caller]
    pub fn assert_all_done(&self) {
        let not_done: Vec<String> = self
            .scenarios
            .iter()
            .flat_map(|s| {
                s.events
                    .iter()
                    .filter_map(move |e| match s.state_of(e.index) {
                        Some(EffectState::Done) => None,
                        state => Some(format!(
                            "[{}] event #{} ({}): {:?}, last error {:?}",
                            s.scenario,
                            e.index,
                            e.stream,
                            state,
                            s.effects[e.index]
                                .as_ref()
                                .and_then(|e| e.last_error.clone())
                        )),
                    })
            })
            .collect();
        assert!(
            not_done.is_empty(),
            "effects not done:\n  {}",
            not_done.join("\n  ")
        );
    }

    /// Calls over all scenarios.
    pub fn calls(&self) -> usize {
        self.scenarios.iter().map(|s| s.calls.len()).sum()
    }

    /// Calls that re-sent a key already sent, over all scenarios: what the
    /// receiver had to drop.
    pub fn repeated_calls(&self) -> usize {
        self.scenarios
            .iter()
            .map(ScenarioReport::repeated_calls)
            .sum()
    }

    /// Distinct idempotency keys the reactor was called with (event ids are
    /// fresh per scenario, so keys never repeat across scenarios).
    pub fn distinct_keys(&self) -> usize {
        self.scenarios
            .iter()
            .flat_map(|s| s.calls.iter().map(|c| c.idempotency_key.as_str()))
            .collect::<HashSet<_>>()
            .len()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "reactor `{}`: {} scenarios",
            self.reactor,
            self.scenarios.len()
        )?;
        for s in &self.scenarios {
            let mut states: HashMap<String, usize> = HashMap::new();
            for e in &s.effects {
                let state = e.as_ref().map_or("unseen", |e| e.state.as_str());
                *states.entry(state.to_owned()).or_default() += 1;
            }
            let mut states: Vec<_> = states.into_iter().collect();
            states.sort();
            let states: Vec<String> = states.iter().map(|(k, n)| format!("{n} {k}")).collect();
            writeln!(
                f,
                "  {:<55} fired {}, {} restarts, {} calls ({} repeated keys), {}{}",
                s.scenario.to_string(),
                s.fired.len(),
                s.restarts,
                s.calls.len(),
                s.repeated_calls(),
                states.join(", "),
                if s.violations.is_empty() {
                    String::new()
                } else {
                    format!(", {} VIOLATIONS", s.violations.len())
                }
            )?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Trace {
    index: HashMap<Uuid, usize>,
    calls: Vec<Call>,
    next_seq: usize,
    phase: Phase,
}

/// The reactor under test, recording its calls.
struct Recorder<R> {
    inner: Arc<R>,
    trace: Arc<Mutex<Trace>>,
    faults: Faults,
}

impl<R> Recorder<R> {
    fn trace(&self) -> MutexGuard<'_, Trace> {
        self.trace.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl<R: Reactor> Reactor for Recorder<R> {
    type Event = R::Event;

    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn react(
        &self,
        event: &Recorded<R::Event>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let after_done = self.faults.recorded_done(ctx.event_id);
        let (seq, index, phase) = {
            let mut trace = self.trace();
            let seq = trace.next_seq;
            trace.next_seq += 1;
            let index = *trace.index.get(&ctx.event_id).unwrap_or_else(|| {
                panic!("event {} was not appended by the test kit", ctx.event_id)
            });
            (seq, index, trace.phase)
        };
        let result = self.inner.react(event, ctx).await;
        self.trace().calls.push(Call {
            seq,
            event: index,
            event_id: ctx.event_id,
            attempt: ctx.attempt,
            idempotency_key: ctx.idempotency_key.clone(),
            phase,
            after_done,
            result: result.clone(),
        });
        result
    }
}

/// Runs a reactor through every [`Scenario`]; see the [module docs](self).
pub struct ReactorTest<R: Reactor> {
    reactor: Arc<R>,
    events: Vec<(String, R::Event)>,
    options: ReactorOptions,
    max_restarts: u32,
    crashes_per_step: usize,
}

impl<R: Reactor> ReactorTest<R> {
    /// A test of `reactor` with no events yet, pages of 2 events (so the
    /// checkpoint moves often and crashes land between pages too), retries
    /// after 1 to 10 ms, and a crash at every write.
    pub fn new(reactor: R) -> Self {
        ReactorTest {
            reactor: Arc::new(reactor),
            events: Vec::new(),
            options: ReactorOptions::default()
                .batch_size(2)
                .retry_delay(Duration::from_millis(1), Duration::from_millis(10)),
            max_restarts: 20,
            crashes_per_step: usize::MAX,
        }
    }

    /// Appends `event` to `stream` (in this order, in every scenario).
    pub fn event(mut self, stream: impl Into<String>, event: R::Event) -> Self {
        self.events.push((stream.into(), event));
        self
    }

    /// Appends several events.
    pub fn events<S: Into<String>>(
        mut self,
        events: impl IntoIterator<Item = (S, R::Event)>,
    ) -> Self {
        self.events
            .extend(events.into_iter().map(|(s, e)| (s.into(), e)));
        self
    }

    /// The runner's options (concurrency, attempts, park policy, page size).
    pub fn options(mut self, options: ReactorOptions) -> Self {
        self.options = options;
        self
    }

    /// Failed runs tolerated per scenario beyond the injected ones (default
    /// 20) before it counts as a violation.
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }

    /// Crash scenarios per step at most (spread evenly over the writes);
    /// default: one per write.
    pub fn crashes_per_step(mut self, n: usize) -> Self {
        self.crashes_per_step = n.max(1);
        self
    }

    /// The reactor under test.
    pub fn reactor(&self) -> &R {
        &self.reactor
    }

    /// Runs every scenario on in-memory stores.
    pub async fn run(&self) -> Result<Report, StoreError> {
        self.run_on(|| async {
            Ok((
                MemoryStore::new(),
                MemoryJournal::new(),
                MemoryCheckpoints::new(),
            ))
        })
        .await
    }

    /// Runs every scenario, each on fresh, empty stores from `open` (for
    /// SQLite the three can be clones of one store).
    pub async fn run_on<S, J, C, F, Fut>(&self, mut open: F) -> Result<Report, StoreError>
    where
        S: EventStore + Clone,
        J: EffectJournal + Clone,
        C: CheckpointStore + Clone,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(S, J, C), StoreError>>,
    {
        let first = self
            .scenario_on(Scenario::Redelivery, open().await?)
            .await?;
        let writes = first.writes;
        let mut scenarios = vec![
            first,
            self.scenario_on(Scenario::JournalLost, open().await?)
                .await?,
        ];
        for step in Step::ALL {
            for nth in spread(writes[step.index()], self.crashes_per_step) {
                scenarios.push(
                    self.scenario_on(Scenario::Crash { step, nth }, open().await?)
                        .await?,
                );
            }
        }
        Ok(Report {
            reactor: self.reactor.name().to_owned(),
            scenarios,
        })
    }

    /// Runs one scenario on in-memory stores.
    pub async fn scenario(&self, scenario: Scenario) -> Result<ScenarioReport, StoreError> {
        self.scenario_on(
            scenario,
            (
                MemoryStore::new(),
                MemoryJournal::new(),
                MemoryCheckpoints::new(),
            ),
        )
        .await
    }

    /// Runs one scenario on the given fresh, empty stores.
    pub async fn scenario_on<S, J, C>(
        &self,
        scenario: Scenario,
        (store, journal, checkpoints): (S, J, C),
    ) -> Result<ScenarioReport, StoreError>
    where
        S: EventStore + Clone,
        J: EffectJournal + Clone,
        C: CheckpointStore + Clone,
    {
        let name = self.reactor.name().to_owned();
        assert_eq!(
            store.head().await?,
            Position::ORIGIN,
            "the test kit needs an empty event store for each scenario"
        );
        let mut events = Vec::with_capacity(self.events.len());
        for (index, (stream, event)) in self.events.iter().enumerate() {
            let data = EventData::fresh(event)
                .map_err(|e| StoreError::database("encoding a test event", e))?;
            let id = data.id;
            let appended = store
                .append(stream, ExpectedVersion::Any, vec![data])
                .await?;
            events.push(EventRef {
                index,
                id,
                stream: stream.clone(),
                position: appended.last_position.unwrap_or(Position::ORIGIN),
                idempotency_key: idempotency_key(&name, id),
            });
        }
        let faults = Faults::new();
        if let Scenario::Crash { step, nth } = scenario {
            faults.add(step, nth);
        }
        let trace = Arc::new(Mutex::new(Trace {
            index: events.iter().map(|e| (e.id, e.index)).collect(),
            ..Trace::default()
        }));
        let mut run = Run {
            name: &name,
            events: &events,
            journal: &journal,
            checkpoints: &checkpoints,
            restarts: 0,
            errors: Vec::new(),
            violations: Vec::new(),
        };
        let runner = || {
            ReactorRunner::new(
                Recorder {
                    inner: self.reactor.clone(),
                    trace: trace.clone(),
                    faults: faults.clone(),
                },
                store.clone(),
                FaultyJournal::new(journal.clone(), faults.clone()),
                FaultyCheckpoints::new(checkpoints.clone(), faults.clone()),
            )
            .options(self.options.clone())
        };

        // First delivery, crashing as planned.
        let planned = u32::from(matches!(scenario, Scenario::Crash { .. }));
        let finished = run.drive(&runner, self.max_restarts + planned).await?;
        let writes = Step::ALL.map(|s| faults.seen(s));
        faults.disarm();

        // Second delivery.
        if finished {
            if scenario == Scenario::JournalLost {
                journal
                    .cleanup(
                        &name,
                        Utc::now() + chrono::Duration::days(1),
                        Position(u64::MAX),
                    )
                    .await?;
                faults.forget_done();
            }
            checkpoints
                .save(&name, None, Position::ORIGIN, None)
                .await?;
            trace.lock().unwrap_or_else(|e| e.into_inner()).phase = Phase::Redelivery;
            run.drive(&runner, self.max_restarts).await?;
        }

        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let mut found = journal.load(&name, &ids).await?;
        let effects: Vec<Option<Effect>> = ids.iter().map(|id| found.remove(id)).collect();
        let calls = std::mem::take(&mut trace.lock().unwrap_or_else(|e| e.into_inner()).calls);
        let fired = faults.fired();
        let Run {
            restarts,
            errors,
            mut violations,
            ..
        } = run;
        violations.extend(check(&events, &calls, &effects, &fired));
        Ok(ScenarioReport {
            scenario,
            events,
            calls,
            restarts,
            errors,
            fired,
            writes,
            effects,
            violations,
        })
    }
}

/// Up to `limit` numbers from 1 to `n`, spread evenly, first and last included.
fn spread(n: usize, limit: usize) -> Vec<usize> {
    if n <= limit {
        return (1..=n).collect();
    }
    let mut picked: Vec<usize> = (0..limit)
        .map(|i| {
            1 + if limit == 1 {
                0
            } else {
                i * (n - 1) / (limit - 1)
            }
        })
        .collect();
    picked.dedup();
    picked
}

/// One scenario's runs and restarts.
struct Run<'a, J, C> {
    name: &'a str,
    events: &'a [EventRef],
    journal: &'a J,
    checkpoints: &'a C,
    restarts: u32,
    errors: Vec<String>,
    violations: Vec<String>,
}

impl<J: EffectJournal, C: CheckpointStore> Run<'_, J, C> {
    /// Runs until a run catches up, restarting after each failure; checks
    /// the checkpoint after each stop. False if it gave up.
    async fn drive<R, S, FJ, FC>(
        &mut self,
        runner: &impl Fn() -> ReactorRunner<R, S, FJ, FC>,
        max_restarts: u32,
    ) -> Result<bool, StoreError>
    where
        R: Reactor,
        S: EventStore + Clone,
        FJ: EffectJournal,
        FC: CheckpointStore,
    {
        let mut failures = 0;
        loop {
            let result = runner().catch_up().await;
            self.check_checkpoint().await?;
            match result {
                Ok(_) => return Ok(true),
                Err(e) => {
                    self.restarts += 1;
                    failures += 1;
                    self.errors.push(e.to_string());
                    if failures > max_restarts {
                        self.violations.push(format!(
                            "gave up after {failures} failed runs; the last: {e}"
                        ));
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// The checkpoint may only pass journaled events: settled ones, or
    /// ones the runner runs again from the journal (`Started` by a re-run
    /// of a failed, released or interrupted effect that has not finished).
    async fn check_checkpoint(&mut self) -> Result<(), StoreError> {
        let Some(checkpoint) = self.checkpoints.load_checkpoint(self.name).await? else {
            return Ok(());
        };
        let passed: Vec<&EventRef> = self
            .events
            .iter()
            .filter(|e| e.position <= checkpoint)
            .collect();
        let ids: Vec<Uuid> = passed.iter().map(|e| e.id).collect();
        let entries = self.journal.load(self.name, &ids).await?;
        for e in passed {
            let state = entries.get(&e.id).map(|entry| entry.state);
            if !state.is_some_and(|s| s.is_settled() || s == EffectState::Started) {
                let violation = format!(
                    "the checkpoint ({checkpoint}) passed event #{} ({} at {}) while its effect was {}",
                    e.index,
                    e.stream,
                    e.position,
                    state.map_or("not journaled", EffectState::as_str)
                );
                if !self.violations.contains(&violation) {
                    self.violations.push(violation);
                }
            }
        }
        Ok(())
    }
}

/// The promises a scenario's calls and final journal must keep.
fn check(
    events: &[EventRef],
    calls: &[Call],
    effects: &[Option<Effect>],
    fired: &[Fired],
) -> Vec<String> {
    let mut violations = Vec::new();
    let mut by_event: Vec<Vec<&Call>> = vec![Vec::new(); events.len()];
    for call in calls {
        by_event[call.event].push(call);
    }
    for list in &mut by_event {
        list.sort_by_key(|c| c.seq);
    }
    let mut owners: HashMap<&str, usize> = HashMap::new();
    for (e, list) in events.iter().zip(&by_event) {
        let what = format!("event #{} ({} at {})", e.index, e.stream, e.position);
        // One key per effect, of its own.
        let keys: BTreeSet<&str> = list.iter().map(|c| c.idempotency_key.as_str()).collect();
        if keys.len() > 1 {
            violations.push(format!(
                "{what} was called with {} different keys: {keys:?}",
                keys.len()
            ));
        }
        for key in keys {
            if key != e.idempotency_key {
                violations.push(format!(
                    "{what} was called with key {key}, expected {}",
                    e.idempotency_key
                ));
            }
            if let Some(other) = owners.insert(key, e.index)
                && other != e.index
            {
                violations.push(format!(
                    "events #{other} and #{} share the key {key}",
                    e.index
                ));
            }
        }
        // Never again once done.
        for c in list.iter().filter(|c| c.after_done) {
            violations.push(format!(
                "{what} ran again ({:?} delivery, attempt {}) after its effect was recorded done",
                c.phase, c.attempt
            ));
        }
        // Attempts go up within a delivery.
        for phase in [Phase::Run, Phase::Redelivery] {
            let attempts: Vec<u32> = list
                .iter()
                .filter(|c| c.phase == phase)
                .map(|c| c.attempt)
                .collect();
            if attempts.windows(2).any(|w| w[1] <= w[0]) {
                violations.push(format!(
                    "{what}: attempts {attempts:?} in the {phase:?} delivery do not increase"
                ));
            }
        }
        // Settled, and done only after a successful call.
        match effects[e.index].as_ref().map(|entry| entry.state) {
            None => violations.push(format!("{what} was never handled")),
            Some(state) if !state.is_settled() => {
                violations.push(format!("{what} was left {}", state.as_str()))
            }
            Some(EffectState::Done) if !list.iter().any(|c| c.result.is_ok()) => {
                violations.push(format!("{what} is recorded done but no call succeeded"))
            }
            Some(_) => {}
        }
    }
    // Started but not done is retried with the same key.
    for f in fired.iter().filter(|f| f.step == Step::AfterCall) {
        if let Some(e) = f.event_id.and_then(|id| events.iter().find(|e| e.id == id)) {
            let run_calls = by_event[e.index]
                .iter()
                .filter(|c| c.phase == Phase::Run)
                .count();
            if run_calls < 2 {
                violations.push(format!(
                    "event #{}: its Done write failed but the effect was not run again",
                    e.index
                ));
            }
        }
    }
    // Per-stream order: first successful calls follow the stream's order.
    for phase in [Phase::Run, Phase::Redelivery] {
        let mut last: HashMap<&str, (usize, usize)> = HashMap::new();
        for e in events {
            let first_ok = by_event[e.index]
                .iter()
                .find(|c| c.phase == phase && c.result.is_ok())
                .map(|c| c.seq);
            let Some(seq) = first_ok else { continue };
            if let Some((before, before_seq)) = last.insert(e.stream.as_str(), (e.index, seq))
                && before_seq > seq
            {
                violations.push(format!(
                    "stream {}: event #{} took effect before event #{before} ({phase:?} delivery)",
                    e.stream, e.index
                ));
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(index: usize, stream: &str) -> EventRef {
        let id = Uuid::now_v7();
        EventRef {
            index,
            id,
            stream: stream.to_owned(),
            position: Position(index as u64 + 1),
            idempotency_key: idempotency_key("r", id),
        }
    }

    fn call(seq: usize, e: &EventRef, attempt: u32) -> Call {
        Call {
            seq,
            event: e.index,
            event_id: e.id,
            attempt,
            idempotency_key: e.idempotency_key.clone(),
            phase: Phase::Run,
            after_done: false,
            result: Ok(()),
        }
    }

    fn done(e: &EventRef, state: EffectState) -> Option<Effect> {
        Some(Effect {
            reactor: "r".into(),
            event_id: e.id,
            position: e.position,
            stream: e.stream.clone(),
            event_type: "T".into(),
            state,
            attempts: 1,
            last_error: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        })
    }

    #[test]
    fn check_accepts_a_clean_run_and_flags_each_broken_promise() {
        let events = [event(0, "a"), event(1, "a"), event(2, "b")];
        let clean = [
            call(0, &events[0], 1),
            call(1, &events[2], 1),
            call(2, &events[1], 1),
        ];
        let effects: Vec<_> = events.iter().map(|e| done(e, EffectState::Done)).collect();
        assert_eq!(check(&events, &clean, &effects, &[]), Vec::<String>::new());

        let expect = |calls: &[Call], effects: &[Option<Effect>], fired: &[Fired], what: &str| {
            let violations = check(&events, calls, effects, fired);
            assert!(
                violations.iter().any(|v| v.contains(what)),
                "expected `{what}` in {violations:?}"
            );
        };
        let mut other_key = clean.clone();
        other_key[0].idempotency_key = "another".into();
        expect(
            &[
                other_key[0].clone(),
                clean[0].clone(),
                clean[1].clone(),
                clean[2].clone(),
            ],
            &effects,
            &[],
            "different keys",
        );
        let mut again = clean.to_vec();
        again.push(Call {
            seq: 3,
            after_done: true,
            attempt: 2,
            ..clean[0].clone()
        });
        expect(&again, &effects, &[], "after its effect was recorded done");
        let mut down = clean.to_vec();
        down.push(Call {
            seq: 3,
            attempt: 1,
            ..clean[0].clone()
        });
        expect(&down, &effects, &[], "do not increase");
        let reordered = [
            call(0, &events[1], 1),
            call(1, &events[0], 1),
            call(2, &events[2], 1),
        ];
        expect(&reordered, &effects, &[], "took effect before");
        let mut unsettled = effects.clone();
        unsettled[1] = done(&events[1], EffectState::Started);
        expect(&clean, &unsettled, &[], "was left started");
        let mut missing = effects.clone();
        missing[2] = None;
        expect(&clean[..2], &missing, &[], "never handled");
        let failed = [
            Call {
                result: Err(ReactError::Fatal("no".into())),
                ..clean[0].clone()
            },
            clean[1].clone(),
            clean[2].clone(),
        ];
        expect(&failed, &effects, &[], "no call succeeded");
        let fired = [Fired {
            step: Step::AfterCall,
            nth: 1,
            event_id: Some(events[0].id),
        }];
        expect(&clean, &effects, &fired, "not run again");
    }

    #[test]
    fn spread_picks_evenly() {
        assert_eq!(spread(0, 10), Vec::<usize>::new());
        assert_eq!(spread(3, 10), vec![1, 2, 3]);
        assert_eq!(spread(10, 3), vec![1, 5, 10]);
        assert_eq!(spread(10, 1), vec![1]);
    }
}
