//! Process managers (sagas): business processes that span several
//! aggregates and end consistent without distributed transactions.
//!
//! A [`ProcessManager`] receives inputs (events of any aggregates, decoded
//! into one enum, usually with `#[derive(EventUnion)]`), routes each to an
//! instance, folds them into the instance's state and decides, purely, what
//! to do next: commands to aggregates, deadlines, compensation, completion.
//!
//! How it stays correct under crashes and redelivery:
//!
//! - **Each instance is event-sourced** in its own stream
//!   (`<process>.process-<instance>`). Handling an input appends, in one append
//!   with optimistic concurrency, the input (`Received`) and every output
//!   decided. The stream is the instance's inbox (a redelivered input is
//!   recognised by its id and not handled again) and its outbox (outputs are
//!   dispatched only after they are recorded).
//! - **Dispatch** reads the recorded outputs back from the log, behind the
//!   runner's checkpoint: a crash before a command went out sends it again.
//!   Each command's id is derived from (process, instance, input id, index),
//!   so the target's idempotent append absorbs the repeat. A command the
//!   target refuses comes back as [`Input::Rejected`], recorded like any
//!   input, so the process can compensate. Store errors and timeouts
//!   ([`ProcessOptions::call_timeout`]) are retried. A command accepted
//!   without events leaves a marker in the target's stream, so a resend is
//!   recognised like one that had events (never decided again).
//! - **Failure isolation**: a panic in `apply`/`handle` or `dispatch`, an
//!   output error, or a permanent dispatch failure parks that instance
//!   ([`ProcessRecord::Parked`]): its later inputs are recorded `Held`,
//!   other instances go on. Operators list parked instances with
//!   [`ProcessRunner::parked`] and release them with
//!   [`ProcessRunner::retry`] or [`ProcessRunner::skip`].
//! - **Compensation**: as steps succeed, `handle` registers the command that
//!   undoes each ([`Outputs::register_compensation`]); on failure
//!   [`Outputs::compensate`] sends them newest first. All of it is visible
//!   in the instance's stream.
//! - **Deadlines** are durable: set and cancelled as outputs, kept in a
//!   [`DeadlineStore`] in the same database, delivered as
//!   [`Input::Deadline`] at least once (also after a restart). The stream
//!   decides: a cancelled or replaced deadline, or one of a completed
//!   instance, is dropped when it comes due. Tests move a [`ManualClock`].
//!   Deadlines never beat the log: a deadline due at `t` fires only after
//!   every input recorded before `t` is handled (the runner fires deadlines
//!   due by its clock as read *before* the page it just handled was read;
//!   a runner that is behind fires only deadlines due by the last event it
//!   handled), so a cancellation recorded before the deadline wins.
//!   Limit: "recorded" is the event's `recorded_at`, taken when its append
//!   starts. An append that started before `t` but is still committing when
//!   the runner reads its page (milliseconds; on PostgreSQL also one held
//!   back by an older append still in flight) is read after the deadline
//!   fired. A process whose outcome must not depend on that race cancels
//!   first and compensates once the cancellation is accepted (below).
//! - **Deadlines are real time, so they fire whenever anything lags.**
//!   [`Outputs::set_deadline_after`] counts from [`Outputs::now`], when the
//!   runner handled the input. The answer it waits for needs the whole round
//!   trip: this runner dispatching the command, a reactor calling the outside
//!   world, the answer coming back as an event, this runner reading it. A
//!   backlog anywhere on that path (a runner catching up after a deploy, a
//!   reactor backing off, a worker that was down longer than the deadline)
//!   makes the deadline fire although nothing failed: after a long outage
//!   every deadline that passed meanwhile fires as soon as the inputs
//!   recorded before it are handled. So size deadlines well above the lag
//!   you tolerate, and read a deadline as "no answer yet", never as "it
//!   failed".
//! - **Cancel first, then compensate.** When a deadline fires for a step
//!   that may still succeed (a carrier that may have picked the parcel up,
//!   a payment still in flight), do not undo the earlier steps at once: the
//!   late success would then land on an instance that already refunded and
//!   completed. Send the step's aggregate a cancellation instead. If it
//!   accepts (the cancelled event comes back), compensate and finish; if it
//!   refuses because the step succeeded meanwhile (an [`Input::Rejected`]),
//!   do nothing and wait for the success event, which follows. The step's
//!   aggregate decides the race, once, in its stream. The fulfillment
//!   example's shipping deadline does this; the guide's saga chapter shows
//!   the naive version failing.
//! - **Rejections carry the refused command.** [`Rejection::is`] tells which
//!   aggregate type refused, [`Rejection::command`]`::<A>()` decodes the
//!   command that was sent (so a process that sent several kinds of command
//!   to one aggregate can tell which was refused without keeping extra
//!   state), [`Rejection::compensation`] whether it was an undo command, and
//!   [`Rejection::error`] the aggregate's error as text (its `Display`).
//! - **One input at a time per instance**; different instances run in
//!   parallel (up to [`ProcessOptions::concurrency`]). A completed instance
//!   receives nothing more.
//! - **Traceability**: records and commands carry the instance's
//!   correlation id (that of the input that started it) and the id of the
//!   input that caused them; [`timeline`] lists everything of a correlation
//!   id, across streams, with reactor effects.
//!
//! ```
//! use aftermath::prelude::*;
//! use aftermath::process::{Input, Outputs, ProcessManager, Route};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
//! #[event(prefix = "order")]
//! enum OrderEvent { Placed { order: String, amount: u64 } }
//!
//! #[derive(Default)]
//! struct Payment;
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! enum PaymentCommand { Charge { order: String, amount: u64 } }
//! # #[derive(Debug, Clone, Serialize, Deserialize, Event)] #[event(prefix = "payment")] enum PaymentEvent { Charged {} }
//! # #[derive(Debug, thiserror::Error)] #[error("declined")] struct Declined;
//! impl Aggregate for Payment {
//!     const CATEGORY: &'static str = "payment";
//!     type Command = PaymentCommand;
//!     # type Event = PaymentEvent; type Error = Declined;
//!     # fn decide(&self, _: PaymentCommand) -> Result<Vec<PaymentEvent>, Declined> { Ok(vec![]) }
//!     # fn apply(&mut self, _: &PaymentEvent) {}
//!     // ...
//! }
//!
//! struct Checkout;
//!
//! impl ProcessManager for Checkout {
//!     const NAME: &'static str = "checkout";
//!     type Input = OrderEvent;
//!     type State = ();
//!
//!     fn route(&self, event: &Recorded<OrderEvent>) -> Route {
//!         match &event.event {
//!             OrderEvent::Placed { order, .. } => Route::Start(order.clone()),
//!         }
//!     }
//!
//!     fn apply(&self, _state: &mut (), _input: &Input<OrderEvent>) {}
//!
//!     fn handle(&self, _state: &(), input: &Input<OrderEvent>, out: &mut Outputs) {
//!         if let Some(OrderEvent::Placed { order, amount }) = input.event() {
//!             out.send::<Payment>(order.clone(), PaymentCommand::Charge { order: order.clone(), amount: *amount });
//!             out.set_deadline_after("payment", chrono::Duration::minutes(15));
//!         }
//!     }
//! }
//! ```

