//! Tests of the PostgreSQL backend's internals that need a server (run when
//! `AFTERMATH_PG_URL` is set; the conformance suite in `tests/` covers the
//! contracts).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::PgConnection;

use super::{PostgresOptions, PostgresStore};
use crate::event::{EventData, Metadata};
use crate::store::{EventStore, ExpectedVersion};

/// Collects the messages and fields of every event, as text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(format!("{}", event.metadata().level()));
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn held_back_readers_are_warned_about_with_the_blocking_pid() {
    let Some(url) = std::env::var("AFTERMATH_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("SKIPPED postgres::held_back_warning: AFTERMATH_PG_URL not set");
        return;
    };
    let capture = Capture::default();
    // One thread: the store's background task runs under this subscriber.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let schema = format!("aftermath_unit_{}", uuid::Uuid::new_v4().simple());
    tracing::subscriber::with_default(capture.clone(), || {
        runtime.block_on(async {
            let options = PostgresOptions::default()
                .schema(&schema)
                .poll_interval(Duration::from_millis(100))
                .held_back_warning(Duration::from_millis(200));
            let store = PostgresStore::connect_with(&url, options).await.unwrap();
            let mut blocker = PgConnection::connect(&url).await.unwrap();
            blocker.execute("BEGIN").await.unwrap();
            blocker
                .execute("SELECT pg_current_xact_id()")
                .await
                .unwrap();
            let pid: i32 = query("SELECT pg_backend_pid()")
                .fetch_one(&mut blocker)
                .await
                .unwrap()
                .get(0);
            let id = uuid::Uuid::now_v7();
            let event = EventData {
                id,
                event_type: "Pinged".into(),
                payload: b"{}".to_vec(),
                metadata: Metadata::caused_by(id),
            };
            store
                .append("p-1", ExpectedVersion::NoStream, vec![event])
                .await
                .unwrap();
            let wanted = format!("pid={pid} ");
            let mut warned = None;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let lines = capture.0.lock().unwrap().clone();
                warned = lines.into_iter().find(|l| {
                    l.starts_with("WARN") && l.contains("held back") && l.contains(&wanted)
                });
                if warned.is_some() {
                    break;
                }
            }
            blocker.execute("COMMIT").await.unwrap();
            drop(store);
            let mut admin = PgConnection::connect(&url).await.unwrap();
            admin
                .execute(raw_sql(AssertSqlSafe(format!(
                    "DROP SCHEMA \"{schema}\" CASCADE"
                ))))
                .await
                .unwrap();
            let warned = warned.unwrap_or_else(|| {
                panic!(
                    "no warning naming the blocking backend (pid {pid}) among {:?}",
                    capture
                        .0
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|l| l.starts_with("WARN"))
                        .collect::<Vec<_>>()
                )
            });
            assert!(warned.contains("transaction_age_ms="), "{warned}");
        });
    });
}
