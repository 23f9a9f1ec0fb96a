//! Workers: run subscribers as long-lived tasks with graceful shutdown,
//! retries with backoff, leases and queryable status.
//!
//! A [`Worker`] runs each [`Subscriber`] in its own task until shutdown.
//! Graceful shutdown lets the batch in flight finish and saves its
//! checkpoint. A subscriber that fails with a transient error (the database
//! is busy, the connection dropped) is restarted with exponential backoff
//! (starting over after a run that made progress); one that fails
//! permanently (an event that still fails after its retries, does not
//! decode, or makes its handler panic) stops with an error naming the event,
//! and the others go on. With a [`LeaseStore`], only one process at a time
//! runs a given subscriber on a database: the others stand by and take over
//! when the holder's lease expires, or at once when the store can tell that
//! the holder's process is gone (see [`crate::subscription::lease`]).
//!
//! Without leases, two processes may run one subscriber at the same time:
//! that wastes work but stays correct, because every checkpoint write is a
//! compare-and-set of the checkpoint the batch started after (see
//! [`CheckpointStore`](crate::subscription::CheckpointStore)); the loser of
//! a race rolls back, re-reads the checkpoint and continues.
//!
//! With one store in every role (a [`Backend`]: SQLite, PostgreSQL),
//! [`Worker::on`] builds each runner on it, taking the store once. A
//! started worker answers "has this subscriber caught up?":
//! [`RunningWorker::settled`] waits until it has handled the log up to a
//! position (for a projection: its rows are committed), and
//! [`RunningWorker::settled_at_head`] up to the head as of the call.
//!
//! # Owner names
//!
//! [`Worker::owner`] sets the name that lease rows and logs show for this
//! worker (e.g. a host or pod name); it may be fixed across restarts and
//! even shared by several processes. It does not fence: each built worker
//! also draws a random instance id, and a lease is held by one instance.
//! Two processes with the same owner name therefore never both run a
//! leased subscriber: the second stands by, and a stale one's writes fail
//! with [`StoreError::LeaseLost`].
//!
//! ```no_run
//! # async fn demo(store: aftermath::SqliteStore, balances: aftermath::projection::ProjectionRunner<MyProjection, aftermath::SqliteStore>) {
//! use aftermath::worker::Worker;
//! use std::time::Duration;
//!
//! let worker = Worker::new()
//!     .with_leases(store.clone(), Duration::from_secs(10))
//!     .add_subscriber(balances)
//!     .start()
//!     .expect("subscriber names are unique");
//! // ... later, e.g. on SIGTERM:
//! for status in worker.status() {
//!     println!("{}: {:?}, {} events behind", status.name, status.state, status.lag.events);
//! }
//! worker.shutdown().await;
//! # }
//! # struct MyProjection;
//! # impl aftermath::projection::Projection for MyProjection {
//! #     type Event = Ev; type Db = aftermath::SqliteStore;
//! #     fn name(&self) -> &str { "x" }
//! #     async fn reset(&self, _: &mut aftermath::store::sqlite::SqliteTx) -> Result<(), aftermath::projection::HandlerError> { Ok(()) }
//! #     async fn apply(&self, _: &mut aftermath::store::sqlite::SqliteTx, _: &aftermath::Recorded<Ev>) -> Result<(), aftermath::projection::HandlerError> { Ok(()) }
//! # }
//! # #[derive(serde::Serialize, serde::Deserialize, aftermath::Event)] #[event(prefix = "ev")] enum Ev { A }
//! ```

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod backend;
mod group;
mod settle;

pub use backend::{Backend, BackendWorker};
pub use group::Partitioned;
pub use settle::SettleError;

use crate::event::Position;
use crate::store::StoreError;
use crate::subscription::{
    Holder, Lag, Lease, LeaseStore, Partition, Shutdown, is_stopped, stopped,
};

/// What a subscriber is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriberState {
    /// Registered, not running yet.
    Starting,
    /// Another process holds its lease; waiting to take over.
    Standby,
    /// Reading history faster than it is written.
    CatchingUp,
    /// Caught up; handling new events as they are appended.
    Live,
    /// Failed with a transient error; restarting after a backoff.
    Retrying {
        /// Restarts so far.
        attempt: u32,
        /// The error that caused the restart.
        error: String,
    },
    /// Stopped for good: `None` after a graceful shutdown, or the error.
    Stopped(Option<String>),
}

