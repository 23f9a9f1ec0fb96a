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
