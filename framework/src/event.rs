//! Events: the [`Event`] trait that `#[derive(Event)]` implements, the raw
//! [`EventData`] written to a store, the [`StoredEvent`] read back, and the
//! typed [`Recorded`] view a reader decodes it into.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A global position in the `$all` log. Positions are strictly increasing in
/// the order readers see events; [`Position::ORIGIN`] is "before the first
/// event", so reading `$all` after the origin reads everything.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// Before the first event of the log.
    pub const ORIGIN: Position = Position(0);

    /// The raw number.
    pub fn value(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

mod wire;

pub(crate) use wire::{extra_from_json, extra_of_stored, write_extra_only};

/// Ids, trace context and user metadata that travel with every event.
///
/// `correlation_id` names the whole conversation (a process instance, a
/// request); `causation_id` is the id of the command or event that directly
/// caused this one. `trace` is the W3C trace context of the work that wrote
/// the event (see [`crate::trace`]). `extra` is free key/value metadata for
/// the application.
///
/// Its JSON form (serde, and what PostgreSQL stores) is
/// `{"correlation_id": .., "causation_id": .., "extra": {..}}`, with the
/// trace context as the `traceparent` and `tracestate` keys of `extra` (the
/// W3C header names); KurrentDB keeps the same keys beside `$correlationId`
/// and `$causationId`, and SQLite keeps the ids and the context in columns
/// of their own. Reading the keys back puts the context in `trace` and
/// leaves `extra` without them, when they are the exact form a context is
/// written in (a version-00 `traceparent`, a trimmed non-empty
/// `tracestate`); anything else under those keys stays in `extra` as it was
/// written. Every store reads back the same `Metadata`.
///
/// ```
/// use aftermath::Metadata;
/// use aftermath::trace::TraceContext;
/// use uuid::Uuid;
///
/// let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let mut meta = Metadata::caused_by(Uuid::nil());
/// meta.trace = Some(TraceContext::parse(parent, None).unwrap());
/// meta.extra.insert("tenant".into(), "acme".into());
///
/// let json = serde_json::to_string(&meta).unwrap();
/// assert!(json.contains(r#""extra":{"tenant":"acme","traceparent":"00-4bf9"#));
/// let back: Metadata = serde_json::from_str(&json).unwrap();
/// assert_eq!(back, meta);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// The conversation this event belongs to.
    pub correlation_id: Uuid,
    /// The command or event that caused this event.
    pub causation_id: Uuid,
    /// The trace context of the work that wrote the event: the span of the
    /// command that decided it, which every subscriber continues.
    pub trace: Option<crate::trace::TraceContext>,
    /// Application key/value metadata (user, tenant, source, ...). The
    /// keys `traceparent` and `tracestate` belong to `trace` when it is set.
    pub extra: BTreeMap<String, String>,
}

impl Metadata {
    /// Metadata for an event that starts its own conversation: correlation
    /// and causation both set to `id`.
    pub fn caused_by(id: Uuid) -> Self {
        Metadata {
            correlation_id: id,
            causation_id: id,
            trace: None,
            extra: BTreeMap::new(),
        }
    }

    /// The form every store reads back: a context in `extra` (a valid
    /// version-00 `traceparent`, see [`crate::trace::TRACEPARENT`]) moved
    /// into `trace` when `trace` is unset; when `trace` is set, the keys of
    /// `extra` it owns removed (the stores write the typed context there).
    pub(crate) fn normalize_trace(&mut self) {
        use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};
        match self.trace {
            None => self.trace = TraceContext::take_from_extra(&mut self.extra),
            Some(_) => {
                self.extra.remove(TRACEPARENT);
                self.extra.remove(TRACESTATE);
            }
        }
    }
}

/// An event ready to append: its id, type name, JSON payload and metadata.
///
/// Normally built by [`EventData::encode`] from a typed event; build it by
/// hand only to write raw data (imports, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventData {
    /// Unique id of the event. Appending the same ids again at the same place
    /// is an idempotent no-op; any other reuse is an error.
    pub id: Uuid,
    /// Stable type name (`<prefix>.<variant name or its #[event(name = ..)]>`).
    pub event_type: String,
    /// The variant's content as JSON bytes.
    pub payload: Vec<u8>,
    /// Correlation, causation and user metadata.
    pub metadata: Metadata,
}

