//! One bound for "a store that can do everything", and a worker builder that
//! takes it once.

use std::time::Duration;

use super::{Partitioned, RunningWorker, Subscriber, Worker, WorkerError};
use crate::process::{CommandBus, DeadlineStore, ProcessManager, ProcessOptions, ProcessRunner};
use crate::projection::{Projection, ProjectionOptions, ProjectionRunner, ReadModelDb};
use crate::reactor::{EffectJournal, Reactor, ReactorOptions, ReactorRunner};
use crate::store::EventStore;
use crate::subscription::{CheckpointStore, LeaseStore};

/// A store that holds everything: events, read models with their
/// checkpoints, the reactors' effect journal, checkpoints of other
/// subscribers, deadlines and leases. `SqliteStore` and `PostgresStore` are
/// one; so is any type with all the traits (blanket implementation).
///
/// Use it as the one bound of code that wires projections, reactors and
/// processes onto a store, instead of listing the seven traits:
///
/// ```
/// use aftermath::prelude::*;
///
/// fn wire<S: Backend>(store: S) -> BackendWorker<S> {
///     Worker::on(store) // .projection(..).reactor(..).process(..)
/// }
/// # let _ = wire::<aftermath::SqliteStore>;
/// ```
pub trait Backend:
    EventStore + ReadModelDb + EffectJournal + CheckpointStore + DeadlineStore + LeaseStore + Clone
{
}

impl<T> Backend for T where
    T: EventStore
        + ReadModelDb
        + EffectJournal
        + CheckpointStore
        + DeadlineStore
        + LeaseStore
        + Clone
{
}

/// A [`Worker`] being built on one [`Backend`]: each subscriber added
/// through it gets the store in every role (event source, read-model
/// database, journal, checkpoints, deadlines). Built by [`Worker::on`].
///
/// ```no_run
/// # async fn demo(store: aftermath::SqliteStore) {
/// use aftermath::prelude::*;
/// use std::time::Duration;
///
/// let worker = Worker::on(store)
///     .leased(Duration::from_secs(10))
///     // .projection(Balances).reactor(ConfirmationMail).process(Fulfillment, bus)
///     .start()
///     .expect("subscriber names are unique");
/// worker.shutdown().await;
/// # }
/// ```
pub struct BackendWorker<S> {
    worker: Worker,
    store: S,
}

impl Worker {
    /// A worker whose subscribers all run on `store` (see [`BackendWorker`]).
    pub fn on<S: Backend>(store: S) -> BackendWorker<S> {
        BackendWorker {
            worker: Worker::new(),
            store,
        }
    }
}

impl<S: Backend> BackendWorker<S> {
    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs each subscriber only while holding its lease in the store
    /// (see [`Worker::with_leases`]).
    pub fn leased(mut self, ttl: Duration) -> Self {
        self.worker = self.worker.with_leases(self.store.clone(), ttl);
        self
    }

    /// Changes the worker's other settings (owner name, backoff, stall
    /// limit, ...).
    pub fn configure(mut self, f: impl FnOnce(Worker) -> Worker) -> Self {
        self.worker = f(self.worker);
        self
    }

    /// Adds a projection whose read model lives in the store.
    pub fn projection<P: Projection<Db = S>>(self, projection: P) -> Self {
        self.projection_with(projection, ProjectionOptions::default())
    }

    /// Adds a projection with options.
    pub fn projection_with<P: Projection<Db = S>>(
        self,
        projection: P,
        options: ProjectionOptions,
    ) -> Self {
        let runner = ProjectionRunner::new(projection, self.store.clone(), self.store.clone())
            .options(options);
        self.add_subscriber(runner)
    }

    /// Adds a reactor, journaled and checkpointed in the store.
    pub fn reactor<R: Reactor>(self, reactor: R) -> Self {
        self.reactor_with(reactor, ReactorOptions::default())
    }

    /// Adds a reactor with options.
    pub fn reactor_with<R: Reactor>(self, reactor: R, options: ReactorOptions) -> Self {
        let store = self.store.clone();
        let runner =
            ReactorRunner::new(reactor, store.clone(), store.clone(), store).options(options);
        self.add_subscriber(runner)
    }

    /// Adds a process manager sending its commands through `bus`, its
    /// deadlines and checkpoint in the store, on the system clock. For a
    /// virtual clock or options, build the [`ProcessRunner`] yourself and use
    /// [`BackendWorker::add_subscriber`].
    pub fn process<P: ProcessManager>(self, process: P, bus: CommandBus) -> Self {
        let store = self.store.clone();
        let runner = ProcessRunner::new(process, store.clone(), bus, store.clone(), store);
        self.add_subscriber(runner)
    }

    /// Adds a projection split into `count` partitions that the workers of
    /// its group share (see [`Worker::add_partitioned`]); the read model is
    /// one, the partitions commit to it in parallel. See
    /// [`ProjectionRunner::partition`] for what a layout change means.
    pub fn partitioned_projection<P: Projection<Db = S> + Clone>(
        self,
        projection: P,
        count: u32,
        options: ProjectionOptions,
    ) -> Self {
        let store = self.store.clone();
        let name = projection.name().to_owned();
        let group = Partitioned::new(name, count, |p| {
            ProjectionRunner::new(projection.clone(), store.clone(), store.clone())
                .options(options.clone())
                .partition(p.index, p.count)
        });
        self.add_partitioned(group)
    }

    /// Adds a reactor split into `count` partitions that the workers of its
    /// group share (see [`Worker::add_partitioned`]): the effects of a
    /// stream stay in order, in one partition.
    pub fn partitioned_reactor<R: Reactor + Clone>(
        self,
        reactor: R,
        count: u32,
        options: ReactorOptions,
    ) -> Self {
        let store = self.store.clone();
        let name = reactor.name().to_owned();
        let group = Partitioned::new(name, count, |p| {
            ReactorRunner::new(reactor.clone(), store.clone(), store.clone(), store.clone())
                .options(options.clone())
                .partition(p.index, p.count)
        });
        self.add_partitioned(group)
    }

    /// Adds a process manager whose instances are split into `count`
    /// partitions (by their stream's hash) that the workers of its group
    /// share (see [`ProcessRunner::partition`] and
    /// [`Worker::add_partitioned`]).
    pub fn partitioned_process<P: ProcessManager + Clone>(
        self,
        process: P,
        bus: CommandBus,
        count: u32,
        options: ProcessOptions,
    ) -> Self {
        let store = self.store.clone();
        let group = Partitioned::new(P::NAME, count, |p| {
            ProcessRunner::new(
                process.clone(),
                store.clone(),
                bus.clone(),
                store.clone(),
                store.clone(),
            )
            .options(options.clone())
            .partition(p.index, p.count)
        });
        self.add_partitioned(group)
    }

    /// Adds a partitioned subscriber built by hand (see
    /// [`Worker::add_partitioned`]).
    pub fn add_partitioned(mut self, subscriber: Partitioned) -> Self {
        self.worker = self.worker.add_partitioned(subscriber);
        self
    }

    /// Adds any subscriber (a runner built with its own options, partition
    /// or stores).
    pub fn add_subscriber(mut self, subscriber: impl Subscriber) -> Self {
        self.worker = self.worker.add_subscriber(subscriber);
        self
    }

    /// The worker, to finish building it by hand.
    pub fn into_worker(self) -> Worker {
        self.worker
    }

    /// Starts it (see [`Worker::start`]).
    pub fn start(self) -> Result<RunningWorker, WorkerError> {
        self.worker.start()
    }
}
