//! One projection split into 4 partitions, run by two worker PROCESSES on
//! PostgreSQL (the `sub_helper pgworker` binary), each running all four
//! partitions with leases so that they share them. One process is
//! SIGKILLed mid-stream; the other takes its partitions over once their
//! leases expire, and in the end every event was applied exactly once: the
//! read model's `applied` table has the event's position as primary key (a
//! second apply would fail its batch), and it holds every event of the log.
//!
//! Runs when `AFTERMATH_PG_URL` is set; prints SKIPPED otherwise.

use std::collections::HashMap;
use std::time::Duration;

use aftermath::projection::ReadModelDb;
use aftermath::subscription::Partition;
use aftermath::{EventStore, Position, PostgresStore};
use aftermath_tests::postgres::{SchemaGuard, connect, read_applied_by, read_model, url};
use aftermath_tests::projections::{append_accounts, expected_all};
use sqlx_core::query::query;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;

const HELPER: &str = env!("CARGO_BIN_EXE_sub_helper");
const COUNT: u32 = 4;

use aftermath_tests::child::Child as Helper;

fn key(index: u32) -> String {
    Partition::new(index, COUNT).key("bal")
}

/// `(owner, token, released)` of each partition's lease.
async fn leases(store: &PostgresStore) -> HashMap<String, (String, i64, bool)> {
    query(AssertSqlSafe(format!(
        "SELECT name, owner, token, expires_at = 'epoch' FROM \"{}\".leases",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect()
}

async fn checkpoint(store: &PostgresStore, index: u32) -> Position {
    ReadModelDb::load_state(store, &key(index))
        .await
        .unwrap()
        .map_or(Position::ORIGIN, |s| s.position)
}

#[test]
fn partitions_shared_by_two_processes_survive_a_sigkill() {
    let Some(url) = url() else {
        aftermath_tests::skip_notice!(
            "SKIPPED postgres::partitions_shared_by_two_processes_survive_a_sigkill: AFTERMATH_PG_URL not set"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let guard = SchemaGuard::new(&url);
    let store = rt.block_on(connect(&url, &guard.schema));
    let ttl = Duration::from_millis(1500);
    let ttl_ms = ttl.as_millis().to_string();
    // 3 ms per apply, 20 events per transaction: a partition of ~1000 events
    // takes seconds, so the kill lands mid-stream.
    let worker = |owner: &str, first: &str| {
        Helper::spawn(
            HELPER,
            owner,
            &[
                "pgworker",
                &url,
                &guard.schema,
                "bal",
                owner,
                &ttl_ms,
                "20",
                "3000",
                "4",
                first,
            ],
        )
    };
    rt.block_on(append_accounts(&store, 0, 3000, 5, 16));

    // a runs partitions 0 and 1, b 2 and 3; then each also stands by for
    // the other two.
    let mut a = worker("a", "0,1");
    let mut b = worker("b", "2,3");
    for (helper, mine) in [(&mut a, [0, 1]), (&mut b, [2, 3])] {
        for index in mine {
            let k = key(index);
            helper.expect_line(&format!("{k} running"), Duration::from_secs(20), |l| {
                l == format!("STATE {k} CatchingUp") || l == format!("STATE {k} Live")
            });
        }
    }
    a.send("others");
    b.send("others");
    // Each standby reports from its own task: in either order.
    for (helper, theirs) in [(&mut a, [2, 3]), (&mut b, [0, 1])] {
        let mut waiting: Vec<String> = theirs.iter().map(|i| key(*i)).collect();
        while !waiting.is_empty() {
            let what = format!("{waiting:?} standing by");
            let line = helper.expect_line(&what, Duration::from_secs(20), |l| {
                waiting.iter().any(|k| l == format!("STATE {k} Standby"))
            });
            waiting.retain(|k| line != format!("STATE {k} Standby"));
        }
    }
    let held = rt.block_on(leases(&store));
    for index in 0..COUNT {
        let owner = if index < 2 { "a" } else { "b" };
        assert_eq!(
            held[&key(index)],
            (owner.to_owned(), 1, false),
            "{}",
            key(index)
        );
    }

    // More events while both run; kill a once it is well into its work.
    let more = {
        let store = store.clone();
        rt.spawn(async move { append_accounts(&store, 3000, 1000, 4, 16).await })
    };
    rt.block_on(aftermath_tests::projections::eventually(
        "a half way through its partitions",
        Duration::from_secs(30),
        || async {
            let by = read_applied_by(&store, "bal").await;
            (by.iter().filter(|(_, who)| who == "a").count() >= 400).then_some(())
        },
    ));
    a.kill();
    let at_kill = [
        rt.block_on(checkpoint(&store, 0)),
        rt.block_on(checkpoint(&store, 1)),
    ];
    let head_at_kill = rt.block_on(store.head()).unwrap();
    // At least one of a's partitions dies mid-stream. Not necessarily both:
    // the 16 streams hash into partitions unevenly, and a small partition
    // can be at the head between two of the appender's bursts (b takes it
    // over either way, and its later events are b's).
    assert!(
        at_kill.iter().any(|p| *p < head_at_kill),
        "a finished both partitions before it was killed: {at_kill:?} (head {head_at_kill})"
    );

    // b takes over a's partitions: at once, since a's presence session
    // ended with its process (`fencing::restart_after_sigkill_*` asserts
    // it against a long TTL).
    for index in [0, 1] {
        let k = key(index);
        b.expect_line(&format!("{k} taken over"), ttl * 6, |l| {
            l == format!("STATE {k} CatchingUp") || l == format!("STATE {k} Live")
        });
    }
    let head = rt.block_on(more).unwrap();
    let head = head.max(rt.block_on(append_accounts(&store, 4000, 200, 4, 16)));
    let mut live: HashMap<String, bool> = (0..COUNT).map(|i| (key(i), false)).collect();
    while live.values().any(|done| !done) {
        let line = b.expect_line("LIVE at the head", Duration::from_secs(60), |l| {
            l.starts_with("LIVE ")
        });
        let mut parts = line.split(' ').skip(1);
        let (k, position) = (parts.next().unwrap(), parts.next().unwrap());
        if position == head.to_string() {
            live.insert(k.to_owned(), true);
        }
    }
    b.send("stop");
    b.expect_line("STOPPED", Duration::from_secs(20), |l| l == "STOPPED");
    assert!(b.wait(Duration::from_secs(10)).success());
    assert!(
        !b.drain().iter().any(|l| l.ends_with(" Failed")),
        "a partition failed in b: {:?}",
        b.seen
    );

    rt.block_on(async {
        // Every event exactly once (the primary key refuses a second
        // apply; the comparison finds a missing one).
        let model = read_model(&store, "bal").await;
        assert_eq!(model.applied.len(), 4200);
        assert_eq!(
            model,
            expected_all(&store).await,
            "every event exactly once"
        );
        // Who applied what: a its partitions up to its checkpoints at the
        // kill, b everything else.
        let all = aftermath_tests::reactors::account_events(&store).await;
        let stream_of: HashMap<u64, String> = all
            .iter()
            .map(|e| (e.position.0, e.stream.clone()))
            .collect();
        let mut by_a = 0;
        for (position, who) in read_applied_by(&store, "bal").await {
            let index = Partition::of(&stream_of[&position], COUNT);
            let want = match index {
                0 | 1 if position <= at_kill[index as usize].0 => "a",
                _ => "b",
            };
            assert_eq!(who, want, "event {position} of partition {index}");
            by_a += usize::from(who == "a");
        }
        assert!(by_a >= 400);
        for index in 0..COUNT {
            assert_eq!(checkpoint(&store, index).await, head, "{}", key(index));
        }
        // a's partitions changed owner once; b released everything.
        let held = leases(&store).await;
        for index in 0..COUNT {
            let token = if index < 2 { 2 } else { 1 };
            assert_eq!(
                held[&key(index)],
                ("b".to_owned(), token, true),
                "{}",
                key(index)
            );
        }
        let layout = ReadModelDb::load_state(&store, "bal#partitions")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((layout.version, layout.position), (1, Position(4)));
    });
}
