//! Parked inbox messages in SQLite (feature `nats`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::SqliteStore;
use super::subscriptions::{db, from_micros, micros};
use crate::nats::{InboxStore, ParkedMessage};
use crate::store::StoreError;

#[async_trait]
impl InboxStore for SqliteStore {
    async fn park(&self, message: &ParkedMessage) -> Result<(), StoreError> {
        let m = message.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO aftermath_inbox_parked (inbox, message_id, subject, payload, error, parked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (inbox, message_id) DO NOTHING",
            )
            .and_then(|mut s| s.execute((&m.inbox, &m.message_id, &m.subject, &m.payload, &m.error, micros(m.parked_at))))
            .map_err(db("parking an inbox message"))?;
            Ok(())
        })
        .await
    }

    async fn is_parked(&self, inbox: &str, message_id: &str) -> Result<bool, StoreError> {
        let (inbox, message_id) = (inbox.to_owned(), message_id.to_owned());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM aftermath_inbox_parked WHERE inbox = ?1 AND message_id = ?2)",
            )
            .and_then(|mut s| s.query_row((&inbox, &message_id), |row| row.get(0)))
            .map_err(db("looking up a parked inbox message"))
        })
        .await
    }

    async fn parked_messages(&self, inbox: Option<&str>) -> Result<Vec<ParkedMessage>, StoreError> {
        let inbox = inbox.map(str::to_owned);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT inbox, message_id, subject, payload, error, parked_at FROM aftermath_inbox_parked
                     WHERE ?1 IS NULL OR inbox = ?1 ORDER BY parked_at, message_id",
                )
                .map_err(db("listing parked inbox messages"))?;
            let rows = stmt
                .query_map([&inbox], |row| {
                    Ok(ParkedMessage {
                        inbox: row.get(0)?,
                        message_id: row.get(1)?,
                        subject: row.get(2)?,
                        payload: row.get(3)?,
                        error: row.get(4)?,
                        parked_at: from_micros(row.get(5)?),
                    })
                })
                .map_err(db("listing parked inbox messages"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(db("listing parked inbox messages"))
        })
        .await
    }

    async fn cleanup_parked(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM aftermath_inbox_parked WHERE parked_at < ?1")
                .and_then(|mut s| s.execute([micros(before)]))
                .map_err(db("cleaning up parked inbox messages"))?;
            Ok(n as u64)
        })
        .await
    }
}
