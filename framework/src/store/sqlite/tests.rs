//! Focused tests of the SQLite backend: group commit, refusing foreign
//! files, corrupt rows, the writer's resilience, and parity with the
//! in-memory store.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::DateTime;
use serde_json::json;
use uuid::Uuid;

use super::{SqliteOptions, SqliteStore};
use crate::event::{EventData, Metadata, Position, StoredEvent};
use crate::store::memory::MemoryStore;
use crate::store::{AppendResult, Direction, EventStore, ExpectedVersion, Snapshot, StoreError};
use crate::upcast::Upcasters;

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.db");
    (dir, path)
}

fn event(event_type: &str, n: u64) -> EventData {
    let id = Uuid::now_v7();
    EventData {
        id,
        event_type: event_type.to_owned(),
        payload: serde_json::to_vec(&json!({ "n": n })).unwrap(),
        metadata: Metadata::caused_by(id),
    }
}

fn with_id(id: Uuid) -> EventData {
    EventData {
        id,
        event_type: "Tested".to_owned(),
        payload: b"{}".to_vec(),
        metadata: Metadata::caused_by(id),
    }
}

/// Waits until the writer has started `n` groups.
async fn wait_for_groups(store: &SqliteStore, n: u64) {
    for _ in 0..500 {
        if store.groups() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the writer never started group {n}");
}

/// Blocks the writer thread until the returned sender is used or dropped.
async fn hold_writer(
    store: &SqliteStore,
) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let before = store.groups();
    let holder = store.clone();
    let task = tokio::spawn(async move {
        holder
            .write(move |_| {
                let _ = gate.recv();
                Ok(())
            })
            .await
            .expect("gate job");
    });
    wait_for_groups(store, before + 1).await;
    (release, task)
}

fn refused(result: Result<SqliteStore, StoreError>) -> String {
    match result {
        Err(StoreError::Incompatible { reason, .. }) => reason,
        Err(other) => panic!("expected Incompatible, got {other}"),
        Ok(_) => panic!("expected Incompatible, the store opened"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed_gap_free() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    let (release, gate) = hold_writer(&store).await;
    let groups_before = store.groups();

    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let store = store.clone();
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            let batch: Vec<EventData> = (0..1 + i % 3).map(|n| event("Counted", n)).collect();
            started.fetch_add(1, Ordering::SeqCst);
            store
                .append(&format!("counter-{i}"), ExpectedVersion::NoStream, batch)
                .await
        }));
    }
    while started.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.send(()).unwrap();
    gate.await.unwrap();

    let mut ranges = Vec::new();
    for task in tasks {
        let done = task.await.unwrap().expect("append");
        assert!(!done.duplicate);
        let (first, last) = (
            done.first_position.unwrap().0,
            done.last_position.unwrap().0,
        );
        assert_eq!(last - first + 1, done.last_version);
        ranges.push((first, last));
    }
    ranges.sort_unstable();
    let mut next = 1;
    for (first, last) in &ranges {
        assert_eq!(*first, next, "positions are distinct and gap-free");
        next = last + 1;
    }
    let total = next - 1;
    assert_eq!(total, (0..200u64).map(|i| 1 + i % 3).sum::<u64>());
    let groups = store.groups() - groups_before;
    assert!(groups <= 3, "200 queued appends took {groups} transactions");

    assert_eq!(store.head().await.unwrap(), Position(total));
    assert_eq!(*store.watch_head().borrow(), Position(total));
    let all = store
        .read_all(Position::ORIGIN, None, 10_000)
        .await
        .unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.position.0).collect();
    assert_eq!(positions, (1..=total).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_append_fails_alone_in_its_group() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    let taken = event("Tested", 0);
    store
        .append("taken", ExpectedVersion::NoStream, vec![taken.clone()])
        .await
        .unwrap();

    let (release, gate) = hold_writer(&store).await;
    let spawn = |stream: &'static str, events: Vec<EventData>| {
        let store = store.clone();
        tokio::spawn(async move { store.append(stream, ExpectedVersion::Any, events).await })
    };
    let first = spawn("a", vec![event("Tested", 1), event("Tested", 2)]);
    let reused = spawn("b", vec![event("Tested", 3), taken.clone()]);
    let last = spawn("c", vec![event("Tested", 4)]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.send(()).unwrap();
    gate.await.unwrap();

    assert_eq!(first.await.unwrap().unwrap().last_version, 2);
    match reused.await.unwrap() {
        Err(StoreError::DuplicateEventId {
            id,
            existing_stream,
            existing_version,
            ..
        }) => {
            assert_eq!(id, taken.id);
            assert_eq!(existing_stream, "taken");
            assert_eq!(existing_version, 1);
        }
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
    assert_eq!(last.await.unwrap().unwrap().last_version, 1);
    assert_eq!(store.stream_version("b").await.unwrap(), 0);
    let all = store.read_all(Position::ORIGIN, None, 100).await.unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.position.0).collect();
    assert_eq!(
        positions,
        vec![1, 2, 3, 4],
        "the rolled-back append left no gap"
    );
}

