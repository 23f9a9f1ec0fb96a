//! Stress test of the PostgreSQL `$all` order: 8 concurrent writers (batches
//! of 1 to 100 events, racing and exclusive streams, idempotent retries), a
//! ninth writer whose database backend is paused (SIGSTOP) and resumed at
//! random moments, so some of its appends stop mid-statement with the append
//! lock held, appends held open before their commit for a random while,
//! transactions on other connections that take a transaction id without
//! appending (they must not matter), and 2 subscribers that catch up and
//! follow live. At the end both subscribers saw every committed event
//! exactly once, in the same order, with strictly increasing positions.
//!
//! The same workload is read by a NAIVE reader too, which follows the raw
//! insertion sequence (`global_seq`) without the horizon, as a bigserial
//! design would: it misses events. A second test reproduces that
//! deterministically.
//!
//! Needs `AFTERMATH_PG_URL`; skips (printing why) without it. Runs for
//! `AFTERMATH_STRESS_SECS` seconds (default 20).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aftermath::store::{EventStore, ExpectedVersion, read_all_pages};
use aftermath::{EventData, Metadata, Position, PostgresOptions, PostgresStore, StoredEvent};
use aftermath_tests::deposits;
use aftermath_tests::postgres::append_in;
use futures::TryStreamExt;
use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::{PgConnection, PgPoolOptions};
use uuid::Uuid;

fn url() -> Option<String> {
    std::env::var("AFTERMATH_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

macro_rules! url_or_skip {
    ($test:literal) => {
        match url() {
            Some(url) => url,
            None => {
                aftermath_tests::skip_notice!(
                    "SKIPPED postgres_stress::{}: AFTERMATH_PG_URL not set",
                    $test
                );
                return;
            }
        }
    };
}

/// Drops its schema (best effort) when the test is done.
struct SchemaGuard {
    url: String,
    schema: String,
}

impl SchemaGuard {
    fn new(url: &str) -> SchemaGuard {
        SchemaGuard {
            url: url.to_owned(),
            schema: format!("aftermath_stress_{}", Uuid::new_v4().simple()),
        }
    }
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let url = self.url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&url).await.ok()?;
                conn.execute(raw_sql(AssertSqlSafe(sql))).await.ok()?;
                conn.close().await.ok()
            })
        })
        .join();
    }
}

async fn connect(url: &str, schema: &str, connections: u32) -> PostgresStore {
    let options = PostgresOptions::default()
        .schema(schema)
        .max_connections(connections);
    PostgresStore::connect_with(url, options)
        .await
        .unwrap_or_else(|e| {
            panic!("AFTERMATH_PG_URL is set ({url}) but the store cannot connect: {e}")
        })
}

/// SplitMix64: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a subscriber saw, in order.
type Seen = Vec<(Uuid, Position)>;

/// Catches up from the origin, then follows live (woken by `watch_head`),
/// until it has seen `target` events (known once the writers are done).
/// Keeps `progress` at the number of events seen so far.
async fn subscribe(
    store: PostgresStore,
    page: usize,
    target: Arc<AtomicUsize>,
    give_up: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
) -> Seen {
    let mut seen: Seen = Vec::new();
    let mut after = Position::ORIGIN;
    let mut watch = store.watch_head();
    loop {
        let events = store.read_all(after, None, page).await.expect("read $all");
        for e in &events {
            assert!(
                e.position > after,
                "position went back: {} after {after}",
                e.position
            );
            after = e.position;
            seen.push((e.id, e.position));
        }
        progress.store(seen.len(), Ordering::SeqCst);
        if seen.len() >= target.load(Ordering::SeqCst) || give_up.load(Ordering::SeqCst) {
            return seen;
        }
        if events.len() < page {
            let _ = tokio::time::timeout(Duration::from_millis(250), watch.changed()).await;
        }
    }
}

