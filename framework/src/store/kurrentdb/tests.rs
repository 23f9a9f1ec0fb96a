//! The store's logic on the in-memory stand-in server ([`FakeServer`]):
//! the conformance suite's contracts that a server run would check, here
//! without one, plus the failure cases a real server rarely shows (lost
//! answers, a writer that died between reserving ids and appending,
//! dropped subscriptions, legacy positions, other writers' events).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ::kurrentdb::StreamPosition;
use futures::TryStreamExt;
use uuid::Uuid;

use super::fake::FakeServer;
use super::mapping::{self, RESERVED_TYPE, Reservation};
use super::server::{Proposed, Server};
use super::{KurrentOptions, KurrentStore};
use crate::event::{EventData, Metadata, Position, StoredEvent};
use crate::store::{
    Direction, EventStore, ExpectedVersion, Snapshot, StoreError, read_all_pages, read_stream_all,
};
use crate::upcast::Upcasters;

fn raw(event_type: &str, payload: &str) -> EventData {
    let id = Uuid::now_v7();
    EventData {
        id,
        event_type: event_type.to_owned(),
        payload: payload.as_bytes().to_vec(),
        metadata: Metadata::caused_by(id),
    }
}

fn deposits(start: u64, n: u64) -> Vec<EventData> {
    (start..start + n)
        .map(|i| raw("Deposited", &format!(r#"{{"amount":{i}}}"#)))
        .collect()
}

async fn open(server: &Arc<FakeServer>, options: KurrentOptions) -> KurrentStore {
    KurrentStore::open(server.clone(), options, "fake://server".to_owned())
        .await
        .expect("open")
}

/// A fresh server and a store on it, in a namespace (as the conformance
/// suite runs it) or not.
async fn fresh(namespace: Option<&str>) -> (Arc<FakeServer>, KurrentStore) {
    let server = Arc::new(FakeServer::new());
    let options = match namespace {
        Some(ns) => KurrentOptions::default().namespace(ns),
        None => KurrentOptions::default(),
    };
    let store = open(&server, options).await;
    (server, store)
}

async fn all_events(store: &KurrentStore) -> Vec<StoredEvent> {
    read_all_pages(store, Position::ORIGIN, None, 1000)
        .try_collect()
        .await
        .unwrap()
}

fn assert_wrong_version<T: std::fmt::Debug>(result: Result<T, StoreError>, want_actual: u64) {
    match result {
        Err(StoreError::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, want_actual),
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_versions_and_empty_batches() {
    for ns in [None, Some("t1")] {
        let (_server, s) = fresh(ns).await;
        use ExpectedVersion::*;
        assert_wrong_version(s.append("a-1", StreamExists, deposits(0, 1)).await, 0);
        assert_wrong_version(s.append("a-1", Exact(1), deposits(0, 1)).await, 0);
        let r = s.append("a-1", NoStream, deposits(0, 2)).await.unwrap();
        assert_eq!(
            (r.first_version, r.last_version, r.duplicate),
            (1, 2, false)
        );
        assert!(r.first_position.unwrap() < r.last_position.unwrap());
        assert_wrong_version(s.append("a-1", NoStream, deposits(0, 1)).await, 2);
        assert_wrong_version(s.append("a-1", Exact(1), deposits(0, 1)).await, 2);
        assert_wrong_version(s.append("a-1", Exact(3), deposits(0, 1)).await, 2);
        assert_wrong_version(s.append("a-1", Exact(0), deposits(0, 1)).await, 2);
        let r = s.append("a-1", Exact(2), deposits(0, 1)).await.unwrap();
        assert_eq!((r.first_version, r.last_version), (3, 3));
        assert_eq!(
            s.append("a-1", StreamExists, deposits(0, 1))
                .await
                .unwrap()
                .last_version,
            4
        );
        let r = s.append("a-1", Any, deposits(0, 3)).await.unwrap();
        assert_eq!((r.first_version, r.last_version), (5, 7));
        assert_eq!(
            s.append("b-1", Exact(0), deposits(0, 1))
                .await
                .unwrap()
                .last_version,
            1
        );
        assert_eq!(s.stream_version("a-1").await.unwrap(), 7);
        assert_eq!(s.stream_version("nope").await.unwrap(), 0);
        assert_eq!(
            all_events(&s).await.len(),
            8,
            "refused appends wrote nothing"
        );
        // Empty batches check the version only.
        let r = s.append("e-1", NoStream, vec![]).await.unwrap();
        assert_eq!(
            (r.first_version, r.last_version, r.first_position),
            (1, 0, None)
        );
        assert_wrong_version(s.append("a-1", Exact(1), vec![]).await, 7);
        let r = s.append("a-1", Exact(7), vec![]).await.unwrap();
        assert_eq!(
            (r.first_version, r.last_version, r.last_position),
            (8, 7, None)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_are_refused_whole() {
    let (server, s) = fresh(Some("t1")).await;
    let mut batch = deposits(0, 3);
    batch[2].id = batch[0].id;
    match s.append("d-1", ExpectedVersion::Any, batch).await {
        Err(StoreError::DuplicateEventId {
            existing_version, ..
        }) => assert_eq!(existing_version, 0),
        other => panic!("{other:?}"),
    }
    let first = deposits(0, 1);
    let taken = first[0].id;
    s.append("x-1", ExpectedVersion::NoStream, first)
        .await
        .unwrap();
    let mut batch = deposits(1, 4);
    batch[3].id = taken;
    let others: Vec<Uuid> = batch[..3].iter().map(|e| e.id).collect();
    match s.append("y-1", ExpectedVersion::NoStream, batch).await {
        Err(StoreError::DuplicateEventId {
            id,
            stream,
            existing_stream,
            existing_version,
        }) => {
            assert_eq!((id, stream.as_str()), (taken, "y-1"));
            assert_eq!((existing_stream.as_str(), existing_version), ("x-1", 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.stream_version("y-1").await.unwrap(), 0);
    assert_eq!(all_events(&s).await.len(), 1);
    // The refused batch gave its other ids back: they are usable anywhere.
    let names = mapping::Names::new(Some("t1"));
    for id in &others {
        let records = server.stream(&names.id_stream(*id));
        assert_eq!(
            records.last().unwrap().event_type,
            mapping::RELEASED_TYPE,
            "released"
        );
    }
    let mut reuse = deposits(9, 1);
    reuse[0].id = others[0];
    s.append("z-1", ExpectedVersion::NoStream, reuse)
        .await
        .unwrap();
    // Reserved names and types are refused.
    for name in ["", "$all", "aftermath-id-x", "aftermath-snapshot-a-1"] {
        assert!(
            matches!(
                s.append(name, ExpectedVersion::Any, deposits(0, 1)).await,
                Err(StoreError::InvalidStream { .. })
            ),
            "{name:?}"
        );
    }
    match s
        .append("t-1", ExpectedVersion::Any, vec![raw("$system", "{}")])
        .await
    {
        Err(StoreError::Database { source, .. }) => {
            assert!(source.to_string().contains("`$system`"))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_return_the_first_result() {
    let (server, s) = fresh(None).await;
    s.append("other-1", ExpectedVersion::Any, deposits(0, 2))
        .await
        .unwrap();
    let batch = deposits(10, 3);
    let first = s
        .append("r-1", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    s.append("other-1", ExpectedVersion::Any, deposits(0, 2))
        .await
        .unwrap();
    let head = s.head().await.unwrap();
    let appends = server.appends();
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Any,
        ExpectedVersion::StreamExists,
    ] {
        let again = s.append("r-1", expected, batch.clone()).await.unwrap();
        assert!(again.duplicate, "{expected}");
        assert_eq!(
            (
                again.first_version,
                again.last_version,
                again.first_position,
                again.last_position
            ),
            (
                first.first_version,
                first.last_version,
                first.first_position,
                first.last_position
            ),
        );
    }
    assert_eq!(s.head().await.unwrap(), head);
    assert_eq!(
        server.appends(),
        appends,
        "retries wrote nothing, not even reservations"
    );
    s.append("r-1", ExpectedVersion::Exact(3), deposits(0, 1))
        .await
        .unwrap();
    let again = s
        .append("r-1", ExpectedVersion::Exact(0), batch.clone())
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.last_version, 3);
    // Any other reuse is an error naming where the id is.
    let cases: Vec<(&str, ExpectedVersion, Vec<EventData>)> = vec![
        ("r-2", ExpectedVersion::Any, batch.clone()),
        ("r-1", ExpectedVersion::Exact(4), batch.clone()),
        (
            "r-1",
            ExpectedVersion::Any,
            vec![batch[0].clone(), deposits(5, 1).remove(0)],
        ),
        (
            "r-1",
            ExpectedVersion::Any,
            vec![batch[1].clone(), batch[0].clone()],
        ),
    ];
    for (stream, expected, events) in cases {
        match s.append(stream, expected, events).await {
            Err(StoreError::DuplicateEventId {
                existing_stream, ..
            }) => assert_eq!(existing_stream, "r-1"),
            other => panic!("{stream} {expected}: {other:?}"),
        }
    }
    assert_eq!(s.stream_version("r-1").await.unwrap(), 4);
}

/// The server committed but the answer was lost: the caller's retry is a
/// duplicate, not a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_absorbed_by_the_retry() {
    let (server, s) = fresh(Some("t1")).await;
    let batch = deposits(0, 2);
    server.lose_next_answer("t1.l-1");
    match s
        .append("l-1", ExpectedVersion::NoStream, batch.clone())
        .await
    {
        Err(e) => assert!(super::is_unavailable(&e), "{e}"),
        Ok(r) => panic!("the answer should be lost, got {r:?}"),
    }
    let retry = s
        .append("l-1", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!((retry.first_version, retry.last_version), (1, 2));
    assert_eq!(s.stream_version("l-1").await.unwrap(), 2);
}

/// A writer reserved ids and died before appending: the ids stay usable at
/// that place, are reported as used elsewhere, and free up once the stream
/// moves past the place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_writers_reservations() {
    let (server, s) = fresh(None).await;
    let names = mapping::Names::new(None);
    let batch = deposits(0, 2);
    for (index, e) in batch.iter().enumerate() {
        server.inject(
            &names.id_stream(e.id),
            vec![Proposed {
                id: Uuid::new_v4(),
                event_type: RESERVED_TYPE.to_owned(),
                data: Reservation {
                    stream: "p-1".into(),
                    first: 1,
                    index: index as u64,
                }
                .encode(),
                metadata: Vec::new(),
            }],
        );
    }
    assert!(
        s.find_event(batch[0].id).await.unwrap().is_none(),
        "not stored"
    );
    match s.append("q-1", ExpectedVersion::Any, batch.clone()).await {
        Err(StoreError::DuplicateEventId {
            existing_stream,
            existing_version,
            ..
        }) => assert_eq!((existing_stream.as_str(), existing_version), ("p-1", 1)),
        other => panic!("{other:?}"),
    }
    // The same place: the dead writer's append, redone.
    let done = s
        .append("p-1", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert_eq!(done.last_version, 2);
    assert_eq!(s.find_event(batch[1].id).await.unwrap().unwrap().version, 2);

    // Another dead writer, at p-1 version 3; the stream then moves on.
    let orphan = deposits(5, 1);
    server.inject(
        &names.id_stream(orphan[0].id),
        vec![Proposed {
            id: Uuid::new_v4(),
            event_type: RESERVED_TYPE.to_owned(),
            data: Reservation {
                stream: "p-1".into(),
                first: 3,
                index: 0,
            }
            .encode(),
            metadata: Vec::new(),
        }],
    );
    s.append("p-1", ExpectedVersion::Exact(2), deposits(6, 1))
        .await
        .unwrap();
    let r = s
        .append("q-1", ExpectedVersion::Any, orphan.clone())
        .await
        .unwrap();
    assert_eq!(r.last_version, 1, "a stale reservation is taken over");
    assert_eq!(
        s.find_event(orphan[0].id).await.unwrap().unwrap().stream,
        "q-1"
    );
}

/// Concurrent writers (shared streams with `Any`, own streams with exact
/// versions) and a tailing reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_order_under_concurrent_writers() {
    let (_server, store) = fresh(Some("t1")).await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let store = store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen: Vec<StoredEvent> = Vec::new();
            let mut after = Position::ORIGIN;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let page = store.read_all(after, None, 17).await.unwrap();
                for e in &page {
                    assert!(e.position > after);
                    after = e.position;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..6u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for i in 0..30u64 {
                let (stream, expected) = if i % 2 == 0 {
                    (format!("shared-{}", i % 3), ExpectedVersion::Any)
                } else {
                    let own = format!("own-{w}");
                    let v = store.stream_version(&own).await.unwrap();
                    (own, ExpectedVersion::Exact(v))
                };
                let batch = deposits(w * 1000 + i, 1 + (i % 3));
                let ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
                store.append(&stream, expected, batch).await.unwrap();
                committed.extend(ids);
            }
            committed
        }));
    }
    let mut committed = HashSet::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let tailed = reader.await.unwrap();
    let all = all_events(&store).await;
    assert_eq!(all.len(), committed.len());
    assert_eq!(all.iter().map(|e| e.id).collect::<HashSet<_>>(), committed);
    assert!(all.windows(2).all(|p| p[0].position < p[1].position));
    assert_eq!(
        tailed.iter().map(|e| e.id).collect::<Vec<_>>(),
        all.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in &all {
        versions.entry(&e.stream).or_default().push(e.version);
    }
    for (stream, vs) in versions {
        assert_eq!(vs, (1..=vs.len() as u64).collect::<Vec<_>>(), "{stream}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_reads_page_through_the_server_filter() {
    for ns in [None, Some("t1")] {
        let (server, s) = fresh(ns).await;
        for i in 0..60u64 {
            let t = ["Opened", "Deposited", "Withdrawn"][(i % 3) as usize];
            s.append(
                &format!("f-{}", i % 5),
                ExpectedVersion::Any,
                vec![raw(t, "{}")],
            )
            .await
            .unwrap();
            if i % 7 == 0 {
                // System events and snapshots in between are not ours.
                server.set_max_count(&format!("f-{i}"), 5).await.unwrap();
                s.save_snapshot(Snapshot {
                    stream: format!("f-{}", i % 5),
                    version: i,
                    state: b"{}".to_vec(),
                    taken_at: chrono::Utc::now(),
                })
                .await
                .unwrap();
            }
        }
        let types: &[&str] = &["Withdrawn", "Opened"];
        let got: Vec<StoredEvent> = read_all_pages(&s, Position::ORIGIN, Some(types), 7)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got.len(), 40);
        assert!(got.iter().all(|e| e.event_type != "Deposited"));
        let all = all_events(&s).await;
        assert_eq!(all.len(), 60, "only our events");
        let want: Vec<Uuid> = all
            .iter()
            .filter(|e| types.contains(&e.event_type.as_str()))
            .map(|e| e.id)
            .collect();
        assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), want);
        let mid = got[10].position;
        let page = s.read_all(mid, Some(types), 5).await.unwrap();
        assert_eq!(
            page.iter().map(|e| e.id).collect::<Vec<_>>(),
            want[11..16].to_vec()
        );
        assert!(
            s.read_all(Position::ORIGIN, Some(&["Nothing"]), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            s.read_all(Position::ORIGIN, Some(&[]), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            s.read_all(Position(u64::MAX), None, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            s.read_all(Position::ORIGIN, None, 0)
                .await
                .unwrap()
                .is_empty()
        );
        let unbounded = s.read_all(Position::ORIGIN, Some(types), usize::MAX).await;
        assert_eq!(unbounded.unwrap().len(), 40, "an unbounded limit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reads_in_both_directions() {
    let (_server, s) = fresh(Some("t1")).await;
    s.append("s-1", ExpectedVersion::NoStream, deposits(1, 10))
        .await
        .unwrap();
    let versions = |v: Vec<StoredEvent>| v.into_iter().map(|e| e.version).collect::<Vec<_>>();
    let read = |from, direction, limit| {
        let s = s.clone();
        async move { versions(s.read_stream("s-1", from, direction, limit).await.unwrap()) }
    };
    assert_eq!(
        read(1, Direction::Forward, 100).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(read(4, Direction::Forward, 3).await, vec![4, 5, 6]);
    assert_eq!(read(0, Direction::Forward, 2).await, vec![1, 2]);
    assert!(read(11, Direction::Forward, 2).await.is_empty());
    assert_eq!(read(u64::MAX, Direction::Backward, 3).await, vec![10, 9, 8]);
    assert_eq!(read(4, Direction::Backward, 10).await, vec![4, 3, 2, 1]);
    assert!(read(0, Direction::Backward, 10).await.is_empty());
    // Beyond the end, backwards: from the last event.
    assert_eq!(read(12, Direction::Backward, 3).await, vec![10, 9, 8]);
    assert_eq!(read(50, Direction::Backward, 3).await, vec![10, 9, 8]);
    assert!(
        s.read_stream("missing", u64::MAX, Direction::Backward, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.read_stream("missing", 5, Direction::Backward, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let back: Vec<StoredEvent> = read_stream_all(&s, "s-1", u64::MAX, Direction::Backward, 4)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(versions(back), (1..=10).rev().collect::<Vec<_>>());
    let e = &s
        .read_stream("s-1", 2, Direction::Forward, 1)
        .await
        .unwrap()[0];
    assert_eq!(
        (e.stream.as_str(), e.event_type.as_str()),
        ("s-1", "Deposited")
    );
    assert_eq!(e.payload, br#"{"amount":2}"#.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_and_metadata_survive_byte_for_byte() {
    let (server, s) = fresh(Some("t1")).await;
    let correlation = Uuid::now_v7();
    let mut event = raw("Noted", "{\"b\":1, \"a\":[1.50,2e3]}");
    event.metadata.correlation_id = correlation;
    event.metadata.extra.insert("user".into(), "ann".into());
    event.metadata.extra.insert("$odd".into(), "kept".into());
    let binary = raw("Blob", "not json \u{1}");
    s.append(
        "m-1",
        ExpectedVersion::NoStream,
        vec![event.clone(), binary.clone()],
    )
    .await
    .unwrap();
    let back = s
        .read_stream("m-1", 1, Direction::Forward, 10)
        .await
        .unwrap();
    assert_eq!(back[0].payload, event.payload);
    assert_eq!(back[0].metadata, event.metadata);
    assert_eq!(back[1].payload, binary.payload);
    let stored = server.stream("t1.m-1");
    let meta: serde_json::Value = serde_json::from_slice(&stored[0].metadata).unwrap();
    assert_eq!(meta["$correlationId"], correlation.to_string());
    assert_eq!(meta["$causationId"], event.id.to_string());
    assert_eq!(meta["$$odd"], "kept");
    assert_eq!(stored[0].event_type, "t1.Noted", "namespaced type");
    assert_eq!(stored[0].id, event.id, "our id is the server's event id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_head_and_watch() {
    let (server, s) = fresh(Some("t1")).await;
    assert_eq!(s.head().await.unwrap(), Position::ORIGIN);
    let mut watch = s.watch_head();
    let batch = deposits(0, 2);
    let wanted = batch[1].id;
    let r = s
        .append("w-1", ExpectedVersion::NoStream, batch)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*watch.borrow_and_update(), r.last_position.unwrap());
    assert_eq!(s.head().await.unwrap(), r.last_position.unwrap());
    let found = s.find_event(wanted).await.unwrap().unwrap();
    assert_eq!(
        (found.stream.as_str(), found.version, found.position),
        ("w-1", 2, r.last_position.unwrap())
    );
    assert!(s.find_event(Uuid::now_v7()).await.unwrap().is_none());

    // Another process's append moves the watch through the subscription.
    let other = open(&server, KurrentOptions::default().namespace("t1")).await;
    let done = other
        .append("w-2", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        watch.wait_for(|p| *p >= done.last_position.unwrap()),
    )
    .await
    .expect("the subscription moved the head")
    .unwrap();
    // Another namespace does not.
    let stranger = open(&server, KurrentOptions::default().namespace("t2")).await;
    stranger
        .append("w-3", ExpectedVersion::NoStream, deposits(0, 1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*watch.borrow_and_update(), done.last_position.unwrap());

    // A dropped subscription resubscribes from the head this store knows.
    let before = server.subscription_starts().len();
    server.drop_subscriptions();
    let mut resubscribed = false;
    for _ in 0..100 {
        if server.subscription_starts().len() >= before + 3 {
            resubscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(resubscribed, "every store resubscribed");
    let head = done.last_position.unwrap();
    assert!(
        server
            .subscription_starts()
            .contains(&StreamPosition::Position(mapping::client_position(head))),
        "from our last head {head}"
    );
    let later = other
        .append("w-2", ExpectedVersion::Exact(1), deposits(1, 1))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        watch.wait_for(|p| *p >= later.last_position.unwrap()),
    )
    .await
    .expect("the new subscription moves the head")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_never_go_back_and_keep_one() {
    let (server, s) = fresh(Some("t1")).await;
    assert!(s.load_snapshot("snap-1").await.unwrap().is_none());
    let snap = |v: u64| Snapshot {
        stream: "snap-1".into(),
        version: v,
        state: format!("{{\"v\":{v}}}").into_bytes(),
        taken_at: chrono::Utc::now(),
    };
    s.save_snapshot(snap(10)).await.unwrap();
    s.save_snapshot(snap(20)).await.unwrap();
    s.save_snapshot(snap(15)).await.unwrap();
    let loaded = s.load_snapshot("snap-1").await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.state), (20, b"{\"v\":20}".to_vec()));
    let same = snap(20);
    s.save_snapshot(same.clone()).await.unwrap();
    assert_eq!(
        s.load_snapshot("snap-1").await.unwrap().unwrap(),
        same,
        "equal replaces"
    );
    assert!(
        server
            .stream_names()
            .contains(&"$$t1.aftermath-snapshot-snap-1".to_owned()),
        "$maxCount set on the snapshot stream"
    );
    assert!(all_events(&s).await.is_empty(), "snapshots are not events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upcasters_apply_on_every_read_path() {
    let server = Arc::new(FakeServer::new());
    let upcasters = Upcasters::new()
        .register("Deposited", |mut v| {
            if let Some(cents) = v.get("cents").and_then(|c| c.as_str()).map(str::to_owned) {
                let amount: u64 = cents.parse().map_err(|e| format!("cents `{cents}`: {e}"))?;
                v = serde_json::json!({ "amount": amount });
            }
            Ok(v)
        })
        .register_renamed("Credited", "Deposited", Ok);
    let s = open(
        &server,
        KurrentOptions::default()
            .namespace("up")
            .upcasters(upcasters),
    )
    .await;
    s.append(
        "account-up",
        ExpectedVersion::NoStream,
        vec![
            raw("Opened", r#"{"owner":"ann"}"#),
            raw("Deposited", r#"{"cents":"5"}"#),
            raw("Credited", r#"{"cents":"7"}"#),
        ],
    )
    .await
    .unwrap();
    let filtered = s
        .read_all(Position::ORIGIN, Some(&["Deposited"]), 10)
        .await
        .unwrap();
    assert_eq!(filtered.len(), 2, "old names are asked from the server too");
    assert!(filtered.iter().all(|e| e.event_type == "Deposited"));
    assert_eq!(filtered[1].payload, br#"{"amount":7}"#.to_vec());
    let id = filtered[0].id;
    assert_eq!(
        s.find_event(id).await.unwrap().unwrap().payload,
        br#"{"amount":5}"#.to_vec()
    );
    let stream = s
        .read_stream("account-up", 1, Direction::Forward, 10)
        .await
        .unwrap();
    assert_eq!(stream[2].event_type, "Deposited");
}

/// Events the store did not write: without metadata they start their own
/// conversation; a legacy transaction's position is a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_writers_events() {
    let (server, s) = fresh(None).await;
    let id = Uuid::now_v7();
    server.inject(
        "foreign-1",
        vec![Proposed {
            id,
            event_type: "Imported".into(),
            data: b"{}".to_vec(),
            metadata: Vec::new(),
        }],
    );
    let all = all_events(&s).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].metadata, Metadata::caused_by(id));
    assert_eq!(s.head().await.unwrap(), all[0].position);
    server.inject_legacy(
        "legacy-1",
        Proposed {
            id: Uuid::now_v7(),
            event_type: "Old".into(),
            data: b"{}".to_vec(),
            metadata: Vec::new(),
        },
        1_000_000,
        999_000,
    );
    match s.read_all(all[0].position, None, 10).await {
        Err(StoreError::Corrupt {
            stream, message, ..
        }) => {
            assert_eq!(stream, "legacy-1");
            assert!(message.contains("prepare position 999000"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    server.inject(
        "bad-meta-1",
        vec![Proposed {
            id: Uuid::now_v7(),
            event_type: "Imported".into(),
            data: b"{}".to_vec(),
            metadata: b"[]".to_vec(),
        }],
    );
    match s.read_stream("bad-meta-1", 1, Direction::Forward, 1).await {
        Err(StoreError::Corrupt { message, .. }) => assert!(message.contains("metadata")),
        other => panic!("{other:?}"),
    }
}

/// The repository on this store: command ids make a resent command a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_command_ids() {
    use crate::aggregate::{Aggregate, CommandMeta, Repository};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum CounterEvent {
        Added { n: u64 },
    }
    impl crate::event::Event for CounterEvent {
        const EVENT_TYPES: &'static [&'static str] = &["Added"];
        fn event_type(&self) -> &'static str {
            "Added"
        }
        fn encode(&self) -> Result<Vec<u8>, crate::event::EncodeError> {
            let CounterEvent::Added { n } = self;
            Ok(format!(r#"{{"n":{n}}}"#).into_bytes())
        }
        fn decode(
            event_type: &str,
            payload: &[u8],
        ) -> Result<Option<Self>, crate::event::PayloadError> {
            if event_type != "Added" {
                return Ok(None);
            }
            #[derive(Deserialize)]
            struct Added {
                n: u64,
            }
            serde_json::from_slice::<Added>(payload)
                .map(|a| Some(CounterEvent::Added { n: a.n }))
                .map_err(|e| crate::event::PayloadError {
                    event_type: event_type.to_owned(),
                    message: e.to_string(),
                })
        }
    }
    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct Counter {
        total: u64,
    }
    impl Aggregate for Counter {
        const CATEGORY: &'static str = "counter";
        type Command = u64;
        type Event = CounterEvent;
        type Error = std::convert::Infallible;
        fn apply(&mut self, event: &CounterEvent) {
            let CounterEvent::Added { n } = event;
            self.total += n;
        }
        fn decide(&self, n: u64) -> Result<Vec<CounterEvent>, Self::Error> {
            Ok(vec![CounterEvent::Added { n }])
        }
    }

    let (_server, s) = fresh(Some("t1")).await;
    let repo = Repository::<Counter, _>::new(s.clone()).with_snapshots(2);
    let meta = CommandMeta::with_id(Uuid::now_v7());
    let first = repo.execute_with("c", 5, meta.clone()).await.unwrap();
    repo.execute("c", 1).await.unwrap();
    let again = repo.execute_with("c", 5, meta.clone()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.version, first.version);
    assert_eq!(repo.load("c").await.unwrap().state.total, 6);
    match repo.execute_with("d", 5, meta).await {
        Err(crate::aggregate::ExecuteError::Store(StoreError::DuplicateEventId {
            existing_stream,
            ..
        })) => assert_eq!(existing_stream, "counter-c"),
        other => panic!("{other:?}"),
    }
}

/// The same batch appended concurrently at the same place lands once; every
/// other caller gets the first result as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_appends_land_once() {
    let (_server, s) = fresh(Some("t1")).await;
    for round in 0..20u64 {
        let batch = deposits(round, 2);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let s = s.clone();
            let batch = batch.clone();
            tasks.push(tokio::spawn(async move {
                s.append("same-1", ExpectedVersion::Exact(round * 2), batch)
                    .await
            }));
        }
        let mut first = Vec::new();
        for task in tasks {
            let r = task.await.unwrap().unwrap();
            assert_eq!(
                (r.first_version, r.last_version),
                (round * 2 + 1, round * 2 + 2)
            );
            if !r.duplicate {
                first.push(r);
            }
        }
        assert_eq!(first.len(), 1, "round {round}: landed once");
    }
    assert_eq!(s.stream_version("same-1").await.unwrap(), 40);
    assert_eq!(all_events(&s).await.len(), 40);
}
