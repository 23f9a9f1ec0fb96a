//! Reactors: the only place where aftermath touches the outside world.
//!
//! Exactly-once delivery to an external system is impossible. What a reactor
//! promises is: **every effect happens, and with a cooperating receiver it
//! takes effect once.**
//!
//! - Every effect is keyed by (reactor, event id) in an [`EffectJournal`]
//!   (the reactor's inbox) kept in the same database as its checkpoint. An
//!   effect recorded `Done` never runs again, even if the checkpoint is lost
//!   or reset (replays never repeat effects).
//! - [`EffectContext::idempotency_key`] is derived from (reactor name, event
//!   id), so the retry after a crash between the call and the journal write
//!   sends the same key, and a receiver that deduplicates by it applies the
//!   effect once.
//! - [`ReactError::Retry`] is retried with exponential backoff and jitter up
//!   to [`ReactorOptions::max_attempts`], then parked; [`ReactError::Fatal`]
//!   parks at once. A panic in `react` is a fatal failure of that event
//!   (parked with the panic's message), never of the runner; a call running
//!   longer than [`ReactorOptions::call_timeout`] is abandoned and counts as
//!   a transient failure. Attempts are counted when they start, so an effect
//!   whose call keeps killing the process (an abort, an OOM kill) is parked
//!   after `max_attempts` restarts instead of looping; operators then retry
//!   or skip it like any parked effect.
//! - A backoff never holds other streams: a failed attempt is recorded
//!   `Failed` and the runner moves on (later events of that stream wait
//!   behind it, as behind a parked one); the attempt runs again when its
//!   delay is over. No database transaction or lock is held while the
//!   external call runs: the journal records `Started` before the call and
//!   `Done` after it, each in its own short write.
//! - Parking is sequence-aware: while an event of stream S is parked, later
//!   events of S are held back ([`ParkPolicy::HoldStream`], the default) and
//!   other streams flow. Operators list, retry or skip parked events through
//!   [`EffectJournal`]; a retried event that succeeds releases the events held
//!   behind it, in order.
//! - Effects for different streams run in parallel (up to
//!   [`ReactorOptions::concurrency`]); within a stream they run in order. The
//!   checkpoint moves only past a contiguous prefix of finished events.
//!
//! ```
//! use aftermath::prelude::*;
//! use aftermath::reactor::{EffectContext, ReactError, Reactor};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, Event)]
//! #[event(prefix = "order")]
//! enum OrderEvent { Placed { email: String } }
//!
//! struct ConfirmationMail;
//!
//! #[async_trait::async_trait]
//! impl Reactor for ConfirmationMail {
//!     type Event = OrderEvent;
//!     fn name(&self) -> &str { "confirmation-mail" }
//!     async fn react(&self, event: &Recorded<OrderEvent>, ctx: &EffectContext) -> Result<(), ReactError> {
//!         let OrderEvent::Placed { email } = &event.event;
//!         // mailer.send(email, Idempotency-Key: ctx.idempotency_key).await.map_err(ReactError::retry)?;
//!         let _ = (email, &ctx.idempotency_key);
//!         Ok(())
//!     }
//! }
//! ```

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::event::{Event, Recorded};

mod journal;
mod runner;
pub mod testkit;

pub use journal::{Effect, EffectJournal, EffectState, MemoryJournal};
pub use runner::ReactorRunner;

/// What a reactor knows about the effect it is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectContext {
    /// The reactor's name.
    pub reactor: String,
    /// The event that triggered the effect.
    pub event_id: Uuid,
    /// The event's conversation.
    pub correlation_id: Uuid,
    /// What caused the event.
    pub causation_id: Uuid,
    /// 1 for the first try, then 2, 3, ... (across restarts).
    pub attempt: u32,
    /// Derived from (reactor name, event id): the same on every attempt.
    /// Hand it to the external system (an `Idempotency-Key` header, a
    /// message id) so it can drop repeats.
    pub idempotency_key: String,
    /// The trace context of this effect attempt (its span's, with feature
    /// `otel`; otherwise the event's): pass
    /// [`traceparent`](crate::trace::TraceContext::traceparent) on in an
    /// outgoing call's `traceparent` header so the outside system's spans
    /// join the trace. `None` when the event carried no trace.
    pub trace: Option<crate::trace::TraceContext>,
}

/// Namespace of idempotency keys (uuid v5).
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x7e1f_3c52_9a0b_4d8e_b6a1_2f4c_8d90_e3b7);

/// The idempotency key of `reactor`'s effect for `event_id`.
pub fn idempotency_key(reactor: &str, event_id: Uuid) -> String {
    let mut name = Vec::with_capacity(reactor.len() + 17);
    name.extend_from_slice(reactor.as_bytes());
    name.push(b'/');
    name.extend_from_slice(event_id.as_bytes());
    Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, &name).to_string()
}

/// Why an effect did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReactError {
    /// Transient (timeout, 503, connection refused): retry with backoff.
    Retry(String),
    /// Permanent (400, invalid address): park at once.
    Fatal(String),
}

impl ReactError {
    /// A transient failure.
    pub fn retry(error: impl fmt::Display) -> Self {
        ReactError::Retry(error.to_string())
    }