/// Follows `global_seq` (insertion order) without the horizon, as a
/// bigserial design would, until `stop`; then reads once more.
async fn naive(url: String, schema: String, stop: Arc<AtomicBool>) -> Vec<Uuid> {
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("naive reader connects");
    // Ordered index scans only. The table grows by hundreds of thousands of
    // rows within seconds, far ahead of its planner statistics, and the
    // planner then answers each page with a bitmap scan plus a sort of every
    // remaining row: the reader fell a minute behind, holding one of the
    // machine's cores the whole time while the writers and subscribers
    // under test needed it.
    conn.execute("SET enable_bitmapscan = off; SET enable_seqscan = off")
        .await
        .expect("naive reader sets its plan options");
    let sql = format!(
        "SELECT id, global_seq FROM \"{schema}\".events WHERE global_seq > $1 ORDER BY global_seq LIMIT 500"
    );
    let mut last = 0i64;
    let mut seen = Vec::new();
    let mut finishing = false;
    loop {
        let rows = query(AssertSqlSafe(sql.clone()))
            .bind(last)
            .fetch_all(&mut conn)
            .await
            .expect("naive read");
        for row in &rows {
            seen.push(row.get::<Uuid, _>(0));
            last = row.get(1);
        }
        if rows.len() < 500 {
            if finishing {
                return seen;
            }
            if stop.load(Ordering::SeqCst) {
                finishing = true;
                continue;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
}

/// Continues a stopped backend when dropped.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT".to_owned(), self.0.to_string()])
            .status();
    }
}

/// Sends `SIGnal` to a process (the test runs on the database's machine).
fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_see_every_event_once_in_one_order() {
    let url = url_or_skip!("subscribers_see_every_event_once_in_one_order");
    let secs: u64 = std::env::var("AFTERMATH_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let guard = SchemaGuard::new(&url);
    let store = connect(&url, &guard.schema, 12).await;
    let mut admin = PgConnection::connect(&url).await.unwrap();
    // For the naive reader only (the store never reads by global_seq).
    admin
        .execute(raw_sql(AssertSqlSafe(format!(
            "CREATE INDEX ON \"{}\".events (global_seq)",
            guard.schema
        ))))
        .await
        .unwrap();
    let holders = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();

    let target = Arc::new(AtomicUsize::new(usize::MAX));
    let give_up = Arc::new(AtomicBool::new(false));
    let naive_stop = Arc::new(AtomicBool::new(false));
    let mut subscribers = Vec::new();
    let progress = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    for (i, page) in [100usize, 37].into_iter().enumerate() {
        // Separate handles, as subscribers in other processes would be.
        let sub = connect(&url, &guard.schema, 2).await;
        let (target, give_up) = (target.clone(), give_up.clone());
        let progress = progress[i].clone();
        subscribers.push(tokio::spawn(async move {
            let seen = subscribe(sub, page, target, give_up, progress).await;
            (i, seen)
        }));
    }
    let naive_reader = tokio::spawn(naive(url.clone(), guard.schema.clone(), naive_stop.clone()));

    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        let holders = holders.clone();
        let schema = guard.schema.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(w + 1);
            let mut committed: Vec<Uuid> = Vec::new();
            let mut appends = 0u64;
            let mut held = 0u64;
            let own = format!("own-{w}");
            let mut own_version = 0u64;
            let mut holder: Option<tokio::task::JoinHandle<Vec<Uuid>>> = None;
            while Instant::now() < deadline {
                // Now and then, a transaction that stays open for up to
                // 400 ms: every other time an append held before its commit
                // (the horizon stays behind it meanwhile), else one that
                // only takes a transaction id (it must not hold anyone back).
                if rng.below(6) == 0 && holder.as_ref().is_none_or(|h| h.is_finished()) {
                    if let Some(h) = holder.take() {
                        committed.extend(h.await.unwrap());
                    }
                    let hold = Duration::from_millis(rng.below(400));
                    let appends_too = rng.below(2) == 0;
                    let batch = deposits(rng.next() % 1000, 1 + rng.below(5));
                    let (holders, schema) = (holders.clone(), schema.clone());
                    let stream = format!("held-{w}-{held}");
                    held += 1;
                    holder = Some(tokio::spawn(async move {
                        let mut tx = holders.begin().await.unwrap();
                        if appends_too {
                            append_in(&mut tx, &schema, &stream, &batch).await.unwrap();
                        } else {
                            tx.execute("SELECT pg_current_xact_id()").await.unwrap();
                        }
                        tokio::time::sleep(hold).await;
                        tx.commit().await.unwrap();
                        if appends_too {
                            batch.iter().map(|e| e.id).collect()
                        } else {
                            Vec::new()
                        }
                    }));
                }
                let size = [1, 1, 1, 2, 3, 5, 10, 20, 50, 100][rng.below(10) as usize];
                let batch = deposits(rng.next() % 1000, size);
                let ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
                let exclusive = rng.below(2) == 0;
                let (stream, expected) = if exclusive {
                    (own.clone(), ExpectedVersion::Exact(own_version))
                } else {
                    (format!("shared-{}", rng.below(4)), ExpectedVersion::Any)
                };
                let done = store
                    .append(&stream, expected, batch.clone())
                    .await
                    .unwrap_or_else(|e| panic!("writer {w}: {e}"));
                assert!(!done.duplicate);
                appends += 1;
                if exclusive {
                    own_version = done.last_version;
                }
                committed.extend(ids);
                // Sometimes the client "did not hear back" and retries.
                if rng.below(10) == 0 {
                    let again = store.append(&stream, expected, batch).await.unwrap();
                    assert!(again.duplicate, "a retry is absorbed");
                    assert_eq!(again.last_position, done.last_position);
                }
            }
            if let Some(h) = holder {
                committed.extend(h.await.unwrap());
            }
            (committed, appends, held)
        }));
    }
    // The ninth writer: its own connection, whose backend process is
    // stopped and continued at random, so appends freeze mid-statement
    // (holding the append lock, perhaps already with a transaction id).
    let paused_writes = {
        let (url, schema) = (url.clone(), guard.schema.clone());
        tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            let pid: i32 = query("SELECT pg_backend_pid()")
                .fetch_one(&mut conn)
                .await
                .unwrap()
                .get(0);
            let pauser = tokio::spawn(async move {
                // Continues the backend even if the test fails meanwhile: a
                // stopped backend may hold locks other sessions need.
                let _resume = Resume(pid);
                let mut rng = Rng(99);
                let mut pauses = 0u64;
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(rng.below(200))).await;
                    signal(pid, "STOP");
                    pauses += 1;
                    tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
                    signal(pid, "CONT");
                }
                signal(pid, "CONT");
                pauses
            });
            let mut rng = Rng(77);
            let mut committed = Vec::new();
            while Instant::now() < deadline {
                let batch = deposits(rng.next() % 1000, 1 + rng.below(20));
                let stream = format!("paused-{}", rng.below(3));
                append_in(&mut conn, &schema, &stream, &batch)
                    .await
                    .unwrap();
                committed.extend(batch.iter().map(|e| e.id));
            }
            (committed, pauser.await.unwrap())
        })
    };
    let mut committed: Vec<Uuid> = Vec::new();
    let (mut appends, mut held) = (0, 0);
    for w in writers {
        let (ids, a, h) = w.await.unwrap();
        committed.extend(ids);
        appends += a;
        held += h;
    }
    let (paused_ids, pauses) = paused_writes.await.unwrap();
    committed.extend(paused_ids);
    let elapsed = started.elapsed();
    target.store(committed.len(), Ordering::SeqCst);
    naive_stop.store(true, Ordering::SeqCst);

    // The subscribers get as long as they keep reading: a slow machine only
    // makes this wait longer, while a horizon that stops moving (no event
    // read for STALLED) fails the test, naming where each one stands.
    const STALLED: Duration = Duration::from_secs(30);
    let counts = || progress.each_ref().map(|p| p.load(Ordering::SeqCst));
    let (mut last, mut moved) = (counts(), Instant::now());
    let at_writers_done = last;
    while !subscribers.iter().all(|s| s.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counts();
        if now != last {
            (last, moved) = (now, Instant::now());
        } else if moved.elapsed() > STALLED {
            give_up.store(true, Ordering::SeqCst);
            panic!(
                "the subscribers stopped at {now:?} of the {} committed events \
                 (at {at_writers_done:?} when the writers finished) and read nothing for {STALLED:?}",
                committed.len()
            );
        }
    }
    let mut seen_by: Vec<Seen> = vec![Vec::new(), Vec::new()];
    for s in subscribers {
        let (i, seen) = s.await.unwrap();
        seen_by[i] = seen;
    }
    let naive_seen = naive_reader.await.unwrap();

    let all: Vec<StoredEvent> = read_all_pages(&store, Position::ORIGIN, None, 1000)
        .try_collect()
        .await
        .unwrap();
    let committed_set: HashSet<Uuid> = committed.iter().copied().collect();
    assert_eq!(committed_set.len(), committed.len(), "ids are unique");
    assert_eq!(
        all.len(),
        committed.len(),
        "every committed event is in $all once"
    );
    let all_ids: Vec<Uuid> = all.iter().map(|e| e.id).collect();
    assert_eq!(
        all_ids.iter().copied().collect::<HashSet<_>>(),
        committed_set
    );
    for (i, seen) in seen_by.iter().enumerate() {
        assert_eq!(
            seen.len(),
            committed.len(),
            "subscriber {i} saw each event once"
        );
        assert!(
            seen.windows(2).all(|p| p[0].1 < p[1].1),
            "subscriber {i}: positions strictly increase"
        );
        let ids: Vec<Uuid> = seen.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, all_ids, "subscriber {i} saw the final order");
    }
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in &all {
        versions.entry(&e.stream).or_default().push(e.version);
    }
    for (stream, vs) in versions {
        assert_eq!(
            vs,
            (1..=vs.len() as u64).collect::<Vec<_>>(),
            "versions of {stream} follow $all order"
        );
    }

    let naive_set: HashSet<Uuid> = naive_seen.iter().copied().collect();
    let missed = committed_set.difference(&naive_set).count();
    eprintln!(
        "stress: {} events in {appends} appends over {:.1} s ({:.0} appends/s, {:.0} events/s), \
         {held} long transactions (half of them appends held before commit), {pauses} SIGSTOPs \
         of a writer's backend; both subscribers saw all of them in one order; \
         the naive global_seq reader missed {missed}",
        committed.len(),
        elapsed.as_secs_f64(),
        appends as f64 / elapsed.as_secs_f64(),
        committed.len() as f64 / elapsed.as_secs_f64(),
    );
    assert!(
        missed > 0,
        "the naive reader was expected to miss events under this workload"
    );
}

