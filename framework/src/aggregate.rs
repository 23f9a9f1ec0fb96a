//! Aggregates decide; the [`Repository`] loads them, asks them, and stores
//! their decision.
//!
//! `execute` loads the stream `<category>-<id>` (newest snapshot + tail),
//! folds [`Aggregate::apply`], calls [`Aggregate::decide`] and appends the
//! events with the version it loaded as the expected version. On a version
//! conflict it reloads and decides again, a bounded number of times.
//!
//! With a [`CommandMeta::command_id`], the event ids are derived from the
//! command id (uuid v5), so sending the same command again returns the first
//! result instead of appending twice: the store refuses the derived ids a
//! second time (or the new decision rejects the command), and the repository
//! then returns the first execution's result. That is the command inbox.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use chrono::Utc;
use futures::TryStreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use uuid::Uuid;

mod on_demand;

use crate::event::{DecodeError, EncodeError, Event, EventData, Metadata, Position};
use crate::store::{
    Direction, EventStore, ExpectedVersion, FoldEvent, Snapshot, StoreError, read_stream_all,
};

// ANCHOR: trait
/// A consistency boundary that decides, purely, what happens.
///
/// `decide` must be pure and synchronous: no I/O, no clock, no randomness.
/// Anything it needs (a timestamp, a price quote) is part of the command.
/// `apply` folds one event into the state and must not fail: an event is a
/// fact that already happened.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// Stream category: the aggregate with id `x` lives in stream
    /// `<CATEGORY>-x`.
    const CATEGORY: &'static str;
    /// What it can be asked to do.
    type Command: Send;
    /// What it records; usually an enum with `#[derive(Event)]`.
    type Event: Event + Clone;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides which events a command produces, or refuses it.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one event into the state.
    fn apply(&mut self, event: &Self::Event);

    /// The stream name of the aggregate with this id.
    fn stream_name(id: &str) -> String {
        format!("{}-{}", Self::CATEGORY, id)
    }
}
// ANCHOR_END: trait

/// Ids and metadata of one command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandMeta {
    /// The command's id. When set, event ids derive from it (uuid v5) and
    /// sending the same command again is a no-op returning the first result.
    /// When unset, a fresh v7 id is used and events get fresh v7 ids.
    pub command_id: Option<Uuid>,
    /// The conversation; defaults to the command id.
    pub correlation_id: Option<Uuid>,
    /// What caused the command; defaults to the command id.
    pub causation_id: Option<Uuid>,
    /// The trace context to store with every event; unset, the current
    /// one (see [`crate::trace`]).
    pub trace: Option<crate::trace::TraceContext>,
    /// Copied into every event's metadata.
    pub extra: BTreeMap<String, String>,
}

impl CommandMeta {
    /// Metadata for a command with this id (idempotent on retry).
    pub fn with_id(command_id: Uuid) -> Self {
        CommandMeta {
            command_id: Some(command_id),
            ..Default::default()
        }
    }

