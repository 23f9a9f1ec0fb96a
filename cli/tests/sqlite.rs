//! The `aftermath` binary, run as a process against a SQLite file that the
//! library filled (see `common`): what each command prints, its exit code,
//! and one clear line on stderr for every kind of bad input.

mod common;

use std::path::{Path, PathBuf};

use aftermath::SqliteStore;
use aftermath::reactor::ReactorRunner;
use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;
use tempfile::TempDir;

use common::{Filled, Mailer};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A filled store in a fresh directory.
fn filled() -> (TempDir, PathBuf, Filled) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.db");
    let filled = runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        common::fill(&store).await
    });
    (dir, path, filled)
}

/// The binary, with no store from the environment.
fn cli() -> Command {
    let mut cmd = Command::cargo_bin("aftermath").unwrap();
    cmd.env_remove("AFTERMATH_SQLITE")
        .env_remove("AFTERMATH_PG_URL")
        .env_remove("AFTERMATH_PG_SCHEMA");
    cmd
}

fn on(path: &Path) -> Command {
    let mut cmd = cli();
    cmd.arg("--sqlite").arg(path);
    cmd
}

/// Exactly one line on stderr, starting `error: `, and no panic.
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
fn status_lists_every_subscriber_and_exits_3_while_something_is_parked() {
    let (_dir, path, _) = filled();
    on(&path)
        .arg("status")
        .assert()
        .code(3)
        .stdout(predicate::str::contains("mailer"))
        .stdout(predicate::str::contains("audit-log"))
        .stdout(predicate::str::contains("worker-7"))
        .stdout(predicate::str::contains("1 parked effect(s), 1 blocked"))
        .stdout(predicate::str::contains("NOT SETTLED"));

    let report = json_of(on(&path).arg("status"));
    let subs = report["subscribers"].as_array().unwrap();
    let audit = subs.iter().find(|s| s["name"] == "audit-log").unwrap();
    assert_eq!(audit["lag_events"], 3, "{audit}");
    assert_eq!(audit["lease"]["owner"], "worker-7");
    assert_eq!(audit["lease_active"], true);
    assert_eq!(
        audit["state"], "catching_up",
        "a worker holds it, behind the head"
    );
    let mailer = subs.iter().find(|s| s["name"] == "mailer").unwrap();
    assert_eq!(mailer["lag_events"], 0, "the reactor read everything");
    assert_eq!(mailer["state"], "held");
    assert_eq!(mailer["held"], 2, "one parked, one blocked behind it");
    assert_eq!(report["needs_attention"], true);
    assert_eq!(report["settled"], false);
}

#[test]
fn dead_letters_show_the_parked_effect_with_its_error_and_the_blocked_one() {
    let (_dir, path, filled) = filled();
    on(&path)
        .arg("dead-letters")
        .assert()
        .success()
        .stdout(predicate::str::contains(filled.parked.to_string()))
        .stdout(predicate::str::contains(
            "mail service refused: unlucky order",
        ))
        .stdout(predicate::str::contains("blocked"));
    let list = json_of(on(&path).arg("dead-letters"));
    let effects = list["effects"].as_array().unwrap();
    assert_eq!(effects.len(), 2, "{list}");
    assert_eq!(effects[0]["state"], "parked");
    assert_eq!(effects[0]["event_id"], filled.parked.to_string());
    assert_eq!(effects[0]["attempts"], 1);
    on(&path)
        .args(["dead-letters", "--reactor", "nobody"])
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("unknown reactor `nobody`"));
}

