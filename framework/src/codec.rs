//! Payload codec behind `#[derive(Event)]`.
//!
//! An event enum stores only the *content* of its variant as JSON; the type
//! name travels beside it. Rather than serializing the whole enum (which
//! serde writes as `{"Variant": content}`) and then picking it apart through
//! a `serde_json::Value`, both directions run the enum's own serde impls
//! against thin adapters that talk to `serde_json` directly:
//!
//! - [`encode_variant`] hands the enum a [`Serializer`] that accepts only
//!   the four `serialize_*_variant` calls of serde's default, externally
//!   tagged representation, and writes the variant's content (and nothing
//!   else) straight into a `serde_json::Serializer` over a `Vec<u8>`.
//! - [`decode_variant`] hands the enum a [`Deserializer`] that accepts only
//!   `deserialize_enum`. It names the variant by its *index* (which serde's
//!   derived variant identifiers accept as `visit_u64`), so
//!   `#[serde(rename)]`/`rename_all` on variants cannot confuse it, and lets
//!   the variant read its content from a `serde_json::Deserializer` over the
//!   payload bytes, then rejects trailing bytes.
//!
//! Field-level serde attributes keep working because the user's own derived
//! impls do all the field work. Any other serde call means the enum does not
//! use the externally tagged representation and fails with
//! [`NOT_EXTERNALLY_TAGGED`].
//!
//! [`Serializer`]: serde::Serializer
//! [`Deserializer`]: serde::Deserializer

use std::fmt::Display;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde::ser::{self, Impossible, Serialize};

use crate::event::{EncodeError, PayloadError};

type JsonSerializer = serde_json::Serializer<Vec<u8>>;
type JsonDeserializer<'de> = serde_json::Deserializer<serde_json::de::SliceRead<'de>>;
type Compound<'a> = serde_json::ser::Compound<'a, Vec<u8>, serde_json::ser::CompactFormatter>;

/// Start of the error raised when an event enum's serde impls do not use
/// serde's default, externally tagged enum representation.
pub(crate) const NOT_EXTERNALLY_TAGGED: &str = "#[derive(Event)] enums must use serde's default externally tagged \
     representation (no #[serde(tag)], #[serde(content)], #[serde(untagged)], \
     #[serde(from/into)] or hand-written serde impls that are not enums)";

/// Initial capacity of an encoded payload: most events are small objects.
const INITIAL_CAPACITY: usize = 128;

/// Encodes only the content of the enum variant `value` is: the inner value
/// of a newtype variant, an object of the fields of a struct variant, an
/// array of the fields of a tuple variant, `null` for a unit variant.
///
/// `event_type` only labels the error.
pub fn encode_variant<T>(value: &T, event_type: &'static str) -> Result<Vec<u8>, EncodeError>
where
    T: Serialize + ?Sized,
{
    let mut json = serde_json::Serializer::new(Vec::with_capacity(INITIAL_CAPACITY));
    match value.serialize(VariantContent(&mut json)) {
        Ok(()) => Ok(json.into_inner()),
        Err(error) => Err(EncodeError {
            event_type: event_type.to_owned(),
            message: error.to_string(),
        }),
    }
}

/// Decodes `payload` as the content of the variant of `T` that serde's
/// derived `Deserialize` numbers `variant_index` (declaration order, counting
/// only variants serde deserializes), rejecting trailing bytes.
///
/// `event_type` only labels the error.
pub fn decode_variant<T>(
    variant_index: u32,
    payload: &[u8],
    event_type: &str,
) -> Result<T, PayloadError>
where
    T: DeserializeOwned,
{
    let mut json = serde_json::Deserializer::from_slice(payload);
    T::deserialize(VariantDeserializer {
        index: variant_index,
        json: &mut json,
    })
    .and_then(|value| json.end().map(|()| value))
    .map_err(|error| PayloadError {
        event_type: event_type.to_owned(),
        message: error.to_string(),
    })
}

fn not_externally_tagged<E: Display + ?Sized>(call: &E) -> serde_json::Error {
    ser::Error::custom(format_args!("{NOT_EXTERNALLY_TAGGED}; got {call}"))
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// A serializer for an event enum value: writes its variant's content.
struct VariantContent<'a>(&'a mut JsonSerializer);

/// Content of a tuple variant: a JSON array of its fields.
struct TupleContent<'a>(Compound<'a>);

/// Content of a struct variant: a JSON object of its fields.
struct StructContent<'a>(Compound<'a>);

