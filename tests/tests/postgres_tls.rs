//! TLS to PostgreSQL: every `sslmode` against the local server, with a
//! certificate authority and a server certificate (for `localhost` only)
//! made by the test.
//!
//! Each test turns TLS on with its own certificate (`ALTER SYSTEM SET ssl,
//! ssl_cert_file, ssl_key_file` + `pg_reload_conf()`; the server writes the
//! files into its data directory itself, with `COPY ... TO`, so they are its
//! own, and the test makes the key's mode 0600) and restores the previous
//! settings when it ends, even by a panic. Plain connections keep working meanwhile (for the suites
//! running beside this one). Test processes take turns through a session
//! advisory lock, so two of them never swap each other's certificate; a run
//! killed half-way leaves TLS on with its certificate, which the next run
//! recognises and resets.
//!
//! Runs when `AFTERMATH_PG_URL` is set (a superuser, a server on this
//! machine, the test running as root or the server's OS user) and needs the
//! `openssl` command; prints SKIPPED without the URL.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aftermath::store::postgres::sqlx_postgres::{PgConnectOptions, PgSslMode};
use aftermath::store::{Direction, EventStore, ExpectedVersion};
use aftermath::{EventData, Metadata, PostgresOptions, PostgresStore, StoreError};
use aftermath_tests::postgres::{SchemaGuard, raw, url};
use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::raw_sql::raw_sql;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::PgConnection;
use uuid::Uuid;

/// The advisory lock (session level) that test processes take turns on.
const LOCK: i64 = 0x6166_7465_725f_746c; // "after_tl"
/// The server's certificate and key, in its data directory.
const CERT_FILE: &str = "aftermath_test_tls.crt";
const KEY_FILE: &str = "aftermath_test_tls.key";
/// The settings a test changes (and restores).
const SETTINGS: [&str; 3] = ["ssl", "ssl_cert_file", "ssl_key_file"];

macro_rules! url_or_skip {
    ($test:literal) => {
        match url() {
            Some(url) => url,
            None => {
                aftermath_tests::skip_notice!(
                    "SKIPPED postgres_tls::{}: AFTERMATH_PG_URL not set",
                    $test
                );
                return;
            }
        }
    };
}

/// Runs `openssl` in `dir`, panicking with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("the TLS tests need the `openssl` command: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two certificate authorities (files for the client) and a server
/// certificate issued by the first for `localhost` (DNS name only: not for
/// `127.0.0.1`).
struct Certs {
    _dir: tempfile::TempDir,
    /// The CA that issued the server's certificate.
    ca: PathBuf,
    /// A CA that did not.
    other_ca: PathBuf,
    /// The server's certificate, PEM.
    server_cert: String,
    /// The server's private key, PEM.
    server_key: String,
}

