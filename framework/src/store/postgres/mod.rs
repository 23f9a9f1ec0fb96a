//! The production backend: PostgreSQL through sqlx.
//!
//! [`PostgresStore`] keeps the event log and snapshots in one schema
//! (`aftermath` unless [`PostgresOptions::schema`] says otherwise):
//!
//! - **Appends** are one statement each: a call of the schema's `append`
//!   function, which takes the stream's advisory lock, checks the expected
//!   version, and inserts the whole batch with one `INSERT ... SELECT FROM
//!   unnest(...)`. Appends to different streams never wait for each other;
//!   appends to one stream are serialized by its lock, so a version check
//!   can never lose a write. A reused event id is recognised by the
//!   `events_id` constraint and reported as [`StoreError::DuplicateEventId`]
//!   (or, for the same batch at the same place, as an idempotent retry).
//! - **`$all` is ordered by the appending transaction's id** (`xid8`) and
//!   readers only read below the append horizon, so no reader can ever
//!   skip an event, without serializing writers. The position of an event
//!   is `transaction_id << 20 | index in the transaction`; the reasoning,
//!   and the limits, are in `order.rs` (see [`PostgresStore`]).
//! - **The schema is versioned**: a table `aftermath_schema` inside the
//!   schema records the applied migrations (the `.sql` files beside this
//!   module); connecting applies pending ones under an advisory lock, and
//!   refuses a newer schema with [`StoreError::Incompatible`].
//! - **`watch_head`** moves after appends through this handle, and on
//!   `LISTEN/NOTIFY` (with a poll fallback) for appends of other processes.
//! - **Subscribers persist here too**: the store is a
//!   [`ReadModelDb`](crate::projection::ReadModelDb) (projections write
//!   through [`PgTx`], the open transaction that also commits their
//!   checkpoint), a [`CheckpointStore`](crate::subscription::CheckpointStore),
//!   a [`LeaseStore`](crate::subscription::LeaseStore) whose fenced writes
//!   are atomic with the lease check (`subscriptions.rs` says why), an
//!   [`EffectJournal`](crate::reactor::EffectJournal), and a
//!   [`DeadlineStore`](crate::process::DeadlineStore) for process managers.
//! - **Partitioned reads** filter in SQL: every event row stores its
//!   stream's [`stream_hash`](crate::subscription::stream_hash), and
//!   [`EventStore::read_all_partition`] reads one range of it.
//!
//! The pool is yours to share: [`PostgresStore::pool`] (or
//! [`PostgresStore::from_pool`]) lets projections run their own SQL on the
//! same connections. The driver crates are re-exported as
//! [`sqlx_core`] and [`sqlx_postgres`].
//!
//! # Your own sqlx
//!
//! The backend is built on sqlx 0.9 (`sqlx-core` and `sqlx-postgres`, at
//! least 0.9.1). An application that depends on the `sqlx` facade 0.9.1 or
//! later 0.9.x shares the very same types: its `sqlx::PgPool` goes into
//! [`PostgresStore::from_pool`], its queries run on [`PgTx::conn`], and it
//! builds beside the default `sqlite` feature (rusqlite and sqlx's SQLite
//! driver resolve to one `libsqlite3-sys`). sqlx 0.9.0 resolves only with
//! aftermath's `default-features = false` (its SQLite driver, resolved by
//! Cargo even when off, wants `libsqlite3-sys` below the 0.40 that rusqlite
//! links): `cargo update -p sqlx` moves it to 0.9.1. sqlx 0.8 is not
//! supported: its pool, connection and transaction are other types than
//! 0.9's, so it could not share them (an application on 0.8 would run two
//! pools), and its SQLite driver links `libsqlite3-sys` 0.30, which no
//! maintained rusqlite uses.
//!
//! # TLS
//!
//! Connections use rustls (the `ring` provider), with the `sslmode` and
//! `sslrootcert` of the URL (or of `PGSSLMODE` / `PGSSLROOTCERT` when the
//! URL has none, or of a [`PgConnectOptions`] given to
//! [`PostgresStore::connect_to`]), as sqlx implements them:
//!
//! - `disable` (and `allow`): plain text.
//! - `prefer`, **the default**: TLS if the server offers it, plain text if
//!   it does not; the certificate is not checked. It protects against
//!   passive eavesdropping on a server with TLS on, not against anyone who
//!   can intercept the connection, and silently falls back to plain text.
//!   (A TLS handshake that fails after the server offered TLS fails the
//!   connection: there is no second, plain attempt as in libpq.)
//! - `require`: TLS or fail; the certificate is not checked (unlike libpq,
//!   not even when `sslrootcert` is given).
//! - `verify-ca`: TLS, and the certificate must chain to a trusted root.
//! - `verify-full`: `verify-ca`, and the certificate must be issued for the
//!   host name (or IP address) connected to. **Use this for managed
//!   services and any network you do not control**, with `sslrootcert`
//!   the provider's CA file: `postgres://user:pw@db.example.com/app?sslmode=verify-full&sslrootcert=/etc/ssl/provider-ca.pem`.
//!
//! The trusted roots are Mozilla's (compiled in, through `webpki-roots`)
//! plus the certificates of `sslrootcert`: unlike libpq, `sslrootcert` adds
//! to the public roots rather than replacing them. Cargo unifies sqlx's
//! features: if your own `sqlx` enables `tls-native-tls`, sqlx uses that
//! (OpenSSL or the platform's TLS) instead, and
//! `tls-rustls-ring-native-roots` makes the roots the operating system's.
//! A connection that fails its checks fails at connect with a
//! [`StoreError::Database`] naming the server, the `sslmode` and the TLS
//! error (e.g. `invalid peer certificate: UnknownIssuer`), with a hint.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx_core::connection::Connection;
use sqlx_postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgSslMode};
use tokio::sync::{Notify, oneshot, watch};
use uuid::Uuid;

