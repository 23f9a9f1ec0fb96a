//! The effect journal: per (reactor, event id), what happened to the effect.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::Position;
use crate::store::StoreError;
use crate::subscription::{Lease, MemoryLeases};

/// Where an effect stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EffectState {
    /// The call is (or was, before a crash) under way: run it again with the
    /// same idempotency key.
    Started,
    /// The effect happened; it never runs again.
    Done,
    /// The last attempt failed transiently; it is being retried.
    Failed,
    /// Dead letter: failed fatally or ran out of attempts. Waits for an operator.
    Parked,
    /// An operator asked for a parked effect to be retried.
    RetryRequested,
    /// Held back behind a parked event of the same stream.
    Blocked,
    /// An operator chose not to run it.
    Skipped,
}

impl EffectState {
    /// The name stored in databases.
    pub fn as_str(self) -> &'static str {
        match self {
            EffectState::Started => "started",
            EffectState::Done => "done",
            EffectState::Failed => "failed",
            EffectState::Parked => "parked",
            EffectState::RetryRequested => "retry_requested",
            EffectState::Blocked => "blocked",
            EffectState::Skipped => "skipped",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "started" => EffectState::Started,
            "done" => EffectState::Done,
            "failed" => EffectState::Failed,
            "parked" => EffectState::Parked,
            "retry_requested" => EffectState::RetryRequested,
            "blocked" => EffectState::Blocked,
            "skipped" => EffectState::Skipped,
            _ => return None,
        })
    }

    /// Whether it does not hold the checkpoint back: done, skipped, handed
    /// to an operator, or failed and waiting out its backoff (the runner
    /// runs it again from the journal, so the page need not wait for it).
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            EffectState::Done
                | EffectState::Skipped
                | EffectState::Parked
                | EffectState::RetryRequested
                | EffectState::Blocked
                | EffectState::Failed
        )
    }
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// The reactor.
    pub reactor: String,
    /// The event.
    pub event_id: Uuid,
    /// Its position in `$all`.
    pub position: Position,
    /// Its stream (for per-stream order while parked).
    pub stream: String,
    /// Its type.
    pub event_type: String,
    /// Where the effect stands.
    pub state: EffectState,
    /// Attempts started so far.
    pub attempts: u32,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// First seen.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// Storage of effect journal entries, and the operators' dead-letter API.