#[test]
fn retry_and_skip_release_the_parked_effect_and_status_settles() {
    let (_dir, path, filled) = filled();
    let id = filled.parked.to_string();
    on(&path)
        .args(["retry", "mailer", &id, "--yes"])
        .assert()
        .success()
        .stdout(predicate::str::contains("will run again"));
    let list = json_of(on(&path).arg("dead-letters"));
    assert_eq!(list["effects"][0]["state"], "retry_requested", "{list}");

    // Retried, it fails again (the reactor refuses that order for good).
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        ReactorRunner::new(Mailer, store.clone(), store.clone(), store)
            .catch_up()
            .await
            .unwrap();
    });
    let list = json_of(on(&path).arg("dead-letters"));
    assert_eq!(list["effects"][0]["state"], "parked");

    // Given up: the event behind it goes on at the reactor's next pass.
    on(&path)
        .args(["skip", "mailer", &id, "--yes"])
        .assert()
        .success()
        .stdout(predicate::str::contains("skipped"));
    on(&path)
        .args(["skip", "mailer", &id, "--yes"])
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("no parked effect"));
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        ReactorRunner::new(Mailer, store.clone(), store.clone(), store)
            .catch_up()
            .await
            .unwrap();
    });
    on(&path)
        .arg("status")
        .assert()
        .code(0)
        .stdout(predicate::str::contains("0 parked effect(s), 0 blocked"));
}

#[test]
fn retry_all_and_the_bad_names_of_retry() {
    let (_dir, path, filled) = filled();
    let out = json_of(on(&path).args(["retry", "mailer", "--all", "--yes"]));
    assert_eq!(out["retried"], 1, "{out}");
    on(&path)
        .args(["retry", "postman", "--all", "--yes"])
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("unknown reactor `postman`"));
    // Not parked: the blocked event.
    on(&path)
        .args(["retry", "mailer", &filled.blocked.to_string(), "--yes"])
        .assert()
        .code(1)
        .stderr(one_error_line());
    on(&path)
        .args(["retry", "mailer", "not-a-uuid"])
        .assert()
        .code(2);
    on(&path).args(["retry", "mailer"]).assert().code(2);
}

#[test]
fn timeline_as_a_tree_as_json_and_as_a_mermaid_sequence_diagram() {
    let (_dir, path, filled) = filled();
    let id = filled.correlation.to_string();
    let blocked_id = filled.blocked.to_string();
    on(&path)
        .args(["timeline", &id])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "timeline of correlation {id}"
        )))
        .stdout(predicate::str::contains("order.Placed"))
        .stdout(predicate::str::contains("└ order-o-1 order.Confirmed"))
        .stdout(predicate::str::contains("effect mailer"));
    let t = json_of(on(&path).args(["timeline", &id]));
    let entries = t["entries"].as_array().unwrap();
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["event", "effect", "event", "effect"], "{t}");
    assert_eq!(entries[0]["payload"]["items"], 2, "{t}");
    assert_eq!(entries[2]["depth"], 1);
    let out = on(&path)
        .args(["timeline", &id, "--mermaid"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("sequenceDiagram\n"), "{text}");
    assert!(text.contains("participant p0 as order-o-1"), "{text}");
    assert!(text.contains("participant p1 as reactor mailer"), "{text}");
    assert!(text.contains("p0->>p0: order.Confirmed (v2)"), "{text}");
    assert!(
        text.contains("p0-->>p1: effect done after 1 attempt(s)"),
        "{text}"
    );

    // From a stream or an event of the conversation.
    for from in [
        vec!["timeline", "--stream", "order-o-1"],
        vec!["timeline", "--event", &blocked_id],
    ] {
        on(&path)
            .args(&from)
            .assert()
            .success()
            .stdout(predicate::str::contains("order.Confirmed"));
    }
    on(&path)
        .args(["timeline", "--stream", "order-o-9"])
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("no stream `order-o-9`"));
    on(&path).arg("timeline").assert().code(2);

    let unknown = uuid::Uuid::now_v7().to_string();
    on(&path)
        .args(["timeline", &unknown])
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("no events with correlation id"));
}

