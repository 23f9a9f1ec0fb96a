//! Snapshots taken on request rather than when a command crosses the interval.

use chrono::Utc;

use super::{Aggregate, Repository};
use crate::store::{EventStore, Snapshot, StoreError};

impl<A: Aggregate, S: EventStore> Repository<A, S> {
    /// Takes a snapshot of aggregate `id` now, at its current version, and
    /// returns that version (`None` when snapshots are off, see
    /// [`Repository::with_snapshots`], or the stream has no events).
    ///
    /// Snapshots are otherwise written only when a command's append crosses a
    /// multiple of the interval, so a long stream that existed before
    /// snapshots were switched on is folded from its start until then. Call
    /// this once for such streams (e.g. from a maintenance task over the
    /// streams of a category): the next load reads the snapshot and the tail
    /// after it. Taking one on a stream being written is safe: a snapshot is
    /// the state at its version, and a load reads the events after it.
    pub async fn snapshot(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let Some(snapshots) = &self.snapshots else {
            return Ok(None);
        };
        let loaded = self.load(id).await?;
        if loaded.version == 0 {
            return Ok(None);
        }
        let state = (snapshots.encode)(&loaded.state)
            .map_err(|e| StoreError::database("encoding an aggregate snapshot", e))?;
        self.store
            .save_snapshot(Snapshot {
                stream: A::stream_name(id),
                version: loaded.version,
                state,
                taken_at: Utc::now(),
            })
            .await?;
        Ok(Some(loaded.version))
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    #[event(prefix = "tally")]
    enum Tallied {
        Added { n: u64 },
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    #[derive(Debug, Default, Serialize, Deserialize)]
    struct Tally {
        total: u64,
    }

    impl Aggregate for Tally {
        const CATEGORY: &'static str = "tally";
        type Command = u64;
        type Event = Tallied;
        type Error = Never;

        fn decide(&self, n: u64) -> Result<Vec<Tallied>, Never> {
            Ok(vec![Tallied::Added { n }])
        }

        fn apply(&mut self, event: &Tallied) {
            let Tallied::Added { n } = event;
            self.total += n;
        }
    }

    #[tokio::test]
    async fn a_snapshot_on_demand_is_used_by_the_next_load() {
        let store = MemoryStore::new();
        let plain = Repository::<Tally, _>::new(store.clone());
        for n in 1..=30 {
            plain.execute("t", n).await.unwrap();
        }
        assert_eq!(
            plain.snapshot("t").await.unwrap(),
            None,
            "snapshots are off"
        );

        let snapshotting = Repository::<Tally, _>::new(store.clone()).with_snapshots(1_000);
        assert_eq!(snapshotting.snapshot("missing").await.unwrap(), None);
        let before = snapshotting.load("t").await.unwrap();
        assert_eq!((before.snapshot_version, before.events_read), (None, 30));

        assert_eq!(snapshotting.snapshot("t").await.unwrap(), Some(30));
        snapshotting.execute("t", 100).await.unwrap();
        let after = snapshotting.load("t").await.unwrap();
        assert_eq!(after.snapshot_version, Some(30));
        assert_eq!(after.events_read, 1, "only the tail after the snapshot");
        assert_eq!(after.state.total, 465 + 100);
        assert_eq!(after.version, 31);
    }
}
