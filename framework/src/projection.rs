//! Projections: read models kept up to date from the log.
//!
//! A [`Projection`] gets each event together with the open transaction of its
//! read-model database ([`ReadModelDb`]); the runner commits the read-model
//! writes and the checkpoint in that same transaction, many events per
//! transaction. A crash at any point therefore never applies an event twice
//! and never loses one.
//!
//! A projection declares a [`Projection::version`]; bumping it makes the
//! runner reset the read model ([`Projection::reset`], checkpoint to the
//! origin) and replay the log on its next start. [`ProjectionRunner::rebuild`]
//! does the same on demand.
//!
//! An event whose handler keeps failing (or that does not decode) stops the
//! projection with an error naming it, unless the runner is configured with
//! [`OnError::Skip`]: then the event is recorded as skipped in the read-model
//! database, in the same transaction that moves the checkpoint past it, where
//! an operator can list it ([`ReadModelDb::skipped`]). Never a silent skip.
//!
//! A projection that writes somewhere else than its own database implements
//! [`ExternalProjection`] instead and keeps its checkpoint in a
//! [`CheckpointStore`]: it is then at-least-once, and must be idempotent.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::event::{Event, Position, Recorded, StoredEvent};
use crate::store::{EventStore, StoreError};
use crate::subscription::engine::{self, Handled, PageHandler};
use crate::subscription::{
    CheckpointStore, Lease, Page, Partition, StartFrom, SubscriptionOptions, stopped,
};
use crate::worker::{RunContext, Subscriber, SubscriberError, panic_message};
use futures::FutureExt;

/// An error from a projection's handler. Anything that is a
/// `std::error::Error` converts into it with `?`.
pub struct HandlerError(Box<dyn std::error::Error + Send + Sync>);

impl HandlerError {
    /// An error with just a message.
    pub fn msg(message: impl Into<String>) -> Self {
        HandlerError(message.into().into())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError(Box::new(e))
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A handler failure inside a batch: which event, and why.
#[derive(Debug)]
pub struct HandlerFailure {
    /// Index of the failing event in the batch.
    pub index: usize,
    /// The handler's error.
    pub error: HandlerError,
}

/// A projection's saved state in its read-model database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionState {
    /// The projection version the read model was built with.
    pub version: u32,
    /// Everything through this position is applied.
    pub position: Position,
}

/// An event an operator chose to skip, recorded where they can see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEvent {
    /// The subscriber that skipped it.
    pub subscriber: String,
    /// Its position.
    pub position: Position,
    /// Its stream.
    pub stream: String,
    /// Its version.
    pub version: u64,
    /// Its type.
    pub event_type: String,
    /// Why it was skipped.
    pub error: String,
    /// When.
    pub skipped_at: DateTime<Utc>,
}

/// What a [`ReadModelDb::transact`] commits besides the projection's writes.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The projection.
    pub projection: String,
    /// Its version, stored with the checkpoint.
    pub version: u32,
    /// The new checkpoint.
    pub position: Position,
    /// The checkpoint the batch started after: the commit happens only if
    /// the stored checkpoint is still this position at this `version` (no
    /// row counts as the origin), checked in the same transaction; else
    /// nothing is committed and `transact` fails with
    /// [`StoreError::CheckpointMoved`]. `None` commits unconditionally
    /// (a rebuild, which takes the read model over on purpose).
    pub expected: Option<Position>,
    /// The layout row the runner started under, checked in the same
    /// transaction: a commit of an old layout fails with
    /// [`StoreError::CheckpointMoved`] once a rebuild or layout change began.
    pub layout: Option<LayoutGuard>,
    /// The lease the write is fenced by.
    pub lease: Option<Lease>,
    /// An event skipped by policy, recorded in the same transaction.
    pub skipped: Option<SkippedEvent>,
}

/// The layout (version and partition count) a projection runner started
/// under: its commits check that the row `key` still holds `state` (`None`:
/// no row), so a runner of an old layout cannot commit after a rebuild or
/// partition-count change started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutGuard {
    /// The layout row's name (`<projection>#partitions`).
    pub key: String,
    /// What it held when the runner started.
    pub state: Option<ProjectionState>,
}

impl Commit {
    /// Checks the compare-and-set part of a commit against what the store
    /// holds: the checkpoint row (`found`) and the layout row
    /// (`found_layout`, read only when [`Commit::layout`] is set). For
    /// [`ReadModelDb`] implementations that read both in the commit's
    /// transaction, under a lock that keeps them until it ends.
    pub fn check(
        &self,
        found: Option<ProjectionState>,
        found_layout: Option<ProjectionState>,
    ) -> Result<(), StoreError> {
        let describe = |s: Option<ProjectionState>| {
            s.map(|s| format!("position {} at version {}", s.position, s.version))
        };
        if let Some(expected) = self.expected {
            let ok = match found {
                None => expected == Position::ORIGIN,
                Some(f) => f.position == expected && f.version == self.version,
            };
            if !ok {
                return Err(StoreError::CheckpointMoved {
                    name: self.projection.clone(),
                    expected: format!("position {expected} at version {}", self.version),
                    found: describe(found),
                });
            }
        }
        if let Some(guard) = &self.layout
            && guard.state != found_layout
        {
            return Err(StoreError::CheckpointMoved {
                name: guard.key.clone(),
                expected: describe(guard.state).unwrap_or_else(|| "no layout".to_owned()),
                found: describe(found_layout),
            });
        }
        Ok(())
    }
}

