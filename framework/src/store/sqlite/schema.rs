//! Opening the database file: recognising it, WAL mode, and the versioned
//! schema migrations (the `.sql` files in `migrations/`).

use std::path::Path;

use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use super::{SqliteOptions, Synchronous};
use crate::store::StoreError;

/// `PRAGMA application_id` of every aftermath database: "AFTM" in ASCII.
pub(super) const APPLICATION_ID: i32 = 0x4146_544D;

/// The migrations, in order: migration `i` (0-based) brings the schema to
/// version `i + 1`. Never edit a released migration; append a new one.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_events.sql"),
    include_str!("migrations/0002_subscriptions.sql"),
    include_str!("migrations/0003_reactors.sql"),
    include_str!("migrations/0004_inbox.sql"),
    include_str!("migrations/0005_unsettled_effects.sql"),
    include_str!("migrations/0006_process.sql"),
    include_str!("migrations/0007_lease_holders.sql"),
    include_str!("migrations/0008_groups.sql"),
    include_str!("migrations/0009_trace.sql"),
];

/// The schema version this build creates and understands.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const VERSION_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS aftermath_schema (version INTEGER PRIMARY KEY, applied_at TEXT)";

/// What an opened file turned out to hold.
enum Found {
    /// No tables and no application id: a new database.
    Empty,
    /// An aftermath database at this schema version (0 if the version table
    /// is missing).
    Ours { version: i64 },
}

/// Opens (creating if needed) the writer connection: checks that the file is
/// an aftermath database or empty, switches to WAL, applies pending
/// migrations and the connection settings.
pub(super) fn open_writer(
    path: &Path,
    location: &str,
    options: &SqliteOptions,
) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| refuse_or(location, "opening the database", e))?;
    conn.busy_timeout(options.busy_timeout)
        .map_err(|e| StoreError::database("setting the busy timeout", e))?;

    // Look before touching anything: a foreign file must stay as it is.
    inspect(&conn, location)?;

    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| refuse_or(location, "enabling WAL mode", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(incompatible(
            location,
            format!(
                "SQLite refused WAL mode (journal mode is `{mode}`); the store needs a database file on a local file system"
            ),
        ));
    }
    let synchronous = match options.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(|e| StoreError::database("setting PRAGMA synchronous", e))?;

    migrate(&conn, location)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Brings the schema up to [`SCHEMA_VERSION`] in one immediate transaction,
/// so that two processes opening a new file at once do not both create it.
fn migrate(conn: &Connection, location: &str) -> Result<(), StoreError> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
        .map_err(|e| refuse_or(location, "starting the schema migration", e))?;
    // Again, under the write lock: another process may have been quicker.
    let version = match inspect(&tx, location)? {
        Found::Empty => 0,
        Found::Ours { version } => version,
    };
    if version >= SCHEMA_VERSION {
        return Ok(()); // dropping `tx` ends the (empty) transaction
    }
    let failed = |e| StoreError::database("migrating the schema", e);
    tx.execute_batch(VERSION_TABLE).map_err(failed)?;
    let pending = usize::try_from(version).unwrap_or(0);
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(pending) {
        tx.execute_batch(sql).map_err(failed)?;
        if index + 1 == 8 {
            super::deadlines::backfill_instance_hashes(&tx).map_err(failed)?;
        }
        tx.execute(
            "INSERT INTO aftermath_schema (version, applied_at) VALUES (?1, ?2)",
            (index as i64 + 1, chrono::Utc::now().to_rfc3339()),
        )
        .map_err(failed)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(failed)?;
    tx.commit()
        .map_err(|e| StoreError::database("committing the schema migration", e))
}

/// Recognises the file without changing it.
fn inspect(conn: &Connection, location: &str) -> Result<Found, StoreError> {
    let reading = |e| refuse_or(location, "reading the database header", e);
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(reading)?;
    if app_id == 0 {
        let other: Option<String> = conn
            .query_row(
                "SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(reading)?;
        return match other {
            None => Ok(Found::Empty),
            Some(name) => Err(incompatible(
                location,
                format!(
                    "it is a SQLite database of another application (it contains `{name}` and lacks aftermath's application_id {APPLICATION_ID:#010x})"
                ),
            )),
        };
    }
    if app_id != i64::from(APPLICATION_ID) {
        return Err(incompatible(
            location,
            format!(
                "it is a SQLite database of another application (application_id {app_id:#010x}, aftermath uses {APPLICATION_ID:#010x})"
            ),
        ));
    }
    let has_versions: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'aftermath_schema')",
            [],
            |row| row.get(0),
        )
        .map_err(reading)?;
    let version: i64 = if has_versions {
        conn.query_row(
            "SELECT coalesce(max(version), 0) FROM aftermath_schema",
            [],
            |row| row.get(0),
        )
        .map_err(|e| StoreError::database("reading the schema version", e))?
    } else {
        0
    };
    if version > SCHEMA_VERSION {
        return Err(incompatible(
            location,
            format!(
                "its schema version is {version}, but this build of aftermath supports schema versions up to {SCHEMA_VERSION}; open it with a newer aftermath"
            ),
        ));
    }
    Ok(Found::Ours { version })
}

fn incompatible(location: &str, reason: String) -> StoreError {
    StoreError::Incompatible {
        location: location.to_owned(),
        reason,
    }
}

/// "File is not a database" becomes [`StoreError::Incompatible`]; anything
/// else is a driver error.
fn refuse_or(location: &str, operation: &'static str, e: rusqlite::Error) -> StoreError {
    if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) {
        incompatible(location, "the file is not a SQLite database".to_owned())
    } else {
        StoreError::database(operation, e)
    }
}
