//! Catch-up subscriptions, projections, external projections and workers,
//! in one process: SQLite files in temp dirs and the in-memory backends.
//! The multi-process guarantees (cross-process delivery, lease takeover after
//! SIGKILL, crash consistency) are in `subscriptions_multiprocess.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aftermath::projection::{
    CheckpointPolicy, Commit, ExternalProjection, ExternalRunner, HandlerError, OnError,
    ProjectionOptions, ProjectionRunner, ProjectionState, ReadModelDb, TxWork, tx_work,
};
use aftermath::store::read_all_pages;
use aftermath::subscription::{
    CatchUp, CheckpointStore, Lease, LeaseStore, MemoryCheckpoints, MemoryLeases, StartFrom,
    SubscriptionOptions,
};
use aftermath::worker::{
    Backoff, RunContext, RunningWorker, Subscriber, SubscriberError, SubscriberState,
    SubscriberStatus, Worker,
};
use aftermath::{
    AppendResult, Direction, Event, EventData, EventStore, ExpectedVersion, MemoryStore, Position,
    Recorded, Snapshot, SqliteOptions, SqliteStore, StoreError, StoredEvent,
};
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::projections::{
    Balances, Model, append_accounts, eventually, expected, expected_all, read_applied_by,
    read_model, until,
};
use aftermath_tests::raw;
use futures::TryStreamExt;
use tempfile::TempDir;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

async fn sqlite() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .expect("open store");
    (dir, store)
}

async fn state(db: &SqliteStore, name: &str) -> Option<ProjectionState> {
    ReadModelDb::load_state(db, name).await.expect("load state")
}

fn options(batch: usize) -> ProjectionOptions {
    ProjectionOptions::default()
        .batch_size(batch)
        .poll_interval(Duration::from_millis(20))
}

fn status(worker: &RunningWorker, name: &str) -> SubscriberStatus {
    worker.status_of(name).expect("subscriber is registered")
}

/// Waits until `name` is live and caught up with `head`.
async fn live_at(worker: &RunningWorker, name: &str, head: Position) -> SubscriberStatus {
    until(&format!("`{name}` live at {head}"), WAIT, || {
        let s = status(worker, name);
        (s.state == SubscriberState::Live && s.lag.position >= head && s.lag.events == 0)
            .then_some(s)
    })
    .await
}

/// Waits until the read model of `name` in `db` has applied everything
/// through `head`.
async fn applied_through(db: &SqliteStore, name: &str, head: Position) {
    eventually(
        &format!("`{name}` applied through {head}"),
        WAIT,
        || async {
            let model = read_model(db, name).await;
            (model.applied.last().copied() >= Some(head.0)).then_some(())
        },
    )
    .await
}

async fn raw_append(store: &impl EventStore, stream: &str, events: Vec<EventData>) -> Position {
    store
        .append(stream, ExpectedVersion::Any, events)
        .await
        .expect("append")
        .last_position
        .expect("appended")
}

fn pings(n: usize) -> Vec<EventData> {
    (0..n)
        .map(|i| raw("Pinged", &format!("{{\"n\":{i}}}")))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Catch-up, checkpoints, live delivery, filters, start positions.
// ---------------------------------------------------------------------------

/// From the origin: every event applied once, checkpoint at the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_from_origin_applies_every_event_once() {
    let (_dir, store) = sqlite().await;
    let head = append_accounts(&store, 0, 1000, 7, 5).await;
    let runner = ProjectionRunner::new(Balances::new("bal", "r1"), store.clone(), store.clone())
        .options(options(64));
    assert_eq!(runner.catch_up().await.unwrap(), head);
    let want = expected_all(&store).await;
    assert_eq!(want.applied.len(), 1000);
    assert_eq!(read_model(&store, "bal").await, want);
    assert_eq!(
        state(&store, "bal").await,
        Some(ProjectionState {
            version: 1,
            position: head
        })
    );
    // Caught up: running again applies nothing (a double apply would
    // violate the `applied` primary key and fail).
    assert_eq!(runner.catch_up().await.unwrap(), head);
    assert_eq!(read_model(&store, "bal").await, want);
}

/// A restarted process continues after its checkpoint: the events of the
/// first run are not applied again, the new ones are applied by the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_continues_from_saved_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let first_head = {
        let store = SqliteStore::open(&path).await.unwrap();
        append_accounts(&store, 0, 500, 10, 4).await;
        let runner = ProjectionRunner::new(Balances::new("bal", "first"), store.clone(), store)
            .options(options(100));
        runner.catch_up().await.unwrap()
    };
    assert_eq!(first_head, Position(500));
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(state(&store, "bal").await.unwrap().position, first_head);
    let head = append_accounts(&store, 500, 300, 10, 4).await;
    let runner =
        ProjectionRunner::new(Balances::new("bal", "second"), store.clone(), store.clone())
            .options(options(100));
    assert_eq!(runner.catch_up().await.unwrap(), head);
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
    for (position, by) in read_applied_by(&store, "bal").await {
        let want = if position <= first_head.0 {
            "first"
        } else {
            "second"
        };
        assert_eq!(by, want, "event {position} applied by the wrong run");
    }
}

/// Once caught up, an append through the same store handle reaches the read
/// model promptly, woken by `watch_head`: the poll interval is an hour, so
/// nothing else could wake the subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_is_woken_by_watch_head() {
    let (_dir, store) = sqlite().await;
    let head = append_accounts(&store, 0, 10, 5, 2).await;
    let runner = ProjectionRunner::new(Balances::new("bal", "live"), store.clone(), store.clone())
        .options(options(100).poll_interval(Duration::from_secs(3600)));
    let worker = Worker::new()
        .add_subscriber(runner)
        .start()
        .expect("unique subscriber names");
    live_at(&worker, "bal", head).await;
    for round in 0..3u64 {
        let head = append_accounts(&store, 10 + round, 1, 1, 2).await;
        applied_through(&store, "bal", head).await;
        live_at(&worker, "bal", head).await;
    }
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
    assert_eq!(status(&worker, "bal").handled, 13);
    worker.shutdown().await;
}

/// "Wait until live, then read the model" reads every event: a subscriber
/// is reported `Live` only once the page that reached the head is
/// committed, not when it is read. The last page (5 slow events, short, so
/// it is the one that says "caught up") is where reporting early would
/// show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_means_the_last_page_is_committed() {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 35, 1, 3).await;
    let slow = Balances::new("bal", "slow").hook(|_| {
        std::thread::sleep(Duration::from_millis(15));
        Ok(())
    });
    let runner = ProjectionRunner::new(slow, store.clone(), store.clone()).options(options(10));
    let worker = Worker::new()
        .add_subscriber(runner)
        .start()
        .expect("unique subscriber names");
    until("the subscriber is live", WAIT, || {
        (status(&worker, "bal").state == SubscriberState::Live).then_some(())
    })
    .await;
    assert_eq!(
        read_model(&store, "bal").await,
        expected_all(&store).await,
        "reported live before its last page was committed"
    );
    worker.shutdown().await;
}

/// One `read_all`: the types asked for, the types of the events returned.
type Read = (Option<Vec<String>>, Vec<String>);