#[tokio::test]
async fn refuses_files_that_are_not_aftermath_databases() {
    let (_dir, path) = temp_db();

    let text = "this is not a database\n".repeat(200);
    std::fs::write(&path, &text).unwrap();
    let reason = refused(SqliteStore::open(&path).await);
    assert!(reason.contains("not a SQLite database"), "{reason}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "left untouched"
    );
    std::fs::remove_file(&path).unwrap();

    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE users (name TEXT)")
            .unwrap();
    }
    let reason = refused(SqliteStore::open(&path).await);
    assert!(
        reason.contains("another application") && reason.contains("users"),
        "{reason}"
    );
    std::fs::remove_file(&path).unwrap();

    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "application_id", 42).unwrap();
    }
    let reason = refused(SqliteStore::open(&path).await);
    assert!(reason.contains("application_id 0x0000002a"), "{reason}");
}

#[tokio::test]
async fn refuses_a_newer_schema_version() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    store
        .append("s-1", ExpectedVersion::NoStream, vec![event("Tested", 1)])
        .await
        .unwrap();
    drop(store);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO aftermath_schema (version, applied_at) VALUES (99, 'later')",
            [],
        )
        .unwrap();
    }
    let reason = refused(SqliteStore::open(&path).await);
    assert!(
        reason.contains("99")
            && reason.contains(&format!("up to {}", super::schema::SCHEMA_VERSION)),
        "{reason}"
    );
}

#[tokio::test]
async fn corrupt_rows_are_errors_naming_position_and_column() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    let events: Vec<EventData> = (1..=4).map(|n| event("Tested", n)).collect();
    store
        .append("broken-1", ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "UPDATE events SET metadata = '{not json' WHERE position = 2;
             UPDATE events SET id = x'0102' WHERE position = 3;
             UPDATE events SET recorded_at = 'yesterday' WHERE position = 4;",
        )
        .unwrap();
    }
    let expect_corrupt =
        |result: Result<Vec<StoredEvent>, StoreError>, at: u64, column: &str| match result {
            Err(StoreError::Corrupt {
                position,
                stream,
                message,
            }) => {
                assert_eq!(position, Position(at));
                assert_eq!(stream, "broken-1");
                assert!(message.contains(column), "{message}");
            }
            other => panic!("expected Corrupt at {at}, got {other:?}"),
        };
    let first = store.read_all(Position::ORIGIN, None, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    expect_corrupt(
        store.read_all(Position::ORIGIN, None, 10).await,
        2,
        "`metadata`",
    );
    expect_corrupt(
        store
            .read_stream("broken-1", 3, Direction::Forward, 10)
            .await,
        3,
        "`id`",
    );
    expect_corrupt(
        store.read_all(Position(3), None, 10).await,
        4,
        "`recorded_at`",
    );
    expect_corrupt(
        store
            .read_stream("broken-1", u64::MAX, Direction::Backward, 10)
            .await,
        4,
        "`recorded_at`",
    );
}

