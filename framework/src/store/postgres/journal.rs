//! The reactors' effect journal in PostgreSQL, beside their checkpoints.
//! Same contracts as the SQLite journal: writes are single statements,
//! `record` fenced by the lease like a checkpoint save.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx_core::row::Row;
use sqlx_postgres::PgRow;
use uuid::Uuid;

use super::PostgresStore;
use super::events::{db, stmt};
use super::subscriptions::{bind_fence, lease_lost, now, parse_position, position_text};
use super::types::Timestamp;
use crate::event::Position;
use crate::reactor::{Effect, EffectJournal, EffectState};
use crate::store::StoreError;
use crate::subscription::Lease;

/// The most event ids `effects_for` binds in one statement.
const EFFECTS_FOR_CHUNK: usize = 5000;

fn corrupt(message: String) -> StoreError {
    StoreError::Corrupt {
        position: Position::ORIGIN,
        stream: "effects".into(),
        message,
    }
}

/// A row of `EFFECT_COLUMNS` as an [`Effect`].
fn effect(row: &PgRow) -> Result<Effect, StoreError> {
    let failed = || db("reading the effect journal");
    let position: String = row.try_get(2).map_err(failed())?;
    let state: String = row.try_get(5).map_err(failed())?;
    let state = EffectState::parse(&state)
        .ok_or_else(|| corrupt(format!("unknown effect state `{state}`")))?;
    let attempts: i32 = row.try_get(6).map_err(failed())?;
    let Timestamp(created_at) = row
        .try_get(8)
        .map_err(|e| corrupt(format!("column `created_at` does not decode: {e}")))?;
    let Timestamp(updated_at) = row
        .try_get(9)
        .map_err(|e| corrupt(format!("column `updated_at` does not decode: {e}")))?;
    Ok(Effect {
        reactor: row.try_get(0).map_err(failed())?,
        event_id: row.try_get(1).map_err(failed())?,
        position: parse_position(&position, "effects")?,
        stream: row.try_get(3).map_err(failed())?,
        event_type: row.try_get(4).map_err(failed())?,
        state,
        attempts: u32::try_from(attempts).unwrap_or(0),
        last_error: row.try_get(7).map_err(failed())?,
        created_at,
        updated_at,
    })
}

fn effects(rows: Vec<PgRow>) -> Result<Vec<Effect>, StoreError> {
    rows.iter().map(effect).collect()
}

impl PostgresStore {
    /// Moves parked entries of `reactor` (one, or all with `None`) to `to`.
    async fn transition(
        &self,
        reactor: &str,
        id: Option<Uuid>,
        to: EffectState,
    ) -> Result<u64, StoreError> {
        let done = stmt(&self.shared.statements.effects_transition)
            .bind(reactor)
            .bind(id)
            .bind(to.as_str())
            .bind(now())
            .execute(self.pool())
            .await
            .map_err(db("updating a parked effect"))?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl EffectJournal for PostgresStore {
    async fn load(
        &self,
        reactor: &str,
        events: &[Uuid],
    ) -> Result<HashMap<Uuid, Effect>, StoreError> {
        if events.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = stmt(&self.shared.statements.effects_load)
            .bind(reactor)
            .bind(events)
            .fetch_all(self.pool())
            .await
            .map_err(db("reading the effect journal"))?;
        Ok(effects(rows)?
            .into_iter()
            .map(|e| (e.event_id, e))
            .collect())
    }

    /// One statement per chunk of 5000 ids.
    async fn effects_for(&self, event_ids: &[Uuid]) -> Result<Vec<Effect>, StoreError> {
        let mut seen = std::collections::HashSet::with_capacity(event_ids.len());
        let ids: Vec<Uuid> = event_ids
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect();
        let mut found = Vec::new();
        for chunk in ids.chunks(EFFECTS_FOR_CHUNK) {
            let rows = stmt(&self.shared.statements.effects_for)
                .bind(chunk)
                .fetch_all(self.pool())
                .await
                .map_err(db("reading the effect journal"))?;
            found.extend(effects(rows)?);
        }
        if ids.len() > EFFECTS_FOR_CHUNK {
            found.sort_by(|a, b| (a.position, &a.reactor).cmp(&(b.position, &b.reactor)));
        }
        Ok(found)
    }

    /// One statement: the fence check and the upsert commit together; a
    /// final entry (done, skipped) is left as it is.
    async fn record(&self, effect: &Effect, lease: Option<&Lease>) -> Result<(), StoreError> {
        let query = stmt(&self.shared.statements.effects_record)
            .bind(&effect.reactor)
            .bind(effect.event_id)
            .bind(position_text(effect.position))
            .bind(&effect.stream)
            .bind(&effect.event_type)
            .bind(effect.state.as_str())
            .bind(i32::try_from(effect.attempts).unwrap_or(i32::MAX))
            .bind(&effect.last_error)
            .bind(Timestamp(effect.created_at))
            .bind(Timestamp(effect.updated_at));
        let fenced: bool = bind_fence(query, lease)
            .fetch_one(self.pool())
            .await
            .and_then(|row| row.try_get(0))
            .map_err(db("recording an effect"))?;
        match lease {
            Some(lease) if !fenced => Err(lease_lost(lease)),
            _ => Ok(()),
        }
    }

    async fn held(&self, reactor: &str) -> Result<Vec<Effect>, StoreError> {
        let rows = stmt(&self.shared.statements.effects_held)
            .bind(reactor)
            .fetch_all(self.pool())
            .await
            .map_err(db("reading the effect journal"))?;
        effects(rows)
    }

    async fn parked(&self, reactor: Option<&str>) -> Result<Vec<Effect>, StoreError> {
        let rows = stmt(&self.shared.statements.effects_parked)
            .bind(reactor)
            .fetch_all(self.pool())
            .await
            .map_err(db("reading the effect journal"))?;
        effects(rows)
    }

    async fn retry(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError> {
        Ok(self
            .transition(reactor, Some(event_id), EffectState::RetryRequested)
            .await?
            > 0)
    }

    async fn retry_all(&self, reactor: &str) -> Result<u64, StoreError> {
        self.transition(reactor, None, EffectState::RetryRequested)
            .await
    }

    async fn skip(&self, reactor: &str, event_id: Uuid) -> Result<bool, StoreError> {
        Ok(self
            .transition(reactor, Some(event_id), EffectState::Skipped)
            .await?
            > 0)
    }

    async fn cleanup(
        &self,
        reactor: &str,
        before: DateTime<Utc>,
        through: Position,
    ) -> Result<u64, StoreError> {
        let done = stmt(&self.shared.statements.effects_cleanup)
            .bind(reactor)
            .bind(Timestamp(before))
            .bind(position_text(through))
            .execute(self.pool())
            .await
            .map_err(db("cleaning up the effect journal"))?;
        Ok(done.rows_affected())
    }
}
