//! The reactors' effect journal in SQLite, beside their checkpoints.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, Row};
use uuid::Uuid;

use super::SqliteStore;
use super::subscriptions::{db, fence, from_micros, micros, position};
use crate::event::Position;
use crate::reactor::{Effect, EffectJournal, EffectState};
use crate::store::StoreError;
use crate::subscription::Lease;

const COLUMNS: &str = "reactor, event_id, position, stream, event_type, state, attempts, last_error, created_at, updated_at";

fn effect(row: &Row<'_>) -> rusqlite::Result<Result<Effect, String>> {
    let id: Vec<u8> = row.get(1)?;
    let state: String = row.get(5)?;
    let Ok(bytes) = <[u8; 16]>::try_from(id.as_slice()) else {
        return Ok(Err(format!("event_id holds {} bytes, not 16", id.len())));
    };
    let Some(state) = EffectState::parse(&state) else {
        return Ok(Err(format!("unknown effect state `{state}`")));
    };
    Ok(Ok(Effect {
        reactor: row.get(0)?,
        event_id: Uuid::from_bytes(bytes),
        position: Position(row.get::<_, i64>(2)?.max(0) as u64),
        stream: row.get(3)?,
        event_type: row.get(4)?,
        state,
        attempts: row.get::<_, i64>(6)?.clamp(0, u32::MAX as i64) as u32,
        last_error: row.get(7)?,
        created_at: from_micros(row.get(8)?),
        updated_at: from_micros(row.get(9)?),
    }))
}

fn query(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Effect>, StoreError> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(db("reading the effect journal"))?;
    let rows = stmt
        .query_map(params, effect)
        .map_err(db("reading the effect journal"))?;
    let mut out = Vec::new();
    for row in rows {
        let entry = row.map_err(db("reading the effect journal"))?;
        out.push(entry.map_err(|message| StoreError::Corrupt {
            position: Position::ORIGIN,
            stream: "aftermath_effects".into(),
            message,
        })?);
    }
    Ok(out)
}

/// `ids` without repeats, in their first order.
fn unique(ids: &[Uuid]) -> Vec<Uuid> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

fn transition(
    conn: &Connection,
    reactor: &str,
    id: Option<Uuid>,
    to: EffectState,
) -> Result<u64, StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE aftermath_effects SET state = ?3, updated_at = ?4
             WHERE reactor = ?1 AND state = 'parked' AND (?2 IS NULL OR event_id = ?2)",
        )
        .and_then(|mut s| {
            s.execute((
                reactor,
                id.map(|i| i.as_bytes().to_vec()),
                to.as_str(),
                micros(Utc::now()),
            ))
        })
        .map_err(db("updating a parked effect"))?;
    Ok(n as u64)
}

#[async_trait]
impl EffectJournal for SqliteStore {
    async fn load(
        &self,
        reactor: &str,
        events: &[Uuid],
    ) -> Result<HashMap<Uuid, Effect>, StoreError> {
        let reactor = reactor.to_owned();
        let ids: Vec<Uuid> = events.to_vec();
        self.read(move |conn| {
            let mut found = HashMap::new();
            // In chunks, within SQLite's parameter limit.
            for chunk in ids.chunks(500) {
                let marks = vec!["?"; chunk.len()].join(",");
                let sql = format!(
                    "SELECT {COLUMNS} FROM aftermath_effects WHERE reactor = ? AND event_id IN ({marks})"
                );
                let mut params: Vec<Box<dyn rusqlite::ToSql>> = vec![Box::new(reactor.clone())];
                params.extend(chunk.iter().map(|id| Box::new(id.as_bytes().to_vec()) as Box<dyn rusqlite::ToSql>));
                for e in query(conn, &sql, rusqlite::params_from_iter(params.iter()))? {
                    found.insert(e.event_id, e);
                }
            }
            Ok(found)
        })
        .await
    }