/// From schema 9 the ids and the trace context are columns and `metadata`
/// holds only the application's keys; rows written before (whole metadata
/// JSON, trace context in `extra`) read as they did.
#[tokio::test]
async fn metadata_columns_and_rows_of_earlier_schemas_read_alike() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let trace = crate::trace::TraceContext::parse(parent, Some("v=1")).unwrap();
    let mut traced = event("Tested", 1);
    traced.metadata.trace = Some(trace.clone());
    traced.metadata.extra.insert("user".into(), "ann".into());
    let plain = event("Tested", 2);
    let legacy = event("Tested", 3);
    store
        .append(
            "layout-1",
            ExpectedVersion::NoStream,
            vec![traced.clone(), plain.clone(), legacy.clone()],
        )
        .await
        .unwrap();
    let legacy_json = json!({
        "correlation_id": legacy.metadata.correlation_id,
        "causation_id": legacy.metadata.causation_id,
        "extra": {"traceparent": parent, "tracestate": "v=1", "user": "bob"},
    });
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let stored: Vec<(String, Option<Vec<u8>>)> = conn
            .prepare("SELECT metadata, trace FROM events ORDER BY position")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored[0].0, r#"{"extra":{"user":"ann"}}"#);
        assert_eq!(stored[0].1.as_ref().map(Vec::len), Some(25 + 3));
        assert_eq!(stored[1], ("{}".to_owned(), None));
        conn.execute(
            "UPDATE events SET metadata = ?1, trace = NULL WHERE position = 3",
            [legacy_json.to_string()],
        )
        .unwrap();
    }
    let read = store.read_all(Position::ORIGIN, None, 10).await.unwrap();
    assert_eq!(read[0].metadata, traced.metadata);
    assert_eq!(read[1].metadata, plain.metadata);
    assert_eq!(read[2].metadata.trace, Some(trace));
    assert_eq!(
        read[2].metadata.correlation_id,
        legacy.metadata.correlation_id
    );
    assert_eq!(read[2].metadata.extra.len(), 1);
    assert_eq!(read[2].metadata.extra["user"], "bob");

    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE events SET trace = x'0102' WHERE position = 2", [])
        .unwrap();
    conn.execute(
        "UPDATE events SET correlation_id = 'text' WHERE position = 3",
        [],
    )
    .unwrap();
    for (at, column) in [(2, "`trace`"), (3, "`correlation_id`")] {
        match store.read_all(Position(at - 1), None, 1).await {
            Err(StoreError::Corrupt {
                position, message, ..
            }) => {
                assert_eq!(position, Position(at));
                assert!(message.contains(column), "{message}");
            }
            other => panic!("expected Corrupt at {at}, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_survives_a_panicking_job() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    let (release, gate) = hold_writer(&store).await;
    let panicking = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(|conn| -> Result<(), StoreError> {
                    conn.execute_batch("CREATE TABLE scratch (x)").unwrap();
                    panic!("boom in a job")
                })
                .await
        })
    };
    let appending = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append(
                    "after-1",
                    ExpectedVersion::NoStream,
                    vec![event("Tested", 1)],
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.send(()).unwrap();
    gate.await.unwrap();

    let error = panicking.await.unwrap().unwrap_err();
    assert!(error.to_string().contains("boom in a job"), "{error}");
    assert_eq!(appending.await.unwrap().unwrap().last_version, 1);
    let scratch: i64 = store
        .read(|conn| {
            conn.query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'scratch'",
                [],
                |row| row.get(0),
            )
            .map_err(|e| StoreError::database("test", e))
        })
        .await
        .unwrap();
    assert_eq!(scratch, 0, "the panicking job's writes were rolled back");

    // Alone in its group (no savepoint), and a job that ends the transaction.
    let error = store
        .write(|_| -> Result<(), StoreError> { panic!("boom alone") })
        .await
        .unwrap_err();
    assert!(error.to_string().contains("boom alone"), "{error}");
    let error = store
        .write(|conn| {
            conn.execute_batch("COMMIT")
                .map_err(|e| StoreError::database("test", e))
        })
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("must not BEGIN, COMMIT or ROLLBACK"),
        "{error}"
    );

    let done = store
        .append(
            "after-1",
            ExpectedVersion::Exact(1),
            vec![event("Tested", 2)],
        )
        .await
        .unwrap();
    assert_eq!(done.last_position, Some(Position(2)));
}

