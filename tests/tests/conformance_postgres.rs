//! The conformance suite against PostgreSQL, plus what only this backend
//! has: schema versioning, the horizon, strict mode, LISTEN/NOTIFY.
//!
//! Runs when `AFTERMATH_PG_URL` is set (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); every test gets a fresh
//! schema, dropped afterwards. Without the variable each test prints
//! SKIPPED; with it set but the server unreachable, the tests fail.

use std::time::Duration;

use aftermath::store::{EventStore, ExpectedVersion};
use aftermath::{Position, PostgresOptions, PostgresStore, StoreError, Upcasters};
use aftermath_tests::domain::{Account, AccountCommand};
use aftermath_tests::postgres::append_in;
use aftermath_tests::{Backend, Fresh, deposits};
use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::PgConnection;
use uuid::Uuid;

/// The server URL, or why these tests cannot run.
fn url() -> Result<String, String> {
    match std::env::var("AFTERMATH_PG_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => Err("AFTERMATH_PG_URL not set".to_owned()),
    }
}

/// Drops its schema (best effort) when the test is done.
struct SchemaGuard {
    url: String,
    schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let url = self.url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        // The test's runtime may be the one dropping us: use a thread with a
        // runtime of its own.
        let dropped = std::thread::spawn(move || {
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
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("could not drop test schema {}", self.schema);
        }
    }
}

/// A fresh schema name and its guard.
fn fresh_schema(url: &str) -> SchemaGuard {
    SchemaGuard {
        url: url.to_owned(),
        schema: format!("aftermath_test_{}", Uuid::new_v4().simple()),
    }
}

async fn connect(url: &str, options: PostgresOptions) -> PostgresStore {
    PostgresStore::connect_with(url, options)
        .await
        .unwrap_or_else(|e| {
            panic!("AFTERMATH_PG_URL is set ({url}) but the store cannot connect: {e}")
        })
}

async fn raw(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("AFTERMATH_PG_URL is set ({url}) but connecting failed: {e}"))
}

struct Postgres;

#[async_trait::async_trait]
impl Backend for Postgres {
    type Store = PostgresStore;
    const NAME: &'static str = "postgres";
    async fn open(upcasters: Upcasters) -> Result<Fresh<PostgresStore>, String> {
        let url = url()?;
        let guard = fresh_schema(&url);
        let options = PostgresOptions::default()
            .schema(&guard.schema)
            .max_connections(8)
            .upcasters(upcasters);
        let store = connect(&url, options).await;
        Ok(Fresh {
            store,
            guard: Box::new(guard),
        })
    }
}

aftermath_tests::conformance_tests!(Postgres);

