//! [`Metadata`] as JSON, written by hand rather than derived: the trace
//! context is kept as the `traceparent` / `tracestate` keys of the `extra`
//! map (the format every store has always held), but read into the typed
//! [`Metadata::trace`] without building a map entry for it. Every handled
//! event is read this way, so the read borrows its strings from the input
//! where it can and allocates only for the application's own keys.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use super::Metadata;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let with_extra = self.trace.is_some() || !self.extra.is_empty();
        let mut out = serializer.serialize_struct("Metadata", 2 + usize::from(with_extra))?;
        out.serialize_field("correlation_id", &self.correlation_id)?;
        out.serialize_field("causation_id", &self.causation_id)?;
        if with_extra {
            out.serialize_field(
                "extra",
                &ExtraOut {
                    meta: self,
                    with_trace: true,
                },
            )?;
        } else {
            out.skip_field("extra")?;
        }
        out.end()
    }
}

/// Whether `key` of `extra` yields to the typed context (which owns the
/// trace keys when it is set).
fn owned_by_trace(metadata: &Metadata, key: &str) -> bool {
    metadata.trace.is_some() && (key == TRACEPARENT || key == TRACESTATE)
}

/// `extra`, with the trace context's keys when `with_trace` (they replace
/// any of the same name in the map: the typed context owns them).
struct ExtraOut<'a> {
    meta: &'a Metadata,
    with_trace: bool,
}

impl Serialize for ExtraOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Metadata { trace, extra, .. } = self.meta;
        let mut out = serializer.serialize_map(None)?;
        for (key, value) in extra {
            if owned_by_trace(self.meta, key) {
                continue;
            }
            out.serialize_entry(key, value)?;
        }
        if let Some(trace) = trace.as_ref().filter(|_| self.with_trace) {
            out.serialize_entry(TRACEPARENT, &trace.traceparent_buf().as_str())?;
            if let Some(state) = trace.tracestate() {
                out.serialize_entry(TRACESTATE, state)?;
            }
        }
        out.end()
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const FIELDS: &[&str] = &["correlation_id", "causation_id", "extra"];
        deserializer.deserialize_struct("Metadata", FIELDS, MetadataVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    CorrelationId,
    CausationId,
    Extra,
    #[serde(other)]
    Other,
}

struct MetadataVisitor;

impl<'de> Visitor<'de> for MetadataVisitor {
    type Value = Metadata;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("event metadata (a map with `correlation_id` and `causation_id`)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
        let mut correlation_id: Option<Uuid> = None;
        let mut causation_id: Option<Uuid> = None;
        let mut extra: Option<ExtraIn> = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::CorrelationId if correlation_id.is_some() => {
                    return Err(de::Error::duplicate_field("correlation_id"));
                }
                Field::CorrelationId => correlation_id = Some(map.next_value()?),
                Field::CausationId if causation_id.is_some() => {
                    return Err(de::Error::duplicate_field("causation_id"));
                }
                Field::CausationId => causation_id = Some(map.next_value()?),
                Field::Extra if extra.is_some() => {
                    return Err(de::Error::duplicate_field("extra"));
                }
                Field::Extra => extra = Some(map.next_value()?),
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let ExtraIn { extra, trace } = extra.unwrap_or_default();
        Ok(Metadata {
            correlation_id: correlation_id
                .ok_or_else(|| de::Error::missing_field("correlation_id"))?,
            causation_id: causation_id.ok_or_else(|| de::Error::missing_field("causation_id"))?,
            trace,
            extra,
        })
    }
}

/// The `extra` map as read: the application's keys, and the trace context
/// when its keys hold a valid one.
#[derive(Default)]
struct ExtraIn {
    extra: BTreeMap<String, String>,
    trace: Option<TraceContext>,
}

impl<'de> Deserialize<'de> for ExtraIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ExtraVisitor)
    }
}

struct ExtraVisitor;