/// The future of one transaction's work, borrowing the transaction.
pub type TxFuture<'b, T> = Pin<Box<dyn Future<Output = Result<T, HandlerFailure>> + Send + 'b>>;

/// The work of one transaction: the projection's writes through `Tx`.
/// Build it with [`tx_work`].
pub type TxWork<D, T> =
    Box<dyn for<'b> FnOnce(&'b mut <D as ReadModelDb>::Tx) -> TxFuture<'b, T> + Send>;

/// Boxes a closure as [`TxWork`] (and makes the compiler infer its
/// higher-ranked signature).
///
/// ```
/// use aftermath::projection::{tx_work, TxWork};
/// use aftermath::SqliteStore;
///
/// let work: TxWork<SqliteStore, i64> = tx_work::<SqliteStore, _, _>(|tx| {
///     Box::pin(async move {
///         Ok(tx.query_row("SELECT 1", [], |r| r.get(0)).unwrap_or(0))
///     })
/// });
/// # drop(work);
/// ```
pub fn tx_work<D, T, F>(f: F) -> TxWork<D, T>
where
    D: ReadModelDb,
    F: for<'b> FnOnce(&'b mut D::Tx) -> TxFuture<'b, T> + Send + 'static,
{
    Box::new(f)
}

/// A read-model database: runs projection writes and the checkpoint in one
/// transaction.
#[async_trait]
pub trait ReadModelDb: Clone + Send + Sync + 'static {
    /// What projections write through (for SQLite, a connection inside the
    /// open transaction).
    type Tx: Send;

    /// The saved state of a projection, if it ever ran here.
    async fn load_state(&self, projection: &str) -> Result<Option<ProjectionState>, StoreError>;

    /// Runs `work` in one transaction and, if it succeeds, saves `commit`
    /// (fenced by its lease) in the same transaction. If `work` fails,
    /// everything is rolled back and the failure returned as `Ok(Err(..))`.
    async fn transact<T: Send + 'static>(
        &self,
        commit: Commit,
        work: TxWork<Self, T>,
    ) -> Result<Result<T, HandlerFailure>, StoreError>;

    /// Events skipped by policy, of one subscriber or all, oldest first.
    async fn skipped(&self, subscriber: Option<&str>) -> Result<Vec<SkippedEvent>, StoreError>;
}

// ANCHOR: trait
/// A read model maintained in a [`ReadModelDb`], exactly once per event.
///
/// `apply` runs inside the batch's transaction: write through `tx` only,
/// with no other side effects (it may run again if the transaction rolls
/// back and is retried).
pub trait Projection: Send + Sync + 'static {
    /// The events it reads (only these types are read from the store).
    type Event: Event;
    /// Its read-model database.
    type Db: ReadModelDb;

    /// Stable name: the key of its checkpoint.
    fn name(&self) -> &str;

    /// Version of the read model's shape; bumping it rebuilds on start.
    fn version(&self) -> u32 {
        1
    }

    /// Creates the read model's tables if missing; runs at every start.
    fn setup(
        &self,
        _tx: &mut <Self::Db as ReadModelDb>::Tx,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }

    /// Drops the read model's data (tables); `setup` runs right after.
    fn reset(
        &self,
        tx: &mut <Self::Db as ReadModelDb>::Tx,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies one event. Write it as `async fn apply(&self, tx, event)`.
    fn apply(
        &self,
        tx: &mut <Self::Db as ReadModelDb>::Tx,
        event: &Recorded<Self::Event>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}
// ANCHOR_END: trait

/// Runs one handler call: a panic or a call that takes longer than `limit`
/// is a failure of its event, like an error, never of the runner. Off a
/// Tokio runtime (a SQLite projection on the store's writer thread) there
/// is no timer; the writer bounds waiting itself.
async fn guarded(
    limit: Duration,
    call: impl Future<Output = Result<(), HandlerError>>,
) -> Result<(), HandlerError> {
    let call = AssertUnwindSafe(call).catch_unwind();
    let outcome = if tokio::runtime::Handle::try_current().is_ok() {
        match tokio::time::timeout(limit, call).await {
            Ok(outcome) => outcome,
            Err(_) => {
                return Err(HandlerError::msg(format!(
                    "the handler did not finish within {limit:?} (ProjectionOptions::call_timeout)"
                )));
            }
        }
    } else {
        call.await
    };
    outcome.unwrap_or_else(|panic| {
        Err(HandlerError::msg(format!(
            "the handler panicked: {}",
            panic_message(panic.as_ref())
        )))
    })
}

/// What to do with an event that keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Stop the subscriber with an error naming the event (the default).
    #[default]
    Stop,
    /// Record the event as skipped and go on.
    Skip,
}

