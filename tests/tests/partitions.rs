//! Partitioned subscribers, in one process, on every backend (memory,
//! SQLite, and PostgreSQL when `AFTERMATH_PG_URL` is set): partitions of one
//! subscriber cover every event exactly once, each stream in the one
//! partition `Partition::of` names, in order; each partition checkpoints
//! (under `<name>#<i>of<n>`) up to the head; partitioned projections build
//! the same read model as an unpartitioned one and refuse a read model laid
//! out otherwise until it is rebuilt; partitioned reactors keep the journal
//! (and its dead letters) under the reactor's name.
//!
//! The store-level contract (`read_all_partition`) is in the conformance
//! suite; the multi-process takeover in `postgres_partitions_multiprocess.rs`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aftermath::projection::{
    ExternalProjection, ExternalRunner, HandlerError, Projection, ProjectionOptions,
    ProjectionRunner, ReadModelDb,
};
use aftermath::reactor::{
    EffectContext, EffectJournal, EffectState, MemoryJournal, ReactError, Reactor, ReactorOptions,
    ReactorRunner,
};
use aftermath::subscription::{
    CheckpointStore, LeaseStore, MemoryCheckpoints, MemoryLeases, Partition,
};
use aftermath::worker::{RunningWorker, SubscriberError, SubscriberState, Worker};
use aftermath::{EventStore, MemoryStore, Position, Recorded, SqliteStore, StoreError};
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::projections::{
    Balances, Model, append_accounts, expected_all, read_applied_by, read_model, until,
};
use aftermath_tests::reactors::account_events;

const WAIT: Duration = Duration::from_secs(20);
const COUNT: u32 = 4;

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .expect("open store");
    (dir, store)
}

macro_rules! postgres_or_skip {
    ($test:literal) => {
        match aftermath_tests::postgres::fresh($test).await {
            Some(fresh) => fresh,
            None => return,
        }
    };
}

fn options(batch: usize) -> ProjectionOptions {
    ProjectionOptions::default()
        .batch_size(batch)
        .poll_interval(Duration::from_millis(20))
}

