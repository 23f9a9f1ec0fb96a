//! Fencing (issue 12, items 2, 3 and 9), per backend: compare-and-set
//! checkpoints, final journal states, lease holders unique per instance
//! (also with a fixed owner name), duplicate subscriber names, fast
//! takeover after the holder's process was SIGKILLed, a projection without
//! leases killed with its commit pending, and layouts fenced against
//! runners of an old layout.
//!
//! The PostgreSQL tests run when `AFTERMATH_PG_URL` is set and print a
//! SKIPPED line otherwise.

use std::time::Duration;

use aftermath::projection::{Projection, ProjectionOptions, ProjectionRunner, ReadModelDb};
use aftermath::reactor::{Effect, EffectJournal, EffectState, MemoryJournal};
use aftermath::subscription::{
    CheckpointStore, Holder, LeaseStore, MemoryCheckpoints, MemoryLeases,
};
use aftermath::worker::{SubscriberError, SubscriberState, Worker, WorkerError};
use aftermath::{Position, SqliteStore, StoreError};
use aftermath_tests::child::Child;
use aftermath_tests::postgres::{PgBalances, fresh, raw};
use aftermath_tests::projections::{Balances, append_accounts, expected_all, until};
use chrono::Utc;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use uuid::Uuid;

const HELPER: &str = env!("CARGO_BIN_EXE_sub_helper");
const WAIT: Duration = Duration::from_secs(20);

macro_rules! pg_or_skip {
    ($test:literal) => {
        match fresh($test).await {
            Some(fresh) => fresh,
            None => return,
        }
    };
}

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    (dir, store)
}

// ---------------------------------------------------------------------------
// Compare-and-set checkpoints.

