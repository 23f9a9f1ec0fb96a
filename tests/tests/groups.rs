//! Consumer groups (issue 16): the membership contract of every lease store,
//! and workers in one process sharing a partitioned projection fairly as
//! they join and leave, with the read model exact at the end.
//!
//! The multi-process runs (SIGKILLs, sagas, reactors) are in
//! `groups_multiprocess.rs`. The PostgreSQL tests run when
//! `AFTERMATH_PG_URL` is set and print a SKIPPED line otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use aftermath::admin::Admin;
use aftermath::projection::{ProjectionOptions, ProjectionRunner};
use aftermath::subscription::{Holder, LeaseStore, MemoryLeases, Partition, assign};
use aftermath::worker::{Partitioned, RunningWorker, SubscriberState, Worker};
use aftermath::{EventStore, SqliteStore};
use aftermath_tests::postgres::{PgBalances, fresh};
use aftermath_tests::projections::{Balances, append_accounts, expected_all};

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The membership contract.

/// A heartbeat joins and returns the live members (ordered by instance);
/// leave removes at once; a member that stops heart-beating expires after
/// its ttl; a member rejoining after it expired has a new join time.
async fn membership<L: LeaseStore>(leases: &L) {
    let ttl = Duration::from_millis(600);
    let (a, b) = (Holder::new("host-a"), Holder::new("host-b"));
    let group = "bal#*of4";
    let one = leases.heartbeat(group, &a, ttl).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(
        (one[0].instance.as_str(), one[0].owner.as_str()),
        (a.instance.as_str(), "host-a")
    );
    assert_eq!(one[0].group, group);
    assert!(one[0].expires_at > one[0].joined_at);
    let two = leases.heartbeat(group, &b, ttl).await.unwrap();
    let mut ids = vec![a.instance.clone(), b.instance.clone()];
    ids.sort();
    assert_eq!(
        two.iter().map(|m| m.instance.clone()).collect::<Vec<_>>(),
        ids
    );
    // Other groups are other groups.
    let other = leases.heartbeat("other#*of2", &a, ttl).await.unwrap();
    assert_eq!(other.len(), 1);
    // A second heartbeat keeps the join time.
    let again = leases.heartbeat(group, &a, ttl).await.unwrap();
    let a_row = again.iter().find(|m| m.instance == a.instance).unwrap();
    assert_eq!(a_row.joined_at, one[0].joined_at);
    // Everyone's, for operators.
    let all = leases.members().await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    // Leave: gone at once for the others.
    leases.leave(group, &b).await.unwrap();
    let after = leases.heartbeat(group, &a, ttl).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].instance, a.instance);
    leases.leave(group, &b).await.unwrap(); // not a member: no error
    // Expiry: b beats once more, then stops; a keeps beating.
    leases.heartbeat(group, &b, ttl).await.unwrap();
    let seen = leases.heartbeat(group, &a, ttl).await.unwrap();
    assert_eq!(seen.len(), 2);
    tokio::time::sleep(ttl / 2).await;
    leases.heartbeat(group, &a, ttl).await.unwrap();
    tokio::time::sleep(ttl / 2 + Duration::from_millis(200)).await;
    let alone = leases.heartbeat(group, &a, ttl).await.unwrap();
    assert_eq!(
        alone.iter().map(|m| m.instance.clone()).collect::<Vec<_>>(),
        vec![a.instance.clone()],
        "b's membership expired"
    );
    // b rejoins: a new join time.
    let back = leases.heartbeat(group, &b, ttl).await.unwrap();
    let b_row = back.iter().find(|m| m.instance == b.instance).unwrap();
    assert!(b_row.joined_at > one[0].joined_at);
}

