//! The KurrentDB / EventStoreDB backend (feature `kurrentdb`), on the
//! `kurrentdb` gRPC client: EventStoreDB 20.6+ and KurrentDB servers.
//!
//! [`KurrentStore`] maps the store onto the server's own streams and `$all`:
//!
//! - **Streams** are the server's streams, named as they are (`<category>-<id>`),
//!   so the server's `$by_category` and `$ce-` projections work. Versions are
//!   revisions + 1 (ours start at 1, the server's at 0).
//! - **Event ids** are the server's event ids; **metadata** is the event's
//!   metadata JSON, a flat object of strings with the conventional
//!   `$correlationId` and `$causationId` keys (read by the server's
//!   `$by_correlation_id` projection) and the application's extra keys beside
//!   them (an extra key starting with `$` is stored with one more `$`).
//!   Payloads that are JSON are stored with the JSON content type, byte for
//!   byte; anything else as binary.
//! - **`$all` positions** are the server's commit positions, unchanged.
//!   Every event written through the gRPC API has its own log position as
//!   both commit and prepare position, so the commit position is unique and
//!   orders exactly like `$all`; an event of a legacy TCP explicit
//!   transaction (commit differing from prepare) is reported as
//!   [`StoreError::Corrupt`]. Positions are byte offsets: sparse, so
//!   `Lag.events` of a subscriber is a distance in bytes, not a count. The
//!   server serves `$all` in log order up to what is committed, so a reader
//!   never sees an event appear behind one it has read.
//! - **Type-filtered `$all` reads** use the server's event-type filter (a
//!   regex of the exact names, upcasters' old names included); unfiltered
//!   reads use "no `$` type", which leaves out system events and this
//!   backend's own records.
//!
//! # Event ids: duplicates and idempotent retries
//!
//! The server's own event-id deduplication only remembers recent writes,
//! and knows nothing of other streams, so the store keeps its own index: each
//! event id has a lookup stream `aftermath-id-<uuid>` whose last event says
//! where the id is, or is about to be: a *reservation* `(stream, version of
//! the batch's first event, index in the batch)`. An append
//!
//! 1. reads the stream's version and checks the expected version (a
//!    mismatch is first checked for an idempotent retry of this very batch);
//! 2. reserves every id of the batch at the place the batch will take:
//!    a fresh id with `NoStream` on its lookup stream (exactly one writer
//!    wins), an id whose record is stale by appending over it at its
//!    revision (optimistic);
//! 3. appends the batch with the exact expected revision it checked
//!    (`Any` and `StreamExists` are retried with the new version when a
//!    concurrent writer got there first).
//!
//! A reservation is never trusted on its own: it is checked against the
//! stream it names. The id is *stored* when that stream holds it at the
//! reserved version; the reservation is *stale* once the stream's version
//! reached the batch's first version without the id at its place (a
//! stream's versions only grow and a batch lands whole at one place, so it
//! can no longer land there); otherwise the reservation is *pending*: its
//! append may still happen, and only the same place may reuse it. So the
//! same ids appended again at the same place return the first result
//! (`duplicate: true`), and any other use of an id, anywhere, is
//! [`StoreError::DuplicateEventId`], whatever the age of the first use.
//! A pending reservation (an append whose outcome was lost with its
//! connection, and whose stream has not moved since) also counts as a use,
//! at the version it reserved. An append refused before it was sent
//! releases the reservations it made.
//!
//! Cost: one more append per event (its lookup stream: twice the write
//! requests and one more stream per event on the server, plus a `$by_category`
//! entry under category `aftermath` when that projection runs), a version
//! read per append and a read-back of the first and last event appended for
//! their positions. `find_event` is two reads (the lookup stream's last
//! event, then the event at the place it names). Deleting, truncating
//! (`$maxCount`, `$maxAge`, `$tb`) or scavenging user streams makes the store
//! forget the ids of the removed events; deleting a stream is not
//! supported.
//!
//! # Snapshots
//!
//! The snapshot of stream `s` is the last event of stream
//! `aftermath-snapshot-s` (metadata `$maxCount: 1`, so the server keeps only
//! it), written at the revision just read, after checking that it is not
//! older than the stored one.
//!
//! # `watch_head`
//!
//! Moves on this handle's appends, and on a subscription to `$all` (with the
//! same filter as reads) that starts at the head read when the store opened
//! and, when it drops, resubscribes from the last head this store knows
//! (backing off up to 5 s). It never relies on the client's own
//! resubscription, which restarts from the last event it delivered.
//!
//! # Namespaces
//!
//! [`KurrentOptions::namespace`] puts every stream and event type of the
//! store under `<namespace>.`, so several stores (or test runs) share one
//! server without seeing each other's events. Without a namespace, the store
//! reads every non-system event of the server.
//!
//! Stream names starting with `aftermath-id-` or `aftermath-snapshot-`, and
//! event types starting with `$`, are refused.