/// A store that records what `read_all` was asked for and returned.
#[derive(Clone)]
struct Recording<S> {
    inner: S,
    reads: Arc<Mutex<Vec<Read>>>,
}

#[async_trait::async_trait]
impl<S: EventStore> EventStore for Recording<S> {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        self.inner.append(stream, expected, events).await
    }
    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_stream(stream, from, direction, limit).await
    }
    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let events = self.inner.read_all(after, types, limit).await?;
        self.reads.lock().unwrap().push((
            types.map(|t| t.iter().map(|s| s.to_string()).collect()),
            events.iter().map(|e| e.event_type.clone()).collect(),
        ));
        Ok(events)
    }
    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }
    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        self.inner.find_event(id).await
    }
    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        self.inner.watch_head()
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(snapshot).await
    }
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream).await
    }
}

/// Filling a store with account events interleaved with other types (and
/// an old alias of `Withdrawn`): returns the number of account events.
async fn interleaved(store: &impl EventStore) -> u64 {
    let mut accounts = 0;
    for i in 0..120u64 {
        append_accounts(store, i, 1, 1, 3).await;
        accounts += 1;
        raw_append(
            store,
            &format!("ping-{}", i % 4),
            pings(1 + (i % 3) as usize),
        )
        .await;
        if i % 10 == 0 {
            let old = raw("account.MoneyWithdrawn", r#"{"amount":2}"#);
            raw_append(store, "account-0", vec![old]).await;
            accounts += 1;
        }
    }
    raw_append(store, "ping-end", pings(5)).await;
    accounts
}

/// A projection reads only its own event types (the filter runs in the
/// store), applies aliases, and still checkpoints up to the head when the
/// last events of the log are of other types.
async fn filtered_subscription_reads_only_its_types<S: EventStore + Clone>(
    store: S,
    db: SqliteStore,
) {
    let accounts = interleaved(&store).await;
    let head = store.head().await.unwrap();
    let recording = Recording {
        inner: store.clone(),
        reads: Arc::default(),
    };
    let runner = ProjectionRunner::new(Balances::new("bal", "f"), recording.clone(), db.clone())
        .options(options(16));
    assert_eq!(runner.catch_up().await.unwrap(), head);
    let want = expected_all(&store).await;
    assert_eq!(want.applied.len() as u64, accounts);
    assert_eq!(read_model(&db, "bal").await, want);
    assert_eq!(state(&db, "bal").await.unwrap().position, head);
    let reads = recording.reads.lock().unwrap().clone();
    assert!(!reads.is_empty());
    let mut returned = 0;
    for (types, events) in &reads {
        let types = types.as_ref().expect("the read is filtered by type");
        assert_eq!(types, &AccountEvent::event_types().to_vec());
        assert!(
            events.iter().all(|t| t != "Pinged"),
            "read events of other types: {events:?}"
        );
        returned += events.len() as u64;
    }
    assert_eq!(returned, accounts, "each account event read once");
    // Nothing more to read: the checkpoint is past the trailing pings.
    recording.reads.lock().unwrap().clear();
    assert_eq!(runner.catch_up().await.unwrap(), head);
    let reads = recording.reads.lock().unwrap().clone();
    assert!(reads.iter().all(|(_, events)| events.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_subscription_sqlite() {
    let (_dir, store) = sqlite().await;
    filtered_subscription_reads_only_its_types(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_subscription_memory_store() {
    let (_dir, db) = sqlite().await;
    filtered_subscription_reads_only_its_types(MemoryStore::new(), db).await;
}

/// `StartFrom::Now` skips history, `StartFrom::After(p)` starts after `p`;
/// both only without a checkpoint: a saved one always wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_now_and_after() {
    let (_dir, store) = sqlite().await;
    let ten = append_accounts(&store, 0, 10, 1, 2).await;
    let now = ProjectionRunner::new(Balances::new("now", "n"), store.clone(), store.clone())
        .options(options(100).start_from(StartFrom::Now));
    assert_eq!(now.catch_up().await.unwrap(), ten);
    assert!(read_model(&store, "now").await.applied.is_empty());
    assert_eq!(state(&store, "now").await.unwrap().position, ten);

    let after = ProjectionRunner::new(Balances::new("after", "a"), store.clone(), store.clone())
        .options(options(100).start_from(StartFrom::After(Position(4))));
    assert_eq!(after.catch_up().await.unwrap(), ten);
    assert_eq!(
        read_model(&store, "after").await.applied,
        (5..=10).collect::<Vec<_>>()
    );

    let fifteen = append_accounts(&store, 10, 5, 1, 2).await;
    assert_eq!(now.catch_up().await.unwrap(), fifteen);
    assert_eq!(
        read_model(&store, "now").await.applied,
        (11..=15).collect::<Vec<_>>()
    );
    assert_eq!(
        read_model(&store, "now").await,
        expected(&store, ten, fifteen).await
    );

    // A restart with another start option continues from the checkpoint.
    let eighteen = append_accounts(&store, 15, 3, 1, 2).await;
    let restarted =
        ProjectionRunner::new(Balances::new("after", "a2"), store.clone(), store.clone())
            .options(options(100).start_from(StartFrom::Now));
    assert_eq!(restarted.catch_up().await.unwrap(), eighteen);
    assert_eq!(
        read_model(&store, "after").await.applied,
        (5..=18).collect::<Vec<_>>()
    );
}

/// The catch-up reader on its own: pages, `through` past filtered events,
/// and `caught_up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_reader_pages_and_through() {
    let store = MemoryStore::new();
    append_accounts(&store, 0, 5, 5, 1).await; // 1..=5
    raw_append(&store, "ping-1", pings(3)).await; // 6..=8
    let mut reader = CatchUp::new(
        store.clone(),
        Some(AccountEvent::event_types().to_vec()),
        Position::ORIGIN,
        SubscriptionOptions::default().batch_size(2),
    );
    let mut seen = Vec::new();
    loop {
        let page = reader.next_page().await.unwrap();
        seen.extend(page.events.iter().map(|e| e.position.0));
        reader.advance(page.through);
        if page.caught_up {
            assert_eq!(page.through, Position(8), "past the trailing pings");
            break;
        }
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    assert_eq!(reader.lag().events, 0);
    raw_append(&store, "ping-1", pings(2)).await;
    let page = reader.next_page().await.unwrap();
    assert!(page.events.is_empty() && page.caught_up);
    assert_eq!(page.through, Position(10));
}

// ---------------------------------------------------------------------------
// 3. Leases and fencing (unit level).
// ---------------------------------------------------------------------------

/// A lease holder whose instance id is its owner name: the same name is
/// the same instance (re-acquires keep the token), another name another.
fn holder(name: &str) -> aftermath::subscription::Holder {
    aftermath::subscription::Holder {
        owner: name.to_owned(),
        instance: name.to_owned(),
    }
}

fn commit(name: &str, position: u64, lease: Option<&Lease>) -> Commit {
    Commit {
        projection: name.to_owned(),
        version: 1,
        position: Position(position),
        expected: None,
        layout: None,
        lease: lease.cloned(),
        skipped: None,
    }
}

/// After another owner took an expired lease over, the stale owner's fenced
/// writes (projection transaction, checkpoint save, renewal, rebuild) fail
/// with `LeaseLost` and change nothing; the new owner's succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_owner_fenced_write_fails_with_lease_lost_sqlite() {
    let (_dir, store) = sqlite().await;
    let ttl = Duration::from_millis(300);
    let a = store
        .acquire("bal", &holder("a"), ttl)
        .await
        .unwrap()
        .expect("free");
    assert_eq!(a.token, 1);
    assert!(
        store
            .acquire("bal", &holder("b"), ttl)
            .await
            .unwrap()
            .is_none(),
        "held by a"
    );
    // a's fenced writes work while it holds the lease.
    let work: TxWork<SqliteStore, ()> = tx_work::<SqliteStore, _, _>(|tx| {
        Box::pin(async move {
            tx.execute_batch("CREATE TABLE marks (who TEXT)").unwrap();
            Ok(())
        })
    });
    store
        .transact(commit("bal", 5, Some(&a)), work)
        .await
        .unwrap()
        .unwrap();
    CheckpointStore::save(&store, "ext", None, Position(5), Some(&a))
        .await
        .unwrap();

    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let b = store
        .acquire("bal", &holder("b"), ttl)
        .await
        .unwrap()
        .expect("expired");
    assert_eq!(b.token, 2, "a takeover bumps the token");

    let work: TxWork<SqliteStore, ()> = tx_work::<SqliteStore, _, _>(|tx| {
        Box::pin(async move {
            tx.execute("INSERT INTO marks VALUES ('a')", []).unwrap();
            Ok(())
        })
    });
    match store.transact(commit("bal", 9, Some(&a)), work).await {
        Err(StoreError::LeaseLost { name, owner, token }) => {
            assert_eq!((name.as_str(), owner.as_str(), token), ("bal", "a", 1));
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    assert!(matches!(
        CheckpointStore::save(&store, "ext", None, Position(9), Some(&a)).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        store.renew(&a, ttl).await,
        Err(StoreError::LeaseLost { .. })
    ));
    let runner = ProjectionRunner::new(Balances::new("bal", "a"), store.clone(), store.clone());
    match runner.rebuild(Some(a.clone())).await {
        Err(SubscriberError::Store {
            source: StoreError::LeaseLost { .. },
            ..
        }) => {}
        other => panic!("expected a LeaseLost store error, got {other:?}"),
    }
    // Nothing of a's moved.
    assert_eq!(state(&store, "bal").await.unwrap().position, Position(5));
    assert_eq!(
        CheckpointStore::load_checkpoint(&store, "ext")
            .await
            .unwrap(),
        Some(Position(5))
    );
    let marks: i64 = store
        .read(|c| {
            c.query_row("SELECT count(*) FROM marks", [], |r| r.get(0))
                .map_err(|e| StoreError::database("count", e))
        })
        .await
        .unwrap();
    assert_eq!(marks, 0);
    // a releasing its stale lease does not free b's.
    store.release(&a).await.unwrap();
    assert!(
        store
            .acquire("bal", &holder("c"), ttl)
            .await
            .unwrap()
            .is_none()
    );
    // b's writes go through.
    let work: TxWork<SqliteStore, ()> =
        tx_work::<SqliteStore, _, _>(|_| Box::pin(async { Ok(()) }));
    store
        .transact(commit("bal", 9, Some(&b)), work)
        .await
        .unwrap()
        .unwrap();
    CheckpointStore::save(&store, "ext", None, Position(9), Some(&b))
        .await
        .unwrap();
    assert_eq!(state(&store, "bal").await.unwrap().position, Position(9));
    // Released, the lease is free at once for the next owner.
    store.release(&b).await.unwrap();
    let c = store
        .acquire("bal", &holder("c"), ttl)
        .await
        .unwrap()
        .expect("released");
    assert_eq!(c.token, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_owner_fenced_write_fails_with_lease_lost_memory() {
    let leases = MemoryLeases::new();
    let checkpoints = MemoryCheckpoints::fenced_by(leases.clone());
    let ttl = Duration::from_millis(100);
    let a = leases
        .acquire("ext", &holder("a"), ttl)
        .await
        .unwrap()
        .expect("free");
    assert!(
        leases
            .acquire("ext", &holder("b"), ttl)
            .await
            .unwrap()
            .is_none()
    );
    checkpoints
        .save("ext", None, Position(3), Some(&a))
        .await
        .unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(20)).await;
    let b = leases
        .acquire("ext", &holder("b"), ttl)
        .await
        .unwrap()
        .expect("expired");
    assert_eq!(b.token, a.token + 1);
    assert!(matches!(
        checkpoints.save("ext", None, Position(7), Some(&a)).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        leases.renew(&a, ttl).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(Position(3))
    );
    checkpoints
        .save("ext", None, Position(7), Some(&b))
        .await
        .unwrap();
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(Position(7))
    );
}

// ---------------------------------------------------------------------------
// 5. Rebuilds.
// ---------------------------------------------------------------------------

/// `rebuild` resets the read model and the checkpoint; catching up again
/// gives exactly the read model of the incremental runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_then_catch_up_gives_the_incremental_read_model() {
    let (_dir, store) = sqlite().await;
    let projection = Balances::new("bal", "r");
    let resets = projection.resets();
    let runner =
        ProjectionRunner::new(projection, store.clone(), store.clone()).options(options(50));
    for round in 0..4 {
        append_accounts(&store, round * 150, 150, 9, 6).await;
        raw_append(&store, "ping-1", pings(3)).await;
        runner.catch_up().await.unwrap();
    }
    let incremental = read_model(&store, "bal").await;
    assert_eq!(incremental, expected_all(&store).await);

    runner.rebuild(None).await.unwrap();
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    assert_eq!(read_model(&store, "bal").await, Model::default());
    assert_eq!(
        state(&store, "bal").await,
        Some(ProjectionState {
            version: 1,
            position: Position::ORIGIN
        })
    );
    let head = store.head().await.unwrap();
    assert_eq!(runner.catch_up().await.unwrap(), head);
    assert_eq!(read_model(&store, "bal").await, incremental);
}

/// Bumping `version()` resets the read model on the next start and replays
/// the log; starting the same version again does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_bump_rebuilds_on_start() {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 300, 10, 3).await;
    let v1 = ProjectionRunner::new(Balances::new("bal", "v1"), store.clone(), store.clone());
    v1.catch_up().await.unwrap();
    let v2 = Balances::new("bal", "v2").version(2);
    let resets = v2.resets();
    let runner =
        ProjectionRunner::new(v2.clone(), store.clone(), store.clone()).options(options(64));
    let head = runner.catch_up().await.unwrap();
    assert_eq!(resets.load(Ordering::SeqCst), 1, "reset hook called once");
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
    assert!(
        read_applied_by(&store, "bal")
            .await
            .iter()
            .all(|(_, by)| by == "v2"),
        "every event re-applied by version 2"
    );
    assert_eq!(
        state(&store, "bal").await,
        Some(ProjectionState {
            version: 2,
            position: head
        })
    );
    // Same version again, in a worker this time: no reset, just continues.
    let head = append_accounts(&store, 300, 20, 10, 3).await;
    let worker = Worker::new()
        .add_subscriber(
            ProjectionRunner::new(v2, store.clone(), store.clone()).options(options(64)),
        )
        .start()
        .expect("unique subscriber names");
    live_at(&worker, "bal", head).await;
    worker.shutdown().await;
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
}

// ---------------------------------------------------------------------------
// 6. Errors.
// ---------------------------------------------------------------------------

/// A handler failing a few times on one event is retried (the batch rolls
/// back and runs again) and the read model ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_handler_failure_is_retried() {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 100, 10, 3).await;
    let failures = Arc::new(AtomicU64::new(0));
    let calls_at_40 = Arc::new(AtomicU64::new(0));
    let (f, c) = (failures.clone(), calls_at_40.clone());
    let projection = Balances::new("bal", "t").hook(move |event| {
        if event.position == Position(40) {
            c.fetch_add(1, Ordering::SeqCst);
            if f.fetch_add(1, Ordering::SeqCst) < 3 {
                return Err(HandlerError::msg("flaky dependency"));
            }
        }
        Ok(())
    });
    let runner = ProjectionRunner::new(projection, store.clone(), store.clone()).options(
        ProjectionOptions {
            retry_delay: Duration::from_millis(1),
            ..options(64)
        }
        .attempts(4),
    );
    let head = runner.catch_up().await.unwrap();
    assert_eq!(head, Position(100));
    assert_eq!(
        calls_at_40.load(Ordering::SeqCst),
        4,
        "3 failures, then success"
    );
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
}

fn failing_at(name: &str, positions: &'static [u64]) -> Balances {
    Balances::new(name, "e").hook(move |event| {
        if positions.contains(&event.position.0) {
            Err(HandlerError::msg(format!(
                "cannot apply {}",
                event.position
            )))
        } else {
            Ok(())
        }
    })
}

fn fast_failing(batch: usize, on_error: OnError) -> ProjectionOptions {
    ProjectionOptions {
        retry_delay: Duration::from_millis(1),
        ..options(batch)
    }
    .attempts(2)
    .on_error(on_error)
}

/// An event that keeps failing stops the projection with an error naming
/// the subscriber, position, stream and type; the events before it in the
/// same batch are applied and the checkpoint stays just before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_event_stops_with_event_error() {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 50, 5, 3).await;
    let failed = store
        .read_all(Position(29), None, 1)
        .await
        .unwrap()
        .remove(0);
    let runner = ProjectionRunner::new(failing_at("bal", &[30]), store.clone(), store.clone())
        .options(fast_failing(100, OnError::Stop));
    let error = runner.catch_up().await.unwrap_err();
    match &error {
        SubscriberError::Event {
            subscriber,
            position,
            stream,
            version,
            event_type,
            message,
        } => {
            assert_eq!(subscriber, "bal");
            assert_eq!(*position, Position(30));
            assert_eq!(stream, &failed.stream);
            assert_eq!(*version, failed.version);
            assert_eq!(event_type, &failed.event_type);
            assert!(message.contains("cannot apply 30"), "{message}");
        }
        other => panic!("expected an event error, got {other:?}"),
    }
    assert!(!error.is_transient());
    let text = error.to_string();
    for part in ["bal", "30", &failed.stream, &failed.event_type] {
        assert!(text.contains(part), "`{text}` should name {part}");
    }
    assert_eq!(state(&store, "bal").await.unwrap().position, Position(29));
    assert_eq!(
        read_model(&store, "bal").await,
        expected(&store, Position::ORIGIN, Position(29)).await
    );
    assert!(store.skipped(Some("bal")).await.unwrap().is_empty());
    // It keeps stopping there.
    assert!(matches!(
        runner.catch_up().await,
        Err(SubscriberError::Event {
            position: Position(30),
            ..
        })
    ));
}

/// With `OnError::Skip`, events that keep failing are recorded as skipped
/// (for operators) and everything else is applied; the checkpoint reaches
/// the head even when the skipped event is the last of its kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_events_skipped_and_recorded() {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 50, 5, 3).await;
    raw_append(&store, "ping-1", pings(3)).await;
    let head = store.head().await.unwrap();
    let runner = ProjectionRunner::new(failing_at("bal", &[30, 50]), store.clone(), store.clone())
        .options(fast_failing(100, OnError::Skip));
    assert_eq!(runner.catch_up().await.unwrap(), head);
    let model = read_model(&store, "bal").await;
    let want: Vec<u64> = (1..=49).filter(|p| *p != 30).collect();
    assert_eq!(model.applied, want);
    let skipped = store.skipped(Some("bal")).await.unwrap();
    assert_eq!(
        skipped.iter().map(|s| s.position.0).collect::<Vec<_>>(),
        vec![30, 50]
    );
    for s in &skipped {
        let stored = store
            .read_all(Position(s.position.0 - 1), None, 1)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(s.subscriber, "bal");
        assert_eq!(s.stream, stored.stream);
        assert_eq!(s.version, stored.version);
        assert_eq!(s.event_type, stored.event_type);
        assert!(
            s.error.contains(&format!("cannot apply {}", s.position)),
            "{}",
            s.error
        );
    }
    assert_eq!(store.skipped(None).await.unwrap(), skipped);
    assert!(store.skipped(Some("other")).await.unwrap().is_empty());
    assert_eq!(state(&store, "bal").await.unwrap().position, head);
    // Skipped once: a restart does not meet them again.
    assert_eq!(runner.catch_up().await.unwrap(), head);
    assert_eq!(store.skipped(None).await.unwrap().len(), 2);
}

/// A payload that does not decode stops the projection, naming the event;
/// with `Skip` it is recorded as skipped and the rest is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payload_stops_or_is_skipped() {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 10, 10, 1).await;
    raw_append(
        &store,
        "account-bad",
        vec![raw("account.Deposited", r#"{"amount":"lots"}"#)],
    )
    .await;
    let head = append_accounts(&store, 10, 10, 10, 1).await;

    let stop = ProjectionRunner::new(Balances::new("bal", "s"), store.clone(), store.clone())
        .options(options(100));
    match stop.catch_up().await {
        Err(SubscriberError::Event {
            subscriber,
            position,
            stream,
            version,
            event_type,
            message,
        }) => {
            assert_eq!(
                (
                    subscriber.as_str(),
                    position,
                    stream.as_str(),
                    version,
                    event_type.as_str()
                ),
                ("bal", Position(11), "account-bad", 1, "account.Deposited")
            );
            assert!(!message.is_empty());
        }
        other => panic!("expected an event error, got {other:?}"),
    }
    assert_eq!(state(&store, "bal").await.unwrap().position, Position(10));
    assert_eq!(
        read_model(&store, "bal").await.applied,
        (1..=10).collect::<Vec<_>>()
    );

    let skip = ProjectionRunner::new(Balances::new("bal", "s"), store.clone(), store.clone())
        .options(options(100).on_error(OnError::Skip));
    assert_eq!(skip.catch_up().await.unwrap(), head);
    let skipped = store.skipped(Some("bal")).await.unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(
        (skipped[0].position, skipped[0].stream.as_str()),
        (Position(11), "account-bad")
    );
    let want: Vec<u64> = (1..=21).filter(|p| *p != 11).collect();
    assert_eq!(read_model(&store, "bal").await.applied, want);
}

/// A handler that panics is a failing handler: the projection stops with
/// an error naming the event (or skips it), instead of treating the panic
/// as a store failure and retrying it forever. In a worker, a subscriber
/// whose run panics is reported stopped with the panic, not left `Live`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_an_event_failure() {
    let (_dir, store) = sqlite().await;
    let head = append_accounts(&store, 0, 20, 5, 2).await;
    let panicking = |name: &str| {
        Balances::new(name, "p").hook(|event| {
            if event.position == Position(7) {
                panic!("boom at {}", event.position);
            }
            Ok(())
        })
    };
    let stop = ProjectionRunner::new(panicking("bal"), store.clone(), store.clone())
        .options(fast_failing(100, OnError::Stop));
    match stop.catch_up().await {
        Err(SubscriberError::Event {
            position, message, ..
        }) => {
            assert_eq!(position, Position(7));
            assert!(message.contains("boom at 7"), "{message}");
        }
        other => panic!("expected an event error, got {other:?}"),
    }
    assert_eq!(
        read_model(&store, "bal").await.applied,
        (1..=6).collect::<Vec<_>>()
    );
    let skip = ProjectionRunner::new(panicking("bal"), store.clone(), store.clone())
        .options(fast_failing(100, OnError::Skip));
    assert_eq!(skip.catch_up().await.unwrap(), head);
    assert_eq!(
        store.skipped(Some("bal")).await.unwrap()[0].position,
        Position(7)
    );

    struct Panics;
    #[async_trait::async_trait]
    impl Subscriber for Panics {
        fn name(&self) -> &str {
            "panics"
        }
        async fn run(&self, _ctx: &mut RunContext) -> Result<(), SubscriberError> {
            panic!("subscriber bug");
        }
    }
    let worker = Worker::new()
        .add_subscriber(Panics)
        .start()
        .expect("unique subscriber names");
    let error = until("`panics` stopped", WAIT, || {
        match status(&worker, "panics").state {
            SubscriberState::Stopped(Some(error)) => Some(error),
            _ => None,
        }
    })
    .await;
    assert!(error.contains("subscriber bug"), "{error}");
    worker.shutdown().await;
}

/// In a worker, a subscriber failing on an event stops with the error
/// while another subscriber of the same worker keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_failing_subscriber_stops_alone() {
    let (_dir, store) = sqlite().await;
    let head = append_accounts(&store, 0, 20, 5, 2).await;
    let broken = ProjectionRunner::new(failing_at("broken", &[5]), store.clone(), store.clone())
        .options(fast_failing(100, OnError::Stop));
    let healthy = ProjectionRunner::new(Balances::new("bal", "w"), store.clone(), store.clone())
        .options(options(100));
    let worker = Worker::new()
        .add_subscriber(broken)
        .add_subscriber(healthy)
        .start()
        .expect("unique subscriber names");
    let error = until("`broken` stopped", WAIT, || {
        match status(&worker, "broken").state {
            SubscriberState::Stopped(Some(error)) => Some(error),
            _ => None,
        }
    })
    .await;
    assert!(
        error.contains("broken") && error.contains("position 5"),
        "{error}"
    );
    live_at(&worker, "bal", head).await;
    let head = append_accounts(&store, 20, 30, 5, 2).await;
    live_at(&worker, "bal", head).await;
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
    assert_eq!(
        status(&worker, "broken").state,
        SubscriberState::Stopped(Some(error))
    );
    assert_eq!(state(&store, "broken").await.unwrap().position, Position(4));
    worker.shutdown().await;
}

/// A store failure (the read model's database is locked by another
/// connection) is transient: the subscriber reports `Retrying`, restarts
/// with backoff, and is live again once the lock is gone, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_store_failure_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    let rm_path = dir.path().join("read-model.db");
    let rm = SqliteStore::open_with(
        &rm_path,
        SqliteOptions::default().busy_timeout(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let head = append_accounts(&store, 0, 20, 5, 2).await;
    let runner = ProjectionRunner::new(Balances::new("bal", "t"), store.clone(), rm.clone())
        .options(options(100));
    let worker = Worker::new()
        .backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        })
        .add_subscriber(runner)
        .start()
        .expect("unique subscriber names");
    live_at(&worker, "bal", head).await;

    let lock = rusqlite::Connection::open(&rm_path).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let head = append_accounts(&store, 20, 10, 5, 2).await;
    let (attempt, error) = until("`bal` retrying", WAIT, || {
        match status(&worker, "bal").state {
            SubscriberState::Retrying { attempt, error } => Some((attempt, error)),
            _ => None,
        }
    })
    .await;
    assert!(attempt >= 1);
    assert!(
        error.contains("locked") || error.contains("busy"),
        "{error}"
    );
    // Still locked: it keeps retrying, with a growing attempt count.
    until("several restarts", WAIT, || {
        match status(&worker, "bal").state {
            SubscriberState::Retrying { attempt, .. } if attempt >= 3 => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(read_model(&rm, "bal").await.applied.len() == 20);
    lock.execute_batch("ROLLBACK").unwrap();
    live_at(&worker, "bal", head).await;
    assert_eq!(read_model(&rm, "bal").await, expected_all(&store).await);

    // A later failure, after the run made progress, starts the backoff over.
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let head = append_accounts(&store, 30, 10, 5, 2).await;
    let attempt = until("`bal` retrying again", WAIT, || {
        match status(&worker, "bal").state {
            SubscriberState::Retrying { attempt, .. } => Some(attempt),
            _ => None,
        }
    })
    .await;
    assert_eq!(attempt, 1, "the attempt count restarts after a healthy run");
    lock.execute_batch("ROLLBACK").unwrap();
    live_at(&worker, "bal", head).await;
    assert_eq!(read_model(&rm, "bal").await, expected_all(&store).await);
    worker.shutdown().await;
}

// ---------------------------------------------------------------------------
// 7. Worker status and graceful shutdown.
// ---------------------------------------------------------------------------

/// `status()` reports `CatchingUp` with a positive lag while behind, then
/// `Live` with no lag once caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_status_reports_catching_up_live_and_lag() {
    let (_dir, store) = sqlite().await;
    let head = append_accounts(&store, 0, 2000, 20, 4).await;
    let slow = Balances::new("bal", "s").hook(|_| {
        std::thread::sleep(Duration::from_micros(200));
        Ok(())
    });
    let worker = Worker::new()
        .add_subscriber(
            ProjectionRunner::new(slow, store.clone(), store.clone()).options(options(50)),
        )
        .start()
        .expect("unique subscriber names");
    let mut samples = Vec::new();
    let done = until("caught up", Duration::from_secs(30), || {
        let s = status(&worker, "bal");
        samples.push(s.clone());
        (s.state == SubscriberState::Live && s.lag.events == 0 && s.lag.position == head)
            .then_some(s)
    })
    .await;
    let behind: Vec<_> = samples
        .iter()
        .filter(|s| s.state == SubscriberState::CatchingUp)
        .collect();
    assert!(!behind.is_empty(), "never seen catching up");
    assert!(
        behind
            .iter()
            .all(|s| s.lag.events > 0 && s.lag.position < head),
        "catching up without lag: {:?}",
        behind.iter().find(|s| s.lag.events == 0)
    );
    assert!(behind.iter().any(|s| s.lag.events >= 1000));
    assert_eq!(done.lag.head, head);
    assert_eq!(done.handled, 2000);
    worker.shutdown().await;
}

/// Graceful shutdown lets the batch in flight finish and commit: the
/// checkpoint is the last applied event, and nothing after it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_batch() {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 1000, 50, 4).await;
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let slow = Balances::new("bal", "g").hook(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        Ok(())
    });
    let worker = Worker::new()
        .add_subscriber(
            ProjectionRunner::new(slow, store.clone(), store.clone()).options(options(100)),
        )
        .start()
        .expect("unique subscriber names");
    // Shut down in the middle of the second batch.
    until("second batch in flight", WAIT, || {
        (calls.load(Ordering::SeqCst) >= 150).then_some(())
    })
    .await;
    worker.shutdown().await;
    let model = read_model(&store, "bal").await;
    assert_eq!(
        model.applied,
        (1..=200).collect::<Vec<_>>(),
        "the in-flight batch finished"
    );
    assert_eq!(state(&store, "bal").await.unwrap().position, Position(200));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        200,
        "no batch started after shutdown"
    );
    assert_eq!(
        model,
        expected(&store, Position::ORIGIN, Position(200)).await
    );
}

