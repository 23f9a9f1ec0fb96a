//! Creating and migrating the store's schema: the `.sql` files in
//! `migrations/`, with the schema name filled in, recorded in a version
//! table inside the schema.

use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::{PgConnection, PgPool};

use super::events::db;
use crate::store::StoreError;

/// The migrations, in order: migration `i` (0-based) brings the schema to
/// version `i + 1`. Never edit a released migration; append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_events.sql"),
    include_str!("migrations/0002_subscriptions.sql"),
    include_str!("migrations/0003_stream_hash.sql"),
    include_str!("migrations/0004_unsettled_effects.sql"),
    include_str!("migrations/0005_process.sql"),
    include_str!("migrations/0006_append_horizon.sql"),
    include_str!("migrations/0007_lease_holders.sql"),
    include_str!("migrations/0008_read_columns.sql"),
    include_str!("migrations/0009_groups.sql"),
    include_str!("migrations/0010_read_typed_merge.sql"),
];

/// The schema version this build creates and understands.
pub(super) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The longest schema name: the notification channel `<schema>_events` must
/// fit PostgreSQL's 63-byte identifiers.
const MAX_SCHEMA_NAME: usize = 63 - "_events".len();

/// Checks a schema name: lowercase ASCII letters, digits and underscores,
/// not starting with a digit, at most 56 characters. (The name is written
/// into SQL and into the notification channel's name, so it is kept plain.)
pub(super) fn check_name(name: &str) -> Result<(), String> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    let starts_well = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if plain && starts_well && name.len() <= MAX_SCHEMA_NAME && !name.starts_with("pg_") {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a usable schema name: use lowercase ASCII letters, digits and \
             underscores, start with a letter or underscore, not `pg_`, at most {MAX_SCHEMA_NAME} characters"
        ))
    }
}

/// The SQL of a migration for schema `name`.
pub(super) fn substitute(sql: &str, name: &str) -> String {
    sql.replace("{schema}", &format!("\"{name}\""))
        .replace("{name}", name)
}

/// What the schema turned out to hold.
enum Found {
    /// No schema, or an empty one.
    Empty,
    /// An aftermath store at this version.
    Ours(i32),
}

/// Brings the schema up to [`SCHEMA_VERSION`]. Without anything to do it
/// only reads (no DDL, no lock), so a role that cannot create objects can
/// open an up-to-date store. Otherwise it migrates in one transaction under
/// an advisory lock, so two processes connecting at once do not both create
/// the schema. A schema of another application, or a newer version, is
/// [`StoreError::Incompatible`].
pub(super) async fn migrate(pool: &PgPool, name: &str, location: &str) -> Result<(), StoreError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(db("connecting to PostgreSQL"))?;
    if let Found::Ours(version) = inspect(&mut conn, name, location).await?
        && version == SCHEMA_VERSION
    {
        return Ok(());
    }
    let failed = db("migrating the schema");
    let mut tx = Connection::begin(&mut *conn)
        .await
        .map_err(db("starting the schema migration"))?;
    query("SELECT pg_advisory_xact_lock(hashtext($1), 0)")
        .bind(format!("{name}.migrate"))
        .execute(&mut *tx)
        .await
        .map_err(db("taking the migration lock"))?;
    // Again, under the lock: another process may have been quicker.
    let version = match inspect(&mut tx, name, location).await? {
        Found::Empty => 0,
        Found::Ours(version) => version,
    };
    if version < SCHEMA_VERSION {
        let setup = format!(
            "CREATE SCHEMA IF NOT EXISTS \"{name}\"; \
             CREATE TABLE IF NOT EXISTS \"{name}\".aftermath_schema \
             (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        );
        tx.execute(raw_sql(AssertSqlSafe(setup)))
            .await
            .map_err(failed)?;
        let pending = usize::try_from(version).unwrap_or(0);
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(pending) {
            tx.execute(raw_sql(AssertSqlSafe(substitute(sql, name))))
                .await
                .map_err(db("migrating the schema"))?;
            query(AssertSqlSafe(format!(
                "INSERT INTO \"{name}\".aftermath_schema (version) VALUES ($1)"
            )))
            .bind(index as i32 + 1)
            .execute(&mut *tx)
            .await
            .map_err(db("recording a schema migration"))?;
        }
    }
    tx.commit()
        .await
        .map_err(db("committing the schema migration"))
}

