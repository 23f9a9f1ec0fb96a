//! The `aftermath` binary against the local PostgreSQL (`AFTERMATH_PG_URL`,
//! e.g. `postgres://postgres@127.0.0.1:5432/test`), each test in a fresh
//! schema filled by the library and dropped afterwards. Prints `SKIPPED`
//! when the variable is not set; a set URL that is unreachable fails.

mod common;

use aftermath::store::postgres::sqlx_core::connection::Connection;
use aftermath::store::postgres::sqlx_core::executor::Executor;
use aftermath::store::postgres::sqlx_core::raw_sql::raw_sql;
use aftermath::store::postgres::sqlx_core::sql_str::AssertSqlSafe;
use aftermath::store::postgres::sqlx_postgres::PgConnection;
use aftermath::{PostgresOptions, PostgresStore};
use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

fn url() -> Option<String> {
    match std::env::var("AFTERMATH_PG_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("SKIPPED cli postgres: AFTERMATH_PG_URL is not set");
            None
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh schema, dropped when the guard goes.
struct Schema {
    url: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            runtime().block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&url).await {
                    let _ = conn.execute(raw_sql(AssertSqlSafe(sql))).await;
                    let _ = conn.close().await;
                }
            })
        })
        .join();
    }
}

fn filled(url: &str) -> (Schema, common::Filled) {
    let schema = Schema {
        url: url.to_owned(),
        name: format!("aftermath_cli_{}", uuid::Uuid::new_v4().simple()),
    };
    let filled = runtime().block_on(async {
        let store =
            PostgresStore::connect_with(url, PostgresOptions::default().schema(&schema.name))
                .await
                .unwrap_or_else(|e| panic!("AFTERMATH_PG_URL is set but unusable: {e}"));
        common::fill(&store).await
    });
    (schema, filled)
}

fn cli(url: &str, schema: &str) -> Command {
    let mut cmd = Command::cargo_bin("aftermath").unwrap();
    cmd.env_remove("AFTERMATH_SQLITE")
        .env_remove("AFTERMATH_PG_SCHEMA")
        .env("AFTERMATH_PG_URL", url)
        .args(["--schema", schema]);
    cmd
}

fn one_error_line() -> impl Predicate<str> {
    predicate::function(|s: &str| {
        s.lines().count() == 1 && s.starts_with("error: ") && !s.contains("panicked")
    })
}

