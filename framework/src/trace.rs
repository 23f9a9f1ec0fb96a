//! Traces and metrics: the W3C trace context that travels with every event,
//! the spans aftermath opens, and the metrics it records.
//!
//! # One trace per business process
//!
//! When a command is executed inside a span (an HTTP handler's, say), the
//! trace context of that span is stored with each event the command decides,
//! in [`Metadata::trace`] (written by the stores as `traceparent` and
//! `tracestate` strings in the
//! [W3C Trace Context](https://www.w3.org/TR/trace-context/) header format,
//! or in binary by SQLite; see [`Metadata`]).
//! Every subscriber continues that trace for the work an event causes: a
//! projection's apply, a reactor's effect attempt, a process manager's
//! handling of its input and the commands it sends (whose events carry the
//! trace on), a deadline firing, a message published through the NATS
//! outbox (as headers) and received by an inbox. The context lives in the
//! data, so the trace joins across processes and across a crash and
//! restart: whichever worker handles the event continues it.
//!
//! Without the cargo feature `otel`, aftermath still opens its spans (they
//! are `tracing` spans, printed by any `tracing` subscriber) and carries a
//! trace context it received on to the events it causes. With `otel` and a
//! [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry) layer
//! installed by the application, its spans become OpenTelemetry spans: the
//! context stored with new events is the current span's, and each span that
//! handles an event is a child of the span that recorded it.
//!
//! To start a trace from a context that arrived some other way (an incoming
//! HTTP request's `traceparent` header in an application without
//! OpenTelemetry), pass it explicitly:
//!
//! ```
//! use aftermath::trace::TraceContext;
//! use aftermath::CommandMeta;
//!
//! let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
//! let trace = TraceContext::parse(incoming, None).unwrap();
//! let meta = CommandMeta::default().trace(&trace);
//! assert_eq!(meta.trace.as_ref().map(|t| t.traceparent()).as_deref(), Some(incoming));
//! assert_eq!(trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! ```
//!
//! # Spans
//!
//! | span (`tracing` name) | OpenTelemetry name | kind | attributes |
//! |---|---|---|---|
//! | `aftermath.execute` | `execute <category>` | internal | `aftermath.aggregate`, `aftermath.stream`, `aftermath.command_id`, `aftermath.outcome`, `aftermath.retries` |
//! | `aftermath.append` | `append <category>` | client | `db.operation.name`, `aftermath.stream`, `aftermath.events`, `aftermath.version` |
//! | `aftermath.page` | `process <subscriber>` | consumer | `messaging.system`, `messaging.operation.type`, `messaging.consumer.group.name`, `aftermath.from`, `aftermath.to`, `messaging.batch.message_count` |
//! | `aftermath.handle` | `process <event type>` | consumer | `messaging.consumer.group.name`, `messaging.message.id`, `messaging.destination.name` (the stream), `aftermath.position` |
//! | `aftermath.effect` | `effect <reactor>` | consumer | `aftermath.reactor`, `messaging.message.id`, `aftermath.idempotency_key`, `aftermath.attempt`, `aftermath.outcome` |
//! | `aftermath.dispatch` | `send <target category>` | producer | `aftermath.process`, `aftermath.instance`, `aftermath.command_id`, `aftermath.target`, `aftermath.outcome` |
//! | `aftermath.deadline` | `deadline <name>` | internal | `aftermath.process`, `aftermath.instance`, `aftermath.deadline` |
//! | `aftermath.publish` / `aftermath.receive` | `publish <subject>` / `receive <subject>` | producer / consumer | `messaging.system` = `nats`, `messaging.destination.name`, `messaging.message.id` |
//!
//! A handling span (`aftermath.handle`, `aftermath.effect`, ...) is the child
//! of the span that recorded the event; the page span that contains it
//! starts its own trace (a page mixes events of many traces). Spans are at
//! INFO level except two that come in volume: a projection's apply of one
//! event (`aftermath.handle` of a projection) and `aftermath.append` are at
//! DEBUG, so an exporting layer filtered at INFO (the usual setting, and
//! what the throughput report measures) leaves them out; lower its filter
//! to DEBUG for `aftermath` to see them.
//!
//! # Metrics
//!
//! Recorded through the [`metrics`](https://docs.rs/metrics) facade: the
//! application installs a recorder (a Prometheus exporter, an OpenTelemetry
//! bridge); without one, each call is a no-op. The facade was chosen over
//! the OpenTelemetry metrics API because it is small, stable and
//! exporter-neutral, and the library should not pick the application's
//! telemetry stack (a `metrics` → OpenTelemetry bridge exists for those who
//! want OTLP). Names follow Prometheus conventions:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | [`COMMANDS`] `aftermath_commands_total` | counter | `aggregate`, `outcome` (`executed`, `duplicate`, `rejected`, `conflict`, `error`) |
//! | [`APPEND_SECONDS`] `aftermath_append_seconds` | histogram | `aggregate` |
//! | [`EVENTS_HANDLED`] `aftermath_events_handled_total` | counter | `subscriber` (a page handled again after a lost race counts again) |
//! | [`LAG_EVENTS`] `aftermath_subscriber_lag_events` | gauge | `subscriber` |
//! | [`LAG_SECONDS`] `aftermath_subscriber_lag_seconds` | gauge | `subscriber` |
//! | [`EFFECT_ATTEMPTS`] `aftermath_effect_attempts_total` | counter | `reactor`, `outcome` (`done`, `retry`, `parked`) |
//! | [`PROCESS_COMMANDS`] `aftermath_process_commands_total` | counter | `process`, `outcome` (`accepted`, `rejected`, `parked`) |
//! | [`DEADLINES_FIRED`] `aftermath_deadlines_fired_total` | counter | `process` |
//!
//! The lag gauges are set by a running subscriber after each page. What the
//! store holds (parked and blocked effects, parked process instances and
//! inbox messages, pending deadlines: the same for every replica) is read
//! on demand: [`crate::admin::Report::record_metrics`] sets
//! `aftermath_effects_parked`, `aftermath_effects_blocked`,
//! `aftermath_processes_parked`, `aftermath_inbox_parked`,
//! `aftermath_projection_events_skipped` and, per subscriber, the lag the
//! store sees (`aftermath_store_lag_events`, `aftermath_store_lag_seconds`);
//! call it from the handler of a scrape endpoint.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