/// Re-bases positions when the log was moved to a cluster whose transaction
/// counter is behind the stored ids (migration 6, `order.rs`): one index
/// probe when nothing moved. Logs a warning when it re-based.
pub(super) async fn rebase_positions(
    pool: &PgPool,
    name: &str,
    location: &str,
) -> Result<(), StoreError> {
    let row = query(AssertSqlSafe(format!(
        "SELECT out_offset, out_rebased FROM \"{name}\".rebase_positions()"
    )))
    .fetch_one(pool)
    .await
    .map_err(db(
        "checking the log's positions against the cluster's transaction ids",
    ))?;
    let failed = || db("checking the log's positions against the cluster's transaction ids");
    let offset: i64 = row.try_get(0).map_err(failed())?;
    let rebased: bool = row.try_get(1).map_err(failed())?;
    if rebased {
        tracing::warn!(
            location,
            offset,
            "the event log holds transaction ids ahead of this cluster's counter (it was restored \
             or replicated from another cluster): new positions are re-based above every stored \
             one; stored events, checkpoints and journals keep their positions"
        );
    }
    Ok(())
}

/// Recognises the schema without changing it.
async fn inspect(conn: &mut PgConnection, name: &str, location: &str) -> Result<Found, StoreError> {
    let row = query(
        "SELECT to_regclass(quote_ident($1) || '.aftermath_schema') IS NOT NULL, \
           (SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 ORDER BY c.relname LIMIT 1)",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await
    .map_err(db("inspecting the schema"))?;
    let has_versions: bool = row.try_get(0).map_err(db("inspecting the schema"))?;
    let other: Option<String> = row.try_get(1).map_err(db("inspecting the schema"))?;
    if !has_versions {
        return match other {
            None => Ok(Found::Empty),
            Some(table) => Err(StoreError::Incompatible {
                location: location.to_owned(),
                reason: format!(
                    "schema `{name}` holds `{table}` but no `aftermath_schema` table: it belongs to \
                     another application (choose another schema with PostgresOptions::schema)"
                ),
            }),
        };
    }
    let version: i32 = query(AssertSqlSafe(format!(
        "SELECT coalesce(max(version), 0) FROM \"{name}\".aftermath_schema"
    )))
    .fetch_one(&mut *conn)
    .await
    .and_then(|row| row.try_get(0))
    .map_err(db("reading the schema version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Incompatible {
            location: location.to_owned(),
            reason: format!(
                "schema `{name}` is at version {version}, but this build of aftermath supports \
                 versions up to {SCHEMA_VERSION}; open it with a newer aftermath"
            ),
        });
    }
    Ok(Found::Ours(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for good in ["aftermath", "_x", "a1_b2", &"s".repeat(56)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Aftermath",
            "1abc",
            "a-b",
            "a b",
            "a\"b",
            "pg_temp",
            &"s".repeat(57),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn migrations_name_the_schema_everywhere() {
        let sql = substitute(MIGRATIONS[0], "shop");
        assert!(!sql.contains("{schema}") && !sql.contains("{name}"));
        assert!(sql.contains("CREATE TABLE \"shop\".events"));
        assert!(sql.contains("pg_notify('shop_events', '')"));
        for migration in &MIGRATIONS[1..] {
            let sql = substitute(migration, "shop");
            assert!(!sql.contains("{schema}") && !sql.contains("{name}"));
        }
        assert!(substitute(MIGRATIONS[2], "shop").contains("pg_notify('shop_events', '')"));
    }
}
