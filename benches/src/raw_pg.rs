//! The raw-driver baseline for PostgreSQL: what a hand-written application
//! would minimally do with plain sqlx to store the same events, on the same
//! server, in a schema of its own.
//!
//! The table holds the same columns as the store's (`stream`, `version`,
//! `id`, `event_type`, `payload` bytea, `metadata` jsonb, `recorded_at`,
//! correlation and causation ids) with the same constraints and indexes
//! (unique id, unique `(stream, version)`, an index by event type), ordered
//! by a plain identity column `position` instead of the store's
//! `(transaction_id, seq)` key.
//!
//! An append is one transaction per batch: `BEGIN`, read the stream's
//! current version (one `SELECT`), check the expected version, insert the
//! whole batch with one `INSERT ... SELECT FROM unnest(...)`, `COMMIT`. A
//! concurrent append to the same stream is caught by the `(stream, version)`
//! constraint. A read is one `SELECT` per page of `$all`, decoded into the
//! same [`StoredEvent`] the store returns. Every statement is prepared once
//! per connection (sqlx's statement cache).

use std::sync::Arc;

use aftermath::store::postgres::sqlx_core;
use aftermath::store::postgres::sqlx_postgres;
use aftermath::{EventData, ExpectedVersion, Metadata, Position, StoredEvent};
use chrono::{DateTime, Utc};
use sqlx_core::decode::Decode;
use sqlx_core::error::BoxDynError;
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_core::types::Type;
use sqlx_postgres::types::Oid;
use sqlx_postgres::{PgPool, PgPoolOptions, PgTypeInfo, PgValueFormat, PgValueRef, Postgres};
use uuid::Uuid;

/// Why a raw append or read failed.
#[derive(Debug, thiserror::Error)]
pub enum RawPgError {
    /// The driver failed.
    #[error("postgres: {0}")]
    Sql(#[from] sqlx_core::Error),
    /// Metadata did not (de)serialize.
    #[error("metadata json: {0}")]
    Json(#[from] serde_json::Error),
    /// The stream's version is not the expected one; nothing was written.
    #[error("wrong expected version on `{stream}`: expected {expected}, actual {actual}")]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's version.
        actual: u64,
    },
}

/// A `timestamptz` read in binary format (what sqlx's `chrono` feature
/// would do; the workspace builds sqlx without it).
struct PgTime(DateTime<Utc>);

/// 2000-01-01T00:00:00Z in Unix microseconds.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl Type<Postgres> for PgTime {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(1184))
    }
}

impl Decode<'_, Postgres> for PgTime {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        if value.format() != PgValueFormat::Binary {
            return Err("timestamptz in text format".into());
        }
        let bytes: [u8; 8] = value.as_bytes()?.try_into()?;
        let micros = i64::from_be_bytes(bytes) + POSTGRES_EPOCH_MICROS;
        DateTime::from_timestamp_micros(micros)
            .map(PgTime)
            .ok_or_else(|| "timestamp out of range".into())
    }
}

/// The statements, with the schema name filled in once.
struct Statements {
    version: Arc<str>,
    insert: Arc<str>,
    read_all: Arc<str>,
    read_stream: Arc<str>,
}

/// A plain sqlx pool on a schema of its own holding one `events` table.
#[derive(Clone)]
pub struct RawPg {
    pool: PgPool,
    schema: String,
    sql: Arc<Statements>,
    /// The channel each append notifies, if any.
    notify: Option<String>,
}

impl RawPg {
    /// Connects with a pool of `max_connections` and creates schema `schema`
    /// (dropping an old one of that name first) with the events table.
    pub async fn create(url: &str, schema: &str, max_connections: u32) -> Result<Self, RawPgError> {
        let raw = Self::connect(url, schema, max_connections).await?;
        let s = format!("\"{schema}\"");
        let ddl = format!(
            "DROP SCHEMA IF EXISTS {s} CASCADE;
             CREATE SCHEMA {s};
             CREATE TABLE {s}.events (
                 position       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 stream         text        NOT NULL,
                 version        bigint      NOT NULL,
                 id             uuid        NOT NULL UNIQUE,
                 event_type     text        NOT NULL,
                 payload        bytea       NOT NULL,
                 metadata       jsonb       NOT NULL,
                 recorded_at    timestamptz NOT NULL DEFAULT now(),
                 correlation_id uuid        NOT NULL,
                 causation_id   uuid        NOT NULL,
                 UNIQUE (stream, version)
             );
             CREATE INDEX events_by_type ON {s}.events (event_type, position);"
        );
        raw.pool.execute(raw_sql(AssertSqlSafe(ddl))).await?;
        Ok(raw)
    }

