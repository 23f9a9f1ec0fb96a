//! Pure mappings between aftermath's model and KurrentDB's, kept free of I/O
//! so that each one is unit-tested without a server: versions, `$all`
//! positions, metadata JSON, stream and type names, the server-side `$all`
//! filter, the records of the id and snapshot streams, and errors.

use std::collections::BTreeMap;

use ::kurrentdb::{CurrentRevision, StreamPosition, StreamState, SubscriptionFilter};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::event::{Metadata, Position};
use crate::store::{Direction, ExpectedVersion, Snapshot, StoreError};
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

// ---------------------------------------------------------------- versions

/// The server's revision (0-based) of our version (1-based): `None` for
/// version 0 ("no events").
pub(crate) fn revision_of(version: u64) -> Option<u64> {
    version.checked_sub(1)
}

/// Our version (1-based) of a server revision (0-based).
pub(crate) fn version_of(revision: u64) -> Result<u64, String> {
    revision
        .checked_add(1)
        .ok_or_else(|| format!("stream revision {revision} has no version"))
}

/// The client's stream state for an expected version.
pub(crate) fn expected_state(expected: ExpectedVersion) -> StreamState {
    match expected {
        ExpectedVersion::Any => StreamState::Any,
        ExpectedVersion::NoStream => StreamState::NoStream,
        ExpectedVersion::StreamExists => StreamState::StreamExists,
        ExpectedVersion::Exact(v) => match revision_of(v) {
            None => StreamState::NoStream,
            Some(revision) => StreamState::StreamRevision(revision),
        },
    }
}

/// Our version of the server's "current revision" (0 = no stream).
pub(crate) fn actual_version(current: CurrentRevision) -> u64 {
    match current {
        CurrentRevision::NoStream => 0,
        CurrentRevision::Current(revision) => revision.saturating_add(1),
    }
}

/// The largest revision or position the server can hold (it stores them as
/// signed 64-bit numbers).
pub(crate) const MAX_SERVER_NUMBER: u64 = i64::MAX as u64;

/// How to read `limit` events of a stream from our version `from` in
/// `direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamRead {
    /// Nothing can be there: answer with no events, without a request.
    Empty,
    /// Read from `start` (a revision, or the end), backwards or not.
    From {
        start: StreamPosition<u64>,
        backwards: bool,
    },
}

/// See [`StreamRead`]. Forward reads start at version `max(from, 1)`;
/// backward reads at `from` (`u64::MAX` = the end). The server does not
/// clamp a backward read that starts beyond the end (it returns the existing
/// part of the range only), so the caller re-reads from the end when the
/// first event returned is not at the start revision.
pub(crate) fn stream_read(from: u64, direction: Direction, limit: usize) -> StreamRead {
    if limit == 0 {
        return StreamRead::Empty;
    }
    match direction {
        Direction::Forward => {
            let revision = from.max(1) - 1;
            if revision > MAX_SERVER_NUMBER {
                StreamRead::Empty
            } else {
                StreamRead::From {
                    start: StreamPosition::Position(revision),
                    backwards: false,
                }
            }
        }
        Direction::Backward => match revision_of(from) {
            None => StreamRead::Empty,
            Some(revision) if revision >= MAX_SERVER_NUMBER => StreamRead::From {
                start: StreamPosition::End,
                backwards: true,
            },
            Some(revision) => StreamRead::From {
                start: StreamPosition::Position(revision),
                backwards: true,
            },
        },
    }
}

// --------------------------------------------------------------- positions

/// Our [`Position`] of an event at `$all` position `(commit, prepare)`.
///
/// `$all` is ordered by `(commit, prepare)`. Every write through the gRPC
/// API (EventStoreDB 20.6+, KurrentDB) is stored as "prepare-only" records
/// flagged committed, for which the server reports each event's own log
/// position as both its commit and its prepare position: commit positions
/// are then unique per event and ordered exactly like `$all`, so the commit
/// position alone is the position, unchanged. Only explicit transactions of
/// the legacy TCP API (removed in KurrentDB 24.2) give several events one
/// commit position with different prepare positions; such an event cannot be
/// placed in one `u64` without a gap-free guarantee, and is refused (the
/// caller reports it as [`StoreError::Corrupt`]). Log positions are byte
/// offsets below 2^63, so they fit; they are sparse (a position difference
/// is a number of bytes, not of events).
pub(crate) fn position_of(commit: u64, prepare: u64) -> Result<Position, String> {
    if commit != prepare {
        return Err(format!(
            "commit position {commit} differs from prepare position {prepare} (an explicit \
             transaction of the legacy TCP API): this backend orders $all by commit position alone"
        ));
    }
    if commit > MAX_SERVER_NUMBER {
        return Err(format!("position {commit} is beyond the server's range"));
    }
    Ok(Position(commit))
}

/// The client's `$all` position of one of our positions.
pub(crate) fn client_position(position: Position) -> ::kurrentdb::Position {
    ::kurrentdb::Position {
        commit: position.0,
        prepare: position.0,
    }
}

/// Where a forward `$all` read for events after `after` starts: the start of
/// the log for the origin, else the event at `after` itself (the server's
/// forward reads include their start; the caller skips it). `None` when
/// nothing can follow `after`.
pub(crate) fn all_start(after: Position) -> Option<StreamPosition<::kurrentdb::Position>> {
    if after == Position::ORIGIN {
        Some(StreamPosition::Start)
    } else if after.0 > MAX_SERVER_NUMBER {
        None
    } else {
        Some(StreamPosition::Position(client_position(after)))
    }
}

