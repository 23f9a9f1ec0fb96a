//! The process manager suite (`aftermath_tests::process`) on SQLite: one
//! file in a temp dir per test; the `SqliteStore` is the event store, the
//! deadline store, the checkpoint store and the effect journal.

use aftermath::SqliteStore;
use aftermath_tests::process::{Parts, ProcessBackend};

struct Sqlite;

#[async_trait::async_trait]
impl ProcessBackend for Sqlite {
    type Store = SqliteStore;
    type Deadlines = SqliteStore;
    type Checkpoints = SqliteStore;
    type Journal = SqliteStore;
    const NAME: &'static str = "sqlite";

    async fn open() -> Result<Parts<Self>, String> {
        // SQLite always runs: a failure to open is a test failure, not a skip.
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("events.db"))
            .await
            .expect("open a fresh SQLite store");
        Ok(Parts {
            store: store.clone(),
            deadlines: store.clone(),
            checkpoints: store.clone(),
            journal: store,
            guard: Box::new(dir),
        })
    }

    async fn reopen(parts: Parts<Self>) -> Parts<Self> {
        let Parts {
            store,
            deadlines,
            checkpoints,
            journal,
            guard,
        } = parts;
        let path = store.path().to_owned();
        drop((store, deadlines, checkpoints, journal));
        let store = SqliteStore::open(&path)
            .await
            .expect("reopen the SQLite file");
        Parts {
            store: store.clone(),
            deadlines: store.clone(),
            checkpoints: store.clone(),
            journal: store,
            guard,
        }
    }
}

aftermath_tests::process_tests!(Sqlite);