use super::{
    AppendResult, Direction, EventStore, ExpectedVersion, FoldEvent, Snapshot, StoreError,
    check_batch_ids, validate_stream,
};
use crate::event::{EventData, Position, StoredEvent};
use crate::subscription::Partition;
use crate::upcast::Upcasters;

mod append;
mod conns;
mod deadlines;
mod events;
mod horizon;
#[cfg(feature = "nats")]
mod inbox;
mod journal;
mod order;
mod schema;
mod subscriptions;
#[cfg(test)]
mod tests;
mod types;

pub use subscriptions::PgTx;

/// The schema version this build of aftermath creates and understands in
/// a PostgreSQL schema (the highest `version` in its `aftermath_schema` table). Opening
/// a store of an older version migrates it; a newer one is refused with
/// [`StoreError::Incompatible`]. Tools that
/// must not migrate (the `aftermath` command-line tool) compare against it
/// before opening.
pub const SCHEMA_VERSION: i32 = schema::SCHEMA_VERSION;

/// A pooled connection idle at least this long is tested (a round trip)
/// before use; one used more recently is not (see `connect_to`).
const TEST_IDLE_CONNECTIONS_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// The sqlx core crate this backend uses (queries, rows, executors), for
/// SQL of your own on [`PostgresStore::pool`].
pub use sqlx_core;
/// The sqlx PostgreSQL driver this backend uses ([`PgPool`], options,
/// listeners).
pub use sqlx_postgres;

use events::Sql;
use horizon::{Background, Progress};

/// Settings of a [`PostgresStore`], builder style.
///
/// ```
/// use std::time::Duration;
/// use aftermath::{PostgresOptions, Upcasters};
///
/// let options = PostgresOptions::default()
///     .schema("shop_events")
///     .max_connections(20)
///     .strict_order(false)
///     .upcasters(Upcasters::new());
/// assert_eq!(options.get_schema(), "shop_events");
/// assert_eq!(options.get_max_connections(), 20);
/// ```
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    schema: String,
    max_connections: u32,
    acquire_timeout: Duration,
    upcasters: Arc<Upcasters>,
    strict_order: bool,
    notify: bool,
    poll_interval: Duration,
    held_back_warning: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: "aftermath".to_owned(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
            upcasters: Arc::new(Upcasters::new()),
            strict_order: false,
            notify: true,
            poll_interval: Duration::from_secs(1),
            held_back_warning: Duration::from_secs(2),
        }
    }
}