use tracing::Instrument;

use crate::event::Metadata;

/// The key of the W3C `traceparent` in a stored metadata's `extra` map (see
/// [`Metadata`]) and the plain NATS header.
pub const TRACEPARENT: &str = "traceparent";
/// The key of the W3C `tracestate` beside [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// Counter: commands executed by a `Repository`, by `aggregate` and `outcome`.
pub const COMMANDS: &str = "aftermath_commands_total";
/// Histogram: seconds an append of a `Repository` took, by `aggregate`.
pub const APPEND_SECONDS: &str = "aftermath_append_seconds";
/// Counter: events of the pages a subscriber handled, by `subscriber` (a
/// page handled again after another writer committed first counts again).
pub const EVENTS_HANDLED: &str = "aftermath_events_handled_total";
/// Gauge: events of `$all` a running subscriber has still to read, by `subscriber`.
pub const LAG_EVENTS: &str = "aftermath_subscriber_lag_events";
/// Gauge: age in seconds of the last event a running subscriber handled
/// while behind; 0 once it reached the head. By `subscriber`.
pub const LAG_SECONDS: &str = "aftermath_subscriber_lag_seconds";
/// Counter: effect attempts, by `reactor` and `outcome`.
pub const EFFECT_ATTEMPTS: &str = "aftermath_effect_attempts_total";
/// Counter: commands a process manager sent, by `process` and `outcome`.
pub const PROCESS_COMMANDS: &str = "aftermath_process_commands_total";
/// Counter: deadlines that fired, by `process`.
pub const DEADLINES_FIRED: &str = "aftermath_deadlines_fired_total";
/// Gauge: partitions of a consumer `group` assigned to this worker.
pub const GROUP_PARTITIONS: &str = "aftermath_group_partitions";

/// A W3C trace context: which trace, which span in it is the parent, and
/// whether it is sampled. See the [module docs](self).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    // Big-endian bytes rather than a `u128`, and a boxed state: every
    // stored event's metadata holds an `Option<TraceContext>`, and both
    // keep it small (48 bytes instead of 64 with a `u128`'s alignment).
    trace_id: [u8; 16],
    span_id: u64,
    flags: u8,
    tracestate: Option<Box<str>>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TraceContext")
            .field(&self.traceparent())
            .finish()
    }
}

