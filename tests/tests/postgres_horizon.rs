//! The PostgreSQL append horizon (`store/postgres/order.rs`): readers wait
//! only for appends to this store that are still in flight, and positions
//! survive a move of the log to another cluster.
//!
//! - transactions that do not append here (same database, another
//!   database, a projection's batch transaction, prepared transactions) do
//!   not delay delivery; a paused append does, and is named;
//! - appends inside a user's transaction and savepoints keep the order, and
//!   an append that is not its transaction's first write is refused;
//! - a dump restored into a cluster whose transaction counter is behind the
//!   stored ids: old checkpoints, a full rebuild and new appends read
//!   everything once, in order.
//!
//! Runs when `AFTERMATH_PG_URL` is set; the prepared-transaction and
//! restore tests start a throwaway cluster of their own (`TempCluster`).

use std::sync::Arc;
use std::time::Duration;

use aftermath::projection::{HandlerError, Projection, ProjectionRunner};
use aftermath::store::postgres::PgTx;
use aftermath::store::{EventStore, ExpectedVersion, read_all_pages};
use aftermath::{Position, PostgresOptions, PostgresStore, Recorded, StoredEvent};
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::pg_cluster::TempCluster;
use aftermath_tests::postgres::{SchemaGuard, append_in, connect, raw, url};
use aftermath_tests::{deposits, skip_notice};
use futures::TryStreamExt;
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::PgConnection;
use tokio::sync::Semaphore;
use uuid::Uuid;

macro_rules! url_or_skip {
    ($test:literal) => {
        match url() {
            Some(url) => url,
            None => {
                skip_notice!(
                    "SKIPPED postgres_horizon::{}: AFTERMATH_PG_URL not set",
                    $test
                );
                return;
            }
        }
    };
}

/// `url` with another database name.
fn with_database(url: &str, db: &str) -> String {
    let cut = url.rfind('/').expect("a database in the URL");
    format!("{}/{db}", &url[..cut])
}

async fn pid(conn: &mut PgConnection) -> i32 {
    query("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
        .get(0)
}

async fn everything(store: &PostgresStore, after: Position) -> Vec<StoredEvent> {
    read_all_pages(store, after, None, 100)
        .try_collect()
        .await
        .unwrap()
}

/// Transactions that hold a transaction id but do not append to this store
/// (a write in the same schema, a transaction in another database) do not
/// delay delivery: an append is readable at once, and nothing is held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_transactions_do_not_delay_delivery() {
    let url = url_or_skip!("unrelated_transactions_do_not_delay_delivery");
    let guard = SchemaGuard::new(&url);
    let store = connect(&url, &guard.schema).await;
    let mut same_db = raw(&url).await;
    same_db
        .execute(raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE \"{}\".read_model (n int)",
            guard.schema
        ))))
        .await
        .unwrap();
    same_db.execute("BEGIN").await.unwrap();
    same_db
        .execute(raw_sql(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".read_model VALUES (1)",
            guard.schema
        ))))
        .await
        .unwrap();
    let mut other_db = raw(&with_database(&url, "postgres")).await;
    other_db.execute("BEGIN").await.unwrap();
    other_db
        .execute("SELECT pg_current_xact_id()")
        .await
        .unwrap();

    let done = store
        .append("u-1", ExpectedVersion::NoStream, deposits(0, 3))
        .await
        .unwrap();
    // One read each, no retry: nothing may hold them back.
    let page = store.read_all(Position::ORIGIN, None, 10).await.unwrap();
    assert_eq!(
        page.len(),
        3,
        "readable at once despite the open transactions"
    );
    assert_eq!(store.head().await.unwrap(), done.last_position.unwrap());
    assert!(store.held_back().await.unwrap().is_none());
    let typed = store
        .read_all(Position::ORIGIN, Some(&["account.Deposited"]), 10)
        .await
        .unwrap();
    assert_eq!(typed.len(), 3);

    same_db.execute("COMMIT").await.unwrap();
    other_db.execute("COMMIT").await.unwrap();
}

