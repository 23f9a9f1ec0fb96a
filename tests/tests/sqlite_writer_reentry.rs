//! A SQLite projection runs its `apply` on the store's only writer thread.
//! Calling the store from there (an append, a read, a `write` job) used to
//! hang every write of the process; it now fails at once with
//! `StoreError::WriterReentry`, and an `apply` that waits for anything else
//! is given up after a second. Every wait here is bounded by a tokio timeout,
//! so a regression fails instead of hanging.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aftermath::projection::{
    HandlerError, OnError, Projection, ProjectionOptions, ProjectionRunner, ReadModelDb,
};
use aftermath::store::sqlite::SqliteTx;
use aftermath::worker::SubscriberError;
use aftermath::{
    Direction, EventStore, ExpectedVersion, Position, Recorded, SqliteStore, StoreError,
};
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::projections::append_accounts;
use aftermath_tests::raw;
use tempfile::TempDir;

/// Far above the one-second wait limit: only a hang reaches it.
const BOUND: Duration = Duration::from_secs(20);

async fn sqlite() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .expect("open store");
    (dir, store)
}

/// What the misbehaving projection does from inside `apply`.
#[derive(Clone, Copy, Debug)]
enum Misuse {
    /// Appends to the store it projects from.
    Append,
    /// Reads a stream of that store.
    Read,
    /// Runs a `write` job on it.
    Write,
    /// Waits for a task that appends to the store (an indirect deadlock).
    AwaitAnAppendingTask,
}

struct Misbehaving {
    store: SqliteStore,
    misuse: Misuse,
    /// The error `apply` got from the store, if any.
    seen: Arc<Mutex<Option<StoreError>>>,
    handle: tokio::runtime::Handle,
}

impl Projection for Misbehaving {
    type Event = AccountEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        "misbehaving"
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch("CREATE TABLE IF NOT EXISTS misbehaving (position INTEGER PRIMARY KEY)")?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch("DROP TABLE IF EXISTS misbehaving")?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut SqliteTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        tx.execute(
            "INSERT INTO misbehaving (position) VALUES (?1)",
            [event.position.0 as i64],
        )?;
        let result = match self.misuse {
            Misuse::Append => self
                .store
                .append(
                    "audit-1",
                    ExpectedVersion::Any,
                    vec![raw("test.Audited", "{}")],
                )
                .await
                .map(drop),
            Misuse::Read => self
                .store
                .read_stream(&event.stream, 1, Direction::Forward, 10)
                .await
                .map(drop),
            Misuse::Write => self.store.write(|_| Ok(())).await,
            Misuse::AwaitAnAppendingTask => {
                let store = self.store.clone();
                let appended = self.handle.spawn(async move {
                    store
                        .append(
                            "audit-1",
                            ExpectedVersion::Any,
                            vec![raw("test.Audited", "{}")],
                        )
                        .await
                });
                // The task's append waits for the writer, which runs this.
                let _ = appended.await;
                Ok(())
            }
        };
        if let Err(error) = result {
            let message = error.to_string();
            *self.seen.lock().unwrap() = Some(error);
            return Err(HandlerError::msg(message));
        }
        Ok(())
    }
}

fn runner(
    store: &SqliteStore,
    misuse: Misuse,
) -> (
    ProjectionRunner<Misbehaving, SqliteStore>,
    Arc<Mutex<Option<StoreError>>>,
) {
    let seen = Arc::new(Mutex::new(None));
    let projection = Misbehaving {
        store: store.clone(),
        misuse,
        seen: seen.clone(),
        handle: tokio::runtime::Handle::current(),
    };
    let runner = ProjectionRunner::new(projection, store.clone(), store.clone()).options(
        ProjectionOptions::default()
            .batch_size(10)
            .attempts(1)
            .on_error(OnError::Stop),
    );
    (runner, seen)
}