/// Tuning of a projection runner.
#[derive(Debug, Clone)]
pub struct ProjectionOptions {
    /// Page size, poll interval, start position.
    pub subscription: SubscriptionOptions,
    /// Policy for an event that still fails after the retries.
    pub on_error: OnError,
    /// Attempts at a failing batch before the policy applies.
    pub attempts: u32,
    /// First retry delay (doubles each attempt).
    pub retry_delay: Duration,
    /// How long one `apply` (or an external projection's `handle`) may take
    /// before it counts as a failure of its event (retried, then the error
    /// policy). Default 30 s. A SQLite projection's `apply` runs on the
    /// store's writer thread, where the store's own limit applies instead:
    /// waiting for anything but its transaction fails within a second.
    pub call_timeout: Duration,
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        ProjectionOptions {
            subscription: SubscriptionOptions::default(),
            on_error: OnError::Stop,
            attempts: 3,
            retry_delay: Duration::from_millis(50),
            call_timeout: Duration::from_secs(30),
        }
    }
}

impl ProjectionOptions {
    /// Events per transaction (and per read).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.subscription = self.subscription.batch_size(n);
        self
    }

    /// Sets the policy for events that keep failing.
    pub fn on_error(mut self, policy: OnError) -> Self {
        self.on_error = policy;
        self
    }

    /// Sets how long one call of the handler may take
    /// (see [`ProjectionOptions::call_timeout`]).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sets the attempts at a failing batch (at least 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Sets the cross-process poll interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.subscription = self.subscription.poll_interval(interval);
        self
    }

    /// Sets where a projection without a checkpoint starts.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.subscription = self.subscription.start_from(start);
        self
    }
}

/// Runs a [`Projection`]: a [`Subscriber`] for a [`Worker`](crate::worker::Worker),
/// or driven directly with [`ProjectionRunner::catch_up`].
///
/// Split into partitions with [`ProjectionRunner::partition`], several
/// runners (in one worker or many) share one projection's load.
pub struct ProjectionRunner<P: Projection, S> {
    projection: Arc<P>,
    store: S,
    db: P::Db,
    options: ProjectionOptions,
    partition: Option<Partition>,
    /// The checkpoint and lease key: the name, or `<name>#<i>of<n>`.
    key: String,
}

/// What every commit of one run is fenced by: the lease (if any) and the
/// layout row as the run found it.
pub(crate) struct Fence {
    lease: Option<Lease>,
    layout: Option<LayoutGuard>,
}

impl Fence {
    /// The commit of checkpoint `name` from `from` to `to`.
    fn commit(&self, name: String, version: u32, from: Position, to: Position) -> Commit {
        Commit {
            projection: name,
            version,
            position: to,
            expected: Some(from),
            layout: self.layout.clone(),
            lease: self.lease.clone(),
            skipped: None,
        }
    }
}

/// The layout row's position while a rebuild is under way: no count.
const REBUILDING: Position = Position(u64::MAX);

impl<P: Projection, S: EventStore + Clone> ProjectionRunner<P, S> {
    /// A runner reading `store` and writing to `db`, with default options.
    pub fn new(projection: P, store: S, db: P::Db) -> Self {
        let key = projection.name().to_owned();
        ProjectionRunner {
            projection: Arc::new(projection),
            store,
            db,
            options: ProjectionOptions::default(),
            partition: None,
            key,
        }
    }

    /// Runs only partition `index` of `count` of the projection: the events
    /// of the streams [`Partition::of`] puts there, in order per stream,
    /// with its own checkpoint and lease under `<name>#<index>of<count>`
    /// (also its name as a [`Subscriber`]). Run one runner per partition,
    /// in one worker or spread over several processes. With leases each
    /// process can run all of them: a partition then runs in one process at
    /// a time and fails over when that process dies. Leases are not
    /// balanced (a process takes every free one it asks for), so to spread
    /// the load, start each process's share first and the rest later, as
    /// standbys.
    ///
    /// The partitions share one read model, so:
    /// - `apply` must only touch rows of the event's stream (or commute), as
    ///   partitions commit concurrently;
    /// - a partitioned read model is never reset automatically. The layout
    ///   (version and partition count) is recorded under
    ///   `<name>#partitions`; a runner whose version or count differs from
    ///   it (or that finds the read model built unpartitioned) fails with a
    ///   [`StoreError::Incompatible`] naming the difference, and keeps
    ///   failing (retried with backoff in a worker) until an operator stops
    ///   the old runners and calls [`ProjectionRunner::rebuild`] on a runner
    ///   of the new layout.
    ///
    /// # Panics
    ///
    /// When `count` is 0 or `index >= count`.
    pub fn partition(mut self, index: u32, count: u32) -> Self {
        let partition = Partition::new(index, count);
        self.key = partition.key(self.projection.name());
        self.partition = Some(partition);
        self
    }

    /// The partition this runner runs, if any.
    pub fn get_partition(&self) -> Option<Partition> {
        self.partition
    }