    /// In chunks of 500 ids (SQLite's parameter limit), on the
    /// `(event_id)` index.
    async fn effects_for(&self, event_ids: &[Uuid]) -> Result<Vec<Effect>, StoreError> {
        let ids = unique(event_ids);
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |conn| {
            let mut found = Vec::new();
            for chunk in ids.chunks(500) {
                let marks = vec!["?"; chunk.len()].join(",");
                let sql =
                    format!("SELECT {COLUMNS} FROM aftermath_effects WHERE event_id IN ({marks})");
                let params = chunk.iter().map(|id| id.as_bytes().as_slice());
                found.extend(query(conn, &sql, rusqlite::params_from_iter(params))?);
            }
            found.sort_by(|a, b| (a.position, &a.reactor).cmp(&(b.position, &b.reactor)));
            Ok(found)
        })
        .await
    }

    async fn record(&self, effect: &Effect, lease: Option<&Lease>) -> Result<(), StoreError> {
        let effect = effect.clone();
        let lease = lease.cloned();
        self.write(move |conn| {
            if let Some(lease) = &lease {
                fence(conn, lease)?;
            }
            conn.prepare_cached(
                "INSERT INTO aftermath_effects (reactor, event_id, position, stream, event_type, state, attempts, last_error, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (reactor, event_id) DO UPDATE SET state = excluded.state,
                     attempts = excluded.attempts, last_error = excluded.last_error,
                     updated_at = excluded.updated_at
                 WHERE aftermath_effects.state NOT IN ('done', 'skipped')",
            )
            .and_then(|mut s| {
                s.execute((
                    &effect.reactor,
                    effect.event_id.as_bytes().to_vec(),
                    position(effect.position),
                    &effect.stream,
                    &effect.event_type,
                    effect.state.as_str(),
                    effect.attempts as i64,
                    &effect.last_error,
                    micros(effect.created_at),
                    micros(effect.updated_at),
                ))
            })
            .map_err(db("recording an effect"))?;
            Ok(())
        })
        .await
    }

    async fn held(&self, reactor: &str) -> Result<Vec<Effect>, StoreError> {
        let reactor = reactor.to_owned();
        self.read(move |conn| {
            query(
                conn,
                &format!(
                    "SELECT {COLUMNS} FROM aftermath_effects
                     WHERE reactor = ?1 AND state IN ('parked', 'retry_requested', 'blocked', 'started', 'failed')
                     ORDER BY stream, position"
                ),
                [&reactor],
            )
        })
        .await
    }

    async fn parked(&self, reactor: Option<&str>) -> Result<Vec<Effect>, StoreError> {
        let reactor = reactor.map(str::to_owned);
        self.read(move |conn| {
            query(
                conn,
                &format!(
                    "SELECT {COLUMNS} FROM aftermath_effects
                     WHERE (?1 IS NULL OR reactor = ?1) AND state IN ('parked', 'retry_requested')
                     ORDER BY updated_at, position"
                ),
                [&reactor],
            )
        })
        .await
    }

    async fn retry(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError> {
        let reactor = reactor.to_owned();
        self.write(move |conn| {
            Ok(transition(conn, &reactor, Some(event_id), EffectState::RetryRequested)? > 0)
        })
        .await
    }

    async fn retry_all(&self, reactor: &str) -> Result<u64, StoreError> {
        let reactor = reactor.to_owned();
        self.write(move |conn| transition(conn, &reactor, None, EffectState::RetryRequested))
            .await
    }

    async fn skip(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError> {
        let reactor = reactor.to_owned();
        self.write(move |conn| {
            Ok(transition(conn, &reactor, Some(event_id), EffectState::Skipped)? > 0)
        })
        .await
    }

    async fn cleanup(
        &self,
        reactor: &str,
        before: DateTime<Utc>,
        through: Position,
    ) -> Result<u64, StoreError> {
        let reactor = reactor.to_owned();
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "DELETE FROM aftermath_effects WHERE reactor = ?1 AND state IN ('done', 'skipped') \
                     AND updated_at < ?2 AND position <= ?3",
                )
                .and_then(|mut s| {
                    s.execute(rusqlite::params![reactor, micros(before), position(through)])
                })
                .map_err(db("cleaning up the effect journal"))?;
            Ok(n as u64)
        })
        .await
    }
}
