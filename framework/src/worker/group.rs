//! A partitioned subscriber run by a group of workers: each worker runs the
//! partitions the group's assignment gives it (see
//! [`crate::subscription::group`] for the protocol and its guarantees).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{DynLeases, Subscriber, SubscriberState, SubscriberStatus, Supervisor};
use crate::subscription::{Holder, Partition, Shutdown, assign, group_name, stopped};

/// One subscriber split into partitions, to run on a group of workers with
/// [`Worker::add_partitioned`](super::Worker::add_partitioned). Build it with
/// [`Partitioned::new`] from a function that makes the runner of one
/// partition (every runner has a `.partition(index, count)` method), or with
/// the [`BackendWorker`](super::BackendWorker) shortcuts
/// (`partitioned_projection`, `partitioned_reactor`, `partitioned_process`).
///
/// ```
/// use aftermath::prelude::*;
/// use aftermath::worker::Partitioned;
/// # use aftermath::projection::HandlerError;
/// # use aftermath::store::sqlite::SqliteTx;
/// # #[derive(serde::Serialize, serde::Deserialize, aftermath::Event)] #[event(prefix = "ev")] enum Ev { A }
/// # struct Balances;
/// # impl Projection for Balances {
/// #     type Event = Ev; type Db = SqliteStore;
/// #     fn name(&self) -> &str { "balances" }
/// #     async fn reset(&self, _: &mut SqliteTx) -> Result<(), HandlerError> { Ok(()) }
/// #     async fn apply(&self, _: &mut SqliteTx, _: &Recorded<Ev>) -> Result<(), HandlerError> { Ok(()) }
/// # }
/// # fn demo(store: SqliteStore) {
/// let balances = Partitioned::new("balances", 16, |p| {
///     ProjectionRunner::new(Balances, store.clone(), store.clone()).partition(p.index, p.count)
/// });
/// assert_eq!(balances.group(), "balances#*of16");
/// let worker = Worker::new()
///     .with_leases(store.clone(), std::time::Duration::from_secs(10))
///     .add_partitioned(balances);
/// # }
/// ```
pub struct Partitioned {
    name: String,
    count: u32,
    partitions: Vec<Arc<dyn Subscriber>>,
}

impl Partitioned {
    /// Subscriber `name` split into `count` partitions, partition `p`'s
    /// runner made by `make(p)`. Each runner must be named
    /// [`Partition::key`] of `name` (`<name>#<index>of<count>`), as a
    /// runner's `.partition(index, count)` names it; [`Worker::start`]
    /// refuses a mismatch.
    ///
    /// [`Worker::start`]: super::Worker::start
    ///
    /// # Panics
    ///
    /// When `count` is 0.
    pub fn new<S: Subscriber>(
        name: impl Into<String>,
        count: u32,
        mut make: impl FnMut(Partition) -> S,
    ) -> Self {
        assert!(count >= 1, "a subscriber needs at least one partition");
        let partitions = (0..count)
            .map(|i| Arc::new(make(Partition::new(i, count))) as Arc<dyn Subscriber>)
            .collect();
        Partitioned {
            name: name.into(),
            count,
            partitions,
        }
    }

    /// The subscriber's name (without a partition).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many partitions it has.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Its consumer group: `<name>#*of<count>`.
    pub fn group(&self) -> String {
        group_name(&self.name, self.count)
    }

    pub(super) fn partitions(&self) -> &[Arc<dyn Subscriber>] {
        &self.partitions
    }
}

/// Runs a [`Partitioned`] subscriber as one member of its group: heartbeats,
/// starts the partitions assigned to this worker and stops the others.
pub(super) struct GroupSupervisor {
    pub group: String,
    pub count: u32,
    pub partitions: Vec<Arc<dyn Subscriber>>,
    pub statuses: Vec<Arc<Mutex<SubscriberStatus>>>,
    pub leases: DynLeases,
    pub ttl: Duration,
    pub holder: Holder,
    /// Makes the supervisor of one partition (lease, backoff, stall limit).
    pub supervise: Supervise,
}