/// Where the watch subscription (re)starts: after our last known head, or at
/// the start of the log when the head is the origin.
pub(crate) fn subscribe_start(head: Position) -> StreamPosition<::kurrentdb::Position> {
    all_start(head).unwrap_or(StreamPosition::End)
}

// ---------------------------------------------------------------- metadata

/// The metadata key of the correlation id (the server's system projections,
/// such as `$by_correlation_id`, read it).
pub(crate) const CORRELATION_KEY: &str = "$correlationId";
/// The metadata key of the causation id.
pub(crate) const CAUSATION_KEY: &str = "$causationId";

/// The event metadata JSON of `meta`: a flat object of strings with the
/// conventional `$correlationId` and `$causationId` keys, and the `extra`
/// keys beside them. An extra key starting with `$` (reserved for the
/// server's own keys) is written with one more `$` in front, and read back
/// without it.
pub(crate) fn encode_metadata(meta: &Metadata) -> Vec<u8> {
    let mut object = Map::new();
    object.insert(
        CORRELATION_KEY.to_owned(),
        Value::String(meta.correlation_id.to_string()),
    );
    object.insert(
        CAUSATION_KEY.to_owned(),
        Value::String(meta.causation_id.to_string()),
    );
    for (key, value) in &meta.extra {
        let key = if key.starts_with('$') {
            format!("${key}")
        } else {
            key.clone()
        };
        object.insert(key, Value::String(value.clone()));
    }
    if let Some(trace) = &meta.trace {
        object.insert(TRACEPARENT.to_owned(), Value::String(trace.traceparent()));
        match trace.tracestate() {
            Some(state) => object.insert(TRACESTATE.to_owned(), Value::String(state.to_owned())),
            None => object.remove(TRACESTATE),
        };
    }
    serde_json::to_vec(&Value::Object(object)).expect("a map of strings serializes")
}

/// Reads event metadata written by [`encode_metadata`], or by another
/// client: empty metadata, or a missing id key, means the event started its
/// own conversation (the id defaults to the event's id); other `$` keys
/// (the server's) are ignored; non-string extra values keep their JSON
/// text. Metadata that is present but not a JSON object, or an id that is
/// not a UUID, is an error.
pub(crate) fn decode_metadata(bytes: &[u8], event_id: Uuid) -> Result<Metadata, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Metadata::caused_by(event_id));
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("metadata is not JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err("metadata is not a JSON object".to_owned());
    };
    let id = |key: &str| -> Result<Uuid, String> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(event_id),
            Some(Value::String(s)) => {
                Uuid::parse_str(s).map_err(|e| format!("metadata `{key}` is not a UUID: {e}"))
            }
            Some(other) => Err(format!("metadata `{key}` is not a string: {other}")),
        }
    };
    let correlation_id = id(CORRELATION_KEY)?;
    let causation_id = id(CAUSATION_KEY)?;
    let mut extra = BTreeMap::new();
    for (key, value) in &object {
        let key = match key.strip_prefix("$$") {
            Some(rest) => format!("${rest}"),
            None if key.starts_with('$') => continue,
            None => key.clone(),
        };
        let value = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        extra.insert(key, value);
    }
    Ok(Metadata {
        correlation_id,
        causation_id,
        trace: TraceContext::take_from_extra(&mut extra),
        extra,
    })
}

// ------------------------------------------------------------------- names

/// Prefix of the per-id lookup streams (after the namespace).
pub(crate) const ID_STREAM_PREFIX: &str = "aftermath-id-";
/// Prefix of the snapshot streams (after the namespace).
pub(crate) const SNAPSHOT_STREAM_PREFIX: &str = "aftermath-snapshot-";
/// Event type of an id reservation.
pub(crate) const RESERVED_TYPE: &str = "$aftermath-reserved";
/// Event type of a released id reservation.
pub(crate) const RELEASED_TYPE: &str = "$aftermath-released";
/// Event type of a snapshot.
pub(crate) const SNAPSHOT_TYPE: &str = "$aftermath-snapshot";

/// Stream and type names on the server: as they are, or behind a
/// namespace (`<namespace>.<name>` for both streams and event types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    /// `""` or `"<namespace>."`.
    prefix: String,
}

impl Names {
    /// Names without (`None`) or within a namespace, checked by
    /// [`check_namespace`].
    pub(crate) fn new(namespace: Option<&str>) -> Names {
        Names {
            prefix: namespace.map_or_else(String::new, |ns| format!("{ns}.")),
        }
    }

    /// `""` or `"<namespace>."`.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The server's name of our stream.
    pub(crate) fn stream(&self, stream: &str) -> String {
        format!("{}{stream}", self.prefix)
    }

    /// Our name of a server stream, if it is in the namespace.
    pub(crate) fn user_stream<'a>(&self, server: &'a str) -> Option<&'a str> {
        server.strip_prefix(self.prefix.as_str())
    }

    /// The server's name of our event type.
    pub(crate) fn event_type(&self, event_type: &str) -> String {
        format!("{}{event_type}", self.prefix)
    }

    /// Our name of a server event type, if it is in the namespace.
    pub(crate) fn user_type<'a>(&self, server: &'a str) -> Option<&'a str> {
        server.strip_prefix(self.prefix.as_str())
    }

    /// The lookup stream of an event id.
    pub(crate) fn id_stream(&self, id: Uuid) -> String {
        format!("{}{ID_STREAM_PREFIX}{}", self.prefix, id.hyphenated())
    }

    /// The snapshot stream of our stream.
    pub(crate) fn snapshot_stream(&self, stream: &str) -> String {
        format!("{}{SNAPSHOT_STREAM_PREFIX}{stream}", self.prefix)
    }
}

