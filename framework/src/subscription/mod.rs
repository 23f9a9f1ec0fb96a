//! Checkpointed catch-up subscriptions: the engine every subscriber
//! (projection, process manager, reactor) reads the log through.
//!
//! A [`CatchUp`] reader starts after a saved position, reads `$all` in pages
//! with the subscriber's event types pushed down into the store's query, and
//! when it has caught up waits for the next append: woken at once by appends
//! made through the same store handle ([`EventStore::watch_head`]), and by a
//! low-frequency poll for appends made by another process on the same
//! database.
//!
//! Delivery is at-least-once: after a crash, the events after the last saved
//! checkpoint are delivered again. What makes a redelivery harmless depends on
//! the subscriber kind:
//!
//! | subscriber | redelivery is harmless because |
//! |---|---|
//! | [`Projection`](crate::projection::Projection) | read-model writes and the checkpoint commit in one transaction: after a crash either both happened or neither did, so no event is applied twice or lost |
//! | [`ExternalProjection`](crate::projection::ExternalProjection) | it is not: the checkpoint is stored apart from the target, so events since the last checkpoint are handled again; the handler must be idempotent (e.g. upsert by event id) |

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::event::{Position, StoredEvent};
use crate::store::{EventStore, StoreError};

pub mod checkpoint;
pub(crate) mod engine;
pub mod group;
pub mod lease;
pub mod partition;

pub use checkpoint::{CheckpointStore, MemoryCheckpoints, resume};
pub use group::{assign, group_name};
pub use lease::{Holder, Lease, LeaseStore, Member, MemoryLeases};
pub use partition::{Partition, stream_hash};

/// Where a subscriber without a saved checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the first event of the log.
    #[default]
    Origin,
    /// From the head at first start: only events appended afterwards.
    Now,
    /// After this position.
    After(Position),
}

impl StartFrom {
    /// The position a subscriber without a checkpoint continues after:
    /// the origin, the given position, or `store`'s head now.
    pub async fn resolve<S: EventStore + ?Sized>(self, store: &S) -> Result<Position, StoreError> {
        match self {
            StartFrom::Origin => Ok(Position::ORIGIN),
            StartFrom::After(p) => Ok(p),
            StartFrom::Now => store.head().await,
        }
    }
}

/// Tuning of a catch-up subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionOptions {
    /// Events read per page (and handled per batch).
    pub batch_size: usize,
    /// How often a caught-up reader polls for appends by other processes.
    pub poll_interval: Duration,
    /// Where to start without a saved checkpoint.
    pub start_from: StartFrom,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            batch_size: 500,
            poll_interval: Duration::from_millis(250),
            start_from: StartFrom::Origin,
        }
    }
}

impl SubscriptionOptions {
    /// Sets the page and batch size.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Sets the cross-process poll interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets where a subscriber without a checkpoint starts.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }
}

/// How far a subscriber is behind the head of the log.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Lag {
    /// The subscriber's position (last event handled, or skipped by filter).
    pub position: Position,
    /// The head of the log when last looked at.
    pub head: Position,
    /// Positions between the two: events behind (an upper bound for filtered
    /// subscribers, which skip events of other types).
    pub events: u64,
    /// Age of the oldest event not handled yet, in seconds (0 when caught up).
    pub seconds: f64,
}