use std::time::Duration;

use crate::event::{Event, Recorded};
use crate::subscription::SubscriptionOptions;

mod bus;
pub mod clock;
pub mod deadline;
mod input;
mod instance;
mod outputs;
pub mod record;
mod runner;
pub mod testkit;
mod timeline;

pub use bus::{CommandBus, DispatchError, Dispatched};
pub use clock::{Clock, ManualClock, SystemClock};
pub use deadline::{Deadline, DeadlineStore, MemoryDeadlines};
pub use input::{CommandSpec, DeadlineReached, Input, Rejection, Route};
pub use instance::{Instance, Parking};
pub use outputs::Outputs;
pub use record::ProcessRecord;
pub use runner::ProcessRunner;
pub use timeline::{Timeline, TimelineEntry, describe_record, timeline};

// ANCHOR: trait
/// A business process coordinating aggregates. See the module docs.
///
/// `route`, `apply` and `handle` are pure: no I/O, no clock (use
/// [`Outputs::now`]), no randomness, so a replay decides the same.
pub trait ProcessManager: Send + Sync + 'static {
    /// Stable name: part of instance stream names, command ids, the
    /// checkpoint and lease key. Must not contain `.process-`.
    const NAME: &'static str;
    /// The events it receives; for events of several aggregates, an enum
    /// with `#[derive(EventUnion)]`. Type names must be unique across it.
    type Input: Event;
    /// What an instance remembers, folded from its inputs.
    type State: Default + Clone + Send + Sync + 'static;

    /// Which instance an event goes to (and whether it may start one).
    fn route(&self, event: &Recorded<Self::Input>) -> Route;

    /// Folds an input into the state. Runs before `handle`, so `handle`
    /// sees the state including this input; runs again when an instance is
    /// loaded from its stream.
    fn apply(&self, state: &mut Self::State, input: &Input<Self::Input>);

    /// Decides the outputs for an input, given the state after it.
    fn handle(&self, state: &Self::State, input: &Input<Self::Input>, out: &mut Outputs);
}
// ANCHOR_END: trait