#[test]
fn streams_and_one_stream_paged() {
    let (_dir, path, _) = filled();
    on(&path)
        .arg("streams")
        .assert()
        .success()
        .stdout(predicate::str::contains("order-o-1"))
        .stdout(predicate::str::contains("order-o-2"));
    let list = json_of(on(&path).args(["streams", "--category", "order"]));
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[0]["version"], 2);
    let none = json_of(on(&path).args(["streams", "--category", "ord"]));
    assert_eq!(
        none.as_array().unwrap().len(),
        0,
        "a category is a whole prefix"
    );

    on(&path)
        .args(["stream", "order-o-1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("v1"))
        .stdout(predicate::str::contains("order.Confirmed"));
    let page = json_of(on(&path).args(["stream", "order-o-1", "--from", "2", "--limit", "1"]));
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event_type"], "order.Confirmed");
    assert_eq!(events[0]["version"], 2);
    on(&path)
        .args(["stream", "order-o-9"])
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("no stream `order-o-9`"));
}

#[test]
fn stream_shows_an_event_s_trace_context() {
    use aftermath::trace::TraceContext;
    use aftermath::{EventData, EventStore, ExpectedVersion, Metadata};
    let (_dir, path, _) = filled();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        let id = uuid::Uuid::new_v4();
        let mut metadata = Metadata::caused_by(id);
        metadata.trace = Some(TraceContext::parse(parent, Some("v=1")).unwrap());
        metadata.extra.insert("user".into(), "ann".into());
        let event = EventData {
            id,
            event_type: "audit.Noted".into(),
            payload: b"{}".to_vec(),
            metadata,
        };
        store
            .append("audit-1", ExpectedVersion::NoStream, vec![event])
            .await
            .unwrap();
    });
    on(&path)
        .args(["stream", "audit-1"])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "trace {parent}  state v=1"
        )))
        .stdout(predicate::str::contains("user: ann"));
    let page = json_of(on(&path).args(["stream", "audit-1"]));
    let event = &page["events"][0];
    assert_eq!(event["traceparent"], parent, "{page}");
    assert_eq!(event["tracestate"], "v=1");
    assert_eq!(event["extra"], serde_json::json!({"user": "ann"}));
}

#[test]
fn check_accepts_a_store_and_refuses_a_missing_foreign_or_newer_file() {
    let (dir, path, _) = filled();
    on(&path)
        .arg("check")
        .assert()
        .success()
        .stdout(predicate::str::contains("ok"));

    let missing = dir.path().join("missing.db");
    on(&missing)
        .arg("status")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("no such file"));
    assert!(!missing.exists(), "the tool must not create a store");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a database, just long enough to look like a header..........................................................................................").unwrap();
    on(&text)
        .arg("check")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("not a SQLite database"));

    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE invoices (id INTEGER)")
        .unwrap();
    on(&foreign)
        .arg("check")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("another application"));

    // A store written by a newer aftermath: its schema version is higher.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO aftermath_schema (version, applied_at) VALUES (99, 'later')",
            [],
        )
        .unwrap();
    on(&path)
        .arg("status")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("schema version is 99"));
}

#[test]
fn store_from_the_environment_usage_errors_and_help() {
    let (_dir, path, _) = filled();
    cli()
        .env("AFTERMATH_SQLITE", &path)
        .arg("check")
        .assert()
        .success();
    // The command line beats the environment.
    cli()
        .env("AFTERMATH_PG_URL", "postgres://nobody@127.0.0.1:1/none")
        .arg("--sqlite")
        .arg(&path)
        .arg("check")
        .assert()
        .success();
    cli()
        .arg("status")
        .assert()
        .code(2)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("no store"));
    cli()
        .args([
            "--sqlite",
            "a.db",
            "--postgres",
            "postgres://x@127.0.0.1/y",
            "status",
        ])
        .assert()
        .code(2)
        .stderr(one_error_line());
    cli().arg("frobnicate").assert().code(2);
    cli()
        .env("AFTERMATH_PG_URL", "postgres://app:s3cret@db.example/shop")
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("s3cret").not())
        .stdout(predicate::str::contains("Exit codes"))
        .stdout(predicate::str::contains("Examples"));
    for command in [
        "status",
        "dead-letters",
        "retry",
        "skip",
        "timeline",
        "streams",
        "stream",
        "check",
    ] {
        cli()
            .args([command, "--help"])
            .assert()
            .success()
            .stdout(predicate::str::contains("Examples:"))
            .stdout(predicate::str::contains("Exit codes:"));
    }
}