#[tokio::test]
async fn reopening_keeps_events_and_snapshots() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    let events: Vec<EventData> = (1..=3).map(|n| event("Tested", n)).collect();
    store
        .append("kept-1", ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    let snapshot = Snapshot {
        stream: "kept-1".into(),
        version: 3,
        state: b"{\"n\":3}".to_vec(),
        taken_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
    };
    store.save_snapshot(snapshot.clone()).await.unwrap();
    let before = store.read_all(Position::ORIGIN, None, 100).await.unwrap();
    drop(store);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(
        store.read_all(Position::ORIGIN, None, 100).await.unwrap(),
        before
    );
    assert_eq!(store.head().await.unwrap(), Position(3));
    assert_eq!(*store.watch_head().borrow(), Position(3));
    assert_eq!(store.load_snapshot("kept-1").await.unwrap(), Some(snapshot));
    let done = store
        .append(
            "kept-1",
            ExpectedVersion::Exact(3),
            vec![event("Tested", 4)],
        )
        .await
        .unwrap();
    assert_eq!(
        (done.first_version, done.first_position),
        (4, Some(Position(4)))
    );
}

#[tokio::test]
async fn snapshots_are_never_replaced_by_older_ones() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    let snapshot = |version: u64| Snapshot {
        stream: "snap-1".into(),
        version,
        state: format!("{{\"v\":{version}}}").into_bytes(),
        taken_at: DateTime::from_timestamp_micros(1_000_000 * version as i64).unwrap(),
    };
    assert_eq!(store.load_snapshot("snap-1").await.unwrap(), None);
    store.save_snapshot(snapshot(5)).await.unwrap();
    store.save_snapshot(snapshot(3)).await.unwrap();
    assert_eq!(
        store.load_snapshot("snap-1").await.unwrap(),
        Some(snapshot(5))
    );
    store.save_snapshot(snapshot(7)).await.unwrap();
    assert_eq!(
        store.load_snapshot("snap-1").await.unwrap(),
        Some(snapshot(7))
    );
}

/// Errors compare by their message; events without their timestamps.
fn outcome(result: Result<AppendResult, StoreError>) -> Result<AppendResult, String> {
    result.map_err(|e| e.to_string())
}