/// The store still takes appends, and the failed batch left nothing behind.
async fn store_still_works(store: &SqliteStore, head: Position) {
    let done = tokio::time::timeout(
        BOUND,
        store.append(
            "after-1",
            ExpectedVersion::Any,
            vec![raw("test.After", "{}")],
        ),
    )
    .await
    .expect("an append after the misuse completes")
    .expect("append");
    assert!(done.last_position.unwrap() > head);
    let rows: i64 = store
        .read(|conn| {
            conn.query_row("SELECT count(*) FROM misbehaving", [], |r| r.get(0))
                .map_err(|e| StoreError::database("counting", e))
        })
        .await
        .expect("read model table exists (setup committed)");
    assert_eq!(rows, 0, "the failed batch was rolled back");
    let checkpoint = ReadModelDb::load_state(store, "misbehaving")
        .await
        .unwrap()
        .map_or(Position::ORIGIN, |s| s.position);
    assert_eq!(checkpoint, Position::ORIGIN, "no batch was committed");
}

/// An append, a read or a `write` job from `apply` fails at once with
/// `WriterReentry` naming the store; the runner stops on that event with the
/// message, and the store keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_calls_from_a_sqlite_apply_fail_with_writer_reentry() {
    for misuse in [Misuse::Append, Misuse::Read, Misuse::Write] {
        let (dir, store) = sqlite().await;
        let head = append_accounts(&store, 0, 5, 5, 1).await;
        let (runner, seen) = runner(&store, misuse);
        let outcome = tokio::time::timeout(BOUND, runner.catch_up())
            .await
            .unwrap_or_else(|_| panic!("{misuse:?} from apply hung the writer"));
        match outcome {
            Err(SubscriberError::Event {
                position, message, ..
            }) => {
                assert_eq!(position, Position(1), "{misuse:?}: the first event fails");
                assert!(
                    message.contains("only writer"),
                    "{misuse:?}: the handler's error says why: {message}"
                );
            }
            other => panic!("{misuse:?}: expected the runner to stop on the event, got {other:?}"),
        }
        match seen.lock().unwrap().take() {
            Some(StoreError::WriterReentry { store: path, cause }) => {
                assert!(
                    path.contains(&dir.path().display().to_string()),
                    "{misuse:?}: names the store: {path}"
                );
                assert!(
                    cause.contains("called the store again"),
                    "{misuse:?}: {cause}"
                );
            }
            other => panic!("{misuse:?}: expected WriterReentry, got {other:?}"),
        }
        store_still_works(&store, head).await;
    }
}

/// An `apply` that waits for a task which itself needs the writer (a deadlock
/// no thread-local can see) is given up after about a second: the batch is
/// rolled back, the runner fails with `WriterReentry`, and the task's append
/// then goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_apply_waiting_on_the_writer_is_given_up() {
    let (_dir, store) = sqlite().await;
    let head = append_accounts(&store, 0, 3, 3, 1).await;
    let (runner, _seen) = runner(&store, Misuse::AwaitAnAppendingTask);
    let outcome = tokio::time::timeout(BOUND, runner.catch_up())
        .await
        .expect("an apply waiting on the writer hung it");
    match outcome {
        Err(SubscriberError::Store {
            source: StoreError::WriterReentry { cause, .. },
            ..
        }) => assert!(cause.contains("waited"), "{cause}"),
        other => panic!("expected WriterReentry from the batch, got {other:?}"),
    }
    store_still_works(&store, head).await;
    // The spawned task's append went through once the writer was free.
    let audited = store
        .read_stream("audit-1", 1, Direction::Forward, 10)
        .await
        .unwrap();
    assert_eq!(audited.len(), 1);
}

/// The same rule for a plain `write` job that blocks on a store call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_job_calling_its_store_fails_with_writer_reentry() {
    let (_dir, store) = sqlite().await;
    let inner = store.clone();
    let outcome = tokio::time::timeout(
        BOUND,
        store.write(move |_| {
            futures::executor::block_on(inner.append(
                "audit-1",
                ExpectedVersion::Any,
                vec![raw("test.Audited", "{}")],
            ))
        }),
    )
    .await
    .expect("a write job appending to its own store hung the writer");
    assert!(
        matches!(outcome, Err(StoreError::WriterReentry { .. })),
        "{outcome:?}"
    );
    tokio::time::timeout(
        BOUND,
        store.append(
            "after-1",
            ExpectedVersion::Any,
            vec![raw("test.After", "{}")],
        ),
    )
    .await
    .expect("the writer still runs")
    .expect("append");
}
