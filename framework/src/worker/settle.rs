//! Waiting until a subscriber has handled the log up to a position.

use std::time::Duration;

use super::{RunningWorker, SubscriberState, SubscriberStatus};
use crate::event::Position;
use crate::store::{EventStore, StoreError};

/// Why [`RunningWorker::settled`] returned without the subscriber settled.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// No subscriber of that name runs in this worker.
    #[error("no subscriber named `{0}` runs in this worker")]
    Unknown(String),
    /// The subscriber stopped for good before it got there.
    #[error("subscriber `{name}` stopped before it reached position {target}: {error:?}")]
    Stopped {
        /// The subscriber.
        name: String,
        /// The position waited for.
        target: Position,
        /// Why it stopped (`None`: shut down).
        error: Option<String>,
    },
    /// The time was up first.
    #[error(
        "subscriber `{name}` did not reach position {target} within {timeout:?} (it is at {position}, {state:?})"
    )]
    Timeout {
        /// The subscriber.
        name: String,
        /// The position waited for.
        target: Position,
        /// Where it was.
        position: Position,
        /// What it was doing.
        state: SubscriberState,
        /// How long it was given.
        timeout: Duration,
    },
    /// Reading the head of the log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether `status` says that everything up to `target` is handled (and, for
/// a projection, committed).
fn reached(status: &SubscriberStatus, target: Position) -> bool {
    // The position is reported once a page is committed, and a committed
    // page moves it through the page's end (events of other types passed
    // included). The head is not enough: it is reported before the page
    // it covers is handled.
    status.lag.position >= target
}

impl RunningWorker {
    /// Waits until subscriber `name` has handled every event up to `target`
    /// (e.g. the [`Executed::position`](crate::Executed) of a command whose
    /// effect on a read model a caller wants to see), and returns its
    /// status then. For a projection that means the read model includes
    /// those events (its checkpoint commits with them); for a reactor, that
    /// their effects are settled (done, parked or skipped); for a process
    /// manager, that its inputs are handled: their decisions recorded in
    /// the instances' streams. The commands those records send are
    /// dispatched when the runner reads the records back, at later
    /// positions: to wait for them too, wait again for the head after this
    /// returns ([`Self::settled_at_head`]).
    ///
    /// "Handled" counts events the subscriber does not read (other types):
    /// passing them is enough. Fails when `timeout` passes first, or when
    /// the subscriber stops for good.
    pub async fn settled(
        &self,
        name: &str,
        target: Position,
        timeout: Duration,
    ) -> Result<SubscriberStatus, SettleError> {
        let started = tokio::time::Instant::now();
        loop {
            let status = self
                .status_of(name)
                .ok_or_else(|| SettleError::Unknown(name.to_owned()))?;
            if reached(&status, target) {
                return Ok(status);
            }
            if let SubscriberState::Stopped(error) = status.state {
                return Err(SettleError::Stopped {
                    name: name.to_owned(),
                    target,
                    error,
                });
            }
            if started.elapsed() >= timeout {
                return Err(SettleError::Timeout {
                    name: name.to_owned(),
                    target,
                    position: status.lag.position,
                    state: status.state,
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until subscriber `name` has handled the log up to its head as
    /// of this call (see [`RunningWorker::settled`]): "has this projection
    /// caught up?". For the whole store (every subscriber, parked effects
    /// and processes included) see [`crate::admin::settled`].
    pub async fn settled_at_head<S: EventStore + ?Sized>(
        &self,
        name: &str,
        store: &S,
        timeout: Duration,
    ) -> Result<SubscriberStatus, SettleError> {
        let head = store.head().await?;
        self.settled(name, head, timeout).await
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::time::Duration;

    use super::SettleError;
    use crate::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    #[event(prefix = "hit")]
    enum Hit {
        Counted,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    #[event(prefix = "other")]
    enum Other {
        Happened,
    }

    /// Counts `hit` events in a table.
    struct Hits;

    impl Projection for Hits {
        type Event = Hit;
        type Db = SqliteStore;

        fn name(&self) -> &str {
            "hits"
        }

        async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
            tx.execute_batch("CREATE TABLE IF NOT EXISTS hits (n INTEGER NOT NULL)")?;
            Ok(())
        }

        async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
            tx.execute_batch("DROP TABLE IF EXISTS hits")?;
            Ok(())
        }

        async fn apply(&self, tx: &mut SqliteTx, _: &Recorded<Hit>) -> Result<(), HandlerError> {
            tx.execute("INSERT INTO hits (n) VALUES (1)", ())?;
            Ok(())
        }
    }

    async fn hits(store: &SqliteStore) -> i64 {
        store
            .read(|conn| {
                conn.query_row("SELECT count(*) FROM hits", [], |r| r.get(0))
                    .map_err(|e| crate::StoreError::database("counting hits", e))
            })
            .await
            .unwrap()
    }

    async fn append<E: Event>(store: &SqliteStore, stream: &str, event: &E) -> Position {
        let data = crate::EventData::fresh(event).unwrap();
        store
            .append(stream, ExpectedVersion::Any, vec![data])
            .await
            .unwrap()
            .last_position
            .unwrap()
    }

    #[tokio::test]
    async fn settled_waits_for_the_read_model_and_knows_filtered_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("settle.db"))
            .await
            .unwrap();
        let worker = Worker::on(store.clone()).projection(Hits).start().unwrap();

        let mut last = Position::ORIGIN;
        for i in 0..50 {
            last = append(&store, &format!("hit-{}", i % 5), &Hit::Counted).await;
        }
        let status = worker
            .settled("hits", last, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(status.lag.position >= last);
        assert_eq!(
            hits(&store).await,
            50,
            "settled means the rows are committed"
        );

        // Events the projection does not read still count as passed.
        for _ in 0..3 {
            append(&store, "other-1", &Other::Happened).await;
        }
        worker
            .settled_at_head("hits", &store, Duration::from_secs(20))
            .await
            .unwrap();

        let unknown = worker
            .settled("nobody", last, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(unknown, SettleError::Unknown(name) if name == "nobody"));
        let future = Position(store.head().await.unwrap().0 + 100);
        let timeout = worker
            .settled("hits", future, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(timeout, SettleError::Timeout { .. }), "{timeout}");
        worker.shutdown().await;
    }
}