macro_rules! reject_serialize {
    ($($method:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(
            fn $method(self, $(_: $ty),*) -> Result<$ret, serde_json::Error> {
                Err(not_externally_tagged(concat!("a call to Serializer::", stringify!($method))))
            }
        )*
    };
}

impl<'a> ser::Serializer for VariantContent<'a> {
    type Ok = ();
    type Error = serde_json::Error;
    type SerializeSeq = Impossible<(), serde_json::Error>;
    type SerializeTuple = Impossible<(), serde_json::Error>;
    type SerializeTupleStruct = Impossible<(), serde_json::Error>;
    type SerializeTupleVariant = TupleContent<'a>;
    type SerializeMap = Impossible<(), serde_json::Error>;
    type SerializeStruct = Impossible<(), serde_json::Error>;
    type SerializeStructVariant = StructContent<'a>;

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
    ) -> Result<(), serde_json::Error> {
        ser::Serializer::serialize_unit(self.0)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        value.serialize(self.0)
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        len: usize,
    ) -> Result<TupleContent<'a>, serde_json::Error> {
        ser::Serializer::serialize_tuple(self.0, len).map(TupleContent)
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        len: usize,
    ) -> Result<StructContent<'a>, serde_json::Error> {
        ser::Serializer::serialize_struct(self.0, name, len).map(StructContent)
    }

    reject_serialize! {
        serialize_bool(v: bool) -> ();
        serialize_i8(v: i8) -> ();
        serialize_i16(v: i16) -> ();
        serialize_i32(v: i32) -> ();
        serialize_i64(v: i64) -> ();
        serialize_i128(v: i128) -> ();
        serialize_u8(v: u8) -> ();
        serialize_u16(v: u16) -> ();
        serialize_u32(v: u32) -> ();
        serialize_u64(v: u64) -> ();
        serialize_u128(v: u128) -> ();
        serialize_f32(v: f32) -> ();
        serialize_f64(v: f64) -> ();
        serialize_char(v: char) -> ();
        serialize_str(v: &str) -> ();
        serialize_bytes(v: &[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(name: &'static str) -> ();
        serialize_seq(len: Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(len: usize) -> Self::SerializeTuple;
        serialize_tuple_struct(name: &'static str, len: usize) -> Self::SerializeTupleStruct;
        serialize_map(len: Option<usize>) -> Self::SerializeMap;
        serialize_struct(name: &'static str, len: usize) -> Self::SerializeStruct;
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<(), serde_json::Error> {
        Err(not_externally_tagged(
            "a call to Serializer::serialize_some",
        ))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _value: &T,
    ) -> Result<(), serde_json::Error> {
        Err(not_externally_tagged(
            "a call to Serializer::serialize_newtype_struct",
        ))
    }
}

impl ser::SerializeTupleVariant for TupleContent<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        ser::SerializeTuple::serialize_element(&mut self.0, value)
    }

    fn end(self) -> Result<(), serde_json::Error> {
        ser::SerializeTuple::end(self.0)
    }
}

impl ser::SerializeStructVariant for StructContent<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        ser::SerializeStruct::serialize_field(&mut self.0, key, value)
    }

    fn skip_field(&mut self, key: &'static str) -> Result<(), serde_json::Error> {
        ser::SerializeStruct::skip_field(&mut self.0, key)
    }

    fn end(self) -> Result<(), serde_json::Error> {
        ser::SerializeStruct::end(self.0)
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// A deserializer for an event enum: the variant is already chosen (by
/// index), its content is the JSON payload.
struct VariantDeserializer<'a, 'de> {
    index: u32,
    json: &'a mut JsonDeserializer<'de>,
}

impl<'de> de::Deserializer<'de> for VariantDeserializer<'_, 'de> {
    type Error = serde_json::Error;

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, serde_json::Error> {
        Err(not_externally_tagged(
            "a Deserialize impl that does not ask for an enum",
        ))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'a, 'de> de::EnumAccess<'de> for VariantDeserializer<'a, 'de> {
    type Error = serde_json::Error;
    type Variant = VariantContentAccess<'a, 'de>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), serde_json::Error> {
        let index: de::value::U32Deserializer<serde_json::Error> = self.index.into_deserializer();
        let variant = seed.deserialize(index)?;
        Ok((variant, VariantContentAccess(self.json)))
    }
}

/// The chosen variant's content, read from the JSON payload.
struct VariantContentAccess<'a, 'de>(&'a mut JsonDeserializer<'de>);

impl<'de> de::VariantAccess<'de> for VariantContentAccess<'_, 'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), serde_json::Error> {
        de::Deserialize::deserialize(self.0)
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, serde_json::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        de::Deserializer::deserialize_seq(self.0, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        de::Deserializer::deserialize_struct(self.0, "", fields, visitor)
    }
}

// ---------------------------------------------------------------------------
// Compile-time support for `#[derive(EventUnion)]`: the joined type-name list
// and the check that no two members decode the same name.
// ---------------------------------------------------------------------------

/// The members' type-name lists joined in order; `N` is their total length.
pub const fn concat_types<const N: usize>(parts: &[&[&'static str]]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut at = 0;
    let mut part = 0;
    while part < parts.len() {
        let mut i = 0;
        while i < parts[part].len() {
            out[at] = parts[part][i];
            at += 1;
            i += 1;
        }
        part += 1;
    }
    out
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Appends `text` to the message in `buf` (cut off at `N` bytes).
const fn push<const N: usize>(buf: &mut [u8; N], mut len: usize, text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() && len < N {
        buf[len] = bytes[i];
        len += 1;
        i += 1;
    }
    len
}

/// The first type name two members of union `union` both decode, as an
/// error message in a buffer (`(buf, 0)` when there is none). `members` are
/// (variant and type as written, the member's `EVENT_TYPES`).
pub const fn union_collision<const N: usize>(
    union: &str,
    members: &[(&str, &[&'static str])],
) -> ([u8; N], usize) {
    let mut buf = [0u8; N];
    let mut a = 0;
    while a < members.len() {
        let mut b = a + 1;
        while b < members.len() {
            let mut i = 0;
            while i < members[a].1.len() {
                let mut j = 0;
                while j < members[b].1.len() {
                    if same(members[a].1[i], members[b].1[j]) {
                        let mut len = push(&mut buf, 0, "event type name `");
                        len = push(&mut buf, len, members[a].1[i]);
                        len = push(&mut buf, len, "` is decoded by two members of `");
                        len = push(&mut buf, len, union);
                        len = push(&mut buf, len, "`: ");
                        len = push(&mut buf, len, members[a].0);
                        len = push(&mut buf, len, " and ");
                        len = push(&mut buf, len, members[b].0);
                        len = push(
                            &mut buf,
                            len,
                            "; a reader of the union could not tell whose event it is, so give \
                             one of the enums another #[event(prefix = \"..\")] (or the variant \
                             another #[event(name = \"..\")])",
                        );
                        return (buf, len);
                    }
                    j += 1;
                }
                i += 1;
            }
            b += 1;
        }
        a += 1;
    }
    (buf, 0)
}

/// The message [`union_collision`] wrote.
pub const fn collision_message<const N: usize>(buf: &[u8; N], len: usize) -> &str {
    let (bytes, _) = buf.split_at(len);
    match std::str::from_utf8(bytes) {
        Ok(message) => message,
        Err(_) => "two members of a #[derive(EventUnion)] enum decode the same event type name",
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shapes {
        Unit,
        Newtype(u32),
        Tuple(u8, String),
        Struct { a: u8 },
    }

    #[test]
    fn round_trips_every_shape_as_content_only() {
        let cases = [
            (Shapes::Unit, 0, "null"),
            (Shapes::Newtype(7), 1, "7"),
            (Shapes::Tuple(1, "x".into()), 2, r#"[1,"x"]"#),
            (Shapes::Struct { a: 3 }, 3, r#"{"a":3}"#),
        ];
        for (value, index, json) in cases {
            let bytes = encode_variant(&value, "T").unwrap();
            assert_eq!(std::str::from_utf8(&bytes).unwrap(), json);
            assert_eq!(decode_variant::<Shapes>(index, &bytes, "T").unwrap(), value);
        }
    }

    #[test]
    fn rejects_other_representations() {
        let error = encode_variant(&5u32, "T").unwrap_err();
        assert!(error.message.starts_with(NOT_EXTERNALLY_TAGGED), "{error}");
        let error = decode_variant::<u32>(0, b"5", "T").unwrap_err();
        assert!(error.message.starts_with(NOT_EXTERNALLY_TAGGED), "{error}");
    }

    #[test]
    fn rejects_trailing_bytes_and_bad_index() {
        let error = decode_variant::<Shapes>(1, b"7 8", "T").unwrap_err();
        assert!(error.message.contains("trailing characters"), "{error}");
        let error = decode_variant::<Shapes>(9, b"7", "T").unwrap_err();
        assert!(error.message.contains("variant index"), "{error}");
    }
}