/// A namespace is 1 to 64 ASCII letters, digits, `_` or `-`.
pub(crate) fn check_namespace(namespace: &str) -> Result<(), String> {
    if namespace.is_empty() || namespace.len() > 64 {
        return Err(format!(
            "namespace `{namespace}` must have 1 to 64 characters"
        ));
    }
    if let Some(c) = namespace
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "namespace `{namespace}` has `{c}`: use ASCII letters, digits, `_` and `-`"
        ));
    }
    Ok(())
}

/// Refuses our stream names that collide with the backend's own streams.
pub(crate) fn check_user_stream(stream: &str) -> Result<(), StoreError> {
    if stream.starts_with(ID_STREAM_PREFIX) || stream.starts_with(SNAPSHOT_STREAM_PREFIX) {
        return Err(StoreError::InvalidStream {
            stream: stream.to_owned(),
            reason: "names starting with `aftermath-id-` or `aftermath-snapshot-` are reserved \
                     by the KurrentDB backend",
        });
    }
    Ok(())
}

/// Event types starting with `$` are the server's (system events): `$all`
/// reads leave them out, so the store refuses to append them.
pub(crate) fn check_event_type(event_type: &str) -> Result<(), String> {
    if event_type.starts_with('$') {
        return Err(format!(
            "event type `{event_type}` starts with `$`, reserved for the server's system events"
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------ filter

/// The server-side filter of a `$all` read or subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServerFilter {
    /// Event types matching this (.NET) regular expression.
    TypeRegex(String),
    /// Event types starting with this prefix.
    TypePrefix(String),
}

impl ServerFilter {
    /// The client's filter.
    pub(crate) fn to_client(&self) -> SubscriptionFilter {
        match self {
            ServerFilter::TypeRegex(regex) => SubscriptionFilter::on_event_type().regex(regex),
            ServerFilter::TypePrefix(prefix) => {
                SubscriptionFilter::on_event_type().add_prefix(prefix)
            }
        }
    }
}

/// Which `$all` events are ours to read: events of the namespace (or, without
/// one, every event whose type does not start with `$`), optionally only of
/// some stored types. The same rule runs on the server ([`AllFilter::server`],
/// so unwanted events are not sent) and in the client ([`AllFilter::matches`],
/// a check that also leaves out the server's `$` streams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AllFilter {
    prefix: String,
    types: Option<Vec<String>>,
}

impl AllFilter {
    /// Our events in `names`' namespace, of `types` (stored names, before
    /// the namespace prefix) when given.
    pub(crate) fn new(names: &Names, types: Option<Vec<String>>) -> AllFilter {
        AllFilter {
            prefix: names.prefix().to_owned(),
            types,
        }
    }

    /// The server-side filter: a regex of the exact type names when types are
    /// given (`^<prefix>(?:A|B)$`); else the namespace prefix, or, without a
    /// namespace, "no `$` type" (`^[^$]`, the client's
    /// `exclude_system_events`), which also leaves out the backend's own id
    /// and snapshot events (their types start with `$`).
    pub(crate) fn server(&self) -> ServerFilter {
        match &self.types {
            Some(types) => {
                let alternatives: Vec<String> = types.iter().map(|t| escape_regex(t)).collect();
                ServerFilter::TypeRegex(format!(
                    "^{}(?:{})$",
                    escape_regex(&self.prefix),
                    alternatives.join("|")
                ))
            }
            None if self.prefix.is_empty() => ServerFilter::TypeRegex("^[^$]".to_owned()),
            None => ServerFilter::TypePrefix(self.prefix.clone()),
        }
    }

    /// Whether an event of `server_stream` with `server_type` is ours.
    pub(crate) fn matches(&self, server_stream: &str, server_type: &str) -> bool {
        if server_stream.starts_with('$') || !server_stream.starts_with(self.prefix.as_str()) {
            return false;
        }
        let Some(event_type) = server_type.strip_prefix(self.prefix.as_str()) else {
            return false;
        };
        match &self.types {
            Some(types) => types.iter().any(|t| t == event_type),
            None => !event_type.starts_with('$') && !server_type.starts_with('$'),
        }
    }
}

/// Escapes `text` for a .NET (and Rust) regular expression: every ASCII
/// character that is not a letter, digit, `_`, `<` or `>` gets a backslash
/// (a backslash before such a character means the character itself in both
/// engines); control characters are written as `\t`, `\n`, `\r`, `\xNN`.
pub(crate) fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if c.is_ascii() && !(c.is_ascii_alphanumeric() || matches!(c, '_' | '<' | '>')) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_ascii_control() => out.push_str(&format!("\\x{:02X}", c as u32)),
                c => {
                    out.push('\\');
                    out.push(c);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ------------------------------------------------------- id reservations

/// The content of an id reservation: the event with this id is (to be)
/// appended to `stream` in a batch whose first event has version `first`, at
/// index `index` of that batch, so at version `first + index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Reservation {
    /// Our stream name.
    pub(crate) stream: String,
    /// Version of the batch's first event.
    pub(crate) first: u64,
    /// Index of the event in the batch.
    pub(crate) index: u64,
}

impl Reservation {
    /// The version the reserved event has once its batch is appended.
    pub(crate) fn version(&self) -> u64 {
        self.first.saturating_add(self.index)
    }

    /// The record's JSON.
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a reservation serializes")
    }
}

/// The last record of an id's lookup stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdRecord {
    /// The id is claimed for this place.
    Reserved(Reservation),
    /// The claim was given up (its append never happened).
    Released,
}