/// Makes the supervisor of one partition from its runner and status.
pub(super) type Supervise =
    Arc<dyn Fn(Arc<dyn Subscriber>, Arc<Mutex<SubscriberStatus>>) -> Supervisor + Send + Sync>;

/// A partition running in this worker.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl GroupSupervisor {
    /// How often a member sends its heartbeat and looks at the assignment.
    fn period(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(10))
    }

    fn standby(&self, index: u32) {
        let mut status = self.statuses[index as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !matches!(status.state, SubscriberState::Stopped(Some(_))) {
            status.state = SubscriberState::Standby;
            status.updated_at = chrono::Utc::now();
        }
    }

    pub async fn run(self, mut stop: Shutdown) {
        let mut running: BTreeMap<u32, Running> = BTreeMap::new();
        // Partitions told to stop, finishing their batch and releasing.
        let mut leaving: Vec<(u32, JoinHandle<()>)> = Vec::new();
        let mut mine: Vec<u32> = Vec::new();
        loop {
            match self
                .leases
                .heartbeat(&self.group, &self.holder, self.ttl)
                .await
            {
                Ok(members) => {
                    let assigned = assign(self.count, &members, &self.holder.instance);
                    if assigned != mine {
                        tracing::info!(group = %self.group, owner = %self.holder.owner, instance = %self.holder.instance, members = members.len(), partitions = ?assigned, "group assignment changed");
                        metrics::gauge!(crate::trace::GROUP_PARTITIONS, "group" => self.group.clone())
                            .set(assigned.len() as f64);
                        mine = assigned;
                    }
                }
                // Keep what runs: each partition's lease fences it, and
                // the others reassign once this membership expires.
                Err(e) => {
                    tracing::warn!(group = %self.group, error = %e, "group heartbeat failed; retrying")
                }
            }
            // Stop what is no longer ours: the batch in flight commits, then
            // the lease is released for the new assignee.
            let gone: Vec<u32> = running
                .keys()
                .copied()
                .filter(|p| !mine.contains(p))
                .collect();
            for index in gone {
                if let Some(run) = running.remove(&index) {
                    let _ = run.stop.send(true);
                    leaving.push((index, run.task));
                }
            }
            let mut still_leaving = Vec::new();
            for (index, task) in leaving {
                if task.is_finished() {
                    let _ = task.await;
                    if !running.contains_key(&index) {
                        self.standby(index);
                    }
                } else {
                    still_leaving.push((index, task));
                }
            }
            leaving = still_leaving;
            // Start what is ours (once its previous run here has stopped).
            for &index in &mine {
                if running.contains_key(&index) || leaving.iter().any(|(i, _)| *i == index) {
                    continue;
                }
                let (stop_tx, stop_rx) = watch::channel(false);
                let supervisor = (self.supervise)(
                    self.partitions[index as usize].clone(),
                    self.statuses[index as usize].clone(),
                );
                let task = tokio::spawn(supervisor.run(stop_rx));
                running.insert(
                    index,
                    Running {
                        stop: stop_tx,
                        task,
                    },
                );
            }
            for index in 0..self.count {
                if !mine.contains(&index) && !leaving.iter().any(|(i, _)| *i == index) {
                    self.standby(index);
                }
            }
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = tokio::time::sleep(self.period()) => {}
            }
        }
        // Graceful leave: the others reassign at their next heartbeat, and
        // take each partition over as soon as its lease is released here.
        if let Err(e) = self.leases.leave(&self.group, &self.holder).await {
            tracing::warn!(group = %self.group, error = %e, "leaving the group failed; the membership will expire");
        }
        for run in running.values() {
            let _ = run.stop.send(true);
        }
        for (_, run) in running {
            let _ = run.task.await;
        }
        for (_, task) in leaving {
            let _ = task.await;
        }
    }
}