use std::fmt;
use std::sync::Arc;

use ::kurrentdb::{Client, ClientSettings, StreamPosition};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use super::{
    AppendResult, Direction, EventStore, ExpectedVersion, Snapshot, StoreError, check_batch_ids,
    validate_stream,
};
use crate::event::{EventData, Position, StoredEvent};
use crate::upcast::Upcasters;

mod mapping;
mod server;
mod watch_task;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use mapping::{KurrentError, is_unavailable};

/// The `kurrentdb` client crate this backend uses, for calls of your own
/// (persistent subscriptions, projections, raw reads).
pub use ::kurrentdb as client;

use mapping::{
    AllFilter, Claim, Decision, IdRecord, Names, Observed, RELEASED_TYPE, RESERVED_TYPE,
    Reservation, SNAPSHOT_TYPE, StreamRead,
};
use server::{ClientServer, Proposed, Rec, Server};

/// How many ids of one batch are reserved concurrently.
const CLAIM_CONCURRENCY: usize = 16;
/// How often one id's reservation is retried when its record keeps changing.
const MAX_CLAIM_ATTEMPTS: usize = 32;
/// How often an `Any`/`StreamExists` append is retried at a newer version.
const MAX_APPEND_ATTEMPTS: usize = 1000;
/// Events per page when looking for the head backwards.
const HEAD_PAGE: usize = 64;
/// How often a snapshot save is retried against concurrent saves.
const MAX_SNAPSHOT_ATTEMPTS: usize = 32;

/// Settings of a [`KurrentStore`], builder style.
///
/// ```
/// use aftermath::{KurrentOptions, Upcasters};
///
/// let options = KurrentOptions::default()
///     .namespace("shop")
///     .upcasters(Upcasters::new());
/// assert_eq!(options.get_namespace(), Some("shop"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct KurrentOptions {
    namespace: Option<String>,
    upcasters: Arc<Upcasters>,
}

impl KurrentOptions {
    /// Puts every stream and event type of the store under `<namespace>.`
    /// (1 to 64 ASCII letters, digits, `_` and `-`): stores with different
    /// namespaces share a server without seeing each other. The server's
    /// projections then see the prefixed names.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Upcasters applied on every read.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }

    /// The namespace, if any.
    pub fn get_namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
}

struct Shared {
    server: Arc<dyn Server>,
    names: Names,
    head: Arc<watch::Sender<Position>>,
    upcasters: Arc<Upcasters>,
    location: String,
    /// Dropping it (with the last handle) stops the watch task.
    _background: oneshot::Sender<()>,
}

/// An [`EventStore`] on a KurrentDB (or EventStoreDB 20.6+) server. Clones
/// share the client and the watch task, which stops when the last clone
/// drops. See the [module docs](self) for how ids, positions, snapshots and
/// the head watch map onto the server, and what they cost.
///
/// ```no_run
/// # async fn example() -> Result<(), aftermath::StoreError> {
/// use aftermath::store::{EventStore, ExpectedVersion};
/// use aftermath::{EventData, KurrentOptions, KurrentStore, Metadata, Position};
/// use uuid::Uuid;
///
/// let store = KurrentStore::connect_with(
///     "esdb://127.0.0.1:2113?tls=false",
///     KurrentOptions::default().namespace("shop"),
/// )
/// .await?;
/// let id = Uuid::now_v7();
/// let event = EventData {
///     id,
///     event_type: "Pinged".into(),
///     payload: br#"{"n":1}"#.to_vec(),
///     metadata: Metadata::caused_by(id),
/// };
/// let done = store.append("ping-1", ExpectedVersion::NoStream, vec![event]).await?;
/// assert_eq!(done.last_version, 1);
/// let all = store.read_all(Position::ORIGIN, Some(&["Pinged"]), 100).await?;
/// assert!(all.iter().any(|e| e.id == id));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KurrentStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for KurrentStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KurrentStore")
            .field("location", &self.shared.location)
            .field("namespace", &self.namespace())
            .finish_non_exhaustive()
    }
}

