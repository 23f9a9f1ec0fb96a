//! An in-memory [`EventStore`]: for tests, examples and measuring the
//! framework's own overhead. Everything is lost when the last handle drops.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use chrono::Utc;
use uuid::Uuid;

use super::{
    AppendResult, Direction, EventStore, ExpectedVersion, Snapshot, StoreError, check_batch_ids,
    validate_stream,
};
use crate::event::{EventData, Position, StoredEvent};
use crate::upcast::Upcasters;

#[derive(Default)]
struct Inner {
    /// `$all`: index `i` holds position `i + 1`.
    log: Vec<StoredEvent>,
    /// Stream name -> indices into `log`, in version order.
    streams: HashMap<String, Vec<usize>>,
    /// Event id -> index into `log`.
    ids: HashMap<Uuid, usize>,
    /// Correlation id -> indices into `log`, ascending.
    correlations: HashMap<Uuid, Vec<usize>>,
    snapshots: HashMap<String, Snapshot>,
}

/// An in-memory event store. Clones share the same log.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use aftermath::store::{EventStore, ExpectedVersion, memory::MemoryStore};
/// use aftermath::{EventData, Metadata};
/// use uuid::Uuid;
///
/// let store = MemoryStore::new();
/// let id = Uuid::now_v7();
/// let event = EventData { id, event_type: "Pinged".into(), payload: b"null".to_vec(), metadata: Metadata::caused_by(id) };
/// let done = store.append("ping-1", ExpectedVersion::NoStream, vec![event]).await.unwrap();
/// assert_eq!(done.last_version, 1);
/// # });
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<RwLock<Inner>>,
    head: Arc<tokio::sync::watch::Sender<Position>>,
    upcasters: Arc<Upcasters>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_upcasters(Upcasters::new())
    }

    /// An empty store whose reads apply `upcasters`.
    pub fn with_upcasters(upcasters: Upcasters) -> Self {
        MemoryStore {
            inner: Arc::default(),
            head: Arc::new(tokio::sync::watch::Sender::new(Position::ORIGIN)),
            upcasters: Arc::new(upcasters),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the log half-written:
        // appends validate everything before the first push.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn out(&self, event: &StoredEvent) -> Result<StoredEvent, StoreError> {
        let mut event = event.clone();
        self.upcasters.apply(&mut event)?;
        Ok(event)
    }
}

