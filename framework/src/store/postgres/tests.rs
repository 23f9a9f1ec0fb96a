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
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED postgres::held_back_warning: AFTERMATH_PG_URL not set\n",
        );
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
            // A reader in this process: the store follows the head (and warns
            // when it is held back) only while someone watches it.
            let _reader = store.watch_head();
            let mut blocker = PgConnection::connect(&url).await.unwrap();
            blocker.execute("BEGIN").await.unwrap();
            // An append paused before its commit (any other transaction
            // would not hold readers back).
            let paused = uuid::Uuid::now_v7();
            query(AssertSqlSafe(format!(
                "SELECT \"{schema}\".append('p-0', 0, 0, false, false, ARRAY[$1::uuid], \
                 ARRAY['Pinged'], ARRAY['{{}}'::bytea], ARRAY[$2], ARRAY[$1::uuid], \
                 ARRAY[$1::uuid], 0)"
            )))
            .bind(paused)
            .bind(serde_json::to_string(&Metadata::caused_by(paused)).unwrap())
            .execute(&mut blocker)
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

/// A schema at version 1 with events gets the `stream_hash` column
/// backfilled by the migration with exactly the hash the Rust code computes
/// (the SQL twin of FNV-1a agrees), an append through the version 1
/// signature (an older build during a rolling upgrade) stores the right
/// hash, and partitioned reads of the migrated log are complete.
#[test]
fn stream_hash_migration_backfills_and_agrees_with_rust() {
    use super::events::stored_hash;
    use super::schema::{MIGRATIONS, substitute};
    use crate::event::Position;
    use crate::subscription::{Partition, stream_hash};

    let Some(url) = std::env::var("AFTERMATH_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED postgres::stream_hash_migration: AFTERMATH_PG_URL not set\n",
        );
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let schema = format!("aftermath_unit_{}", uuid::Uuid::new_v4().simple());
    runtime.block_on(async {
        let mut admin = PgConnection::connect(&url).await.unwrap();
        // Version 1, as an older build created it.
        admin
            .execute(raw_sql(AssertSqlSafe(format!(
                "CREATE SCHEMA \"{schema}\"; \
                 CREATE TABLE \"{schema}\".aftermath_schema \
                 (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now()); \
                 {} \
                 INSERT INTO \"{schema}\".aftermath_schema (version) VALUES (1);",
                substitute(MIGRATIONS[0], &schema)
            ))))
            .await
            .unwrap();
        let old_append = format!(
            "SELECT out_version FROM \"{schema}\".append($1, 0, 9223372036854775807, false, false, \
             ARRAY[gen_random_uuid()], ARRAY['Pinged'], ARRAY['\\x7b7d'::bytea], \
             ARRAY['{{\"correlation_id\":\"00000000-0000-0000-0000-000000000000\",\
             \"causation_id\":\"00000000-0000-0000-0000-000000000000\"}}'], \
             ARRAY[gen_random_uuid()], ARRAY[gen_random_uuid()])"
        );
        let mut streams: Vec<String> = (0..40).map(|i| format!("account-{i}")).collect();
        streams.extend(
            [
                "",
                "a",
                "foobar",
                "ü",
                "日本語-ストリーム",
                "emoji-🦀",
                "tab\there",
                "x y z",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        streams.retain(|s| !s.is_empty());
        for stream in &streams {
            query(AssertSqlSafe(old_append.clone()))
                .bind(stream)
                .execute(&mut admin)
                .await
                .unwrap();
        }

        let store = PostgresStore::connect_with(&url, PostgresOptions::default().schema(&schema))
            .await
            .unwrap();
        let check = |rows: Vec<sqlx_postgres::PgRow>| {
            assert!(!rows.is_empty());
            for row in rows {
                let stream: String = row.get(0);
                let hash: i64 = row.get(1);
                assert_eq!(hash, stored_hash(stream_hash(&stream)), "stream {stream:?}");
            }
        };
        let stored = format!("SELECT stream, stream_hash FROM \"{schema}\".events");
        check(
            query(AssertSqlSafe(stored.clone()))
                .fetch_all(&mut admin)
                .await
                .unwrap(),
        );
        // The SQL function itself, on names that never were streams too.
        for name in ["", "a", "b", "foobar", "ÿ\u{10FFFF}", "order-123456789"] {
            let hash: i64 = query(AssertSqlSafe(format!(
                "SELECT \"{schema}\".stream_hash($1)"
            )))
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .unwrap()
            .get(0);
            assert_eq!(hash, stored_hash(stream_hash(name)), "{name:?}");
        }
        // An older build appending after the migration, and this one.
        query(AssertSqlSafe(old_append.clone()))
            .bind("late-old-build")
            .execute(&mut admin)
            .await
            .unwrap();
        let id = uuid::Uuid::now_v7();
        let event = EventData {
            id,
            event_type: "Pinged".into(),
            payload: b"{}".to_vec(),
            metadata: Metadata::caused_by(id),
        };
        store
            .append("late-new-build", ExpectedVersion::NoStream, vec![event])
            .await
            .unwrap();
        check(
            query(AssertSqlSafe(stored))
                .fetch_all(&mut admin)
                .await
                .unwrap(),
        );

        // Partitioned reads of the migrated log cover it exactly.
        let all = store.read_all(Position::ORIGIN, None, 1000).await.unwrap();
        assert_eq!(all.len(), streams.len() + 2);
        let mut seen = Vec::new();
        for index in 0..3 {
            let part = store
                .read_all_partition(Position::ORIGIN, None, Partition::new(index, 3), 1000)
                .await
                .unwrap();
            assert!(part.iter().all(|e| Partition::of(&e.stream, 3) == index));
            seen.extend(part.into_iter().map(|e| e.id));
        }
        seen.sort();
        let mut want: Vec<_> = all.iter().map(|e| e.id).collect();
        want.sort();
        assert_eq!(seen, want);

        drop(store);
        admin
            .execute(raw_sql(AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            ))))
            .await
            .unwrap();
    });
}