    /// Sets the options.
    pub fn options(mut self, options: ProjectionOptions) -> Self {
        self.options = options;
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The read-model database.
    pub fn db(&self) -> &P::Db {
        &self.db
    }

    /// The event store it reads.
    pub fn store(&self) -> &S {
        &self.store
    }

    fn name(&self) -> String {
        self.key.clone()
    }

    fn store_error(&self, source: StoreError) -> SubscriberError {
        SubscriberError::Store {
            subscriber: self.name(),
            source,
        }
    }

    /// The row that records how the read model is split: its version is the
    /// read model's, its position the partition count (0: unpartitioned,
    /// [`REBUILDING`] while a rebuild is under way). Written only by runners
    /// that were partitioned once; a projection that never was has none.
    fn layout_key(&self) -> String {
        format!("{}#partitions", self.projection.name())
    }

    /// The partition count this runner records in the layout row.
    fn layout_count(&self) -> Position {
        Position(self.partition.map_or(0, |p| u64::from(p.count)))
    }

    fn layout_error(&self, reason: String) -> SubscriberError {
        self.store_error(StoreError::Incompatible {
            location: format!("the read model of projection `{}`", self.projection.name()),
            reason,
        })
    }

    /// Commits `position` for checkpoint `key` (no read-model writes),
    /// compared with `expected` when given.
    async fn commit_only(
        &self,
        key: String,
        expected: Option<Position>,
        position: Position,
        lease: Option<Lease>,
    ) -> Result<(), SubscriberError> {
        let commit = Commit {
            projection: key,
            version: self.projection.version(),
            position,
            expected,
            layout: None,
            lease,
            skipped: None,
        };
        self.checkpoint_only(commit).await
    }

    /// Runs `commit` with no read-model writes.
    async fn checkpoint_only(&self, commit: Commit) -> Result<(), SubscriberError> {
        let work = tx_work::<P::Db, (), _>(|_| Box::pin(async { Ok(()) }));
        self.db
            .transact(commit, work)
            .await
            .map_err(|e| self.store_error(e))?
            .map_err(|f| self.store_error(StoreError::Closed(f.error.to_string())))
    }

    /// Checks that the read model is laid out the way this runner runs it
    /// (see [`ProjectionRunner::partition`]); records the layout of a new
    /// partitioned projection. Returns the guard every commit of this run
    /// checks: the layout row as it is now.
    async fn check_layout(&self, lease: Option<Lease>) -> Result<LayoutGuard, SubscriberError> {
        self.check_layout_row(lease).await?;
        let state = self
            .db
            .load_state(&self.layout_key())
            .await
            .map_err(|e| self.store_error(e))?;
        Ok(LayoutGuard {
            key: self.layout_key(),
            state,
        })
    }

    async fn check_layout_row(&self, lease: Option<Lease>) -> Result<(), SubscriberError> {
        let layout = self
            .db
            .load_state(&self.layout_key())
            .await
            .map_err(|e| self.store_error(e))?;
        let version = self.projection.version();
        let count = self.layout_count();
        let describe = |l: &ProjectionState| match l.position {
            REBUILDING => "a rebuild that has not finished".to_owned(),
            Position(0) => format!("version {} unpartitioned", l.version),
            Position(n) => format!("version {} split into {n} partitions", l.version),
        };
        let fix = "stop the runners of the old layout, then call ProjectionRunner::rebuild on a runner of the new one";
        match (layout, self.partition) {
            (None, None) => Ok(()),
            // Unpartitioned: a version change is rebuilt as always.
            (Some(l), None) if l.position == count => Ok(()),
            // An unpartitioned runner holds the only lease: it finishes an
            // interrupted rebuild of its own layout itself.
            (Some(l), None) if l.position == REBUILDING => self.rebuild(lease).await,
            (Some(l), Some(_)) if l.position == count && l.version == version => Ok(()),
            (None, Some(p)) => {
                let unpartitioned = self
                    .db
                    .load_state(self.projection.name())
                    .await
                    .map_err(|e| self.store_error(e))?;
                if let Some(s) = unpartitioned {
                    return Err(self.layout_error(format!(
                        "it was built unpartitioned (version {}, checkpoint {}), this runner is partition {p} at version {version}; {fix}",
                        s.version, s.position
                    )));
                }
                // A new partitioned projection (if another partition
                // records it first, the run starts over and finds it).
                self.commit_only(self.layout_key(), Some(Position::ORIGIN), count, lease)
                    .await
            }
            (Some(l), _) => Err(self.layout_error(format!(
                "it holds {}, this runner is {} at version {version}; {fix}",
                describe(&l),
                match self.partition {
                    Some(p) => format!("partition {p}"),
                    None => "unpartitioned".to_owned(),
                }
            ))),
        }
    }

    /// Resets the read model (`reset`, then `setup`) and moves the
    /// checkpoint to the origin; the next run replays the whole log.
    ///
    /// For a partitioned runner, moves the checkpoints of every partition of
    /// its layout to the origin and records the layout (see
    /// [`ProjectionRunner::partition`]); stop every runner of the projection
    /// first. Interrupted, it leaves the layout marked as rebuilding (no
    /// runner starts) until it is called again.
    pub async fn rebuild(&self, lease: Option<Lease>) -> Result<(), SubscriberError> {
        let gated = self.partition.is_some()
            || self
                .db
                .load_state(&self.layout_key())
                .await
                .map_err(|e| self.store_error(e))?
                .is_some();
        if gated {
            self.commit_only(self.layout_key(), None, REBUILDING, lease.clone())
                .await?;
            if let Some(p) = self.partition {
                for index in 0..p.count {
                    let key = Partition::new(index, p.count).key(self.projection.name());
                    self.commit_only(key, None, Position::ORIGIN, lease.clone())
                        .await?;
                }
            }
        }
        self.reset_model(lease.clone()).await?;
        if gated {
            self.commit_only(self.layout_key(), None, self.layout_count(), lease)
                .await?;
        }
        Ok(())
    }

    /// `reset` and `setup` in one transaction that moves this runner's
    /// checkpoint to the origin.
    async fn reset_model(&self, lease: Option<Lease>) -> Result<(), SubscriberError> {
        let projection = self.projection.clone();
        // Unconditional: a rebuild takes the read model over on purpose;
        // runners that started before it fail their next commit.
        let commit = Commit {
            projection: self.name(),
            version: self.projection.version(),
            position: Position::ORIGIN,
            expected: None,
            layout: None,
            lease,
            skipped: None,
        };
        let work = tx_work::<P::Db, (), _>(move |tx| {
            Box::pin(
                async move {
                    projection.reset(tx).await?;
                    projection.setup(tx).await
                }
                .map(|r| r.map_err(|error| HandlerFailure { index: 0, error })),
            )
        });
        self.db
            .transact(commit, work)
            .await
            .map_err(|e| self.store_error(e))?
            .map_err(|f| SubscriberError::ReadModel {
                subscriber: self.name(),
                message: format!("the `reset` hook failed: {}", f.error),
            })
    }

    /// Prepares the read model and returns the position to continue after:
    /// runs `setup`, rebuilds on a version change, starts a new projection
    /// at its configured start.
    async fn prepare(&self, lease: Option<Lease>) -> Result<(Position, Fence), SubscriberError> {
        let layout = self.check_layout(lease.clone()).await?;
        let state = self
            .db
            .load_state(&self.key)
            .await
            .map_err(|e| self.store_error(e))?;
        let version = self.projection.version();
        let expected = state.map_or(Position::ORIGIN, |s| s.position);
        let position = match state {
            Some(s) if s.version == version => s.position,
            // A newer version's read model: never rebuilt back by an old
            // runner (two versions running at once would take turns).
            Some(s) if s.version > version => {
                return Err(self.layout_error(format!(
                    "checkpoint `{}` holds version {}, newer than this runner's version {version}; \
                     stop the runners of the old version",
                    self.key, s.version
                )));
            }
            // The layout matched: only a partition that was never rebuilt
            // to this version can be here; its rows are in the read model.
            Some(s) if self.partition.is_some() => {
                return Err(self.layout_error(format!(
                    "partition `{}` was applied with version {}, this runner is version {version}; \
                     stop the runners of the old version, then call ProjectionRunner::rebuild",
                    self.key, s.version
                )));
            }
            Some(s) => {
                tracing::info!(projection = %self.name(), from = s.version, to = version, "projection version changed; rebuilding");
                self.rebuild(lease.clone()).await?;
                // The rebuild wrote the layout row (if any): guard by it now.
                let layout = self.check_layout(lease.clone()).await?;
                return Ok((
                    Position::ORIGIN,
                    Fence {
                        lease,
                        layout: Some(layout),
                    },
                ));
            }
            None => self
                .options
                .subscription
                .start_from
                .resolve(&self.store)
                .await
                .map_err(|e| self.store_error(e))?,
        };
        let projection = self.projection.clone();
        let fence = Fence {
            lease,
            layout: Some(layout),
        };
        let commit = fence.commit(self.name(), version, expected, position);
        let work = tx_work::<P::Db, (), _>(move |tx| {
            Box::pin(async move {
                projection
                    .setup(tx)
                    .await
                    .map_err(|error| HandlerFailure { index: 0, error })
            })
        });
        self.db
            .transact(commit, work)
            .await
            .map_err(|e| self.store_error(e))?
            .map_err(|f| SubscriberError::ReadModel {
                subscriber: self.name(),
                message: format!("the `setup` hook failed: {}", f.error),
            })?;
        Ok((position, fence))
    }

    /// Runs until caught up with the head as of now, then returns the
    /// position reached. For tests, tools and examples; workers use `run`.
    pub async fn catch_up(&self) -> Result<Position, SubscriberError> {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let mut ctx = RunContext::standalone(&self.key, rx);
        engine::drive(self, &self.store, &mut ctx, true).await
    }

    /// Applies a page: decodes it, then commits it in transactions, retrying
    /// failures and applying the error policy to an event that keeps failing.
    async fn handle_page(
        &self,
        ctx: &mut RunContext,
        fence: &Fence,
        before: Position,
        page: &Page,
    ) -> Result<Handled, SubscriberError> {
        let mut rest: &[StoredEvent] = &page.events;
        let mut checkpoint_floor = before;
        while !rest.is_empty() {
            // Decode up to the first event that does not decode.
            let mut decoded = Vec::with_capacity(rest.len());
            let mut bad = None;
            for stored in rest {
                match stored.decode::<P::Event>() {
                    Ok(Some(event)) => decoded.push(event),
                    Ok(None) => {
                        bad = Some((
                            decoded.len(),
                            format!(
                                "event type `{}` is not one of this projection's",
                                stored.event_type
                            ),
                        ))
                    }
                    Err(e) => bad = Some((decoded.len(), e.message)),
                }
                if bad.is_some() {
                    break;
                }
            }
            let good = decoded.len();
            if good > 0 {
                let last = rest[good - 1].position;
                // The last chunk of the page may checkpoint through the page's end.
                let through = if bad.is_none() {
                    page.through.max(last)
                } else {
                    last
                };
                match self
                    .commit_events(ctx, fence, decoded, checkpoint_floor, through)
                    .await?
                {
                    Ok(()) => {
                        checkpoint_floor = through;
                        ctx.report(|s| s.handled += good as u64);
                    }
                    Err((index, error)) => bad = Some((index, error)),
                }
            }
            let Some((index, error)) = bad else { break };
            if ctx.stopping() {
                return Ok(Handled {
                    committed: checkpoint_floor,
                    through: checkpoint_floor,
                    interrupted: true,
                });
            }
            // `index` is relative to the committed chunk or the decoded
            // prefix; both start at `rest[0]`.
            let failed = &rest[index];
            // Events before the failing one (if the chunk rolled back) are
            // applied first, then the failing one is skipped or stops us.
            if index > 0 && checkpoint_floor < rest[index - 1].position {
                let prefix = rest[..index]
                    .iter()
                    .map(|e| {
                        e.decode_known::<P::Event>()
                            .map_err(|d| self.event_error(e, d.message))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let through = rest[index - 1].position;
                if let Err((i, e)) = self
                    .commit_events(ctx, fence, prefix, checkpoint_floor, through)
                    .await?
                {
                    return Err(self.event_error(&rest[i], e));
                }
                checkpoint_floor = through;
                ctx.report(|s| s.handled += index as u64);
            }
            match self.options.on_error {
                OnError::Stop => return Err(self.event_error(failed, error)),
                OnError::Skip => {
                    // Skipping the page's last event checkpoints through the
                    // page's end (past events of other types up to the head),
                    // as committing it would have.
                    let through = if index + 1 == rest.len() {
                        page.through.max(failed.position)
                    } else {
                        failed.position
                    };
                    self.skip(fence, failed, &error, checkpoint_floor, through)
                        .await?;
                    ctx.report(|s| s.skipped += 1);
                    checkpoint_floor = through;
                }
            }
            rest = &rest[index + 1..];
        }
        // Every chunk committed its checkpoint; the last one through the
        // page's end.
        Ok(Handled {
            committed: checkpoint_floor,
            through: checkpoint_floor,
            interrupted: false,
        })
    }

    /// Commits `events` with checkpoint `through`, retrying a handler
    /// failure with backoff. `Ok(Err((index, error)))` when it still fails.
    async fn commit_events(
        &self,
        ctx: &mut RunContext,
        fence: &Fence,
        events: Vec<Recorded<P::Event>>,
        from: Position,
        through: Position,
    ) -> Result<Result<(), (usize, String)>, SubscriberError> {
        let events = Arc::new(events);
        let mut delay = self.options.retry_delay;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let projection = self.projection.clone();
            let batch = events.clone();
            let limit = self.options.call_timeout;
            let commit = fence.commit(self.name(), self.projection.version(), from, through);
            let name = self.name().to_owned();
            let work = tx_work::<P::Db, (), _>(move |tx| {
                Box::pin(async move {
                    for (index, event) in batch.iter().enumerate() {
                        // A panicking handler fails on this event like an
                        // erring one (retried, then the error policy), rather
                        // than failing the whole write as if the store had.
                        let span = crate::trace::apply_span(
                            &name,
                            event.event.event_type(),
                            event.id,
                            &event.stream,
                            event.position,
                        );
                        let parent = event.metadata.trace.clone();
                        crate::trace::continue_in(
                            span,
                            parent,
                            guarded(limit, projection.apply(&mut *tx, event)),
                        )
                        .await
                        .map_err(|error| HandlerFailure { index, error })?;
                    }
                    Ok(())
                })
            });
            let started = Instant::now();
            match self.db.transact(commit, work).await {
                Err(e) => return Err(self.store_error(e)),
                Ok(Ok(())) => {
                    tracing::trace!(projection = %self.name(), events = events.len(), through = %through, elapsed = ?started.elapsed(), "batch committed");
                    return Ok(Ok(()));
                }
                // A handler failure while another writer committed these
                // events (e.g. a unique key the other's writes already
                // hold) is the lost race showing early: not the event's
                // fault, so neither retried nor counted against it.
                Ok(Err(_)) if self.moved_from(from).await? => {
                    return Err(self.store_error(StoreError::CheckpointMoved {
                        name: self.name(),
                        expected: format!(
                            "position {from} at version {}",
                            self.projection.version()
                        ),
                        found: Some("another writer's newer checkpoint".to_owned()),
                    }));
                }
                Ok(Err(failure)) if attempt >= self.options.attempts => {
                    return Ok(Err((failure.index, failure.error.to_string())));
                }
                Ok(Err(failure)) => {
                    let event = &events[failure.index];
                    tracing::warn!(
                        projection = %self.name(), attempt, position = %event.position,
                        stream = %event.stream, error = %failure.error, "projection handler failed; retrying"
                    );
                    tokio::select! {
                        _ = stopped(&mut ctx.shutdown) => return Ok(Err((failure.index, failure.error.to_string()))),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = delay.saturating_mul(2);
                }
            }
        }
    }

    /// Whether the stored checkpoint is no longer `from` at this version.
    async fn moved_from(&self, from: Position) -> Result<bool, SubscriberError> {
        let state = self
            .db
            .load_state(&self.key)
            .await
            .map_err(|e| self.store_error(e))?;
        Ok(match state {
            None => from != Position::ORIGIN,
            Some(s) => s.position != from || s.version != self.projection.version(),
        })
    }

    async fn skip(
        &self,
        fence: &Fence,
        event: &StoredEvent,
        error: &str,
        from: Position,
        through: Position,
    ) -> Result<(), SubscriberError> {
        tracing::warn!(
            projection = %self.name(), position = %event.position, stream = %event.stream,
            event_type = %event.event_type, error, "skipping event by policy"
        );
        let commit = Commit {
            skipped: Some(SkippedEvent {
                subscriber: self.name(),
                position: event.position,
                stream: event.stream.clone(),
                version: event.version,
                event_type: event.event_type.clone(),
                error: error.to_owned(),
                skipped_at: Utc::now(),
            }),
            ..fence.commit(self.name(), self.projection.version(), from, through)
        };
        self.checkpoint_only(commit).await
    }

    fn event_error(&self, event: &StoredEvent, message: String) -> SubscriberError {
        SubscriberError::Event {
            subscriber: self.name(),
            position: event.position,
            stream: event.stream.clone(),
            version: event.version,
            event_type: event.event_type.clone(),
            message,
        }
    }
}

#[async_trait]
impl<P: Projection, S: EventStore + Clone> Subscriber for ProjectionRunner<P, S> {
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
impl<P: Projection, S: EventStore + Clone> PageHandler for ProjectionRunner<P, S> {
    type Run = Fence;

    fn key(&self) -> &str {
        &self.key
    }

    fn subscription(&self) -> &SubscriptionOptions {
        &self.options.subscription
    }

    fn types(&self) -> Vec<&'static str> {
        P::Event::event_types().to_vec()
    }

    fn partition(&self) -> Option<Partition> {
        self.partition
    }

    async fn start(
        &self,
        ctx: &RunContext,
        _catch_up: bool,
    ) -> Result<(Position, Fence), SubscriberError> {
        self.prepare(ctx.lease.clone()).await
    }

    async fn handle(
        &self,
        ctx: &mut RunContext,
        fence: &mut Fence,
        saved: Position,
        page: &Page,
    ) -> Result<Handled, SubscriberError> {
        self.handle_page(ctx, fence, saved, page).await
    }

    async fn commit(
        &self,
        _ctx: &RunContext,
        fence: &mut Fence,
        from: Position,
        to: Position,
    ) -> Result<(), SubscriberError> {
        let commit = fence.commit(self.name(), self.projection.version(), from, to);
        self.checkpoint_only(commit).await
    }
}

/// A projection into something other than its checkpoint's database (a
/// search index, a cache, another service): at-least-once, so `handle` must
/// be idempotent (upsert keyed by event id or by the entity's version).
#[async_trait]
pub trait ExternalProjection: Send + Sync + 'static {
    /// The events it reads.
    type Event: Event;

    /// Stable name: the key of its checkpoint.
    fn name(&self) -> &str;

    /// Handles one event. May be called again for the same event after a
    /// crash.
    async fn handle(&self, event: &Recorded<Self::Event>) -> Result<(), HandlerError>;
}

/// When an [`ExternalRunner`] saves its checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After this many handled events...
    pub every_events: u64,
    /// ...or this much time, whichever comes first; and always on shutdown.
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_events: 500,
            every: Duration::from_secs(1),
        }
    }
}