impl Certs {
    fn make() -> Certs {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for (name, cn) in [("ca", "aftermath test CA"), ("other_ca", "another CA")] {
            let (key, crt, subj) = (
                format!("{name}.key"),
                format!("{name}.crt"),
                format!("/CN={cn}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
            openssl(d, &args);
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write the extensions");
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(d, &args);
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        let read = |name: &str| std::fs::read_to_string(d.join(name)).expect("read a PEM file");
        Certs {
            ca: d.join("ca.crt"),
            other_ca: d.join("other_ca.crt"),
            server_cert: read("server.crt"),
            server_key: read("server.key"),
            _dir: dir,
        }
    }
}

/// `url` with its host replaced by `host`.
fn with_host(url: &str, host: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((user, hostport)) => (format!("{user}@"), hostport),
        None => (String::new(), authority),
    };
    let port = hostport
        .rsplit_once(':')
        .map(|(_, port)| format!(":{port}"))
        .unwrap_or_default();
    format!("{scheme}://{user}{host}{port}{tail}")
}

/// `url` with query parameters added.
fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// TLS on the server with the test's certificate, until dropped: then the
/// previous settings are back (and reloaded) and the lock is released.
struct TlsServer {
    url: String,
    /// Holds the advisory lock; closed (releasing it) after the restore.
    lock: Option<PgConnection>,
    /// Restores the settings, one statement each (ALTER SYSTEM cannot share
    /// a query string).
    restore: Vec<String>,
}

impl TlsServer {
    async fn start(url: &str, certs: &Certs) -> TlsServer {
        let mut lock = raw(url).await;
        query("SELECT pg_advisory_lock($1)")
            .bind(LOCK)
            .execute(&mut lock)
            .await
            .expect("take the TLS tests' lock");
        let data: String = query("SELECT current_setting('data_directory')")
            .fetch_one(&mut lock)
            .await
            .and_then(|row| row.try_get(0))
            .expect("the data directory (the test role must be a superuser)");
        let cert_path = format!("{data}/{CERT_FILE}");
        let key_path = format!("{data}/{KEY_FILE}");

        // What ALTER SYSTEM had set before (the last entry per name wins);
        // our own file names are a killed run's leftovers: reset those.
        let rows = query(
            "SELECT name, setting FROM pg_file_settings
             WHERE sourcefile LIKE '%postgresql.auto.conf' AND name = ANY($1)
             ORDER BY seqno",
        )
        .bind(SETTINGS.as_slice())
        .fetch_all(&mut lock)
        .await
        .expect("read pg_file_settings");
        let mut before = std::collections::HashMap::new();
        for row in rows {
            before.insert(row.get::<String, _>(0), row.get::<String, _>(1));
        }
        let leftover = before.get("ssl_cert_file") == Some(&cert_path);
        let mut restore = Vec::new();
        for name in SETTINGS {
            restore.push(match before.get(name) {
                Some(value) if !leftover => format!("ALTER SYSTEM SET {name} = {}", literal(value)),
                _ => format!("ALTER SYSTEM RESET {name}"),
            });
        }
        restore.push("SELECT pg_reload_conf()".to_owned());

        // The server writes the files: they are its own, mode 0600.
        for (pem, path) in [
            (&certs.server_cert, &cert_path),
            (&certs.server_key, &key_path),
        ] {
            let copy = format!(
                "COPY (SELECT unnest(string_to_array({}, E'\\n'))) TO {}",
                literal(pem.trim()),
                literal(path)
            );
            lock.execute(raw_sql(AssertSqlSafe(copy)))
                .await
                .unwrap_or_else(|e| panic!("write {path} on the server: {e}"));
        }
        // COPY leaves them world-readable, which the server refuses for a
        // key: this needs the server's machine, as root or its OS user.
        std::fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap_or_else(|e| {
            panic!(
                "chmod 600 {key_path}: {e} (the TLS tests run on the server's machine, \
                     as root or its OS user)"
            )
        });
        let server = TlsServer {
            url: url.to_owned(),
            lock: Some(lock),
            restore,
        };
        let mut server = server;
        let session = server.lock.as_mut().expect("the lock's connection");
        for statement in [
            format!("ALTER SYSTEM SET ssl_cert_file = {}", literal(&cert_path)),
            format!("ALTER SYSTEM SET ssl_key_file = {}", literal(&key_path)),
            "ALTER SYSTEM SET ssl = on".to_owned(),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            session
                .execute(raw_sql(AssertSqlSafe(statement.clone())))
                .await
                .unwrap_or_else(|e| panic!("turn TLS on: {statement}: {e}"));
        }

        // The reload is asynchronous: wait until new connections get our
        // certificate.
        let ready = PgConnectOptions::from_str_ok(url)
            .host("localhost")
            .ssl_mode(PgSslMode::VerifyFull)
            .ssl_root_cert(&certs.ca);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match PgConnection::connect_with(&ready).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    break;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("the server did not take the test's certificate: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        server
    }
}

/// `PgConnectOptions::from_str` for a URL known to parse.
trait FromStrOk {
    fn from_str_ok(url: &str) -> PgConnectOptions;
}

impl FromStrOk for PgConnectOptions {
    fn from_str_ok(url: &str) -> PgConnectOptions {
        url.parse().expect("AFTERMATH_PG_URL parses")
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let url = self.url.clone();
        let restore = std::mem::take(&mut self.restore);
        // A fresh connection on a runtime of its own (the test's runtime
        // may be the one dropping us); the lock connection is closed only
        // after, so the next test process starts from restored settings.
        let restored = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&url).await.ok()?;
                for statement in restore {
                    conn.execute(raw_sql(AssertSqlSafe(statement))).await.ok()?;
                }
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(restored, Ok(Some(()))) {
            eprintln!(
                "could not restore the server's TLS settings (ssl, ssl_cert_file, ssl_key_file)"
            );
        }
        // Dropping the connection ends its session and the advisory lock.
        drop(self.lock.take());
    }
}

/// `(ssl, version)` of the connection that runs the query.
async fn ssl_of<'c, E>(executor: E) -> (bool, Option<String>)
where
    E: sqlx_core::executor::Executor<'c, Database = sqlx_postgres::Postgres>,
{
    let row = query("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(executor)
        .await
        .expect("read pg_stat_ssl");
    (row.get(0), row.get(1))
}

/// An append and a read through `store`: it works over this connection.
async fn round_trip(store: &PostgresStore) {
    let id = Uuid::now_v7();
    let event = EventData {
        id,
        event_type: "Pinged".into(),
        payload: br#"{"n":1}"#.to_vec(),
        metadata: Metadata::caused_by(id),
    };
    store
        .append("tls-1", ExpectedVersion::NoStream, vec![event])
        .await
        .expect("append over TLS");
    let read = store
        .read_stream("tls-1", 1, Direction::Forward, 10)
        .await
        .expect("read over TLS");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].id, id);
}

fn options(guard: &SchemaGuard) -> PostgresOptions {
    PostgresOptions::default()
        .schema(&guard.schema)
        .max_connections(4)
}

/// The error of connecting with `connect`, which must fail.
async fn refused(connect: PgConnectOptions, guard: &SchemaGuard) -> String {
    match PostgresStore::connect_to(connect, options(guard)).await {
        Ok(_) => panic!("the connection was accepted"),
        Err(e @ StoreError::Database { .. }) => e.to_string(),
        Err(other) => panic!("expected a database error, got {other:?}"),
    }
}

#[tokio::test]
async fn require_encrypts_every_connection_of_the_store() {
    let url = url_or_skip!("require_encrypts_every_connection_of_the_store");
    let certs = Certs::make();
    let _server = TlsServer::start(&url, &certs).await;
    let guard = SchemaGuard::new(&url);
    let app = format!("aftermath_tls_{}", Uuid::new_v4().simple());
    let store = PostgresStore::connect_with(
        &with_params(&url, &format!("sslmode=require&application_name={app}")),
        options(&guard),
    )
    .await
    .expect("sslmode=require connects (the certificate is not checked)");
    round_trip(&store).await;
    let (ssl, version) = ssl_of(store.pool()).await;
    assert!(ssl, "the store's connection is not encrypted");
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("TLS")),
        "TLS version {version:?}"
    );
    // Every session of the store (the pool's, its LISTEN connection's).
    let mut check = raw(&url).await;
    let row = query(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl)
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.application_name = $1",
    )
    .bind(&app)
    .fetch_one(&mut check)
    .await
    .expect("the store's sessions");
    let (sessions, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(sessions >= 1, "no session of the store found");
    assert_eq!(
        encrypted, sessions,
        "a session of the store is not encrypted"
    );
}