impl<'de> Visitor<'de> for ExtraVisitor {
    type Value = ExtraIn;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ExtraIn, A::Error> {
        let mut extra = BTreeMap::new();
        let (mut parent, mut state) = (None, None);
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let value = map.next_value::<Text<'de>>()?;
            match key.as_str() {
                TRACEPARENT => parent = Some(value),
                TRACESTATE => state = Some(value),
                _ => {
                    extra.insert(key.into_owned(), value.into_owned());
                }
            }
        }
        let trace = match parent {
            None => None,
            Some(parent) => {
                match TraceContext::from_stored(parent.as_str(), state.as_ref().map(Text::as_str)) {
                    Some(trace) => {
                        state = None;
                        Some(trace)
                    }
                    // Kept as stored: a foreign writer's value is the
                    // application's data, not a reason to fail the read.
                    None => {
                        extra.insert(TRACEPARENT.to_owned(), parent.into_owned());
                        None
                    }
                }
            }
        };
        if let Some(state) = state {
            extra.insert(TRACESTATE.to_owned(), state.into_owned());
        }
        Ok(ExtraIn { extra, trace })
    }
}

/// A string borrowed from the input when it has no escapes.
enum Text<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Owned(s) => s,
        }
    }

    fn into_owned(self) -> String {
        match self {
            Text::Borrowed(s) => s.to_owned(),
            Text::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text::Owned(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text::Owned(v))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// Reads a stored `extra` map, or JSON `null` for none (a store that keeps
/// the ids in columns of their own reads only this part of the metadata).
pub(crate) fn extra_from_json(
    json: &str,
) -> Result<(BTreeMap<String, String>, Option<TraceContext>), serde_json::Error> {
    let ExtraIn { extra, trace } =
        serde_json::from_str::<Option<ExtraIn>>(json)?.unwrap_or_default();
    Ok((extra, trace))
}

/// The metadata JSON of a store that keeps the ids and the trace context
/// in columns of their own: `{}`, or `{"extra":{..}}` with the
/// application's keys.
pub(crate) fn write_extra_only(metadata: &Metadata, out: &mut Vec<u8>) -> serde_json::Result<()> {
    if metadata
        .extra
        .keys()
        .all(|key| owned_by_trace(metadata, key))
    {
        out.extend_from_slice(b"{}");
        return Ok(());
    }
    struct Only<'a>(ExtraOut<'a>);
    impl Serialize for Only<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut out = serializer.serialize_map(Some(1))?;
            out.serialize_entry("extra", &self.0)?;
            out.end()
        }
    }
    serde_json::to_writer(
        out,
        &Only(ExtraOut {
            meta: metadata,
            with_trace: false,
        }),
    )
}

