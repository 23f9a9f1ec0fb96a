//! PostgreSQL helpers for the subscription, projection, reactor and
//! partition tests (and the `sub_helper` binary): fresh schemas that are
//! dropped afterwards, and [`PgBalances`], the PostgreSQL twin of the
//! SQLite [`Balances`](crate::projections::Balances) read model.
//!
//! Tests run when `AFTERMATH_PG_URL` is set (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`) and print `SKIPPED` otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aftermath::projection::{HandlerError, Projection};
use aftermath::store::postgres::PgTx;
use aftermath::{PostgresOptions, PostgresStore, Recorded};
use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::PgConnection;
use uuid::Uuid;

use crate::domain::AccountEvent;
use crate::projections::{Hook, Model, delta};

/// Runs `create` (DDL with `IF NOT EXISTS`) in a projection's setup, one
/// setup at a time: partitions and workers set up at once, and PostgreSQL's
/// `CREATE TABLE IF NOT EXISTS` is not safe against itself (a transaction
/// lock keyed by the statement: fine behind a pooler).
pub async fn create_one_at_a_time(tx: &mut PgTx, create: &str) -> Result<(), HandlerError> {
    query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(create)
        .execute(tx.conn())
        .await?;
    raw_sql(AssertSqlSafe(create.to_owned()))
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// The server URL from `AFTERMATH_PG_URL`, if set.
pub fn url() -> Option<String> {
    std::env::var("AFTERMATH_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// Drops its schema (best effort) when dropped.
pub struct SchemaGuard {
    /// The server.
    pub url: String,
    /// The schema.
    pub schema: String,
}

impl SchemaGuard {
    /// A fresh schema name on `url` (nothing is created yet).
    pub fn new(url: &str) -> SchemaGuard {
        SchemaGuard {
            url: url.to_owned(),
            schema: format!("aftermath_test_{}", Uuid::new_v4().simple()),
        }
    }
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        if std::env::var_os("AFTERMATH_KEEP_SCHEMA").is_some() {
            eprintln!("keeping test schema {}", self.schema);
            return;
        }
        let url = self.url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        // The test's runtime may be the one dropping us: a thread with a
        // runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&url).await.ok()?;
                conn.execute(raw_sql(AssertSqlSafe(sql))).await.ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("could not drop test schema {}", self.schema);
        }
    }
}

/// Connects a store to `schema` (poll every 50 ms, 8 connections).
pub async fn connect(url: &str, schema: &str) -> PostgresStore {
    PostgresStore::connect_with(
        url,
        PostgresOptions::default()
            .schema(schema)
            .max_connections(8)
            .poll_interval(std::time::Duration::from_millis(50)),
    )
    .await
    .unwrap_or_else(|e| panic!("AFTERMATH_PG_URL is set ({url}) but the store cannot connect: {e}"))
}

/// A store in a fresh schema, or `None` (after printing `SKIPPED`) without
/// a server. Keep the guard for the test's duration.
pub async fn fresh(test: &str) -> Option<(SchemaGuard, PostgresStore)> {
    let Some(url) = url() else {
        crate::report_skip(format_args!(
            "SKIPPED postgres::{test}: AFTERMATH_PG_URL not set"
        ));
        return None;
    };
    let guard = SchemaGuard::new(&url);
    let store = connect(&url, &guard.schema).await;
    Some((guard, store))
}

/// A plain connection to the test server.
pub async fn raw(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("AFTERMATH_PG_URL is set ({url}) but connecting failed: {e}"))
}

/// Calls the schema's `append` function on `conn`, inside whatever
/// transaction `conn` has open (the store calls it as one autocommit
/// statement): a test can hold an append paused before its commit, or append
/// inside its own transaction and savepoints. Any expected version.
pub async fn append_in(
    conn: &mut PgConnection,
    schema: &str,
    stream: &str,
    events: &[aftermath::EventData],
) -> Result<(), sqlx_core::Error> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let types: Vec<String> = events.iter().map(|e| e.event_type.clone()).collect();
    let payloads: Vec<Vec<u8>> = events.iter().map(|e| e.payload.clone()).collect();
    let metadata: Vec<String> = events
        .iter()
        .map(|e| serde_json::to_string(&e.metadata).expect("metadata serializes"))
        .collect();
    let correlation: Vec<Uuid> = events.iter().map(|e| e.metadata.correlation_id).collect();
    let causation: Vec<Uuid> = events.iter().map(|e| e.metadata.causation_id).collect();
    query(AssertSqlSafe(format!(
        "SELECT out_transaction FROM \"{schema}\".append($1, 0, 9223372036854775807, false, \
         false, $2, $3, $4, $5, $6, $7, \"{schema}\".stream_hash($1))"
    )))
    .bind(stream)
    .bind(ids)
    .bind(types)
    .bind(payloads)
    .bind(metadata)
    .bind(correlation)
    .bind(causation)
    .execute(conn)
    .await
    .map(|_| ())
}