#[tokio::test]
async fn prefer_the_default_encrypts_when_the_server_offers_tls() {
    let url = url_or_skip!("prefer_the_default_encrypts_when_the_server_offers_tls");
    let certs = Certs::make();
    let _server = TlsServer::start(&url, &certs).await;
    let guard = SchemaGuard::new(&url);
    let connect = PgConnectOptions::from_str_ok(&url);
    assert!(
        matches!(connect.get_ssl_mode(), PgSslMode::Prefer),
        "AFTERMATH_PG_URL (or PGSSLMODE) sets an sslmode: this test checks the default"
    );
    let store = PostgresStore::connect_with(&url, options(&guard))
        .await
        .expect("connect with the default sslmode");
    round_trip(&store).await;
    assert!(
        ssl_of(store.pool()).await.0,
        "sslmode=prefer (the default) connected in plain text to a server offering TLS"
    );
}

#[tokio::test]
async fn disable_connects_in_plain_text() {
    let url = url_or_skip!("disable_connects_in_plain_text");
    let certs = Certs::make();
    let _server = TlsServer::start(&url, &certs).await;
    let guard = SchemaGuard::new(&url);
    let store = PostgresStore::connect_with(&with_params(&url, "sslmode=disable"), options(&guard))
        .await
        .expect("sslmode=disable connects");
    round_trip(&store).await;
    assert!(
        !ssl_of(store.pool()).await.0,
        "sslmode=disable connected with TLS"
    );
}