/// Waits until every partition `<name>#<i>of4` of `worker` is live at `head`.
async fn all_live(worker: &RunningWorker, name: &str, head: Position) {
    until(
        &format!("every partition of `{name}` live at {head}"),
        WAIT,
        || {
            (0..COUNT)
                .all(|i| {
                    let s = worker
                        .status_of(&Partition::new(i, COUNT).key(name))
                        .expect("registered");
                    s.state == SubscriberState::Live && s.lag.position >= head
                })
                .then_some(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// External projections: coverage, order, checkpoints.
// ---------------------------------------------------------------------------

/// What each partition's runner handled, in order: (stream, version,
/// position) per partition index.
#[derive(Clone, Default)]
struct Handled(Arc<Mutex<BTreeMap<u32, Vec<HandledEvent>>>>);

/// (stream, version, position) of a handled event.
type HandledEvent = (String, u64, Position);

struct Recorder {
    index: u32,
    handled: Handled,
}

#[async_trait::async_trait]
impl ExternalProjection for Recorder {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        "ext"
    }
    async fn handle(&self, event: &Recorded<AccountEvent>) -> Result<(), HandlerError> {
        self.handled
            .0
            .lock()
            .unwrap()
            .entry(self.index)
            .or_default()
            .push((event.stream.clone(), event.version, event.position));
        Ok(())
    }
}

/// Four partitions of one external projection in a worker (with leases),
/// fed before and while they run: every account event handled exactly once,
/// by the partition of its stream, in position order; every partition's
/// checkpoint reaches the head (past the other partitions' events).
/// (`leases` must be the checkpoints' database: saves are fenced by them.)
async fn external_partitions_cover_the_log<S, C, L>(store: S, checkpoints: C, leases: L)
where
    S: EventStore + Clone,
    C: CheckpointStore + Clone,
    L: LeaseStore,
{
    append_accounts(&store, 0, 400, 3, 13).await;
    let handled = Handled::default();
    let mut worker = Worker::new().with_leases(leases, Duration::from_secs(10));
    for index in 0..COUNT {
        worker = worker.add_subscriber(
            ExternalRunner::new(
                Recorder {
                    index,
                    handled: handled.clone(),
                },
                store.clone(),
                checkpoints.clone(),
            )
            .options(options(16))
            .partition(index, COUNT),
        );
    }
    let worker = worker.start().expect("unique subscriber names");
    let names: Vec<String> = worker.status().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["ext#0of4", "ext#1of4", "ext#2of4", "ext#3of4"]);
    append_accounts(&store, 400, 200, 2, 13).await;
    let head = store.head().await.unwrap();
    all_live(&worker, "ext", head).await;
    worker.shutdown().await;

    let events = account_events(&store).await;
    assert_eq!(events.len(), 600);
    let handled = handled.0.lock().unwrap().clone();
    let mut seen: HashMap<Position, u32> = HashMap::new();
    for (index, list) in &handled {
        assert!(!list.is_empty(), "partition {index} got work");
        assert!(
            list.windows(2).all(|w| w[0].2 < w[1].2),
            "partition {index} handled in $all order"
        );
        for (stream, _, position) in list {
            assert_eq!(Partition::of(stream, COUNT), *index, "{stream}");
            assert!(seen.insert(*position, *index).is_none(), "{position} twice");
        }
    }
    for e in &events {
        assert!(
            seen.contains_key(&e.position),
            "{} v{} missed",
            e.stream,
            e.version
        );
    }
    for index in 0..COUNT {
        let key = Partition::new(index, COUNT).key("ext");
        assert_eq!(
            checkpoints.load_checkpoint(&key).await.unwrap(),
            Some(head),
            "{key}"
        );
    }
    assert_eq!(checkpoints.load_checkpoint("ext").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_partitions_cover_the_log_memory() {
    let leases = MemoryLeases::new();
    external_partitions_cover_the_log(
        MemoryStore::new(),
        MemoryCheckpoints::fenced_by(leases.clone()),
        leases,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_partitions_cover_the_log_sqlite() {
    let (_dir, store) = sqlite().await;
    external_partitions_cover_the_log(store.clone(), store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_partitions_cover_the_log_postgres() {
    let (_guard, store) = postgres_or_skip!("external_partitions_cover_the_log");
    external_partitions_cover_the_log(store.clone(), store.clone(), store).await;
}

// ---------------------------------------------------------------------------
// Projections: the same read model, and the layout guard.
// ---------------------------------------------------------------------------

/// A partitioned projection's read model equals the unpartitioned one; a
/// runner of another layout (unpartitioned, another count, another version)
/// refuses to start with `Incompatible` until `rebuild` on a runner of the
/// new layout resets the read model and every partition's checkpoint.
async fn partitioned_projection<S, P, F, M, Fut>(store: S, make: F, model: M)
where
    S: EventStore + ReadModelDb + LeaseStore + Clone,
    P: Projection<Db = S>,
    F: Fn(&str, u32) -> P,
    M: Fn() -> Fut,
    Fut: Future<Output = (Model, Vec<(u64, String)>)>,
{
    let runner = |tag: &str, version: u32, partition: Option<(u32, u32)>| {
        let runner = ProjectionRunner::new(make(tag, version), store.clone(), store.clone())
            .options(options(32));
        match partition {
            Some((i, n)) => runner.partition(i, n),
            None => runner,
        }
    };
    append_accounts(&store, 0, 300, 3, 11).await;
    let mut worker = Worker::new().with_leases(store.clone(), Duration::from_secs(10));
    for index in 0..COUNT {
        worker = worker.add_subscriber(runner("p", 1, Some((index, COUNT))));
    }
    let worker = worker.start().expect("unique subscriber names");
    let head = append_accounts(&store, 300, 100, 2, 11).await;
    all_live(&worker, "bal", head).await;
    worker.shutdown().await;
    let (got, _) = model().await;
    assert_eq!(got, expected_all(&store).await, "every event exactly once");
    for index in 0..COUNT {
        let key = Partition::new(index, COUNT).key("bal");
        let state = store.load_state(&key).await.unwrap().unwrap();
        assert_eq!((state.version, state.position), (1, head), "{key}");
    }
    let layout = store.load_state("bal#partitions").await.unwrap().unwrap();
    assert_eq!((layout.version, layout.position), (1, Position(4)));
    assert!(store.load_state("bal").await.unwrap().is_none());

    // Other layouts refuse to run on this read model.
    let refused = |result: Result<Position, SubscriberError>, what: &str| match result {
        Err(SubscriberError::Store {
            source: StoreError::Incompatible { reason, .. },
            ..
        }) => assert!(reason.contains(what), "{reason}"),
        other => panic!("expected Incompatible ({what}), got {other:?}"),
    };
    refused(
        runner("u", 1, None).catch_up().await,
        "split into 4 partitions",
    );
    refused(
        runner("t", 1, Some((0, 2))).catch_up().await,
        "split into 4 partitions",
    );
    refused(
        runner("v2", 2, Some((1, COUNT))).catch_up().await,
        "version 1",
    );
    let (unchanged, _) = model().await;
    assert_eq!(unchanged, got, "refusals wrote nothing");

    // Rebuilt at version 2 (with every runner stopped): replayed by the new
    // partitions, every row written by version 2.
    runner("v2", 2, Some((2, COUNT)))
        .rebuild(None)
        .await
        .unwrap();
    for index in 0..COUNT {
        let key = Partition::new(index, COUNT).key("bal");
        let state = store.load_state(&key).await.unwrap().unwrap();
        assert_eq!(
            (state.version, state.position),
            (2, Position::ORIGIN),
            "{key}"
        );
    }
    assert_eq!(model().await.0, Model::default(), "reset");
    for index in 0..COUNT {
        assert_eq!(
            runner("v2", 2, Some((index, COUNT)))
                .catch_up()
                .await
                .unwrap(),
            head
        );
    }
    let (rebuilt, by) = model().await;
    assert_eq!(rebuilt, expected_all(&store).await);
    assert!(by.iter().all(|(_, tag)| tag == "v2"));

    // Back to one runner: rebuilt unpartitioned, the partitions refuse.
    runner("one", 2, None).rebuild(None).await.unwrap();
    assert_eq!(runner("one", 2, None).catch_up().await.unwrap(), head);
    assert_eq!(model().await.0, expected_all(&store).await);
    refused(
        runner("v2", 2, Some((0, COUNT))).catch_up().await,
        "unpartitioned",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_projection_sqlite() {
    let (_dir, store) = sqlite().await;
    let db = store.clone();
    partitioned_projection(
        store,
        |tag, version| Balances::new("bal", tag).version(version),
        || {
            let db = db.clone();
            async move {
                (
                    read_model(&db, "bal").await,
                    read_applied_by(&db, "bal").await,
                )
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_projection_postgres() {
    use aftermath_tests::postgres::{PgBalances, read_applied_by, read_model};
    let (guard, store) = postgres_or_skip!("partitioned_projection");
    let db = store.clone();
    let schema = guard.schema.clone();
    partitioned_projection(
        store,
        move |tag, version| PgBalances::new(&schema, "bal", tag).version(version),
        || {
            let db = db.clone();
            async move {
                (
                    read_model(&db, "bal").await,
                    read_applied_by(&db, "bal").await,
                )
            }
        },
    )
    .await;
}

/// A projection that was unpartitioned refuses to be partitioned without a
/// rebuild (its rows would be applied again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpartitioned_read_model_is_not_partitioned_silently() {
    let (_dir, store) = sqlite().await;
    let head = append_accounts(&store, 0, 50, 5, 5).await;
    let one = ProjectionRunner::new(Balances::new("bal", "one"), store.clone(), store.clone());
    assert_eq!(one.catch_up().await.unwrap(), head);
    let part = ProjectionRunner::new(Balances::new("bal", "p"), store.clone(), store.clone())
        .partition(0, 2);
    match part.catch_up().await {
        Err(SubscriberError::Store {
            source: StoreError::Incompatible { reason, .. },
            ..
        }) => assert!(reason.contains("built unpartitioned"), "{reason}"),
        other => panic!("expected Incompatible, got {other:?}"),
    }
    assert!(store.load_state("bal#partitions").await.unwrap().is_none());
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
}

// ---------------------------------------------------------------------------
// Reactors.
// ---------------------------------------------------------------------------

/// Records effects; fails fatally on the events listed in `poison` until
/// `heal`.
#[derive(Clone, Default)]
struct Effects {
    done: Arc<Mutex<Vec<(String, u64)>>>,
    poison: Arc<Mutex<Vec<(String, u64)>>>,
}

#[async_trait::async_trait]
impl Reactor for Effects {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        "fx"
    }
    async fn react(
        &self,
        event: &Recorded<AccountEvent>,
        _ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let at = (event.stream.clone(), event.version);
        if self.poison.lock().unwrap().contains(&at) {
            return Err(ReactError::fatal("refused"));
        }
        self.done.lock().unwrap().push(at);
        Ok(())
    }
}

/// Partitions of a reactor: each effect once, per stream in order; a parked
/// event holds its stream in its own partition only; the journal (and so
/// the dead-letter API) is keyed by the reactor's name, the checkpoints by
/// partition; an operator retry is picked up by the stream's partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactor_partitions_share_one_journal() {
    let store = MemoryStore::new();
    let journal = MemoryJournal::new();
    let checkpoints = MemoryCheckpoints::new();
    append_accounts(&store, 0, 120, 1, 8).await;
    let events = account_events(&store).await;
    let poisoned = events
        .iter()
        .find(|e| e.stream == "account-3" && e.version == 4)
        .unwrap()
        .clone();
    let effects = Effects::default();
    effects
        .poison
        .lock()
        .unwrap()
        .push((poisoned.stream.clone(), poisoned.version));
    let runners: Vec<_> = (0..COUNT)
        .map(|index| {
            ReactorRunner::new(
                effects.clone(),
                store.clone(),
                journal.clone(),
                checkpoints.clone(),
            )
            .options(ReactorOptions::default().batch_size(10))
            .partition(index, COUNT)
        })
        .collect();
    for runner in &runners {
        runner.catch_up().await.unwrap();
    }
    let done = effects.done.lock().unwrap().clone();
    let mut per_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (stream, version) in &done {
        per_stream.entry(stream.clone()).or_default().push(*version);
    }
    for (stream, versions) in &per_stream {
        let want: Vec<u64> = if *stream == poisoned.stream {
            (1..poisoned.version).collect()
        } else {
            (1..=15).collect()
        };
        assert_eq!(versions, &want, "{stream}: once each, in order");
    }
    let parked = journal.parked(Some("fx")).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event_id, poisoned.id);
    let held = journal.held("fx").await.unwrap();
    assert!(held.iter().all(|e| e.stream == poisoned.stream));
    assert_eq!(held.len(), 1 + 15 - poisoned.version as usize);
    let head = store.head().await.unwrap();
    for index in 0..COUNT {
        let key = Partition::new(index, COUNT).key("fx");
        assert_eq!(
            checkpoints.load_checkpoint(&key).await.unwrap(),
            Some(head),
            "{key}"
        );
    }

    // Fixed and retried: the stream's partition runs it and the held ones.
    effects.poison.lock().unwrap().clear();
    assert!(journal.retry("fx", poisoned.id).await.unwrap());
    for runner in &runners {
        runner.catch_up().await.unwrap();
    }
    let done = effects.done.lock().unwrap().clone();
    let poisoned_stream: Vec<u64> = done
        .iter()
        .filter(|(s, _)| *s == poisoned.stream)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(poisoned_stream, (1..=15).collect::<Vec<_>>());
    assert_eq!(done.len(), events.len(), "each effect once");
    let ids: Vec<_> = events.iter().map(|e| e.id).collect();
    let entries = journal.load("fx", &ids).await.unwrap();
    assert!(entries.values().all(|e| e.state == EffectState::Done));
    assert!(journal.held("fx").await.unwrap().is_empty());
}