/// Where the client connects, without credentials.
fn location_of(settings: &ClientSettings) -> String {
    let hosts: Vec<String> = settings
        .hosts()
        .iter()
        .map(|h| format!("{}:{}", h.host, h.port))
        .collect();
    let scheme = if settings.is_dns_discovery_enabled() {
        "esdb+discover"
    } else {
        "esdb"
    };
    format!(
        "{scheme}://{}?tls={}",
        hosts.join(","),
        settings.is_secure_mode_enabled()
    )
}

/// [`check_batch_ids`] without its quadratic cost for large batches.
fn check_ids(stream: &str, events: &[EventData]) -> Result<(), StoreError> {
    if events.len() <= 16 {
        return check_batch_ids(stream, events);
    }
    let mut ids: Vec<u128> = events.iter().map(|e| e.id.as_u128()).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|pair| pair[0] == pair[1]) {
        return check_batch_ids(stream, events);
    }
    Ok(())
}

/// What reserving one id gave.
enum Claimed {
    /// The id is ours at the wanted place. `rev` is the revision of the
    /// reservation written (`None`: nothing written); `release` says whether
    /// this append may give it back if it does not happen.
    Ours { rev: Option<u64>, release: bool },
    /// The id is stored, or pending, elsewhere.
    Conflict { stream: String, version: u64 },
}

impl KurrentStore {
    /// Connects to the server at `url` (`esdb://host:2113?tls=false`,
    /// `kurrentdb://user:password@host:2113`, `esdb+discover://...`: the
    /// client's connection strings) with default [`KurrentOptions`].
    ///
    /// Reads the head of `$all` once, so an unreachable server fails here
    /// (after the client's discovery attempts).
    pub async fn connect(url: &str) -> Result<KurrentStore, StoreError> {
        Self::connect_with(url, KurrentOptions::default()).await
    }

    /// Connects to the server at `url` with `options`. See
    /// [`KurrentStore::connect`].
    pub async fn connect_with(
        url: &str,
        options: KurrentOptions,
    ) -> Result<KurrentStore, StoreError> {
        let settings: ClientSettings = url
            .parse()
            .map_err(|e| StoreError::database("parsing the KurrentDB URL", e))?;
        let location = location_of(&settings);
        let client = Client::new(settings).map_err(|e| {
            StoreError::database(
                "creating the KurrentDB client",
                KurrentError::Client(format!("{e:#}")),
            )
        })?;
        Self::open(Arc::new(ClientServer { client }), options, location).await
    }

    async fn open(
        server: Arc<dyn Server>,
        options: KurrentOptions,
        location: String,
    ) -> Result<KurrentStore, StoreError> {
        if let Some(namespace) = &options.namespace {
            mapping::check_namespace(namespace).map_err(|reason| StoreError::Incompatible {
                location: location.clone(),
                reason,
            })?;
        }
        let names = Names::new(options.namespace.as_deref());
        // The head read at open, by a handle without the watch task yet.
        let (stop, _) = oneshot::channel();
        let probe = KurrentStore {
            shared: Arc::new(Shared {
                server,
                names,
                head: Arc::new(watch::Sender::new(Position::ORIGIN)),
                upcasters: options.upcasters,
                location,
                _background: stop,
            }),
        };
        let head = probe.head().await?;
        let mut shared = Arc::into_inner(probe.shared).expect("the only handle");
        shared.head.send_replace(head);
        shared._background = watch_task::spawn(
            shared.server.clone(),
            AllFilter::new(&shared.names, None),
            shared.head.clone(),
        );
        Ok(KurrentStore {
            shared: Arc::new(shared),
        })
    }

    /// Where the store connects (without credentials).
    pub fn location(&self) -> &str {
        &self.shared.location
    }