/// Runs an [`ExternalProjection`] with its checkpoint in a [`CheckpointStore`].
pub struct ExternalRunner<P, S, C> {
    projection: P,
    store: S,
    checkpoints: C,
    options: ProjectionOptions,
    policy: CheckpointPolicy,
    partition: Option<Partition>,
    /// The checkpoint and lease key: the name, or `<name>#<i>of<n>`.
    key: String,
}

impl<P: ExternalProjection, S: EventStore + Clone, C: CheckpointStore> ExternalRunner<P, S, C> {
    /// A runner reading `store`, saving positions in `checkpoints`.
    pub fn new(projection: P, store: S, checkpoints: C) -> Self {
        let key = projection.name().to_owned();
        ExternalRunner {
            projection,
            store,
            checkpoints,
            options: ProjectionOptions::default(),
            policy: CheckpointPolicy::default(),
            partition: None,
            key,
        }
    }

    /// Runs only partition `index` of `count`: the events of the streams
    /// [`Partition::of`] puts there, in order per stream, with its own
    /// checkpoint and lease under `<name>#<index>of<count>` (also its name
    /// as a [`Subscriber`]). Changing `count` starts the new partitions at
    /// [`StartFrom`] (fresh keys): with the default `Origin`, the log is
    /// delivered again, which an idempotent handler absorbs.
    ///
    /// # Panics
    ///
    /// When `count` is 0 or `index >= count`.
    pub fn partition(mut self, index: u32, count: u32) -> Self {
        let partition = Partition::new(index, count);
        self.key = partition.key(self.projection.name());
        self.partition = Some(partition);
        self
    }

