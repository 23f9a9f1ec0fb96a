//! Column types bound and read in PostgreSQL's binary format by the store
//! itself: `xid8`, which sqlx does not know, and `timestamptz`, which sqlx's
//! chrono support decodes with a panic when the value is out of chrono's
//! range (`infinity`); a corrupt row must be an error, never a panic.

use chrono::{DateTime, Utc};
use sqlx_core::decode::Decode;
use sqlx_core::encode::{Encode, IsNull};
use sqlx_core::error::BoxDynError;
use sqlx_core::types::Type;
use sqlx_postgres::types::Oid;
use sqlx_postgres::{PgArgumentBuffer, PgTypeInfo, PgValueFormat, PgValueRef, Postgres};

/// A PostgreSQL `xid8` (a 64-bit transaction id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(super) struct Xid8(pub u64);

/// `pg_type.oid` of `xid8`, fixed since PostgreSQL 13.
const XID8_OID: u32 = 5069;

impl Type<Postgres> for Xid8 {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(XID8_OID))
    }
}

impl Encode<'_, Postgres> for Xid8 {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.extend(&self.0.to_be_bytes());
        Ok(IsNull::No)
    }
}

impl Decode<'_, Postgres> for Xid8 {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(Xid8(match value.format() {
            PgValueFormat::Binary => u64::from_be_bytes(eight_bytes(value.as_bytes()?, "xid8")?),
            PgValueFormat::Text => value.as_str()?.parse()?,
        }))
    }
}

fn eight_bytes(bytes: &[u8], what: &str) -> Result<[u8; 8], BoxDynError> {
    bytes
        .try_into()
        .map_err(|_| format!("a {what} of {} bytes, not 8", bytes.len()).into())
}

/// A `timestamptz`, as UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timestamp(pub DateTime<Utc>);

/// `pg_type.oid` of `timestamptz`.
const TIMESTAMPTZ_OID: u32 = 1184;

/// 2000-01-01T00:00:00Z, PostgreSQL's epoch, in Unix microseconds.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl Type<Postgres> for Timestamp {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(TIMESTAMPTZ_OID))
    }
}

impl Encode<'_, Postgres> for Timestamp {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let micros = self
            .0
            .timestamp_micros()
            .checked_sub(POSTGRES_EPOCH_MICROS)
            .ok_or_else(|| format!("timestamp {} is out of PostgreSQL's range", self.0))?;
        buf.extend(&micros.to_be_bytes());
        Ok(IsNull::No)
    }
}

impl Decode<'_, Postgres> for Timestamp {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        let micros = match value.format() {
            PgValueFormat::Binary => {
                i64::from_be_bytes(eight_bytes(value.as_bytes()?, "timestamptz")?)
            }
            PgValueFormat::Text => {
                return Err(format!("a timestamptz in text format: {}", value.as_str()?).into());
            }
        };
        match micros {
            i64::MAX => return Err("the timestamp is `infinity`".into()),
            i64::MIN => return Err("the timestamp is `-infinity`".into()),
            _ => {}
        }
        micros
            .checked_add(POSTGRES_EPOCH_MICROS)
            .and_then(DateTime::<Utc>::from_timestamp_micros)
            .map(Timestamp)
            .ok_or_else(|| {
                format!("the timestamp ({micros} µs after 2000-01-01) is out of range").into()
            })
    }
}