#[async_trait]
pub trait EffectJournal: Send + Sync + 'static {
    /// The entries of `reactor` for these events (missing = never seen).
    async fn load(
        &self,
        reactor: &str,
        events: &[Uuid],
    ) -> Result<HashMap<Uuid, Effect>, StoreError>;

    /// The entries of every reactor for these events, ordered by position,
    /// then reactor name (byte order): what happened to each event's
    /// effects, e.g. beside the events of a correlation id's timeline.
    /// Events no reactor has seen have no entry; duplicate ids count once.
    async fn effects_for(&self, event_ids: &[Uuid]) -> Result<Vec<Effect>, StoreError>;

    /// Inserts or replaces an entry, fenced by `lease` when given.
    ///
    /// Transitions never go backwards: `done` and `skipped` are final. A
    /// write to an entry in either state (a late `started` or `failed` of
    /// a stale runner, a retry racing a skip) leaves it as it is and
    /// returns `Ok` (there is nothing to fail: the effect is settled),
    /// checked atomically with the write on every backend.
    async fn record(&self, effect: &Effect, lease: Option<&Lease>) -> Result<(), StoreError>;

    /// Entries that are not finished: parked, retry-requested and blocked
    /// (they hold their stream), and started or failed (an effect that was
    /// under way when its run stopped; the runner runs it again, even when
    /// the checkpoint is already past it), by stream then position.
    async fn held(&self, reactor: &str) -> Result<Vec<Effect>, StoreError>;

    /// Dead letters (parked and retry-requested) of one reactor or all, oldest first.
    async fn parked(&self, reactor: Option<&str>) -> Result<Vec<Effect>, StoreError>;

    /// Asks for a parked effect to be retried; false if it is not parked.
    async fn retry(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError>;

    /// Asks for every parked effect of `reactor` to be retried; returns how many.
    async fn retry_all(&self, reactor: &str) -> Result<u64, StoreError>;

    /// Skips a parked effect (it will never run); false if it is not parked.
    async fn skip(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError>;

    /// Deletes `reactor`'s done and skipped entries last changed before
    /// `before` whose events are at or before `through`; returns how many.
    ///
    /// Call [`ReactorRunner::cleanup`](super::ReactorRunner::cleanup)
    /// rather than this: it bounds `through` by every partition's checkpoint
    /// and records it, so that no runner (of this partition layout or
    /// another) reads those events again and runs their effects twice. An
    /// effect whose entry is gone runs again if its event is delivered
    /// again (an operator's reset of the checkpoint), so keep the window
    /// longer than any replay you may do.
    async fn cleanup(
        &self,
        reactor: &str,
        before: DateTime<Utc>,
        through: Position,
    ) -> Result<u64, StoreError>;
}

/// An effect journal in memory. Clones share entries.
#[derive(Clone, Default)]
pub struct MemoryJournal {
    entries: Arc<Mutex<BTreeMap<(String, Uuid), Effect>>>,
    leases: Option<MemoryLeases>,
}

impl MemoryJournal {
    /// An empty journal.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty journal whose fenced writes check `leases`.
    pub fn fenced_by(leases: MemoryLeases) -> Self {
        MemoryJournal {
            entries: Arc::default(),
            leases: Some(leases),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, Uuid), Effect>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn transition(&self, reactor: &str, event_id: Uuid, to: EffectState) -> bool {
        let mut entries = self.lock();
        match entries.get_mut(&(reactor.to_owned(), event_id)) {
            Some(e) if e.state == EffectState::Parked => {
                e.state = to;
                e.updated_at = Utc::now();
                true
            }
            _ => false,
        }
    }
}

fn is_held(state: EffectState) -> bool {
    !matches!(state, EffectState::Done | EffectState::Skipped)
}

#[async_trait]
impl EffectJournal for MemoryJournal {
    async fn load(
        &self,
        reactor: &str,
        events: &[Uuid],
    ) -> Result<HashMap<Uuid, Effect>, StoreError> {
        let entries = self.lock();
        Ok(events
            .iter()
            .filter_map(|id| {
                entries
                    .get(&(reactor.to_owned(), *id))
                    .map(|e| (*id, e.clone()))
            })
            .collect())
    }

    async fn effects_for(&self, event_ids: &[Uuid]) -> Result<Vec<Effect>, StoreError> {
        let wanted: HashSet<Uuid> = event_ids.iter().copied().collect();
        let mut found: Vec<Effect> = self
            .lock()
            .values()
            .filter(|e| wanted.contains(&e.event_id))
            .cloned()
            .collect();
        found.sort_by(|a, b| (a.position, &a.reactor).cmp(&(b.position, &b.reactor)));
        Ok(found)
    }

    async fn record(&self, effect: &Effect, lease: Option<&Lease>) -> Result<(), StoreError> {
        if let (Some(lease), Some(leases)) = (lease, &self.leases) {
            leases.check(lease)?;
        }
        let mut entries = self.lock();
        let key = (effect.reactor.clone(), effect.event_id);
        // Final entries stay as they are.
        if entries
            .get(&key)
            .is_some_and(|e| matches!(e.state, EffectState::Done | EffectState::Skipped))
        {
            return Ok(());
        }
        // Like the SQL journals: an update keeps the entry's creation time.
        let created_at = entries
            .get(&key)
            .map_or(effect.created_at, |e| e.created_at);
        entries.insert(
            key,
            Effect {
                created_at,
                ..effect.clone()
            },
        );
        Ok(())
    }

    async fn held(&self, reactor: &str) -> Result<Vec<Effect>, StoreError> {
        let mut held: Vec<Effect> = self
            .lock()
            .values()
            .filter(|e| e.reactor == reactor && is_held(e.state))
            .cloned()
            .collect();
        held.sort_by(|a, b| (&a.stream, a.position).cmp(&(&b.stream, b.position)));
        Ok(held)
    }

    async fn parked(&self, reactor: Option<&str>) -> Result<Vec<Effect>, StoreError> {
        let mut parked: Vec<Effect> = self
            .lock()
            .values()
            .filter(|e| reactor.is_none_or(|r| e.reactor == r))
            .filter(|e| matches!(e.state, EffectState::Parked | EffectState::RetryRequested))
            .cloned()
            .collect();
        parked.sort_by_key(|e| (e.updated_at, e.position));
        Ok(parked)
    }

    async fn retry(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError> {
        Ok(self.transition(reactor, event_id, EffectState::RetryRequested))
    }

    async fn retry_all(&self, reactor: &str) -> Result<u64, StoreError> {
        let mut entries = self.lock();
        let mut n = 0;
        for e in entries.values_mut() {
            if e.reactor == reactor && e.state == EffectState::Parked {
                e.state = EffectState::RetryRequested;
                e.updated_at = Utc::now();
                n += 1;
            }
        }
        Ok(n)
    }

    async fn skip(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError> {
        Ok(self.transition(reactor, event_id, EffectState::Skipped))
    }

    async fn cleanup(
        &self,
        reactor: &str,
        before: DateTime<Utc>,
        through: Position,
    ) -> Result<u64, StoreError> {
        let mut entries = self.lock();
        let n = entries.len();
        entries.retain(|_, e| {
            !(e.reactor == reactor
                && matches!(e.state, EffectState::Done | EffectState::Skipped)
                && e.updated_at < before
                && e.position <= through)
        });
        Ok((n - entries.len()) as u64)
    }
}