/// A subscriber's status, as reported to operators.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriberStatus {
    /// The subscriber's name.
    pub name: String,
    /// What it is doing.
    pub state: SubscriberState,
    /// How far behind the head it is.
    pub lag: Lag,
    /// Events handled since this worker started.
    pub handled: u64,
    /// Events skipped by policy since this worker started (each recorded).
    pub skipped: u64,
    /// When the status last changed.
    pub updated_at: DateTime<Utc>,
}

impl SubscriberStatus {
    fn new(name: &str) -> Self {
        SubscriberStatus {
            name: name.to_owned(),
            state: SubscriberState::Starting,
            lag: Lag::default(),
            handled: 0,
            skipped: 0,
            updated_at: Utc::now(),
        }
    }
}

/// Why a subscriber run ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// An event that still fails after the retries (or does not decode):
    /// the subscriber stops, naming the event.
    #[error(
        "subscriber `{subscriber}` stopped at position {position} (stream `{stream}` version {version}, type `{event_type}`): {message}"
    )]
    Event {
        /// The subscriber.
        subscriber: String,
        /// Position of the event.
        position: Position,
        /// Its stream.
        stream: String,
        /// Its version.
        version: u64,
        /// Its type.
        event_type: String,
        /// What went wrong.
        message: String,
    },
    /// The store or read-model database failed; retried with backoff.
    #[error("subscriber `{subscriber}`: {source}")]
    Store {
        /// The subscriber.
        subscriber: String,
        /// The store error.
        #[source]
        source: StoreError,
    },
    /// The projection's `setup` or `reset` hook failed (bad SQL, a missing
    /// permission): retrying cannot help, so the subscriber stops.
    #[error("subscriber `{subscriber}`: {message}")]
    ReadModel {
        /// The subscriber.
        subscriber: String,
        /// Which hook failed and why.
        message: String,
    },
    /// The subscriber is set up wrongly (an invalid name, an input type two
    /// members of an input enum both decode): it stops, naming the problem.
    #[error("subscriber `{subscriber}` is misconfigured: {message}")]
    Config {
        /// The subscriber.
        subscriber: String,
        /// What is wrong.
        message: String,
    },
    /// The subscriber's run panicked (outside a handler, where a panic is
    /// an [`SubscriberError::Event`] failure): it is stopped, not restarted.
    #[error("{message}")]
    Panicked {
        /// The subscriber.
        subscriber: String,
        /// What the panic said, naming the subscriber.
        message: String,
    },
}

impl SubscriberError {
    /// Whether restarting can help: store errors are transient, a failing
    /// event (or a panic) is not.
    pub fn is_transient(&self) -> bool {
        matches!(self, SubscriberError::Store { .. })
    }
}

/// The message of a panic payload (`&str` or `String`).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Handed to a subscriber's run: when to stop, the lease it runs under, and
/// where to report status.
pub struct RunContext {
    /// Flips to `true` on shutdown or when the lease is lost.
    pub shutdown: Shutdown,
    /// The lease this run holds, for fenced checkpoint writes.
    pub lease: Option<Lease>,
    status: Arc<Mutex<SubscriberStatus>>,
    activity: Arc<Activity>,
}

/// Whether a run is working on something (not waiting for events), and
/// since when it has made no progress: what a worker's stall limit reads.
#[derive(Default)]
pub(crate) struct Activity(Mutex<Option<std::time::Instant>>);

impl Activity {
    fn set_busy(&self, busy: bool) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = busy.then(std::time::Instant::now);
    }

    fn progressed(&self) {
        if let Some(since) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            *since = std::time::Instant::now();
        }
    }

    /// How long a busy run has gone without progress (`None` when idle).
    fn stalled_for(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|since| since.elapsed())
    }
}

impl RunContext {
    /// A context outside any worker: runs until `shutdown`, without a lease.
    pub fn standalone(name: &str, shutdown: Shutdown) -> Self {
        RunContext {
            shutdown,
            lease: None,
            status: Arc::new(Mutex::new(SubscriberStatus::new(name))),
            activity: Arc::default(),
        }
    }

    /// Marks the run as working (`true`: every [`RunContext::report`] from
    /// now on is progress) or as waiting for events (`false`: never a stall).
    pub(crate) fn set_busy(&self, busy: bool) {
        self.activity.set_busy(busy);
    }

    /// Whether shutdown was requested (or the sender of `shutdown` is gone).
    pub fn stopping(&self) -> bool {
        is_stopped(&self.shutdown)
    }