impl EventData {
    /// Encodes a typed event with the given id and metadata.
    pub fn encode<E: Event>(event: &E, id: Uuid, metadata: Metadata) -> Result<Self, EncodeError> {
        Ok(EventData {
            id,
            event_type: event.event_type().to_owned(),
            payload: event.encode()?,
            metadata,
        })
    }

    /// Encodes a typed event under a fresh (v7) id that is also its own
    /// correlation and causation.
    pub fn fresh<E: Event>(event: &E) -> Result<Self, EncodeError> {
        let id = Uuid::now_v7();
        Self::encode(event, id, Metadata::caused_by(id))
    }
}

/// An event as a store returns it: raw payload plus where and when it was
/// recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Unique event id.
    pub id: Uuid,
    /// The stream it belongs to, `<category>-<id>` for aggregates.
    pub stream: String,
    /// Its version in the stream: the first event of a stream is version 1.
    pub version: u64,
    /// Its position in `$all`.
    pub position: Position,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Type name as stored (after upcasting, the current name).
    pub event_type: String,
    /// JSON payload (after upcasting, the current shape).
    pub payload: Vec<u8>,
    /// Correlation, causation and user metadata.
    pub metadata: Metadata,
}

impl StoredEvent {
    /// Decodes the payload into `E`.
    ///
    /// Returns `Ok(None)` when `E` does not know this type name (the event is
    /// not for this reader), and a [`DecodeError`] naming the stream,
    /// version, position and type when the payload does not fit.
    pub fn decode<E: Event>(&self) -> Result<Option<Recorded<E>>, DecodeError> {
        match E::decode(&self.event_type, &self.payload) {
            Ok(Some(event)) => Ok(Some(self.recorded(event))),
            Ok(None) => Ok(None),
            Err(source) => Err(self.decode_error(source.message)),
        }
    }

    /// Decodes the payload into `E`, treating an unknown type as an error:
    /// for readers (aggregates) that must understand every event they read.
    pub fn decode_known<E: Event>(&self) -> Result<Recorded<E>, DecodeError> {
        self.decode()?
            .ok_or_else(|| self.decode_error("unknown event type for this reader".to_owned()))
    }

    fn recorded<E>(&self, event: E) -> Recorded<E> {
        Recorded {
            event,
            id: self.id,
            stream: self.stream.clone(),
            version: self.version,
            position: self.position,
            recorded_at: self.recorded_at,
            metadata: self.metadata.clone(),
        }
    }

    fn decode_error(&self, message: String) -> DecodeError {
        DecodeError {
            stream: self.stream.clone(),
            version: self.version,
            position: self.position,
            event_type: self.event_type.clone(),
            message,
        }
    }
}

/// A decoded event with everything the store knows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded<E> {
    /// The typed event.
    pub event: E,
    /// Unique event id.
    pub id: Uuid,
    /// Stream it belongs to.
    pub stream: String,
    /// Version in its stream (1-based).
    pub version: u64,
    /// Position in `$all`.
    pub position: Position,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Correlation, causation and user metadata.
    pub metadata: Metadata,
}