/// A save commits only from the checkpoint it expects (no row = origin);
/// of many writers starting from the same checkpoint at once, exactly one
/// wins; `None` writes unconditionally.
async fn checkpoint_compare_and_set<C: CheckpointStore + Clone>(store: C) {
    let moved = |r: Result<(), StoreError>| matches!(r, Err(StoreError::CheckpointMoved { .. }));
    store
        .save("cas", Some(Position::ORIGIN), Position(5), None)
        .await
        .unwrap();
    assert!(
        moved(
            store
                .save("cas", Some(Position::ORIGIN), Position(7), None)
                .await
        ),
        "a second writer from the origin must lose"
    );
    assert_eq!(
        store.load_checkpoint("cas").await.unwrap(),
        Some(Position(5))
    );
    store
        .save("cas", Some(Position(5)), Position(9), None)
        .await
        .unwrap();
    assert!(moved(
        store
            .save("missing", Some(Position(3)), Position(4), None)
            .await
    ));
    assert_eq!(store.load_checkpoint("missing").await.unwrap(), None);
    store.save("cas", None, Position(1), None).await.unwrap();
    assert_eq!(
        store.load_checkpoint("cas").await.unwrap(),
        Some(Position(1))
    );

    // Racing writers, on a new row and on an existing one.
    for (name, from) in [("race", Position::ORIGIN), ("cas", Position(1))] {
        let tasks: Vec<_> = (0..8u64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .save(name, Some(from), Position(100 + i), None)
                        .await
                        .map(|()| i)
                })
            })
            .collect();
        let mut won = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(i) => won.push(i),
                Err(StoreError::CheckpointMoved { .. }) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(won.len(), 1, "exactly one racing writer wins on `{name}`");
        assert_eq!(
            store.load_checkpoint(name).await.unwrap(),
            Some(Position(100 + won[0]))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_compare_and_set_memory() {
    checkpoint_compare_and_set(MemoryCheckpoints::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_compare_and_set_sqlite() {
    let (_dir, store) = sqlite().await;
    checkpoint_compare_and_set(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_compare_and_set_postgres() {
    let (_guard, store) = pg_or_skip!("checkpoint_compare_and_set_postgres");
    checkpoint_compare_and_set(store).await;
}

// ---------------------------------------------------------------------------
// The effect journal never goes backwards.

async fn done_stays_done<J: EffectJournal>(journal: J) {
    let now = Utc::now();
    let effect = |id: Uuid, state: EffectState| Effect {
        reactor: "notify".to_owned(),
        event_id: id,
        position: Position(3),
        stream: "account-1".to_owned(),
        event_type: "Deposited".to_owned(),
        state,
        attempts: 1,
        last_error: None,
        created_at: now,
        updated_at: now,
    };
    let (done, skipped, open) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for state in [EffectState::Started, EffectState::Done] {
        journal.record(&effect(done, state), None).await.unwrap();
    }
    for state in [EffectState::Started, EffectState::Parked] {
        journal.record(&effect(skipped, state), None).await.unwrap();
    }
    assert!(journal.skip("notify", skipped).await.unwrap());
    // Late writes of a stale runner.
    for id in [done, skipped] {
        for state in [
            EffectState::Started,
            EffectState::Failed,
            EffectState::Parked,
            EffectState::RetryRequested,
        ] {
            let late = Effect {
                attempts: 2,
                last_error: Some("late".to_owned()),
                ..effect(id, state)
            };
            journal.record(&late, None).await.unwrap();
        }
    }
    // Transitions that are not final still happen.
    for state in [EffectState::Started, EffectState::Failed] {
        journal.record(&effect(open, state), None).await.unwrap();
    }
    let found = journal
        .load("notify", &[done, skipped, open])
        .await
        .unwrap();
    assert_eq!(found[&done].state, EffectState::Done);
    assert_eq!(found[&done].attempts, 1);
    assert_eq!(found[&skipped].state, EffectState::Skipped);
    assert_eq!(found[&open].state, EffectState::Failed);
    let held: Vec<Uuid> = journal
        .held("notify")
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(held, vec![open], "final entries hold nothing back");
}

#[tokio::test]
async fn journal_done_stays_done_memory() {
    done_stays_done(MemoryJournal::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_done_stays_done_sqlite() {
    let (_dir, store) = sqlite().await;
    done_stays_done(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_done_stays_done_postgres() {
    let (_guard, store) = pg_or_skip!("journal_done_stays_done_postgres");
    done_stays_done(store).await;
}

// ---------------------------------------------------------------------------
// Lease holders are instances, not owner names.

/// Two instances with the same owner name: the second does not get a held
/// lease; after a takeover (expiry) the first one's renewal and fenced
/// writes fail with `LeaseLost`.
async fn same_owner_two_instances<L: LeaseStore, C: CheckpointStore>(leases: &L, checkpoints: &C) {
    let ttl = Duration::from_millis(300);
    let (a, b) = (Holder::new("host-1"), Holder::new("host-1"));
    let la = leases.acquire("sub", &a, ttl).await.unwrap().expect("free");
    assert!(
        leases.acquire("sub", &b, ttl).await.unwrap().is_none(),
        "another instance with the same owner name must not get a held lease"
    );
    let again = leases.acquire("sub", &a, ttl).await.unwrap().expect("ours");
    assert_eq!(again.token, la.token, "the same instance keeps its token");
    checkpoints
        .save("sub", Some(Position::ORIGIN), Position(3), Some(&la))
        .await
        .unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let lb = leases
        .acquire("sub", &b, ttl)
        .await
        .unwrap()
        .expect("expired");
    assert!(lb.token > la.token, "a takeover bumps the token");
    assert!(matches!(
        leases.renew(&la, ttl).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        checkpoints
            .save("sub", Some(Position(3)), Position(8), Some(&la))
            .await,
        Err(StoreError::LeaseLost { .. })
    ));
    checkpoints
        .save("sub", Some(Position(3)), Position(9), Some(&lb))
        .await
        .unwrap();
    assert_eq!(
        checkpoints.load_checkpoint("sub").await.unwrap(),
        Some(Position(9))
    );
}

#[tokio::test]
async fn same_owner_name_is_fenced_memory() {
    let leases = MemoryLeases::new();
    let checkpoints = MemoryCheckpoints::fenced_by(leases.clone());
    same_owner_two_instances(&leases, &checkpoints).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_owner_name_is_fenced_sqlite() {
    let (_dir, store) = sqlite().await;
    same_owner_two_instances(&store, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_owner_name_is_fenced_postgres() {
    let (_guard, store) = pg_or_skip!("same_owner_name_is_fenced_postgres");
    same_owner_two_instances(&store, &store).await;
}

/// Two workers configured with the same owner name run one projection with
/// leases: one runs it, the other stands by, and the read model is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_one_owner_name_run_one_projection() {
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 600, 6, 5).await;
    let worker = |tag: &str| {
        let runner = ProjectionRunner::new(Balances::new("bal", tag), store.clone(), store.clone())
            .options(
                ProjectionOptions::default()
                    .batch_size(50)
                    .poll_interval(Duration::from_millis(20)),
            );
        Worker::new()
            .owner("host-1")
            .with_leases(store.clone(), Duration::from_secs(30))
            .add_subscriber(runner)
            .start()
            .expect("unique subscriber names")
    };
    let (w1, w2) = (worker("w1"), worker("w2"));
    assert_ne!(w1.instance(), w2.instance());
    let head = aftermath::EventStore::head(&store).await.unwrap();
    until("one worker live at the head", WAIT, || {
        let states: Vec<_> = [&w1, &w2]
            .iter()
            .map(|w| w.status_of("bal").unwrap())
            .collect();
        let live = states
            .iter()
            .filter(|s| s.state == SubscriberState::Live && s.lag.position >= head)
            .count();
        let standby = states
            .iter()
            .filter(|s| s.state == SubscriberState::Standby)
            .count();
        (live == 1 && standby == 1).then_some(())
    })
    .await;
    // Still so a moment later (the standby never got the lease).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let standby = [&w1, &w2]
        .iter()
        .filter(|w| w.status_of("bal").unwrap().state == SubscriberState::Standby)
        .count();
    assert_eq!(standby, 1);
    let model = aftermath_tests::projections::read_model(&store, "bal").await;
    assert_eq!(model, expected_all(&store).await);
    let tags: std::collections::BTreeSet<String> =
        aftermath_tests::projections::read_applied_by(&store, "bal")
            .await
            .into_iter()
            .map(|(_, tag)| tag)
            .collect();
    assert_eq!(tags.len(), 1, "one worker applied everything: {tags:?}");
    w1.shutdown().await;
    w2.shutdown().await;
}

// ---------------------------------------------------------------------------
// Duplicate subscriber names.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_subscriber_names_fail_at_start() {
    let (_dir, store) = sqlite().await;
    let runner =
        |tag: &str| ProjectionRunner::new(Balances::new("bal", tag), store.clone(), store.clone());
    let started = Worker::new()
        .add_subscriber(runner("a"))
        .add_subscriber(ProjectionRunner::new(
            Balances::new("other", "b"),
            store.clone(),
            store.clone(),
        ))
        .add_subscriber(runner("c"))
        .start();
    match started {
        Err(WorkerError::DuplicateSubscriber {
            name,
            first,
            second,
        }) => {
            assert_eq!((name.as_str(), first, second), ("bal", 0, 2));
        }
        Err(other) => panic!("expected a duplicate name, got {other}"),
        Ok(_) => panic!("two subscribers named `bal` started"),
    }
    // Nothing ran.
    assert_eq!(ReadModelDb::load_state(&store, "bal").await.unwrap(), None);
    assert_eq!(
        ReadModelDb::load_state(&store, "other").await.unwrap(),
        None
    );
}

// ---------------------------------------------------------------------------
// Fast takeover after SIGKILL.

/// A worker with a 30 s lease is SIGKILLed; its successor (another owner
/// name) resumes while the dead holder's lease is still unexpired: the
/// store saw the holder's process gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_resumes_before_the_ttl_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let db = path.to_str().unwrap().to_owned();
    let store = SqliteStore::open(&path).await.unwrap();
    append_accounts(&store, 0, 300, 5, 4).await;
    let args = |owner: &str| {
        vec![
            "worker".to_owned(),
            db.clone(),
            "bal".to_owned(),
            owner.to_owned(),
            "30000".to_owned(),
            "50".to_owned(),
            "0".to_owned(),
        ]
    };
    let spawn = |name: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Child::spawn(HELPER, name, &args)
    };
    let mut first = spawn("first", args("first"));
    first.expect_line("first live", WAIT, |l| l.starts_with("LIVE"));
    let expires_at: i64 = store
        .read(|conn| {
            conn.query_row(
                "SELECT expires_at FROM aftermath_leases WHERE name = 'bal'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| StoreError::database("reading the lease", e))
        })
        .await
        .unwrap();
    first.kill();
    let head = append_accounts(&store, 300, 100, 5, 4).await.to_string();
    let mut second = spawn("second", args("second"));
    second.expect_line("second live at the head", WAIT, |l| {
        l.starts_with("LIVE") && l.ends_with(&format!(" {head}"))
    });
    assert!(
        Utc::now().timestamp_micros() < expires_at,
        "the successor resumed only after the dead holder's lease expired"
    );
    let (owner, token): (String, i64) = store
        .read(|conn| {
            conn.query_row(
                "SELECT owner, token FROM aftermath_leases WHERE name = 'bal'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| StoreError::database("reading the lease", e))
        })
        .await
        .unwrap();
    assert_eq!((owner.as_str(), token), ("second", 2));
    second.stop();
    second.expect_line("second stopped", WAIT, |l| l.starts_with("STOPPED"));
    assert_eq!(
        aftermath_tests::projections::read_model(&store, "bal").await,
        expected_all(&store).await
    );
}

/// The same on PostgreSQL: the holder's presence session ends with its
/// process, and the successor takes the lease over before it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_resumes_before_the_ttl_postgres() {
    let (guard, store) = pg_or_skip!("restart_after_sigkill_resumes_before_the_ttl_postgres");
    append_accounts(&store, 0, 300, 5, 4).await;
    let schema = guard.schema.clone();
    let spawn = |owner: &str| {
        let args = [
            "pgworker", &guard.url, &schema, "bal", owner, "30000", "50", "0", "1", "0",
        ];
        Child::spawn(HELPER, owner, &args)
    };
    let mut first = spawn("first");
    first.expect_line("first live", WAIT, |l| l.starts_with("LIVE"));
    // Microseconds since the epoch, by the database's clock (the lease's).
    let expires_at: i64 = query(AssertSqlSafe(format!(
        "SELECT (extract(epoch FROM expires_at) * 1000000)::bigint \
         FROM \"{schema}\".leases WHERE name = 'bal#0of1'"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap()
    .get(0);
    first.kill();
    let head = append_accounts(&store, 300, 100, 5, 4).await.to_string();
    let mut second = spawn("second");
    second.expect_line("second live at the head", WAIT, |l| {
        l.starts_with("LIVE") && l.ends_with(&format!(" {head}"))
    });
    let now: i64 = query("SELECT (extract(epoch FROM now()) * 1000000)::bigint")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert!(
        now < expires_at,
        "the successor resumed only after the dead holder's lease expired"
    );
    let (owner, token): (String, i64) = {
        let row = query(AssertSqlSafe(format!(
            "SELECT owner, token FROM \"{schema}\".leases WHERE name = 'bal#0of1'"
        )))
        .fetch_one(store.pool())
        .await
        .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((owner.as_str(), token), ("second", 2));
    second.stop();
    second.expect_line("second stopped", WAIT, |l| l.starts_with("STOPPED"));
    assert_eq!(
        aftermath_tests::postgres::read_model(&store, "bal").await,
        expected_all(&store).await
    );
}

// ---------------------------------------------------------------------------
// A projection without leases killed with its commit pending.

/// The projector process is SIGKILLed while its COMMIT waits (a deferred
/// trigger on the checkpoint table waits for a lock the test holds); a new
/// runner starts while that commit is still pending, and the old commit
/// completes afterwards. The new runner must not apply the batch again: its
/// compare-and-set finds the checkpoint moved, it re-reads and continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_without_leases_killed_with_commit_pending_postgres() {
    let (guard, store) =
        pg_or_skip!("projection_without_leases_killed_with_commit_pending_postgres");
    let schema = guard.schema.clone();
    let head = append_accounts(&store, 0, 400, 8, 6).await;
    // The gate: a commit that moves a checkpoint past the origin waits, at
    // COMMIT, for a shared advisory lock the test holds exclusively.
    let gate_key = format!("{schema}.gate");
    raw_sql(AssertSqlSafe(format!(
        "CREATE FUNCTION \"{schema}\".gate() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_advisory_xact_lock_shared(hashtext('{gate_key}')); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER gate AFTER INSERT OR UPDATE ON \"{schema}\".checkpoints
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.position > 0)
         EXECUTE FUNCTION \"{schema}\".gate();"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let mut gatekeeper = raw(&guard.url).await;
    query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(&gate_key)
        .execute(&mut gatekeeper)
        .await
        .unwrap();
    let keeper_pid: i32 = query("SELECT pg_backend_pid()")
        .fetch_one(&mut gatekeeper)
        .await
        .unwrap()
        .get(0);
    let blocked_by = |pid: i32| {
        let pool = store.pool().clone();
        async move {
            let pids: Vec<i32> =
                query("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                    .bind(pid)
                    .fetch_all(&pool)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
            pids
        }
    };

    // The first projector: one batch of everything, its COMMIT held.
    let mut first = Child::spawn(
        HELPER,
        "first",
        &["pgproject", &guard.url, &schema, "bal", "first", "1000"],
    );
    let old_backend = aftermath_tests::projections::eventually(
        "the first projector's commit to wait at the gate",
        WAIT,
        || async { blocked_by(keeper_pid).await.first().copied() },
    )
    .await;
    first.kill();

    // The second projector starts while that commit is pending.
    let runner = ProjectionRunner::new(
        PgBalances::new(&schema, "bal", "second"),
        store.clone(),
        store.clone(),
    )
    .options(ProjectionOptions::default().batch_size(1000));
    let second = tokio::spawn(async move { runner.catch_up().await });
    aftermath_tests::projections::eventually(
        "the second projector to wait behind the pending commit",
        WAIT,
        || async { (!blocked_by(old_backend).await.is_empty()).then_some(()) },
    )
    .await;
    // Let the old commit complete.
    query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(&gate_key)
        .execute(&mut gatekeeper)
        .await
        .unwrap();
    let reached = tokio::time::timeout(WAIT, second)
        .await
        .expect("the second projector finishes")
        .unwrap()
        .expect("the second projector catches up without error");
    assert!(reached >= head);
    assert_eq!(
        aftermath_tests::postgres::read_model(&store, "bal").await,
        expected_all(&store).await,
        "every event applied exactly once"
    );
    let tags: std::collections::BTreeSet<String> =
        aftermath_tests::postgres::read_applied_by(&store, "bal")
            .await
            .into_iter()
            .map(|(_, tag)| tag)
            .collect();
    assert_eq!(
        tags,
        ["first".to_owned()].into(),
        "the killed process's pending commit landed; the second applied nothing of it"
    );
}

/// SQLite, the same race in one process with two store handles (two
/// writers, as two processes would have): both runners read the checkpoint
/// before either commits; the second commit must not apply the batch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_without_leases_apply_each_event_once_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let other = SqliteStore::open(&path).await.unwrap();
    append_accounts(&store, 0, 300, 5, 4).await;
    let (read_tx, read_rx) = std::sync::mpsc::channel::<()>();
    let read_rx = std::sync::Mutex::new(read_rx);
    // The first runner's apply waits (on the writer thread, inside its
    // transaction) until the second has read its page.
    let first = ProjectionRunner::new(
        Balances::new("bal", "first").hook(move |event| {
            if event.position == Position(1) {
                let _ = read_rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
            }
            Ok(())
        }),
        store.clone(),
        store.clone(),
    )
    .options(ProjectionOptions::default().batch_size(1000));
    let second =
        ProjectionRunner::new(Balances::new("bal", "second"), other.clone(), other.clone())
            .options(ProjectionOptions::default().batch_size(1000));
    // The second loads the origin checkpoint while the first holds the
    // file's write lock with its batch applied but not committed; then the
    // first may commit. (In whichever order they get there, both start
    // from the origin, and the second's commits must not land over it.)
    let a = tokio::spawn(async move { first.catch_up().await });
    let b = tokio::spawn(async move { second.catch_up().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // (The first may have finished already, if the second went first.)
    let _ = read_tx.send(());
    let ra = a.await.unwrap();
    let rb = b.await.unwrap();
    assert!(ra.is_ok(), "{ra:?}");
    assert!(rb.is_ok(), "{rb:?}");
    assert_eq!(
        aftermath_tests::projections::read_model(&store, "bal").await,
        expected_all(&store).await,
        "every event applied exactly once"
    );
}

// ---------------------------------------------------------------------------
// Layout changes are fenced.

/// [`PgBalances`] whose first apply waits (asynchronously, before writing
/// anything) until the test opens the gate.
struct Gated {
    inner: PgBalances,
    entered: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    go: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Projection for Gated {
    type Event = aftermath_tests::domain::AccountEvent;
    type Db = aftermath::PostgresStore;

    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn setup(
        &self,
        tx: &mut aftermath::store::postgres::PgTx,
    ) -> Result<(), aftermath::projection::HandlerError> {
        self.inner.setup(tx).await
    }

    async fn reset(
        &self,
        tx: &mut aftermath::store::postgres::PgTx,
    ) -> Result<(), aftermath::projection::HandlerError> {
        self.inner.reset(tx).await
    }

    async fn apply(
        &self,
        tx: &mut aftermath::store::postgres::PgTx,
        event: &aftermath::Recorded<Self::Event>,
    ) -> Result<(), aftermath::projection::HandlerError> {
        let entered = self.entered.lock().unwrap().take();
        if let Some(entered) = entered {
            let _ = entered.send(());
            if let Some(go) = self.go.lock().await.take() {
                let _ = go.await;
            }
        }
        self.inner.apply(tx, event).await
    }
}

/// A partition runner of the old layout has a batch in flight (read, not
/// yet written) when an operator rebuilds the projection into another
/// partition count: the old batch must not commit into the new read model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_layout_cannot_commit_after_a_rebuild_postgres() {
    let (guard, store) = pg_or_skip!("old_layout_cannot_commit_after_a_rebuild_postgres");
    let schema = guard.schema.clone();
    append_accounts(&store, 0, 200, 5, 8).await;
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let (go_tx, go) = tokio::sync::oneshot::channel();
    // The old layout: 2 partitions; partition 0's first apply waits.
    let old = ProjectionRunner::new(
        Gated {
            inner: PgBalances::new(&schema, "bal", "old"),
            entered: std::sync::Mutex::new(Some(entered_tx)),
            go: tokio::sync::Mutex::new(Some(go)),
        },
        store.clone(),
        store.clone(),
    )
    .partition(0, 2)
    .options(ProjectionOptions::default().batch_size(1000).attempts(1));
    let old_run = tokio::spawn(async move { old.catch_up().await });
    tokio::time::timeout(WAIT, entered)
        .await
        .expect("the old runner is applying")
        .unwrap();
    // Meanwhile: a rebuild into 4 partitions, which completes.
    let new = |index: u32| {
        ProjectionRunner::new(
            PgBalances::new(&schema, "bal", "new"),
            store.clone(),
            store.clone(),
        )
        .partition(index, 4)
        .options(ProjectionOptions::default().batch_size(1000))
    };
    new(0).rebuild(None).await.expect("rebuild");
    // The old batch goes on.
    go_tx.send(()).unwrap();
    match old_run.await.unwrap() {
        Err(SubscriberError::Store {
            source: StoreError::Incompatible { .. },
            ..
        }) => {}
        other => panic!("the old layout's runner must stop on the new layout, got {other:?}"),
    }
    for index in 0..4 {
        new(index)
            .catch_up()
            .await
            .expect("new partition catches up");
    }
    assert_eq!(
        aftermath_tests::postgres::read_model(&store, "bal").await,
        expected_all(&store).await,
        "only the new layout's writes are in the read model"
    );
}
