//! Subscriptions across processes on one SQLite file, with the `sub_helper`
//! binary as the other process: cross-process delivery (the poll path),
//! lease takeover after the owner is SIGKILLed, and crash consistency of a
//! projection killed at random moments.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aftermath::projection::{ProjectionOptions, ProjectionRunner, ReadModelDb};
use aftermath::worker::{SubscriberState, Worker};
use aftermath::{EventStore, Position, SqliteStore};
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::projections::{
    Balances, Model, append_accounts, delta, expected_all, read_applied_by, read_model, until,
};
use futures::TryStreamExt;

const HELPER: &str = env!("CARGO_BIN_EXE_sub_helper");

use aftermath_tests::child::Child as Helper;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn lease_row(conn: &rusqlite::Connection, name: &str) -> Option<(String, i64)> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT owner, token FROM aftermath_leases WHERE name = ?1",
        [name],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .unwrap()
}

fn read_only(path: &Path) -> rusqlite::Connection {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

/// Another process appends while this one runs a projection worker: the
/// subscriber sees every event, through the cross-process poll (its own
/// `watch_head` never moves, since nothing is appended through it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_by_another_process_reach_the_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let runner =
        ProjectionRunner::new(Balances::new("bal", "parent"), store.clone(), store.clone())
            .options(
                ProjectionOptions::default()
                    .batch_size(100)
                    .poll_interval(Duration::from_millis(50)),
            );
    let worker = Worker::new()
        .add_subscriber(runner)
        .start()
        .expect("unique subscriber names");
    let mut appender = Helper::spawn(
        HELPER,
        "appender",
        &["append", path_str(&path), "0", "3000", "25", "7", "2"],
    );
    let mut seen_while_appending = false;
    let head = loop {
        if let Some(status) = appender.try_wait() {
            assert!(status.success());
            break Position(
                appender
                    .expect("DONE", Duration::from_secs(5))
                    .parse()
                    .unwrap(),
            );
        }
        let applied = read_model(&store, "bal").await.applied.len();
        seen_while_appending |= applied > 0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(head, Position(3000));
    until(
        "caught up with the other process",
        Duration::from_secs(20),
        || {
            let s = worker.status_of("bal").unwrap();
            (s.state == SubscriberState::Live && s.lag.position == head).then_some(())
        },
    )
    .await;
    assert!(
        seen_while_appending,
        "nothing delivered while the other process appended"
    );
    assert_eq!(read_model(&store, "bal").await, expected_all(&store).await);
    assert_eq!(
        *store.watch_head().borrow(),
        Position::ORIGIN,
        "delivered by polling, not by this handle's head watch"
    );
    worker.shutdown().await;
}

/// Two worker processes run the same projection with leases: one is
/// active, the other stands by and writes nothing. The owner is SIGKILLed;
/// the standby takes over (at once: its process is gone), and the read model ends
/// complete with every event applied exactly once.
#[test]
fn lease_takeover_after_owner_is_killed() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = rt.block_on(SqliteStore::open(&path)).unwrap();
    let ttl = Duration::from_millis(1500);
    let ttl_ms = ttl.as_millis().to_string();
    // Slow applies (0.5 ms each) in short transactions (10 events), so the
    // other processes get the write lock in between.
    let worker = |owner: &str| {
        Helper::spawn(
            HELPER,
            owner,
            &[
                "worker",
                path_str(&path),
                "bal",
                owner,
                &ttl_ms,
                "10",
                "500",
            ],
        )
    };
    let mut a = worker("a");
    a.expect("STATE Live", Duration::from_secs(10));
    let mut b = worker("b");
    b.expect("STATE Standby", Duration::from_secs(10));
    // Appended by this process while both workers are up.
    rt.block_on(append_accounts(&store, 0, 3000, 300, 9));
    let conn = read_only(&path);
    rt.block_on(until("a half way", Duration::from_secs(20), || {
        let applied = aftermath_tests::projections::read_model_conn(&conn, "bal").ok()?;
        (applied.applied.len() >= 600).then_some(())
    }));
    // One active owner: b has written nothing and still stands by.
    let by = rt.block_on(read_applied_by(&store, "bal"));
    assert!(
        by.iter().all(|(_, who)| who == "a"),
        "b wrote while standing by"
    );
    assert!(
        b.drain()
            .iter()
            .all(|l| l == "STATE Starting" || l == "STATE Standby"),
        "b became active while a held the lease: {:?}",
        b.seen
    );
    assert_eq!(lease_row(&conn, "bal"), Some(("a".to_owned(), 1)));

    a.kill();
    let at_kill = rt
        .block_on(ReadModelDb::load_state(&store, "bal"))
        .unwrap()
        .unwrap()
        .position;
    assert!(at_kill < Position(3000), "a finished before it was killed");
    // The store sees a's process gone: b takes over without waiting for
    // the lease to expire (`fencing::restart_after_sigkill_*` asserts it
    // with a long TTL).
    b.expect_any(&["STATE CatchingUp", "STATE Live"], ttl * 4);
    assert_eq!(lease_row(&conn, "bal"), Some(("b".to_owned(), 2)));

    // b is the owner now and keeps up with new appends (made by this process).
    let head = rt.block_on(append_accounts(&store, 3000, 500, 250, 9));
    loop {
        let live = b.expect("LIVE", Duration::from_secs(30));
        if live == head.to_string() {
            break;
        }
    }
    b.stop();
    assert_eq!(
        b.expect("STOPPED", Duration::from_secs(10)),
        head.to_string()
    );
    assert!(b.wait(Duration::from_secs(10)).success());

    let model = rt.block_on(read_model(&store, "bal"));
    assert_eq!(
        model,
        rt.block_on(expected_all(&store)),
        "every event exactly once"
    );
    let by = rt.block_on(read_applied_by(&store, "bal"));
    for (position, who) in &by {
        let want = if *position <= at_kill.0 { "a" } else { "b" };
        assert_eq!(who, want, "event {position}");
    }
    // The lease was released on b's graceful shutdown.
    let expires: i64 = conn
        .query_row(
            "SELECT expires_at FROM aftermath_leases WHERE name = 'bal'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(expires, 0);
}

/// A tiny xorshift PRNG: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// The fold of the log's first `n` events (all of them account events).
struct Folding {
    events: Vec<(String, i64)>,
    model: Model,
}

impl Folding {
    fn through(&mut self, n: u64) -> &Model {
        while (self.model.applied.len() as u64) < n {
            let i = self.model.applied.len();
            let (stream, d) = &self.events[i];
            let row = self.model.balances.entry(stream.clone()).or_default();
            row.0 += d;
            row.1 += 1;
            self.model.applied.push(i as u64 + 1);
        }
        &self.model
    }
}

/// A projection process is SIGKILLed at random moments while it applies
/// 50k events, then restarted to the end. A double apply would violate the
/// `applied` primary key, a lost event would be a missing row: after every
/// kill the read model is exactly the fold of the log through the saved
/// checkpoint, and at the end of everything through the head.
#[test]
fn projection_killed_at_random_moments_stays_consistent() {
    const EVENTS: u64 = 50_000;
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed {seed} (rerun with CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = rt.block_on(SqliteStore::open(&path)).unwrap();
    let head = rt.block_on(append_accounts(&store, 0, EVENTS, 500, 17));
    assert_eq!(head, Position(EVENTS));
    let events: Vec<(String, i64)> = rt.block_on(async {
        let all: Vec<aftermath::StoredEvent> =
            aftermath::store::read_all_pages(&store, Position::ORIGIN, None, 5000)
                .try_collect()
                .await
                .unwrap();
        all.iter()
            .map(|e| {
                let event = e.decode_known::<AccountEvent>().unwrap();
                (e.stream.clone(), delta(&event.event))
            })
            .collect()
    });
    assert_eq!(events.len() as u64, EVENTS);
    let mut folding = Folding {
        events,
        model: Model::default(),
    };
    // ~7 s uninterrupted: 100 events per transaction, a 7 ms pause every
    // 50 events, so most kills land inside a transaction.
    let args = ["project", path_str(&path), "bal", "100", "50", "7000"];
    let kills = rng.between(10, 15);
    let conn = read_only(&path);
    let mut last = Position::ORIGIN;
    let mut mid_run = 0;
    for round in 0..kills {
        let mut child = Helper::spawn(HELPER, &format!("project-{round}"), &args);
        let delay = rng.between(50, 400);
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().is_some() {
            eprintln!("round {round}: finished before the kill");
            break;
        }
        child.kill();
        mid_run += 1;
        let state = rt.block_on(ReadModelDb::load_state(&store, "bal")).unwrap();
        let checkpoint = state.map_or(Position::ORIGIN, |s| s.position);
        eprintln!("round {round}: killed after {delay} ms at checkpoint {checkpoint}");
        assert!(checkpoint >= last, "the checkpoint went back");
        last = checkpoint;
        let model = aftermath_tests::projections::read_model_conn(&conn, "bal").unwrap();
        assert_eq!(&model, folding.through(checkpoint.0), "after kill {round}");
    }
    assert!(mid_run >= 8, "only {mid_run} kills landed while projecting");
    assert!(
        last > Position::ORIGIN && last < head,
        "checkpoint {last} after the kills"
    );

    let mut last_run = Helper::spawn(HELPER, "project-final", &args);
    let reached = last_run.expect("CAUGHT_UP", Duration::from_secs(60));
    assert!(last_run.wait(Duration::from_secs(10)).success());
    assert_eq!(reached, head.to_string());
    let model = aftermath_tests::projections::read_model_conn(&conn, "bal").unwrap();
    assert_eq!(model.applied.len() as u64, EVENTS);
    assert_eq!(&model, folding.through(EVENTS), "the fold of the whole log");
    let state = rt
        .block_on(ReadModelDb::load_state(&store, "bal"))
        .unwrap()
        .unwrap();
    assert_eq!(state.position, head);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}
