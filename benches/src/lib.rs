//! Shared code of the aftermath benchmarks (`benches/store.rs`) and of the
//! throughput report (`src/bin/throughput.rs`):
//!
//! - [`domain`]: a small bank account aggregate with a serializable state,
//!   so snapshots work;
//! - [`raw`]: the plain-`rusqlite` baseline the SQLite store is compared
//!   with, on the same file, schema and pragmas;
//! - [`raw_pg`]: the plain-sqlx baseline the PostgreSQL store is compared
//!   with, on the same server, in a schema of its own;
//! - [`projections`]: a no-op and an upsert projection for catch-up runs;
//! - [`live`]: append-to-delivery latency of a caught-up reader;
//! - helpers: temporary database files and schemas, event batches, seeding
//!   long streams, paged `$all` reads and the process's peak memory.

#![warn(missing_docs)]

pub mod domain;
pub mod live;
pub mod pg_projections;
pub mod projections;
pub mod raw;
pub mod raw_pg;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aftermath::{
    Aggregate, EventData, EventStore, ExpectedVersion, Position, Repository, Snapshot, StoreError,
};

use crate::domain::{Account, AccountEvent};

/// A database file path under [`std::env::temp_dir`] that is deleted (with
/// its `-wal` and `-shm` files) when dropped. Nothing is created until a
/// store opens it.
#[derive(Debug)]
pub struct TempDb {
    path: PathBuf,
}

impl TempDb {
    /// A fresh, unused path whose file name contains `label`.
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "aftermath-bench-{}-{nanos:x}-{n}-{label}.db",
            std::process::id()
        );
        let path = std::env::temp_dir().join(name);
        let temp = TempDb { path };
        temp.remove_files();
        temp
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size of the database file plus its WAL, in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.files()
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    fn files(&self) -> [PathBuf; 3] {
        let with = |suffix: &str| {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            PathBuf::from(name)
        };
        [self.path.clone(), with("-wal"), with("-shm")]
    }

    fn remove_files(&self) {
        for file in self.files() {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        self.remove_files();
    }
}

/// The PostgreSQL URL from `AFTERMATH_PG_URL`, if set and not empty: the
/// PostgreSQL benchmarks run only with it.
pub fn pg_url() -> Option<String> {
    std::env::var("AFTERMATH_PG_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// A fresh schema name `bench_<label>_<12 random hex digits>` (`label`:
/// lowercase letters, digits, underscores), so runs never share tables.
pub fn bench_schema(label: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("bench_{label}_{}", &random[..12])
}

/// Drops the store's schema (`DROP SCHEMA ... CASCADE`) and closes its pool.
/// Call it with the last handle: the store's background task stops with it.
pub async fn drop_store_schema(store: aftermath::PostgresStore) -> Result<(), StoreError> {
    use aftermath::store::postgres::sqlx_core::{
        executor::Executor, raw_sql::raw_sql, sql_str::AssertSqlSafe,
    };
    let pool = store.pool().clone();
    let ddl = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", store.schema());
    drop(store);
    pool.execute(raw_sql(AssertSqlSafe(ddl)))
        .await
        .map_err(|e| StoreError::database("dropping a bench schema", e))?;
    pool.close().await;
    Ok(())
}

/// How many events the store's schema holds (one `count(*)`).
pub async fn store_event_count(store: &aftermath::PostgresStore) -> Result<u64, StoreError> {
    use aftermath::store::postgres::sqlx_core::{query::query, row::Row, sql_str::AssertSqlSafe};
    let sql = format!("SELECT count(*) FROM \"{}\".events", store.schema());
    let n: i64 = query(AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| StoreError::database("counting events", e))?;
    Ok(n as u64)
}

/// A `Deposited` event of the bench domain with a fresh (v7) id, encoded
/// exactly as the repository would encode it.
pub fn deposit(amount: u64) -> EventData {
    EventData::fresh(&AccountEvent::Deposited { amount }).expect("a deposit always encodes")
}

/// `n` deposit events with amounts `1..=n`.
pub fn deposits(n: usize) -> Vec<EventData> {
    (1..=n as u64).map(deposit).collect()
}

/// The `Opened` event of the bench domain with a fresh id.
pub fn opened(owner: &str) -> EventData {
    EventData::fresh(&AccountEvent::Opened {
        owner: owner.to_owned(),
    })
    .expect("an opening always encodes")
}

/// Writes an open account `id` with `events` events in total (one `Opened`
/// and deposits) straight to `store`, in appends of up to 1,000 events.
///
/// With `snapshot`, also saves the snapshot a repository with snapshots
/// would have saved at the stream's last version, so the next load reads
/// only the snapshot. Returns the stream's version.
pub async fn seed_account<S: EventStore + Clone>(
    store: &S,
    id: &str,
    events: usize,
    snapshot: bool,
) -> Result<u64, StoreError> {
    let stream = Account::stream_name(id);
    let mut version = 0u64;
    let mut left = events;
    let mut first = true;
    while left > 0 {
        let n = left.min(1000);
        let mut batch = Vec::with_capacity(n);
        if first {
            batch.push(opened(id));
            first = false;
        }
        while batch.len() < n {
            batch.push(deposit(1));
        }
        let done = store
            .append(&stream, ExpectedVersion::Exact(version), batch)
            .await?;
        version = done.last_version;
        left -= n;
    }
    if snapshot {
        let loaded = Repository::<Account, S>::new(store.clone())
            .load(id)
            .await?;
        let state = serde_json::to_vec(&loaded.state)
            .map_err(|e| StoreError::database("encoding a snapshot", e))?;
        store
            .save_snapshot(Snapshot {
                stream,
                version: loaded.version,
                state,
                taken_at: chrono::Utc::now(),
            })
            .await?;
    }
    Ok(version)
}

/// Reads `$all` from the start in pages of `page` events through
/// [`EventStore::read_all`], at most `max` events; returns how many were
/// read. Each page is dropped before the next is read.
pub async fn read_all_count<S: EventStore + ?Sized>(
    store: &S,
    page: usize,
    max: u64,
) -> Result<u64, StoreError> {
    let mut after = Position::ORIGIN;
    let mut read = 0u64;
    while read < max {
        let limit = page.min((max - read) as usize);
        let events = store.read_all(after, None, limit).await?;
        read += events.len() as u64;
        match events.last() {
            Some(last) if events.len() == limit => after = last.position,
            _ => break,
        }
    }
    Ok(read)
}

/// The process's peak resident set size in KiB (`VmHWM` from
/// `/proc/self/status`), or `None` where that file does not exist.
pub fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("VmHWM:")
}

/// The process's current resident set size in KiB (`VmRSS`).
pub fn rss_kib() -> Option<u64> {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}