/// A projection holding its batch transaction open (it has written to its
/// read model) does not delay another subscriber of the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_batch_does_not_delay_another_subscriber() {
    struct Blocking {
        schema: String,
        entered: Arc<Semaphore>,
        release: Arc<Semaphore>,
    }
    impl Projection for Blocking {
        type Event = AccountEvent;
        type Db = PostgresStore;
        fn name(&self) -> &str {
            "blocking"
        }
        async fn setup(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
            tx.conn()
                .execute(raw_sql(AssertSqlSafe(format!(
                    "CREATE TABLE IF NOT EXISTS \"{}\".seen (id uuid PRIMARY KEY)",
                    self.schema
                ))))
                .await?;
            Ok(())
        }
        async fn reset(&self, _: &mut PgTx) -> Result<(), HandlerError> {
            Ok(())
        }
        async fn apply(
            &self,
            tx: &mut PgTx,
            event: &Recorded<AccountEvent>,
        ) -> Result<(), HandlerError> {
            query(AssertSqlSafe(format!(
                "INSERT INTO \"{}\".seen VALUES ($1)",
                self.schema
            )))
            .bind(event.id)
            .execute(tx.conn())
            .await?;
            // Written (so the transaction has an id); now wait, holding it.
            self.entered.add_permits(1);
            self.release.acquire().await.unwrap().forget();
            Ok(())
        }
    }

    let url = url_or_skip!("a_projection_batch_does_not_delay_another_subscriber");
    let guard = SchemaGuard::new(&url);
    let store = connect(&url, &guard.schema).await;
    let other = connect(&url, &guard.schema).await;
    store
        .append("p-1", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    let entered = Arc::new(Semaphore::new(0));
    let release = Arc::new(Semaphore::new(0));
    let runner = ProjectionRunner::new(
        Blocking {
            schema: guard.schema.clone(),
            entered: entered.clone(),
            release: release.clone(),
        },
        store.clone(),
        store.clone(),
    );
    let projecting = tokio::spawn(async move { runner.catch_up().await });
    entered.acquire().await.unwrap().forget();

    // The projection's transaction is open and has written.
    let done = store
        .append("p-2", ExpectedVersion::NoStream, deposits(1, 2))
        .await
        .unwrap();
    let page = other.read_all(Position::ORIGIN, None, 10).await.unwrap();
    assert_eq!(
        page.len(),
        3,
        "the projection's open batch holds nobody back"
    );
    assert_eq!(other.head().await.unwrap(), done.last_position.unwrap());

    release.add_permits(100);
    projecting.await.unwrap().unwrap();
}