/// A subscriber that counts its runs and returns `Ok` when told to stop
/// (or at once).
struct Counting {
    name: &'static str,
    runs: Arc<AtomicU64>,
    wait_for_stop: bool,
}

#[async_trait::async_trait]
impl Subscriber for Counting {
    fn name(&self) -> &str {
        self.name
    }
    async fn run(&self, ctx: &mut RunContext) -> Result<(), SubscriberError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        // Yield, so that a supervisor restarting it in a loop spins
        // cooperatively and the test fails instead of hanging the runtime.
        tokio::task::yield_now().await;
        if self.wait_for_stop {
            aftermath::subscription::stopped(&mut ctx.shutdown).await;
        }
        Ok(())
    }
}

/// A subscriber that finishes on its own is `Stopped(None)`, not restarted
/// in a loop; dropping a running worker without `shutdown` stops its
/// subscribers instead of restarting them forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_subscribers_and_dropped_workers_stop() {
    let once = Arc::new(AtomicU64::new(0));
    let waiting = Arc::new(AtomicU64::new(0));
    let worker = Worker::new()
        .add_subscriber(Counting {
            name: "once",
            runs: once.clone(),
            wait_for_stop: false,
        })
        .add_subscriber(Counting {
            name: "waiting",
            runs: waiting.clone(),
            wait_for_stop: true,
        })
        .start()
        .expect("unique subscriber names");
    until("`once` stopped", WAIT, || {
        (status(&worker, "once").state == SubscriberState::Stopped(None)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(once.load(Ordering::SeqCst), 1);
    assert_eq!(waiting.load(Ordering::SeqCst), 1);
    drop(worker);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        waiting.load(Ordering::SeqCst),
        1,
        "restarted after the worker was dropped"
    );
}

// ---------------------------------------------------------------------------
// 8. External projections: checkpoint policy, at-least-once redelivery.
// ---------------------------------------------------------------------------

/// Records every delivery; hangs forever on `hang_at` (a crash point).
#[derive(Clone)]
struct Recorder {
    seen: Arc<Mutex<Vec<u64>>>,
    hang_at: Option<u64>,
    fail_at: Option<u64>,
    delay: Duration,
}

impl Recorder {
    fn new(hang_at: Option<u64>) -> Self {
        Recorder {
            seen: Arc::default(),
            hang_at,
            fail_at: None,
            delay: Duration::ZERO,
        }
    }
    fn slow(delay: Duration) -> Self {
        Recorder {
            delay,
            ..Recorder::new(None)
        }
    }
    fn seen(&self) -> Vec<u64> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl ExternalProjection for Recorder {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        "ext"
    }
    async fn handle(&self, event: &Recorded<AccountEvent>) -> Result<(), HandlerError> {
        if self.hang_at == Some(event.position.0) {
            futures::future::pending::<()>().await;
        }
        if self.fail_at == Some(event.position.0) {
            return Err(HandlerError::msg("the index is down"));
        }
        tokio::time::sleep(self.delay).await;
        self.seen.lock().unwrap().push(event.position.0);
        Ok(())
    }
}

/// Hangs forever on its first call for `at` (no timeout can end it here:
/// the runner's `call_timeout` is an hour); records every other delivery.
#[derive(Clone, Default)]
struct HangsOnce {
    at: u64,
    hung: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<Mutex<std::collections::BTreeSet<u64>>>,
}

#[async_trait::async_trait]
impl ExternalProjection for HangsOnce {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        "stalls"
    }
    async fn handle(&self, event: &Recorded<AccountEvent>) -> Result<(), HandlerError> {
        if event.position.0 == self.at && !self.hung.swap(true, Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        self.seen.lock().unwrap().insert(event.position.0);
        Ok(())
    }
}

/// A run stuck in a call that no timeout ends makes no progress; its worker
/// renews the lease all the same unless it watches for that. With a stall
/// limit, the worker gives the lease up and drops the run, so the standby
/// worker takes over (well within the lease's TTL) and every event is
/// handled. Without it, the stuck worker would hold the lease forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_run_gives_its_lease_up() {
    let store = MemoryStore::new();
    append_accounts(&store, 0, 20, 1, 2).await;
    let leases = MemoryLeases::new();
    let checkpoints = MemoryCheckpoints::fenced_by(leases.clone());
    let handler = HangsOnce {
        at: 6,
        ..HangsOnce::default()
    };
    let worker = |owner: &str| {
        Worker::new()
            .owner(owner)
            .with_leases(leases.clone(), Duration::from_secs(60))
            .stall_limit(Duration::from_millis(300))
            .standby_poll(Duration::from_millis(20))
            .add_subscriber(
                ExternalRunner::new(handler.clone(), store.clone(), checkpoints.clone()).options(
                    ProjectionOptions::default()
                        .batch_size(4)
                        .call_timeout(Duration::from_secs(3600)),
                ),
            )
            .start()
            .expect("one subscriber")
    };
    let first = worker("first");
    until("the handler hangs", WAIT, || {
        handler.hung.load(Ordering::SeqCst).then_some(())
    })
    .await;
    let standby = worker("standby");
    until("every event handled after the stall", WAIT, || {
        (handler.seen.lock().unwrap().len() == 20).then_some(())
    })
    .await;
    first.shutdown().await;
    standby.shutdown().await;
}