#[test]
fn dead_letters_list_parked_process_instances_skipped_events_and_inbox_messages() {
    use aftermath::process::ProcessRecord;
    use aftermath::process::record::stream_of;
    use aftermath::{EventData, EventStore, ExpectedVersion, Metadata};

    let (_dir, path, _) = filled();
    let parked = |error: &str| ProcessRecord::Parked {
        input: None,
        stop: false,
        command: None,
        from_version: 1,
        error: error.to_owned(),
    };
    let record = |r: &ProcessRecord| {
        let id = uuid::Uuid::now_v7();
        EventData::encode(r, id, Metadata::caused_by(id)).unwrap()
    };
    let still_parked = record(&parked("carrier API panicked"));
    let conversation = still_parked.metadata.correlation_id;
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        // Parked and still parked.
        store
            .append(
                &stream_of("fulfillment", "o-9"),
                ExpectedVersion::NoStream,
                vec![still_parked],
            )
            .await
            .unwrap();
        // Completed.
        store
            .append(
                &stream_of("fulfillment", "o-7"),
                ExpectedVersion::NoStream,
                vec![record(&ProcessRecord::Completed {})],
            )
            .await
            .unwrap();
        // Parked, then released by an operator: not listed.
        store
            .append(
                &stream_of("fulfillment", "o-8"),
                ExpectedVersion::NoStream,
                vec![
                    record(&parked("timed out")),
                    record(&ProcessRecord::Released {
                        from_version: 1,
                        parked_version: 1,
                        skip: false,
                    }),
                ],
            )
            .await
            .unwrap();
    });
    // What a projection's skip policy and a NATS inbox write.
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute(
        "INSERT INTO aftermath_skipped (subscriber, position, stream, version, event_type, error, skipped_at)
         VALUES ('order-totals', 2, 'order-o-1', 2, 'order.Confirmed', 'no such order row', 0)",
        [],
    )
    .unwrap();
    db.execute(
        "INSERT INTO aftermath_inbox_parked (inbox, message_id, subject, payload, error, parked_at)
         VALUES ('warehouse', 'm-1', 'orders.placed', x'ff', 'no ce-specversion header', 0)",
        [],
    )
    .unwrap();
    drop(db);

    on(&path)
        .arg("dead-letters")
        .assert()
        .success()
        .stdout(predicate::str::contains("parked process instances: 1"))
        .stdout(predicate::str::contains("carrier API panicked"))
        .stdout(predicate::str::contains("timed out").not())
        .stdout(predicate::str::contains("skipped projection events: 1"))
        .stdout(predicate::str::contains("no such order row"))
        .stdout(predicate::str::contains("parked inbox messages: 1"))
        .stdout(predicate::str::contains("no ce-specversion header"));
    let report = json_of(on(&path).arg("status"));
    assert_eq!(
        report["parked_processes"][0]["stream"],
        stream_of("fulfillment", "o-9")
    );
    // Instances by state: o-9 parked, o-8 released (running again).
    let list = json_of(on(&path).args(["processes", "--process", "fulfillment"]));
    let states: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["instance"].as_str().unwrap(),
                p["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [("o-7", "completed"), ("o-8", "running"), ("o-9", "parked")],
        "{list}"
    );
    on(&path)
        .args(["processes", "--state", "parked"])
        .assert()
        .success()
        .stdout(predicate::str::contains("o-9"))
        .stdout(predicate::str::contains("o-8").not());
    // The diagram says what a process record means, not only its type.
    on(&path)
        .args(["timeline", &conversation.to_string(), "--mermaid"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Note over p0: PARKED: carrier API panicked (v1)",
        ));
    assert_eq!(report["skipped"][0]["subscriber"], "order-totals");
    assert_eq!(report["parked_messages"][0]["message_id"], "m-1");
}

