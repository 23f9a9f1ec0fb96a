//! Integration with NATS JetStream (feature `nats`): the outbox publishes
//! integration events at least once, the inbox turns incoming messages into
//! commands exactly once in effect.
//!
//! **The message contract** is CloudEvents 1.0 in the binary content mode of
//! its NATS protocol binding: the body is the event's payload as stored
//! (JSON), and every attribute is a header named `ce-<attribute>`, with the
//! payload's media type in `content-type`:
//!
//! | header | value |
//! |---|---|
//! | `Nats-Msg-Id` | the event id (JetStream's deduplication key) |
//! | `ce-specversion` | `1.0` |
//! | `ce-id` | the event id, the same as `Nats-Msg-Id` |
//! | `ce-type` | the stored event type, `<prefix>.<name>` (e.g. `order.Placed`) |
//! | `ce-source` | the event's stream (e.g. `order-42`) |
//! | `ce-time` | when the store recorded it, RFC 3339 in UTC |
//! | `content-type` | `application/json` |
//! | `ce-correlationid` | the conversation's correlation id (extension) |
//! | `ce-causationid` | the id of the command or event that caused it (extension) |
//! | `ce-streamversion` | the event's version in its stream, from 1 (extension) |
//! | `ce-traceparent`, `ce-tracestate` | W3C trace context, when the event carries one ([`crate::Metadata::trace`]; extension) |
//!
//! Header values are percent-encoded as the binding prescribes (space, `"`,
//! `%` and anything outside printable ASCII); [`MessageAttributes`] reads
//! them back. The page `docs/src/message-contract.md` in the repository describes
//! the contract for consumers in other languages.
//!
//! **Outbox.** [`NatsOutbox`] is a ready [`Reactor`]: it publishes selected
//! events to JetStream under a subject chosen per event, with the headers
//! above. It waits for JetStream's publish acknowledgement before the runner
//! records the effect done; a crash in between re-publishes with the same
//! id, which JetStream drops if the stream's `duplicate_window` still covers
//! it. [`NatsOutbox::check_duplicate_window`] checks at start that it does
//! (the window against the outbox's [retry horizon](NatsOutbox::retry_horizon)),
//! warning or refusing by [`WindowPolicy`]; the outbox also logs a warning
//! the first time it publishes into a stream whose window is too short.
//!
//! **Inbox.** [`NatsInbox`] reads a JetStream durable pull consumer and turns
//! each message into a command on an aggregate with a command id derived from
//! the message id (`Nats-Msg-Id`, else `ce-id`, else `<stream>:<sequence>`),
//! so a redelivered or duplicated message is absorbed by the repository's
//! command inbox: the events the command decided carry ids derived from the
//! command id, which the store refuses a second time, and the repository
//! returns the first execution's result. That
//! deduplication does not depend on the broker's window: it lasts as long as
//! the aggregate's events are stored. It acknowledges only after the append
//! committed. A message that cannot be mapped to a command, or whose command
//! is rejected or can never be executed, is parked with its raw bytes and
//! the reason in an [`InboxStore`], then acknowledged: never lost, never
//! retried forever. A parked message delivered again is acknowledged without
//! running again, for as long as its parked row is kept
//! ([`InboxStore::cleanup_parked`] ends that).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use uuid::Uuid;

use crate::aggregate::{Aggregate, CommandMeta, ExecuteError, Repository};
use crate::event::{Event, Recorded};
use crate::reactor::{EffectContext, ReactError, Reactor};
use crate::store::{EventStore, StoreError};
use crate::subscription::stopped;
use crate::worker::{RunContext, Subscriber, SubscriberError, SubscriberState};

