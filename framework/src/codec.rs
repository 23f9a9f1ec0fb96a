//! Payload codec used by `#[derive(Event)]` (being written).
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::{EncodeError, PayloadError};

/// Encodes only the content of the enum variant `value` is.
pub fn encode_variant<T: Serialize>(_value: &T, event_type: &'static str) -> Result<Vec<u8>, EncodeError> {
    Err(EncodeError { event_type: event_type.into(), message: "todo".into() })
}

/// Decodes `payload` as the content of variant number `variant_index` of `T`.
pub fn decode_variant<T: DeserializeOwned>(_variant_index: u32, _payload: &[u8], event_type: &str) -> Result<T, PayloadError> {
    Err(PayloadError { event_type: event_type.into(), message: "todo".into() })
}