#[test]
fn status_shows_partitions_as_upper_bounds_and_hides_internal_rows() {
    use aftermath::Position;
    use aftermath::subscription::CheckpointStore;

    let (_dir, path, _) = filled();
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        store
            .save("shipping#0of2", None, Position::ORIGIN, None)
            .await
            .unwrap();
        store
            .save("shipping#partitions", None, Position(2), None)
            .await
            .unwrap();
    });
    on(&path)
        .arg("status")
        .assert()
        .code(3)
        .stdout(predicate::str::is_match(r"shipping#0of2 +behind +0 +≤ 4 ").unwrap())
        .stdout(predicate::str::contains("#partitions").not());
}

#[test]
fn status_shows_group_members_and_the_partitions_they_hold() {
    use aftermath::subscription::{Holder, LeaseStore};
    use std::time::Duration;

    let (_dir, path, _) = filled();
    let ttl = Duration::from_secs(120);
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        let (a, b) = (Holder::new("pod-a"), Holder::new("pod-b"));
        store.heartbeat("shipping#*of4", &a, ttl).await.unwrap();
        store.heartbeat("shipping#*of4", &b, ttl).await.unwrap();
        for (name, holder) in [
            ("shipping#0of4", &a),
            ("shipping#1of4", &a),
            ("shipping#2of4", &b),
        ] {
            store
                .acquire(name, holder, ttl)
                .await
                .unwrap()
                .expect("free");
        }
    });
    let out = on(&path).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        regex_lite(&text, r"shipping#\*of4 +pod-a \([^)]+\) +0-1 \(2\)"),
        "{text}"
    );
    assert!(
        regex_lite(&text, r"shipping#\*of4 +pod-b \([^)]+\) +2 \(1\)"),
        "{text}"
    );
    assert!(
        regex_lite(&text, r"shipping#\*of4 +\(no holder\) +3 \(1\)"),
        "{text}"
    );
    let json = json_of(on(&path).arg("status"));
    let group = &json["groups"][0];
    assert_eq!(group["group"], "shipping#*of4");
    assert_eq!(group["count"], 4);
    assert_eq!(group["unheld"], serde_json::json!([3]));
    assert_eq!(group["members"].as_array().unwrap().len(), 2);
}

fn regex_lite(text: &str, pattern: &str) -> bool {
    predicate::str::is_match(pattern).unwrap().eval(text)
}

/// A store as an aftermath of schema version 6 wrote it (migrations 1 to 6).
fn version_6_store(path: &Path) {
    let db = rusqlite::Connection::open(path).unwrap();
    let migrations = [
        include_str!("../../framework/src/store/sqlite/migrations/0001_events.sql"),
        include_str!("../../framework/src/store/sqlite/migrations/0002_subscriptions.sql"),
        include_str!("../../framework/src/store/sqlite/migrations/0003_reactors.sql"),
        include_str!("../../framework/src/store/sqlite/migrations/0004_inbox.sql"),
        include_str!("../../framework/src/store/sqlite/migrations/0005_unsettled_effects.sql"),
        include_str!("../../framework/src/store/sqlite/migrations/0006_process.sql"),
    ];
    db.execute_batch(
        "CREATE TABLE aftermath_schema (version INTEGER PRIMARY KEY, applied_at TEXT)",
    )
    .unwrap();
    for (i, sql) in migrations.iter().enumerate() {
        db.execute_batch(sql).unwrap();
        db.execute(
            "INSERT INTO aftermath_schema (version, applied_at) VALUES (?1, 'then')",
            [i as i64 + 1],
        )
        .unwrap();
    }
    db.execute(
        "INSERT INTO aftermath_deadlines (process, id, instance, name, due_at)
         VALUES ('shipping', x'00112233445566778899aabbccddeeff', 'order-1', 'ship', 0)",
        [],
    )
    .unwrap();
    // An event as schema 6 wrote it: the whole metadata as JSON, the trace
    // context among the `extra` keys.
    db.execute(
        r#"INSERT INTO events (stream, version, id, event_type, payload, metadata, recorded_at, correlation_id, causation_id)
         VALUES ('order-o-1', 1, x'0000000000000000000000000000000a', 'order.Placed', '{}',
         '{"correlation_id":"00000000-0000-0000-0000-00000000000c","causation_id":"00000000-0000-0000-0000-00000000000d","extra":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","user":"ann"}}',
         0, x'0000000000000000000000000000000c', x'0000000000000000000000000000000d')"#,
        [],
    )
    .unwrap();
    db.pragma_update(None, "application_id", 0x4146_544D)
        .unwrap();
}