/// The balances projection on PostgreSQL: the same two tables as
/// [`Balances`](crate::projections::Balances), in the store's schema:
/// `<name>_balances (account PRIMARY KEY, balance, events)` and
/// `<name>_applied (position PRIMARY KEY, applied_by)`, so applying an event
/// twice violates the primary key and a lost event is a missing row. Every
/// write touches the event's stream's row only, so partitions of it commit
/// side by side.
#[derive(Clone)]
pub struct PgBalances {
    name: String,
    version: u32,
    tag: String,
    hook: Option<Hook>,
    delay: std::time::Duration,
    hang: Option<(u64, Arc<std::sync::atomic::AtomicBool>)>,
    resets: Arc<AtomicU64>,
    create: String,
    drop: String,
    upsert: String,
    insert_applied: String,
}

impl PgBalances {
    /// A projection named `name` (letters, digits and `_`: it prefixes table
    /// names) with its tables in `schema`, version 1, tagging rows `tag`.
    pub fn new(schema: &str, name: &str, tag: &str) -> Self {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "projection name `{name}` must be a plain SQL identifier"
        );
        let t = |suffix: &str| format!("\"{schema}\".{name}_{suffix}");
        PgBalances {
            name: name.to_owned(),
            version: 1,
            tag: tag.to_owned(),
            hook: None,
            delay: std::time::Duration::ZERO,
            hang: None,
            resets: Arc::default(),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {} (
                     account text PRIMARY KEY,
                     balance bigint NOT NULL,
                     events  bigint NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS {} (
                     position   bigint PRIMARY KEY,
                     applied_by text NOT NULL
                 );",
                t("balances"),
                t("applied")
            ),
            drop: format!(
                "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {};",
                t("balances"),
                t("applied")
            ),
            upsert: format!(
                "INSERT INTO {} AS b (account, balance, events) VALUES ($1, $2, 1)
                 ON CONFLICT (account) DO UPDATE SET
                     balance = b.balance + excluded.balance, events = b.events + 1",
                t("balances")
            ),
            insert_applied: format!(
                "INSERT INTO {} (position, applied_by) VALUES ($1, $2)",
                t("applied")
            ),
        }
    }

    /// Sets the read model's version.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Runs `hook` before every apply; its error fails the apply.
    pub fn hook(
        mut self,
        hook: impl Fn(&Recorded<AccountEvent>) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Makes every apply wait `delay` (asynchronously, inside the batch's
    /// transaction): a slow projection for takeover tests.
    pub fn delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Makes the first apply of the event at `position` never finish (a
    /// hung call: pending forever, inside the batch's transaction); later
    /// applies of it work. Returns the flag that says it hung.
    pub fn hang_once_at(mut self, position: u64) -> (Self, Arc<std::sync::atomic::AtomicBool>) {
        let hung = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.hang = Some((position, hung.clone()));
        (self, hung)
    }

    /// How many times `reset` ran (shared by clones).
    pub fn resets(&self) -> Arc<AtomicU64> {
        self.resets.clone()
    }
}

impl Projection for PgBalances {
    type Event = AccountEvent;
    type Db = PostgresStore;

    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> u32 {
        self.version
    }

    async fn setup(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        create_one_at_a_time(tx, &self.create).await
    }

    async fn reset(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        raw_sql(AssertSqlSafe(self.drop.clone()))
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut PgTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        if let Some(hook) = &self.hook {
            hook(event)?;
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let Some((at, hung)) = &self.hang
            && event.position.0 == *at
            && !hung.swap(true, Ordering::SeqCst)
        {
            std::future::pending::<()>().await;
        }
        query(AssertSqlSafe(self.upsert.clone()))
            .bind(&event.stream)
            .bind(delta(&event.event))
            .execute(&mut **tx)
            .await?;
        query(AssertSqlSafe(self.insert_applied.clone()))
            .bind(event.position.0 as i64)
            .bind(&self.tag)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// Whether table `<name>_applied` exists in the store's schema.
async fn has_model(store: &PostgresStore, name: &str) -> bool {
    query("SELECT to_regclass(quote_ident($1) || '.' || quote_ident($2)) IS NOT NULL")
        .bind(store.schema())
        .bind(format!("{name}_applied"))
        .fetch_one(store.pool())
        .await
        .and_then(|row| row.try_get(0))
        .expect("look up the read model's table")
}

/// Reads the read model of [`PgBalances`] `name` (empty without tables).
pub async fn read_model(store: &PostgresStore, name: &str) -> Model {
    if !has_model(store, name).await {
        return Model::default();
    }
    let schema = store.schema();
    let mut model = Model::default();
    let rows = query(AssertSqlSafe(format!(
        "SELECT account, balance, events FROM \"{schema}\".{name}_balances ORDER BY account"
    )))
    .fetch_all(store.pool())
    .await
    .expect("read the balances");
    for row in rows {
        let events: i64 = row.get(2);
        model
            .balances
            .insert(row.get(0), (row.get(1), events as u64));
    }
    model.applied = read_applied_by(store, name)
        .await
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    model
}

/// `(position, applied_by)` of every applied event, ascending.
pub async fn read_applied_by(store: &PostgresStore, name: &str) -> Vec<(u64, String)> {
    if !has_model(store, name).await {
        return Vec::new();
    }
    let schema = store.schema();
    query(AssertSqlSafe(format!(
        "SELECT position, applied_by FROM \"{schema}\".{name}_applied ORDER BY position"
    )))
    .fetch_all(store.pool())
    .await
    .expect("read the applied table")
    .iter()
    .map(|row| (row.get::<i64, _>(0) as u64, row.get(1)))
    .collect()
}