impl PostgresOptions {
    /// The schema holding the store's tables (created if missing). Lowercase
    /// ASCII letters, digits and underscores, at most 56 characters; several
    /// stores can live in one database under different schemas. Default
    /// `aftermath`.
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.schema = name.into();
        self
    }

    /// The most connections of the pool that [`PostgresStore::connect_with`]
    /// creates (at least one; ignored by [`PostgresStore::from_pool`]).
    /// Default 10. Up to half of them are kept between the store's own
    /// statements, each for at most 100 ms (see [`PostgresStore::from_pool`]).
    pub fn max_connections(mut self, count: u32) -> Self {
        self.max_connections = count.max(1);
        self
    }

    /// How long a query waits for a free connection of the pool that
    /// [`PostgresStore::connect_with`] creates. Default 30 seconds.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// The upcasters every read applies. Default: none.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }

    /// Strict mode: every append of this handle first takes one advisory
    /// lock shared by all strict appends to the schema, so appends commit one
    /// at a time and positions follow commit order exactly (when every
    /// handle appending to the schema is strict). Costs append throughput
    /// (one commit at a time); readers are unaffected: they never skip in
    /// either mode, and still read below the horizon. Default off.
    pub fn strict_order(mut self, strict: bool) -> Self {
        self.strict_order = strict;
        self
    }

    /// Whether appends are followed by `NOTIFY <schema>_events`, waking the
    /// `watch_head` of store handles in other processes at once. The NOTIFY
    /// is sent after the append committed, from a background task that
    /// coalesces bursts, never inside the append's transaction (PostgreSQL
    /// serializes the commits of notifying transactions, which would cap
    /// concurrent writers). Without it other processes see appends at their
    /// next poll ([`PostgresOptions::poll_interval`]). Default on.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// How often the background task re-reads the head when no notification
    /// arrives (the fallback when `LISTEN` is unavailable, e.g. behind a
    /// transaction-pooling proxy), and checks whether readers are held back.
    /// Default 1 second.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Log a warning when committed events have waited this long for an
    /// older append still in flight (at most one warning every 5 seconds).
    /// Only a handle whose head someone in the process watches (a
    /// subscriber) checks: a process that only handles commands stays quiet,
    /// and [`PostgresStore::held_back`] answers anywhere. Default 2 seconds.
    pub fn held_back_warning(mut self, after: Duration) -> Self {
        self.held_back_warning = after;
        self
    }

    /// The schema name.
    pub fn get_schema(&self) -> &str {
        &self.schema
    }

    /// The pool size.
    pub fn get_max_connections(&self) -> u32 {
        self.max_connections
    }

    /// Whether strict mode is on.
    pub fn get_strict_order(&self) -> bool {
        self.strict_order
    }

    /// Whether appends notify listeners.
    pub fn get_notify(&self) -> bool {
        self.notify
    }

    /// The poll interval.
    pub fn get_poll_interval(&self) -> Duration {
        self.poll_interval
    }
}

/// Readers of `$all` waiting for an unfinished transaction: what
/// [`PostgresStore::held_back`] reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HeldBack {
    /// The horizon: the id (`xid8`) of the oldest transaction still
    /// running. Events of transactions at or above it are not read yet.
    pub horizon: u64,
    /// How long the oldest committed event that readers cannot read yet has
    /// been waiting (since its append started).
    pub waiting: Duration,
    /// The transaction at the horizon, when this role can see it.
    pub blocker: Option<Blocker>,
}

/// The transaction that holds the horizon back.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Blocker {
    /// Its backend's process id (`None` for a prepared transaction).
    pub pid: Option<i32>,
    /// How long the transaction has been running (or prepared).
    pub transaction_age: Option<Duration>,
    /// Its database.
    pub database: Option<String>,
    /// Its role.
    pub user: Option<String>,
    /// Its session's `application_name`.
    pub application_name: Option<String>,
    /// Its session's state (`idle in transaction`, `active`, ..., or
    /// `prepared`).
    pub state: Option<String>,
    /// The start of its session's current or last query.
    pub query: Option<String>,
    /// The global id of a prepared (two-phase) transaction.
    pub prepared: Option<String>,
}

