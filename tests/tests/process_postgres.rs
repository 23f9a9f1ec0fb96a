//! The process manager suite (`aftermath_tests::process`) on PostgreSQL:
//! the `PostgresStore` is the event store, the deadline store, the
//! checkpoint store and the effect journal.
//!
//! Runs when `AFTERMATH_PG_URL` is set (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); every test gets a fresh
//! schema, dropped afterwards. Without the variable each test prints
//! SKIPPED; with it set but the server unreachable, the tests fail.

use aftermath::PostgresStore;
use aftermath_tests::postgres::{SchemaGuard, connect, url};
use aftermath_tests::process::{Parts, ProcessBackend};

struct Postgres;

#[async_trait::async_trait]
impl ProcessBackend for Postgres {
    type Store = PostgresStore;
    type Deadlines = PostgresStore;
    type Checkpoints = PostgresStore;
    type Journal = PostgresStore;
    const NAME: &'static str = "postgres";

    async fn open() -> Result<Parts<Self>, String> {
        let url = url().ok_or_else(|| "AFTERMATH_PG_URL not set".to_owned())?;
        let guard = SchemaGuard::new(&url);
        // Panics when the URL is set but the server cannot be reached.
        let store = connect(&url, &guard.schema).await;
        Ok(Parts {
            store: store.clone(),
            deadlines: store.clone(),
            checkpoints: store.clone(),
            journal: store,
            guard: Box::new(guard),
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
        let url = url().expect("AFTERMATH_PG_URL was set when the store opened");
        let schema = store.schema().to_owned();
        drop((store, deadlines, checkpoints, journal));
        let store = connect(&url, &schema).await;
        Parts {
            store: store.clone(),
            deadlines: store.clone(),
            checkpoints: store.clone(),
            journal: store,
            guard,
        }
    }
}

aftermath_tests::process_tests!(Postgres);