#[tokio::test]
async fn membership_memory() {
    membership(&MemoryLeases::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    membership(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_postgres() {
    let Some((_guard, store)) = fresh("membership_postgres").await else {
        return;
    };
    membership(&store).await;
}

// ---------------------------------------------------------------------------
// Workers in one process share a partitioned projection.

const COUNT: u32 = 8;
const TTL: Duration = Duration::from_millis(900);

/// Which live worker (by its index in `workers`) holds each partition's
/// lease now, by the store's lease table.
async fn holders<A: Admin>(store: &A, workers: &[Option<RunningWorker>]) -> BTreeMap<u32, usize> {
    let now = chrono::Utc::now();
    let mut found = BTreeMap::new();
    for row in store.leases().await.unwrap() {
        if row.expires_at <= now {
            continue;
        }
        for index in 0..COUNT {
            if row.name == Partition::new(index, COUNT).key("bal")
                && let Some(w) = workers
                    .iter()
                    .position(|w| w.as_ref().is_some_and(|w| w.instance() == row.instance))
            {
                found.insert(index, w);
            }
        }
    }
    found
}

/// Partitions running (not standing by) in each live worker, by status.
fn running(workers: &[Option<RunningWorker>]) -> Vec<usize> {
    workers
        .iter()
        .flatten()
        .map(|w| {
            (0..COUNT)
                .filter(|i| {
                    let key = Partition::new(*i, COUNT).key("bal");
                    matches!(
                        w.status_of(&key).unwrap().state,
                        SubscriberState::Live | SubscriberState::CatchingUp
                    )
                })
                .count()
        })
        .collect()
}

/// Waits until every partition's lease is held by a live worker, each
/// holding `COUNT / n` or one more, and the statuses agree.
async fn balanced<A: Admin>(store: &A, workers: &[Option<RunningWorker>], what: &str) {
    let live = workers.iter().flatten().count();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let held = holders(store, workers).await;
        let mut per = vec![0usize; workers.len()];
        for w in held.values() {
            per[*w] += 1;
        }
        let per: Vec<usize> = per
            .into_iter()
            .enumerate()
            .filter(|(i, _)| workers[*i].is_some())
            .map(|(_, n)| n)
            .collect();
        let run = running(workers);
        let fair = |n: &usize| *n == COUNT as usize / live || *n == COUNT as usize / live + 1;
        if held.len() == COUNT as usize && per.iter().all(fair) && run == per {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not balanced within {WAIT:?}: holders {held:?}, running {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every partition that a live worker runs has handled the log
/// up to `head`.
async fn settled(workers: &[Option<RunningWorker>], head: aftermath::Position) {
    for w in workers.iter().flatten() {
        for i in 0..COUNT {
            let key = Partition::new(i, COUNT).key("bal");
            if matches!(
                w.status_of(&key).unwrap().state,
                SubscriberState::Live | SubscriberState::CatchingUp
            ) {
                w.settled(&key, head, WAIT).await.unwrap();
            }
        }
    }
}

fn options() -> ProjectionOptions {
    ProjectionOptions::default()
        .batch_size(40)
        .poll_interval(Duration::from_millis(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_partitions_fairly_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    append_accounts(&store, 0, 2_000, 4, 60).await;
    let start = |tag: String| {
        let s = store.clone();
        let group = Partitioned::new("bal", COUNT, move |p| {
            ProjectionRunner::new(Balances::new("bal", &tag), s.clone(), s.clone())
                .options(options())
                .partition(p.index, p.count)
        });
        Worker::new()
            .owner("host")
            .with_leases(store.clone(), TTL)
            .standby_poll(Duration::from_millis(30))
            .add_partitioned(group)
            .start()
            .expect("starts")
    };
    let mut workers: Vec<Option<RunningWorker>> = vec![Some(start("w0".into()))];
    balanced(&store, &workers, "one worker").await;
    let mut k = 2_000;
    for n in 1..3 {
        workers.push(Some(start(format!("w{n}"))));
        append_accounts(&store, k, 500, 4, 60).await;
        k += 500;
        balanced(&store, &workers, &format!("{} workers", n + 1)).await;
    }
    // 8 over 3: 3, 3, 2.
    let mut sizes: Vec<usize> =
        holders(&store, &workers)
            .await
            .values()
            .fold(vec![0; 3], |mut v, w| {
                v[*w] += 1;
                v
            });
    sizes.sort();
    assert_eq!(sizes, [2, 3, 3]);
    // One leaves gracefully: the other two take its partitions over at
    // their next heartbeat, well before its membership would expire.
    let leaving = workers[1].take().unwrap();
    leaving.shutdown().await;
    // Left the group at once: the others need not wait for its
    // membership to expire.
    assert_eq!(
        store.members().await.unwrap().len(),
        2,
        "the leaver's row is gone"
    );
    append_accounts(&store, k, 500, 4, 60).await;
    balanced(&store, &workers, "after a graceful leave").await;
    let head = store.head().await.unwrap();
    settled(&workers, head).await;
    let model = aftermath_tests::projections::read_model(&store, "bal").await;
    assert_eq!(
        model,
        expected_all(&store).await,
        "every event applied exactly once"
    );
    for w in workers.into_iter().flatten() {
        w.shutdown().await;
    }
    // Left: no members remain.
    assert!(store.members().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_partitions_fairly_postgres() {
    let Some((_guard, store)) = fresh("workers_share_partitions_fairly_postgres").await else {
        return;
    };
    append_accounts(&store, 0, 2_000, 4, 60).await;
    let schema = store.schema().to_owned();
    // Separate handles, as separate processes would have (each its own
    // presence session).
    let url = aftermath_tests::postgres::url().unwrap();
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(aftermath_tests::postgres::connect(&url, &schema).await);
    }
    let start = |s: aftermath::PostgresStore, tag: String| {
        let schema = schema.clone();
        let leases = s.clone();
        let group = Partitioned::new("bal", COUNT, move |p| {
            ProjectionRunner::new(PgBalances::new(&schema, "bal", &tag), s.clone(), s.clone())
                .options(options())
                .partition(p.index, p.count)
        });
        Worker::new()
            .with_leases(leases, TTL)
            .standby_poll(Duration::from_millis(30))
            .add_partitioned(group)
            .start()
            .expect("starts")
    };
    let mut workers: Vec<Option<RunningWorker>> = Vec::new();
    for (n, h) in handles.iter().enumerate() {
        workers.push(Some(start(h.clone(), format!("w{n}"))));
        balanced(&store, &workers, &format!("{} workers", n + 1)).await;
    }
    let leaving = workers[0].take().unwrap();
    leaving.shutdown().await;
    append_accounts(&store, 2_000, 500, 4, 60).await;
    balanced(&store, &workers, "after a graceful leave").await;
    let head = store.head().await.unwrap();
    settled(&workers, head).await;
    let model = aftermath_tests::postgres::read_model(&store, "bal").await;
    assert_eq!(
        model,
        expected_all(&store).await,
        "every event applied exactly once"
    );
    for w in workers.into_iter().flatten() {
        w.shutdown().await;
    }
}

/// The assignment the protocol computes is what the workers end up with.
#[test]
fn assignment_is_contiguous_ranges() {
    let m = |id: &str| aftermath::subscription::Member {
        group: "g".into(),
        owner: "o".into(),
        instance: id.into(),
        joined_at: chrono::Utc::now(),
        expires_at: chrono::Utc::now(),
    };
    let members = [m("x"), m("y")];
    assert_eq!(assign(COUNT, &members, "x"), (0..4).collect::<Vec<_>>());
    assert_eq!(assign(COUNT, &members, "y"), (4..8).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------
// A per-process limit on a partitioned reactor's effects.

/// Counts the effects in flight and the most seen at once.
#[derive(Clone, Default)]
struct Slow {
    now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl aftermath::reactor::Reactor for Slow {
    type Event = aftermath_tests::domain::AccountEvent;
    fn name(&self) -> &str {
        "slow"
    }
    async fn react(
        &self,
        _: &aftermath::Recorded<Self::Event>,
        _: &aftermath::reactor::EffectContext,
    ) -> Result<(), aftermath::reactor::ReactError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        tokio::time::sleep(Duration::from_millis(15)).await;
        self.now.fetch_sub(1, SeqCst);
        self.done.fetch_add(1, SeqCst);
        Ok(())
    }
}

/// The most effects in flight at once while a worker runs 4 partitions of
/// `Slow` with `options` over 80 events in 40 streams.
async fn most_in_flight(options: aftermath::reactor::ReactorOptions) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    append_accounts(&store, 0, 80, 1, 40).await;
    let slow = Slow::default();
    let worker = Worker::on(store.clone())
        .partitioned_reactor(slow.clone(), 4, options)
        .start()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while slow.done.load(std::sync::atomic::Ordering::SeqCst) < 80 {
        assert!(
            std::time::Instant::now() < deadline,
            "effects not done in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.shutdown().await;
    slow.most.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_process_limit_caps_effects_over_all_partitions() {
    use aftermath::reactor::ReactorOptions;
    // Concurrency is per partition: 4 partitions run up to 4 × 4.
    let unlimited = most_in_flight(ReactorOptions::default().concurrency(4)).await;
    assert!(unlimited > 2, "partitions run in parallel: {unlimited}");
    // The process-wide limit holds over the 4 partitions.
    let limited = most_in_flight(
        ReactorOptions::default()
            .concurrency(4)
            .per_process_limit(2),
    )
    .await;
    assert_eq!(limited, 2, "at most 2 at once, and the 2 are used");
}

/// A partition's runner not named after its partition would keep its
/// checkpoint and lease under another key: the worker refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_runner_named_otherwise_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    let s = store.clone();
    // Forgot `.partition(p.index, p.count)`: every runner is `bal`.
    let group = Partitioned::new("bal", 2, move |_| {
        ProjectionRunner::new(Balances::new("bal", "w"), s.clone(), s.clone())
    });
    match Worker::new().add_partitioned(group).start() {
        Err(aftermath::worker::WorkerError::PartitionName {
            group,
            expected,
            found,
        }) => {
            assert_eq!(
                (group.as_str(), expected.as_str(), found.as_str()),
                ("bal#*of2", "bal#0of2", "bal")
            );
        }
        Err(other) => panic!("expected PartitionName, got {other}"),
        Ok(_) => panic!("started partitions named after nothing"),
    }
}