    /// Sets the correlation id.
    pub fn correlation(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    pub fn causation(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Adds a key/value pair to every event's metadata.
    pub fn extra(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// Stores this trace context with every event (instead of the current
    /// span's, see [`crate::trace`]): for a context that arrived without
    /// OpenTelemetry, such as an incoming request's `traceparent` header.
    pub fn trace(mut self, trace: &crate::trace::TraceContext) -> Self {
        self.trace = Some(trace.clone());
        self
    }
}

/// The type name of the marker a command with an id leaves in its
/// aggregate's stream when it is accepted without events (see
/// [`Repository::execute_with`]). Skipped when the aggregate is loaded;
/// subscribers do not receive it (they read their own event types; the
/// `aftermath.` prefix is the framework's, do not name events with it).
pub const COMMAND_ACCEPTED: &str = "aftermath.CommandAccepted";

/// The id of event number `index` decided by command `command_id`.
pub fn derived_event_id(command_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(&command_id, &(index as u64).to_be_bytes())
}

/// What a successful `execute` did.
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    /// The aggregate's state after the command.
    pub state: A,
    /// The events decided (for a duplicate command: the events the first
    /// execution stored).
    pub events: Vec<A::Event>,
    /// The stream version after the command.
    pub version: u64,
    /// `$all` position of the last event appended (`None` if none).
    pub position: Option<Position>,
    /// True when the command id had already been executed: nothing changed.
    pub duplicate: bool,
    /// How many version conflicts were retried.
    pub retries: u32,
}

/// An aggregate's state as loaded from its stream.
#[derive(Debug)]
pub struct Loaded<A> {
    /// The folded state.
    pub state: A,
    /// The stream version it includes (0 = no events).
    pub version: u64,
    /// How many events were read (the tail after the snapshot, if one was used).
    pub events_read: u64,
    /// The snapshot version it started from, if a snapshot was used.
    pub snapshot_version: Option<u64>,
}

/// Why `execute` did not store a decision.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error + 'static> {
    /// The aggregate refused the command (its `decide` returned an error).
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Every attempt lost a version race against a concurrent writer.
    #[error("stream `{stream}` kept changing: gave up after {attempts} attempts")]
    Conflict {
        /// The aggregate's stream.
        stream: String,
        /// Attempts made.
        attempts: u32,
    },
    /// A decided event could not be serialized.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The store failed, or returned an event that does not decode.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<E: std::error::Error + 'static> From<DecodeError> for ExecuteError<E> {
    fn from(e: DecodeError) -> Self {
        ExecuteError::Store(StoreError::Decode(e))
    }
}

type SnapshotEncode<A> = fn(&A) -> Result<Vec<u8>, serde_json::Error>;
type SnapshotDecode<A> = fn(&[u8]) -> Result<A, serde_json::Error>;

struct Snapshots<A> {
    every: u64,
    encode: SnapshotEncode<A>,
    decode: SnapshotDecode<A>,
}

/// Loads aggregates of type `A` from store `S` and executes commands on them.
///
/// Cheap to clone when the store is.
pub struct Repository<A: Aggregate, S> {
    store: S,
    max_attempts: u32,
    page: usize,
    snapshots: Option<Snapshots<A>>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate, S: Clone> Clone for Repository<A, S> {
    fn clone(&self) -> Self {
        Repository {
            store: self.store.clone(),
            max_attempts: self.max_attempts,
            page: self.page,
            snapshots: self.snapshots.as_ref().map(|s| Snapshots {
                every: s.every,
                encode: s.encode,
                decode: s.decode,
            }),
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate, S: EventStore> Repository<A, S> {
    /// A repository over `store`: 10 attempts on version conflicts, no
    /// snapshots, stream reads in pages of 4,096 events (one round trip for
    /// most streams; memory stays bounded by the page).
    pub fn new(store: S) -> Self {
        Repository {
            store,
            max_attempts: 10,
            page: 4096,
            snapshots: None,
            _aggregate: PhantomData,
        }
    }

    /// How many times `execute` decides before giving up on conflicts (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Page size of stream reads while loading.
    pub fn page_size(mut self, page: usize) -> Self {
        self.page = page.max(1);
        self
    }

    /// Stores a snapshot of the state every `every` events (serde JSON), so
    /// a load reads the newest snapshot and only the tail after it. A
    /// snapshot that no longer decodes (the state's shape changed) is ignored
    /// with a warning and the stream is folded from the start.
    pub fn with_snapshots(mut self, every: u64) -> Self
    where
        A: Serialize + DeserializeOwned,
    {
        self.snapshots = Some(Snapshots {
            every: every.max(1),
            encode: |a| serde_json::to_vec(a),
            decode: |b| serde_json::from_slice(b),
        });
        self
    }

    /// The store this repository writes to.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Loads the aggregate `id`: newest snapshot (if enabled) plus the tail.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, StoreError> {
        let stream = A::stream_name(id);
        let mut state = A::default();
        let mut version = 0;
        let mut snapshot_version = None;
        if let Some(snapshots) = &self.snapshots
            && let Some(snapshot) = self.store.load_snapshot(&stream).await?
        {
            match (snapshots.decode)(&snapshot.state) {
                Ok(s) => {
                    state = s;
                    version = snapshot.version;
                    snapshot_version = Some(snapshot.version);
                }
                Err(e) => tracing::warn!(
                    stream = %stream,
                    snapshot_version = snapshot.version,
                    error = %e,
                    "snapshot no longer decodes; ignoring it and folding the whole stream"
                ),
            }
        }
        let mut events_read = 0;
        loop {
            let page = self
                .store
                .read_stream_fold(&stream, version + 1, self.page)
                .await?;
            let full = page.len() >= self.page;
            for event in page {
                if event.event_type != COMMAND_ACCEPTED {
                    // (A command accepted without events: nothing to fold.)
                    let decoded = match A::Event::decode(&event.event_type, &event.payload) {
                        Ok(Some(decoded)) => decoded,
                        Ok(None) => {
                            return Err(fold_error(
                                &stream,
                                &event,
                                "unknown event type for this reader",
                            ));
                        }
                        Err(e) => return Err(fold_error(&stream, &event, &e.message)),
                    };
                    state.apply(&decoded);
                    events_read += 1;
                }
                version = event.version;
            }
            if !full {
                break;
            }
        }
        Ok(Loaded {
            state,
            version,
            events_read,
            snapshot_version,
        })
    }

    /// Executes `command` on aggregate `id` with fresh ids.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        self.execute_with(id, command, CommandMeta::default()).await
    }

    /// Executes `command` on aggregate `id` with the given ids and metadata.
    ///
    /// With a command id, a command that was already executed returns its
    /// first result (`duplicate: true`), never a second set of events: its
    /// events' ids are derived from the command id, and the store refuses
    /// them a second time. There is no lookup before deciding (the common,
    /// fresh command costs what a command without an id costs); a repeat is
    /// decided again (pure, no effects), and its append or its rejection
    /// then finds the first execution and returns its result. That holds for
    /// a command accepted without events too: it leaves a marker event of
    /// type [`COMMAND_ACCEPTED`] in the stream (one version; skipped by
    /// `load`, not delivered to subscribers, which read their own types
    /// only). Without a command id nothing is recorded.
    pub async fn execute_with(
        &self,
        id: &str,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        let stream = A::stream_name(id);
        let span = tracing::info_span!(
            "aftermath.execute",
            otel.name = %format_args!("execute {}", A::CATEGORY),
            otel.kind = "internal",
            otel.status_code = tracing::field::Empty,
            aftermath.aggregate = A::CATEGORY,
            aftermath.stream = %stream,
            aftermath.command_id = tracing::field::Empty,
            aftermath.outcome = tracing::field::Empty,
            aftermath.retries = tracing::field::Empty,
        );
        if let Some(id) = meta.command_id {
            span.record("aftermath.command_id", tracing::field::display(id));
        }
        // Entered for each poll, as `instrument` does, without its two
        // extra trips through the subscriber: a clone of the span (kept to
        // record the outcome) and one more enter to drop the finished
        // future. With an exporting layer they were about 3% of a SQLite
        // command's throughput (the throughput report's telemetry rows).
        let mut executing = std::pin::pin!(self.execute_in_span(id, stream, command, meta));
        let result = std::future::poll_fn(|cx| {
            let _entered = span.enter();
            executing.as_mut().poll(cx)
        })
        .await;
        let outcome = match &result {
            Ok(done) if done.duplicate => "duplicate",
            Ok(_) => "executed",
            Err(ExecuteError::Rejected(_)) => "rejected",
            Err(ExecuteError::Conflict { .. }) => "conflict",
            Err(_) => "error",
        };
        span.record("aftermath.outcome", outcome);
        if let Ok(done) = &result {
            span.record("aftermath.retries", done.retries);
        } else if outcome == "error" {
            span.record("otel.status_code", "ERROR");
        }
        metrics::counter!(crate::trace::COMMANDS, "aggregate" => A::CATEGORY, "outcome" => outcome)
            .increment(1);
        result
    }

    async fn execute_in_span(
        &self,
        id: &str,
        stream: String,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        let command_id = meta.command_id.unwrap_or_else(Uuid::now_v7);
        let mut metadata = Metadata {
            correlation_id: meta.correlation_id.unwrap_or(command_id),
            causation_id: meta.causation_id.unwrap_or(command_id),
            trace: meta.trace,
            extra: meta.extra,
        };
        crate::trace::inject_current(&mut metadata);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let loaded = self.load(id).await?;
            let mut state = loaded.state;
            let events = match state.decide(command.clone()) {
                Ok(events) => events,
                Err(reason) => {
                    // The same command may have been executed before (a
                    // resend) or concurrently: then the rejection is against
                    // its outcome, and the caller gets the first result.
                    if let Some(command_id) = meta.command_id
                        && let Some(done) = self.already_executed(id, &stream, command_id).await?
                    {
                        return Ok(done);
                    }
                    return Err(ExecuteError::Rejected(reason));
                }
            };
            if events.is_empty() && meta.command_id.is_none() {
                return Ok(Executed {
                    state,
                    events,
                    version: loaded.version,
                    position: None,
                    duplicate: false,
                    retries: attempt - 1,
                });
            }
            // A command with an id accepted without events still leaves a
            // trace: a marker event (type `COMMAND_ACCEPTED`, the command's
            // first derived id), appended against the version it was
            // decided on. A resend (a process re-dispatching after a crash)
            // finds it like it finds the events of a command that had some,
            // and is not decided again against newer state.
            let data = if events.is_empty() {
                let command_id = meta.command_id.unwrap_or_else(Uuid::now_v7);
                vec![EventData {
                    id: derived_event_id(command_id, 0),
                    event_type: COMMAND_ACCEPTED.to_owned(),
                    payload: b"{}".to_vec(),
                    metadata: metadata.clone(),
                }]
            } else {
                events
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let event_id = match meta.command_id {
                            Some(c) => derived_event_id(c, i),
                            None => Uuid::now_v7(),
                        };
                        EventData::encode(e, event_id, metadata.clone())
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
            let expected = ExpectedVersion::Exact(loaded.version);
            let append = tracing::debug_span!(
                "aftermath.append",
                otel.name = %format_args!("append {}", A::CATEGORY),
                otel.kind = "client",
                db.operation.name = "append",
                aftermath.stream = %stream,
                aftermath.events = data.len(),
                aftermath.version = loaded.version,
            );
            let started = std::time::Instant::now();
            let appended = self
                .store
                .append(&stream, expected, data)
                .instrument(append)
                .await;
            metrics::histogram!(crate::trace::APPEND_SECONDS, "aggregate" => A::CATEGORY)
                .record(started.elapsed().as_secs_f64());
            match appended {
                Ok(result) => {
                    for e in &events {
                        state.apply(e);
                    }
                    self.maybe_snapshot(&stream, &state, loaded.version, result.last_version)
                        .await;
                    return Ok(Executed {
                        state,
                        events,
                        version: result.last_version,
                        position: result.last_position,
                        duplicate: result.duplicate,
                        retries: attempt - 1,
                    });
                }
                Err(StoreError::WrongExpectedVersion { .. }) if attempt < self.max_attempts => {
                    tracing::debug!(stream = %stream, attempt, "version conflict; deciding again");
                }
                Err(StoreError::WrongExpectedVersion { .. }) => {
                    return Err(ExecuteError::Conflict {
                        stream,
                        attempts: attempt,
                    });
                }
                // A resend, or a concurrent copy, seen by the store: our
                // derived ids were appended before, at other versions.
                Err(e @ StoreError::DuplicateEventId { .. }) => {
                    if let Some(command_id) = meta.command_id
                        && let Some(done) = self.already_executed(id, &stream, command_id).await?
                    {
                        return Ok(done);
                    }
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// If the command's first derived event is stored in this stream, the
    /// command was executed: rebuild its result.
    async fn already_executed(
        &self,
        id: &str,
        stream: &str,
        command_id: Uuid,
    ) -> Result<Option<Executed<A>>, ExecuteError<A::Error>> {
        let Some(first) = self
            .store
            .find_event(derived_event_id(command_id, 0))
            .await?
        else {
            return Ok(None);
        };
        if first.stream != stream {
            return Err(StoreError::DuplicateEventId {
                id: first.id,
                stream: stream.to_owned(),
                existing_stream: first.stream,
                existing_version: first.version,
            }
            .into());
        }
        let mut events = Vec::new();
        let mut last = (first.version, first.position);
        let mut stored = std::pin::pin!(read_stream_all(
            &self.store,
            stream,
            first.version,
            Direction::Forward,
            self.page
        ));
        while let Some(event) = stored.try_next().await? {
            if event.id != derived_event_id(command_id, events.len()) {
                break;
            }
            last = (event.version, event.position);
            if event.event_type == COMMAND_ACCEPTED {
                // Accepted without events.
                break;
            }
            events.push(event.decode_known::<A::Event>()?.event);
        }
        let loaded = self.load(id).await?;
        Ok(Some(Executed {
            state: loaded.state,
            events,
            version: last.0,
            position: Some(last.1),
            duplicate: true,
            retries: 0,
        }))
    }

    async fn maybe_snapshot(&self, stream: &str, state: &A, before: u64, after: u64) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        // Snapshot when the append crossed a multiple of `every`.
        if after / snapshots.every == before / snapshots.every {
            return;
        }
        let state = match (snapshots.encode)(state) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(stream, error = %e, "aggregate state does not serialize; no snapshot taken");
                return;
            }
        };
        let snapshot = Snapshot {
            stream: stream.to_owned(),
            version: after,
            state,
            taken_at: Utc::now(),
        };
        // A lost snapshot only costs a longer load later; the command succeeded.
        if let Err(e) = self.store.save_snapshot(snapshot).await {
            tracing::warn!(stream, error = %e, "saving snapshot failed");
        }
    }
}

/// The error for an event of `stream` that does not decode while folding.
fn fold_error(stream: &str, event: &FoldEvent, message: &str) -> StoreError {
    DecodeError {
        stream: stream.to_owned(),
        version: event.version,
        position: event.position,
        event_type: event.event_type.clone(),
        message: message.to_owned(),
    }
    .into()
}