fn stored_version(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT max(version) FROM aftermath_schema", [], |r| {
            r.get(0)
        })
        .unwrap()
}

#[test]
fn an_older_store_is_refused_untouched_and_migrated_only_on_request() {
    assert_eq!(
        aftermath::store::sqlite::SCHEMA_VERSION,
        9,
        "update version_6_store"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    version_6_store(&path);
    on(&path)
        .arg("status")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains(
            "schema version 6, this tool's is 9",
        ));
    assert_eq!(stored_version(&path), 6, "looking must not migrate");
    on(&path)
        .args(["migrate", "--yes"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "migrated from schema version 6 to 9",
        ));
    assert_eq!(stored_version(&path), 9);
    // Migration 8 gave the deadline of version 6 its instance's partition
    // hash (computed in Rust: SQLite has no hash function).
    let stored: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT instance_hash FROM aftermath_deadlines", [], |r| {
            r.get(0)
        })
        .unwrap();
    let hash = aftermath::subscription::stream_hash("shipping.process-order-1");
    assert_eq!(stored, (hash ^ (1 << 63)) as i64);
    // The event of version 6 reads as it did.
    let page = json_of(on(&path).args(["stream", "order-o-1"]));
    let event = &page["events"][0];
    assert_eq!(
        event["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "{page}"
    );
    assert_eq!(event["extra"], serde_json::json!({"user": "ann"}));
    assert_eq!(
        event["correlation_id"],
        "00000000-0000-0000-0000-00000000000c"
    );
    on(&path)
        .arg("check")
        .assert()
        .success()
        .stdout(predicate::str::contains("schema version 9 (this build: 9)"));
    on(&path)
        .args(["migrate", "--yes"])
        .assert()
        .success()
        .stdout(predicate::str::contains("already at schema version 9"));

    // An empty file would become a new store: refused.
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    on(&empty)
        .arg("status")
        .assert()
        .code(1)
        .stderr(one_error_line())
        .stderr(predicate::str::contains("empty SQLite database"));
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
}

#[test]
fn status_watch_refreshes_until_interrupted() {
    let (_dir, path, _) = filled();
    let out = on(&path)
        .args(["status", "--watch", "--json"])
        .timeout(std::time::Duration::from_millis(4500))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let reports: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(reports.len() >= 2, "refreshed every 2 s: {text}");
    assert!(reports.iter().all(|r| r["needs_attention"] == true));
}