fn untimed(events: Result<Vec<StoredEvent>, StoreError>) -> Result<Vec<StoredEvent>, String> {
    events
        .map(|events| {
            events
                .into_iter()
                .map(|mut e| {
                    e.recorded_at = DateTime::UNIX_EPOCH;
                    e
                })
                .collect()
        })
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn behaves_like_the_memory_store() {
    let upcasters = || {
        Upcasters::new().register_renamed("OldTested", "Tested", |mut v| {
            v["upcast"] = json!(true);
            Ok(v)
        })
    };
    let (_dir, path) = temp_db();
    let sqlite = SqliteStore::open_with(&path, SqliteOptions::default().upcasters(upcasters()))
        .await
        .unwrap();
    let memory = MemoryStore::with_upcasters(upcasters());

    let [a, b, c, d, e, f, g, x] = [(); 8].map(|_| Uuid::now_v7());
    let mut old = with_id(Uuid::now_v7());
    old.event_type = "OldTested".into();
    let mut other = with_id(Uuid::now_v7());
    other.event_type = "Other".into();
    use ExpectedVersion::*;
    let script: Vec<(&str, ExpectedVersion, Vec<EventData>)> = vec![
        ("s-1", NoStream, vec![with_id(a), with_id(b)]),
        ("s-1", NoStream, vec![with_id(a), with_id(b)]),
        ("s-1", Exact(0), vec![with_id(a), with_id(b)]),
        ("s-1", Exact(0), vec![with_id(a)]),
        ("s-1", Exact(2), vec![with_id(a)]),
        ("s-2", Any, vec![with_id(c), with_id(a)]),
        ("s-1", Exact(5), vec![with_id(d)]),
        ("s-1", Exact(5), vec![with_id(d), with_id(b)]),
        ("s-1", Exact(2), vec![]),
        ("s-1", NoStream, vec![]),
        ("s-9", NoStream, vec![]),
        ("$all", Any, vec![with_id(d)]),
        ("", Any, vec![with_id(d)]),
        ("s-1", Any, vec![with_id(e), with_id(e)]),
        ("s-1", StreamExists, vec![with_id(d)]),
        ("s-3", StreamExists, vec![with_id(f)]),
        ("s-1", Any, vec![with_id(a), with_id(b), with_id(d)]),
        ("s-1", Any, vec![with_id(a), with_id(x)]),
        ("s-1", Any, vec![with_id(g), with_id(a)]),
        (
            "s-2",
            NoStream,
            vec![old.clone(), with_id(f), other.clone()],
        ),
        ("s-2", Exact(3), vec![with_id(g), with_id(e)]),
        ("s-2", Exact(1), vec![old.clone(), with_id(f)]),
    ];
    for (i, (stream, expected, events)) in script.into_iter().enumerate() {
        let from_sqlite = outcome(sqlite.append(stream, expected, events.clone()).await);
        let from_memory = outcome(memory.append(stream, expected, events).await);
        assert_eq!(
            from_sqlite, from_memory,
            "step {i}: append to {stream:?} {expected}"
        );
    }

    for stream in ["s-1", "s-2", "s-3", "nothing"] {
        assert_eq!(
            sqlite.stream_version(stream).await.unwrap(),
            memory.stream_version(stream).await.unwrap()
        );
        for direction in [Direction::Forward, Direction::Backward] {
            for from in [0, 1, 2, 3, 5, 100, i64::MAX as u64 + 1, u64::MAX] {
                for limit in [0, 1, 2, 100] {
                    assert_eq!(
                        untimed(sqlite.read_stream(stream, from, direction, limit).await),
                        untimed(memory.read_stream(stream, from, direction, limit).await),
                        "read_stream({stream}, {from}, {direction:?}, {limit})"
                    );
                }
            }
        }
    }
    let filters: [Option<&[&str]>; 5] = [
        None,
        Some(&[]),
        Some(&["Tested"]),
        Some(&["Other", "Tested"]),
        Some(&["Other", "Missing", "OldTested"]),
    ];
    for types in filters {
        for after in [0, 1, 3, 6, 100, u64::MAX] {
            for limit in [0, 1, 2, 3, 100] {
                assert_eq!(
                    untimed(sqlite.read_all(Position(after), types, limit).await),
                    untimed(memory.read_all(Position(after), types, limit).await),
                    "read_all({after}, {types:?}, {limit})"
                );
            }
        }
    }
    for id in [a, d, f, g, old.id, x] {
        assert_eq!(
            untimed(sqlite.find_event(id).await.map(|e| e.into_iter().collect())),
            untimed(memory.find_event(id).await.map(|e| e.into_iter().collect())),
        );
    }
    assert_eq!(sqlite.head().await.unwrap(), memory.head().await.unwrap());
    assert_eq!(*sqlite.watch_head().borrow(), *memory.watch_head().borrow());
    let upcast = sqlite.find_event(old.id).await.unwrap().unwrap();
    assert_eq!(upcast.event_type, "Tested");
}