/// A stop signal for long-running readers: flips to `true` once.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// Waits until `shutdown` is `true` (or its sender is gone).
pub async fn stopped(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Whether `shutdown` is `true` or its sender is gone: the same condition
/// [`stopped`] waits for, without waiting.
pub fn is_stopped(shutdown: &Shutdown) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// One page of a catch-up read.
#[derive(Debug)]
pub struct Page {
    /// The events, in `$all` order (only the subscribed types).
    pub events: Vec<StoredEvent>,
    /// The position the subscriber may record once it has handled every
    /// event of the page: the last event's position, or further when the
    /// filter skipped events up to the head seen before the read.
    pub through: Position,
    /// True when the page reached the head: the reader is caught up.
    pub caught_up: bool,
}

/// A catch-up reader of `$all` for one subscriber.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use aftermath::subscription::{CatchUp, SubscriptionOptions};
/// use aftermath::{EventData, EventStore, ExpectedVersion, MemoryStore, Metadata, Position};
///
/// let store = MemoryStore::new();
/// let id = uuid::Uuid::now_v7();
/// let pinged = EventData { id, event_type: "Pinged".into(), payload: b"null".to_vec(), metadata: Metadata::caused_by(id) };
/// store.append("ping-1", ExpectedVersion::Any, vec![pinged]).await.unwrap();
///
/// let mut reader = CatchUp::new(store.clone(), Some(vec!["Pinged"]), Position::ORIGIN, SubscriptionOptions::default());
/// let page = reader.next_page().await.unwrap();
/// assert_eq!(page.events.len(), 1);
/// assert!(page.caught_up);
/// reader.advance(page.through);
/// # });
/// ```
pub struct CatchUp<S> {
    store: S,
    types: Option<Vec<&'static str>>,
    partition: Option<Partition>,
    position: Position,
    options: SubscriptionOptions,
    head: tokio::sync::watch::Receiver<Position>,
    last_head: Position,
    oldest_pending: Option<DateTime<Utc>>,
    /// The last page was full: the next one most likely is too.
    behind: bool,
    /// When the head was last read.
    head_read_at: Option<std::time::Instant>,
    /// A page read ahead (see [`CatchUp::read_after`]): the position it was
    /// read after, and its events.
    ahead: Option<(Position, Vec<StoredEvent>)>,
}

/// While catching up (full pages), the head is read again at most this
/// often, for the lag.
const HEAD_REFRESH: Duration = Duration::from_secs(1);

impl<S: EventStore> CatchUp<S> {
    /// A reader of the given event types (all types with `None`) after
    /// `position`.
    pub fn new(
        store: S,
        types: Option<Vec<&'static str>>,
        position: Position,
        options: SubscriptionOptions,
    ) -> Self {
        let head = store.watch_head();
        CatchUp {
            store,
            types,
            partition: None,
            position,
            options,
            head,
            last_head: position,
            oldest_pending: None,
            behind: false,
            head_read_at: None,
            ahead: None,
        }
    }

    /// Reads only partition `index` of `count` (the streams
    /// [`Partition::of`] puts there), through
    /// [`EventStore::read_all_partition`]. A short page then means that
    /// nothing of this partition (and these types) exists up to the head
    /// read before the page, so `through` may pass other partitions' events
    /// up to that head, as it passes other types' events.
    ///
    /// # Panics
    ///
    /// When `count` is 0 or `index >= count`.
    pub fn partition(mut self, index: u32, count: u32) -> Self {
        self.partition = Some(Partition::new(index, count));
        self
    }

    /// The partition this reader reads, if any.
    pub fn get_partition(&self) -> Option<Partition> {
        self.partition
    }

    /// The position after which the next page is read.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Records that everything through `position` is handled.
    pub fn advance(&mut self, position: Position) {
        if position > self.position {
            self.position = position;
        }
        self.oldest_pending = None;
    }

    /// Reads the next page after the current position, without waiting.
    ///
    /// The head is read before the page: if the page comes back short,
    /// nothing of our types (and partition) exists up to that head, so the
    /// subscriber may record it and not scan those events again after a
    /// restart. While catching up (the last page was full) that read is
    /// skipped (one round trip less per page; refreshed every second for
    /// the lag): a page then proves nothing past its last event, so one that
    /// comes back short is not `caught_up` and passes nothing beyond its
    /// last event; the next page reads the head first.
    pub async fn next_page(&mut self) -> Result<Page, StoreError> {
        if let Some((after, events)) = self.ahead.take()
            && after == self.position
            && self.behind
        {
            // Read ahead while the last page was handled: a page read
            // without the head. The head is still refreshed for the lag.
            if self.head_due() {
                let head = self.store.head().await?;
                self.head_read_at = Some(std::time::Instant::now());
                self.last_head = self.last_head.max(head);
            }
            return Ok(self.page_behind(events));
        }
        let head_due = self.head_due();
        if self.behind && !head_due {
            return self.next_page_behind().await;
        }
        let head = self.store.head().await?;
        self.head_read_at = Some(std::time::Instant::now());
        // A page of 0 would read nothing and look caught up: never skip.
        let limit = self.options.batch_size.max(1);
        let events = self.read(limit).await?;
        self.last_head = head.max(events.last().map_or(head, |e| e.position));
        let caught_up = events.len() < limit;
        self.behind = !caught_up;
        let through = match events.last() {
            Some(last) if !caught_up => last.position,
            Some(last) => last.position.max(head),
            None => head.max(self.position),
        };
        self.oldest_pending = events.first().map(|e| e.recorded_at);
        Ok(Page {
            events,
            through,
            caught_up,
        })
    }

    /// Whether the head is to be read again for the lag.
    fn head_due(&self) -> bool {
        self.head_read_at
            .is_none_or(|at| at.elapsed() >= HEAD_REFRESH)
    }

    /// A page read without reading the head first (see [`Self::next_page`]).
    async fn next_page_behind(&mut self) -> Result<Page, StoreError> {
        let limit = self.options.batch_size.max(1);
        let events = self.read(limit).await?;
        Ok(self.page_behind(events))
    }

    /// The page of `events`, read after the position without reading the
    /// head first.
    fn page_behind(&mut self, events: Vec<StoredEvent>) -> Page {
        let limit = self.options.batch_size.max(1);
        self.behind = events.len() >= limit;
        let through = events.last().map_or(self.position, |e| e.position);
        self.last_head = self.last_head.max(through);
        self.oldest_pending = events.first().map(|e| e.recorded_at);
        Page {
            events,
            through,
            caught_up: false,
        }
    }

    /// Reads up to `limit` events after the position (of the types and
    /// partition).
    async fn read(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.read_from(self.position, limit).await
    }

    /// Reads up to `limit` events after `after` (of the types and partition).
    async fn read_from(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let types: Option<Vec<&str>> = self.types.clone();
        match self.partition {
            None => self.store.read_all(after, types.as_deref(), limit).await,
            Some(partition) => {
                self.store
                    .read_all_partition(after, types.as_deref(), partition, limit)
                    .await
            }
        }
    }

    /// Whether the last page was full, so the next one most likely is too:
    /// then it is worth reading it ahead ([`CatchUp::read_after`]) while the
    /// subscriber handles this one.
    pub(crate) fn is_behind(&self) -> bool {
        self.behind
    }

    /// Reads the page after `after` (the end of the page being handled)
    /// without moving the reader, and keeps it for the next
    /// [`CatchUp::next_page`] once [`CatchUp::advance`] has moved the
    /// position to `after`; otherwise (the handler stopped early, a run
    /// starting over) it is dropped.
    ///
    /// Reading ahead is safe because the log below the horizon never
    /// changes: the events read now are the first of those a later read
    /// returns, and the page is used as a page read without the head (it
    /// proves nothing past its last event), as while catching up. A failed
    /// or empty read is not kept: the next page is read again (see
    /// [`CatchUp::keep_ahead`]).
    pub(crate) async fn read_after(&self, after: Position) -> Option<Vec<StoredEvent>> {
        let limit = self.options.batch_size.max(1);
        self.read_from(after, limit).await.ok()
    }

    /// Keeps a page read by [`CatchUp::read_after`] after `after`, unless it
    /// is empty. It is used as a page read without the head: never
    /// `caught_up`, passing nothing beyond its last event, so whoever relies
    /// on when a page was read relies on that event's time, not on the
    /// clock (a process manager fires deadlines due by the clock taken
    /// before the page was read, but after a page that is not caught up only
    /// those due by its last event). An empty one would carry no such time:
    /// it is dropped, and the next page is read with the head.
    pub(crate) fn keep_ahead(&mut self, after: Position, events: Option<Vec<StoredEvent>>) {
        self.ahead = events
            .filter(|events| !events.is_empty())
            .map(|events| (after, events));
    }

    /// Waits until the head may have moved past the current position: an
    /// append through this store handle, the poll interval elapsing (for
    /// other processes), or shutdown. Returns `false` on shutdown.
    pub async fn wait_for_more(&mut self, shutdown: &mut Shutdown) -> bool {
        if *shutdown.borrow() {
            return false;
        }
        let position = self.position;
        tokio::select! {
            _ = stopped(shutdown) => false,
            _ = self.head.wait_for(|head| *head > position) => true,
            _ = tokio::time::sleep(self.options.poll_interval) => true,
        }
    }

    /// How far behind the head this reader is, as of the last page.
    pub fn lag(&self) -> Lag {
        let head = self.last_head.max(*self.head.borrow());
        Lag {
            position: self.position,
            head,
            events: head.0.saturating_sub(self.position.0),
            seconds: self.oldest_pending.map_or(0.0, |t| {
                (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
            }),
        }
    }
}