#[test]
fn deadlines_lists_pending_deadlines_earliest_first() {
    use aftermath::process::{Deadline, DeadlineStore};

    let (_dir, path, _) = filled();
    on(&path)
        .arg("deadlines")
        .assert()
        .success()
        .stdout(predicate::str::contains("no pending deadlines"));
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        for (instance, name, hours) in [("o-1", "shipping", 48), ("o-2", "payment", 1)] {
            store
                .schedule(&Deadline {
                    process: "fulfillment".into(),
                    instance: instance.into(),
                    id: uuid::Uuid::now_v7(),
                    name: name.into(),
                    due_at: chrono::Utc::now() + chrono::Duration::hours(hours),
                })
                .await
                .unwrap();
        }
    });
    on(&path)
        .arg("deadlines")
        .assert()
        .success()
        .stdout(predicate::str::is_match(r"(?s)o-2 +payment.*o-1 +shipping").unwrap());
    let list = json_of(on(&path).args(["deadlines", "--limit", "1"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "payment");
}

#[test]
fn status_colors_its_states_on_a_terminal_only() {
    let (_dir, path, _) = filled();
    // Piped: plain text.
    let piped = on(&path).arg("status").output().unwrap();
    assert!(!String::from_utf8_lossy(&piped.stdout).contains('\x1b'));
    // On a terminal (util-linux `script` gives it one): the held state red,
    // the columns still aligned on what shows.
    let command = format!(
        "{} --sqlite {} status",
        env!("CARGO_BIN_EXE_aftermath"),
        path.display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("NO_COLOR")
        .env_remove("AFTERMATH_SQLITE")
        .env_remove("AFTERMATH_PG_URL")
        .output()
        .expect("util-linux `script`");
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(text.contains("\x1b[31mheld (2)\x1b[0m"), "{text:?}");
    assert!(text.contains("\x1b[1;31mNOT SETTLED"), "{text:?}");
    // Without the color codes, the POSITION column lines up under its title.
    let shown = text
        .replace("\x1b[31m", "")
        .replace("\x1b[33m", "")
        .replace("\x1b[1;31m", "")
        .replace("\x1b[0m", "");
    let header = shown.lines().find(|l| l.starts_with("SUBSCRIBER")).unwrap();
    let column = header.find("POSITION").unwrap();
    for (row, position) in [("audit-log", '1'), ("mailer", '4')] {
        let line = shown.lines().find(|l| l.starts_with(row)).unwrap();
        assert_eq!(line[column..].chars().next(), Some(position), "{shown}");
    }
}

/// A parked process instance: `dead-letters` lists it, `retry-process`
/// appends the release its runner carries out (the runner's side is
/// `operator_release_through_the_store_is_carried_out` in the tests crate),
/// a second release finds nothing parked, and an unknown or malformed
/// stream is one error line.
#[test]
fn a_parked_process_instance_is_released_by_stream() {
    use aftermath::process::ProcessRecord;
    use aftermath::{EventData, EventStore, ExpectedVersion, Metadata};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("parked.db");
    let stream = "demo.process-42";
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        let id = uuid::Uuid::now_v7();
        let parked = ProcessRecord::Parked {
            input: None,
            stop: false,
            command: None,
            from_version: 1,
            error: "command 42: the target refused it".into(),
        };
        let data = EventData::encode(&parked, id, Metadata::caused_by(id)).unwrap();
        store
            .append(stream, ExpectedVersion::NoStream, vec![data])
            .await
            .unwrap();
    });
    on(&path).arg("dead-letters").assert().stdout(
        predicate::str::contains(stream).and(predicate::str::contains("the target refused it")),
    );
    on(&path)
        .args(["retry-process", stream, "--yes"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "released; its parked input runs again",
        ));
    let last = runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        store
            .read_stream(stream, 2, aftermath::Direction::Forward, 10)
            .await
            .unwrap()
    });
    assert_eq!(last.len(), 1);
    assert_eq!(
        last[0].decode_known::<ProcessRecord>().unwrap().event,
        ProcessRecord::Released {
            from_version: 1,
            parked_version: 1,
            skip: false
        }
    );
    on(&path)
        .args(["skip-process", stream, "--yes"])
        .assert()
        .code(1)
        .stderr(one_error_line().and(predicate::str::contains("no parked process instance")));
    on(&path)
        .args(["retry-process", "order-1", "--yes"])
        .assert()
        .code(1)
        .stderr(one_error_line());
}
