//! Parked inbox messages in PostgreSQL (feature `nats`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx_core::row::Row;

use super::PostgresStore;
use super::events::{db, stmt};
use super::types::Timestamp;
use crate::nats::{InboxStore, ParkedMessage};
use crate::store::StoreError;

#[async_trait]
impl InboxStore for PostgresStore {
    async fn park(&self, message: &ParkedMessage) -> Result<(), StoreError> {
        stmt(&self.shared.statements.inbox_park)
            .bind(&message.inbox)
            .bind(&message.message_id)
            .bind(&message.subject)
            .bind(&message.payload)
            .bind(&message.error)
            .bind(Timestamp(message.parked_at))
            .execute(self.pool())
            .await
            .map_err(db("parking an inbox message"))?;
        Ok(())
    }

    async fn is_parked(&self, inbox: &str, message_id: &str) -> Result<bool, StoreError> {
        stmt(&self.shared.statements.inbox_is_parked)
            .bind(inbox)
            .bind(message_id)
            .fetch_one(self.pool())
            .await
            .and_then(|row| row.try_get(0))
            .map_err(db("looking up a parked inbox message"))
    }

    async fn parked_messages(&self, inbox: Option<&str>) -> Result<Vec<ParkedMessage>, StoreError> {
        let rows = stmt(&self.shared.statements.inbox_parked)
            .bind(inbox)
            .fetch_all(self.pool())
            .await
            .map_err(db("listing parked inbox messages"))?;
        rows.iter()
            .map(|row| {
                let failed = || db("listing parked inbox messages");
                let Timestamp(parked_at) = row.try_get(5).map_err(failed())?;
                Ok(ParkedMessage {
                    inbox: row.try_get(0).map_err(failed())?,
                    message_id: row.try_get(1).map_err(failed())?,
                    subject: row.try_get(2).map_err(failed())?,
                    payload: row.try_get(3).map_err(failed())?,
                    error: row.try_get(4).map_err(failed())?,
                    parked_at,
                })
            })
            .collect()
    }

    async fn cleanup_parked(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = stmt(&self.shared.statements.inbox_cleanup)
            .bind(Timestamp(before))
            .execute(self.pool())
            .await
            .map_err(db("cleaning up parked inbox messages"))?;
        Ok(done.rows_affected())
    }
}