    /// A permanent failure.
    pub fn fatal(error: impl fmt::Display) -> Self {
        ReactError::Fatal(error.to_string())
    }

    /// The message.
    pub fn message(&self) -> &str {
        match self {
            ReactError::Retry(m) | ReactError::Fatal(m) => m,
        }
    }
}

impl fmt::Display for ReactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReactError::Retry(m) => write!(f, "transient failure: {m}"),
            ReactError::Fatal(m) => write!(f, "fatal failure: {m}"),
        }
    }
}

impl std::error::Error for ReactError {}

// ANCHOR: trait
/// Runs effects for events. See the module docs for the guarantees.
#[async_trait]
pub trait Reactor: Send + Sync + 'static {
    /// The events it reacts to.
    type Event: Event;

    /// Stable name: key of its journal entries, checkpoint and idempotency keys.
    fn name(&self) -> &str;

    /// Performs the effect of one event. Called again (with the same
    /// idempotency key) after a transient failure or a crash.
    async fn react(
        &self,
        event: &Recorded<Self::Event>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError>;
}
// ANCHOR_END: trait

/// What happens to later events of a stream while one of its events is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParkPolicy {
    /// Hold them back (recorded `Blocked`) until the parked event is retried
    /// successfully or skipped; keeps per-stream order. The default.
    #[default]
    HoldStream,
    /// Run them anyway.
    Continue,
}

/// Tuning of a reactor runner.
#[derive(Debug, Clone)]
pub struct ReactorOptions {
    /// Page size, poll interval, start position.
    pub subscription: crate::subscription::SubscriptionOptions,
    /// Effects running at once (for different streams), per runner: a
    /// reactor split into partitions runs up to this many in each partition
    /// (see [`ReactorOptions::per_process_limit`] for a limit of the whole
    /// process).
    pub concurrency: usize,
    /// At most this many effects in flight at once over every runner built
    /// with (clones of) these options: shared by the partitions of a
    /// `partitioned_reactor` in one worker. `None`: no limit beyond
    /// `concurrency` per runner.
    pub process_limit: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    /// Attempts of a transiently failing effect before it is parked.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with jitter.
    pub retry_delay: Duration,
    /// Largest retry delay.
    pub max_retry_delay: Duration,
    /// What parking does to the rest of the stream.
    pub park_policy: ParkPolicy,
    /// How long one `react` call may take: a call still running then is
    /// abandoned and counts as a transient failure (retried with the same
    /// idempotency key, parked after `max_attempts`). Default 30 s.
    pub call_timeout: Duration,
}

impl Default for ReactorOptions {
    fn default() -> Self {
        ReactorOptions {
            subscription: Default::default(),
            concurrency: 1,
            process_limit: None,
            max_attempts: 5,
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(30),
            park_policy: ParkPolicy::HoldStream,
            call_timeout: Duration::from_secs(30),
        }
    }
}

impl ReactorOptions {
    /// Effects in flight at once per runner (at least 1). A partitioned
    /// reactor has a runner per partition, so a worker running `p` of its
    /// partitions has up to `p * n` effects in flight.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// At most `n` effects (at least 1) in flight at once in this process,
    /// over every runner built from these options or their clones: the
    /// capacity of the outside system's client in one worker, however many
    /// partitions the worker runs. With a consumer group, adding workers
    /// then adds capacity. A runner waits for a free slot before it records
    /// an effect as started.
    ///
    /// ```
    /// use aftermath::reactor::ReactorOptions;
    /// let options = ReactorOptions::default().concurrency(4).per_process_limit(8);
    /// // Clones (one per partition) share the 8 slots.
    /// let partition_options = options.clone();
    /// assert!(std::sync::Arc::ptr_eq(
    ///     options.process_limit.as_ref().unwrap(),
    ///     partition_options.process_limit.as_ref().unwrap(),
    /// ));
    /// ```
    pub fn per_process_limit(mut self, n: usize) -> Self {
        self.process_limit = Some(std::sync::Arc::new(tokio::sync::Semaphore::new(n.max(1))));
        self
    }

    /// Attempts before parking (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// First and largest retry delay.
    pub fn retry_delay(mut self, first: Duration, max: Duration) -> Self {
        self.retry_delay = first;
        self.max_retry_delay = max.max(first);
        self
    }

    /// How long one `react` call may take (see [`ReactorOptions::call_timeout`]).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sets the park policy.
    pub fn park_policy(mut self, policy: ParkPolicy) -> Self {
        self.park_policy = policy;
        self
    }

    /// Events read per page.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.subscription = self.subscription.batch_size(n);
        self
    }

    /// Cross-process poll interval (also how often operator retries are noticed).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.subscription = self.subscription.poll_interval(interval);
        self
    }

    /// Where a reactor without a checkpoint starts.
    pub fn start_from(mut self, start: crate::subscription::StartFrom) -> Self {
        self.subscription = self.subscription.start_from(start);
        self
    }

    /// Backoff before attempt `attempt + 1`, with up to 25% jitter.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        crate::worker::Backoff {
            initial: self.retry_delay,
            max: self.max_retry_delay,
        }
        .delay(attempt)
    }
}