/// An append paused before its commit holds readers back (they wait, never
/// skip), is named by `held_back`, and reads on the same handle as the
/// writers do not wait for their own appends: `wait_for_own_writes` is the
/// explicit way to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_append_holds_readers_back_and_is_named() {
    let url = url_or_skip!("a_paused_append_holds_readers_back_and_is_named");
    let guard = SchemaGuard::new(&url);
    let store = connect(&url, &guard.schema).await;
    let first = store
        .append("h-1", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    let before = first.last_position.unwrap();

    let mut paused = raw(&url).await;
    let paused_pid = pid(&mut paused).await;
    paused.execute("BEGIN").await.unwrap();
    let held = deposits(1, 1);
    append_in(&mut paused, &guard.schema, "h-2", &held)
        .await
        .unwrap();
    let own = store
        .append("h-3", ExpectedVersion::NoStream, deposits(2, 2))
        .await
        .unwrap();

    // Neither call waits for the handle's own append (the old behaviour
    // waited up to 5 s); both stop before the paused append.
    let head = tokio::time::timeout(Duration::from_secs(2), store.head())
        .await
        .expect("head() does not wait")
        .unwrap();
    assert_eq!(head, before);
    let page = tokio::time::timeout(Duration::from_secs(2), store.read_all(before, None, 10))
        .await
        .expect("read_all does not wait")
        .unwrap();
    assert!(page.is_empty(), "read past an append in flight");
    assert!(
        !store
            .wait_for_own_writes(Duration::from_millis(200))
            .await
            .unwrap(),
        "own writes are not readable while an older append is in flight"
    );
    let report = store
        .held_back()
        .await
        .unwrap()
        .expect("readers are held back");
    let blocker = report.blocker.expect("the paused append is named");
    assert_eq!(blocker.pid, Some(paused_pid));
    assert_eq!(blocker.state.as_deref(), Some("idle in transaction"));
    assert!(blocker.transaction_age.is_some());
    assert!(
        blocker
            .query
            .as_deref()
            .unwrap_or_default()
            .contains("append"),
        "{blocker:?}"
    );

    paused.execute("COMMIT").await.unwrap();
    assert!(
        store
            .wait_for_own_writes(Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(store.head().await.unwrap(), own.last_position.unwrap());
    let page = store.read_all(before, None, 10).await.unwrap();
    let ids: Vec<Uuid> = page.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        ids[0], held[0].id,
        "the paused append comes first: it got its id first"
    );
    assert!(store.held_back().await.unwrap().is_none());
}

/// Appends inside a user's transaction and savepoints: ordered with the
/// stream's versions, several appends in one transaction keep their seqs,
/// and an append that is not the transaction's first write is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_in_user_transactions_and_savepoints_keep_the_order() {
    let url = url_or_skip!("appends_in_user_transactions_and_savepoints_keep_the_order");
    let guard = SchemaGuard::new(&url);
    let store = connect(&url, &guard.schema).await;
    let schema = guard.schema.clone();

    let mut user = raw(&url).await;
    user.execute("BEGIN").await.unwrap();
    user.execute("SAVEPOINT a").await.unwrap();
    let mine = deposits(0, 2);
    append_in(&mut user, &schema, "s-1", &mine).await.unwrap();
    user.execute("RELEASE SAVEPOINT a").await.unwrap();
    user.execute("SAVEPOINT b").await.unwrap();
    let more = deposits(2, 1);
    append_in(&mut user, &schema, "s-2", &more).await.unwrap();
    user.execute("RELEASE SAVEPOINT b").await.unwrap();
    // Another writer appends to the same stream meanwhile: it waits for the
    // stream's lock, so it gets a larger id and comes after in $all.
    let racing = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append("s-1", ExpectedVersion::Any, deposits(3, 1))
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !racing.is_finished(),
        "the racing append waits for the stream lock"
    );
    user.execute("COMMIT").await.unwrap();
    let racing = racing.await.unwrap();
    assert_eq!(racing.last_version, 3);

    let all = everything(&store, Position::ORIGIN).await;
    let order: Vec<(String, u64)> = all.iter().map(|e| (e.stream.clone(), e.version)).collect();
    assert_eq!(
        order,
        vec![
            ("s-1".to_owned(), 1),
            ("s-1".to_owned(), 2),
            ("s-2".to_owned(), 1),
            ("s-1".to_owned(), 3)
        ]
    );
    assert!(all.windows(2).all(|p| p[0].position < p[1].position));

    // A savepoint that appended and rolled back released the lock and
    // removed the rows; the transaction still has its id: refused.
    user.execute("BEGIN").await.unwrap();
    user.execute("SAVEPOINT a").await.unwrap();
    append_in(&mut user, &schema, "s-3", &deposits(4, 1))
        .await
        .unwrap();
    user.execute("ROLLBACK TO SAVEPOINT a").await.unwrap();
    refused_as_not_first_write(&mut user, &schema, "s-3").await;
    user.execute("ROLLBACK").await.unwrap();

    // A write before the append: refused, naming what to do.
    user.execute("BEGIN").await.unwrap();
    user.execute(raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".mine (n int)"
    ))))
    .await
    .unwrap();
    refused_as_not_first_write(&mut user, &schema, "s-4").await;
    user.execute("ROLLBACK").await.unwrap();
    // Taking the append lock first makes it legal.
    user.execute("BEGIN").await.unwrap();
    user.execute(raw_sql(AssertSqlSafe(format!(
        "SELECT pg_advisory_xact_lock_shared(hashtext('{schema}.append'), 1)"
    ))))
    .await
    .unwrap();
    user.execute(raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".mine (n int)"
    ))))
    .await
    .unwrap();
    append_in(&mut user, &schema, "s-4", &deposits(6, 1))
        .await
        .unwrap();
    user.execute("COMMIT").await.unwrap();
    assert_eq!(everything(&store, Position::ORIGIN).await.len(), 5);
}

/// An append on `conn` is refused because its transaction wrote (or has an
/// id) without holding the append lock.
async fn refused_as_not_first_write(conn: &mut PgConnection, schema: &str, stream: &str) {
    let refused = append_in(conn, schema, stream, &deposits(5, 1))
        .await
        .expect_err("an append that is not its transaction's first write is refused");
    assert!(
        refused.to_string().contains("must be the first write"),
        "{refused}"
    );
}