/// Header names of the message contract (CloudEvents' NATS binding, binary
/// content mode) and JetStream's deduplication header.
pub mod headers {
    /// JetStream's deduplication header: the event id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// CloudEvents `specversion`: always [`SPEC_VERSION_1_0`].
    pub const SPEC_VERSION: &str = "ce-specversion";
    /// CloudEvents `id`: the event id.
    pub const ID: &str = "ce-id";
    /// CloudEvents `type`: the stored event type, `<prefix>.<name>`.
    pub const TYPE: &str = "ce-type";
    /// CloudEvents `source`: the event's stream.
    pub const SOURCE: &str = "ce-source";
    /// CloudEvents `time`: when the store recorded the event (RFC 3339, UTC).
    pub const TIME: &str = "ce-time";
    /// CloudEvents `datacontenttype` in the binary mode: the body's media type.
    pub const CONTENT_TYPE: &str = "content-type";
    /// Extension `correlationid`: the conversation's correlation id.
    pub const CORRELATION_ID: &str = "ce-correlationid";
    /// Extension `causationid`: the id of what caused the event.
    pub const CAUSATION_ID: &str = "ce-causationid";
    /// Extension `streamversion`: the event's version in its stream (from 1).
    pub const STREAM_VERSION: &str = "ce-streamversion";
    /// Extension `traceparent` (CloudEvents distributed tracing): W3C trace
    /// context, from the event's [`crate::Metadata::trace`], when it has one.
    pub const TRACEPARENT: &str = "ce-traceparent";
    /// Extension `tracestate`, from the same context, when it has one.
    pub const TRACESTATE: &str = "ce-tracestate";
    /// The value of [`SPEC_VERSION`].
    pub const SPEC_VERSION_1_0: &str = "1.0";
    /// The value of [`CONTENT_TYPE`]: payloads are JSON.
    pub const JSON: &str = "application/json";
}

/// The trace context a message carries: `ce-traceparent` (and
/// `ce-tracestate`), else plain `traceparent` / `tracestate` headers (what
/// OpenTelemetry's own propagators write). `None` when absent or malformed.
pub fn message_trace(
    headers: Option<&async_nats::HeaderMap>,
) -> Option<crate::trace::TraceContext> {
    let headers = headers?;
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| decode_header_value(v.as_str()))
    };
    let parse = |parent: &str, state: &str| {
        let state = get(state);
        crate::trace::TraceContext::parse(&get(parent)?, state.as_deref()).ok()
    };
    // A malformed CloudEvents header falls back on the plain one.
    parse(self::headers::TRACEPARENT, self::headers::TRACESTATE)
        .or_else(|| parse(crate::trace::TRACEPARENT, crate::trace::TRACESTATE))
}