/// Tuning of a process runner.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// Page size, poll interval, start position.
    pub subscription: SubscriptionOptions,
    /// Instances handled at once.
    pub concurrency: usize,
    /// How often pending deadlines are looked at when nothing else wakes the
    /// runner. A caught-up runner also wakes when the next deadline is due
    /// (it sleeps the clock's time until then, so a clock running faster than
    /// real time needs a short poll) and when a [`ManualClock`] jumps.
    pub deadline_poll: Duration,
    /// Instances kept folded in memory between inputs.
    pub cache_size: usize,
    /// What a strict route that does not fit (a `StartStrict` for an
    /// existing instance, a `ContinueStrict`/`StopStrict` for none) does:
    /// park the instance with the input (false, the default: the other
    /// instances go on; an operator's [`ProcessRunner::retry`] handles the
    /// input as routed, [`ProcessRunner::skip`] drops it), or skip the event
    /// with an error log and a `skipped` count in the status.
    pub skip_misrouted: bool,
    /// Attempts of a command whose dispatch fails transiently before the
    /// runner restarts (with the worker's backoff) from its checkpoint.
    pub dispatch_attempts: u32,
    /// First delay between dispatch attempts (doubles each time).
    pub dispatch_retry_delay: Duration,
    /// How long one dispatch attempt may take before it counts as a
    /// transient failure (retried with the same command id, so a target
    /// that finished it meanwhile recognises it). A command still failing
    /// after `dispatch_attempts` parks its instance. Default 30 s.
    pub call_timeout: Duration,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            subscription: SubscriptionOptions::default(),
            concurrency: 16,
            deadline_poll: Duration::from_secs(1),
            cache_size: 10_000,
            skip_misrouted: false,
            dispatch_attempts: 5,
            dispatch_retry_delay: Duration::from_millis(50),
            call_timeout: Duration::from_secs(30),
        }
    }
}

impl ProcessOptions {
    /// Instances handled at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How often deadlines are polled.
    pub fn deadline_poll(mut self, every: Duration) -> Self {
        self.deadline_poll = every;
        self
    }

    /// Events read per page.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.subscription = self.subscription.batch_size(n);
        self
    }

    /// Cross-process poll interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.subscription = self.subscription.poll_interval(interval);
        self
    }

    /// Where a runner without a checkpoint starts.
    pub fn start_from(mut self, start: crate::subscription::StartFrom) -> Self {
        self.subscription = self.subscription.start_from(start);
        self
    }

    /// Skip misrouted events instead of parking their instance.
    pub fn skip_misrouted(mut self, skip: bool) -> Self {
        self.skip_misrouted = skip;
        self
    }

    /// How long one dispatch attempt may take (see [`ProcessOptions::call_timeout`]).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Dispatch attempts before the instance is parked (at least 1), and
    /// the first delay between them.
    pub fn dispatch_retries(mut self, attempts: u32, first_delay: Duration) -> Self {
        self.dispatch_attempts = attempts.max(1);
        self.dispatch_retry_delay = first_delay;
        self
    }

    /// Instances kept in memory (at least 1).
    pub fn cache_size(mut self, n: usize) -> Self {
        self.cache_size = n.max(1);
        self
    }
}