    /// Updates the reported status.
    ///
    /// Every update is also a `tracing` event (target `aftermath::lag`, level
    /// debug; a state change at info) carrying the subscriber, its state and
    /// its lag in positions and seconds, so lag can be followed in logs and
    /// exported from a tracing layer. Each report is progress for the
    /// worker's stall limit ([`Worker::stall_limit`]).
    pub fn report(&self, f: impl FnOnce(&mut SubscriberStatus)) {
        self.activity.progressed();
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let before = status.state.clone();
        f(&mut status);
        status.updated_at = Utc::now();
        let (name, state, lag) = (&status.name, &status.state, status.lag);
        if *state != before {
            tracing::info!(target: "aftermath::lag", subscriber = %name, state = ?state, position = %lag.position, head = %lag.head, lag_events = lag.events, lag_seconds = lag.seconds, "subscriber state changed");
        } else {
            tracing::debug!(target: "aftermath::lag", subscriber = %name, state = ?state, position = %lag.position, head = %lag.head, lag_events = lag.events, lag_seconds = lag.seconds, "subscriber progress");
        }
    }

    /// Reports the lag after a page was handled: a subscriber catching up
    /// that has reached the head it read is live (a full last page leaves
    /// the reader at the head without a short page to say so).
    pub fn report_progress(&self, lag: crate::subscription::Lag) {
        self.report(|s| {
            s.lag = lag;
            if s.state == SubscriberState::CatchingUp && lag.position >= lag.head {
                s.state = SubscriberState::Live;
            }
        });
    }

    /// The current status.
    pub fn status(&self) -> SubscriberStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Something a [`Worker`] runs: a projection, process manager or reactor.
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Stable name: the key of its checkpoint and lease.
    fn name(&self) -> &str;

    /// Runs until `ctx.shutdown` flips (then returns `Ok` after saving its
    /// checkpoint) or an error. Called again after a transient error, and
    /// after a lost lease once it is acquired again. Returning `Ok` without
    /// being asked to stop means the subscriber is done: it is not restarted.
    async fn run(&self, ctx: &mut RunContext) -> Result<(), SubscriberError>;
}

/// Why a [`Worker`] did not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Two subscribers have the same name: they would share one checkpoint
    /// and one lease, and each would commit over the other's work.
    #[error(
        "two subscribers are named `{name}` (subscribers {first} and {second} in the order added); names key checkpoints and leases, so they must be unique in a worker"
    )]
    DuplicateSubscriber {
        /// The name used twice.
        name: String,
        /// 0-based index of the first subscriber with it.
        first: usize,
        /// 0-based index of the second.
        second: usize,
    },
    /// A partition's runner of a [`Partitioned`] subscriber is not named
    /// after its partition (`<name>#<index>of<count>`): it would keep its
    /// checkpoint and lease under another key than its group's.
    #[error(
        "partition runner of group `{group}` is named `{found}`, expected `{expected}`: make it with `.partition(index, count)` from the partition handed to the closure"
    )]
    PartitionName {
        /// The group.
        group: String,
        /// The name the partition must have.
        expected: String,
        /// The runner's name.
        found: String,
    },
}

/// Restart delays: exponential from `initial`, capped at `max`, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before restart number `attempt` (1-based), with up to 25%
    /// random jitter so restarting workers do not stampede.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max);
        let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 4000.0;
        exp.mul_f64(1.0 + jitter).min(self.max)
    }
}

type DynLeases = Arc<dyn LeaseStore>;

/// A run that lasted this long before failing counts as healthy: the next
/// restart uses the first backoff delay again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs subscribers until shutdown. Build with [`Worker::new`], then
/// [`Worker::start`].
pub struct Worker {
    subscribers: Vec<Arc<dyn Subscriber>>,
    groups: Vec<Partitioned>,
    leases: Option<(DynLeases, Duration)>,
    holder: Holder,
    backoff: Backoff,
    standby_poll: Duration,
    stall_limit: Duration,
}

/// How long a busy run may go without progress by default before its lease
/// is given up ([`Worker::stall_limit`]).
const STALL_LIMIT: Duration = Duration::from_secs(300);

/// How often a standby asks for a lease by default (bounded by `ttl / 3`).
const STANDBY_POLL: Duration = Duration::from_millis(250);

impl Default for Worker {
    fn default() -> Self {
        Self::new()
    }
}