fn result_of(events: &[&StoredEvent], duplicate: bool, current: u64) -> AppendResult {
    match (events.first(), events.last()) {
        (Some(first), Some(last)) => AppendResult {
            first_version: first.version,
            last_version: last.version,
            first_position: Some(first.position),
            last_position: Some(last.position),
            duplicate,
        },
        _ => AppendResult {
            first_version: current + 1,
            last_version: current,
            first_position: None,
            last_position: None,
            duplicate,
        },
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        validate_stream(stream)?;
        check_batch_ids(stream, &events)?;
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let current = inner.streams.get(stream).map_or(0, |s| s.len() as u64);

        // Idempotent retry: the same ids at the same versions of this stream.
        if let Some(first) = events.first()
            && let Some(&idx) = inner.ids.get(&first.id)
        {
            let existing = &inner.log[idx];
            let same_place = existing.stream == stream
                && match expected {
                    ExpectedVersion::Exact(v) => v.checked_add(1) == Some(existing.version),
                    ExpectedVersion::NoStream => existing.version == 1,
                    ExpectedVersion::Any | ExpectedVersion::StreamExists => true,
                };
            if same_place {
                let indices = &inner.streams[stream];
                let start = existing.version as usize - 1;
                let stored: Vec<&StoredEvent> = indices
                    .iter()
                    .skip(start)
                    .take(events.len())
                    .map(|&i| &inner.log[i])
                    .collect();
                if stored.len() == events.len()
                    && stored.iter().zip(&events).all(|(s, e)| s.id == e.id)
                {
                    return Ok(result_of(&stored, true, current));
                }
            }
        }
        for event in &events {
            if let Some(&idx) = inner.ids.get(&event.id) {
                let existing = &inner.log[idx];
                return Err(StoreError::DuplicateEventId {
                    id: event.id,
                    stream: stream.to_owned(),
                    existing_stream: existing.stream.clone(),
                    existing_version: existing.version,
                });
            }
        }
        if !expected.matches(current) {
            return Err(StoreError::WrongExpectedVersion {
                stream: stream.to_owned(),
                expected,
                actual: current,
            });
        }
        let now = Utc::now();
        let start = inner.log.len();
        for (i, data) in events.into_iter().enumerate() {
            let idx = start + i;
            let correlation_id = data.metadata.correlation_id;
            // What the other stores read back from their stored form.
            let mut metadata = data.metadata;
            metadata.normalize_trace();
            inner.log.push(StoredEvent {
                id: data.id,
                stream: stream.to_owned(),
                version: current + 1 + i as u64,
                position: Position(idx as u64 + 1),
                recorded_at: now,
                event_type: data.event_type,
                payload: data.payload,
                metadata,
            });
            inner.ids.insert(data.id, idx);
            inner
                .correlations
                .entry(correlation_id)
                .or_default()
                .push(idx);
            inner
                .streams
                .entry(stream.to_owned())
                .or_default()
                .push(idx);
        }
        let appended: Vec<&StoredEvent> = inner.log[start..].iter().collect();
        let result = result_of(&appended, false, current);
        let head = Position(inner.log.len() as u64);
        drop(inner);
        if result.last_position.is_some() {
            self.head.send_replace(head);
        }
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let inner = self.read();
        let Some(indices) = inner.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let len = indices.len() as u64;
        let picked: Vec<usize> = match direction {
            Direction::Forward => {
                let start = from.max(1) - 1;
                indices
                    .iter()
                    .skip(start as usize)
                    .take(limit)
                    .copied()
                    .collect()
            }
            Direction::Backward => {
                if from == 0 {
                    return Ok(Vec::new());
                }
                let end = from.min(len) as usize;
                indices[..end].iter().rev().take(limit).copied().collect()
            }
        };
        picked
            .into_iter()
            .map(|i| self.out(&inner.log[i]))
            .collect()
    }

    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let stored_types = types.map(|t| self.upcasters.stored_types(t));
        let inner = self.read();
        let start = (after.0 as usize).min(inner.log.len());
        inner.log[start..]
            .iter()
            .filter(|e| {
                stored_types
                    .as_ref()
                    .is_none_or(|t| t.contains(&e.event_type))
            })
            .take(limit)
            .map(|e| self.out(e))
            .collect()
    }

    /// Reads an index of the log by correlation id.
    async fn read_correlation(
        &self,
        correlation_id: Uuid,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let inner = self.read();
        let Some(indices) = inner.correlations.get(&correlation_id) else {
            return Ok(Vec::new());
        };
        // Index `i` holds position `i + 1`: skip those at or before `after`.
        let start = indices.partition_point(|&i| (i as u64) < after.0);
        indices[start..]
            .iter()
            .take(limit)
            .map(|&i| self.out(&inner.log[i]))
            .collect()
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .streams
            .get(stream)
            .map_or(0, |s| s.len() as u64))
    }

    async fn head(&self) -> Result<Position, StoreError> {
        Ok(Position(self.read().log.len() as u64))
    }

    fn upcast(&self, event: &mut StoredEvent) -> Result<(), crate::event::DecodeError> {
        self.upcasters.apply(event)
    }

    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        let inner = self.read();
        inner
            .ids
            .get(&id)
            .map(|&i| self.out(&inner.log[i]))
            .transpose()
    }

    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        self.head.subscribe()
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let newer = inner
            .snapshots
            .get(&snapshot.stream)
            .is_some_and(|old| old.version > snapshot.version);
        if !newer {
            inner.snapshots.insert(snapshot.stream.clone(), snapshot);
        }
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.read().snapshots.get(stream).cloned())
    }
}