struct Shared {
    /// The pool, with the connections kept between the store's own
    /// statements (see `conns.rs`).
    conns: Arc<conns::Conns>,
    sql: Arc<Sql>,
    statements: subscriptions::Statements,
    deadlines: deadlines::Statements,
    head: Arc<watch::Sender<Position>>,
    progress: Arc<Progress>,
    wake: Arc<Notify>,
    upcasters: Arc<Upcasters>,
    schema: String,
    location: String,
    strict: bool,
    notify: bool,
    /// Wakes the after-commit notifier (when `notify` is on).
    notifier: Arc<Notify>,
    /// Dropping it (with the last handle) stops the background task.
    _background: oneshot::Sender<()>,
    /// Dropping it (with the last handle) stops the notifier.
    _notifier: oneshot::Sender<()>,
    /// Dropping it (with the last handle) gives back the kept connections.
    _keeper: oneshot::Sender<()>,
}

/// An [`EventStore`] in a PostgreSQL schema. Clones share the pool and the
/// background task, which stops when the last clone drops.
///
/// `$all` positions are `transaction_id << 20 | index in the transaction`,
/// read only below the *append horizon*: a reader never skips an event, and
/// writers are not serialized.
///
/// **What can hold readers back**: only appends to this store that are still
/// in flight (the oldest running transaction that holds the store's append
/// lock). Readers wait for it, never skip it;
/// [`PostgresStore::held_back`] names it (pid, age, query) and the store logs
/// a warning. Nothing else delays delivery: not projections' read-model
/// transactions, not other schemas or databases on the same server, not
/// idle-in-transaction sessions or prepared transactions that did not
/// append here. An append must be the first write of its transaction (the
/// store's own appends always are); the `append` function refuses anything
/// else with a clear error. Limits: at most 2^20 events in one append, and
/// transaction ids below 2^44. The argument is in the backend's `order.rs`.
///
/// **Positions survive a logical move**: after `pg_dump`/restore, a
/// logical-replication cutover or a cloud migration into a cluster whose
/// transaction counter is behind the stored ids, opening the store re-bases
/// new positions above every restored one (logged as a warning); stored
/// events, checkpoints and journals keep their positions.
///
/// Reads never wait for this handle's own appends: an append is readable in
/// `$all` as soon as it and every older append in flight committed. Code
/// that must read its own writes through `$all` calls
/// [`PostgresStore::wait_for_own_writes`].
///
/// ```no_run
/// # async fn example() -> Result<(), aftermath::StoreError> {
/// use aftermath::store::{Direction, EventStore, ExpectedVersion};
/// use aftermath::{EventData, Metadata, Position, PostgresOptions, PostgresStore};
/// use uuid::Uuid;
///
/// let store = PostgresStore::connect_with(
///     "postgres://postgres@127.0.0.1:5432/test",
///     PostgresOptions::default().schema("shop").max_connections(16),
/// )
/// .await?;
///
/// let id = Uuid::now_v7();
/// let event = EventData {
///     id,
///     event_type: "Pinged".into(),
///     payload: br#"{"n":1}"#.to_vec(),
///     metadata: Metadata::caused_by(id),
/// };
/// let done = store.append("ping-1", ExpectedVersion::NoStream, vec![event]).await?;
/// assert_eq!(done.last_version, 1);
///
/// let events = store.read_stream("ping-1", 1, Direction::Forward, 10).await?;
/// assert_eq!(events[0].id, id);
/// let all = store.read_all(Position::ORIGIN, Some(&["Pinged"]), 100).await?;
/// assert!(all.iter().any(|e| e.id == id));
///
/// // Projections share the pool.
/// let pool = store.pool().clone();
/// # let _ = pool;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("location", &self.shared.location)
            .field("schema", &self.shared.schema)
            .field("strict", &self.shared.strict)
            .finish_non_exhaustive()
    }
}

/// [`check_batch_ids`] without its quadratic cost for large batches.
fn check_ids(stream: &str, events: &[EventData]) -> Result<(), StoreError> {
    if events.len() <= 16 {
        return check_batch_ids(stream, events);
    }
    let mut ids: Vec<u128> = events.iter().map(|e| e.id.as_u128()).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|pair| pair[0] == pair[1]) {
        return check_batch_ids(stream, events);
    }
    Ok(())
}

/// Where a pool connects, without the password.
fn location_of(options: &PgConnectOptions, schema: &str) -> String {
    format!(
        "postgres://{}@{}:{}/{} (schema {schema})",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    )
}