/// Skips (printing why) when no server is configured.
macro_rules! url_or_skip {
    ($test:literal) => {
        match url() {
            Ok(url) => url,
            Err(reason) => {
                aftermath_tests::skip_notice!("SKIPPED postgres::{}: {reason}", $test);
                return;
            }
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_newer_than_this_build_is_refused() {
    let url = url_or_skip!("schema_newer_than_this_build_is_refused");
    let guard = fresh_schema(&url);
    let options = PostgresOptions::default().schema(&guard.schema);
    let store = connect(&url, options.clone()).await;
    drop(store);
    let mut conn = raw(&url).await;
    conn.execute(raw_sql(AssertSqlSafe(format!(
        "INSERT INTO \"{}\".aftermath_schema (version) VALUES (99)",
        guard.schema
    ))))
    .await
    .unwrap();
    match PostgresStore::connect_with(&url, options).await {
        Err(StoreError::Incompatible { reason, .. }) => {
            assert!(reason.contains("version 99"), "{reason}")
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_schema_and_bad_names_are_refused() {
    let url = url_or_skip!("foreign_schema_and_bad_names_are_refused");
    let guard = fresh_schema(&url);
    let mut conn = raw(&url).await;
    conn.execute(raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA \"{0}\"; CREATE TABLE \"{0}\".customers (id int)",
        guard.schema
    ))))
    .await
    .unwrap();
    let options = PostgresOptions::default().schema(&guard.schema);
    match PostgresStore::connect_with(&url, options).await {
        Err(StoreError::Incompatible { reason, .. }) => {
            assert!(reason.contains("customers"), "{reason}")
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
    let options = PostgresOptions::default().schema("Robert'); DROP TABLE x; --");
    assert!(matches!(
        PostgresStore::connect_with(&url, options).await,
        Err(StoreError::Incompatible { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_connects_migrate_once() {
    let url = url_or_skip!("concurrent_connects_migrate_once");
    let guard = fresh_schema(&url);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        let options = PostgresOptions::default()
            .schema(&guard.schema)
            .max_connections(2);
        tasks.push(tokio::spawn(async move { connect(&url, options).await }));
    }
    let mut stores = Vec::new();
    for task in tasks {
        stores.push(task.await.unwrap());
    }
    let mut conn = raw(&url).await;
    let versions: Vec<i32> = query(AssertSqlSafe(format!(
        "SELECT version FROM \"{}\".aftermath_schema ORDER BY version",
        guard.schema
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect();
    // Every migration applied once: 1..=n, each once, and no fewer than
    // this test was written against.
    let n = versions.len() as i32;
    assert!(n >= 5, "migrations applied: {versions:?}");
    assert_eq!(
        versions,
        (1..=n).collect::<Vec<_>>(),
        "every migration applied once"
    );
    stores[0]
        .append("m-1", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    assert_eq!(stores[5].stream_version("m-1").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_rows_are_typed_errors() {
    let url = url_or_skip!("corrupt_rows_are_typed_errors");
    let guard = fresh_schema(&url);
    let store = connect(&url, PostgresOptions::default().schema(&guard.schema)).await;
    let done = store
        .append("bad-1", ExpectedVersion::NoStream, deposits(0, 2))
        .await
        .unwrap();
    let mut conn = raw(&url).await;
    conn.execute(raw_sql(AssertSqlSafe(format!(
        // Reads take correlation and causation from their own columns and
        // only `extra` from the JSON (migration 8): an `extra` that is not a
        // map of strings is what a read can find corrupt there.
        "UPDATE \"{}\".events SET metadata = '{{\"extra\": 5}}' WHERE version = 2",
        guard.schema
    ))))
    .await
    .unwrap();
    match store.read_all(Position::ORIGIN, None, 10).await {
        Err(StoreError::Corrupt {
            position,
            stream,
            message,
        }) => {
            assert_eq!(position, done.last_position.unwrap());
            assert_eq!(stream, "bad-1");
            assert!(message.contains("metadata"), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    conn.execute(raw_sql(AssertSqlSafe(format!(
        "UPDATE \"{}\".snapshots SET taken_at = 'infinity'; \
         INSERT INTO \"{0}\".snapshots VALUES ('bad-1', 2, '\\x7b7d', 'infinity')",
        guard.schema
    ))))
    .await
    .unwrap();
    match store.load_snapshot("bad-1").await {
        Err(StoreError::Corrupt { message, .. }) => {
            assert!(message.contains("taken_at"), "{message}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// An append still in flight delays `$all` readers (never makes them skip),
/// and `held_back` names it; a transaction that does not append does not
/// (more in `postgres_horizon.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_transaction_delays_readers_and_is_reported() {
    let url = url_or_skip!("long_transaction_delays_readers_and_is_reported");
    let guard = fresh_schema(&url);
    let options = PostgresOptions::default().schema(&guard.schema);
    let writer = connect(&url, options.clone()).await;
    let reader = connect(&url, options).await;
    writer
        .append("h-1", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    let before = writer.head().await.unwrap();

    let mut blocker = raw(&url).await;
    blocker.execute("BEGIN").await.unwrap();
    // An append paused before its commit.
    append_in(&mut blocker, &guard.schema, "h-0", &deposits(9, 1))
        .await
        .unwrap();
    let pid: i32 = query("SELECT pg_backend_pid()")
        .fetch_one(&mut blocker)
        .await
        .unwrap()
        .get(0);
    let done = writer
        .append("h-1", ExpectedVersion::Exact(1), deposits(1, 3))
        .await
        .unwrap();
    // Committed, found by id and in its stream, but not readable in $all.
    assert_eq!(reader.stream_version("h-1").await.unwrap(), 4);
    let page = reader.read_all(before, None, 10).await.unwrap();
    assert!(page.is_empty(), "read past an unfinished transaction");
    assert_eq!(reader.head().await.unwrap(), before);

    let mut named = None;
    for _ in 0..100 {
        if let Some(held) = reader.held_back().await.unwrap()
            && let Some(b) = &held.blocker
            && b.pid == Some(pid)
        {
            named = Some(held);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = named.expect("held_back names the blocking backend");
    assert_eq!(
        held.blocker.as_ref().unwrap().state.as_deref(),
        Some("idle in transaction")
    );
    assert!(held.blocker.as_ref().unwrap().transaction_age.is_some());

    blocker.execute("COMMIT").await.unwrap();
    // Readable at once: nothing else appends to this schema.
    let page = reader.read_all(before, None, 10).await.unwrap();
    assert_eq!(page.len(), 4, "the paused append, then the whole later one");
    assert_eq!(page[0].stream, "h-0");
    assert_eq!(page[3].position, done.last_position.unwrap());
    assert_eq!(reader.head().await.unwrap(), done.last_position.unwrap());
}

/// `read_correlation` reads below the horizon like `read_all`: an event of
/// the conversation appended while an older transaction runs is not read
/// (it would be read before events ordered earlier) until that one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_reads_stay_below_the_horizon() {
    let url = url_or_skip!("correlation_reads_stay_below_the_horizon");
    let guard = fresh_schema(&url);
    let options = PostgresOptions::default().schema(&guard.schema);
    let writer = connect(&url, options.clone()).await;
    let reader = connect(&url, options).await;
    let correlation = Uuid::now_v7();
    let mut first = aftermath_tests::raw("account.Opened", "{}");
    first.metadata.correlation_id = correlation;
    writer
        .append("c-1", ExpectedVersion::NoStream, vec![first.clone()])
        .await
        .unwrap();
    let read = || reader.read_correlation(correlation, Position::ORIGIN, 10);
    assert_eq!(read().await.unwrap().len(), 1);

    // An append of another stream, paused before its commit.
    let mut blocker = raw(&url).await;
    blocker.execute("BEGIN").await.unwrap();
    append_in(&mut blocker, &guard.schema, "c-0", &deposits(5, 1))
        .await
        .unwrap();
    let mut second = aftermath_tests::raw("account.Deposited", r#"{"amount":1}"#);
    second.metadata.correlation_id = correlation;
    writer
        .append("c-2", ExpectedVersion::NoStream, vec![second.clone()])
        .await
        .unwrap();
    assert!(reader.find_event(second.id).await.unwrap().is_some());
    let held: Vec<Uuid> = read().await.unwrap().iter().map(|e| e.id).collect();
    assert_eq!(held, vec![first.id], "read past an unfinished transaction");

    blocker.execute("COMMIT").await.unwrap();
    let ids: Vec<Uuid> = read().await.unwrap().iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![first.id, second.id]);
    let own: Vec<Uuid> = writer
        .read_correlation(correlation, Position::ORIGIN, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(own, vec![first.id, second.id]);
}

/// Another process's appends move `watch_head` through NOTIFY (polling is
/// set to a minute here), also after the listening connection was killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_other_handles_and_survives_a_dropped_connection() {
    let url = url_or_skip!("notify_wakes_other_handles_and_survives_a_dropped_connection");
    let guard = fresh_schema(&url);
    let options = PostgresOptions::default().schema(&guard.schema);
    let writer = connect(&url, options.clone()).await;
    let quiet = connect(&url, options.clone().notify(false)).await;
    let follower = connect(&url, options.poll_interval(Duration::from_secs(60))).await;
    let mut watch = follower.watch_head();
    // Give the listener time to LISTEN (it also wakes once when it does).
    tokio::time::sleep(Duration::from_millis(300)).await;
    watch.borrow_and_update();
    // Without NOTIFY, another process only learns at its next poll.
    quiet
        .append("q-1", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!watch.has_changed().unwrap(), "no wake-up without NOTIFY");
    let done = writer
        .append("n-1", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        watch.wait_for(|p| *p >= done.last_position.unwrap()),
    )
    .await
    .expect("NOTIFY moved the other handle's watch")
    .unwrap();

    let mut admin = raw(&url).await;
    let killed: i64 =
        query("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = $1")
            .bind(format!("LISTEN \"{}_events\"", guard.schema))
            .fetch_one(&mut admin)
            .await
            .unwrap()
            .get(0);
    assert!(killed >= 1, "found the listening connections");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = writer
        .append("n-1", ExpectedVersion::Exact(1), deposits(1, 1))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|p| *p >= done.last_position.unwrap()),
    )
    .await
    .expect("the listener reconnected")
    .unwrap();
}

/// How many sessions are listening with this exact statement.
async fn listening(admin: &mut PgConnection, listen: &str) -> i64 {
    query("SELECT count(*) FROM pg_stat_activity WHERE query = $1")
        .bind(listen)
        .fetch_one(admin)
        .await
        .unwrap()
        .get(0)
}

/// The background task (and its LISTEN connection) ends with the last handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_task_stops_with_the_last_handle() {
    let url = url_or_skip!("background_task_stops_with_the_last_handle");
    let guard = fresh_schema(&url);
    let store = connect(&url, PostgresOptions::default().schema(&guard.schema)).await;
    let clone = store.clone();
    let listen = format!("LISTEN \"{}_events\"", guard.schema);
    let mut admin = raw(&url).await;
    let mut count = 0;
    for _ in 0..50 {
        count = listening(&mut admin, &listen).await;
        if count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count, 1, "one LISTEN connection");
    drop(store);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        listening(&mut admin, &listen).await,
        1,
        "a clone keeps it running"
    );
    drop(clone);
    for _ in 0..50 {
        count = listening(&mut admin, &listen).await;
        if count == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count, 0, "the LISTEN connection closed");
}

/// Strict mode: appends wait for the schema's append lock (so positions
/// follow commit order); normal appends do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_serializes_appends() {
    let url = url_or_skip!("strict_mode_serializes_appends");
    let guard = fresh_schema(&url);
    let options = PostgresOptions::default().schema(&guard.schema);
    let normal = connect(&url, options.clone()).await;
    let strict = connect(&url, options.strict_order(true)).await;
    let mut holder = raw(&url).await;
    holder.execute("BEGIN").await.unwrap();
    query("SELECT pg_advisory_xact_lock(hashtext($1), 0)")
        .bind(format!("{}.append", guard.schema))
        .execute(&mut holder)
        .await
        .unwrap();
    let waiting = {
        let strict = strict.clone();
        tokio::spawn(async move {
            strict
                .append("s-1", ExpectedVersion::NoStream, deposits(0, 1))
                .await
        })
    };
    tokio::time::timeout(
        Duration::from_secs(5),
        normal.append("s-2", ExpectedVersion::NoStream, deposits(0, 1)),
    )
    .await
    .expect("a normal append does not take the strict lock")
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the strict append waits for the lock"
    );
    holder.execute("COMMIT").await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the strict append proceeds")
        .unwrap()
        .unwrap();
    assert_eq!(done.last_version, 1);

    // Many concurrent strict appends: complete, ordered, gap-free versions.
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let strict = strict.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                strict
                    .append("s-3", ExpectedVersion::Any, deposits(w * 100 + i, 2))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = strict.read_all(Position::ORIGIN, None, 1000).await.unwrap();
    assert_eq!(all.len(), 202);
    let versions: Vec<u64> = all
        .iter()
        .filter(|e| e.stream == "s-3")
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, (1..=200).collect::<Vec<_>>());
}

/// Racing exact-version appends to one stream: exactly one wins each round,
/// the others get the winner's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_appends_never_lose_a_write() {
    let url = url_or_skip!("racing_appends_never_lose_a_write");
    let guard = fresh_schema(&url);
    let store = connect(&url, PostgresOptions::default().schema(&guard.schema)).await;
    for round in 0..20u64 {
        let mut tasks = Vec::new();
        for w in 0..6u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .append("race-1", ExpectedVersion::Exact(round), deposits(w, 1))
                    .await
            }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(done) => {
                    won += 1;
                    assert_eq!(done.last_version, round + 1);
                }
                Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                    assert_eq!(actual, round + 1)
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
    assert_eq!(store.stream_version("race-1").await.unwrap(), 20);
}

/// The store's pool does not test a recently used connection before
/// handing it out (a round trip per statement); a connection that died
/// (a server restart, a failover, an administrator) fails its statement,
/// which the store tries again on a live connection. Here every session of
/// the store is terminated while its connections are freshly used: the
/// next command, append and read all succeed, and nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_are_replaced_without_failing_a_call() {
    let url = url_or_skip!("terminated_connections_are_replaced_without_failing_a_call");
    let guard = fresh_schema(&url);
    let app = format!("am_{}", Uuid::new_v4().simple());
    let separator = if url.contains('?') { '&' } else { '?' };
    let store_url = format!("{url}{separator}application_name={app}");
    let store = connect(
        &store_url,
        PostgresOptions::default()
            .schema(&guard.schema)
            .max_connections(4),
    )
    .await;
    let repo = aftermath::Repository::<Account, _>::new(store.clone());
    let mut admin = raw(&url).await;
    let mut appended = 0u64;
    for round in 0..3 {
        // Warm the pool: several connections, all just used.
        let opened = futures::future::join_all((0..4).map(|i| {
            let repo = repo.clone();
            async move {
                repo.execute(
                    &format!("t{round}-{i}"),
                    AccountCommand::Open {
                        owner: "o".to_owned(),
                    },
                )
                .await
            }
        }))
        .await;
        for done in opened {
            done.expect("a command before the sessions end");
            appended += 1;
        }
        let killed: i64 = query(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
        )
        .bind(&app)
        .fetch_one(&mut admin)
        .await
        .unwrap()
        .get(0);
        assert!(killed >= 2, "round {round}: terminated {killed} sessions");
        // At once, on connections the pool still holds.
        repo.execute(
            &format!("t{round}-0"),
            AccountCommand::Deposit { amount: 5 },
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: a command after the sessions ended: {e}"));
        store
            .append(
                &format!("direct-{round}"),
                ExpectedVersion::NoStream,
                deposits(0, 2),
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: an append after the sessions ended: {e}"));
        appended += 3;
        let stored = store
            .read_all(Position::ORIGIN, None, 1000)
            .await
            .unwrap_or_else(|e| panic!("round {round}: a read after the sessions ended: {e}"));
        assert_eq!(
            stored.len() as u64,
            appended,
            "round {round}: every event once"
        );
        let ids: std::collections::HashSet<Uuid> = stored.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), stored.len(), "round {round}: no event twice");
    }
}