impl Worker {
    /// A worker with no subscribers, no leases, default backoff, a fresh
    /// instance id, and the owner name `worker-<pid>` (see
    /// [`Worker::owner`]).
    pub fn new() -> Self {
        Worker {
            subscribers: Vec::new(),
            groups: Vec::new(),
            leases: None,
            holder: Holder::new(format!("worker-{}", std::process::id())),
            backoff: Backoff::default(),
            standby_poll: STANDBY_POLL,
            stall_limit: STALL_LIMIT,
        }
    }

    /// Runs each subscriber only while holding its lease in `leases`
    /// (renewed every `ttl / 3`). Use the database that holds the
    /// subscribers' checkpoints, so checkpoint writes are fenced by the lease.
    pub fn with_leases(mut self, leases: impl LeaseStore, ttl: Duration) -> Self {
        self.leases = Some((Arc::new(leases), ttl));
        self
    }

    /// Sets this worker's owner name in leases and logs (default:
    /// `worker-<pid>`). A name for people: it may be fixed (a host or pod
    /// name) and shared by several processes; fencing uses this worker's
    /// instance id, drawn when it was built, so two workers never share a
    /// lease whatever their names (see the [module docs](self)).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.holder.owner = owner.into();
        self
    }

    /// Sets how often a subscriber on standby asks for its lease (default
    /// 250 ms, never more than `ttl / 3`): how soon it notices that the
    /// holder is gone, where the store can tell.
    pub fn standby_poll(mut self, interval: Duration) -> Self {
        self.standby_poll = interval;
        self
    }

    /// Sets how long a subscriber may work on a page without progress (no
    /// event handled, skipped or committed) before its lease is given up
    /// (default 5 minutes; with leases only). A call that hangs although the
    /// kinds' own timeouts bound it (a handler that blocks its thread, an
    /// `apply` stuck in a loop) then stops the run: the lease is released so
    /// another process takes over at once, fenced as always (the stuck run's
    /// later writes fail), and this worker drops the run, if it can (a
    /// thread blocked outside `.await` keeps running until it returns), and
    /// restarts it after the backoff. Waiting for new events is never a
    /// stall. Set it above the longest page a subscriber may legitimately
    /// spend between two handled events (retries included).
    pub fn stall_limit(mut self, limit: Duration) -> Self {
        self.stall_limit = limit;
        self
    }

    /// Sets the restart backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Adds a subscriber.
    pub fn add_subscriber(mut self, subscriber: impl Subscriber) -> Self {
        self.subscribers.push(Arc::new(subscriber));
        self
    }

    /// Adds a partitioned subscriber, whose partitions this worker shares
    /// with the other workers running it (its consumer group).
    ///
    /// With leases ([`Worker::with_leases`]), this worker joins the group
    /// `<name>#*of<count>`: it sends a heartbeat every `ttl / 3` to the
    /// lease store, runs the partitions the assignment gives it (each under
    /// its own lease, so a partition moves only after its old holder has
    /// stopped committing) and hands the others over; on shutdown it leaves
    /// the group first, so the others take its partitions over without
    /// waiting for its membership to expire. With N live workers each runs
    /// `count / N` partitions or one more. See
    /// [`crate::subscription::group`].
    ///
    /// Without leases, this worker runs every partition (several such
    /// workers stay correct through the fenced checkpoints, but duplicate
    /// work).
    ///
    /// Each partition appears in [`RunningWorker::status`] under its own
    /// name (`<name>#<index>of<count>`); one assigned to another worker is
    /// [`SubscriberState::Standby`].
    pub fn add_partitioned(mut self, subscriber: Partitioned) -> Self {
        self.groups.push(subscriber);
        self
    }

    /// Starts every subscriber in its own task (and every partitioned one's
    /// group membership); fails, starting none, when two subscribers (or
    /// partitions) have the same name, or a partition's runner is not named
    /// after its partition.
    pub fn start(self) -> Result<RunningWorker, WorkerError> {
        // The more precise error first: a partition runner named otherwise
        // (which also makes the names of a group's partitions collide).
        for group in &self.groups {
            for (index, subscriber) in group.partitions().iter().enumerate() {
                let expected = Partition::new(index as u32, group.count()).key(group.name());
                if subscriber.name() != expected {
                    return Err(WorkerError::PartitionName {
                        group: group.group(),
                        expected,
                        found: subscriber.name().to_owned(),
                    });
                }
            }
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        let names = self.subscribers.iter().map(|s| s.name()).chain(
            self.groups
                .iter()
                .flat_map(|g| g.partitions().iter().map(|s| s.name())),
        );
        for (index, name) in names.enumerate() {
            if let Some(first) = seen.insert(name, index) {
                return Err(WorkerError::DuplicateSubscriber {
                    name: name.to_owned(),
                    first,
                    second: index,
                });
            }
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut statuses = BTreeMap::new();
        let mut tasks = Vec::new();
        for subscriber in self.subscribers {
            let name = subscriber.name().to_owned();
            let status = Arc::new(Mutex::new(SubscriberStatus::new(&name)));
            statuses.insert(name, status.clone());
            let supervisor = Supervisor {
                subscriber,
                leases: self.leases.clone(),
                holder: self.holder.clone(),
                backoff: self.backoff,
                standby_poll: self.standby_poll,
                stall_limit: self.stall_limit,
                status,
            };
            tasks.push(tokio::spawn(supervisor.run(stop_rx.clone())));
        }
        for group in self.groups {
            let mut group_statuses = Vec::new();
            for subscriber in group.partitions() {
                let name = subscriber.name().to_owned();
                let status = Arc::new(Mutex::new(SubscriberStatus::new(&name)));
                statuses.insert(name, status.clone());
                group_statuses.push(status);
            }
            let Some((leases, ttl)) = self.leases.clone() else {
                // No leases: every partition runs here.
                for (subscriber, status) in group.partitions().iter().zip(group_statuses) {
                    let supervisor = Supervisor {
                        subscriber: subscriber.clone(),
                        leases: None,
                        holder: self.holder.clone(),
                        backoff: self.backoff,
                        standby_poll: self.standby_poll,
                        stall_limit: self.stall_limit,
                        status,
                    };
                    tasks.push(tokio::spawn(supervisor.run(stop_rx.clone())));
                }
                continue;
            };
            let template = (
                self.leases.clone(),
                self.holder.clone(),
                self.backoff,
                self.standby_poll,
                self.stall_limit,
            );
            let supervise = Arc::new(move |subscriber, status| {
                let (leases, holder, backoff, standby_poll, stall_limit) = template.clone();
                Supervisor {
                    subscriber,
                    leases,
                    holder,
                    backoff,
                    standby_poll,
                    stall_limit,
                    status,
                }
            });
            let supervisor = group::GroupSupervisor {
                group: group.group(),
                count: group.count(),
                partitions: group.partitions().to_vec(),
                statuses: group_statuses,
                leases,
                ttl,
                holder: self.holder.clone(),
                supervise,
            };
            tasks.push(tokio::spawn(supervisor.run(stop_rx.clone())));
        }
        Ok(RunningWorker {
            stop: stop_tx,
            statuses,
            tasks,
            holder: self.holder,
        })
    }

    /// Starts, runs until `signal` completes, then shuts down gracefully.
    /// Fails without running anything when [`Worker::start`] does.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), WorkerError> {
        let running = self.start()?;
        signal.await;
        running.shutdown().await;
        Ok(())
    }
}