/// Reads the last record of an id stream.
pub(crate) fn decode_id_record(event_type: &str, data: &[u8]) -> Result<IdRecord, String> {
    match event_type {
        RESERVED_TYPE => serde_json::from_slice(data)
            .map(IdRecord::Reserved)
            .map_err(|e| format!("id reservation does not decode: {e}")),
        RELEASED_TYPE => Ok(IdRecord::Released),
        other => Err(format!("unexpected event type `{other}` in an id stream")),
    }
}

/// What the event store holds at a reservation's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observed {
    /// An event with this id is at the reserved version.
    Event(Uuid),
    /// The stream has no event at the reserved version; its version is this.
    Missing {
        /// The stream's current version.
        stream_version: u64,
    },
}

/// The state of a reservation, decided by what its stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The reserved id is stored at the reserved place.
    Committed,
    /// The batch's first version is not written yet: its append may still
    /// happen (or be retried at this very place).
    Pending,
    /// The batch's place was taken by other events: the reserved append can
    /// never happen.
    Abandoned,
}

/// Classifies a reservation of `id`. A stream's versions only grow, and a
/// batch is appended whole at `Exact(first - 1)`: once the stream has a
/// version `>= first` without `id` at `first + index`, the batch can never
/// land there.
pub(crate) fn classify(reservation: &Reservation, id: Uuid, observed: Observed) -> Claim {
    match observed {
        Observed::Event(found) if found == id => Claim::Committed,
        Observed::Event(_) => Claim::Abandoned,
        Observed::Missing { stream_version } if stream_version >= reservation.first => {
            Claim::Abandoned
        }
        Observed::Missing { .. } => Claim::Pending,
    }
}

/// What an append does about an id whose lookup stream holds a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The id is already stored exactly where this append puts it (a
    /// concurrent identical append won): go on, the append's version check
    /// decides.
    Proceed,
    /// Write our reservation over the record (optimistically, at its
    /// revision).
    Take,
    /// The id is stored (or reserved by an append that may still happen)
    /// elsewhere: `DuplicateEventId` naming this place.
    Conflict {
        /// Our stream name of the existing place.
        stream: String,
        /// Its version.
        version: u64,
    },
}

/// Decides about a record (`None` = released) for an append that wants
/// `wanted`.
pub(crate) fn decide(existing: Option<(&Reservation, Claim)>, wanted: &Reservation) -> Decision {
    match existing {
        None => Decision::Take,
        Some((_, Claim::Abandoned)) => Decision::Take,
        Some((r, Claim::Committed)) if r == wanted => Decision::Proceed,
        Some((r, Claim::Pending)) if r == wanted => Decision::Take,
        Some((r, _)) => Decision::Conflict {
            stream: r.stream.clone(),
            version: r.version(),
        },
    }
}

// --------------------------------------------------------------- snapshots

/// The metadata of a snapshot event (its data is the state, as is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotMeta {
    version: u64,
    #[serde(rename = "takenAt")]
    taken_at: DateTime<Utc>,
}

/// The metadata JSON of a snapshot event.
pub(crate) fn encode_snapshot_meta(snapshot: &Snapshot) -> Vec<u8> {
    serde_json::to_vec(&SnapshotMeta {
        version: snapshot.version,
        taken_at: snapshot.taken_at,
    })
    .expect("snapshot metadata serializes")
}

/// The snapshot of `stream` stored as an event with this metadata and data.
pub(crate) fn decode_snapshot(stream: &str, meta: &[u8], data: &[u8]) -> Result<Snapshot, String> {
    let meta: SnapshotMeta = serde_json::from_slice(meta)
        .map_err(|e| format!("snapshot metadata does not decode: {e}"))?;
    Ok(Snapshot {
        stream: stream.to_owned(),
        version: meta.version,
        state: data.to_vec(),
        taken_at: meta.taken_at,
    })
}

// ------------------------------------------------------------------ errors

/// Errors of this backend that are not the server's.
#[derive(Debug, thiserror::Error)]
pub enum KurrentError {
    /// The client could not be created (bad settings, TLS setup).
    #[error("cannot create the KurrentDB client: {0}")]
    Client(String),
    /// An event type the store does not append (see the module docs).
    #[error("{0}")]
    ReservedEventType(String),
    /// An id's lookup stream kept changing under this append.
    #[error("event id {0} is contended: its reservation kept changing")]
    Contended(Uuid),
}

/// The store error of a failed server call during `operation` on `stream`
/// (our name). A wrong expected version here is not the caller's (appends
/// map theirs with [`wrong_version`]) and stays a database error.
pub(crate) fn store_error(
    operation: &'static str,
    location: &str,
    stream: &str,
    error: ::kurrentdb::Error,
) -> StoreError {
    use ::kurrentdb::Error;
    match error {
        Error::ResourceDeleted => StoreError::InvalidStream {
            stream: stream.to_owned(),
            reason: "the stream is deleted on the server",
        },
        Error::AccessDenied => StoreError::Incompatible {
            location: location.to_owned(),
            reason: format!(
                "access denied during {operation} (stream `{stream}`): check the credentials \
                 in the URL and the stream's access control list"
            ),
        },
        Error::ConnectionClosed => StoreError::Closed(format!(
            "the KurrentDB client's connection stopped during {operation}"
        )),
        other => StoreError::database(operation, other),
    }
}

/// The store error of an append refused for its expected version.
pub(crate) fn wrong_version(
    stream: &str,
    expected: ExpectedVersion,
    current: CurrentRevision,
) -> StoreError {
    StoreError::WrongExpectedVersion {
        stream: stream.to_owned(),
        expected,
        actual: actual_version(current),
    }
}