/// Percent-encodes a header value as the CloudEvents NATS (and HTTP) binding
/// prescribes: space, `"`, `%` and every byte outside printable ASCII.
pub fn encode_header_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b > b' ' && b < 0x7f && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`encode_header_value`]; `None` when an escape is malformed or
/// the bytes are not UTF-8.
pub fn decode_header_value(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A message that does not follow the contract, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// A required header is absent.
    #[error("message on `{subject}` has no `{header}` header")]
    Missing {
        /// The message's subject.
        subject: String,
        /// The missing header.
        header: &'static str,
    },
    /// A header's value does not parse.
    #[error("message on `{subject}`: header `{header}` is {value:?}: {reason}")]
    Invalid {
        /// The message's subject.
        subject: String,
        /// The header.
        header: &'static str,
        /// Its raw value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The CloudEvents attributes of a message published by a [`NatsOutbox`]
/// (or anyone following the contract), read back from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageAttributes {
    /// `ce-id`: the event id.
    pub id: String,
    /// `ce-type`: the event type.
    pub event_type: String,
    /// `ce-source`: the publisher's stream.
    pub source: String,
    /// `ce-time`, if present.
    pub time: Option<DateTime<Utc>>,
    /// `ce-correlationid`, if present.
    pub correlation_id: Option<Uuid>,
    /// `ce-causationid`, if present.
    pub causation_id: Option<Uuid>,
    /// `ce-streamversion`, if present.
    pub stream_version: Option<u64>,
    /// `ce-traceparent`, if present.
    pub traceparent: Option<String>,
}

impl MessageAttributes {
    /// Reads the attributes of `message`: `ce-specversion` must be `1.0`,
    /// `ce-id`, `ce-type` and `ce-source` present, the optional ones
    /// well-formed when present.
    pub fn from_message(message: &async_nats::Message) -> Result<Self, ContractError> {
        let subject = message.subject.to_string();
        let get = |header: &'static str| -> Result<Option<String>, ContractError> {
            let Some(raw) = message.headers.as_ref().and_then(|h| h.get(header)) else {
                return Ok(None);
            };
            decode_header_value(raw.as_str())
                .map(Some)
                .ok_or_else(|| ContractError::Invalid {
                    subject: subject.clone(),
                    header,
                    value: raw.to_string(),
                    reason: "not a percent-encoded UTF-8 string".into(),
                })
        };
        let required = |header: &'static str| -> Result<String, ContractError> {
            get(header)?.ok_or_else(|| ContractError::Missing {
                subject: subject.clone(),
                header,
            })
        };
        let invalid = |header: &'static str, value: &str, reason: String| ContractError::Invalid {
            subject: subject.clone(),
            header,
            value: value.to_owned(),
            reason,
        };
        let version = required(headers::SPEC_VERSION)?;
        if version != headers::SPEC_VERSION_1_0 {
            return Err(invalid(
                headers::SPEC_VERSION,
                &version,
                "only CloudEvents 1.0 is understood".into(),
            ));
        }
        let uuid = |header: &'static str| -> Result<Option<Uuid>, ContractError> {
            get(header)?
                .map(|v| v.parse().map_err(|e| invalid(header, &v, format!("{e}"))))
                .transpose()
        };
        Ok(MessageAttributes {
            id: required(headers::ID)?,
            event_type: required(headers::TYPE)?,
            source: required(headers::SOURCE)?,
            time: get(headers::TIME)?
                .map(|v| {
                    DateTime::parse_from_rfc3339(&v)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| invalid(headers::TIME, &v, format!("not RFC 3339: {e}")))
                })
                .transpose()?,
            correlation_id: uuid(headers::CORRELATION_ID)?,
            causation_id: uuid(headers::CAUSATION_ID)?,
            stream_version: get(headers::STREAM_VERSION)?
                .map(|v| {
                    v.parse()
                        .map_err(|e| invalid(headers::STREAM_VERSION, &v, format!("{e}")))
                })
                .transpose()?,
            traceparent: get(headers::TRACEPARENT)?,
        })
    }
}

/// The headers the outbox publishes `event` with (see the [module docs](self)).
pub fn event_headers<E: Event>(event: &Recorded<E>) -> async_nats::HeaderMap {
    headers_with_trace(event, None)
}

/// [`event_headers`], with `trace` (when given) as the trace context
/// instead of the one stored with the event.
fn headers_with_trace<E: Event>(
    event: &Recorded<E>,
    trace: Option<&crate::trace::TraceContext>,
) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        map.insert(name, encode_header_value(value).as_str());
    };
    let id = event.id.to_string();
    set(headers::MSG_ID, &id);
    set(headers::SPEC_VERSION, headers::SPEC_VERSION_1_0);
    set(headers::ID, &id);
    set(headers::TYPE, event.event.event_type());
    set(headers::SOURCE, &event.stream);
    set(
        headers::TIME,
        &event
            .recorded_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    );
    set(headers::CONTENT_TYPE, headers::JSON);
    set(
        headers::CORRELATION_ID,
        &event.metadata.correlation_id.to_string(),
    );
    set(
        headers::CAUSATION_ID,
        &event.metadata.causation_id.to_string(),
    );
    set(headers::STREAM_VERSION, &event.version.to_string());
    if let Some(trace) = trace.or(event.metadata.trace.as_ref()) {
        set(headers::TRACEPARENT, trace.traceparent_buf().as_str());
        if let Some(state) = trace.tracestate() {
            set(headers::TRACESTATE, state);
        }
    }
    map
}

/// What [`NatsOutbox::check_duplicate_window`] does when a stream's
/// `duplicate_window` is shorter than the outbox's retry horizon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WindowPolicy {
    /// Log a warning and go on (the default).
    #[default]
    Warn,
    /// Return [`OutboxError::WindowTooShort`].
    Refuse,
}