    /// The namespace of the store's streams and types, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.shared.names.prefix().strip_suffix('.')
    }

    fn server(&self) -> &dyn Server {
        &*self.shared.server
    }

    fn names(&self) -> &Names {
        &self.shared.names
    }

    fn error(&self, operation: &'static str, stream: &str, e: ::kurrentdb::Error) -> StoreError {
        mapping::store_error(operation, &self.shared.location, stream, e)
    }

    fn corrupt(rec: &Rec, message: String) -> StoreError {
        StoreError::Corrupt {
            position: Position(rec.commit),
            stream: rec.stream.clone(),
            message,
        }
    }

    /// Reads events of a server stream (our name `stream` for errors); a
    /// missing stream reads as empty.
    async fn read_recs(
        &self,
        operation: &'static str,
        server_stream: &str,
        stream: &str,
        start: StreamPosition<u64>,
        backwards: bool,
        count: usize,
    ) -> Result<Vec<Rec>, StoreError> {
        match self
            .server()
            .read_stream(server_stream, start, backwards, count)
            .await
        {
            Ok(recs) => Ok(recs),
            Err(::kurrentdb::Error::ResourceNotFound) => Ok(Vec::new()),
            Err(e) => Err(self.error(operation, stream, e)),
        }
    }

    /// The last event of a server stream.
    async fn last_rec(
        &self,
        operation: &'static str,
        server_stream: &str,
        stream: &str,
    ) -> Result<Option<Rec>, StoreError> {
        let mut recs = self
            .read_recs(
                operation,
                server_stream,
                stream,
                StreamPosition::End,
                true,
                1,
            )
            .await?;
        Ok(recs.pop())
    }

    /// The version of our `stream` (0 when it has no events).
    async fn version(&self, stream: &str) -> Result<u64, StoreError> {
        let server_stream = self.names().stream(stream);
        match self
            .last_rec("reading a stream's version", &server_stream, stream)
            .await?
        {
            None => Ok(0),
            Some(rec) => mapping::version_of(rec.revision).map_err(|m| Self::corrupt(&rec, m)),
        }
    }

    /// The event of our `stream` at `version`, if there is one.
    async fn rec_at(&self, stream: &str, version: u64) -> Result<Option<Rec>, StoreError> {
        let Some(revision) = mapping::revision_of(version) else {
            return Ok(None);
        };
        if revision > mapping::MAX_SERVER_NUMBER {
            return Ok(None);
        }
        let server_stream = self.names().stream(stream);
        let recs = self
            .read_recs(
                "reading an event",
                &server_stream,
                stream,
                StreamPosition::Position(revision),
                false,
                1,
            )
            .await?;
        Ok(recs.into_iter().find(|r| r.revision == revision))
    }

    /// A server event as ours, upcast.
    fn stored(&self, rec: Rec) -> Result<StoredEvent, StoreError> {
        let names = self.names();
        let stream = names
            .user_stream(&rec.stream)
            .ok_or_else(|| Self::corrupt(&rec, "stream outside the namespace".to_owned()))?;
        let event_type = names.user_type(&rec.event_type).ok_or_else(|| {
            Self::corrupt(
                &rec,
                format!("event type `{}` outside the namespace", rec.event_type),
            )
        })?;
        let position =
            mapping::position_of(rec.commit, rec.prepare).map_err(|m| Self::corrupt(&rec, m))?;
        let version = mapping::version_of(rec.revision).map_err(|m| Self::corrupt(&rec, m))?;
        let metadata =
            mapping::decode_metadata(&rec.metadata, rec.id).map_err(|m| Self::corrupt(&rec, m))?;
        let mut event = StoredEvent {
            id: rec.id,
            stream: stream.to_owned(),
            version,
            position,
            recorded_at: rec.created,
            event_type: event_type.to_owned(),
            payload: rec.data,
            metadata,
        };
        self.shared.upcasters.apply(&mut event)?;
        Ok(event)
    }

    // ------------------------------------------------------------ event ids

    /// The last record of `id`'s lookup stream and its revision.
    async fn id_record(&self, id: Uuid) -> Result<Option<(u64, IdRecord)>, StoreError> {
        let stream = self.names().id_stream(id);
        let Some(rec) = self
            .last_rec("reading an event id's record", &stream, &stream)
            .await?
        else {
            return Ok(None);
        };
        let record = mapping::decode_id_record(&rec.event_type, &rec.data)
            .map_err(|m| Self::corrupt(&rec, m))?;
        Ok(Some((rec.revision, record)))
    }

    /// What the stream a reservation names holds at its place (and the event
    /// there, if it is the reserved id).
    async fn observe(
        &self,
        reservation: &Reservation,
        id: Uuid,
    ) -> Result<(Claim, Option<Rec>), StoreError> {
        let observed = match self
            .rec_at(&reservation.stream, reservation.version())
            .await?
        {
            Some(rec) => {
                let found = rec.id;
                let claim = mapping::classify(reservation, id, Observed::Event(found));
                return Ok((claim, (found == id).then_some(rec)));
            }
            None => Observed::Missing {
                stream_version: self.version(&reservation.stream).await?,
            },
        };
        Ok((mapping::classify(reservation, id, observed), None))
    }

    /// The stored event with this id, found through its lookup stream.
    async fn locate(&self, id: Uuid) -> Result<Option<Rec>, StoreError> {
        match self.id_record(id).await? {
            Some((_, IdRecord::Reserved(reservation))) => {
                Ok(self.observe(&reservation, id).await?.1)
            }
            Some((_, IdRecord::Released)) | None => Ok(None),
        }
    }

    fn id_event(event_type: &str, data: Vec<u8>) -> Vec<Proposed> {
        vec![Proposed {
            id: Uuid::new_v4(),
            event_type: event_type.to_owned(),
            data,
            metadata: Vec::new(),
        }]
    }

    /// Reserves `id` at `wanted` (see the module docs).
    async fn claim(&self, id: Uuid, wanted: &Reservation) -> Result<Claimed, StoreError> {
        use ::kurrentdb::StreamState;
        let stream = self.names().id_stream(id);
        let record = wanted.encode();
        let mut exists = false;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            if !exists {
                match self
                    .server()
                    .append(
                        &stream,
                        StreamState::NoStream,
                        Self::id_event(RESERVED_TYPE, record.clone()),
                    )
                    .await
                {
                    Ok(rev) => {
                        return Ok(Claimed::Ours {
                            rev: Some(rev),
                            release: true,
                        });
                    }
                    Err(::kurrentdb::Error::WrongExpectedVersion { .. }) => exists = true,
                    Err(e) => return Err(self.error("reserving an event id", &stream, e)),
                }
            }
            let Some((rev, existing)) = self.id_record(id).await? else {
                exists = false;
                continue;
            };
            let (decision, pending) = match &existing {
                IdRecord::Released => (mapping::decide(None, wanted), false),
                IdRecord::Reserved(r) => {
                    let (claim, _) = self.observe(r, id).await?;
                    (
                        mapping::decide(Some((r, claim)), wanted),
                        claim == Claim::Pending,
                    )
                }
            };
            match decision {
                Decision::Proceed => {
                    return Ok(Claimed::Ours {
                        rev: None,
                        release: false,
                    });
                }
                Decision::Conflict { stream, version } => {
                    return Ok(Claimed::Conflict { stream, version });
                }
                Decision::Take => {
                    match self
                        .server()
                        .append(
                            &stream,
                            StreamState::StreamRevision(rev),
                            Self::id_event(RESERVED_TYPE, record.clone()),
                        )
                        .await
                    {
                        // Re-asserting another append's pending reservation of
                        // this very place: that append may still land, so
                        // this one must never release it.
                        Ok(rev) => {
                            return Ok(Claimed::Ours {
                                rev: Some(rev),
                                release: !pending,
                            });
                        }
                        Err(::kurrentdb::Error::WrongExpectedVersion { .. }) => continue,
                        Err(e) => return Err(self.error("reserving an event id", &stream, e)),
                    }
                }
            }
        }
        Err(StoreError::database(
            "reserving an event id",
            KurrentError::Contended(id),
        ))
    }

    /// Gives back reservations of an append that was not sent (best effort:
    /// one taken over since is left alone).
    async fn release(&self, claimed: &[(Uuid, u64)]) {
        let releases: Vec<_> = claimed
            .iter()
            .map(|&(id, rev)| async move {
                let stream = self.names().id_stream(id);
                if let Err(e) = self
                    .server()
                    .append(
                        &stream,
                        ::kurrentdb::StreamState::StreamRevision(rev),
                        Self::id_event(RELEASED_TYPE, b"{}".to_vec()),
                    )
                    .await
                {
                    tracing::debug!(%id, error = %e, "could not release an event id reservation");
                }
            })
            .collect();
        futures::stream::iter(releases)
            .buffer_unordered(CLAIM_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }

    /// Reserves every id of the batch at `first..`: `Ok(None)` when all are
    /// ours, `Ok(Some(result))` when the batch turns out to be an idempotent
    /// retry, `DuplicateEventId` when an id is used elsewhere.
    async fn reserve(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        first: u64,
        events: &[EventData],
    ) -> Result<Option<AppendResult>, StoreError> {
        let wanted: Vec<Reservation> = (0..events.len() as u64)
            .map(|index| Reservation {
                stream: stream.to_owned(),
                first,
                index,
            })
            .collect();
        // Futures collected first: a closure inside the stream would not be
        // `Send` for every lifetime (the trait's futures must be).
        let claims: Vec<_> = events
            .iter()
            .zip(&wanted)
            .map(|(event, wanted)| self.claim(event.id, wanted))
            .collect();
        let outcomes: Vec<Result<Claimed, StoreError>> = futures::stream::iter(claims)
            .buffered(CLAIM_CONCURRENCY)
            .collect()
            .await;
        let mut releasable = Vec::new();
        let mut conflict = None;
        let mut failure = None;
        for (event, outcome) in events.iter().zip(outcomes) {
            match outcome {
                Ok(Claimed::Ours {
                    rev: Some(rev),
                    release: true,
                }) => releasable.push((event.id, rev)),
                Ok(Claimed::Ours { .. }) => {}
                Ok(Claimed::Conflict { stream, version }) => {
                    conflict.get_or_insert((event.id, stream, version));
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if conflict.is_none() && failure.is_none() {
            return Ok(None);
        }
        // This append will not be sent: give back what it reserved.
        self.release(&releasable).await;
        if let Some(e) = failure {
            return Err(e);
        }
        let (id, existing_stream, existing_version) = conflict.expect("a conflict");
        if id == events[0].id
            && let Some(result) = self.duplicate(stream, expected, events).await?
        {
            return Ok(Some(result));
        }
        Err(StoreError::DuplicateEventId {
            id,
            stream: stream.to_owned(),
            existing_stream,
            existing_version,
        })
    }

    /// The result of `events` if they are stored in `stream` from version
    /// `first` on, as a duplicate.
    async fn batch_at(
        &self,
        stream: &str,
        first: u64,
        events: &[EventData],
    ) -> Result<Option<AppendResult>, StoreError> {
        let Some(revision) = mapping::revision_of(first) else {
            return Ok(None);
        };
        let server_stream = self.names().stream(stream);
        let recs = self
            .read_recs(
                "checking for an idempotent retry",
                &server_stream,
                stream,
                StreamPosition::Position(revision),
                false,
                events.len(),
            )
            .await?;
        if recs.len() != events.len()
            || recs.first().is_some_and(|r| r.revision != revision)
            || recs.iter().zip(events).any(|(r, e)| r.id != e.id)
        {
            return Ok(None);
        }
        let (Some(head), Some(tail)) = (recs.first(), recs.last()) else {
            return Ok(None);
        };
        Ok(Some(self.result_of(head, tail, true)?))
    }

    /// The first result, if `events` were already appended to `stream` at a
    /// place that `expected` allows.
    async fn duplicate(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<Option<AppendResult>, StoreError> {
        let Some(first) = events.first() else {
            return Ok(None);
        };
        let Some(found) = self.locate(first.id).await? else {
            return Ok(None);
        };
        if self.names().user_stream(&found.stream) != Some(stream) {
            return Ok(None);
        }
        let version = mapping::version_of(found.revision).map_err(|m| Self::corrupt(&found, m))?;
        let same_place = match expected {
            ExpectedVersion::Exact(v) => v.checked_add(1) == Some(version),
            ExpectedVersion::NoStream => version == 1,
            ExpectedVersion::Any | ExpectedVersion::StreamExists => true,
        };
        if !same_place {
            return Ok(None);
        }
        self.batch_at(stream, version, events).await
    }

    fn result_of(
        &self,
        head: &Rec,
        tail: &Rec,
        duplicate: bool,
    ) -> Result<AppendResult, StoreError> {
        let position = |rec: &Rec| {
            mapping::position_of(rec.commit, rec.prepare).map_err(|m| Self::corrupt(rec, m))
        };
        let version =
            |rec: &Rec| mapping::version_of(rec.revision).map_err(|m| Self::corrupt(rec, m));
        Ok(AppendResult {
            first_version: version(head)?,
            last_version: version(tail)?,
            first_position: Some(position(head)?),
            last_position: Some(position(tail)?),
            duplicate,
        })
    }

    /// Reads back the first and last event of an append for their positions.
    async fn appended(
        &self,
        stream: &str,
        first: u64,
        events: &[EventData],
    ) -> Result<AppendResult, StoreError> {
        let last = first + events.len() as u64 - 1;
        let (head, tail) = if first == last {
            let rec = self.rec_at(stream, first).await?;
            (rec.clone(), rec)
        } else {
            futures::try_join!(self.rec_at(stream, first), self.rec_at(stream, last))?
        };
        match (head, tail) {
            (Some(head), Some(tail))
                if Some(head.id) == events.first().map(|e| e.id)
                    && Some(tail.id) == events.last().map(|e| e.id) =>
            {
                self.result_of(&head, &tail, false)
            }
            _ => Err(StoreError::Corrupt {
                position: Position::ORIGIN,
                stream: stream.to_owned(),
                message: format!(
                    "the events just appended are not at versions {first}..={last} (was the \
                     stream deleted or truncated?)"
                ),
            }),
        }
    }
}

#[async_trait]
impl EventStore for KurrentStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        validate_stream(stream)?;
        mapping::check_user_stream(stream)?;
        check_ids(stream, &events)?;
        for event in &events {
            mapping::check_event_type(&event.event_type)
                .map_err(|m| StoreError::database("append", KurrentError::ReservedEventType(m)))?;
        }
        let names = self.names();
        let server_stream = names.stream(stream);
        let proposed: Vec<Proposed> = events
            .iter()
            .map(|e| Proposed {
                id: e.id,
                event_type: names.event_type(&e.event_type),
                data: e.payload.clone(),
                metadata: mapping::encode_metadata(&e.metadata),
            })
            .collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.version(stream).await?;
            if !expected.matches(current) {
                if let Some(result) = self.duplicate(stream, expected, &events).await? {
                    return Ok(result);
                }
                return Err(StoreError::WrongExpectedVersion {
                    stream: stream.to_owned(),
                    expected,
                    actual: current,
                });
            }
            let first = current + 1;
            if events.is_empty() {
                return Ok(AppendResult {
                    first_version: first,
                    last_version: current,
                    first_position: None,
                    last_position: None,
                    duplicate: false,
                });
            }
            if let Some(result) = self.reserve(stream, expected, first, &events).await? {
                return Ok(result);
            }
            let state = mapping::expected_state(ExpectedVersion::Exact(current));
            match self
                .server()
                .append(&server_stream, state, proposed.clone())
                .await
            {
                Ok(_) => {
                    let result = self.appended(stream, first, &events).await?;
                    if let Some(last) = result.last_position {
                        watch_task::advance(&self.shared.head, last);
                    }
                    return Ok(result);
                }
                Err(::kurrentdb::Error::WrongExpectedVersion { current: now, .. }) => {
                    // A concurrent append of this very batch may have won.
                    if let Some(result) = self.batch_at(stream, first, &events).await? {
                        return Ok(result);
                    }
                    let now_version = mapping::actual_version(now);
                    let retry = match expected {
                        ExpectedVersion::Any => true,
                        ExpectedVersion::StreamExists => now_version > 0,
                        _ => false,
                    };
                    if !retry || attempt >= MAX_APPEND_ATTEMPTS {
                        return Err(mapping::wrong_version(stream, expected, now));
                    }
                }
                Err(e) => return Err(self.error("append", stream, e)),
            }
        }
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let StreamRead::From { start, backwards } = mapping::stream_read(from, direction, limit)
        else {
            return Ok(Vec::new());
        };
        let server_stream = self.names().stream(stream);
        let read = |start| {
            self.read_recs(
                "reading a stream",
                &server_stream,
                stream,
                start,
                backwards,
                limit,
            )
        };
        let mut recs = read(start).await?;
        // A backward read from beyond the end returns only the existing part
        // of the range: read again from the end.
        if let StreamPosition::Position(revision) = start
            && backwards
            && recs.first().is_none_or(|r| r.revision != revision)
        {
            recs = read(StreamPosition::End).await?;
            recs.retain(|r| r.revision <= revision);
        }
        recs.into_iter().map(|rec| self.stored(rec)).collect()
    }

    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stored_types = types.map(|t| self.shared.upcasters.stored_types(t));
        if stored_types.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let Some(mut start) = mapping::all_start(after) else {
            return Ok(Vec::new());
        };
        let filter = AllFilter::new(self.names(), stored_types);
        let server_filter = filter.server();
        let mut out = Vec::new();
        loop {
            // The start event itself comes back (forward reads include it).
            let want = (limit - out.len()).saturating_add(1);
            let recs = self
                .server()
                .read_all(start, false, &server_filter, want)
                .await
                .map_err(|e| self.error("reading $all", "$all", e))?;
            let full = recs.len() == want;
            for rec in recs {
                let raw = rec.position();
                if let StreamPosition::Position(from) = start
                    && raw <= from
                {
                    continue;
                }
                start = StreamPosition::Position(raw);
                if !filter.matches(&rec.stream, &rec.event_type) {
                    continue;
                }
                out.push(self.stored(rec)?);
                if out.len() == limit {
                    return Ok(out);
                }
            }
            if !full {
                return Ok(out);
            }
        }
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.version(stream).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let filter = AllFilter::new(self.names(), None);
        let server_filter = filter.server();
        let mut start = StreamPosition::End;
        loop {
            let recs = self
                .server()
                .read_all(start, true, &server_filter, HEAD_PAGE)
                .await
                .map_err(|e| self.error("reading the head of $all", "$all", e))?;
            let full = recs.len() == HEAD_PAGE;
            for rec in recs {
                if filter.matches(&rec.stream, &rec.event_type) {
                    return mapping::position_of(rec.commit, rec.prepare)
                        .map_err(|m| Self::corrupt(&rec, m));
                }
                start = StreamPosition::Position(rec.position());
            }
            if !full {
                return Ok(Position::ORIGIN);
            }
        }
    }

    fn upcast(&self, event: &mut StoredEvent) -> Result<(), crate::event::DecodeError> {
        self.shared.upcasters.apply(event)
    }

    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        self.locate(id)
            .await?
            .map(|rec| self.stored(rec))
            .transpose()
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.shared.head.subscribe()
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        use ::kurrentdb::StreamState;
        let stream = self.names().snapshot_stream(&snapshot.stream);
        let meta = mapping::encode_snapshot_meta(&snapshot);
        for _ in 0..MAX_SNAPSHOT_ATTEMPTS {
            let last = self
                .last_rec("reading a snapshot", &stream, &snapshot.stream)
                .await?;
            let expected = match &last {
                None => {
                    // Keep only the newest snapshot.
                    self.server()
                        .set_max_count(&stream, 1)
                        .await
                        .map_err(|e| self.error("saving a snapshot", &snapshot.stream, e))?;
                    StreamState::NoStream
                }
                Some(rec) => {
                    let newer =
                        mapping::decode_snapshot(&snapshot.stream, &rec.metadata, &rec.data)
                            .is_ok_and(|stored| stored.version > snapshot.version);
                    if newer {
                        return Ok(());
                    }
                    StreamState::StreamRevision(rec.revision)
                }
            };
            let event = vec![Proposed {
                id: Uuid::new_v4(),
                event_type: SNAPSHOT_TYPE.to_owned(),
                data: snapshot.state.clone(),
                metadata: meta.clone(),
            }];
            match self.server().append(&stream, expected, event).await {
                Ok(_) => return Ok(()),
                Err(::kurrentdb::Error::WrongExpectedVersion { .. }) => continue,
                Err(e) => return Err(self.error("saving a snapshot", &snapshot.stream, e)),
            }
        }
        Err(StoreError::database(
            "saving a snapshot",
            KurrentError::Contended(Uuid::nil()),
        ))
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        let server_stream = self.names().snapshot_stream(stream);
        let Some(rec) = self
            .last_rec("loading a snapshot", &server_stream, stream)
            .await?
        else {
            return Ok(None);
        };
        mapping::decode_snapshot(stream, &rec.metadata, &rec.data)
            .map(Some)
            .map_err(|m| Self::corrupt(&rec, m))
    }
}
