//! Where subscribers remember how far they got.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::lease::Lease;
use crate::event::Position;
use crate::store::StoreError;

/// Saved positions of subscribers, by name.
///
/// A save may carry the saver's [`Lease`]: the store then refuses it with
/// [`StoreError::LeaseLost`] unless that lease is still the current one, so a
/// stale owner that lost its lease cannot move a checkpoint.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The saved position of `subscriber`, if any.
    async fn load(&self, subscriber: &str) -> Result<Option<Position>, StoreError>;

    /// Saves `position` for `subscriber` (fenced by `lease` when given).
    async fn save(
        &self,
        subscriber: &str,
        position: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError>;
}

/// Checkpoints in memory, for tests and in-memory setups. Clones share state.
#[derive(Clone, Default)]
pub struct MemoryCheckpoints {
    positions: Arc<Mutex<HashMap<String, Position>>>,
    leases: Option<super::MemoryLeases>,
}

impl MemoryCheckpoints {
    /// An empty checkpoint store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty checkpoint store that checks fenced saves against `leases`.
    pub fn fenced_by(leases: super::MemoryLeases) -> Self {
        MemoryCheckpoints {
            positions: Arc::default(),
            leases: Some(leases),
        }
    }
}

#[async_trait]
impl CheckpointStore for MemoryCheckpoints {
    async fn load(&self, subscriber: &str) -> Result<Option<Position>, StoreError> {
        Ok(self
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(subscriber)
            .copied())
    }

    async fn save(
        &self,
        subscriber: &str,
        position: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        if let (Some(lease), Some(leases)) = (lease, &self.leases) {
            leases.check(lease)?;
        }
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(subscriber.to_owned(), position);
        Ok(())
    }
}

/// Where subscriber `key` resumes: after its saved checkpoint, or, without
/// one, after `start` resolved against `store`. A start past the origin is
/// saved at once: with [`StartFrom::Now`](super::StartFrom::Now), a restart
/// before the first checkpoint would otherwise resolve a later head and
/// never deliver the events appended in between.
pub async fn resume<S, C>(
    checkpoints: &C,
    key: &str,
    start: super::StartFrom,
    store: &S,
    lease: Option<&Lease>,
) -> Result<Position, StoreError>
where
    S: crate::store::EventStore + ?Sized,
    C: CheckpointStore + ?Sized,
{
    if let Some(saved) = checkpoints.load(key).await? {
        return Ok(saved);
    }
    let start = start.resolve(store).await?;
    if start > Position::ORIGIN {
        checkpoints.save(key, start, lease).await?;
    }
    Ok(start)
}