/// The outcome of [`NatsOutbox::check_duplicate_window`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowCheck {
    /// The stream that takes the subject.
    pub stream: String,
    /// Its `duplicate_window`.
    pub duplicate_window: Duration,
    /// The outbox's retry horizon.
    pub retry_horizon: Duration,
}

impl WindowCheck {
    /// Whether the window covers the horizon.
    pub fn covered(&self) -> bool {
        self.duplicate_window >= self.retry_horizon
    }
}

/// Why an outbox refuses to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxError {
    /// The stream forgets message ids before the outbox stops re-publishing.
    #[error(
        "outbox `{outbox}`: stream `{stream}` drops re-published duplicates for {window:?} \
         (its duplicate_window), less than the outbox's retry horizon of {horizon:?}; a \
         re-publish after the window would be stored twice: raise the stream's duplicate_window \
         or lower the horizon"
    )]
    WindowTooShort {
        /// The outbox.
        outbox: String,
        /// The stream.
        stream: String,
        /// Its duplicate window.
        window: Duration,
        /// The outbox's retry horizon.
        horizon: Duration,
    },
    /// No stream takes the subject, or JetStream did not answer.
    #[error("outbox `{outbox}`: looking up the stream of subject `{subject}`: {reason}")]
    Lookup {
        /// The outbox.
        outbox: String,
        /// The subject.
        subject: String,
        /// What JetStream said.
        reason: String,
    },
}

type SubjectFn<E> = dyn Fn(&Recorded<E>) -> Option<String> + Send + Sync;