/// Whether a store error is the server being unreachable or unavailable
/// (no node answers, the leader changed, the connection dropped, a deadline
/// passed): a [`StoreError::Database`] (or [`StoreError::Closed`]) holding
/// such a client error, after which retrying later may succeed.
pub fn is_unavailable(error: &StoreError) -> bool {
    match error {
        StoreError::Closed(_) => true,
        StoreError::Database { source, .. } => source
            .downcast_ref::<::kurrentdb::Error>()
            .is_some_and(client_unavailable),
        _ => false,
    }
}

/// True for the client's error values after which retrying may succeed.
fn client_unavailable(error: &::kurrentdb::Error) -> bool {
    use ::kurrentdb::Error;
    matches!(
        error,
        Error::ServerError(_)
            | Error::NotLeaderException(_)
            | Error::ConnectionClosed
            | Error::GrpcConnectionError(_)
            | Error::DeadlineExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::kurrentdb::{Endpoint, Error, GrpcConnectionError};

    #[test]
    fn versions_map_both_ways() {
        assert_eq!(revision_of(0), None);
        assert_eq!(revision_of(1), Some(0));
        assert_eq!(revision_of(u64::MAX), Some(u64::MAX - 1));
        assert_eq!(version_of(0), Ok(1));
        assert_eq!(version_of(41), Ok(42));
        assert!(version_of(u64::MAX).is_err());
        for v in [1, 2, 10, 1 << 40] {
            assert_eq!(version_of(revision_of(v).unwrap()), Ok(v));
        }
        use ExpectedVersion as E;
        assert_eq!(expected_state(E::Any), StreamState::Any);
        assert_eq!(expected_state(E::NoStream), StreamState::NoStream);
        assert_eq!(expected_state(E::StreamExists), StreamState::StreamExists);
        assert_eq!(expected_state(E::Exact(0)), StreamState::NoStream);
        assert_eq!(expected_state(E::Exact(1)), StreamState::StreamRevision(0));
        assert_eq!(expected_state(E::Exact(7)), StreamState::StreamRevision(6));
        assert_eq!(actual_version(CurrentRevision::NoStream), 0);
        assert_eq!(actual_version(CurrentRevision::Current(0)), 1);
        assert_eq!(actual_version(CurrentRevision::Current(9)), 10);
        assert_eq!(actual_version(CurrentRevision::Current(u64::MAX)), u64::MAX);
    }

    #[test]
    fn stream_reads_start_where_they_should() {
        use StreamPosition::{End, Position as At};
        let from = |start, backwards| StreamRead::From { start, backwards };
        assert_eq!(stream_read(1, Direction::Forward, 10), from(At(0), false));
        assert_eq!(stream_read(0, Direction::Forward, 10), from(At(0), false));
        assert_eq!(stream_read(5, Direction::Forward, 10), from(At(4), false));
        assert_eq!(
            stream_read(u64::MAX, Direction::Forward, 10),
            StreamRead::Empty
        );
        assert_eq!(stream_read(5, Direction::Forward, 0), StreamRead::Empty);
        assert_eq!(stream_read(0, Direction::Backward, 10), StreamRead::Empty);
        assert_eq!(stream_read(1, Direction::Backward, 10), from(At(0), true));
        assert_eq!(stream_read(4, Direction::Backward, 10), from(At(3), true));
        assert_eq!(
            stream_read(u64::MAX, Direction::Backward, 3),
            from(End, true)
        );
        assert_eq!(
            stream_read(MAX_SERVER_NUMBER + 1, Direction::Backward, 3),
            from(End, true)
        );
        assert_eq!(
            stream_read(MAX_SERVER_NUMBER, Direction::Backward, 3),
            from(At(MAX_SERVER_NUMBER - 1), true)
        );
    }

    #[test]
    fn positions_encode_decode_and_keep_the_order() {
        // $all order is (commit, prepare); gRPC-era events have commit == prepare.
        let raw: Vec<u64> = vec![1, 2, 128, 129, 4096, 1 << 32, 1 << 40, MAX_SERVER_NUMBER];
        let positions: Vec<Position> = raw.iter().map(|&p| position_of(p, p).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "order kept");
        for (&p, position) in raw.iter().zip(&positions) {
            assert_eq!(position.value(), p, "the commit position, unchanged");
            let back = client_position(*position);
            assert_eq!((back.commit, back.prepare), (p, p));
            assert_eq!(position_of(back.commit, back.prepare), Ok(*position));
        }
        // The client's own order agrees with ours.
        let client: Vec<::kurrentdb::Position> =
            positions.iter().map(|p| client_position(*p)).collect();
        assert!(client.windows(2).all(|w| w[0] < w[1]));
        assert!(Position::ORIGIN < positions[0]);
        // Explicit (TCP) transactions and out-of-range values are refused.
        let err = position_of(500, 400).unwrap_err();
        assert!(err.contains("commit position 500") && err.contains("prepare position 400"));
        assert!(position_of(MAX_SERVER_NUMBER + 1, MAX_SERVER_NUMBER + 1).is_err());
        assert!(position_of(u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn all_reads_start_at_the_right_place() {
        assert_eq!(all_start(Position::ORIGIN), Some(StreamPosition::Start));
        assert_eq!(
            all_start(Position(77)),
            Some(StreamPosition::Position(::kurrentdb::Position {
                commit: 77,
                prepare: 77
            }))
        );
        assert_eq!(
            all_start(Position(MAX_SERVER_NUMBER)),
            Some(StreamPosition::Position(::kurrentdb::Position {
                commit: MAX_SERVER_NUMBER,
                prepare: MAX_SERVER_NUMBER
            }))
        );
        assert_eq!(all_start(Position(MAX_SERVER_NUMBER + 1)), None);
        assert_eq!(all_start(Position(u64::MAX)), None);
        assert_eq!(subscribe_start(Position::ORIGIN), StreamPosition::Start);
        assert_eq!(
            subscribe_start(Position(9)),
            StreamPosition::Position(::kurrentdb::Position {
                commit: 9,
                prepare: 9
            })
        );
        assert_eq!(subscribe_start(Position(u64::MAX)), StreamPosition::End);
    }

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn metadata_uses_the_conventional_keys_and_round_trips() {
        let correlation = Uuid::now_v7();
        let causation = Uuid::now_v7();
        let mut meta = Metadata {
            correlation_id: correlation,
            causation_id: causation,
            trace: TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("v=1"),
            )
            .ok(),
            extra: BTreeMap::new(),
        };
        meta.extra.insert("user".into(), "ann".into());
        meta.extra.insert("tenant".into(), "ü-日本".into());
        meta.extra.insert("$weird".into(), "dollar".into());
        meta.extra.insert("$$double".into(), "two".into());
        meta.extra.insert(String::new(), "empty key".into());
        let bytes = encode_metadata(&meta);
        let value = json(&bytes);
        assert_eq!(value["$correlationId"], correlation.to_string());
        assert_eq!(value["$causationId"], causation.to_string());
        assert_eq!(value["user"], "ann");
        assert_eq!(
            value["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "the trace context beside the other keys, as the W3C header"
        );
        assert_eq!(value["tracestate"], "v=1");
        assert_eq!(
            value["$$weird"], "dollar",
            "a `$` extra key gets one more `$`"
        );
        assert_eq!(value["$$$double"], "two");
        assert!(
            value.as_object().unwrap().values().all(Value::is_string),
            "string keys and values only"
        );
        let back = decode_metadata(&bytes, Uuid::now_v7()).unwrap();
        assert_eq!(back, meta);
        // Without extras: just the two keys.
        let plain = Metadata::caused_by(correlation);
        let value = json(&encode_metadata(&plain));
        assert_eq!(value.as_object().unwrap().len(), 2);
        assert_eq!(
            decode_metadata(&encode_metadata(&plain), causation).unwrap(),
            plain
        );
    }

    #[test]
    fn metadata_of_other_writers_is_read_leniently() {
        let id = Uuid::now_v7();
        let other = Uuid::now_v7();
        // No metadata, or no id keys: the event starts its own conversation.
        assert_eq!(decode_metadata(b"", id).unwrap(), Metadata::caused_by(id));
        assert_eq!(decode_metadata(b"  ", id).unwrap(), Metadata::caused_by(id));
        assert_eq!(decode_metadata(b"{}", id).unwrap(), Metadata::caused_by(id));
        // Only a correlation id; the server's `$` keys are ignored; other
        // values keep their JSON text.
        let text = format!(
            r#"{{"$correlationId":"{other}","$v":"1:-1:1:3","$causedBy":"x","n":3,"ok":true,"o":{{"a":1}},"s":"t"}}"#
        );
        let meta = decode_metadata(text.as_bytes(), id).unwrap();
        assert_eq!(meta.correlation_id, other);
        assert_eq!(meta.causation_id, id);
        let extra: Vec<(&str, &str)> = meta
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            extra,
            vec![("n", "3"), ("o", r#"{"a":1}"#), ("ok", "true"), ("s", "t")]
        );
        // Present but broken is an error.
        assert!(
            decode_metadata(b"not json", id)
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(
            decode_metadata(b"[1]", id)
                .unwrap_err()
                .contains("not a JSON object")
        );
        let bad = decode_metadata(br#"{"$causationId":"nope"}"#, id).unwrap_err();
        assert!(
            bad.contains("$causationId") && bad.contains("UUID"),
            "{bad}"
        );
        let bad = decode_metadata(br#"{"$correlationId":5}"#, id).unwrap_err();
        assert!(bad.contains("not a string"), "{bad}");
    }

    #[test]
    fn names_with_and_without_a_namespace() {
        let id = Uuid::parse_str("0191d2a4-4b3e-7c1a-9f00-000000000001").unwrap();
        let plain = Names::new(None);
        assert_eq!(plain.stream("account-1"), "account-1");
        assert_eq!(plain.user_stream("account-1"), Some("account-1"));
        assert_eq!(plain.event_type("Deposited"), "Deposited");
        assert_eq!(plain.user_type("Deposited"), Some("Deposited"));
        assert_eq!(
            plain.id_stream(id),
            "aftermath-id-0191d2a4-4b3e-7c1a-9f00-000000000001"
        );
        assert_eq!(
            plain.snapshot_stream("account-1"),
            "aftermath-snapshot-account-1"
        );
        let ns = Names::new(Some("t1"));
        assert_eq!(ns.stream("account-1"), "t1.account-1");
        assert_eq!(ns.user_stream("t1.account-1"), Some("account-1"));
        assert_eq!(ns.user_stream("t2.account-1"), None);
        assert_eq!(ns.user_stream("account-1"), None);
        assert_eq!(ns.event_type("Deposited"), "t1.Deposited");
        assert_eq!(ns.user_type("t1.Deposited"), Some("Deposited"));
        assert_eq!(ns.user_type("Deposited"), None);
        assert!(ns.id_stream(id).starts_with("t1.aftermath-id-"));
        assert_eq!(ns.snapshot_stream("a-1"), "t1.aftermath-snapshot-a-1");
        assert!(check_namespace("test_0a-B").is_ok());
        assert!(check_namespace("").is_err());
        assert!(check_namespace("a.b").is_err());
        assert!(check_namespace("$sys").is_err());
        assert!(check_namespace(&"x".repeat(65)).is_err());
        assert!(check_user_stream("account-1").is_ok());
        assert!(check_user_stream("aftermath-x").is_ok());
        for reserved in ["aftermath-id-1", "aftermath-snapshot-a-1"] {
            match check_user_stream(reserved) {
                Err(StoreError::InvalidStream { stream, .. }) => assert_eq!(stream, reserved),
                other => panic!("expected InvalidStream, got {other:?}"),
            }
        }
        assert!(check_event_type("Deposited").is_ok());
        assert!(check_event_type("$metadata").is_err());
    }

    /// Runs the server-side regex with Rust's engine, which agrees with .NET
    /// on this subset (anchors, escapes, non-capturing groups, alternation,
    /// a negated class).
    fn server_matches(filter: &ServerFilter, event_type: &str) -> bool {
        match filter {
            ServerFilter::TypeRegex(r) => regex::Regex::new(r).unwrap().is_match(event_type),
            ServerFilter::TypePrefix(p) => event_type.starts_with(p.as_str()),
        }
    }

    #[test]
    fn filters_select_exactly_the_wanted_types() {
        let plain = Names::new(None);
        let ns = Names::new(Some("t1"));
        let types = vec![
            "Deposited".to_owned(),
            "Money.Withdrawn".to_owned(),
            "a+b (v2)|x".to_owned(),
            "ü^$".to_owned(),
        ];
        let f = AllFilter::new(&plain, Some(types.clone()));
        assert_eq!(
            f.server(),
            ServerFilter::TypeRegex(
                r"^(?:Deposited|Money\.Withdrawn|a\+b\ \(v2\)\|x|ü\^\$)$".into()
            )
        );
        let g = AllFilter::new(&ns, Some(types.clone()));
        assert_eq!(
            g.server(),
            ServerFilter::TypeRegex(
                r"^t1\.(?:Deposited|Money\.Withdrawn|a\+b\ \(v2\)\|x|ü\^\$)$".into()
            )
        );
        let candidates = [
            "Deposited",
            "Deposited2",
            "XDeposited",
            "MoneyXWithdrawn",
            "Money.Withdrawn",
            "a+b (v2)|x",
            "ab (v2)",
            "x",
            "ü^$",
            "ü",
            "$metadata",
            "$aftermath-reserved",
            "",
        ];
        for t in candidates {
            let wanted = types.iter().any(|w| w == t);
            assert_eq!(server_matches(&f.server(), t), wanted, "{t:?}");
            assert_eq!(f.matches("s-1", t), wanted, "{t:?}");
            let namespaced = format!("t1.{t}");
            assert_eq!(server_matches(&g.server(), &namespaced), wanted, "{t:?}");
            assert_eq!(g.matches("t1.s-1", &namespaced), wanted, "{t:?}");
            assert!(!server_matches(&g.server(), t), "{t:?} lacks the namespace");
        }
        // Everything of ours: no `$` types (system and the backend's own).
        let all = AllFilter::new(&plain, None);
        assert_eq!(all.server(), ServerFilter::TypeRegex("^[^$]".into()));
        for (t, ours) in [
            ("Deposited", true),
            ("$metadata", false),
            ("$>", false),
            ("$aftermath-reserved", false),
            ("$aftermath-snapshot", false),
        ] {
            assert_eq!(server_matches(&all.server(), t), ours, "{t}");
            assert_eq!(all.matches("s-1", t), ours, "{t}");
        }
        let all_ns = AllFilter::new(&ns, None);
        assert_eq!(all_ns.server(), ServerFilter::TypePrefix("t1.".into()));
        assert!(all_ns.matches("t1.s-1", "t1.Deposited"));
        assert!(
            !all_ns.matches("t2.s-1", "t1.Deposited"),
            "another namespace's stream"
        );
        assert!(!all_ns.matches("t1.s-1", "t2.Deposited"));
        assert!(!all_ns.matches("t1.s", "$aftermath-reserved"));
        assert!(!server_matches(&all_ns.server(), "$aftermath-reserved"));
        // The client side also leaves out the server's `$` streams.
        assert!(!all.matches("$$s-1", "Deposited"));
        assert!(!f.matches("$et-Deposited", "Deposited"));
        // Conversion to the client's filter does not panic either way.
        let _ = f.server().to_client();
        let _ = all_ns.server().to_client();
    }

    #[test]
    fn regex_escaping_is_literal() {
        assert_eq!(escape_regex("Plain_09"), "Plain_09");
        assert_eq!(escape_regex(r"a.b*c\d"), r"a\.b\*c\\d");
        assert_eq!(escape_regex("tab\tnl\n"), r"tab\tnl\n");
        assert_eq!(escape_regex("\u{1}"), r"\x01");
        let nasty = "^$.|?*+()[]{}\\/#-<> \t\n\u{7}é'\"@!%&,:;=~`";
        let re = regex::Regex::new(&format!("^{}$", escape_regex(nasty))).unwrap();
        assert!(re.is_match(nasty));
        assert!(!re.is_match(&nasty[1..]));
    }

    #[test]
    fn id_records_round_trip_and_reject_strangers() {
        let r = Reservation {
            stream: "account-1".into(),
            first: 5,
            index: 2,
        };
        assert_eq!(r.version(), 7);
        assert_eq!(
            json(&r.encode()),
            serde_json::json!({"stream": "account-1", "first": 5, "index": 2})
        );
        assert_eq!(
            decode_id_record(RESERVED_TYPE, &r.encode()),
            Ok(IdRecord::Reserved(r.clone()))
        );
        assert_eq!(decode_id_record(RELEASED_TYPE, b""), Ok(IdRecord::Released));
        assert!(decode_id_record(RESERVED_TYPE, b"{}").is_err());
        assert!(decode_id_record("Deposited", b"{}").is_err());
    }

    #[test]
    fn reservations_are_classified_by_what_their_stream_holds() {
        let id = Uuid::now_v7();
        let r = Reservation {
            stream: "s-1".into(),
            first: 4,
            index: 1,
        };
        assert_eq!(classify(&r, id, Observed::Event(id)), Claim::Committed);
        assert_eq!(
            classify(&r, id, Observed::Event(Uuid::now_v7())),
            Claim::Abandoned
        );
        // Stream still before the batch: the append may still happen.
        for v in [0, 3] {
            assert_eq!(
                classify(&r, id, Observed::Missing { stream_version: v }),
                Claim::Pending
            );
        }
        // The batch's first place is taken (by a shorter batch, say).
        assert_eq!(
            classify(&r, id, Observed::Missing { stream_version: 4 }),
            Claim::Abandoned
        );
    }

    #[test]
    fn decisions_follow_the_duplicate_rules() {
        let here = Reservation {
            stream: "s-1".into(),
            first: 4,
            index: 1,
        };
        let elsewhere = Reservation {
            stream: "s-2".into(),
            first: 1,
            index: 0,
        };
        let later_here = Reservation {
            stream: "s-1".into(),
            first: 6,
            index: 0,
        };
        assert_eq!(decide(None, &here), Decision::Take, "released");
        assert_eq!(
            decide(Some((&elsewhere, Claim::Abandoned)), &here),
            Decision::Take
        );
        assert_eq!(
            decide(Some((&here, Claim::Committed)), &here),
            Decision::Proceed
        );
        assert_eq!(decide(Some((&here, Claim::Pending)), &here), Decision::Take);
        let conflict = |r: &Reservation| Decision::Conflict {
            stream: r.stream.clone(),
            version: r.version(),
        };
        assert_eq!(
            decide(Some((&elsewhere, Claim::Committed)), &here),
            conflict(&elsewhere)
        );
        assert_eq!(
            decide(Some((&elsewhere, Claim::Pending)), &here),
            conflict(&elsewhere)
        );
        assert_eq!(
            decide(Some((&here, Claim::Committed)), &later_here),
            conflict(&here),
            "same stream, another place"
        );
    }

    #[test]
    fn snapshots_metadata_round_trips() {
        let snapshot = Snapshot {
            stream: "account-1".into(),
            version: 30,
            state: br#"{"balance":5}"#.to_vec(),
            taken_at: DateTime::parse_from_rfc3339("2025-01-02T03:04:05.123456789Z")
                .unwrap()
                .with_timezone(&Utc),
        };
        let meta = encode_snapshot_meta(&snapshot);
        assert_eq!(json(&meta)["version"], 30);
        assert_eq!(json(&meta)["takenAt"], "2025-01-02T03:04:05.123456789Z");
        assert_eq!(
            decode_snapshot("account-1", &meta, &snapshot.state).unwrap(),
            snapshot
        );
        assert!(decode_snapshot("a", b"{}", b"").is_err());
    }

    #[test]
    fn client_errors_become_store_errors() {
        let loc = "esdb://127.0.0.1:2113";
        match store_error("reading", loc, "s-1", Error::ResourceDeleted) {
            StoreError::InvalidStream { stream, reason } => {
                assert_eq!(stream, "s-1");
                assert!(reason.contains("deleted"));
            }
            other => panic!("{other:?}"),
        }
        match store_error("appending", loc, "s-1", Error::AccessDenied) {
            StoreError::Incompatible { location, reason } => {
                assert_eq!(location, loc);
                assert!(
                    reason.contains("access denied during appending"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            store_error("reading", loc, "s", Error::ConnectionClosed),
            StoreError::Closed(_)
        ));
        let unavailable = [
            Error::ServerError("unavailable".into()),
            Error::NotLeaderException(Endpoint {
                host: "n2".into(),
                port: 2113,
            }),
            Error::GrpcConnectionError(GrpcConnectionError::MaxDiscoveryAttemptReached(10)),
            Error::DeadlineExceeded,
        ];
        for e in unavailable {
            assert!(client_unavailable(&e), "{e}");
            let mapped = store_error("reading", loc, "s", e.clone());
            assert!(is_unavailable(&mapped), "{mapped}");
            match mapped {
                StoreError::Database { operation, source } => {
                    assert_eq!(operation, "reading");
                    let inner = source
                        .downcast_ref::<Error>()
                        .expect("the client's error kept");
                    assert_eq!(inner.to_string(), e.to_string());
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(!client_unavailable(&Error::ResourceNotFound));
        assert!(is_unavailable(&store_error(
            "r",
            loc,
            "s",
            Error::ConnectionClosed
        )));
        assert!(!is_unavailable(&store_error(
            "r",
            loc,
            "s",
            Error::AccessDenied
        )));
        assert!(!is_unavailable(&store_error(
            "r",
            loc,
            "s",
            Error::ResourceDeleted
        )));
        // Internal version conflicts are not the caller's.
        let internal = store_error(
            "claiming",
            loc,
            "s",
            Error::WrongExpectedVersion {
                expected: StreamState::NoStream,
                current: CurrentRevision::Current(0),
            },
        );
        assert!(matches!(internal, StoreError::Database { .. }));
        match wrong_version(
            "s-1",
            ExpectedVersion::Exact(2),
            CurrentRevision::Current(4),
        ) {
            StoreError::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => assert_eq!(
                (stream.as_str(), expected, actual),
                ("s-1", ExpectedVersion::Exact(2), 5)
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            wrong_version(
                "s",
                ExpectedVersion::StreamExists,
                CurrentRevision::NoStream
            ),
            StoreError::WrongExpectedVersion { actual: 0, .. }
        ));
    }
}
