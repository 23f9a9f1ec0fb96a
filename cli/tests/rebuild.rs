//! `aftermath_cli::rebuild`: a rebuild interrupted part-way leaves a read
//! model exact up to its checkpoint; resumed, it ends with the read model a
//! plain run builds.

use std::collections::BTreeMap;

use aftermath::projection::{
    HandlerError, Projection, ProjectionOptions, ProjectionRunner, ReadModelDb,
};
use aftermath::store::sqlite::SqliteTx;
use aftermath::store::sqlite::rusqlite;
use aftermath::{Event, EventData, EventStore, ExpectedVersion, Position, Recorded, SqliteStore};
use aftermath_cli::Outcome;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "ledger")]
enum LedgerEvent {
    Posted { amount: i64 },
}

/// Balance and postings per account.
struct Totals;

impl Projection for Totals {
    type Event = LedgerEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        "totals"
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS totals (account TEXT PRIMARY KEY, balance INTEGER NOT NULL, postings INTEGER NOT NULL)",
        )?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch("DROP TABLE IF EXISTS totals")?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut SqliteTx,
        event: &Recorded<LedgerEvent>,
    ) -> Result<(), HandlerError> {
        let LedgerEvent::Posted { amount } = event.event;
        tx.prepare_cached(
            "INSERT INTO totals (account, balance, postings) VALUES (?1, ?2, 1)
             ON CONFLICT (account) DO UPDATE SET balance = balance + ?2, postings = postings + 1",
        )?
        .execute((event.stream.as_str(), amount))?;
        Ok(())
    }
}

type Model = BTreeMap<String, (i64, i64)>;

/// The read model as stored.
async fn model(store: &SqliteStore) -> Model {
    store
        .read(|c| {
            let rows = || -> rusqlite::Result<Model> {
                let mut stmt = c.prepare("SELECT account, balance, postings FROM totals")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?;
                rows.collect()
            };
            rows().map_err(|e| aftermath::StoreError::database("reading totals", e))
        })
        .await
        .unwrap()
}

/// The read model the events up to `upto` make.
async fn expected(store: &SqliteStore, upto: Position) -> Model {
    let mut model = Model::new();
    let mut after = Position::ORIGIN;
    loop {
        let page = store.read_all(after, None, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        for e in page.iter().filter(|e| e.position <= upto) {
            let LedgerEvent::Posted { amount } = e.decode::<LedgerEvent>().unwrap().unwrap().event;
            let row = model.entry(e.stream.clone()).or_default();
            row.0 += amount;
            row.1 += 1;
        }
    }
    model
}

async fn checkpoint(store: &SqliteStore) -> Position {
    store.load_state("totals").await.unwrap().unwrap().position
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rebuild_resumes_to_the_exact_read_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ledger.db"))
        .await
        .unwrap();
    for chunk in 0..30i64 {
        let batch = (0..200)
            .map(|i| {
                EventData::fresh(&LedgerEvent::Posted {
                    amount: (chunk * 200 + i) % 89 - 30,
                })
                .unwrap()
            })
            .collect();
        store
            .append(
                &format!("account-{}", chunk % 7),
                ExpectedVersion::Any,
                batch,
            )
            .await
            .unwrap();
    }
    let head = store.head().await.unwrap();
    let runner = ProjectionRunner::new(Totals, store.clone(), store.clone())
        .options(ProjectionOptions::default().batch_size(10));
    runner.catch_up().await.unwrap();
    let full = model(&store).await;
    assert_eq!(full, expected(&store, head).await);

    // Interrupted once the replay has committed something.
    let watcher = store.clone();
    let stop = async move {
        loop {
            let at = watcher
                .load_state("totals")
                .await
                .unwrap()
                .map(|s| s.position);
            if at.is_some_and(|p| p > Position::ORIGIN) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    };
    let outcome = aftermath_cli::rebuild_until(&runner, stop).await.unwrap();
    let Outcome::Interrupted { position, head: to } = outcome else {
        panic!("not interrupted: {outcome}");
    };
    assert_eq!(to, head);
    assert!(position > Position::ORIGIN && position < head, "{outcome}");
    assert_eq!(position, checkpoint(&store).await);
    assert_eq!(
        model(&store).await,
        expected(&store, position).await,
        "exact up to the checkpoint, nothing of the old model left"
    );
    assert!(outcome.to_string().contains("resume to continue"));

    // Resumed: from the checkpoint to the head.
    let outcome = aftermath_cli::resume_until(&runner, std::future::pending())
        .await
        .unwrap();
    assert!(
        matches!(outcome, Outcome::Finished { position, .. } if position == head),
        "{outcome}"
    );
    assert_eq!(model(&store).await, full);

    // A rebuild that is not interrupted ends with the same model.
    let outcome = aftermath_cli::rebuild_until(&runner, std::future::pending())
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Finished { position, .. } if position == head));
    assert_eq!(model(&store).await, full);
}
