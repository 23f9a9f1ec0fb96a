//! Testing process managers.
//!
//! - [`ProcessTest`]: given inputs, when an input, then outputs. Pure: no
//!   store, no runtime; time is a virtual clock that [`ProcessTest::advance`]
//!   moves, firing the deadlines that come due. Every decision also goes
//!   through its stored form (encode, decode, fold), as on a reload.
//! - [`Harness`]: aggregates, processes, reactors and projections together
//!   on one (usually in-memory) store, run until nothing moves.
//!
//! ```
//! use aftermath::prelude::*;
//! use aftermath::process::testkit::ProcessTest;
//! use aftermath::process::{Input, Outputs, ProcessManager, Route};
//! use chrono::Duration;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
//! #[event(prefix = "ev")]
//! enum Ev { Placed { order: String }, Shipped { order: String } }
//!
//! #[derive(Default)]
//! struct Shipping;
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! enum ShippingCommand { Ship { order: String } }
//! # #[derive(Debug, thiserror::Error)] #[error("no")] struct No;
//! impl Aggregate for Shipping {
//!     const CATEGORY: &'static str = "shipping";
//!     type Command = ShippingCommand;
//!     # type Event = Ev; type Error = No;
//!     # fn decide(&self, _: ShippingCommand) -> Result<Vec<Ev>, No> { Ok(vec![]) }
//!     # fn apply(&mut self, _: &Ev) {}
//! }
//!
//! struct Fulfil;
//! impl ProcessManager for Fulfil {
//!     const NAME: &'static str = "fulfil";
//!     type Input = Ev;
//!     type State = ();
//!     fn route(&self, e: &Recorded<Ev>) -> Route {
//!         match &e.event {
//!             Ev::Placed { order } => Route::Start(order.clone()),
//!             Ev::Shipped { order } => Route::Stop(order.clone()),
//!         }
//!     }
//!     fn apply(&self, _: &mut (), _: &Input<Ev>) {}
//!     fn handle(&self, _: &(), input: &Input<Ev>, out: &mut Outputs) {
//!         match input {
//!             Input::Event(e) => if let Ev::Placed { order } = &e.event {
//!                 out.send::<Shipping>(order.clone(), ShippingCommand::Ship { order: order.clone() });
//!                 out.set_deadline_after("shipped", Duration::hours(48));
//!             },
//!             Input::Deadline(_) => out.complete(),
//!             Input::Rejected(_) => {}
//!         }
//!     }
//! }
//!
//! let mut test = ProcessTest::new(Fulfil);
//! test.when(Ev::Placed { order: "o-1".into() })
//!     .assert_sent::<Shipping>("o-1", ShippingCommand::Ship { order: "o-1".into() })
//!     .assert_deadline_set("shipped");
//! assert!(test.advance(Duration::hours(47)).is_empty());
//! assert!(test.advance(Duration::hours(1)).completed());
//! ```

use std::fmt::Debug;

use async_trait::async_trait;
use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::input::{CommandSpec, DeadlineReached, Input, Rejection};
use super::instance::{Decision, Instance};
use super::record::{InputRecord, ProcessRecord, rejection_id};
use super::{ProcessManager, ProcessRunner};
use crate::aggregate::Aggregate;
use crate::event::{Event, Metadata, Position, Recorded, StoredEvent};
use crate::store::EventStore;
use crate::worker::SubscriberError;

/// What handling one input (or advancing the clock) decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// The records appended, in order (without `Received`).
    pub records: Vec<ProcessRecord>,
    /// Inputs that were not handled, with why.
    pub ignored: Vec<String>,
}

impl Outcome {
    /// Whether nothing was decided.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Every command sent (compensations included), in order.
    pub fn commands(&self) -> Vec<&CommandSpec> {
        self.records
            .iter()
            .filter_map(|r| match r {
                ProcessRecord::CommandSent { command, .. } => Some(command),
                _ => None,
            })
            .collect()
    }

    /// The compensations sent, in the order sent (newest step first).
    pub fn compensations(&self) -> Vec<&CommandSpec> {
        self.records
            .iter()
            .filter_map(|r| match r {
                ProcessRecord::CommandSent {
                    command,
                    compensation: true,
                } => Some(command),
                _ => None,
            })
            .collect()
    }

    /// The commands sent to aggregate type `A`, typed, with their ids.
    pub fn sent<A: Aggregate>(&self) -> Vec<(String, A::Command)>
    where
        A::Command: DeserializeOwned,
    {
        self.commands()
            .into_iter()
            .filter_map(|c| Some((c.id.clone(), c.command::<A>()?)))
            .collect()
    }

