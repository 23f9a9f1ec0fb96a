//! Where subscribers remember how far they got.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::lease::Lease;
use crate::event::Position;
use crate::store::StoreError;

/// Saved positions of subscribers, by name.
///
/// # Fencing
///
/// A runner's save is a compare-and-set: it names the checkpoint its batch
/// started after (`expected`), and the store writes only if that is still
/// the stored one (no row counts as [`Position::ORIGIN`]), checked in the
/// same transaction (or statement, or lock) as the write. Otherwise it
/// writes nothing and fails with [`StoreError::CheckpointMoved`]: another
/// writer committed in between, so this batch's work is already done (or
/// superseded) and must not be recorded twice. This holds with or without
/// leases: two processes running one subscriber without leases (or a stale
/// process whose commit was still pending when its successor started)
/// cannot both move the checkpoint from the same place.
///
/// A save may also carry the saver's [`Lease`]: the store then refuses it
/// with [`StoreError::LeaseLost`] unless that lease is still the current
/// one, so a stale owner that lost its lease cannot move a checkpoint even
/// where the compare would pass.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The saved position of `subscriber`, if any.
    async fn load_checkpoint(&self, subscriber: &str) -> Result<Option<Position>, StoreError>;

    /// Saves `position` for `subscriber` if the stored checkpoint is still
    /// `expected` (no row counts as the origin), else fails with
    /// [`StoreError::CheckpointMoved`] and writes nothing; fenced by
    /// `lease` when given. `expected: None` writes unconditionally: for
    /// operators and tools that reset a checkpoint on purpose, never for a
    /// runner committing its work.
    async fn save(
        &self,
        subscriber: &str,
        expected: Option<Position>,
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
    async fn load_checkpoint(&self, subscriber: &str) -> Result<Option<Position>, StoreError> {
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
        expected: Option<Position>,
        position: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        if let (Some(lease), Some(leases)) = (lease, &self.leases) {
            leases.check(lease)?;
        }
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        let found = positions.get(subscriber).copied();
        check_expected(subscriber, expected, found)?;
        positions.insert(subscriber.to_owned(), position);
        Ok(())
    }
}

/// The compare of a fenced save: `Ok` when `expected` is `None` (an
/// unconditional write) or equals `found` (no row counts as the origin),
/// else [`StoreError::CheckpointMoved`]. For stores that read the row
/// and write it under one lock or transaction.
pub fn check_expected(
    name: &str,
    expected: Option<Position>,
    found: Option<Position>,
) -> Result<(), StoreError> {
    match expected {
        Some(e) if e != found.unwrap_or(Position::ORIGIN) => Err(StoreError::CheckpointMoved {
            name: name.to_owned(),
            expected: e.to_string(),
            found: found.map(|p| p.to_string()),
        }),
        _ => Ok(()),
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
    if let Some(saved) = checkpoints.load_checkpoint(key).await? {
        return Ok(saved);
    }
    let start = start.resolve(store).await?;
    if start > Position::ORIGIN {
        // Fenced like a batch: if another writer saved a checkpoint since
        // the load, resume from theirs.
        match checkpoints
            .save(key, Some(Position::ORIGIN), start, lease)
            .await
        {
            Ok(()) => {}
            Err(StoreError::CheckpointMoved { .. }) => {
                return Ok(checkpoints.load_checkpoint(key).await?.unwrap_or(start));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(start)
}