/// A `traceparent` that is not in the W3C format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent `{value}`: {reason}")]
pub struct TraceContextError {
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The length of a version-00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;

/// The value of each lowercase hex digit, [`NOT_HEX`] for every other byte.
const HEX: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut i = 0;
    while i < 16 {
        table[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    table
};
const NOT_HEX: u8 = 0x10;

/// The value of at most 16 lowercase hex digits, `None` for any other byte.
/// Without a branch per digit: stored ids are random, so a per-digit branch
/// on the digit's range is mispredicted about every other digit.
fn hex_value(digits: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    let mut bad = 0u8;
    for &b in digits {
        let digit = HEX[usize::from(b)];
        bad |= digit;
        value = value << 4 | u64::from(digit & 0xf);
    }
    (bad & NOT_HEX == 0).then_some(value)
}

/// Writes `value` as `out.len()` lowercase hex digits, zero-padded.
fn put_hex(out: &mut [u8], value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let len = out.len();
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = DIGITS[((value >> (4 * (len - 1 - i))) & 0xf) as usize];
    }
}

/// Trace id, parent id and flags of a valid `traceparent` without
/// surrounding whitespace; `None` for anything else (which
/// [`TraceContext::parse`] then reads field by field to say what is wrong).
fn parse_well_formed(b: &[u8]) -> Option<(u128, u64, u8)> {
    let fields_end = b.len() == TRACEPARENT_LEN || b.get(TRACEPARENT_LEN) == Some(&b'-');
    if b.len() < TRACEPARENT_LEN || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' || !fields_end {
        return None;
    }
    let version = hex_value(&b[0..2])?;
    let trace_id = u128::from(hex_value(&b[3..19])?) << 64 | u128::from(hex_value(&b[19..35])?);
    let span_id = hex_value(&b[36..52])?;
    let flags = hex_value(&b[53..55])? as u8;
    let valid = version != 0xff
        && (version != 0 || b.len() == TRACEPARENT_LEN)
        && trace_id != 0
        && span_id != 0;
    valid.then_some((trace_id, span_id, flags))
}

fn hex_field<T>(
    value: &str,
    part: &str,
    len: usize,
    what: &'static str,
    parse: fn(&str, u32) -> Result<T, std::num::ParseIntError>,
) -> Result<T, TraceContextError> {
    let bad = || TraceContextError {
        value: value.to_owned(),
        reason: what,
    };
    if part.len() != len
        || !part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    parse(part, 16).map_err(|_| bad())
}