/// Publishes integration events to JetStream; run it with a
/// [`ReactorRunner`](crate::reactor::ReactorRunner).
pub struct NatsOutbox<E> {
    name: String,
    jetstream: jetstream::Context,
    subject: Arc<SubjectFn<E>>,
    ack_timeout: Duration,
    retry_horizon: Duration,
    window_policy: WindowPolicy,
    /// Streams whose duplicate window was checked after a publish.
    checked: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl<E: Event> NatsOutbox<E> {
    /// An outbox named `name` publishing through `jetstream`. `subject`
    /// picks the subject of each event, or `None` to not publish it (a
    /// private event).
    pub fn new(
        name: impl Into<String>,
        jetstream: jetstream::Context,
        subject: impl Fn(&Recorded<E>) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        NatsOutbox {
            name: name.into(),
            jetstream,
            subject: Arc::new(subject),
            ack_timeout: Duration::from_secs(10),
            retry_horizon: Duration::from_secs(10 * 60),
            window_policy: WindowPolicy::Warn,
            checked: Default::default(),
        }
    }

    /// How long to wait for JetStream's acknowledgement (default 10 s)
    /// before treating the publish as a transient failure.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// How long after an event's first publish the outbox may publish it
    /// again (default 10 minutes): the runner's retries
    /// ([`retry_horizon_of`](Self::retry_horizon_of) bounds them) plus the
    /// time a crashed process takes to come back. The streams'
    /// `duplicate_window` should be at least this long; past it, a
    /// re-publish is stored again, and only the receiver's inbox absorbs it.
    pub fn retry_horizon(mut self, horizon: Duration) -> Self {
        self.retry_horizon = horizon;
        self
    }

    /// What [`check_duplicate_window`](Self::check_duplicate_window) does
    /// when a window is too short (default [`WindowPolicy::Warn`]).
    pub fn window_policy(mut self, policy: WindowPolicy) -> Self {
        self.window_policy = policy;
        self
    }

    /// An upper bound of how long a runner with `options` keeps retrying
    /// one event (each attempt's call timeout and the longest backoff,
    /// `max_attempts` times), plus `restart`, the time a crashed process
    /// takes to come back.
    pub fn retry_horizon_of(
        options: &crate::reactor::ReactorOptions,
        restart: Duration,
    ) -> Duration {
        (options.call_timeout + options.max_retry_delay) * options.max_attempts.max(1) + restart
    }

    /// Checks, at start, that the stream taking `subject` keeps message ids
    /// for at least the retry horizon: under [`WindowPolicy::Warn`] a short
    /// window is logged and returned, under [`WindowPolicy::Refuse`] it is
    /// [`OutboxError::WindowTooShort`].
    pub async fn check_duplicate_window(&self, subject: &str) -> Result<WindowCheck, OutboxError> {
        let lookup = |reason: String| OutboxError::Lookup {
            outbox: self.name.clone(),
            subject: subject.to_owned(),
            reason,
        };
        let stream = self
            .jetstream
            .stream_by_subject(subject)
            .await
            .map_err(|e| lookup(e.to_string()))?;
        let check = self.window_of(&stream).await.map_err(lookup)?;
        self.judge(&check)?;
        Ok(check)
    }

    async fn window_of(&self, stream: &str) -> Result<WindowCheck, String> {
        window_of(&self.jetstream, stream, self.retry_horizon).await
    }

    fn judge(&self, check: &WindowCheck) -> Result<(), OutboxError> {
        if check.covered() {
            return Ok(());
        }
        let error = OutboxError::WindowTooShort {
            outbox: self.name.clone(),
            stream: check.stream.clone(),
            window: check.duplicate_window,
            horizon: check.retry_horizon,
        };
        match self.window_policy {
            WindowPolicy::Refuse => Err(error),
            WindowPolicy::Warn => {
                tracing::warn!(outbox = %self.name, "{error}");
                Ok(())
            }
        }
    }

    /// After the first publish into a stream: checks its window in the
    /// background and warns if it is short (a safety net for an outbox
    /// started without the check; the publish does not wait for it).
    fn check_once(&self, stream: &str) {
        if !self.checked.lock().unwrap().insert(stream.to_owned()) {
            return;
        }
        let (js, outbox, stream, horizon) = (
            self.jetstream.clone(),
            self.name.clone(),
            stream.to_owned(),
            self.retry_horizon,
        );
        tokio::spawn(async move {
            match window_of(&js, &stream, horizon).await {
                Ok(check) if !check.covered() => {
                    let error = OutboxError::WindowTooShort {
                        outbox: outbox.clone(),
                        stream: check.stream,
                        window: check.duplicate_window,
                        horizon: check.retry_horizon,
                    };
                    tracing::warn!(outbox, "{error}");
                }
                Ok(_) => {}
                Err(reason) => {
                    tracing::debug!(outbox, stream, reason, "duplicate window not checked")
                }
            }
        });
    }
}

/// The duplicate window of `stream` against `horizon`.
async fn window_of(
    js: &jetstream::Context,
    stream: &str,
    horizon: Duration,
) -> Result<WindowCheck, String> {
    let mut handle = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let info = handle.info().await.map_err(|e| e.to_string())?;
    Ok(WindowCheck {
        stream: stream.to_owned(),
        duplicate_window: info.config.duplicate_window,
        retry_horizon: horizon,
    })
}

#[async_trait]
impl<E: Event> Reactor for NatsOutbox<E> {
    type Event = E;

    fn name(&self) -> &str {
        &self.name
    }

    async fn react(&self, event: &Recorded<E>, ctx: &EffectContext) -> Result<(), ReactError> {
        let Some(subject) = (self.subject)(event) else {
            return Ok(());
        };
        let payload = event.event.encode().map_err(ReactError::fatal)?;
        // The publish attempt's own context (a child of the event's span
        // with `otel`), so the consumer's spans hang under this publish.
        let map = headers_with_trace(event, ctx.trace.as_ref());
        let publish = async {
            let ack = self
                .jetstream
                .publish_with_headers(subject.clone(), map, payload.into())
                .await
                .map_err(ReactError::retry)?;
            ack.await.map_err(ReactError::retry)
        };
        match tokio::time::timeout(self.ack_timeout, publish).await {
            Ok(Ok(ack)) => {
                tracing::debug!(
                    subject,
                    sequence = ack.sequence,
                    duplicate = ack.duplicate,
                    "published"
                );
                self.check_once(&ack.stream);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ReactError::retry(format!(
                "no publish acknowledgement within {:?}",
                self.ack_timeout
            ))),
        }
    }
}

/// A message the inbox could not turn into a command, kept with its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedMessage {
    /// The inbox (consumer) name.
    pub inbox: String,
    /// The message id (`Nats-Msg-Id`, else `ce-id`, else `<stream>:<sequence>`).
    pub message_id: String,
    /// Its subject.
    pub subject: String,
    /// Its raw payload.
    pub payload: Vec<u8>,
    /// Why it was parked.
    pub error: String,
    /// When.
    pub parked_at: DateTime<Utc>,
}

