//! Projections, checkpoints, leases, fencing and parked inbox messages on
//! PostgreSQL: the store is the event log, the read-model database
//! (`ReadModelDb`, transactions of `PgTx`), the checkpoint store, the lease
//! store and the inbox's parking lot. The read model is
//! [`PgBalances`], whose `applied` table has the event's position as its
//! primary key: an event applied twice fails the batch, a lost one is a
//! missing row.
//!
//! Runs when `AFTERMATH_PG_URL` is set; every test gets a fresh schema
//! (dropped afterwards) and prints SKIPPED otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aftermath::projection::{
    Commit, ExternalProjection, ExternalRunner, HandlerError, OnError, ProjectionOptions,
    ProjectionRunner, ProjectionState, ReadModelDb, TxWork, tx_work,
};
use aftermath::store::postgres::PgTx;
use aftermath::subscription::{CheckpointStore, Lease, LeaseStore};
use aftermath::worker::{SubscriberError, SubscriberState, Worker};
use aftermath::{EventStore, Position, PostgresStore, Recorded, StoreError, StoredEvent};
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::postgres::{PgBalances, fresh, raw, read_applied_by, read_model};
use aftermath_tests::projections::{append_accounts, expected, expected_all, until};
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;

const WAIT: Duration = Duration::from_secs(20);