fn json_of(cmd: &mut Command) -> Value {
    let out = cmd.arg("--json").output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn status_dead_letters_retry_timeline_and_streams_on_postgres() {
    let Some(url) = url() else { return };
    let (schema, filled) = filled(&url);
    let s = schema.name.as_str();

    cli(&url, s)
        .arg("status")
        .assert()
        .code(3)
        .stdout(predicate::str::contains("mailer"))
        .stdout(predicate::str::contains("worker-7"));
    let report = json_of(cli(&url, s).arg("status"));
    let subs = report["subscribers"].as_array().unwrap();
    let audit = subs.iter().find(|x| x["name"] == "audit-log").unwrap();
    assert_eq!(
        audit["lag_events"], 3,
        "counted, not head minus position (sparse on PostgreSQL): {audit}"
    );

    let list = json_of(cli(&url, s).arg("dead-letters"));
    assert_eq!(
        list["effects"][0]["event_id"],
        filled.parked.to_string(),
        "{list}"
    );
    assert_eq!(list["effects"][0]["state"], "parked");

    cli(&url, s)
        .args(["skip", "mailer", &filled.parked.to_string(), "--yes"])
        .assert()
        .success();
    let list = json_of(cli(&url, s).arg("dead-letters"));
    assert_eq!(
        list["effects"][0]["state"], "blocked",
        "only the blocked one is left: {list}"
    );

    cli(&url, s)
        .args(["timeline", &filled.correlation.to_string(), "--mermaid"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("sequenceDiagram"))
        .stdout(predicate::str::contains("p0->>p0: order.Confirmed (v2)"));
    cli(&url, s)
        .args(["timeline", &uuid::Uuid::now_v7().to_string()])
        .assert()
        .code(1)
        .stderr(one_error_line());

    let streams = json_of(cli(&url, s).args(["streams", "--category", "order"]));
    assert_eq!(streams.as_array().unwrap().len(), 2, "{streams}");
    cli(&url, s)
        .args(["stream", "order-o-2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("order.Placed"));
    cli(&url, s).arg("check").assert().success();

    runtime().block_on(async {
        use aftermath::process::{Deadline, DeadlineStore};
        let store = PostgresStore::connect_with(&url, PostgresOptions::default().schema(s))
            .await
            .unwrap();
        store
            .schedule(&Deadline {
                process: "fulfillment".into(),
                instance: "o-1".into(),
                id: uuid::Uuid::now_v7(),
                name: "shipping".into(),
                due_at: chrono::Utc::now(),
            })
            .await
            .unwrap();
    });
    let list = json_of(cli(&url, s).arg("deadlines"));
    assert_eq!(list[0]["instance"], "o-1", "{list}");
}

#[test]
fn a_missing_schema_an_unreachable_server_and_a_newer_schema_are_one_line_errors() {
    let Some(url) = url() else { return };
    let missing = format!("aftermath_cli_missing_{}", uuid::Uuid::new_v4().simple());
    cli(&url, &missing)
        .arg("status")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains(format!("no schema `{missing}`")));
    // Not created by looking.
    let exists: bool = runtime().block_on(async {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        aftermath::store::postgres::sqlx_core::query_scalar::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
        )
        .bind(&missing)
        .fetch_one(&mut conn)
        .await
        .unwrap()
    });
    assert!(!exists, "the tool must not create a schema");

    // An empty schema (not an aftermath store): refused, not filled.
    let empty = Schema {
        url: url.clone(),
        name: format!("aftermath_cli_empty_{}", uuid::Uuid::new_v4().simple()),
    };
    runtime().block_on(async {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        conn.execute(raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA \"{}\"",
            empty.name
        ))))
        .await
        .unwrap();
    });
    cli(&url, &empty.name)
        .arg("status")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("holds no aftermath store"));

    cli("postgres://postgres@127.0.0.1:1/test", "aftermath")
        .arg("status")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains(
            "cannot connect to PostgreSQL at 127.0.0.1:1",
        ));

    // A schema migrated by a newer aftermath.
    let (schema, _) = filled(&url);
    runtime().block_on(async {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        conn.execute(raw_sql(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".aftermath_schema (version) VALUES (99)",
            schema.name
        ))))
        .await
        .unwrap();
    });
    cli(&url, &schema.name)
        .arg("check")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("is at version 99"));
}

#[test]
fn console_serves_a_postgres_schema_and_retries_with_the_token() {
    use std::io::BufRead;
    let Some(url) = url() else { return };
    let (schema, filled) = filled(&url);
    let s = schema.name.as_str();
    /// Kills the console when the test ends, passed or not.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_aftermath"))
        .env_remove("AFTERMATH_SQLITE")
        .env_remove("AFTERMATH_PG_SCHEMA")
        .env_remove("AFTERMATH_CONSOLE_TOKEN")
        .env("AFTERMATH_PG_URL", &url)
        .args([
            "--schema",
            s,
            "console",
            "--port",
            "0",
            "--token",
            "pg-s3cret",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _console = Killed(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the console printed its address")
            .unwrap();
        if let Some(a) = line.strip_prefix("listening on http://") {
            break a.trim_end_matches('/').to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let report = common::http::get(&addr, "/api/status").json();
    assert_eq!(report["store"], format!("postgres schema {s}"));
    assert_eq!(report["needs_attention"], true);
    let body = serde_json::json!({"reactor": "mailer", "event_id": filled.parked}).to_string();
    let refused = common::http::request("POST", &addr, "/api/retry", &[], Some(&body));
    assert_eq!(refused.status, 401);
    let done = common::http::request(
        "POST",
        &addr,
        "/api/retry",
        &[("Authorization", "Bearer pg-s3cret")],
        Some(&body),
    );
    assert_eq!(done.status, 200, "{}", done.body);
    let list = json_of(cli(&url, s).arg("dead-letters"));
    assert_eq!(list["effects"][0]["state"], "retry_requested", "{list}");
    let page = common::http::get(&addr, &format!("/timeline?id={}", filled.correlation));
    assert_eq!(page.status, 200);
    assert!(page.body.contains("data-lane=\"order-o-1\""));
}