    /// Connects with a pool of `max_connections` to the table that
    /// [`RawPg::create`] made in `schema` (another "process" on it).
    pub async fn connect(
        url: &str,
        schema: &str,
        max_connections: u32,
    ) -> Result<Self, RawPgError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(url)
            .await?;
        let s = format!("\"{schema}\"");
        let a = |sql: String| -> Arc<str> { sql.into() };
        let sql = Statements {
            version: a(format!(
                "SELECT coalesce(max(version), 0) FROM {s}.events WHERE stream = $1"
            )),
            insert: a(format!(
                "INSERT INTO {s}.events \
                   (stream, version, id, event_type, payload, metadata, correlation_id, causation_id) \
                 SELECT $1, $2 + b.n, b.id, b.event_type, b.payload, b.metadata::jsonb, b.correlation, b.causation \
                 FROM unnest($3::uuid[], $4::text[], $5::bytea[], $6::text[], $7::uuid[], $8::uuid[]) \
                   WITH ORDINALITY AS b(id, event_type, payload, metadata, correlation, causation, n)"
            )),
            read_all: a(format!(
                "SELECT position, stream, version, id, event_type, payload, metadata::text, recorded_at \
                 FROM {s}.events WHERE position > $1 ORDER BY position LIMIT $2"
            )),
            read_stream: a(format!(
                "SELECT version, event_type, payload FROM {s}.events \
                 WHERE stream = $1 ORDER BY version"
            )),
        };
        Ok(RawPg {
            pool,
            schema: schema.to_owned(),
            sql: Arc::new(sql),
            notify: None,
        })
    }

    /// Every append also runs `SELECT pg_notify(channel, '')` in its
    /// transaction (one more round trip), waking `LISTEN`ers at commit.
    pub fn with_notify(mut self, channel: &str) -> Self {
        self.notify = Some(channel.to_owned());
        self
    }

    /// The current version of `stream`.
    pub async fn stream_version(&self, stream: &str) -> Result<u64, RawPgError> {
        let version: i64 = query(AssertSqlSafe(self.sql.version.clone()))
            .bind(stream)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(version as u64)
    }

    /// The largest `position` stored (0 when empty).
    pub async fn last_position(&self) -> Result<i64, RawPgError> {
        let sql = format!(
            "SELECT coalesce(max(position), 0) FROM \"{}\".events",
            self.schema
        );
        Ok(query(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Closes the pool (of this handle and its clones).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Drops the schema and closes the pool.
    pub async fn drop_schema(self) -> Result<(), RawPgError> {
        let ddl = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        self.pool.execute(raw_sql(AssertSqlSafe(ddl))).await?;
        self.pool.close().await;
        Ok(())
    }

    /// Appends `events` to `stream` in one transaction if the stream's
    /// version matches `expected`; returns the stream's new version.
    ///
    /// `BEGIN`, one `SELECT` of the current version, one `INSERT` of the
    /// batch, `COMMIT`: four round trips.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<u64, RawPgError> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
        let metadata = events
            .iter()
            .map(|e| serde_json::to_string(&e.metadata))
            .collect::<Result<Vec<String>, _>>()?;
        let correlation: Vec<Uuid> = events.iter().map(|e| e.metadata.correlation_id).collect();
        let causation: Vec<Uuid> = events.iter().map(|e| e.metadata.causation_id).collect();

        let mut tx = self.pool.begin().await?;
        let current: i64 = query(AssertSqlSafe(self.sql.version.clone()))
            .bind(stream)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let current = current as u64;
        if !expected.matches(current) {
            return Err(RawPgError::WrongExpectedVersion {
                stream: stream.to_owned(),
                expected,
                actual: current,
            });
        }
        query(AssertSqlSafe(self.sql.insert.clone()))
            .bind(stream)
            .bind(current as i64)
            .bind(&ids[..])
            .bind(&types[..])
            .bind(&payloads[..])
            .bind(&metadata[..])
            .bind(&correlation[..])
            .bind(&causation[..])
            .execute(&mut *tx)
            .await?;
        if let Some(channel) = &self.notify {
            query("SELECT pg_notify($1, '')")
                .bind(channel)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(current + events.len() as u64)
    }

    /// A hand-written command handler: in one transaction, read the
    /// stream's events (type and payload), let `decide` turn them into new
    /// events, insert those at the following versions, commit. A concurrent
    /// writer is caught by the `(stream, version)` constraint. Returns the
    /// new version.
    pub async fn execute<F>(&self, stream: &str, decide: F) -> Result<u64, RawPgError>
    where
        F: FnOnce(&[(String, Vec<u8>)]) -> Vec<EventData>,
    {
        let mut tx = self.pool.begin().await?;
        let rows = query(AssertSqlSafe(self.sql.read_stream.clone()))
            .bind(stream)
            .fetch_all(&mut *tx)
            .await?;
        let mut version = 0u64;
        let mut history = Vec::with_capacity(rows.len());
        for row in rows {
            version = row.try_get::<i64, _>(0)? as u64;
            history.push((row.try_get::<String, _>(1)?, row.try_get::<Vec<u8>, _>(2)?));
        }
        let events = decide(&history);
        if events.is_empty() {
            tx.commit().await?;
            return Ok(version);
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
        let metadata = events
            .iter()
            .map(|e| serde_json::to_string(&e.metadata))
            .collect::<Result<Vec<String>, _>>()?;
        let correlation: Vec<Uuid> = events.iter().map(|e| e.metadata.correlation_id).collect();
        let causation: Vec<Uuid> = events.iter().map(|e| e.metadata.causation_id).collect();
        query(AssertSqlSafe(self.sql.insert.clone()))
            .bind(stream)
            .bind(version as i64)
            .bind(&ids[..])
            .bind(&types[..])
            .bind(&payloads[..])
            .bind(&metadata[..])
            .bind(&correlation[..])
            .bind(&causation[..])
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(version + events.len() as u64)
    }

    /// Reads up to `limit` events after `after` (a value of the `position`
    /// column), decoded into [`StoredEvent`]s (metadata JSON parsed, as the
    /// store does).
    pub async fn read_all(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, RawPgError> {
        let rows = query(AssertSqlSafe(self.sql.read_all.clone()))
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut page = Vec::with_capacity(rows.len());
        for row in rows {
            let metadata: String = row.try_get(6)?;
            let metadata: Metadata = serde_json::from_str(&metadata)?;
            let PgTime(recorded_at) = row.try_get(7)?;
            page.push(StoredEvent {
                position: Position(row.try_get::<i64, _>(0)? as u64),
                stream: row.try_get(1)?,
                version: row.try_get::<i64, _>(2)? as u64,
                id: row.try_get(3)?,
                event_type: row.try_get(4)?,
                payload: row.try_get(5)?,
                metadata,
                recorded_at,
            });
        }
        Ok(page)
    }

    /// Reads `$all` from the start in pages of `page`, at most `max`
    /// events; returns how many were read. Each page is dropped before the
    /// next is read.
    pub async fn read_all_count(&self, page: usize, max: u64) -> Result<u64, RawPgError> {
        let mut after = 0i64;
        let mut read = 0u64;
        while read < max {
            let limit = page.min((max - read) as usize);
            let events = self.read_all(after, limit).await?;
            read += events.len() as u64;
            match events.last() {
                Some(last) if events.len() == limit => after = last.position.0 as i64,
                _ => break,
            }
        }
        Ok(read)
    }

    /// Reads `$all` from the start in pages of `page`, at most `max` events,
    /// committing a checkpoint row per page (`UPSERT` in its own
    /// transaction), as a hand-written projector with a no-op handler would;
    /// returns how many events were read.
    pub async fn read_all_checkpointed(&self, page: usize, max: u64) -> Result<u64, RawPgError> {
        let table = format!("\"{}\".checkpoint", self.schema);
        self.pool
            .execute(raw_sql(AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {table} (name text PRIMARY KEY, position bigint NOT NULL)"
            ))))
            .await?;
        let save = format!(
            "INSERT INTO {table} (name, position) VALUES ('bench', $1) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position"
        );
        let mut after = 0i64;
        let mut read = 0u64;
        while read < max {
            let limit = page.min((max - read) as usize);
            let events = self.read_all(after, limit).await?;
            read += events.len() as u64;
            let Some(last) = events.last() else { break };
            after = last.position.0 as i64;
            query(AssertSqlSafe(save.clone()))
                .bind(after)
                .execute(&self.pool)
                .await?;
            if events.len() < limit {
                break;
            }
        }
        Ok(read)
    }

    /// How many events the table holds.
    pub async fn count(&self) -> Result<u64, RawPgError> {
        let sql = format!("SELECT count(*) FROM \"{}\".events", self.schema);
        let n: i64 = query(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }
}