macro_rules! fresh_or_skip {
    ($test:literal) => {
        match fresh($test).await {
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

async fn state(store: &PostgresStore, name: &str) -> Option<ProjectionState> {
    ReadModelDb::load_state(store, name)
        .await
        .expect("load state")
}

async fn log(store: &PostgresStore) -> Vec<StoredEvent> {
    use futures::TryStreamExt;
    aftermath::store::read_all_pages(store, Position::ORIGIN, None, 1000)
        .try_collect()
        .await
        .expect("read $all")
}

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

/// From the origin: every event applied once through `PgTx`, the checkpoint
/// at the head in the same transactions; running again applies nothing (a
/// second apply would violate the `applied` primary key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_from_origin_applies_every_event_once() {
    let (guard, store) = fresh_or_skip!("catch_up_from_origin_applies_every_event_once");
    let head = append_accounts(&store, 0, 1000, 7, 5).await;
    let runner = ProjectionRunner::new(
        PgBalances::new(&guard.schema, "bal", "r1"),
        store.clone(),
        store.clone(),
    )
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
    assert_eq!(runner.catch_up().await.unwrap(), head);
    assert_eq!(read_model(&store, "bal").await, want);
}

/// A new store handle (a restarted process) continues after the saved
/// checkpoint: the first run's events are not applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_continues_from_saved_checkpoint() {
    let (guard, store) = fresh_or_skip!("restart_continues_from_saved_checkpoint");
    append_accounts(&store, 0, 500, 10, 4).await;
    let first_head = {
        let runner = ProjectionRunner::new(
            PgBalances::new(&guard.schema, "bal", "first"),
            store.clone(),
            store.clone(),
        )
        .options(options(100));
        runner.catch_up().await.unwrap()
    };
    drop(store);
    let store = aftermath_tests::postgres::connect(&guard.url, &guard.schema).await;
    assert_eq!(state(&store, "bal").await.unwrap().position, first_head);
    let head = append_accounts(&store, 500, 300, 10, 4).await;
    let runner = ProjectionRunner::new(
        PgBalances::new(&guard.schema, "bal", "second"),
        store.clone(),
        store.clone(),
    )
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

/// A failing handler rolls the whole batch back (read model and
/// checkpoint), is retried, and the read model ends exact: the rows written
/// before the failure in the rolled-back attempt left no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_batch_rolls_back_and_is_retried() {
    let (guard, store) = fresh_or_skip!("failed_batch_rolls_back_and_is_retried");
    append_accounts(&store, 0, 100, 10, 3).await;
    let fortieth = log(&store).await[39].position;
    let failures = Arc::new(AtomicU64::new(0));
    let f = failures.clone();
    let projection = PgBalances::new(&guard.schema, "bal", "t").hook(move |event| {
        if event.position == fortieth && f.fetch_add(1, Ordering::SeqCst) < 3 {
            return Err(HandlerError::msg("flaky dependency"));
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
    runner.catch_up().await.unwrap();
    assert_eq!(
        failures.load(Ordering::SeqCst),
        4,
        "3 failures, then success"
    );
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
}

/// An `apply` that never finishes (a hung call inside the batch's
/// transaction) fails its event after `call_timeout`: the batch rolls back
/// and is retried, and the read model ends exact. Without the timeout the
/// runner would wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_apply_times_out_and_is_retried() {
    let (guard, store) = fresh_or_skip!("hung_apply_times_out_and_is_retried");
    append_accounts(&store, 0, 60, 6, 3).await;
    let twentieth = log(&store).await[19].position;
    let (projection, hung) = PgBalances::new(&guard.schema, "bal", "t").hang_once_at(twentieth.0);
    let runner = ProjectionRunner::new(projection, store.clone(), store.clone()).options(
        ProjectionOptions {
            retry_delay: Duration::from_millis(1),
            ..options(16)
        }
        .call_timeout(Duration::from_millis(300))
        .attempts(2),
    );
    tokio::time::timeout(WAIT, runner.catch_up())
        .await
        .expect("the hung apply was not timed out")
        .unwrap();
    assert!(
        hung.load(Ordering::SeqCst),
        "the apply at {twentieth} never hung"
    );
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
}

/// Bumping the version resets the read model (through `PgTx`) and replays;
/// the same version again only continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_bump_rebuilds_on_start() {
    let (guard, store) = fresh_or_skip!("version_bump_rebuilds_on_start");
    append_accounts(&store, 0, 300, 10, 3).await;
    let v1 = ProjectionRunner::new(
        PgBalances::new(&guard.schema, "bal", "v1"),
        store.clone(),
        store.clone(),
    );
    v1.catch_up().await.unwrap();
    let v2 = PgBalances::new(&guard.schema, "bal", "v2").version(2);
    let resets = v2.resets();
    let runner =
        ProjectionRunner::new(v2.clone(), store.clone(), store.clone()).options(options(64));
    let head = runner.catch_up().await.unwrap();
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
    assert!(
        read_applied_by(&store, "bal")
            .await
            .iter()
            .all(|(_, by)| by == "v2")
    );
    assert_eq!(
        state(&store, "bal").await,
        Some(ProjectionState {
            version: 2,
            position: head
        })
    );
    let head = append_accounts(&store, 300, 20, 10, 3).await;
    assert_eq!(runner.catch_up().await.unwrap(), head);
    assert_eq!(resets.load(Ordering::SeqCst), 1, "no second reset");
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
}

/// `OnError::Skip` records the events that keep failing in the `skipped`
/// table, in the transaction that moves the checkpoint past them; `Stop`
/// stops just before the first, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_events_stop_or_are_skipped_and_listed() {
    let (guard, store) = fresh_or_skip!("failing_events_stop_or_are_skipped_and_listed");
    append_accounts(&store, 0, 50, 5, 3).await;
    let all = log(&store).await;
    let head = store.head().await.unwrap();
    let bad: Vec<Position> = vec![all[29].position, all[49].position];
    let failing = |name: &str| {
        let bad = bad.clone();
        PgBalances::new(&guard.schema, name, "e").hook(move |event| {
            if bad.contains(&event.position) {
                Err(HandlerError::msg(format!(
                    "cannot apply {}",
                    event.position
                )))
            } else {
                Ok(())
            }
        })
    };
    let fast = |on_error| {
        ProjectionOptions {
            retry_delay: Duration::from_millis(1),
            ..options(100)
        }
        .attempts(2)
        .on_error(on_error)
    };

    let stop = ProjectionRunner::new(failing("stopped"), store.clone(), store.clone())
        .options(fast(OnError::Stop));
    match stop.catch_up().await {
        Err(SubscriberError::Event {
            subscriber,
            position,
            stream,
            ..
        }) => {
            assert_eq!(
                (subscriber.as_str(), position, stream.as_str()),
                ("stopped", bad[0], all[29].stream.as_str())
            );
        }
        other => panic!("expected an event error, got {other:?}"),
    }
    assert_eq!(
        state(&store, "stopped").await.unwrap().position,
        all[28].position
    );
    assert_eq!(
        read_model(&store, "stopped").await,
        expected(&store, Position::ORIGIN, all[28].position).await
    );

    let skip = ProjectionRunner::new(failing("bal"), store.clone(), store.clone())
        .options(fast(OnError::Skip));
    assert_eq!(skip.catch_up().await.unwrap(), head);
    let want: Vec<u64> = all
        .iter()
        .map(|e| e.position)
        .filter(|p| !bad.contains(p))
        .map(|p| p.0)
        .collect();
    assert_eq!(read_model(&store, "bal").await.applied, want);
    let skipped = store.skipped(Some("bal")).await.unwrap();
    assert_eq!(skipped.iter().map(|s| s.position).collect::<Vec<_>>(), bad);
    for (s, e) in skipped.iter().zip([&all[29], &all[49]]) {
        assert_eq!(s.subscriber, "bal");
        assert_eq!(
            (s.stream.as_str(), s.version),
            (e.stream.as_str(), e.version)
        );
        assert_eq!(s.event_type, e.event_type);
        assert!(s.error.contains("cannot apply"), "{}", s.error);
    }
    assert_eq!(store.skipped(None).await.unwrap(), skipped);
    assert!(store.skipped(Some("other")).await.unwrap().is_empty());
    assert_eq!(state(&store, "bal").await.unwrap().position, head);
    assert_eq!(skip.catch_up().await.unwrap(), head);
    assert_eq!(store.skipped(None).await.unwrap().len(), 2, "skipped once");
}

/// After another owner took an expired lease over, the stale owner's fenced
/// writes (projection transaction, checkpoint save, renewal, rebuild) fail
/// with `LeaseLost` and change nothing; the new owner's succeed; releasing
/// frees the lease at once; expiry is the database's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_owner_fenced_write_fails_with_lease_lost() {
    let (guard, store) = fresh_or_skip!("stale_owner_fenced_write_fails_with_lease_lost");
    let marks = format!("\"{}\".marks", guard.schema);
    let ttl = Duration::from_millis(400);
    let a = store
        .acquire("bal", &holder("a"), ttl)
        .await
        .unwrap()
        .expect("free");
    assert_eq!(a.token, 1);
    let left = a.expires_at - chrono::Utc::now();
    assert!(
        left > chrono::Duration::milliseconds(200) && left < chrono::Duration::seconds(5),
        "expires in {left}"
    );
    assert!(
        store
            .acquire("bal", &holder("b"), ttl)
            .await
            .unwrap()
            .is_none()
    );
    // Same owner again: the same token.
    assert_eq!(
        store
            .acquire("bal", &holder("a"), ttl)
            .await
            .unwrap()
            .unwrap()
            .token,
        1
    );
    let sql = format!("CREATE TABLE {marks} (who text)");
    let work: TxWork<PostgresStore, ()> = tx_work::<PostgresStore, _, _>(move |tx| {
        Box::pin(async move {
            raw_sql(AssertSqlSafe(sql))
                .execute(tx.conn())
                .await
                .unwrap();
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

    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let b = store
        .acquire("bal", &holder("b"), ttl)
        .await
        .unwrap()
        .expect("expired");
    assert_eq!(b.token, 2, "a takeover bumps the token");

    let insert = format!("INSERT INTO {marks} VALUES ('a')");
    let work: TxWork<PostgresStore, ()> = tx_work::<PostgresStore, _, _>(move |tx| {
        Box::pin(async move {
            query(AssertSqlSafe(insert))
                .execute(&mut **tx)
                .await
                .unwrap();
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
    let runner = ProjectionRunner::new(
        PgBalances::new(&guard.schema, "bal", "a"),
        store.clone(),
        store.clone(),
    );
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
    let count: i64 = query(AssertSqlSafe(format!("SELECT count(*) FROM {marks}")))
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "the stale owner's read-model write rolled back");
    // a releasing its stale lease does not free b's.
    store.release(&a).await.unwrap();
    assert!(
        store
            .acquire("bal", &holder("c"), ttl)
            .await
            .unwrap()
            .is_none()
    );
    let b = store.renew(&b, ttl).await.unwrap();
    let work: TxWork<PostgresStore, ()> =
        tx_work::<PostgresStore, _, _>(|_| Box::pin(async { Ok(()) }));
    store
        .transact(commit("bal", 9, Some(&b)), work)
        .await
        .unwrap()
        .unwrap();
    CheckpointStore::save(&store, "ext", None, Position(9), Some(&b))
        .await
        .unwrap();
    assert_eq!(state(&store, "bal").await.unwrap().position, Position(9));
    store.release(&b).await.unwrap();
    let c = store
        .acquire("bal", &holder("c"), ttl)
        .await
        .unwrap()
        .expect("released");
    assert_eq!(c.token, 3);
}

/// The fence is checked when the batch commits, not when it starts: a
/// takeover while the batch's work runs makes the batch fail with
/// `LeaseLost` (nothing of it committed). And the converse: while a fenced
/// write holds the lease row (its share lock, from the check to the
/// commit), a takeover waits for it, so the write never lands after the
/// takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_is_checked_atomically_with_the_commit() {
    let (guard, store) = fresh_or_skip!("fence_is_checked_atomically_with_the_commit");
    let ttl = Duration::from_millis(300);
    let a = store
        .acquire("bal", &holder("a"), ttl)
        .await
        .unwrap()
        .unwrap();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
    let sql = format!("CREATE TABLE \"{}\".during (x int)", guard.schema);
    let work: TxWork<PostgresStore, ()> = tx_work::<PostgresStore, _, _>(move |tx| {
        Box::pin(async move {
            raw_sql(AssertSqlSafe(sql))
                .execute(tx.conn())
                .await
                .unwrap();
            let _ = started_tx.send(());
            let _ = go.await;
            Ok(())
        })
    });
    let batch = {
        let store = store.clone();
        let a = a.clone();
        tokio::spawn(async move { store.transact(commit("bal", 7, Some(&a)), work).await })
    };
    started.await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let b = store
        .acquire("bal", &holder("b"), ttl)
        .await
        .unwrap()
        .expect("expired");
    go_tx.send(()).unwrap();
    assert!(matches!(
        batch.await.unwrap(),
        Err(StoreError::LeaseLost { token: 1, .. })
    ));
    assert!(state(&store, "bal").await.is_none());
    let exists: bool = query("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("\"{}\".during", guard.schema))
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "the batch's work rolled back");

    // A fenced write in flight (emulated: the same share lock, held open)
    // makes a takeover of the expired lease wait until it commits.
    let mut writer = raw(&guard.url).await;
    writer.execute("BEGIN").await.unwrap();
    let held = query(AssertSqlSafe(format!(
        "SELECT 1 FROM \"{}\".leases WHERE name = 'bal' AND owner = 'b' AND token = $1 FOR SHARE",
        guard.schema
    )))
    .bind(b.token as i64)
    .fetch_optional(&mut writer)
    .await
    .unwrap();
    assert!(held.is_some());
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let takeover = {
        let store = store.clone();
        tokio::spawn(async move { store.acquire("bal", &holder("c"), ttl).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !takeover.is_finished(),
        "the takeover waits for the fenced write"
    );
    writer.execute("COMMIT").await.unwrap();
    let c = takeover.await.unwrap().unwrap().expect("expired");
    assert_eq!(c.token, 3);
}

/// Checkpoints hold any `u64` position exactly (`numeric`), and a plain
/// checkpoint save does not carry a projection version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_hold_any_position() {
    let (_guard, store) = fresh_or_skip!("checkpoints_hold_any_position");
    assert_eq!(
        CheckpointStore::load_checkpoint(&store, "x").await.unwrap(),
        None
    );
    for p in [
        0,
        1,
        i64::MAX as u64,
        i64::MAX as u64 + 1,
        u64::MAX - 1,
        u64::MAX,
    ] {
        CheckpointStore::save(&store, "x", None, Position(p), None)
            .await
            .unwrap();
        assert_eq!(
            CheckpointStore::load_checkpoint(&store, "x").await.unwrap(),
            Some(Position(p))
        );
    }
    assert_eq!(state(&store, "x").await.unwrap().version, 0);
}

/// Two workers (owners a and b) run the same projection with leases in the
/// store: a is active, b stands by; a's graceful shutdown releases the lease
/// and b takes over at once; every event applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_hand_over_through_leases() {
    let (guard, store) = fresh_or_skip!("workers_hand_over_through_leases");
    let head = append_accounts(&store, 0, 300, 10, 4).await;
    let ttl = Duration::from_secs(30);
    let worker = |owner: &str| {
        Worker::new()
            .owner(owner)
            .with_leases(store.clone(), ttl)
            .add_subscriber(
                ProjectionRunner::new(
                    PgBalances::new(&guard.schema, "bal", owner),
                    store.clone(),
                    store.clone(),
                )
                .options(options(50)),
            )
            .start()
            .expect("unique subscriber names")
    };
    let a = worker("a");
    until("a live", WAIT, || {
        let s = a.status_of("bal").unwrap();
        (s.state == SubscriberState::Live && s.lag.position == head).then_some(())
    })
    .await;
    let b = worker("b");
    until("b standing by", WAIT, || {
        (b.status_of("bal").unwrap().state == SubscriberState::Standby).then_some(())
    })
    .await;
    a.shutdown().await;
    // Released: b takes over long before the 30 s TTL.
    let head = append_accounts(&store, 300, 50, 10, 4).await;
    until("b live", WAIT, || {
        let s = b.status_of("bal").unwrap();
        (s.state == SubscriberState::Live && s.lag.position == head).then_some(())
    })
    .await;
    b.shutdown().await;
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
    let by = read_applied_by(&store, "bal").await;
    assert!(by.iter().take(300).all(|(_, who)| who == "a"));
    assert!(by.iter().skip(300).all(|(_, who)| who == "b"));
}

/// An external projection with its checkpoint in PostgreSQL: saved by the
/// policy, and a restart continues after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_projection_checkpoints_in_postgres() {
    #[derive(Clone, Default)]
    struct Seen(Arc<std::sync::Mutex<Vec<Position>>>);
    #[async_trait::async_trait]
    impl ExternalProjection for Seen {
        type Event = AccountEvent;
        fn name(&self) -> &str {
            "ext"
        }
        async fn handle(&self, event: &Recorded<AccountEvent>) -> Result<(), HandlerError> {
            self.0.lock().unwrap().push(event.position);
            Ok(())
        }
    }
    let (_guard, store) = fresh_or_skip!("external_projection_checkpoints_in_postgres");
    let head = append_accounts(&store, 0, 40, 4, 2).await;
    let seen = Seen::default();
    let worker = Worker::new()
        .add_subscriber(
            ExternalRunner::new(seen.clone(), store.clone(), store.clone()).options(options(16)),
        )
        .start()
        .expect("unique subscriber names");
    until("all seen", WAIT, || {
        (seen.0.lock().unwrap().len() == 40).then_some(())
    })
    .await;
    worker.shutdown().await;
    assert_eq!(
        CheckpointStore::load_checkpoint(&store, "ext")
            .await
            .unwrap(),
        Some(head)
    );
    let more = append_accounts(&store, 40, 5, 5, 2).await;
    let again = Seen::default();
    let worker = Worker::new()
        .add_subscriber(
            ExternalRunner::new(again.clone(), store.clone(), store.clone()).options(options(16)),
        )
        .start()
        .expect("unique subscriber names");
    until("new events seen", WAIT, || {
        (again.0.lock().unwrap().len() == 5).then_some(())
    })
    .await;
    worker.shutdown().await;
    assert!(again.0.lock().unwrap().iter().all(|p| *p > head));
    assert_eq!(
        CheckpointStore::load_checkpoint(&store, "ext")
            .await
            .unwrap(),
        Some(more)
    );
}

/// A projection of `PgTx` writes through a plain `sqlx` executor borrowed
/// from the transaction, so any query of the user's own works, and reads
/// its own uncommitted writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgtx_is_a_plain_sqlx_connection_in_the_transaction() {
    let (guard, store) = fresh_or_skip!("pgtx_is_a_plain_sqlx_connection_in_the_transaction");
    let table = format!("\"{}\".t", guard.schema);
    let work: TxWork<PostgresStore, (i64, bool)> = tx_work::<PostgresStore, _, _>(move |tx| {
        Box::pin(async move {
            async fn inner(tx: &mut PgTx, table: &str) -> Result<(i64, bool), sqlx_core::Error> {
                raw_sql(AssertSqlSafe(format!(
                    "CREATE TABLE {table} (x int); INSERT INTO {table} VALUES (1), (2)"
                )))
                .execute(tx.conn())
                .await?;
                let n: i64 = query(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                    .fetch_one(&mut **tx)
                    .await?
                    .get(0);
                let in_tx: bool = query("SELECT now() = statement_timestamp()")
                    .fetch_one(tx.conn())
                    .await?
                    .get(0);
                Ok((n, in_tx))
            }
            inner(tx, &table)
                .await
                .map_err(|e| aftermath::projection::HandlerFailure {
                    index: 0,
                    error: e.into(),
                })
        })
    });
    let (n, same_instant) = store
        .transact(commit("t", 1, None), work)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 2);
    assert!(!same_instant, "inside one transaction (now() is its start)");
}

/// Parked inbox messages (feature `nats`): parking is idempotent per inbox
/// and message id, listed oldest first, looked up, and cleaned up by age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_parks_messages() {
    use aftermath::nats::{InboxStore, ParkedMessage};
    let (_guard, store) = fresh_or_skip!("inbox_parks_messages");
    let now = chrono::Utc::now();
    let message = |inbox: &str, id: &str, age: i64| ParkedMessage {
        inbox: inbox.to_owned(),
        message_id: id.to_owned(),
        subject: "orders.placed".to_owned(),
        payload: vec![0, 159, 146, 150],
        error: "no such order".to_owned(),
        parked_at: now - chrono::Duration::days(age),
    };
    let old = message("orders", "m-1", 10);
    let recent = message("orders", "m-2", 1);
    let other = message("billing", "m-1", 5);
    for m in [&old, &recent, &other] {
        store.park(m).await.unwrap();
    }
    // A second park of the same message keeps the first.
    store
        .park(&ParkedMessage {
            error: "again".to_owned(),
            ..old.clone()
        })
        .await
        .unwrap();
    assert!(store.is_parked("orders", "m-1").await.unwrap());
    assert!(!store.is_parked("orders", "m-3").await.unwrap());
    let listed = store.parked_messages(Some("orders")).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].message_id, "m-1");
    assert_eq!(listed[0].error, "no such order");
    assert_eq!(listed[0].payload, old.payload);
    assert_eq!(
        listed[0].parked_at.timestamp_micros(),
        old.parked_at.timestamp_micros()
    );
    assert_eq!(store.parked_messages(None).await.unwrap().len(), 3);
    let cutoff = now - chrono::Duration::days(3);
    assert_eq!(store.cleanup_parked(cutoff).await.unwrap(), 2);
    let left = store.parked_messages(None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id, "m-2");
}