impl TraceContext {
    /// A context from its parts; `None` when an id is zero (invalid in W3C).
    pub fn new(trace_id: u128, span_id: u64, sampled: bool) -> Option<Self> {
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id: trace_id.to_be_bytes(),
            span_id,
            flags: u8::from(sampled),
            tracestate: None,
        })
    }

    /// Parses a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`; a
    /// later version's extra fields are ignored, as the spec asks) and an
    /// optional `tracestate`.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, TraceContextError> {
        let tracestate = || {
            tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Box::from)
        };
        // Every handled event that carries a context is parsed: the
        // well-formed value in one pass over its bytes, anything else by
        // the field-by-field parse below, which names what is wrong.
        if let Some((trace_id, span_id, flags)) = parse_well_formed(traceparent.as_bytes()) {
            return Ok(TraceContext {
                trace_id: trace_id.to_be_bytes(),
                span_id,
                flags,
                tracestate: tracestate(),
            });
        }
        let value = traceparent.trim();
        let err = |reason| TraceContextError {
            value: traceparent.to_owned(),
            reason,
        };
        let mut parts = value.split('-');
        let version = parts.next().unwrap_or_default();
        let version = hex_field(
            value,
            version,
            2,
            "the version is not 2 hex digits",
            u8::from_str_radix,
        )?;
        if version == 0xff {
            return Err(err("version ff is invalid"));
        }
        let trace_id = hex_field(
            value,
            parts.next().unwrap_or_default(),
            32,
            "the trace id is not 32 lowercase hex digits",
            u128::from_str_radix,
        )?;
        let span_id = hex_field(
            value,
            parts.next().unwrap_or_default(),
            16,
            "the parent id is not 16 lowercase hex digits",
            u64::from_str_radix,
        )?;
        let flags = hex_field(
            value,
            parts.next().unwrap_or_default(),
            2,
            "the flags are not 2 hex digits",
            u8::from_str_radix,
        )?;
        if version == 0 && parts.next().is_some() {
            return Err(err("version 00 has exactly four fields"));
        }
        if trace_id == 0 {
            return Err(err("the trace id is all zeros"));
        }
        if span_id == 0 {
            return Err(err("the parent id is all zeros"));
        }
        Ok(TraceContext {
            trace_id: trace_id.to_be_bytes(),
            span_id,
            flags,
            tracestate: tracestate(),
        })
    }

    /// The trace id.
    pub fn trace_id(&self) -> u128 {
        u128::from_be_bytes(self.trace_id)
    }

    /// The trace id as 32 lowercase hex digits (as trace viewers show it).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id())
    }

    /// The id of the parent span.
    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    /// Whether the trace is sampled (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The vendor-specific `tracestate`, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The same context with this `tracestate`.
    pub fn with_tracestate(mut self, tracestate: impl Into<String>) -> Self {
        let s = tracestate.into();
        self.tracestate = (!s.is_empty()).then(|| s.into_boxed_str());
        self
    }

    /// The `traceparent` header value (version 00).
    pub fn traceparent(&self) -> String {
        self.traceparent_buf().as_str().to_owned()
    }

    /// [`Self::traceparent`] without an allocation.
    pub(crate) fn traceparent_buf(&self) -> Traceparent {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let trace_id = self.trace_id();
        put_hex(&mut out[3..19], (trace_id >> 64) as u64);
        put_hex(&mut out[19..35], trace_id as u64);
        put_hex(&mut out[36..52], self.span_id);
        put_hex(&mut out[53..55], u64::from(self.flags));
        Traceparent(out)
    }

    /// The binary form a store keeps in a column of its own: the trace id
    /// (16 bytes, big-endian), the parent id (8), the flags (1), then the
    /// `tracestate` as UTF-8.
    pub(crate) fn write_bytes(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.trace_id);
        out.extend_from_slice(&self.span_id.to_be_bytes());
        out.push(self.flags);
        if let Some(state) = &self.tracestate {
            out.extend_from_slice(state.as_bytes());
        }
    }

    /// Reads [`Self::write_bytes`]; the error says what is wrong.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, &'static str> {
        let Some((ids, state)) = bytes.split_first_chunk::<25>() else {
            return Err("shorter than the 25 bytes of trace id, parent id and flags");
        };
        let (trace_id, rest) = ids.split_first_chunk::<16>().ok_or("unreachable")?;
        let (span_id, flags) = rest.split_first_chunk::<8>().ok_or("unreachable")?;
        let span_id = u64::from_be_bytes(*span_id);
        if span_id == 0 || *trace_id == [0; 16] {
            return Err("an id is zero");
        }
        let tracestate = if state.is_empty() {
            None
        } else {
            let state = std::str::from_utf8(state).map_err(|_| "the tracestate is not UTF-8")?;
            Some(Box::from(state))
        };
        Ok(TraceContext {
            trace_id: *trace_id,
            span_id,
            flags: flags[0],
            tracestate,
        })
    }

    /// The context a stored `traceparent` (and `tracestate`) hold, when
    /// they are exactly what [`Self::traceparent`] and [`Self::tracestate`]
    /// give back: a version-00 value without surrounding whitespace, and a
    /// non-empty, trimmed state. Anything else is left to the application
    /// as it was written (lifting it would rewrite it).
    pub(crate) fn from_stored(parent: &str, state: Option<&str>) -> Option<Self> {
        let b = parent.as_bytes();
        if b.len() != TRACEPARENT_LEN || !b.starts_with(b"00-") {
            return None;
        }
        let (trace_id, span_id, flags) = parse_well_formed(b)?;
        let tracestate = match state {
            None => None,
            Some(s) if !s.is_empty() && s.trim() == s => Some(Box::from(s)),
            Some(_) => return None,
        };
        Some(TraceContext {
            trace_id: trace_id.to_be_bytes(),
            span_id,
            flags,
            tracestate,
        })
    }

    /// Takes a context out of an `extra` map (the [`TRACEPARENT`] and
    /// [`TRACESTATE`] keys, removed) when [`Self::from_stored`] reads one;
    /// anything else stays where it is.
    pub(crate) fn take_from_extra(extra: &mut BTreeMap<String, String>) -> Option<Self> {
        let parent = extra.get(TRACEPARENT)?;
        let ctx = Self::from_stored(parent, extra.get(TRACESTATE).map(String::as_str))?;
        extra.remove(TRACEPARENT);
        extra.remove(TRACESTATE);
        Some(ctx)
    }

    /// The context of the work running now: with feature `otel`, the
    /// current OpenTelemetry span's (when a `tracing-opentelemetry` layer
    /// is installed and the span is valid); otherwise the context of the
    /// event aftermath is handling on this task, if it carried one.
    pub fn current() -> Option<Self> {
        let ambient = AMBIENT.try_with(Clone::clone).ok();
        // A handling span filtered out (a DEBUG apply span under an INFO
        // filter) is not current in OpenTelemetry's eyes: its enclosing
        // page span is. The event's own context is the right one then.
        if let Some(Ambient { ctx, pinned: true }) = ambient {
            return ctx;
        }
        #[cfg(feature = "otel")]
        if let Some(ctx) = otel::current() {
            return Some(ctx);
        }
        ambient.and_then(|a| a.ctx)
    }
}