type Running = (
    tokio::task::JoinHandle<Result<(), SubscriberError>>,
    tokio::sync::watch::Sender<bool>,
);

fn spawn_external<S: EventStore + Clone, C: CheckpointStore + Clone>(
    recorder: &Recorder,
    store: &S,
    checkpoints: &C,
    policy: CheckpointPolicy,
    options: ProjectionOptions,
) -> Running {
    let runner = ExternalRunner::new(recorder.clone(), store.clone(), checkpoints.clone())
        .options(options)
        .checkpoints_every(policy);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut ctx = RunContext::standalone("ext", rx);
        runner.run(&mut ctx).await
    });
    (task, stop)
}

async fn seen_len(recorder: &Recorder, n: usize) {
    until(&format!("{n} deliveries"), WAIT, || {
        (recorder.seen().len() >= n).then_some(())
    })
    .await;
}

/// Checkpoints are saved every N handled events (not only per page); after
/// a crash, the events handled since the last save are delivered again:
/// at-least-once.
async fn external_count_policy_and_redelivery<S, C>(store: S, checkpoints: C)
where
    S: EventStore + Clone,
    C: CheckpointStore + Clone,
{
    let head = append_accounts(&store, 0, 40, 4, 3).await;
    let policy = CheckpointPolicy {
        every_events: 10,
        every: Duration::from_secs(3600),
    };
    let crashing = Recorder::new(Some(26));
    let (task, _stop) = spawn_external(&crashing, &store, &checkpoints, policy, options(100));
    seen_len(&crashing, 25).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(Position(20))
    );
    task.abort(); // a crash: no shutdown, no final save
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(Position(20))
    );

    let restarted = Recorder::new(None);
    let (task, stop) = spawn_external(&restarted, &store, &checkpoints, policy, options(100));
    seen_len(&restarted, 20).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(restarted.seen(), (21..=40).collect::<Vec<_>>());
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(head),
        "saved on shutdown"
    );
    // Delivered twice: exactly the events handled after the last save.
    let mut deliveries: BTreeMap<u64, u32> = BTreeMap::new();
    for p in crashing.seen().into_iter().chain(restarted.seen()) {
        *deliveries.entry(p).or_default() += 1;
    }
    let twice: Vec<u64> = deliveries
        .iter()
        .filter(|(_, n)| **n == 2)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(twice, (21..=25).collect::<Vec<_>>());
    assert_eq!(deliveries.len(), 40, "none lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_count_policy_and_redelivery_sqlite() {
    let (_dir, store) = sqlite().await;
    external_count_policy_and_redelivery(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_count_policy_and_redelivery_memory() {
    external_count_policy_and_redelivery(MemoryStore::new(), MemoryCheckpoints::new()).await;
}

/// The time policy saves a live runner's checkpoint without any shutdown;
/// shutdown saves what was handled since.
async fn external_time_policy_and_shutdown<S, C>(store: S, checkpoints: C)
where
    S: EventStore + Clone,
    C: CheckpointStore + Clone,
{
    let five = append_accounts(&store, 0, 5, 5, 1).await;
    let policy = CheckpointPolicy {
        every_events: 1_000_000,
        every: Duration::from_millis(200),
    };
    let recorder = Recorder::new(None);
    let (task, stop) = spawn_external(&recorder, &store, &checkpoints, policy, options(100));
    seen_len(&recorder, 5).await;
    eventually("time-based save", WAIT, || async {
        (checkpoints.load_checkpoint("ext").await.unwrap() == Some(five)).then_some(())
    })
    .await;
    let policy_every_hour = CheckpointPolicy {
        every_events: 1_000_000,
        every: Duration::from_secs(3600),
    };
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    // Now only shutdown saves.
    let recorder = Recorder::new(None);
    let (task, stop) = spawn_external(
        &recorder,
        &store,
        &checkpoints,
        policy_every_hour,
        options(100),
    );
    let twelve = append_accounts(&store, 5, 7, 7, 1).await;
    seen_len(&recorder, 7).await;
    assert_eq!(recorder.seen(), (6..=12).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(five),
        "no save yet"
    );
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(twelve)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_time_policy_and_shutdown_sqlite() {
    let (_dir, store) = sqlite().await;
    external_time_policy_and_shutdown(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_time_policy_and_shutdown_memory() {
    external_time_policy_and_shutdown(MemoryStore::new(), MemoryCheckpoints::new()).await;
}

/// `StartFrom::Now` is remembered at the first start: a crash before the
/// first checkpoint must not move the start to a later head, or the events
/// appended in between would never be delivered.
async fn external_start_from_now_survives_a_crash<S, C>(store: S, checkpoints: C)
where
    S: EventStore + Clone,
    C: CheckpointStore + Clone,
{
    append_accounts(&store, 0, 5, 5, 1).await;
    let policy = CheckpointPolicy {
        every_events: 1_000_000,
        every: Duration::from_secs(3600),
    };
    let opts = options(100).start_from(StartFrom::Now);
    let crashing = Recorder::new(Some(6));
    let (task, _stop) = spawn_external(&crashing, &store, &checkpoints, policy, opts.clone());
    eventually("the start saved", WAIT, || async {
        checkpoints
            .load_checkpoint("ext")
            .await
            .unwrap()
            .map(|_| ())
    })
    .await;
    append_accounts(&store, 5, 3, 3, 1).await; // 6..=8; hangs on 6
    tokio::time::sleep(Duration::from_millis(100)).await;
    task.abort();
    let _ = task.await;
    let restarted = Recorder::new(None);
    let (task, stop) = spawn_external(&restarted, &store, &checkpoints, policy, opts);
    seen_len(&restarted, 3).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(crashing.seen(), Vec::<u64>::new());
    assert_eq!(restarted.seen(), vec![6, 7, 8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_start_from_now_survives_a_crash_sqlite() {
    let (_dir, store) = sqlite().await;
    external_start_from_now_survives_a_crash(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_start_from_now_survives_a_crash_memory() {
    external_start_from_now_survives_a_crash(MemoryStore::new(), MemoryCheckpoints::new()).await;
}

/// An external projection failing on an event (after its retries) stops
/// with an error naming the event; the checkpoint saved on the way out is
/// just before it, so a restart delivers it again. With pages of 4 the
/// failing page follows pages whose checkpoint the policy deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_failing_event_stops_before_it() {
    for batch in [100, 4] {
        external_failing_event_stops_before_it_in_pages_of(batch).await;
    }
}

async fn external_failing_event_stops_before_it_in_pages_of(batch: usize) {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 20, 5, 2).await;
    let failed = store
        .read_all(Position(11), None, 1)
        .await
        .unwrap()
        .remove(0);
    let recorder = Recorder {
        fail_at: Some(12),
        ..Recorder::new(None)
    };
    let policy = CheckpointPolicy {
        every_events: 1_000_000,
        every: Duration::from_secs(3600),
    };
    let (task, _stop) = spawn_external(
        &recorder,
        &store,
        &store,
        policy,
        fast_failing(batch, OnError::Stop),
    );
    match task.await.unwrap() {
        Err(SubscriberError::Event {
            subscriber,
            position,
            stream,
            version,
            event_type,
            message,
        }) => {
            assert_eq!(
                (subscriber.as_str(), position, stream, version, event_type),
                (
                    "ext",
                    Position(12),
                    failed.stream,
                    failed.version,
                    failed.event_type
                )
            );
            assert!(message.contains("the index is down"), "{message}");
        }
        other => panic!("expected an event error, got {other:?}"),
    }
    assert_eq!(recorder.seen(), (1..=11).collect::<Vec<_>>());
    assert_eq!(
        CheckpointStore::load_checkpoint(&store, "ext")
            .await
            .unwrap(),
        Some(Position(11))
    );
}

/// An external runner in a worker reports `Live` with no lag once it has
/// handled what an append woke it for (not only after the next poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_runner_in_worker_reports_live_lag() {
    let store = MemoryStore::new();
    let recorder = Recorder::new(None);
    let runner = ExternalRunner::new(recorder.clone(), store.clone(), MemoryCheckpoints::new())
        .options(options(100).poll_interval(Duration::from_secs(3600)));
    let worker = Worker::new()
        .add_subscriber(runner)
        .start()
        .expect("unique subscriber names");
    let head = append_accounts(&store, 0, 10, 5, 2).await;
    live_at(&worker, "ext", head).await;
    let head = append_accounts(&store, 10, 5, 5, 2).await;
    let live = live_at(&worker, "ext", head).await;
    assert_eq!(live.handled, 15);
    assert_eq!(recorder.seen(), (1..=15).collect::<Vec<_>>());
    worker.shutdown().await;
}

/// A worker shutting down keeps renewing its lease until the batch in
/// flight is done and its checkpoint saved: a standby worker does not take
/// over in the meantime, so nothing is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_the_lease_until_the_batch_is_done() {
    let store = MemoryStore::new();
    let leases = MemoryLeases::new();
    let checkpoints = MemoryCheckpoints::fenced_by(leases.clone());
    let ttl = Duration::from_millis(150);
    let policy = CheckpointPolicy {
        every_events: 1_000_000,
        every: Duration::from_secs(3600),
    };
    let head = append_accounts(&store, 0, 30, 5, 2).await;
    let recorder_a = Recorder::slow(Duration::from_millis(40));
    let recorder_b = Recorder::new(None);
    let worker = |owner: &str, recorder: &Recorder| {
        Worker::new()
            .owner(owner)
            .with_leases(leases.clone(), ttl)
            .add_subscriber(
                ExternalRunner::new(recorder.clone(), store.clone(), checkpoints.clone())
                    .options(options(10))
                    .checkpoints_every(policy),
            )
            .start()
            .expect("unique subscriber names")
    };
    let a = worker("a", &recorder_a);
    seen_len(&recorder_a, 1).await;
    let b = worker("b", &recorder_b);
    until("`b` standing by", WAIT, || {
        (status(&b, "ext").state == SubscriberState::Standby).then_some(())
    })
    .await;
    // Shut down early in the second page: 8 more events x 40 ms > ttl.
    seen_len(&recorder_a, 12).await;
    a.shutdown().await;
    assert_eq!(recorder_a.seen(), (1..=20).collect::<Vec<_>>());
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(Position(20))
    );
    live_at(&b, "ext", head).await;
    assert_eq!(
        recorder_b.seen(),
        (21..=30).collect::<Vec<_>>(),
        "redelivered by b"
    );
    b.shutdown().await;
}

// ---------------------------------------------------------------------------
// 9. In-memory backends.
// ---------------------------------------------------------------------------

/// A projection reading a `MemoryStore` (read model in SQLite): catch-up,
/// then live delivery woken by `watch_head`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_projection_catch_up_and_live() {
    let (_dir, db) = sqlite().await;
    let store = MemoryStore::new();
    let head = append_accounts(&store, 0, 700, 7, 5).await;
    let runner = ProjectionRunner::new(Balances::new("bal", "m"), store.clone(), db.clone())
        .options(options(64).poll_interval(Duration::from_secs(3600)));
    let worker = Worker::new()
        .add_subscriber(runner)
        .start()
        .expect("unique subscriber names");
    live_at(&worker, "bal", head).await;
    let head = append_accounts(&store, 700, 3, 1, 5).await;
    applied_through(&db, "bal", head).await;
    assert_eq!(read_model(&db, "bal").await, expected_all(&store).await);
    worker.shutdown().await;
}

/// Two workers with in-memory leases run the same external projection:
/// one is active, the other stands by; when the active one shuts down the
/// other takes over from its checkpoint, and every event is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_leases_one_active_worker_and_failover() {
    let store = MemoryStore::new();
    let leases = MemoryLeases::new();
    let checkpoints = MemoryCheckpoints::fenced_by(leases.clone());
    let ttl = Duration::from_millis(300);
    let recorder_a = Recorder::new(None);
    let recorder_b = Recorder::new(None);
    let runner = |recorder: &Recorder| {
        ExternalRunner::new(recorder.clone(), store.clone(), checkpoints.clone())
            .options(options(10))
    };
    let a = Worker::new()
        .owner("a")
        .with_leases(leases.clone(), ttl)
        .add_subscriber(runner(&recorder_a))
        .start()
        .expect("unique subscriber names");
    let head = append_accounts(&store, 0, 50, 5, 2).await;
    live_at(&a, "ext", head).await;
    let b = Worker::new()
        .owner("b")
        .with_leases(leases.clone(), ttl)
        .add_subscriber(runner(&recorder_b))
        .start()
        .expect("unique subscriber names");
    until("`b` standing by", WAIT, || {
        (status(&b, "ext").state == SubscriberState::Standby).then_some(())
    })
    .await;
    let head = append_accounts(&store, 50, 20, 5, 2).await;
    live_at(&a, "ext", head).await;
    tokio::time::sleep(ttl).await; // several renewals: still a's
    assert_eq!(status(&b, "ext").state, SubscriberState::Standby);
    assert!(recorder_b.seen().is_empty(), "the standby handled events");

    a.shutdown().await;
    let head = append_accounts(&store, 70, 30, 5, 2).await;
    live_at(&b, "ext", head).await;
    let mut all = recorder_a.seen();
    all.extend(recorder_b.seen());
    assert_eq!(
        all,
        (1..=100).collect::<Vec<_>>(),
        "each event once, in order"
    );
    assert_eq!(recorder_b.seen().first(), Some(&71));
    b.shutdown().await;
    assert_eq!(
        checkpoints.load_checkpoint("ext").await.unwrap(),
        Some(head)
    );
}

/// `read_all_pages` sanity for the helpers: the log's account events are
/// what `expected_all` folds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_model_matches_the_log() {
    let store = MemoryStore::new();
    append_accounts(&store, 0, 30, 4, 3).await;
    let events: Vec<StoredEvent> = read_all_pages(&store, Position::ORIGIN, None, 7)
        .try_collect()
        .await
        .unwrap();
    let model = expected_all(&store).await;
    assert_eq!(model.applied.len(), events.len());
    let total: i64 = model.balances.values().map(|(b, _)| b).sum();
    let folded: i64 = events
        .iter()
        .map(|e| {
            aftermath_tests::projections::delta(&e.decode_known::<AccountEvent>().unwrap().event)
        })
        .sum();
    assert_eq!(total, folded);
}