/// The `sslmode` name of `mode`, as in a URL.
fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// A failed first connection: which server, with which `sslmode`, and the
/// driver's error (its [`source`](std::error::Error::source)).
#[derive(Debug)]
struct ConnectFailed {
    server: String,
    ssl_mode: PgSslMode,
    source: sqlx_core::Error,
}

impl fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sslmode={}): {}",
            self.server,
            ssl_mode_name(self.ssl_mode),
            self.source
        )?;
        // What the driver's words mean for the settings.
        let said = self.source.to_string();
        let hint = if said.contains("UnknownIssuer") {
            " (the server's certificate is not issued by a CA of `sslrootcert` or a public root)"
        } else if said.contains("not valid for name") {
            " (connect by a host name or address that the server's certificate names)"
        } else if said.contains("server does not support TLS") {
            " (the server has `ssl = off`)"
        } else {
            ""
        };
        f.write_str(hint)
    }
}

impl std::error::Error for ConnectFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`,
    /// with `?sslmode=...&sslrootcert=...` for TLS: see [the module
    /// docs](crate::store::postgres#tls)) with default [`PostgresOptions`]: schema
    /// `aftermath`, 10 connections.
    ///
    /// Creates the schema if needed and applies pending migrations. Refuses,
    /// with [`StoreError::Incompatible`], a schema that belongs to another
    /// application or is newer than this build.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects to the database at `url` with `options`. See
    /// [`PostgresStore::connect`].
    pub async fn connect_with(
        url: &str,
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::database("parsing the PostgreSQL URL", e))?;
        Self::connect_to(connect, options).await
    }

    /// Connects with connection settings built in code rather than a URL
    /// (a password that needs no escaping, TLS files from your
    /// configuration), and `options`. See [`PostgresStore::connect`].
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), aftermath::StoreError> {
    /// use aftermath::store::postgres::sqlx_postgres::{PgConnectOptions, PgSslMode};
    /// use aftermath::{PostgresOptions, PostgresStore};
    ///
    /// let connect = PgConnectOptions::new()
    ///     .host("db.example.com")
    ///     .username("shop")
    ///     .password("secret from the vault")
    ///     .database("shop")
    ///     .ssl_mode(PgSslMode::VerifyFull)
    ///     .ssl_root_cert("/etc/ssl/provider-ca.pem");
    /// let store = PostgresStore::connect_to(connect, PostgresOptions::default()).await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_to(
        connect: PgConnectOptions,
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        // One direct connection first: an unreachable server, a refused
        // login or a certificate that does not verify fails at once with its
        // own error, where the pool would retry until its acquire timeout
        // and report only the timeout.
        let probe = PgConnection::connect_with(&connect)
            .await
            .map_err(|source| {
                StoreError::database(
                    "connecting to PostgreSQL",
                    ConnectFailed {
                        server: format!(
                            "postgres://{}@{}:{}/{}",
                            connect.get_username(),
                            connect.get_host(),
                            connect.get_port(),
                            connect.get_database().unwrap_or_default()
                        ),
                        ssl_mode: connect.get_ssl_mode(),
                        source,
                    },
                )
            })?;
        let _ = probe.close().await;
        // sqlx tests every connection with a round trip before handing it
        // out; that was a fifth of a command's time (one per statement).
        // Only a connection idle for a while is tested now (HikariCP's rule):
        // a busy pool's connections were just used. A connection that dies
        // anyway fails its next statement, which is tried again: reads are
        // safe to repeat, and appends carry the same event ids (an append
        // that did commit is found as its own retry). After such a failure
        // every connection is tested for a few seconds, so the retry gets a
        // live one.
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= TEST_IDLE_CONNECTIONS_AFTER || append::suspect_connections()
                    {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect)
            .await
            .map_err(events::db("connecting to PostgreSQL"))?;
        Self::from_pool(pool, options).await
    }

    /// A store on an existing pool (the pool settings of `options` are
    /// ignored), so that your own code shares its connections. Creates or
    /// migrates the schema like [`PostgresStore::connect`]. The pool's
    /// connect options, TLS included, are yours; with the `sqlx` facade
    /// (0.9.1 or later 0.9.x), `sqlx::PgPool` is this type.
    ///
    /// So is testing connections: sqlx's default tests every connection
    /// before use, a round trip per statement (about a fifth of a command's
    /// time on a local server). The pool [`PostgresStore::connect`] builds
    /// tests only connections idle for 500 ms; build yours with
    /// `test_before_acquire(false)` and a `before_acquire` hook for the
    /// same. A read or an append whose connection died is tried again either way.
    ///
    /// The store runs its own statements (appends, stream and `$all` reads,
    /// snapshots, the head) on connections it keeps between them rather than
    /// handing each back, where sqlx tests it with a round trip: at most half
    /// of the pool, each for at most 100 ms after it left the pool, and all
    /// of them given back at once when the pool is closed. Your pool's
    /// `before_acquire` and `after_release` hooks therefore run when a
    /// connection leaves or rejoins the pool, not around each statement.
    pub async fn from_pool(
        pool: PgPool,
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let name = options.schema.clone();
        let location = location_of(&pool.connect_options(), &name);
        schema::check_name(&name).map_err(|reason| StoreError::Incompatible {
            location: location.clone(),
            reason,
        })?;
        schema::migrate(&pool, &name, &location).await?;
        schema::rebase_positions(&pool, &name, &location).await?;
        let sql = Arc::new(Sql::new(&format!("\"{name}\"")));
        let conns = conns::Conns::new(pool.clone());
        let keeper = conns.spawn_keeper();
        let head = events::head(&conns, &sql).await?;
        let progress = Arc::new(Progress::default());
        progress.observe(head.horizon);
        let head = Arc::new(watch::Sender::new(head.position));
        let wake = Arc::new(Notify::new());
        let handle_id = Uuid::new_v4().simple().to_string();
        let background = Background {
            conns: conns.clone(),
            sql: sql.clone(),
            head: head.clone(),
            progress: progress.clone(),
            wake: wake.clone(),
            schema: name.clone(),
            poll: options.poll_interval,
            warn_after: options.held_back_warning,
            handle_id: handle_id.clone(),
        }
        .spawn();
        let notifier = Arc::new(Notify::new());
        let notifier_task = horizon::Notifier {
            pool: pool.clone(),
            channel: format!("{name}_events"),
            handle_id,
            wake: notifier.clone(),
        }
        .spawn();
        Ok(PostgresStore {
            shared: Arc::new(Shared {
                conns,
                sql,
                statements: subscriptions::Statements::new(&format!("\"{name}\"")),
                deadlines: deadlines::Statements::new(&format!("\"{name}\"")),
                head,
                progress,
                wake,
                upcasters: options.upcasters,
                schema: name,
                location,
                strict: options.strict_order,
                notify: options.notify,
                notifier,
                _background: background,
                _notifier: notifier_task,
                _keeper: keeper,
            }),
        })
    }

    /// The connection pool, to run your own SQL (read models, checkpoints)
    /// on the same connections.
    pub fn pool(&self) -> &PgPool {
        self.shared.conns.pool()
    }

    /// The schema holding the store's tables.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// Whether readers of `$all` are held back by an unfinished transaction:
    /// `None` when every committed event is readable, else the horizon, how
    /// long the oldest unreadable event has waited, and (when this role may
    /// see it in `pg_stat_activity` or `pg_prepared_xacts`) the transaction
    /// responsible. Cheap enough to export as a metric.
    pub async fn held_back(&self) -> Result<Option<HeldBack>, StoreError> {
        horizon::held_back(self.shared.conns.pool(), &self.shared.sql).await
    }

    /// The stored event types that read as `types` (with the upcasters' old
    /// names), without duplicates.
    fn stored_types(&self, types: &[&str]) -> Vec<String> {
        let mut stored = self.shared.upcasters.stored_types(types);
        let mut seen = std::collections::HashSet::with_capacity(stored.len());
        stored.retain(|t| seen.insert(t.clone()));
        stored
    }

    /// Read-your-own-writes through `$all`: waits, at most `timeout`, until
    /// the last append through this handle (or a clone) is readable by
    /// `read_all` and below [`EventStore::head`], i.e. until every append to
    /// this store that was in flight when it committed has ended. True when
    /// it is readable (at once when nothing is pending); false when it gave
    /// up, e.g. because an append of another session is paused mid-commit
    /// ([`PostgresStore::held_back`] names it).
    ///
    /// Reads never wait by themselves, so subscribers sharing this handle with
    /// busy writers stay live; call this where a caller needs its own writes
    /// (a test, a request that redirects to a page built from `$all`).
    ///
    /// ```no_run
    /// # async fn example(store: aftermath::PostgresStore) -> Result<(), aftermath::StoreError> {
    /// use std::time::Duration;
    /// use aftermath::store::{EventStore, ExpectedVersion};
    /// # let events = Vec::new();
    /// let done = store.append("order-7", ExpectedVersion::Any, events).await?;
    /// if store.wait_for_own_writes(Duration::from_secs(5)).await? {
    ///     assert!(store.head().await? >= done.last_position.unwrap_or_default());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_for_own_writes(&self, timeout: Duration) -> Result<bool, StoreError> {
        horizon::wait_own_writes(
            self.shared.conns.pool(),
            &self.shared.sql,
            &self.shared.progress,
            timeout,
        )
        .await
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        validate_stream(stream)?;
        check_ids(stream, &events)?;
        let done = append::append(
            &self.shared.conns,
            &self.shared.sql,
            stream,
            expected,
            &events,
            self.shared.strict,
            // Never inside the append's transaction: see `horizon::Notifier`.
            false,
        )
        .await?;
        if let Some(transaction) = done.transaction {
            self.shared.progress.appended(transaction);
            self.shared.wake.notify_one();
            if self.shared.notify {
                self.shared.notifier.notify_one();
            }
        }
        Ok(done.result)
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        events::read_stream(
            &self.shared.conns,
            &self.shared.sql,
            stream,
            from,
            direction,
            limit,
            &self.shared.upcasters,
        )
        .await
    }

    async fn read_stream_fold(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<FoldEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        events::read_stream_fold(
            &self.shared.conns,
            &self.shared.sql,
            stream,
            from,
            limit,
            &self.shared.upcasters,
        )
        .await
    }

    /// Reads below the append horizon only (see [`PostgresStore`]); never
    /// waits.
    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let types = types.map(|t| self.stored_types(t));
        let read = || {
            events::read_all(
                &self.shared.conns,
                &self.shared.sql,
                after,
                types.as_deref(),
                limit,
                &self.shared.upcasters,
            )
        };
        read().await
    }

    /// Filters in SQL on the `stream_hash` column (one range of hashes per
    /// partition), below the horizon like `read_all`.
    async fn read_all_partition(
        &self,
        after: Position,
        types: Option<&[&str]>,
        partition: Partition,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let types = types.map(|t| self.stored_types(t));
        let read = || {
            events::read_partition(
                &self.shared.conns,
                &self.shared.sql,
                after,
                types.as_deref(),
                partition,
                limit,
                &self.shared.upcasters,
            )
        };
        read().await
    }

    /// An ordered range scan of the `(correlation_id, transaction_id, seq)`
    /// index, below the horizon like `read_all`.
    async fn read_correlation(
        &self,
        correlation_id: Uuid,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let read = || {
            events::read_correlation(
                &self.shared.conns,
                &self.shared.sql,
                correlation_id,
                after,
                limit,
                &self.shared.upcasters,
            )
        };
        read().await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        events::stream_version(&self.shared.conns, &self.shared.sql, stream).await
    }

    /// The last position below the append horizon: everything up to it is
    /// final, so a subscriber may checkpoint there. One statement; never
    /// waits.
    async fn head(&self) -> Result<Position, StoreError> {
        let head = events::head(&self.shared.conns, &self.shared.sql).await?;
        self.shared.progress.observe(head.horizon);
        Ok(head.position)
    }

    fn upcast(&self, event: &mut StoredEvent) -> Result<(), crate::event::DecodeError> {
        self.shared.upcasters.apply(event)
    }

    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        events::find_event(
            &self.shared.conns,
            &self.shared.sql,
            id,
            &self.shared.upcasters,
        )
        .await
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.shared.head.subscribe()
    }

    /// Saves the snapshot unless the stored one has a higher version.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        events::save_snapshot(&self.shared.conns, &self.shared.sql, &snapshot).await
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        events::load_snapshot(&self.shared.conns, &self.shared.sql, stream).await
    }
}