/// A formatted `traceparent` on the stack (ASCII by construction).
pub(crate) struct Traceparent([u8; TRACEPARENT_LEN]);

impl Traceparent {
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.traceparent_buf().as_str())
    }
}

/// The trace context of the event being handled on this task; `pinned`
/// when its span is disabled, so the context must not come from an
/// enclosing span.
#[derive(Clone)]
struct Ambient {
    ctx: Option<TraceContext>,
    pinned: bool,
}

tokio::task_local! {
    static AMBIENT: Ambient;
}

/// Sets the context of `metadata` for new events: an explicit one wins
/// (already in `trace`, or given as `traceparent` in `extra`), else the
/// current one ([`TraceContext::current`]). An explicit `traceparent` that
/// [`TraceContext::from_stored`] does not read stays in `extra` as given,
/// and no context is added to it.
pub(crate) fn inject_current(metadata: &mut Metadata) {
    metadata.normalize_trace();
    if metadata.trace.is_none() && !metadata.extra.contains_key(TRACEPARENT) {
        metadata.trace = TraceContext::current();
    }
}

/// Runs `fut` inside `span`, continuing `parent`: with `otel`, the span's
/// parent is `parent`'s span (none: the span starts a trace); on every build, work inside sees `parent` as
/// [`TraceContext::current`] (unless an OpenTelemetry span overrides it).
pub(crate) async fn continue_in<F: Future>(
    span: tracing::Span,
    parent: Option<TraceContext>,
    fut: F,
) -> F::Output {
    // An event without a context starts a trace of its own rather than
    // joining the page's (which mixes unrelated events).
    let pinned = span.is_disabled();
    // A disabled span (a filtered DEBUG apply span) exports nothing: no
    // parent to set, the task-local below carries the context on.
    #[cfg(feature = "otel")]
    if !pinned {
        otel::set_parent(&span, parent.as_ref());
    }
    let ambient = Ambient {
        ctx: parent,
        pinned,
    };
    AMBIENT.scope(ambient, fut.instrument(span)).await
}

/// The span of one event handled by `subscriber` (see the module docs).
pub(crate) fn handle_span(
    subscriber: &str,
    event_type: &str,
    id: uuid::Uuid,
    stream: &str,
    position: crate::event::Position,
) -> tracing::Span {
    tracing::info_span!(
        "aftermath.handle",
        otel.name = %format_args!("process {event_type}"),
        otel.kind = "consumer",
        messaging.system = "aftermath",
        messaging.operation.type = "process",
        messaging.consumer.group.name = %subscriber,
        messaging.message.id = %id,
        messaging.destination.name = %stream,
        aftermath.position = position.0,
    )
}