    /// Asserts that `command` was sent to `A` with id `id`.
    ///
    /// # Panics
    ///
    /// When it was not, listing what was sent.
    #[track_caller]
    pub fn assert_sent<A: Aggregate>(&self, id: &str, command: A::Command) -> &Self
    where
        A::Command: Serialize,
    {
        let expected = serde_json::to_value(&command).expect("the command serializes");
        let found = self
            .commands()
            .iter()
            .any(|c| c.is::<A>() && c.id == id && c.command == expected);
        assert!(
            found,
            "expected {}-{id} to be sent {expected}; sent: {:?}",
            A::CATEGORY,
            self.commands()
        );
        self
    }

    /// Asserts that no command was sent.
    #[track_caller]
    pub fn assert_nothing_sent(&self) -> &Self {
        assert!(
            self.commands().is_empty(),
            "expected no command; sent: {:?}",
            self.commands()
        );
        self
    }

    /// Deadlines set: (name, due).
    pub fn deadlines_set(&self) -> Vec<(&str, DateTime<Utc>)> {
        self.records
            .iter()
            .filter_map(|r| match r {
                ProcessRecord::DeadlineSet { name, due_at, .. } => Some((name.as_str(), *due_at)),
                _ => None,
            })
            .collect()
    }

    /// Asserts that deadline `name` was set.
    #[track_caller]
    pub fn assert_deadline_set(&self, name: &str) -> &Self {
        assert!(
            self.deadlines_set().iter().any(|(n, _)| *n == name),
            "expected deadline `{name}` to be set; set: {:?}",
            self.deadlines_set()
        );
        self
    }