/// Reads the metadata JSON of such a store: [`write_extra_only`]'s, or a
/// whole [`Metadata`] as older rows hold it (its ids are skipped: the
/// columns have them). Returns the `extra` map and a trace context found
/// in it.
pub(crate) fn extra_of_stored(
    json: &[u8],
) -> serde_json::Result<(BTreeMap<String, String>, Option<TraceContext>)> {
    if json == b"{}" {
        return Ok(Default::default());
    }
    struct Rest;
    impl<'de> Visitor<'de> for Rest {
        type Value = Option<ExtraIn>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("event metadata (a map)")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<ExtraIn>, A::Error> {
            let mut extra = None;
            while let Some(key) = map.next_key::<Text<'de>>()? {
                if key.as_str() == "extra" {
                    extra = map.next_value()?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(extra)
        }
    }
    let mut input = serde_json::Deserializer::from_slice(json);
    let extra = (&mut input).deserialize_map(Rest)?;
    input.end()?;
    let ExtraIn { extra, trace } = extra.unwrap_or_default();
    Ok((extra, trace))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn meta() -> Metadata {
        Metadata::caused_by(Uuid::from_u128(7))
    }

    #[test]
    fn without_trace_or_extra_the_json_has_the_ids_only() {
        let json = serde_json::to_string(&meta()).unwrap();
        assert_eq!(
            json,
            r#"{"correlation_id":"00000000-0000-0000-0000-000000000007","causation_id":"00000000-0000-0000-0000-000000000007"}"#
        );
        assert_eq!(serde_json::from_str::<Metadata>(&json).unwrap(), meta());
    }

    #[test]
    fn the_trace_round_trips_through_the_extra_keys() {
        let mut m = meta();
        m.trace = Some(
            TraceContext::parse(PARENT, None)
                .unwrap()
                .with_tracestate("vendor=1"),
        );
        m.extra.insert("user".into(), "ann".into());
        // A stale key of the same name in the map yields to the context.
        m.extra.insert(TRACEPARENT.into(), "stale".into());
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json["extra"],
            serde_json::json!({"user": "ann", "traceparent": PARENT, "tracestate": "vendor=1"})
        );
        let back: Metadata = serde_json::from_value(json).unwrap();
        assert_eq!(back.trace, m.trace);
        assert_eq!(back.extra.len(), 1, "{:?}", back.extra);
        assert_eq!(back.extra["user"], "ann");
    }

    #[test]
    fn a_malformed_or_lone_trace_key_stays_in_extra() {
        let json = r#"{"correlation_id":"00000000-0000-0000-0000-000000000007",
            "causation_id":"00000000-0000-0000-0000-000000000007",
            "extra":{"traceparent":"garbage","tracestate":"a=b"}}"#;
        let m: Metadata = serde_json::from_str(json).unwrap();
        assert_eq!(m.trace, None);
        assert_eq!(m.extra["traceparent"], "garbage");
        assert_eq!(m.extra["tracestate"], "a=b");

        let (extra, trace) = extra_from_json(r#"{"tracestate":"a=b"}"#).unwrap();
        assert_eq!(trace, None);
        assert_eq!(extra["tracestate"], "a=b");
        let (extra, trace) = extra_from_json("null").unwrap();
        assert!(extra.is_empty() && trace.is_none());
    }

    #[test]
    fn escaped_strings_and_unknown_fields_are_read() {
        let json = r#"{"causation_id":"00000000-0000-0000-0000-000000000007","future":[1,2],
            "correlation_id":"00000000-0000-0000-0000-000000000007",
            "extra":{"k\u00e9y":"va\"lue","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u0031"}}"#;
        let m: Metadata = serde_json::from_str(json).unwrap();
        assert_eq!(m.extra["kéy"], "va\"lue");
        assert_eq!(m.trace, Some(TraceContext::parse(PARENT, None).unwrap()));
    }

    #[test]
    fn the_extra_only_form_leaves_ids_and_trace_to_the_columns() {
        let mut m = meta();
        let mut out = Vec::new();
        write_extra_only(&m, &mut out).unwrap();
        assert_eq!(out, b"{}");
        m.trace = Some(TraceContext::parse(PARENT, None).unwrap());
        m.extra.insert(TRACEPARENT.into(), "stale".into());
        out.clear();
        write_extra_only(&m, &mut out).unwrap();
        assert_eq!(out, b"{}", "the context's own keys are not written");
        m.extra.insert("user".into(), "ann".into());
        out.clear();
        write_extra_only(&m, &mut out).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"extra":{"user":"ann"}}"#
        );
        let (extra, trace) = extra_of_stored(&out).unwrap();
        assert_eq!((extra.len(), trace), (1, None));
        assert_eq!(extra["user"], "ann");
        // A whole Metadata, as rows written before hold it.
        let whole = serde_json::to_vec(&m).unwrap();
        let (extra, trace) = extra_of_stored(&whole).unwrap();
        assert_eq!(trace, m.trace);
        assert_eq!(extra.len(), 1);
        assert!(extra_of_stored(br#"{"extra":{"n":1}}"#).is_err());
        assert!(extra_of_stored(b"[]").is_err());
        assert!(extra_of_stored(b"{} x").is_err());
    }

    #[test]
    fn bad_metadata_is_refused_with_what_is_wrong() {
        let missing = serde_json::from_str::<Metadata>(
            r#"{"correlation_id":"00000000-0000-0000-0000-000000000007"}"#,
        )
        .unwrap_err();
        assert!(
            missing.to_string().contains("missing field `causation_id`"),
            "{missing}"
        );
        let not_strings = serde_json::from_str::<Metadata>(
            r#"{"correlation_id":"00000000-0000-0000-0000-000000000007",
                "causation_id":"00000000-0000-0000-0000-000000000007","extra":{"n":1}}"#,
        )
        .unwrap_err();
        assert!(
            not_strings.to_string().contains("expected a string"),
            "{not_strings}"
        );
        let twice = serde_json::from_str::<Metadata>(
            r#"{"correlation_id":"00000000-0000-0000-0000-000000000007",
                "correlation_id":"00000000-0000-0000-0000-000000000007"}"#,
        )
        .unwrap_err();
        assert!(
            twice
                .to_string()
                .contains("duplicate field `correlation_id`"),
            "{twice}"
        );
    }
}