/// Prepared (two-phase) transactions: one that did not append does not
/// stall readers; one that appended holds them back, is reported, and its
/// events are read once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transactions_hold_readers_back_only_when_they_appended() {
    let _ = url_or_skip!("prepared_transactions_hold_readers_back_only_when_they_appended");
    let cluster = TempCluster::start(&["max_prepared_transactions=8"]);
    let url = cluster.url("postgres");
    let schema = "prepared";
    let store = PostgresStore::connect_with(&url, PostgresOptions::default().schema(schema))
        .await
        .unwrap();

    let mut bystander = raw(&url).await;
    bystander.execute("BEGIN").await.unwrap();
    bystander
        .execute("SELECT pg_current_xact_id()")
        .await
        .unwrap();
    bystander
        .execute("PREPARE TRANSACTION 'bystander'")
        .await
        .unwrap();
    let done = store
        .append("x-1", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    assert_eq!(
        store
            .read_all(Position::ORIGIN, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.head().await.unwrap(), done.last_position.unwrap());

    let mut appender = raw(&url).await;
    appender.execute("BEGIN").await.unwrap();
    let held = deposits(1, 1);
    append_in(&mut appender, schema, "x-2", &held)
        .await
        .unwrap();
    appender
        .execute("PREPARE TRANSACTION 'appender'")
        .await
        .unwrap();
    store
        .append("x-3", ExpectedVersion::NoStream, deposits(2, 1))
        .await
        .unwrap();
    assert!(
        store
            .read_all(done.last_position.unwrap(), None, 10)
            .await
            .unwrap()
            .is_empty(),
        "a prepared append holds readers back"
    );
    let report = store.held_back().await.unwrap().expect("held back");
    let blocker = report.blocker.expect("named");
    assert_eq!(blocker.prepared.as_deref(), Some("appender"));
    assert_eq!(blocker.pid, None);

    let mut admin = raw(&url).await;
    admin.execute("COMMIT PREPARED 'appender'").await.unwrap();
    admin.execute("COMMIT PREPARED 'bystander'").await.unwrap();
    let rest = store
        .read_all(done.last_position.unwrap(), None, 10)
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0].id, held[0].id);
}