#[tokio::test]
async fn verify_full_with_the_right_ca_and_host_connects() {
    let url = url_or_skip!("verify_full_with_the_right_ca_and_host_connects");
    let certs = Certs::make();
    let _server = TlsServer::start(&url, &certs).await;
    let guard = SchemaGuard::new(&url);
    // From the URL.
    let store = PostgresStore::connect_with(
        &with_params(
            &with_host(&url, "localhost"),
            &format!("sslmode=verify-full&sslrootcert={}", certs.ca.display()),
        ),
        options(&guard),
    )
    .await
    .expect("verify-full with the issuing CA and the certificate's host name connects");
    round_trip(&store).await;
    assert!(ssl_of(store.pool()).await.0);
    drop(store);
    // From options built in code.
    let connect = PgConnectOptions::from_str_ok(&url)
        .host("localhost")
        .ssl_mode(PgSslMode::VerifyFull)
        .ssl_root_cert(&certs.ca);
    let store = PostgresStore::connect_to(connect, options(&guard))
        .await
        .expect("verify-full through connect_to");
    assert!(ssl_of(store.pool()).await.0);
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_fails_naming_server_and_mode() {
    let url = url_or_skip!("verify_full_with_a_wrong_ca_fails_naming_server_and_mode");
    let certs = Certs::make();
    let _server = TlsServer::start(&url, &certs).await;
    let guard = SchemaGuard::new(&url);
    let connect = PgConnectOptions::from_str_ok(&with_params(
        &with_host(&url, "localhost"),
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            certs.other_ca.display()
        ),
    ));
    let error = refused(connect, &guard).await;
    for part in [
        "connecting to PostgreSQL",
        "localhost",
        "sslmode=verify-full",
        "UnknownIssuer",
        "not issued by a CA of `sslrootcert`",
    ] {
        assert!(error.contains(part), "`{part}` missing from: {error}");
    }
    // verify-ca checks the issuer too.
    let connect = PgConnectOptions::from_str_ok(&url)
        .ssl_mode(PgSslMode::VerifyCa)
        .ssl_root_cert(&certs.other_ca);
    let error = refused(connect, &guard).await;
    assert!(
        error.contains("sslmode=verify-ca") && error.contains("UnknownIssuer"),
        "{error}"
    );
}

#[tokio::test]
async fn verify_full_with_a_wrong_host_fails_and_verify_ca_does_not_check_it() {
    let url = url_or_skip!("verify_full_with_a_wrong_host_fails_and_verify_ca_does_not_check_it");
    let certs = Certs::make();
    let _server = TlsServer::start(&url, &certs).await;
    let guard = SchemaGuard::new(&url);
    // The certificate names `localhost` only; connect by IP address.
    let ip = with_host(&url, "127.0.0.1");
    let connect = PgConnectOptions::from_str_ok(&with_params(
        &ip,
        &format!("sslmode=verify-full&sslrootcert={}", certs.ca.display()),
    ));
    let error = refused(connect, &guard).await;
    for part in [
        "127.0.0.1",
        "sslmode=verify-full",
        "not valid for name",
        "that the server's certificate names",
    ] {
        assert!(error.contains(part), "`{part}` missing from: {error}");
    }
    let store = PostgresStore::connect_with(
        &with_params(
            &ip,
            &format!("sslmode=verify-ca&sslrootcert={}", certs.ca.display()),
        ),
        options(&guard),
    )
    .await
    .expect("verify-ca with the issuing CA connects whatever the host name");
    assert!(ssl_of(store.pool()).await.0);
}

#[tokio::test]
async fn from_pool_keeps_the_pools_tls_settings() {
    let url = url_or_skip!("from_pool_keeps_the_pools_tls_settings");
    let certs = Certs::make();
    let _server = TlsServer::start(&url, &certs).await;
    let guard = SchemaGuard::new(&url);
    // The application's own pool, through the `sqlx` facade.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(
            sqlx::postgres::PgConnectOptions::from_str_ok(&url)
                .host("localhost")
                .ssl_mode(sqlx::postgres::PgSslMode::VerifyFull)
                .ssl_root_cert(&certs.ca),
        )
        .await
        .expect("the application's pool");
    let store = PostgresStore::from_pool(pool.clone(), options(&guard))
        .await
        .expect("a store on the application's pool");
    round_trip(&store).await;
    assert!(ssl_of(store.pool()).await.0);
    assert!(ssl_of(&pool).await.0);
}