    /// Names of deadlines cancelled (replaced ones included).
    pub fn deadlines_cancelled(&self) -> Vec<&str> {
        self.records
            .iter()
            .filter_map(|r| match r {
                ProcessRecord::DeadlineCancelled { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether the instance completed.
    pub fn completed(&self) -> bool {
        self.records
            .iter()
            .any(|r| matches!(r, ProcessRecord::Completed {}))
    }
}

/// Given / when / then for one process instance. See the module docs.
pub struct ProcessTest<P: ProcessManager> {
    process: P,
    instance: Option<Instance<P>>,
    now: DateTime<Utc>,
    inputs: u64,
    sent: Vec<(Uuid, CommandSpec, bool)>,
}

impl<P: ProcessManager> ProcessTest<P> {
    /// A test whose clock starts at 2026-01-01T00:00:00Z.
    pub fn new(process: P) -> Self {
        ProcessTest {
            process,
            instance: None,
            now: Utc
                .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
                .single()
                .unwrap_or_default(),
            inputs: 0,
            sent: Vec::new(),
        }
    }

    /// Sets the clock.
    pub fn starting_at(mut self, now: DateTime<Utc>) -> Self {
        self.now = now;
        self
    }

    /// The virtual clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// The instance (panics before one was started).
    #[track_caller]
    pub fn instance(&self) -> &Instance<P> {
        self.instance.as_ref().expect("no instance was started yet")
    }

    /// The instance's state (panics before one was started).
    #[track_caller]
    pub fn state(&self) -> &P::State {
        &self.instance().state
    }

    /// Handles past events, keeping their outputs out of the next outcome.
    #[track_caller]
    pub fn given<E: Into<P::Input>>(&mut self, events: impl IntoIterator<Item = E>) -> &mut Self {
        for e in events {
            self.when(e);
        }
        self
    }

    /// Handles `event` as recorded now, after routing it. An event the
    /// route ignores, one for a completed instance, and a strict route that
    /// does not fit (which would stop a runner) decide nothing and say why
    /// in [`Outcome::ignored`].
    ///
    /// # Panics
    ///
    /// When it routes to another instance than the one under test.
    #[track_caller]
    pub fn when(&mut self, event: impl Into<P::Input>) -> Outcome {
        self.inputs += 1;
        let event = event.into();
        let id = Uuid::from_u128(self.inputs as u128);
        let payload = event.encode().expect("the input encodes");
        let stored = StoredEvent {
            id,
            stream: "test-input".into(),
            version: self.inputs,
            position: Position(self.inputs),
            recorded_at: self.now,
            event_type: event.event_type().to_owned(),
            payload,
            metadata: Metadata::caused_by(id),
        };
        let recorded = Recorded {
            event,
            id,
            stream: stored.stream.clone(),
            version: stored.version,
            position: stored.position,
            recorded_at: self.now,
            metadata: stored.metadata.clone(),
        };
        let route = self.process.route(&recorded);
        let Some(target) = route.instance() else {
            return Outcome {
                ignored: vec![format!(
                    "`{}` is not routed to any instance",
                    recorded.event.event_type()
                )],
                ..Default::default()
            };
        };
        let inst = self.instance.get_or_insert_with(|| Instance::new(target));
        assert_eq!(
            inst.id, target,
            "the input routes to instance `{target}`, but this test follows `{}`",
            inst.id
        );
        if inst.completed {
            return Outcome {
                ignored: vec!["the instance has completed".into()],
                ..Default::default()
            };
        }
        let exists = inst.exists();
        let misrouted = match &route {
            super::Route::StartStrict(_) if exists => Some("the instance already exists"),
            super::Route::ContinueStrict(_) | super::Route::StopStrict(_) if !exists => {
                Some("the instance does not exist")
            }
            super::Route::Continue(_) | super::Route::Stop(_) if !exists => {
                Some("the instance does not exist (ignored)")
            }
            _ => None,
        };
        if let Some(why) = misrouted {
            return Outcome {
                ignored: vec![format!("routed with {route:?}, but {why}")],
                ..Default::default()
            };
        }
        let record = InputRecord::of_event(&stored, self.now).expect("the input is JSON");
        self.handle(Input::Event(recorded), record, route.stops(), id)
    }

    /// The latest command sent to `A` with id `id` comes back refused with
    /// `error`.
    ///
    /// # Panics
    ///
    /// When no such command was sent.
    #[track_caller]
    pub fn when_rejected<A: Aggregate>(&mut self, id: &str, error: &str) -> Outcome {
        let (command_id, command, compensation) = self
            .sent
            .iter()
            .rev()
            .find(|(_, c, _)| c.is::<A>() && c.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("no command was sent to {}-{id}", A::CATEGORY));
        let rejection = Rejection {
            command_id,
            command,
            compensation,
            error: error.to_owned(),
        };
        let record = InputRecord::Rejected {
            id: rejection_id(command_id),
            at: self.now,
            rejection: rejection.clone(),
        };
        let correlation = self.instance().correlation_id;
        self.handle(Input::Rejected(rejection), record, false, correlation)
    }

    /// Moves the clock by `by`, delivering each deadline that comes due, in
    /// due order, at its due time. Returns what they decided together.
    pub fn advance(&mut self, by: Duration) -> Outcome {
        let until = self.now + by;
        let mut total = Outcome::default();
        while let Some(inst) = &self.instance {
            let next = inst
                .deadlines()
                .iter()
                .filter(|(_, (_, due))| *due <= until)
                .min_by_key(|(_, (id, due))| (*due, *id))
                .map(|(name, (id, due))| DeadlineReached {
                    id: *id,
                    name: name.clone(),
                    due_at: *due,
                });
            let Some(reached) = next else { break };
            self.now = self.now.max(reached.due_at);
            let record = InputRecord::Deadline {
                at: reached.due_at,
                deadline: reached.clone(),
            };
            let correlation = inst.correlation_id;
            let outcome = self.handle(Input::Deadline(reached), record, false, correlation);
            total.records.extend(outcome.records);
            total.ignored.extend(outcome.ignored);
        }
        self.now = until;
        total
    }

    #[track_caller]
    fn handle(
        &mut self,
        input: Input<P::Input>,
        record: InputRecord,
        stop: bool,
        correlation: Uuid,
    ) -> Outcome {
        let inst = self.instance.as_mut().expect("an instance");
        let decision = inst
            .decide(&self.process, &input, record, stop)
            .unwrap_or_else(|e| panic!("handle failed: {e}"));
        let records = match decision {
            Decision::Duplicate => {
                return Outcome {
                    ignored: vec!["already handled".into()],
                    ..Default::default()
                };
            }
            Decision::Ignored(why) => {
                return Outcome {
                    ignored: vec![why.into()],
                    ..Default::default()
                };
            }
            Decision::Append { records, .. } => records,
        };
        // Through the stored form, as a reload would see it.
        let data = inst
            .event_data(correlation, &records)
            .expect("the records encode");
        let mut version = inst.version;
        for d in &data {
            version += 1;
            let stored = StoredEvent {
                id: d.id,
                stream: inst.stream(),
                version,
                position: Position(version),
                recorded_at: self.now,
                event_type: d.event_type.clone(),
                payload: d.payload.clone(),
                metadata: d.metadata.clone(),
            };
            let record = stored
                .decode_known::<ProcessRecord>()
                .expect("a record decodes")
                .event;
            inst.fold_stored(&self.process, &record, &stored.metadata, version, &|_| {
                Ok(())
            })
            .unwrap_or_else(|e| panic!("a handled input does not fold back: {e}"));
            if let ProcessRecord::CommandSent {
                command,
                compensation,
            } = record
            {
                self.sent.push((d.id, command, compensation));
            }
        }
        Outcome {
            records: records.into_iter().skip(1).collect(),
            ignored: Vec::new(),
        }
    }
}

/// Something the [`Harness`] can run to the head of the log.
#[async_trait]
pub trait Settle: Send + Sync {
    /// Runs until caught up with the head as of now.
    async fn settle_once(&self) -> Result<Position, SubscriberError>;
}

#[async_trait]
impl<P, S, D, C> Settle for ProcessRunner<P, S, D, C>
where
    P: ProcessManager,
    S: EventStore + Clone,
    D: super::DeadlineStore,
    C: crate::subscription::CheckpointStore,
{
    async fn settle_once(&self) -> Result<Position, SubscriberError> {
        self.catch_up().await
    }
}

#[async_trait]
impl<R, S, J, C> Settle for crate::reactor::ReactorRunner<R, S, J, C>
where
    R: crate::reactor::Reactor,
    S: EventStore + Clone,
    J: crate::reactor::EffectJournal,
    C: crate::subscription::CheckpointStore,
{
    async fn settle_once(&self) -> Result<Position, SubscriberError> {
        self.catch_up().await
    }
}

#[async_trait]
impl<P, S> Settle for crate::projection::ProjectionRunner<P, S>
where
    P: crate::projection::Projection,
    S: EventStore + Clone,
{
    async fn settle_once(&self) -> Result<Position, SubscriberError> {
        self.catch_up().await
    }
}

/// Runs aggregates' subscribers together on one store until nothing moves:
/// the end-to-end test bench for a business process.
///
/// ```ignore
/// let clock = ManualClock::at(t0);
/// let harness = Harness::new(store.clone())
///     .with(ProcessRunner::new(Fulfillment, store.clone(), bus, MemoryDeadlines::new(), MemoryCheckpoints::new()).clock(clock.clone()))
///     .with(ReactorRunner::new(Mailer, store.clone(), MemoryJournal::new(), MemoryCheckpoints::new()));
/// orders.execute("o-1", OrderCommand::Place { .. }).await?;
/// harness.settle().await?;           // saga, commands, reactors: all done
/// clock.advance(Duration::hours(49));
/// harness.settle().await?;           // the deadline fired and was handled
/// ```
pub struct Harness<S> {
    store: S,
    parts: Vec<Box<dyn Settle>>,
    max_rounds: u32,
}

impl<S: EventStore> Harness<S> {
    /// A harness over `store` with nothing to run yet.
    pub fn new(store: S) -> Self {
        Harness {
            store,
            parts: Vec::new(),
            max_rounds: 1_000,
        }
    }

    /// Adds a runner (process, reactor, projection).
    pub fn with(mut self, part: impl Settle + 'static) -> Self {
        self.parts.push(Box::new(part));
        self
    }

    /// Runs every part until a whole round appends nothing. Returns the
    /// number of rounds.
    ///
    /// # Errors
    ///
    /// The first runner error; or, after 1,000 rounds that each appended
    /// something, a store error saying the system does not settle (a
    /// process that keeps sending commands to itself, for example).
    pub async fn settle(&self) -> Result<u32, SubscriberError> {
        let error = |source| SubscriberError::Store {
            subscriber: "harness".into(),
            source,
        };
        for round in 1..=self.max_rounds {
            let before = self.store.head().await.map_err(error)?;
            for part in &self.parts {
                part.settle_once().await?;
            }
            if self.store.head().await.map_err(error)? == before {
                return Ok(round);
            }
        }
        Err(error(crate::store::StoreError::database(
            "settling the harness",
            std::io::Error::other(format!("still appending after {} rounds", self.max_rounds)),
        )))
    }
}

impl<P: ProcessManager> Debug for ProcessTest<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTest")
            .field("process", &P::NAME)
            .field("now", &self.now)
            .finish()
    }
}