/// Burns transaction ids on `url` until its next id is at least `target`.
async fn burn_transaction_ids(url: &str, target: u64) {
    let mut conn = raw(url).await;
    conn.execute("CREATE TEMP TABLE burn (n int)")
        .await
        .unwrap();
    loop {
        let next: i64 = query("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get(0);
        if next as u64 >= target {
            return;
        }
        // Every block with an exception handler is a subtransaction, and
        // its write takes an id of its own.
        let n = (target - next as u64).min(50_000);
        conn.execute(raw_sql(AssertSqlSafe(format!(
            "DO $$ BEGIN FOR i IN 1..{n} LOOP \
               BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN others THEN NULL; END; \
             END LOOP; END $$"
        ))))
        .await
        .unwrap();
    }
}

/// The log restored (pg_dump | psql) into a cluster whose transaction
/// counter is far behind the stored ids: a checkpoint taken before the dump
/// reads exactly the rest, a full rebuild reads everything, and new appends
/// come after every old event, also for the old checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_survive_a_restore_into_a_younger_cluster() {
    let url = url_or_skip!("positions_survive_a_restore_into_a_younger_cluster");
    let cluster = TempCluster::start(&[]);
    let target_url = cluster.url("postgres");
    let young_next: i64 = query("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        .fetch_one(&mut raw(&target_url).await)
        .await
        .unwrap()
        .get(0);
    // The source's ids must be well ahead of the young cluster's counter.
    burn_transaction_ids(&url, young_next as u64 + 20_000).await;

    let guard = SchemaGuard::new(&url);
    let source = connect(&url, &guard.schema).await;
    for i in 0..10u64 {
        source
            .append(
                &format!("r-{i}"),
                ExpectedVersion::NoStream,
                deposits(i * 3, 3),
            )
            .await
            .unwrap();
    }
    let old = everything(&source, Position::ORIGIN).await;
    assert_eq!(old.len(), 30);
    let checkpoint = old[14].position;
    drop(source);

    let dump = cluster.run_checked(
        &cluster.tool("pg_dump"),
        &["--no-owner", "-n", &guard.schema, &url],
        false,
    );
    let file = std::env::temp_dir().join(format!("{}.sql", guard.schema));
    std::fs::write(&file, &dump.stdout).unwrap();
    cluster.run_checked(
        &cluster.tool("psql"),
        &[
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &target_url,
            "-f",
            &file.to_string_lossy(),
        ],
        false,
    );
    let _ = std::fs::remove_file(&file);

    let restored = connect(&target_url, &guard.schema).await;
    let rebuilt = everything(&restored, Position::ORIGIN).await;
    assert_eq!(
        rebuilt
            .iter()
            .map(|e| (e.id, e.position))
            .collect::<Vec<_>>(),
        old.iter().map(|e| (e.id, e.position)).collect::<Vec<_>>(),
        "a rebuild reads every restored event, at its old position"
    );
    let rest = everything(&restored, checkpoint).await;
    assert_eq!(rest.len(), 15, "the old checkpoint reads exactly the rest");
    assert_eq!(rest[0].id, old[15].id);

    let new = restored
        .append("r-0", ExpectedVersion::Exact(3), deposits(100, 2))
        .await
        .expect("new appends do not collide with restored positions");
    assert!(
        new.first_position.unwrap() > old.last().unwrap().position,
        "new events sort after every restored one"
    );
    let rest = everything(&restored, checkpoint).await;
    assert_eq!(rest.len(), 17);
    assert_eq!(rest[15].stream, "r-0");
    assert_eq!(rest[15].version, 4);
    assert_eq!(restored.head().await.unwrap(), new.last_position.unwrap());
    // Re-opening does not move the base again.
    let again = connect(&target_url, &guard.schema).await;
    let later = again
        .append("r-1", ExpectedVersion::Exact(3), deposits(200, 1))
        .await
        .unwrap();
    assert!(later.first_position.unwrap() > new.last_position.unwrap());
    assert_eq!(everything(&again, Position::ORIGIN).await.len(), 33);
}

/// A subscriber on its own handle stays live while a projection on the
/// writers' handle is busy writing its read model in its batch
/// transactions, appends keep coming, and an idle transaction in another
/// database holds a transaction id: every event appended is readable within
/// moments (a generous bound: this checks liveness, not speed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_stays_live_beside_a_busy_projection_and_an_idle_transaction() {
    use aftermath::worker::Worker;
    use aftermath_tests::postgres::PgBalances;

    let url =
        url_or_skip!("a_subscriber_stays_live_beside_a_busy_projection_and_an_idle_transaction");
    let guard = SchemaGuard::new(&url);
    let store = connect(&url, &guard.schema).await;
    let reader = connect(&url, &guard.schema).await;
    let mut idle = raw(&with_database(&url, "postgres")).await;
    idle.execute("BEGIN").await.unwrap();
    idle.execute("SELECT pg_current_xact_id()").await.unwrap();
    for i in 0..20 {
        store
            .append(
                &format!("fill-{i}"),
                ExpectedVersion::NoStream,
                deposits(0, 250),
            )
            .await
            .unwrap();
    }
    let worker = Worker::new()
        .add_subscriber(ProjectionRunner::new(
            PgBalances::new(&guard.schema, "busy", "t"),
            store.clone(),
            store.clone(),
        ))
        .start()
        .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let load = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            for n in 0u64.. {
                tokio::select! {
                    _ = stop.notified() => return,
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
                store
                    .append(
                        &format!("busy-{}", n % 50),
                        ExpectedVersion::Any,
                        deposits(n, 5),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let mut after = reader.head().await.unwrap();
    for i in 0..30 {
        let event = deposits(1000 + i, 1);
        let id = event[0].id;
        store
            .append("live-1", ExpectedVersion::Any, event)
            .await
            .unwrap();
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let page = reader.read_all(after, None, 1000).await.unwrap();
                if let Some(last) = page.last() {
                    after = last.position;
                }
                if page.iter().any(|e| e.id == id) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "event {i} not readable within 10 s: held back by {:?}",
            reader.held_back().await
        );
    }
    stop.notify_one();
    load.await.unwrap();
    worker.shutdown().await;
    idle.execute("ROLLBACK").await.unwrap();
}