/// The trap, made deterministic: an append holds its transaction open while
/// another commits. A reader following the insertion sequence passes the
/// held event and never sees it; the store's reader waits and sees both, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_reader_skips_an_event_the_store_does_not() {
    let url = url_or_skip!("naive_reader_skips_an_event_the_store_does_not");
    let guard = SchemaGuard::new(&url);
    let store = connect(&url, &guard.schema, 4).await;
    let reader = connect(&url, &guard.schema, 2).await;
    let naive_sql = format!(
        "SELECT id, global_seq FROM \"{}\".events WHERE global_seq > $1 ORDER BY global_seq",
        guard.schema
    );
    let mut naive = PgConnection::connect(&url).await.unwrap();
    let mut naive_read = async |after: i64| -> Vec<(Uuid, i64)> {
        query(AssertSqlSafe(naive_sql.clone()))
            .bind(after)
            .fetch_all(&mut naive)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    };

    // Transaction A appends through the store's own append function and
    // stays open.
    let held: EventData = deposits(0, 1).remove(0);
    let mut a = PgConnection::connect(&url).await.unwrap();
    a.execute("BEGIN").await.unwrap();
    query(AssertSqlSafe(format!(
        "SELECT out_transaction FROM \"{}\".append($1, 0, 0, false, true, $2, $3, $4, $5, $6, $7)",
        guard.schema
    )))
    .bind("held-1")
    .bind(vec![held.id])
    .bind(vec![held.event_type.clone()])
    .bind(vec![held.payload.clone()])
    .bind(vec![serde_json::to_string(&held.metadata).unwrap()])
    .bind(vec![held.id])
    .bind(vec![held.id])
    .execute(&mut a)
    .await
    .unwrap();

    // Transaction B appends and commits.
    let quick = EventData {
        metadata: Metadata::caused_by(held.id),
        ..deposits(1, 1).remove(0)
    };
    store
        .append("quick-1", ExpectedVersion::NoStream, vec![quick.clone()])
        .await
        .unwrap();

    // The naive reader sees B and moves past A's number.
    let first = naive_read(0).await;
    assert_eq!(
        first.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![quick.id]
    );
    let last = first[0].1;
    // The store's reader sees nothing yet: A holds the horizon.
    assert!(
        reader
            .read_all(Position::ORIGIN, None, 10)
            .await
            .unwrap()
            .is_empty(),
        "the store does not read past an unfinished transaction"
    );

    a.execute("COMMIT").await.unwrap();
    let later = naive_read(last).await;
    assert!(later.is_empty(), "the naive reader never sees A's event");
    let everything = naive_read(0).await;
    assert_eq!(everything.len(), 2);
    assert!(
        everything[0].0 == held.id && everything[0].1 < last,
        "A's event sits behind the naive reader's position: skipped forever"
    );

    let mut page = Vec::new();
    for _ in 0..250 {
        page = reader.read_all(Position::ORIGIN, None, 10).await.unwrap();
        if page.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids: Vec<Uuid> = page.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        vec![held.id, quick.id],
        "the store's reader sees both, A first"
    );
}