/// Implemented by `#[derive(Event)]` on an enum whose variants are the events.
///
/// The stored payload is the variant's content only; the type name is stored
/// beside it as `<prefix>.<name>`: the enum's `#[event(prefix = "..")]`
/// (required, and stable: it does not follow renames of the Rust type), then
/// the variant's name or its `#[event(name = "..")]`.
/// `#[event(alias = "..")]` (repeatable) keeps decoding events stored under
/// old names. Qualified names are what keep subscribers apart: a reader of
/// `AccountEvent` asks the store for `account.*` names only, so it never
/// receives `OrderEvent::Opened` (stored as `order.Opened`).
///
/// ```
/// use aftermath::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
/// #[event(prefix = "account")]
/// enum AccountEvent {
///     Opened { owner: String },
///     Deposited { amount: u64 },
///     #[event(name = "Withdrawn", alias = "MoneyWithdrawn")]
///     Withdrew { amount: u64 },
/// }
///
/// let event = AccountEvent::Withdrew { amount: 5 };
/// assert_eq!(event.event_type(), "account.Withdrawn");
/// let bytes = event.encode().unwrap();
/// assert_eq!(bytes, br#"{"amount":5}"#);
/// assert_eq!(AccountEvent::decode("account.MoneyWithdrawn", &bytes).unwrap(), Some(event));
/// assert_eq!(AccountEvent::decode("Withdrawn", &bytes).unwrap(), None);
/// assert!(AccountEvent::event_types().contains(&"account.MoneyWithdrawn"));
/// ```
///
/// # Unions of events
///
/// A reader of several aggregates' events (a process manager) takes an enum
/// that joins their event enums, one tuple variant each, with
/// `#[derive(EventUnion)]`. Every event keeps its member's type name and
/// payload; `event_types()` is the members' lists joined in variant order;
/// two members that decode the same name are a compile error; `decode`
/// asks the members in variant order and returns the first answer that is
/// not `Ok(None)`, so a member's `PayloadError` comes back unchanged. Each
/// member type also gets a `From` impl into the union, and may appear in
/// one variant only.
///
/// ```
/// use aftermath::{Event, EventUnion};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
/// #[event(prefix = "order")]
/// enum OrderEvent {
///     Placed { items: u32 },
///     Cancelled,
/// }
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
/// #[event(prefix = "payment")]
/// enum PaymentEvent {
///     Captured { cents: u64 },
/// }
///
/// #[derive(Debug, Clone, PartialEq, EventUnion)]
/// enum FulfillmentInput {
///     Order(OrderEvent),
///     Payment(PaymentEvent),
/// }
///
/// let input = FulfillmentInput::from(PaymentEvent::Captured { cents: 500 });
/// assert_eq!(input.event_type(), "payment.Captured");
/// let bytes = input.encode().unwrap();
/// assert_eq!(bytes, br#"{"cents":500}"#);
/// assert_eq!(FulfillmentInput::decode("payment.Captured", &bytes).unwrap(), Some(input));
/// assert_eq!(
///     FulfillmentInput::decode("order.Placed", br#"{"items":2}"#).unwrap(),
///     Some(FulfillmentInput::Order(OrderEvent::Placed { items: 2 }))
/// );
/// assert_eq!(FulfillmentInput::decode("payment.Refunded", b"{}").unwrap(), None);
/// assert!(FulfillmentInput::decode("order.Placed", b"{}").is_err());
/// assert_eq!(
///     FulfillmentInput::event_types(),
///     ["order.Placed", "order.Cancelled", "payment.Captured"]
/// );
/// ```
pub trait Event: Sized + Send + Sync + 'static {
    /// Every type name this enum decodes: current names, then aliases. A
    /// constant, so that `#[derive(EventUnion)]` can refuse at compile time
    /// two members that decode the same name.
    const EVENT_TYPES: &'static [&'static str];

    /// The first part of every stored type name (`#[event(prefix = "..")]`):
    /// `Some("account")` when the names are `account.<name>`. `None` for
    /// unions and impls without one.
    const PREFIX: Option<&'static str> = None;

    /// The stable type name of this value's variant.
    fn event_type(&self) -> &'static str;

    /// [`Event::EVENT_TYPES`]: a subscriber asks the store for just these.
    fn event_types() -> &'static [&'static str] {
        Self::EVENT_TYPES
    }

    /// The variant's content as JSON bytes.
    fn encode(&self) -> Result<Vec<u8>, EncodeError>;

    /// Decodes a payload stored under `event_type`: `Ok(None)` when the type
    /// is not one of this enum's, an error when the payload does not fit.
    fn decode(event_type: &str, payload: &[u8]) -> Result<Option<Self>, PayloadError>;
}

/// A payload that does not fit the variant its type name selects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload of event type `{event_type}` does not decode: {message}")]
pub struct PayloadError {
    /// The type name the payload was stored under.
    pub event_type: String,
    /// What serde said.
    pub message: String,
}

/// A stored event whose payload does not decode, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event at position {position} (stream `{stream}` version {version}, type `{event_type}`) does not decode: {message}"
)]
pub struct DecodeError {
    /// Stream of the event.
    pub stream: String,
    /// Version in the stream.
    pub version: u64,
    /// Position in `$all`.
    pub position: Position,
    /// Type name as stored.
    pub event_type: String,
    /// What went wrong.
    pub message: String,
}

/// A typed event that cannot be serialized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event of type `{event_type}` does not encode: {message}")]
pub struct EncodeError {
    /// Type name of the event.
    pub event_type: String,
    /// What serde said.
    pub message: String,
}