/// A started worker: query status, then shut down.
pub struct RunningWorker {
    stop: watch::Sender<bool>,
    statuses: BTreeMap<String, Arc<Mutex<SubscriberStatus>>>,
    tasks: Vec<JoinHandle<()>>,
    holder: Holder,
}

impl RunningWorker {
    /// The status of every subscriber.
    pub fn status(&self) -> Vec<SubscriberStatus> {
        self.statuses
            .values()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// The status of one subscriber.
    pub fn status_of(&self, name: &str) -> Option<SubscriberStatus> {
        self.statuses
            .get(name)
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// This worker's owner name in leases.
    pub fn owner(&self) -> &str {
        &self.holder.owner
    }

    /// This worker's instance id: what its leases are held (and fenced) by.
    pub fn instance(&self) -> &str {
        &self.holder.instance
    }

    /// Asks every subscriber to stop after its batch in flight, and waits
    /// until all have saved their checkpoints and released their leases.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

struct Supervisor {
    subscriber: Arc<dyn Subscriber>,
    leases: Option<(DynLeases, Duration)>,
    holder: Holder,
    backoff: Backoff,
    standby_poll: Duration,
    stall_limit: Duration,
    status: Arc<Mutex<SubscriberStatus>>,
}

impl Supervisor {
    fn report(&self, state: SubscriberState) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.state = state;
        status.updated_at = Utc::now();
    }

    async fn run(self, mut stop: Shutdown) {
        let name = self.subscriber.name().to_owned();
        let mut attempt = 0u32;
        let final_state = loop {
            // A dropped `RunningWorker` (its sender gone) stops us too.
            if is_stopped(&stop) {
                break SubscriberState::Stopped(None);
            }
            let lease = match &self.leases {
                None => None,
                Some((leases, ttl)) => match self.acquire(leases, *ttl, &mut stop).await {
                    Ok(Some(lease)) => Some(lease),
                    Ok(None) => break SubscriberState::Stopped(None),
                    Err(e) => {
                        attempt += 1;
                        if !self.pause(attempt, e.to_string(), &mut stop).await {
                            break SubscriberState::Stopped(None);
                        }
                        continue;
                    }
                },
            };
            // The run stops on worker shutdown or when the lease is lost.
            let (run_stop_tx, run_stop_rx) = watch::channel(false);
            let lease_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let activity = Arc::new(Activity::default());
            let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<Duration>();
            // The renewer keeps the lease until the run has returned, also
            // while a graceful shutdown finishes the batch in flight (a
            // lease expiring then would fail its fenced commit).
            let renewer = lease.clone().map(|lease| {
                let (leases, ttl) = self.leases.clone().expect("lease implies a lease store");
                let watch = Stall {
                    activity: activity.clone(),
                    limit: self.stall_limit,
                    stalled: stalled_tx,
                };
                let run_stop = run_stop_tx.clone();
                let lost = lease_lost.clone();
                tokio::spawn(renew(leases, lease, ttl, run_stop, lost, watch))
            });
            let forward = {
                let mut stop = stop.clone();
                let run_stop = run_stop_tx.clone();
                tokio::spawn(async move {
                    stopped(&mut stop).await;
                    let _ = run_stop.send(true);
                })
            };
            let mut ctx = RunContext {
                shutdown: run_stop_rx,
                lease: lease.clone(),
                status: self.status.clone(),
                activity,
            };
            let handled_before = self.handled();
            let started = tokio::time::Instant::now();
            // A panicking subscriber is reported as stopped with the panic,
            // rather than taking the task down with a stale status.
            let run = AssertUnwindSafe(self.subscriber.run(&mut ctx)).catch_unwind();
            let outcome = tokio::select! {
                outcome = run => outcome,
                // The renewer gave the lease up: drop the stuck run.
                Ok(idle) = stalled_rx => Ok(Err(SubscriberError::Store {
                    subscriber: name.clone(),
                    source: StoreError::Closed(format!(
                        "no progress for {idle:?} (stall limit {:?}); lease given up, run dropped",
                        self.stall_limit
                    )),
                })),
            };
            let result = match outcome {
                Ok(result) => result,
                Err(panic) => {
                    let message = format!(
                        "subscriber `{name}` panicked: {}",
                        panic_message(panic.as_ref())
                    );
                    tracing::error!(subscriber = %name, "{message}");
                    Err(SubscriberError::Panicked {
                        subscriber: name.clone(),
                        message,
                    })
                }
            };
            forward.abort();
            if let Some(renewer) = renewer {
                renewer.abort();
            }
            if let (Some((leases, _)), Some(lease)) = (&self.leases, &lease)
                && let Err(e) = leases.release(lease).await
            {
                tracing::warn!(subscriber = %name, error = %e, "releasing lease failed; it will expire");
            }
            // A run that made progress (or stayed up for a minute) starts
            // the backoff over: `attempt` counts consecutive failures.
            if self.handled() > handled_before || started.elapsed() >= HEALTHY_RUN {
                attempt = 0;
            }
            match result {
                Ok(()) if is_stopped(&stop) => break SubscriberState::Stopped(None),
                // Lease lost without shutdown: go back to standby.
                Ok(()) if lease_lost.load(std::sync::atomic::Ordering::SeqCst) => {
                    tracing::warn!(subscriber = %name, "lease lost; standing by");
                    continue;
                }
                // Nobody asked it to stop: the subscriber is done.
                Ok(()) => {
                    tracing::info!(subscriber = %name, "subscriber finished");
                    break SubscriberState::Stopped(None);
                }
                // A lost checkpoint race: another writer committed first.
                // Not a failure: run again at once, from the stored
                // checkpoint.
                Err(SubscriberError::Store {
                    source: source @ StoreError::CheckpointMoved { .. },
                    ..
                }) => {
                    tracing::info!(subscriber = %name, error = %source, "another writer moved the checkpoint; re-reading it");
                    continue;
                }
                Err(e) if e.is_transient() => {
                    attempt += 1;
                    tracing::warn!(subscriber = %name, attempt, error = %e, "subscriber failed; restarting after backoff");
                    if !self.pause(attempt, e.to_string(), &mut stop).await {
                        break SubscriberState::Stopped(None);
                    }
                }
                Err(e) => {
                    tracing::error!(subscriber = %name, error = %e, "subscriber stopped");
                    break SubscriberState::Stopped(Some(e.to_string()));
                }
            }
        };
        self.report(final_state);
    }

    fn handled(&self) -> u64 {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handled
    }

    /// Reports `Retrying` and sleeps the backoff; false on shutdown.
    async fn pause(&self, attempt: u32, error: String, stop: &mut Shutdown) -> bool {
        self.report(SubscriberState::Retrying { attempt, error });
        tokio::select! {
            _ = stopped(stop) => false,
            _ = tokio::time::sleep(self.backoff.delay(attempt)) => true,
        }
    }

    /// Waits for the lease (standing by while another owner holds it).
    async fn acquire(
        &self,
        leases: &DynLeases,
        ttl: Duration,
        stop: &mut Shutdown,
    ) -> Result<Option<Lease>, StoreError> {
        let name = self.subscriber.name();
        loop {
            if let Some(lease) = leases.acquire(name, &self.holder, ttl).await? {
                tracing::info!(subscriber = %name, owner = %self.holder.owner, instance = %self.holder.instance, token = lease.token, "lease acquired");
                return Ok(Some(lease));
            }
            self.report(SubscriberState::Standby);
            tokio::select! {
                _ = stopped(stop) => return Ok(None),
                _ = tokio::time::sleep(self.standby_poll.min(ttl / 3)) => {}
            }
        }
    }
}

/// What the renewer watches to give a stuck run's lease up.
struct Stall {
    activity: Arc<Activity>,
    limit: Duration,
    /// Tells the supervisor to drop the run.
    stalled: tokio::sync::oneshot::Sender<Duration>,
}

/// Renews `lease` every `ttl / 3` until aborted (after the run returned);
/// when the lease is lost, or cannot be renewed before it expires, flags
/// `lost` and stops the run (its fenced writes would fail anyway). When the
/// run has been busy without progress for longer than the stall limit, it
/// releases the lease (another process takes over at once) and tells the
/// supervisor to drop the run.
async fn renew(
    leases: DynLeases,
    mut lease: Lease,
    ttl: Duration,
    run_stop: watch::Sender<bool>,
    lost: Arc<std::sync::atomic::AtomicBool>,
    stall: Stall,
) {
    let lose = || {
        lost.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = run_stop.send(true);
    };
    // Checked at least every ttl / 3 (the renewal period), sooner for a
    // short limit.
    let period = (ttl / 3).min(stall.limit.max(Duration::from_millis(10)));
    let mut since_renewal = Duration::ZERO;
    loop {
        tokio::time::sleep(period).await;
        if let Some(idle) = stall.activity.stalled_for()
            && idle >= stall.limit
        {
            tracing::error!(lease = %lease.name, ?idle, limit = ?stall.limit, "subscriber made no progress within its stall limit; giving its lease up");
            lose();
            if let Err(e) = leases.release(&lease).await {
                tracing::warn!(lease = %lease.name, error = %e, "releasing a stalled run's lease failed; it will expire");
            }
            let _ = stall.stalled.send(idle);
            return;
        }
        since_renewal += period;
        if since_renewal < ttl / 3 {
            continue;
        }
        since_renewal = Duration::ZERO;
        match leases.renew(&lease, ttl).await {
            Ok(renewed) => lease = renewed,
            Err(StoreError::LeaseLost { .. }) => {
                tracing::warn!(lease = %lease.name, "lease lost to another owner");
                lose();
                return;
            }
            Err(e) if Utc::now() >= lease.expires_at => {
                tracing::warn!(lease = %lease.name, error = %e, "could not renew lease before it expired");
                lose();
                return;
            }
            Err(e) => {
                tracing::warn!(lease = %lease.name, error = %e, "renewing lease failed; retrying")
            }
        }
    }
}
