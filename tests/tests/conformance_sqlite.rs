//! The conformance suite against SQLite files.

use aftermath::{SqliteOptions, SqliteStore, Upcasters};
use aftermath_tests::{Backend, Fresh};

struct Sqlite;

#[async_trait::async_trait]
impl Backend for Sqlite {
    type Store = SqliteStore;
    const NAME: &'static str = "sqlite";
    async fn open(upcasters: Upcasters) -> Result<Fresh<SqliteStore>, String> {
        // SQLite always runs: a failure to open is a test failure, not a skip.
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteOptions::default().upcasters(upcasters);
        let store = SqliteStore::open_with(dir.path().join("events.db"), options)
            .await
            .expect("open a fresh SQLite store");
        Ok(Fresh {
            store,
            guard: Box::new(dir),
        })
    }
}

aftermath_tests::conformance_tests!(Sqlite);
