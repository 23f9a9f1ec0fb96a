//! The deadline store suite (`aftermath_tests::deadlines`) against every
//! backend: memory, SQLite files in temp dirs, and PostgreSQL when
//! `AFTERMATH_PG_URL` is set (e.g. `postgres://postgres@127.0.0.1:5432/test`;
//! a fresh schema per test, dropped afterwards). Without the variable the
//! PostgreSQL tests print SKIPPED; with it set but the server unreachable,
//! they fail.

use aftermath::process::MemoryDeadlines;
use aftermath::{PostgresStore, SqliteStore};
use aftermath_tests::Fresh;
use aftermath_tests::deadlines::DeadlineBackend;
use aftermath_tests::postgres::{SchemaGuard, connect, url};

struct Memory;

#[async_trait::async_trait]
impl DeadlineBackend for Memory {
    type Store = MemoryDeadlines;
    const NAME: &'static str = "memory";
    async fn open() -> Result<Fresh<MemoryDeadlines>, String> {
        Ok(Fresh {
            store: MemoryDeadlines::new(),
            guard: Box::new(()),
        })
    }
    async fn reopen(_: MemoryDeadlines) -> Option<MemoryDeadlines> {
        None
    }
}

struct Sqlite;

#[async_trait::async_trait]
impl DeadlineBackend for Sqlite {
    type Store = SqliteStore;
    const NAME: &'static str = "sqlite";
    async fn open() -> Result<Fresh<SqliteStore>, String> {
        // SQLite always runs: a failure to open is a test failure, not a skip.
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("events.db"))
            .await
            .expect("open a fresh SQLite store");
        Ok(Fresh {
            store,
            guard: Box::new(dir),
        })
    }
    async fn reopen(store: SqliteStore) -> Option<SqliteStore> {
        let path = store.path().to_owned();
        drop(store);
        Some(
            SqliteStore::open(&path)
                .await
                .expect("reopen the SQLite file"),
        )
    }
}

struct Postgres;

#[async_trait::async_trait]
impl DeadlineBackend for Postgres {
    type Store = PostgresStore;
    const NAME: &'static str = "postgres";
    async fn open() -> Result<Fresh<PostgresStore>, String> {
        let url = url().ok_or_else(|| "AFTERMATH_PG_URL not set".to_owned())?;
        let guard = SchemaGuard::new(&url);
        // Panics when the URL is set but the server cannot be reached.
        let store = connect(&url, &guard.schema).await;
        Ok(Fresh {
            store,
            guard: Box::new(guard),
        })
    }
    async fn reopen(store: PostgresStore) -> Option<PostgresStore> {
        let url = url().expect("AFTERMATH_PG_URL was set when the store opened");
        let schema = store.schema().to_owned();
        drop(store);
        Some(connect(&url, &schema).await)
    }
}

mod memory {
    aftermath_tests::deadline_store_tests!(super::Memory);
}

mod sqlite {
    aftermath_tests::deadline_store_tests!(super::Sqlite);
}

mod postgres {
    aftermath_tests::deadline_store_tests!(super::Postgres);
}
