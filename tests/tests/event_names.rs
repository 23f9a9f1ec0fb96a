//! Two aggregates whose enums both have an `Opened` variant, with the same
//! payload shape, in one SQLite store: each projection receives only its own
//! enum's events. (The read path of every backend is checked by the
//! conformance case `each_subscriber_receives_only_its_own_events`.)

use aftermath::projection::{HandlerError, Projection, ProjectionRunner};
use aftermath::store::sqlite::SqliteTx;
use aftermath::{Event, EventData, EventStore, ExpectedVersion, Recorded, SqliteStore, StoreError};
use aftermath_tests::domain::AccountEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum OrderEvent {
    Opened { owner: String },
}

/// Records every event it is given: (stream, owner) in a table of its own.
struct Openings<E> {
    table: &'static str,
    owner: fn(&E) -> Option<&str>,
}

impl<E: Event> Projection for Openings<E> {
    type Event = E;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        self.table
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {} (stream TEXT NOT NULL, owner TEXT)",
            self.table
        ))?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", self.table))?;
        Ok(())
    }

    async fn apply(&self, tx: &mut SqliteTx, event: &Recorded<E>) -> Result<(), HandlerError> {
        tx.execute(
            &format!("INSERT INTO {} (stream, owner) VALUES (?1, ?2)", self.table),
            (&event.stream, (self.owner)(&event.event)),
        )?;
        Ok(())
    }
}

async fn rows(store: &SqliteStore, table: &'static str) -> Vec<(String, String)> {
    store
        .read(move |conn| {
            let read =
                || -> Result<Vec<(String, String)>, aftermath::store::sqlite::rusqlite::Error> {
                    let mut stmt =
                        conn.prepare(&format!("SELECT stream, owner FROM {table} ORDER BY rowid"))?;
                    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                        .collect()
                };
            read().map_err(|e| StoreError::database("reading a read model", e))
        })
        .await
        .expect("read the read model")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_projection_receives_only_its_own_enums_events() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .expect("open store");
    for i in 0..4 {
        let account = AccountEvent::Opened {
            owner: format!("ann-{i}"),
        };
        let order = OrderEvent::Opened {
            owner: format!("bob-{i}"),
        };
        store
            .append(
                &format!("account-{i}"),
                ExpectedVersion::NoStream,
                vec![EventData::fresh(&account).unwrap()],
            )
            .await
            .unwrap();
        store
            .append(
                &format!("order-{i}"),
                ExpectedVersion::NoStream,
                vec![EventData::fresh(&order).unwrap()],
            )
            .await
            .unwrap();
    }

    let accounts = Openings::<AccountEvent> {
        table: "account_openings",
        owner: |e| match e {
            AccountEvent::Opened { owner } => Some(owner),
            _ => None,
        },
    };
    let orders = Openings::<OrderEvent> {
        table: "order_openings",
        owner: |e| match e {
            OrderEvent::Opened { owner } => Some(owner),
        },
    };
    ProjectionRunner::new(accounts, store.clone(), store.clone())
        .catch_up()
        .await
        .expect("the account projection catches up");
    ProjectionRunner::new(orders, store.clone(), store.clone())
        .catch_up()
        .await
        .expect("the order projection catches up");

    let want = |category: &str, who: &str| -> Vec<(String, String)> {
        (0..4)
            .map(|i| (format!("{category}-{i}"), format!("{who}-{i}")))
            .collect()
    };
    assert_eq!(
        rows(&store, "account_openings").await,
        want("account", "ann")
    );
    assert_eq!(rows(&store, "order_openings").await, want("order", "bob"));
}