    /// Sets the options (`on_error: Skip` is not offered here: without a
    /// transaction there is no place to record a skip atomically, so a
    /// failing event always stops the runner).
    pub fn options(mut self, options: ProjectionOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets when checkpoints are saved.
    pub fn checkpoints_every(mut self, policy: CheckpointPolicy) -> Self {
        self.policy = policy;
        self
    }

    async fn handle_with_retries(
        &self,
        ctx: &mut RunContext,
        stored: &StoredEvent,
    ) -> Result<bool, SubscriberError> {
        let name = self.key.clone();
        let event_error = |message: String| SubscriberError::Event {
            subscriber: name.clone(),
            position: stored.position,
            stream: stored.stream.clone(),
            version: stored.version,
            event_type: stored.event_type.clone(),
            message,
        };
        let event = match stored.decode::<P::Event>() {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(true),
            Err(e) => return Err(event_error(e.message)),
        };
        let mut delay = self.options.retry_delay;
        // At least one attempt, whatever the options say.
        let attempts = self.options.attempts.max(1);
        for attempt in 1..=attempts {
            let handled = guarded(self.options.call_timeout, self.projection.handle(&event)).await;
            match handled {
                Ok(()) => return Ok(true),
                Err(e) if attempt == attempts => {
                    return Err(event_error(e.to_string()));
                }
                Err(e) => {
                    tracing::warn!(projection = %name, attempt, position = %stored.position, error = %e, "handler failed; retrying");
                    tokio::select! {
                        _ = stopped(&mut ctx.shutdown) => return Ok(false),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = delay.saturating_mul(2);
                }
            }
        }
        Ok(false)
    }
}

#[async_trait]
impl<P: ExternalProjection, S: EventStore + Clone, C: CheckpointStore> Subscriber
    for ExternalRunner<P, S, C>
{
    fn name(&self) -> &str {
        &self.key
    }

    /// Runs until shutdown; when a save finds that another writer moved the
    /// checkpoint (a lost race, e.g. a second process without leases), it
    /// re-reads the checkpoint and continues from there.
    async fn run(&self, ctx: &mut RunContext) -> Result<(), SubscriberError> {
        engine::drive(self, &self.store, ctx, false)
            .await
            .map(|_| ())
    }
}

/// What an [`ExternalRunner`] counts between checkpoint saves.
pub(crate) struct SinceSave {
    events: u64,
    at: Instant,
}

#[async_trait]
impl<P: ExternalProjection, S: EventStore + Clone, C: CheckpointStore> PageHandler
    for ExternalRunner<P, S, C>
{
    type Run = SinceSave;

    fn key(&self) -> &str {
        &self.key
    }

    fn subscription(&self) -> &SubscriptionOptions {
        &self.options.subscription
    }

    fn types(&self) -> Vec<&'static str> {
        P::Event::event_types().to_vec()
    }

    fn partition(&self) -> Option<Partition> {
        self.partition
    }

    async fn start(
        &self,
        ctx: &RunContext,
        _catch_up: bool,
    ) -> Result<(Position, SinceSave), SubscriberError> {
        let start = engine::resume_in(self, &self.checkpoints, &self.store, ctx).await?;
        let since = SinceSave {
            events: 0,
            at: Instant::now(),
        };
        Ok((start, since))
    }

    async fn handle(
        &self,
        ctx: &mut RunContext,
        since: &mut SinceSave,
        saved: Position,
        page: &Page,
    ) -> Result<Handled, SubscriberError> {
        let mut committed = saved;
        let mut handled = saved;
        for stored in &page.events {
            let span = crate::trace::apply_span(
                self.name(),
                &stored.event_type,
                stored.id,
                &stored.stream,
                stored.position,
            );
            let parent = stored.metadata.trace.clone();
            let outcome =
                crate::trace::continue_in(span, parent, self.handle_with_retries(ctx, stored))
                    .await;
            match outcome {
                Ok(true) => {}
                Ok(false) => return Ok(Handled::interrupted(committed, handled)),
                Err(e) => {
                    // Save what was handled before the failing event.
                    if handled > committed {
                        self.commit(ctx, since, committed, handled).await?;
                    }
                    return Err(e);
                }
            }
            handled = stored.position;
            since.events += 1;
            ctx.report(|s| s.handled += 1);
            // The policy counts handled events, not pages.
            if self.commit_due(since) {
                self.commit(ctx, since, committed, handled).await?;
                committed = handled;
            }
        }
        Ok(Handled {
            committed,
            through: page.through,
            interrupted: false,
        })
    }

    fn commit_due(&self, since: &mut SinceSave) -> bool {
        since.events >= self.policy.every_events || since.at.elapsed() >= self.policy.every
    }

    async fn commit(
        &self,
        ctx: &RunContext,
        since: &mut SinceSave,
        from: Position,
        to: Position,
    ) -> Result<(), SubscriberError> {
        engine::save_in(self, &self.checkpoints, ctx, from, to).await?;
        since.events = 0;
        since.at = Instant::now();
        Ok(())
    }
}