/// [`handle_span`] at DEBUG level: a projection's apply of one event (one
/// per event of a catch-up, so below the usual INFO filter of an exporting
/// layer; the page span stays at INFO).
pub(crate) fn apply_span(
    subscriber: &str,
    event_type: &str,
    id: uuid::Uuid,
    stream: &str,
    position: crate::event::Position,
) -> tracing::Span {
    tracing::debug_span!(
        "aftermath.handle",
        otel.name = %format_args!("process {event_type}"),
        otel.kind = "consumer",
        messaging.system = "aftermath",
        messaging.operation.type = "process",
        messaging.consumer.group.name = %subscriber,
        messaging.message.id = %id,
        messaging.destination.name = %stream,
        aftermath.position = position.0,
    )
}

/// Runs `fut` with `ctx` as the current trace context: commands it
/// executes store `ctx` with their events (unless an OpenTelemetry span is
/// current, see [`TraceContext::current`]). For an application without
/// OpenTelemetry that received a `traceparent` and runs several commands.
///
/// ```
/// # tokio_test_block_on(async {
/// use aftermath::trace::{TraceContext, with_context};
///
/// let incoming = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).unwrap();
/// let seen = with_context(Some(incoming.clone()), async { TraceContext::current() }).await;
/// assert_eq!(seen, Some(incoming));
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
pub async fn with_context<F: Future>(ctx: Option<TraceContext>, fut: F) -> F::Output {
    AMBIENT.scope(Ambient { ctx, pinned: false }, fut).await
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    pub(super) fn current() -> Option<TraceContext> {
        let cx = tracing::Span::current().context();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        Some(TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
            tracestate: (!state.is_empty()).then(|| state.into_boxed_str()),
        })
    }

    pub(super) fn set_parent(span: &tracing::Span, parent: Option<&TraceContext>) {
        let Some(parent) = parent else {
            #[allow(clippy::let_unit_value, unused_must_use)]
            {
                let _ = span.set_parent(opentelemetry::Context::new());
            }
            return;
        };
        let state = parent
            .tracestate()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let sc = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.span_id.to_be_bytes()),
            TraceFlags::new(parent.flags),
            true,
            state,
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        #[allow(clippy::let_unit_value, unused_must_use)]
        {
            let _ = span.set_parent(cx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(value, Some("vendor=1")).unwrap();
        assert_eq!(ctx.traceparent(), value);
        assert!(ctx.sampled());
        assert_eq!(ctx.tracestate(), Some("vendor=1"));
        let mut extra = BTreeMap::new();
        extra.insert(TRACEPARENT.to_owned(), value.to_owned());
        extra.insert(TRACESTATE.to_owned(), "vendor=1".to_owned());
        extra.insert("user".to_owned(), "ann".to_owned());
        assert_eq!(TraceContext::take_from_extra(&mut extra), Some(ctx.clone()));
        assert_eq!(extra.keys().collect::<Vec<_>>(), ["user"]);
        // The binary column form round-trips, with and without a state.
        for ctx in [ctx.clone(), TraceContext::new(3, 4, false).unwrap()] {
            let mut bytes = Vec::new();
            ctx.write_bytes(&mut bytes);
            assert_eq!(TraceContext::from_bytes(&bytes), Ok(ctx));
        }
        assert!(TraceContext::from_bytes(&[1; 24]).is_err());
        assert!(TraceContext::from_bytes(&[0; 25]).is_err());
        // Formatting and the one-pass parse agree with the field-by-field
        // parse (reached here through the surrounding whitespace).
        for (trace_id, span_id, sampled) in [
            (1, 1, false),
            (u128::MAX, u64::MAX, true),
            (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, true),
        ] {
            let ctx = TraceContext::new(trace_id, span_id, sampled).unwrap();
            let value = ctx.traceparent();
            assert_eq!(value.len(), TRACEPARENT_LEN);
            assert_eq!(
                value,
                format!(
                    "00-{trace_id:032x}-{span_id:016x}-{:02x}",
                    u8::from(sampled)
                )
            );
            assert_eq!(TraceContext::parse(&value, None).unwrap(), ctx);
            assert_eq!(
                TraceContext::parse(&format!(" {value} "), None).unwrap(),
                ctx
            );
        }
    }

    #[test]
    fn malformed_traceparents_are_refused_with_the_reason() {
        for (value, reason) in [
            ("", "the version is not 2 hex digits"),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff is invalid",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "the trace id is not 32 lowercase hex digits",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "the trace id is all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "the parent id is all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "the flags are not 2 hex digits",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                "version 00 has exactly four fields",
            ),
        ] {
            let err = TraceContext::parse(value, None).unwrap_err();
            assert_eq!(err.reason, reason, "{value}");
        }
        // A later version may carry more fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(TraceContext::parse(later, None).is_ok());
    }

    #[test]
    fn only_a_context_s_exact_stored_form_leaves_extra() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for (parent, state) in [
            ("garbage", None),
            (
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                None,
            ),
            (value, Some("")),
            (value, Some(" v=1")),
        ] {
            let mut extra = BTreeMap::new();
            extra.insert(TRACEPARENT.to_owned(), parent.to_owned());
            if let Some(state) = state {
                extra.insert(TRACESTATE.to_owned(), state.to_owned());
            }
            let before = extra.clone();
            assert_eq!(
                TraceContext::take_from_extra(&mut extra),
                None,
                "{parent:?} {state:?}"
            );
            assert_eq!(extra, before);
        }
        let ctx = TraceContext::from_stored(value, Some("v=1")).unwrap();
        assert_eq!(
            (ctx.traceparent().as_str(), ctx.tracestate()),
            (value, Some("v=1"))
        );
    }

    #[test]
    fn the_hex_table_reads_lowercase_digits_only() {
        for b in 0..=255u8 {
            let want = match b {
                b'0'..=b'9' => Some(u64::from(b - b'0')),
                b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
                _ => None,
            };
            assert_eq!(hex_value(&[b]), want, "byte {b}");
            assert_eq!(
                hex_value(&[b'1', b, b'f']),
                want.map(|d| 0x100 | d << 4 | 0xf)
            );
        }
        assert_eq!(hex_value(b"ffffffffffffffff"), Some(u64::MAX));
    }

    #[test]
    fn the_binary_form_refuses_what_it_cannot_hold() {
        let mut bytes = Vec::new();
        TraceContext::new(3, 4, true)
            .unwrap()
            .write_bytes(&mut bytes);
        bytes.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(
            TraceContext::from_bytes(&bytes),
            Err("the tracestate is not UTF-8")
        );
    }

    #[tokio::test]
    async fn the_handled_event_s_context_is_current_on_its_task() {
        let ctx = TraceContext::new(7, 9, true).unwrap();
        assert_eq!(TraceContext::current(), None);
        let seen = with_context(Some(ctx.clone()), async { TraceContext::current() }).await;
        assert_eq!(seen, Some(ctx.clone()));
        let mut meta = Metadata::caused_by(uuid::Uuid::nil());
        with_context(Some(ctx.clone()), async { inject_current(&mut meta) }).await;
        assert_eq!(meta.trace, Some(ctx.clone()));
        // An explicit context wins over the current one.
        let explicit = TraceContext::new(8, 10, false).unwrap();
        let mut meta = Metadata::caused_by(uuid::Uuid::nil());
        meta.extra
            .insert(TRACEPARENT.to_owned(), explicit.traceparent());
        with_context(Some(ctx.clone()), async { inject_current(&mut meta) }).await;
        assert_eq!(meta.trace, Some(explicit.clone()));
        assert!(meta.extra.is_empty());
        // An explicit typed context: stale keys of `extra` give way to it.
        let mut meta = Metadata::caused_by(uuid::Uuid::nil());
        meta.trace = Some(explicit.clone());
        meta.extra
            .insert(TRACEPARENT.to_owned(), "stale".to_owned());
        meta.extra.insert(TRACESTATE.to_owned(), "stale".to_owned());
        with_context(Some(ctx.clone()), async { inject_current(&mut meta) }).await;
        assert_eq!(meta.trace, Some(explicit));
        assert!(meta.extra.is_empty());
        // An explicit `traceparent` the stores would not read as a context
        // stays as given, and no other context is added.
        let mut meta = Metadata::caused_by(uuid::Uuid::nil());
        meta.extra
            .insert(TRACEPARENT.to_owned(), "garbage".to_owned());
        with_context(Some(ctx), async { inject_current(&mut meta) }).await;
        assert_eq!(meta.trace, None);
        assert_eq!(meta.extra[TRACEPARENT], "garbage");
    }
}