/// Where an inbox parks messages it cannot handle.
#[async_trait]
pub trait InboxStore: Send + Sync + 'static {
    /// Parks a message (idempotent per inbox and message id).
    async fn park(&self, message: &ParkedMessage) -> Result<(), StoreError>;
    /// Whether a message is parked: a redelivered or re-published message
    /// that was parked before is acknowledged again, not executed again (a
    /// rejected command must not succeed on its second delivery).
    /// The default scans [`InboxStore::parked_messages`]; backends override
    /// it with a keyed lookup.
    async fn is_parked(&self, inbox: &str, message_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .parked_messages(Some(inbox))
            .await?
            .iter()
            .any(|m| m.message_id == message_id))
    }
    /// Parked messages of one inbox or all, oldest first.
    async fn parked_messages(&self, inbox: Option<&str>) -> Result<Vec<ParkedMessage>, StoreError>;
    /// Deletes parked messages older than `before`; returns how many.
    async fn cleanup_parked(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// What an inbox does with one message: which aggregate, which command.
pub type MessageMapper<A> = dyn Fn(&async_nats::Message) -> Result<(String, <A as Aggregate>::Command), String>
    + Send
    + Sync;

/// Namespace of command ids derived from message ids (uuid v5).
const INBOX_NAMESPACE: Uuid = Uuid::from_u128(0x3b8e_41f0_6c2d_4a97_8e15_d0a9_74c3_5b21);

/// The command id an inbox derives from a message id.
pub fn command_id(inbox: &str, message_id: &str) -> Uuid {
    Uuid::new_v5(&INBOX_NAMESPACE, format!("{inbox}/{message_id}").as_bytes())
}

/// Reads a JetStream durable pull consumer and executes a command per
/// message. Run it in a [`Worker`](crate::worker::Worker).
pub struct NatsInbox<A: Aggregate, S, P> {
    name: String,
    consumer: jetstream::consumer::PullConsumer,
    repository: Repository<A, S>,
    parking: P,
    map: Arc<MessageMapper<A>>,
}

impl<A, S, P> NatsInbox<A, S, P>
where
    A: Aggregate,
    A::Command: Clone,
    S: EventStore + Clone,
    P: InboxStore,
{
    /// An inbox named `name` reading `consumer` (a durable pull consumer with
    /// explicit acks), executing commands through `repository`, parking what
    /// `map` cannot turn into a command in `parking`.
    pub fn new(
        name: impl Into<String>,
        consumer: jetstream::consumer::PullConsumer,
        repository: Repository<A, S>,
        parking: P,
        map: impl Fn(&async_nats::Message) -> Result<(String, A::Command), String>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        NatsInbox {
            name: name.into(),
            consumer,
            repository,
            parking,
            map: Arc::new(map),
        }
    }

    fn error(&self, message: String) -> SubscriberError {
        SubscriberError::Store {
            subscriber: self.name.clone(),
            source: StoreError::Closed(message),
        }
    }

    /// Handles one message; returns whether to acknowledge it.
    async fn handle(&self, message: &jetstream::Message) -> Result<(), SubscriberError> {
        let header = |name| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.to_string())
        };
        let message_id = header(headers::MSG_ID)
            .or_else(|| header(headers::ID))
            .or_else(|| {
                message
                    .info()
                    .ok()
                    .map(|i| format!("{}:{}", i.stream, i.stream_sequence))
            })
            .unwrap_or_else(|| format!("{}:unknown", message.subject));
        let park = |error: String| ParkedMessage {
            inbox: self.name.clone(),
            message_id: message_id.clone(),
            subject: message.subject.to_string(),
            payload: message.payload.to_vec(),
            error,
            parked_at: Utc::now(),
        };
        let store_error = |source| SubscriberError::Store {
            subscriber: self.name.clone(),
            source,
        };
        // Parked before (its ack was lost, or it was published again after
        // the duplicate window): the outcome stands; acknowledge it again.
        if self
            .parking
            .is_parked(&self.name, &message_id)
            .await
            .map_err(store_error)?
        {
            tracing::debug!(inbox = %self.name, message_id, "message was parked before; acknowledged again");
            return Ok(());
        }
        let (id, command) = match (self.map)(&message.message) {
            Ok(mapped) => mapped,
            Err(error) => {
                tracing::warn!(inbox = %self.name, message_id, error, "message does not map to a command; parked");
                return self.parking.park(&park(error)).await.map_err(store_error);
            }
        };
        let meta = CommandMeta::with_id(command_id(&self.name, &message_id))
            .extra("nats-message-id", message_id.clone());
        let span = tracing::info_span!(
            "aftermath.receive",
            otel.name = %format_args!("receive {}", message.subject),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = %message.subject,
            messaging.message.id = %message_id,
            messaging.consumer.group.name = %self.name,
        );
        let parent = message_trace(message.headers.as_ref());
        // The command's events carry the sender's trace on.
        let executed = crate::trace::continue_in(
            span,
            parent,
            self.repository.execute_with(&id, command, meta),
        )
        .await;
        match executed {
            Ok(done) => {
                tracing::debug!(inbox = %self.name, message_id, duplicate = done.duplicate, "message executed");
                Ok(())
            }
            Err(ExecuteError::Rejected(reason)) => {
                let error = format!("rejected by {} `{id}`: {reason}", A::CATEGORY);
                tracing::warn!(inbox = %self.name, message_id, error, "command rejected; parked");
                self.parking.park(&park(error)).await.map_err(store_error)
            }
            // Failures that every redelivery would repeat: the message id
            // was used before for another aggregate (its derived command id
            // is taken), or a decided event does not serialize. Parked, so
            // the message is not redelivered forever.
            Err(
                e @ (ExecuteError::Encode(_)
                | ExecuteError::Store(StoreError::DuplicateEventId { .. })),
            ) => {
                let error = format!("cannot execute on {} `{id}`: {e}", A::CATEGORY);
                tracing::warn!(inbox = %self.name, message_id, error, "message cannot be executed; parked");
                self.parking.park(&park(error)).await.map_err(store_error)
            }
            Err(e) => Err(self.error(format!("executing message {message_id}: {e}"))),
        }
    }
}

#[async_trait]
impl<A, S, P> Subscriber for NatsInbox<A, S, P>
where
    A: Aggregate,
    A::Command: Clone,
    S: EventStore + Clone,
    P: InboxStore,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, ctx: &mut RunContext) -> Result<(), SubscriberError> {
        let mut messages = self
            .consumer
            .messages()
            .await
            .map_err(|e| self.error(format!("subscribing to the consumer: {e}")))?;
        ctx.report(|s| s.state = SubscriberState::Live);
        let mut stop = ctx.shutdown.clone();
        loop {
            let next = tokio::select! {
                _ = stopped(&mut stop) => return Ok(()),
                next = messages.next() => next,
            };
            let message = match next {
                None => return Err(self.error("the consumer's message stream ended".into())),
                Some(Err(e)) => return Err(self.error(format!("receiving a message: {e}"))),
                Some(Ok(message)) => message,
            };
            // Not acknowledged on error: JetStream redelivers it, and the
            // derived command id makes the repeat harmless.
            self.handle(&message).await?;
            message
                .ack()
                .await
                .map_err(|e| self.error(format!("acknowledging a message: {e}")))?;
            ctx.report(|s| s.handled += 1);
        }
    }
}
