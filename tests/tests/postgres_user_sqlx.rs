//! An application that uses sqlx itself, through the `sqlx` facade (default
//! features + `postgres`), beside aftermath with its default `sqlite`
//! feature and `postgres`: this crate depending on both is the proof that
//! the build resolves (one `libsqlite3-sys` for rusqlite and sqlx's SQLite
//! driver); the test shows the types are one: the application's `PgPool`
//! is the store's, and a projection writes with `sqlx::query` in the
//! store's transaction, reading the application's own table.
//!
//! Runs when `AFTERMATH_PG_URL` is set; prints SKIPPED otherwise.

use aftermath::projection::{HandlerError, Projection, ProjectionRunner, ReadModelDb};
use aftermath::store::postgres::PgTx;
use aftermath::{PostgresOptions, PostgresStore, Recorded, SqliteStore};
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::postgres::{SchemaGuard, url};
use aftermath_tests::projections::{append_accounts, delta};
use sqlx::Row;

/// Writes each event's amount, times the application's `rates` row for its
/// account, into `ledger`: plain `sqlx` (the facade) on the store's
/// transaction.
struct Ledger {
    schema: String,
}

impl Projection for Ledger {
    type Event = AccountEvent;
    type Db = PostgresStore;

    fn name(&self) -> &str {
        "ledger"
    }

    async fn setup(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS \"{}\".ledger (
                 position bigint PRIMARY KEY,
                 account  text NOT NULL,
                 amount   bigint NOT NULL
             )",
            self.schema
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(create))
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut PgTx) -> Result<(), HandlerError> {
        let drop = format!("DROP TABLE IF EXISTS \"{}\".ledger", self.schema);
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut PgTx,
        event: &Recorded<AccountEvent>,
    ) -> Result<(), HandlerError> {
        let insert = format!(
            "INSERT INTO \"{0}\".ledger (position, account, amount)
             SELECT $1, $2, $3 * r.rate FROM \"{0}\".rates r WHERE r.account = $2",
            self.schema
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(insert))
            .bind(event.position.0 as i64)
            .bind(&event.stream)
            .bind(delta(&event.event))
            .execute(tx.conn())
            .await?;
        if done.rows_affected() != 1 {
            return Err(HandlerError::msg(format!(
                "no rate for {} in the application's table",
                event.stream
            )));
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_application_on_the_sqlx_facade_shares_the_stores_pool() {
    let Some(url) = url() else {
        aftermath_tests::skip_notice!(
            "SKIPPED postgres_user_sqlx::an_application_on_the_sqlx_facade_shares_the_stores_pool: AFTERMATH_PG_URL not set"
        );
        return;
    };
    let guard = SchemaGuard::new(&url);
    let schema = guard.schema.clone();

    // The application's pool, from the facade, and the default SQLite store
    // in the same binary.
    let pool: sqlx::PgPool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .expect("the application's pool");
    let dir = tempfile::tempdir().expect("temp dir");
    let _sqlite = SqliteStore::open(dir.path().join("local.db"))
        .await
        .expect("the SQLite store");

    let store = PostgresStore::from_pool(pool.clone(), PostgresOptions::default().schema(&schema))
        .await
        .expect("a store on the application's pool");
    let same: &sqlx::PgPool = store.pool();
    assert!(same.connect_options().get_host() == pool.connect_options().get_host());

    // The application's own table, written with its own pool.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".rates (account text PRIMARY KEY, rate bigint NOT NULL);
         INSERT INTO \"{schema}\".rates SELECT 'account-' || n, n + 1 FROM generate_series(0, 4) n;"
    )))
    .execute(&pool)
    .await
    .expect("the application's table");

    let head = append_accounts(&store, 0, 200, 3, 5).await;
    let runner = ProjectionRunner::new(
        Ledger {
            schema: schema.clone(),
        },
        store.clone(),
        store.clone(),
    );
    assert_eq!(runner.catch_up().await.expect("catch up"), head);

    // Read back through the application's pool: every event once, at its
    // rate, and the checkpoint committed with the rows.
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*), coalesce(max(position), 0), coalesce(sum(amount), 0)::bigint
         FROM \"{schema}\".ledger"
    )))
    .fetch_one(&pool)
    .await
    .expect("read the ledger");
    let (count, last, total): (i64, i64, i64) = (rows.get(0), rows.get(1), rows.get(2));
    assert_eq!(count, 200);
    assert_eq!(last as u64, head.0);
    let expected: i64 = (0..200u64)
        .map(|k| {
            let account = (k / 3) % 5;
            delta(&aftermath_tests::projections::account_event(k, 5)) * (account as i64 + 1)
        })
        .sum();
    assert_eq!(total, expected);
    let state = ReadModelDb::load_state(&store, "ledger")
        .await
        .expect("load the checkpoint")
        .expect("a checkpoint");
    assert_eq!(state.position, head);
}
