//! Opening the store the command line names, without creating one.

use std::path::PathBuf;
use std::time::Duration;

use aftermath::store::postgres::sqlx_core::connection::Connection;
use aftermath::store::postgres::sqlx_core::query_scalar::query_scalar;
use aftermath::store::postgres::sqlx_core::sql_str::AssertSqlSafe;
use aftermath::store::postgres::sqlx_postgres::{PgConnectOptions, PgConnection};
use aftermath::{PostgresOptions, PostgresStore, SqliteStore};

use crate::{Failure, one_line};

/// Where the store is.
#[derive(Debug, Clone)]
pub enum Target {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (the schema is given apart).
    Postgres(String),
}

/// An open store.
pub enum Store {
    /// The SQLite backend.
    Sqlite(SqliteStore),
    /// The PostgreSQL backend.
    Postgres(PostgresStore),
}

/// Runs `$body` with `$s` bound to the open store, whatever its backend.
#[macro_export]
macro_rules! with_store {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite($s) => $body,
            $crate::store::Store::Postgres($s) => $body,
        }
    };
}

/// How long connecting to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema versions of an opened store.
#[derive(Debug, Clone, Copy)]
pub struct Versions {
    /// The store's version before it was opened (0: no version table).
    pub found: i64,
    /// The version this build creates and understands.
    pub build: i64,
}

/// The schema version of the aftermath store in the SQLite file at `path`,
/// read without changing it: `Ok(None)` when it is not one of ours (the
/// library then refuses it with its typed error), an error for an empty
/// file (which the library would turn into a new store).
fn sqlite_version(path: &std::path::Path) -> Result<Option<i64>, Failure> {
    use aftermath::store::sqlite::rusqlite::{Connection as Sqlite, OpenFlags};
    let Ok(conn) = Sqlite::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return Ok(None);
    };
    let Ok(app_id) = conn.pragma_query_value(None, "application_id", |r| r.get::<_, i64>(0)) else {
        return Ok(None);
    };
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .unwrap_or(1);
    if app_id == 0 && tables == 0 {
        return Err(Failure::error(format!(
            "{} is an empty SQLite database, not an aftermath store (the tool never creates a store)",
            path.display()
        )));
    }
    if app_id != 0x4146_544D {
        return Ok(None);
    }
    Ok(Some(
        conn.query_row(
            "SELECT coalesce(max(version), 0) FROM aftermath_schema",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0),
    ))
}

/// Refuses to open a store of an older schema unless `migrate`: opening
/// migrates it, under the application that runs on it.
fn refuse_older(where_: &str, found: i64, build: i64, migrate: bool) -> Result<(), Failure> {
    if found < build && !migrate {
        return Err(Failure::error(format!(
            "{where_} is at schema version {found}, this tool's is {build}: the tool does not migrate a store behind its application's back (upgrade the application, or run `aftermath migrate`)"
        )));
    }
    Ok(())
}

impl Store {
    /// Opens `target`: an existing SQLite file, or an existing schema on a
    /// PostgreSQL server. Never creates a store; migrates an older one only
    /// when `migrate`.
    pub async fn open(
        target: &Target,
        schema: &str,
        migrate: bool,
    ) -> Result<(Store, Versions), Failure> {
        match target {
            Target::Sqlite(path) => {
                match std::fs::metadata(path) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(Failure::error(format!(
                            "{} is not a file (expected an aftermath SQLite store)",
                            path.display()
                        )));
                    }
                    Err(e) => {
                        let why = if e.kind() == std::io::ErrorKind::NotFound {
                            "no such file".to_owned()
                        } else {
                            e.to_string()
                        };
                        return Err(Failure::error(format!(
                            "cannot open {}: {why} (the tool never creates a store; run your application first)",
                            path.display(),
                        )));
                    }
                }
                let build = aftermath::store::sqlite::SCHEMA_VERSION;
                let found = sqlite_version(path)?;
                if let Some(found) = found {
                    refuse_older(&path.display().to_string(), found, build, migrate)?;
                }
                let store = SqliteStore::open(path).await?;
                Ok((
                    Store::Sqlite(store),
                    Versions {
                        found: found.unwrap_or(build),
                        build,
                    },
                ))
            }
            Target::Postgres(url) => {
                let connect = url
                    .parse::<PgConnectOptions>()
                    .map_err(|e| Failure::error(format!("bad PostgreSQL URL: {}", one_line(&e))))?;
                let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
                    // Look before connecting the store, which would create
                    // a missing schema.
                    let mut probe = PgConnection::connect_with(&connect).await.map_err(|e| {
                        Failure::error(format!(
                            "cannot connect to PostgreSQL at {}:{}: {}",
                            connect.get_host(),
                            connect.get_port(),
                            one_line(&e)
                        ))
                    })?;
                    let exists: bool = query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                    )
                    .bind(schema)
                    .fetch_one(&mut probe)
                    .await
                    .map_err(|e| Failure::error(one_line(&e)))?;
                    if !exists {
                        return Err(Failure::error(format!(
                            "no schema `{schema}` in database `{}` on {}:{} (the tool never creates a store; give the application's schema with --schema)",
                            connect.get_database().unwrap_or("?"),
                            connect.get_host(),
                            connect.get_port()
                        )));
                    }
                    let build = i64::from(aftermath::store::postgres::SCHEMA_VERSION);
                    let versioned: bool = query_scalar(
                        "SELECT to_regclass(quote_ident($1) || '.aftermath_schema') IS NOT NULL",
                    )
                    .bind(schema)
                    .fetch_one(&mut probe)
                    .await
                    .map_err(|e| Failure::error(one_line(&e)))?;
                    if !versioned && !migrate {
                        return Err(Failure::error(format!(
                            "schema `{schema}` holds no aftermath store (no aftermath_schema table)"
                        )));
                    }
                    let found = if versioned {
                        let sql = format!(
                            "SELECT coalesce(max(version), 0)::bigint FROM \"{}\".aftermath_schema",
                            schema.replace('"', "\"\"")
                        );
                        query_scalar(AssertSqlSafe(sql))
                            .fetch_one(&mut probe)
                            .await
                            .map_err(|e| Failure::error(one_line(&e)))?
                    } else {
                        0
                    };
                    let _ = probe.close().await;
                    refuse_older(&format!("schema `{schema}`"), found, build, migrate)?;
                    let options = PostgresOptions::default()
                        .schema(schema)
                        .max_connections(2)
                        .notify(false);
                    let store = PostgresStore::connect_to(connect.clone(), options).await?;
                    Ok((store, Versions { found, build }))
                })
                .await
                .map_err(|_| {
                    Failure::error(format!(
                        "cannot connect to PostgreSQL at {}:{}: no answer within {}s",
                        connect.get_host(),
                        connect.get_port(),
                        CONNECT_TIMEOUT.as_secs()
                    ))
                })??;
                Ok((Store::Postgres(opened.0), opened.1))
            }
        }
    }

    /// Where the store is, for headers.
    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite(s) => format!("sqlite {}", s.path().display()),
            Store::Postgres(s) => format!("postgres schema {}", s.schema()),
        }
    }
}
