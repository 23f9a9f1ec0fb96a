//! The conformance suite: every contract of `EventStore` (and of the
//! `Repository` on top of it), written once, generic over the backend.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aftermath::store::{read_all_pages, read_stream_all};
use aftermath::{
    AppendResult, CommandMeta, Direction, EventStore, ExecuteError, ExpectedVersion, Position,
    Repository, Snapshot, StoreError, StoredEvent, Upcasters,
};
use futures::TryStreamExt;
use uuid::Uuid;

use crate::domain::{Account, AccountCommand, AccountError, AccountEvent};
use crate::{Backend, deposits, open_or_skip, raw};

macro_rules! fresh {
    ($b:ty, $name:literal) => {
        fresh!($b, $name, Upcasters::new())
    };
    ($b:ty, $name:literal, $up:expr) => {
        match open_or_skip::<$b>($name, $up).await {
            Some(fresh) => fresh,
            None => return,
        }
    };
}

async fn all_events<S: EventStore>(store: &S) -> Vec<StoredEvent> {
    read_all_pages(store, Position::ORIGIN, None, 1000)
        .try_collect()
        .await
        .expect("read $all")
}

fn assert_wrong_version(result: Result<AppendResult, StoreError>, stream: &str, want_actual: u64) {
    match result {
        Err(StoreError::WrongExpectedVersion {
            stream: s, actual, ..
        }) => {
            assert_eq!(s, stream);
            assert_eq!(actual, want_actual, "actual version reported");
        }
        other => panic!("expected WrongExpectedVersion on {stream}, got {other:?}"),
    }
}

/// Every expected-version case, accepted and refused.
pub async fn expected_version_cases<B: Backend>() {
    let f = fresh!(B, "expected_version_cases");
    let s = &f.store;
    use ExpectedVersion::*;
    assert_wrong_version(
        s.append("a-1", StreamExists, deposits(0, 1)).await,
        "a-1",
        0,
    );
    assert_wrong_version(s.append("a-1", Exact(1), deposits(0, 1)).await, "a-1", 0);
    let r = s.append("a-1", NoStream, deposits(0, 2)).await.unwrap();
    assert_eq!(
        (r.first_version, r.last_version, r.duplicate),
        (1, 2, false)
    );
    assert_eq!(
        r.last_position.unwrap().value() - r.first_position.unwrap().value(),
        1
    );
    assert_wrong_version(s.append("a-1", NoStream, deposits(0, 1)).await, "a-1", 2);
    assert_wrong_version(s.append("a-1", Exact(1), deposits(0, 1)).await, "a-1", 2);
    assert_wrong_version(s.append("a-1", Exact(3), deposits(0, 1)).await, "a-1", 2);
    assert_wrong_version(s.append("a-1", Exact(0), deposits(0, 1)).await, "a-1", 2);
    let r = s.append("a-1", Exact(2), deposits(0, 1)).await.unwrap();
    assert_eq!((r.first_version, r.last_version), (3, 3));
    let r = s.append("a-1", StreamExists, deposits(0, 1)).await.unwrap();
    assert_eq!(r.last_version, 4);
    let r = s.append("a-1", Any, deposits(0, 3)).await.unwrap();
    assert_eq!((r.first_version, r.last_version), (5, 7));
    let r = s.append("b-1", Exact(0), deposits(0, 1)).await.unwrap();
    assert_eq!(r.last_version, 1);
    let r = s.append("c-1", Any, deposits(0, 1)).await.unwrap();
    assert_eq!(r.last_version, 1);
    assert_eq!(s.stream_version("a-1").await.unwrap(), 7);
    assert_eq!(s.stream_version("nope").await.unwrap(), 0);
    assert_eq!(
        all_events(s).await.len(),
        9,
        "refused appends wrote nothing"
    );
}

/// An empty batch checks the version and writes nothing.
pub async fn empty_batch_checks_version<B: Backend>() {
    let f = fresh!(B, "empty_batch_checks_version");
    let s = &f.store;
    let r = s
        .append("e-1", ExpectedVersion::NoStream, vec![])
        .await
        .unwrap();
    assert_eq!((r.last_version, r.first_position), (0, None));
    s.append("e-1", ExpectedVersion::NoStream, deposits(0, 2))
        .await
        .unwrap();
    assert_wrong_version(
        s.append("e-1", ExpectedVersion::Exact(1), vec![]).await,
        "e-1",
        2,
    );
    let r = s
        .append("e-1", ExpectedVersion::Exact(2), vec![])
        .await
        .unwrap();
    assert_eq!(
        (r.first_version, r.last_version, r.last_position),
        (3, 2, None)
    );
    assert_eq!(all_events(s).await.len(), 2);
}

/// A batch with the same id twice is refused whole.
pub async fn atomic_batch_on_duplicate_in_batch<B: Backend>() {
    let f = fresh!(B, "atomic_batch_on_duplicate_in_batch");
    let s = &f.store;
    let mut batch = deposits(0, 3);
    batch[2].id = batch[0].id;
    let dup = batch[0].id;
    match s.append("d-1", ExpectedVersion::Any, batch).await {
        Err(StoreError::DuplicateEventId { id, .. }) => assert_eq!(id, dup),
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
    assert_eq!(s.stream_version("d-1").await.unwrap(), 0);
    assert!(
        all_events(s).await.is_empty(),
        "nothing of the batch was written"
    );
}

/// A batch whose last event reuses a stored id is refused whole.
pub async fn atomic_batch_on_id_stored_elsewhere<B: Backend>() {
    let f = fresh!(B, "atomic_batch_on_id_stored_elsewhere");
    let s = &f.store;
    let first = deposits(0, 1);
    let taken = first[0].id;
    s.append("x-1", ExpectedVersion::NoStream, first)
        .await
        .unwrap();
    let mut batch = deposits(1, 4);
    batch[3].id = taken;
    match s.append("y-1", ExpectedVersion::NoStream, batch).await {
        Err(StoreError::DuplicateEventId {
            id,
            existing_stream,
            existing_version,
            stream,
        }) => {
            assert_eq!((id, stream.as_str()), (taken, "y-1"));
            assert_eq!((existing_stream.as_str(), existing_version), ("x-1", 1));
        }
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
    assert_eq!(s.stream_version("y-1").await.unwrap(), 0);
    assert_eq!(all_events(s).await.len(), 1);
}

/// The same ids appended again at the same place return the first result.
pub async fn idempotent_retry_returns_first_result<B: Backend>() {
    let f = fresh!(B, "idempotent_retry_returns_first_result");
    let s = &f.store;
    s.append("other-1", ExpectedVersion::Any, deposits(0, 2))
        .await
        .unwrap();
    let batch = deposits(10, 3);
    let first = s
        .append("r-1", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert!(!first.duplicate);
    s.append("other-1", ExpectedVersion::Any, deposits(0, 2))
        .await
        .unwrap();
    let head = s.head().await.unwrap();
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Any,
        ExpectedVersion::StreamExists,
    ] {
        let again = s.append("r-1", expected, batch.clone()).await.unwrap();
        assert!(again.duplicate, "retry with {expected} is a duplicate");
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
            "retry with {expected} returns the first result"
        );
    }
    assert_eq!(s.head().await.unwrap(), head, "retries wrote nothing");
    assert_eq!(s.stream_version("r-1").await.unwrap(), 3);
    // The stream moved on: the same batch is still recognised at its place.
    s.append("r-1", ExpectedVersion::Exact(3), deposits(0, 1))
        .await
        .unwrap();
    let again = s
        .append("r-1", ExpectedVersion::Exact(0), batch.clone())
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.last_version, 3);
}

/// Any other reuse of an event id is a typed error.
pub async fn id_reuse_elsewhere_is_an_error<B: Backend>() {
    let f = fresh!(B, "id_reuse_elsewhere_is_an_error");
    let s = &f.store;
    let batch = deposits(0, 2);
    s.append("u-1", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let cases: Vec<(&str, ExpectedVersion, Vec<aftermath::EventData>)> = vec![
        // Same ids, another stream.
        ("u-2", ExpectedVersion::Any, batch.clone()),
        // Same ids, same stream, another place.
        ("u-1", ExpectedVersion::Exact(2), batch.clone()),
        // Partial overlap.
        (
            "u-1",
            ExpectedVersion::Any,
            vec![batch[0].clone(), deposits(5, 1).remove(0)],
        ),
        // Reordered.
        (
            "u-1",
            ExpectedVersion::Any,
            vec![batch[1].clone(), batch[0].clone()],
        ),
    ];
    for (stream, expected, events) in cases {
        match s.append(stream, expected, events).await {
            Err(StoreError::DuplicateEventId {
                existing_stream, ..
            }) => {
                assert_eq!(existing_stream, "u-1")
            }
            other => panic!("expected DuplicateEventId on {stream} {expected}, got {other:?}"),
        }
    }
    assert_eq!(all_events(s).await.len(), 2);
}

/// Empty and reserved stream names are refused.
pub async fn invalid_stream_names<B: Backend>() {
    let f = fresh!(B, "invalid_stream_names");
    for name in ["", "$all", "$system"] {
        match f
            .store
            .append(name, ExpectedVersion::Any, deposits(0, 1))
            .await
        {
            Err(StoreError::InvalidStream { stream, .. }) => assert_eq!(stream, name),
            other => panic!("expected InvalidStream for {name:?}, got {other:?}"),
        }
    }
}

/// 8 concurrent writers and a tailing reader: `$all` is total and gap-free,
/// every committed event appears exactly once, versions have no holes, and
/// the reader never sees a position go back or an event appear behind it.
pub async fn all_order_under_concurrent_writers<B: Backend>() {
    let f = fresh!(B, "all_order_under_concurrent_writers");
    let store = f.store.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let reader = {
        let store = store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen: Vec<StoredEvent> = Vec::new();
            let mut after = Position::ORIGIN;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let page = store.read_all(after, None, 97).await.expect("tail $all");
                for e in &page {
                    assert!(
                        e.position > after,
                        "position went back: {} after {}",
                        e.position,
                        after
                    );
                    after = e.position;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    return seen;
                }
                if empty {
                    tokio::task::yield_now().await;
                }
            }
        })
    };

    let mut writers = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for i in 0..150u64 {
                // Half the writes race on 4 shared streams, half go to the
                // writer's own stream with an exact version.
                let (stream, expected) = if i % 2 == 0 {
                    (format!("shared-{}", i % 4), ExpectedVersion::Any)
                } else {
                    let own = format!("own-{w}");
                    let v = store.stream_version(&own).await.unwrap();
                    (own, ExpectedVersion::Exact(v))
                };
                let batch = deposits(w * 1000 + i, 1 + (i % 3));
                let ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
                match store.append(&stream, expected, batch).await {
                    Ok(_) => committed.extend(ids),
                    Err(e) => panic!("writer {w} append {i} failed: {e}"),
                }
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

    assert_eq!(all.len(), committed.len(), "every committed event once");
    let ids: HashSet<Uuid> = all.iter().map(|e| e.id).collect();
    assert_eq!(ids, committed);
    for pair in all.windows(2) {
        assert!(
            pair[0].position < pair[1].position,
            "positions strictly increase"
        );
    }
    let tail_ids: Vec<Uuid> = tailed.iter().map(|e| e.id).collect();
    let all_ids: Vec<Uuid> = all.iter().map(|e| e.id).collect();
    assert_eq!(
        tail_ids, all_ids,
        "the tailing reader saw exactly the final order"
    );
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in &all {
        versions.entry(&e.stream).or_default().push(e.version);
    }
    for (stream, vs) in versions {
        let want: Vec<u64> = (1..=vs.len() as u64).collect();
        assert_eq!(
            vs, want,
            "versions of {stream} have no holes and follow $all order"
        );
    }
}

/// A type filter returns only those types, in order, across pages.
pub async fn filtered_reads<B: Backend>() {
    let f = fresh!(B, "filtered_reads");
    let s = &f.store;
    for i in 0..60u64 {
        let t = ["account.Opened", "account.Deposited", "account.Withdrawn"][(i % 3) as usize];
        s.append(
            &format!("f-{}", i % 5),
            ExpectedVersion::Any,
            vec![raw(t, "{}")],
        )
        .await
        .unwrap();
    }
    let types: &[&str] = &["account.Withdrawn", "account.Opened"];
    let got: Vec<StoredEvent> = read_all_pages(s, Position::ORIGIN, Some(types), 7)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(got.len(), 40);
    assert!(got.iter().all(|e| e.event_type != "account.Deposited"));
    assert!(got.windows(2).all(|p| p[0].position < p[1].position));
    let all = all_events(s).await;
    let want: Vec<Uuid> = all
        .iter()
        .filter(|e| types.contains(&e.event_type.as_str()))
        .map(|e| e.id)
        .collect();
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), want);
    // From the middle, with a limit.
    let mid = got[10].position;
    let page = s.read_all(mid, Some(types), 5).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.id).collect::<Vec<_>>(),
        want[11..16].to_vec()
    );
    let none = s
        .read_all(Position::ORIGIN, Some(&["Nothing"]), 10)
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// Metadata comes back as written, on every read path: ids, the typed
/// trace context (with and without a `tracestate`), the application's keys
/// (escaped characters too); a context given as `extra` keys reads back
/// typed, and `extra` trace keys that are not a stored context's exact form
/// (malformed, a later version, a lone or padded `tracestate`) stay in
/// `extra` untouched.
pub async fn metadata_and_trace_context_round_trip<B: Backend>() {
    use aftermath::trace::{TRACEPARENT, TRACESTATE, TraceContext};
    let f = fresh!(B, "metadata_and_trace_context_round_trip");
    let s = &f.store;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ctx = TraceContext::parse(parent, None).unwrap();
    let with = |trace: Option<TraceContext>, extra: &[(&str, &str)]| {
        let mut e = raw("account.Deposited", r#"{"amount":1}"#);
        e.metadata.correlation_id = Uuid::new_v4();
        e.metadata.trace = trace;
        e.metadata.extra = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        e
    };
    let written = vec![
        with(None, &[]),
        with(Some(ctx.clone()), &[]),
        with(
            Some(ctx.clone().with_tracestate("vendor=a,other=b")),
            &[("user", "Zoë \"Z\" 100%"), ("tenant", "t-1")],
        ),
        with(None, &[("user", "ann")]),
    ];
    // (extra as written, what reads back: trace, extra)
    type Pairs<'a> = Vec<(&'a str, &'a str)>;
    let odd: Vec<(Pairs, Option<TraceContext>, Pairs)> = vec![
        (
            vec![(TRACEPARENT, parent), (TRACESTATE, "v=1"), ("k", "v")],
            Some(ctx.clone().with_tracestate("v=1")),
            vec![("k", "v")],
        ),
        (
            vec![(TRACEPARENT, "garbage")],
            None,
            vec![(TRACEPARENT, "garbage")],
        ),
        (
            vec![(
                TRACEPARENT,
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
            None,
            vec![(
                TRACEPARENT,
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
        ),
        (
            vec![(
                TRACEPARENT,
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            )],
            None,
            vec![(
                TRACEPARENT,
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            )],
        ),
        (
            vec![(TRACEPARENT, parent), (TRACESTATE, " v=1")],
            None,
            vec![(TRACEPARENT, parent), (TRACESTATE, " v=1")],
        ),
        (vec![(TRACESTATE, "v=1")], None, vec![(TRACESTATE, "v=1")]),
    ];
    let mut batch = written.clone();
    batch.extend(odd.iter().map(|(extra, _, _)| with(None, extra)));
    s.append("meta-1", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let expected = |i: usize| {
        let mut meta = batch[i].metadata.clone();
        if let Some((_, trace, extra)) = i.checked_sub(written.len()).map(|j| &odd[j]) {
            meta.trace = trace.clone();
            meta.extra = extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>();
        }
        meta
    };
    let by_stream: Vec<StoredEvent> = read_stream_all(s, "meta-1", 1, Direction::Forward, 3)
        .try_collect()
        .await
        .unwrap();
    let by_all = all_events(s).await;
    let by_type = s
        .read_all(Position::ORIGIN, Some(&["account.Deposited"]), 100)
        .await
        .unwrap();
    for read in [&by_stream, &by_all, &by_type] {
        assert_eq!(read.len(), batch.len());
        for (i, e) in read.iter().enumerate() {
            assert_eq!(e.metadata, expected(i), "event {i}");
        }
    }
}

/// Type filters of every size (a PostgreSQL read merges one ordered range
/// per type, in statements of up to 4 and up to 16 types, and another way
/// beyond), with types that never occur, over `$all` and over partitions:
/// exactly the wanted events, in order, across pages.
pub async fn filtered_reads_of_many_types<B: Backend>() {
    let f = fresh!(B, "filtered_reads_of_many_types");
    let s = &f.store;
    let names: Vec<String> = (0..20).map(|i| format!("many.T{i:02}")).collect();
    for i in 0..200usize {
        // Uneven: type 0 is a third of the log, the others share the rest.
        let t = if i % 3 == 0 { 0 } else { (i * 7) % 20 };
        s.append(
            &format!("many-{}", i % 9),
            ExpectedVersion::Any,
            vec![raw(&names[t], "{}")],
        )
        .await
        .unwrap();
    }
    let all = all_events(s).await;
    for size in [1usize, 3, 4, 5, 15, 16, 17, 20, 22] {
        // Every other listed type, then types nobody wrote.
        let mut wanted: Vec<String> = names.iter().step_by(2).cloned().collect();
        wanted.extend(names.iter().skip(1).step_by(2).cloned());
        wanted.extend(["many.Never1".to_owned(), "many.Never2".to_owned()]);
        wanted.truncate(size);
        let types: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let want: Vec<Uuid> = all
            .iter()
            .filter(|e| types.contains(&e.event_type.as_str()))
            .map(|e| e.id)
            .collect();
        let got: Vec<Uuid> = read_all_pages(s, Position::ORIGIN, Some(&types), 7)
            .map_ok(|e| e.id)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got, want, "{size} types over $all");
        for index in 0..3 {
            let partition = aftermath::subscription::Partition::new(index, 3);
            let want: Vec<Uuid> = all
                .iter()
                .filter(|e| types.contains(&e.event_type.as_str()) && partition.contains(&e.stream))
                .map(|e| e.id)
                .collect();
            let mut got = Vec::new();
            let mut after = Position::ORIGIN;
            loop {
                let page = s
                    .read_all_partition(after, Some(&types), partition, 6)
                    .await
                    .unwrap();
                let short = page.len() < 6;
                if let Some(last) = page.last() {
                    after = last.position;
                }
                got.extend(page.into_iter().map(|e| e.id));
                if short {
                    break;
                }
            }
            assert_eq!(got, want, "{size} types over partition {index} of 3");
        }
    }
}

/// Forward and backward reads from any version, with limits.
pub async fn stream_reads_both_directions<B: Backend>() {
    let f = fresh!(B, "stream_reads_both_directions");
    let s = &f.store;
    s.append("s-1", ExpectedVersion::NoStream, deposits(1, 10))
        .await
        .unwrap();
    s.append("s-2", ExpectedVersion::NoStream, deposits(1, 3))
        .await
        .unwrap();
    let versions = |v: Vec<StoredEvent>| v.into_iter().map(|e| e.version).collect::<Vec<_>>();
    assert_eq!(
        versions(
            s.read_stream("s-1", 1, Direction::Forward, 100)
                .await
                .unwrap()
        ),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        versions(
            s.read_stream("s-1", 4, Direction::Forward, 3)
                .await
                .unwrap()
        ),
        vec![4, 5, 6]
    );
    assert_eq!(
        versions(
            s.read_stream("s-1", 0, Direction::Forward, 2)
                .await
                .unwrap()
        ),
        vec![1, 2]
    );
    assert_eq!(
        versions(
            s.read_stream("s-1", 11, Direction::Forward, 2)
                .await
                .unwrap()
        ),
        Vec::<u64>::new()
    );
    assert_eq!(
        versions(
            s.read_stream("s-1", u64::MAX, Direction::Backward, 3)
                .await
                .unwrap()
        ),
        vec![10, 9, 8]
    );
    assert_eq!(
        versions(
            s.read_stream("s-1", 4, Direction::Backward, 10)
                .await
                .unwrap()
        ),
        vec![4, 3, 2, 1]
    );
    assert_eq!(
        versions(
            s.read_stream("s-1", 0, Direction::Backward, 10)
                .await
                .unwrap()
        ),
        Vec::<u64>::new()
    );
    assert!(
        s.read_stream("missing", 1, Direction::Forward, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.read_stream("missing", u64::MAX, Direction::Backward, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let back: Vec<StoredEvent> = read_stream_all(s, "s-1", u64::MAX, Direction::Backward, 4)
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
        ("s-1", "account.Deposited")
    );
    assert_eq!(e.payload, br#"{"amount":2}"#.to_vec());
}

/// A 100k-event stream reads completely, in order, page by page.
pub async fn large_stream_paged<B: Backend>() {
    let f = fresh!(B, "large_stream_paged");
    let s = &f.store;
    const N: u64 = 100_000;
    for chunk in 0..N / 1000 {
        s.append(
            "big-1",
            ExpectedVersion::Exact(chunk * 1000),
            deposits(chunk * 1000, 1000),
        )
        .await
        .unwrap();
    }
    let mut next = 1;
    let mut events = std::pin::pin!(read_stream_all(s, "big-1", 1, Direction::Forward, 1000));
    while let Some(e) = events.try_next().await.unwrap() {
        assert_eq!(e.version, next);
        next += 1;
    }
    assert_eq!(next - 1, N);
    let mut count = 0u64;
    let mut all = std::pin::pin!(read_all_pages(
        s,
        Position::ORIGIN,
        Some(&["account.Deposited"]),
        1000
    ));
    while all.try_next().await.unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, N);
}

/// `find_event`, `head`, `stream_version`, and the head watch.
pub async fn find_head_version_and_watch<B: Backend>() {
    let f = fresh!(B, "find_head_version_and_watch");
    let s = &f.store;
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
        .expect("watch fires on append")
        .unwrap();
    assert_eq!(*watch.borrow_and_update(), r.last_position.unwrap());
    assert_eq!(s.head().await.unwrap(), r.last_position.unwrap());
    let found = s
        .find_event(wanted)
        .await
        .unwrap()
        .expect("event found by id");
    assert_eq!(
        (found.stream.as_str(), found.version, found.position),
        ("w-1", 2, r.last_position.unwrap())
    );
    assert!(s.find_event(Uuid::now_v7()).await.unwrap().is_none());
    assert_eq!(s.stream_version("w-1").await.unwrap(), 2);
}

/// Snapshots round-trip and an older one never replaces a newer one.
pub async fn snapshots_never_go_back<B: Backend>() {
    let f = fresh!(B, "snapshots_never_go_back");
    let s = &f.store;
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
}

/// A stored payload that no longer fits is a typed error naming the event.
pub async fn undecodable_payload_is_typed_error<B: Backend>() {
    let f = fresh!(B, "undecodable_payload_is_typed_error");
    let s = &f.store;
    s.append(
        "account-bad",
        ExpectedVersion::NoStream,
        vec![raw("account.Opened", r#"{"owner":"ann"}"#)],
    )
    .await
    .unwrap();
    s.append(
        "account-bad",
        ExpectedVersion::Exact(1),
        vec![raw("account.Deposited", r#"{"amount":"ten"}"#)],
    )
    .await
    .unwrap();
    let events = s
        .read_stream("account-bad", 1, Direction::Forward, 10)
        .await
        .unwrap();
    assert!(events[0].decode::<AccountEvent>().unwrap().is_some());
    let err = events[1].decode::<AccountEvent>().unwrap_err();
    assert_eq!(
        (err.stream.as_str(), err.version, err.event_type.as_str()),
        ("account-bad", 2, "account.Deposited")
    );
    assert_eq!(err.position, events[1].position);
    assert!(
        err.message.contains("invalid type"),
        "serde's message kept: {}",
        err.message
    );
    // The repository surfaces it too, naming the event.
    let repo = Repository::<Account, _>::new(s.clone());
    match repo.load("bad").await {
        Err(StoreError::Decode(e)) => assert_eq!(e.version, 2),
        other => panic!("expected a decode error, got {other:?}"),
    }
    // An unknown type for an aggregate is an error, never a silent skip.
    s.append(
        "account-bad2",
        ExpectedVersion::NoStream,
        vec![raw("Exploded", "{}")],
    )
    .await
    .unwrap();
    match repo.load("bad2").await {
        Err(StoreError::Decode(e)) => assert_eq!(e.event_type, "Exploded"),
        other => panic!("expected a decode error for an unknown type, got {other:?}"),
    }
}

/// Upcasters change old payloads (and names) on stream reads, `$all` reads
/// and filtered `$all` reads alike.
pub async fn upcasters_apply_on_every_read_path<B: Backend>() {
    let upcasters = Upcasters::new()
        // v1 deposits stored cents as a string.
        .register("account.Deposited", |mut v| {
            if let Some(cents) = v.get("cents").and_then(|c| c.as_str()).map(str::to_owned) {
                let amount: u64 = cents.parse().map_err(|e| format!("cents `{cents}`: {e}"))?;
                v = serde_json::json!({ "amount": amount });
            }
            Ok(v)
        })
        // "account.Credited" was the old name of "account.Deposited", with the same old shape.
        .register_renamed("account.Credited", "account.Deposited", Ok);
    let f = fresh!(B, "upcasters_apply_on_every_read_path", upcasters);
    let s = &f.store;
    s.append(
        "account-up",
        ExpectedVersion::NoStream,
        vec![
            raw("account.Opened", r#"{"owner":"ann"}"#),
            raw("account.Deposited", r#"{"cents":"5"}"#),
            raw("account.Credited", r#"{"cents":"7"}"#),
            raw("account.Deposited", r#"{"amount":11}"#),
        ],
    )
    .await
    .unwrap();
    let repo = Repository::<Account, _>::new(s.clone());
    assert_eq!(
        repo.load("up").await.unwrap().state.balance,
        23,
        "aggregate load upcasts"
    );
    let deposits: Vec<AccountEvent> =
        read_all_pages(s, Position::ORIGIN, Some(&["account.Deposited"]), 2)
            .map_ok(|e| e.decode_known::<AccountEvent>().unwrap().event)
            .try_collect()
            .await
            .unwrap();
    assert_eq!(
        deposits,
        vec![
            AccountEvent::Deposited { amount: 5 },
            AccountEvent::Deposited { amount: 7 },
            AccountEvent::Deposited { amount: 11 }
        ],
        "filtered $all read finds renamed types and upcasts"
    );
    let all = all_events(s).await;
    assert_eq!(all[2].event_type, "account.Deposited");
    let id = all[1].id;
    let found = s.find_event(id).await.unwrap().unwrap();
    assert_eq!(found.payload, br#"{"amount":5}"#.to_vec());
    // A failing upcaster is a decode error naming the event.
    s.append(
        "account-up2",
        ExpectedVersion::NoStream,
        vec![raw("account.Deposited", r#"{"cents":"x"}"#)],
    )
    .await
    .unwrap();
    match s
        .read_stream("account-up2", 1, Direction::Forward, 10)
        .await
    {
        Err(StoreError::Decode(e)) => {
            assert_eq!((e.stream.as_str(), e.version), ("account-up2", 1));
            assert!(e.message.contains("cents `x`"), "{}", e.message);
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
}

/// `execute` stores decisions, returns the new state, keeps rejections typed.
pub async fn repository_execute_and_reject<B: Backend>() {
    let f = fresh!(B, "repository_execute_and_reject");
    let repo = Repository::<Account, _>::new(f.store.clone());
    let done = repo
        .execute(
            "1",
            AccountCommand::Open {
                owner: "ann".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!((done.version, done.duplicate, done.retries), (1, false, 0));
    let done = repo
        .execute("1", AccountCommand::Deposit { amount: 30 })
        .await
        .unwrap();
    assert_eq!((done.state.balance, done.version), (30, 2));
    assert_eq!(done.events, vec![AccountEvent::Deposited { amount: 30 }]);
    match repo
        .execute("1", AccountCommand::Withdraw { amount: 31 })
        .await
    {
        Err(ExecuteError::Rejected(AccountError::InsufficientFunds {
            balance: 30,
            requested: 31,
        })) => {}
        other => panic!("expected a typed rejection, got {other:?}"),
    }
    match repo
        .execute("2", AccountCommand::Deposit { amount: 1 })
        .await
    {
        Err(ExecuteError::Rejected(AccountError::NotOpen)) => {}
        other => panic!("expected NotOpen, got {other:?}"),
    }
    assert_eq!(f.store.stream_version("account-1").await.unwrap(), 2);
    assert_eq!(f.store.stream_version("account-2").await.unwrap(), 0);
    let events = f
        .store
        .read_stream("account-1", 1, Direction::Forward, 10)
        .await
        .unwrap();
    let meta = &events[1].metadata;
    assert_eq!(
        meta.correlation_id, meta.causation_id,
        "a fresh command correlates to itself"
    );
    assert_ne!(events[0].metadata.correlation_id, meta.correlation_id);
}

/// Concurrent commands on one aggregate all land through conflict retries,
/// and a repository with one attempt reports the conflict.
pub async fn repository_conflicts_are_retried<B: Backend>() {
    let f = fresh!(B, "repository_conflicts_are_retried");
    let repo = Repository::<Account, _>::new(f.store.clone()).max_attempts(1000);
    repo.execute(
        "c",
        AccountCommand::Open {
            owner: "bob".into(),
        },
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut retries = 0;
            for _ in 0..10 {
                retries += repo
                    .execute("c", AccountCommand::Deposit { amount: i + 1 })
                    .await
                    .unwrap()
                    .retries;
            }
            retries
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let loaded = repo.load("c").await.unwrap();
    assert_eq!(loaded.version, 81);
    assert_eq!(
        loaded.state.balance,
        (1..=8u64).map(|i| i * 10).sum::<u64>()
    );

    // With a single attempt, a conflicting writer in between is reported.
    let strict = Repository::<Account, _>::new(f.store.clone()).max_attempts(1);
    let store = f.store.clone();
    let mut conflicts = 0;
    for _ in 0..50 {
        let racer = {
            let store = store.clone();
            tokio::spawn(async move {
                let v = store.stream_version("account-c").await.unwrap();
                let _ = store
                    .append(
                        "account-c",
                        ExpectedVersion::Exact(v),
                        vec![crate::raw("account.Deposited", r#"{"amount":0}"#)],
                    )
                    .await;
            })
        };
        match strict
            .execute("c", AccountCommand::Deposit { amount: 0 })
            .await
        {
            Ok(_) => {}
            Err(ExecuteError::Conflict { stream, attempts }) => {
                assert_eq!((stream.as_str(), attempts), ("account-c", 1));
                conflicts += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        racer.await.unwrap();
    }
    eprintln!("{conflicts} of 50 racing commands hit a conflict with max_attempts(1)");
}

/// A command resent after the stream moved on is decided again (there is no
/// lookup before deciding) but never executed twice: the store refuses the
/// derived ids, and the first result comes back; a rejection caused by the
/// first execution is recognised the same way.
pub async fn repository_resend_after_the_stream_moved_never_executes_twice<B: Backend>() {
    let f = fresh!(
        B,
        "repository_resend_after_the_stream_moved_never_executes_twice"
    );
    let repo = Repository::<Account, _>::new(f.store.clone());
    repo.execute(
        "h",
        AccountCommand::Open {
            owner: "ann".into(),
        },
    )
    .await
    .unwrap();
    let deposit = CommandMeta::with_id(Uuid::now_v7());
    let first = repo
        .execute_with("h", AccountCommand::Deposit { amount: 5 }, deposit.clone())
        .await
        .unwrap();
    // Another writer moves the stream on, so a new decision would append at
    // a new version.
    repo.execute("h", AccountCommand::Deposit { amount: 1 })
        .await
        .unwrap();
    let again = repo
        .execute_with("h", AccountCommand::Deposit { amount: 5 }, deposit)
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.version, first.version);
    assert_eq!(again.state.balance, 6);
    assert_eq!(f.store.stream_version("account-h").await.unwrap(), 3);
    // A refusal caused by the first execution is recognised the same way.
    let open = CommandMeta::with_id(Uuid::now_v7());
    repo.execute_with(
        "k",
        AccountCommand::Open { owner: "bo".into() },
        open.clone(),
    )
    .await
    .unwrap();
    let reopened = repo
        .execute_with("k", AccountCommand::Open { owner: "bo".into() }, open)
        .await
        .unwrap();
    assert!(reopened.duplicate);
    assert_eq!(f.store.stream_version("account-k").await.unwrap(), 1);
}

/// The same command id twice: executed once, the second call returns the
/// first result (decided again, its rejection finds the first execution).
pub async fn repository_command_id_is_idempotent<B: Backend>() {
    let f = fresh!(B, "repository_command_id_is_idempotent");
    let repo = Repository::<Account, _>::new(f.store.clone());
    let open = CommandMeta::with_id(Uuid::now_v7()).extra("user", "ann");
    let first = repo
        .execute_with(
            "i",
            AccountCommand::Open {
                owner: "ann".into(),
            },
            open.clone(),
        )
        .await
        .unwrap();
    // Re-sending "open" is rejected (AlreadyOpen) when decided again: the
    // rejection finds the first execution and returns its result.
    let again = repo
        .execute_with(
            "i",
            AccountCommand::Open {
                owner: "ann".into(),
            },
            open.clone(),
        )
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.version, again.position, again.events),
        (first.version, first.position, first.events)
    );
    let deposit = CommandMeta::with_id(Uuid::now_v7());
    repo.execute_with("i", AccountCommand::Deposit { amount: 5 }, deposit.clone())
        .await
        .unwrap();
    repo.execute("i", AccountCommand::Deposit { amount: 1 })
        .await
        .unwrap();
    let again = repo
        .execute_with("i", AccountCommand::Deposit { amount: 5 }, deposit.clone())
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.version, 2, "the version the command produced");
    assert_eq!(again.state.balance, 6, "current state");
    assert_eq!(f.store.stream_version("account-i").await.unwrap(), 3);
    let stored = f
        .store
        .read_stream("account-i", 1, Direction::Forward, 10)
        .await
        .unwrap();
    assert_eq!(
        stored[0].metadata.extra.get("user").map(String::as_str),
        Some("ann")
    );
    assert_eq!(stored[0].metadata.correlation_id, open.command_id.unwrap());
    // The same command id on another aggregate is an id reuse, not a no-op.
    match repo
        .execute_with("j", AccountCommand::Open { owner: "x".into() }, open)
        .await
    {
        Err(ExecuteError::Store(StoreError::DuplicateEventId {
            existing_stream, ..
        })) => {
            assert_eq!(existing_stream, "account-i")
        }
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
}

/// Loading with and without snapshots gives the same state; with snapshots
/// only the tail is read.
pub async fn snapshots_give_same_state<B: Backend>() {
    let f = fresh!(B, "snapshots_give_same_state");
    let plain = Repository::<Account, _>::new(f.store.clone());
    let snapped = Repository::<Account, _>::new(f.store.clone()).with_snapshots(10);
    snapped
        .execute(
            "s",
            AccountCommand::Open {
                owner: "ann".into(),
            },
        )
        .await
        .unwrap();
    for i in 0..34u64 {
        let repo = if i % 3 == 0 { &plain } else { &snapped };
        repo.execute("s", AccountCommand::Deposit { amount: i })
            .await
            .unwrap();
    }
    let a = plain.load("s").await.unwrap();
    let b = snapped.load("s").await.unwrap();
    assert_eq!(a.state, b.state);
    assert_eq!((a.version, b.version), (35, 35));
    assert_eq!(a.events_read, 35);
    let snap = b.snapshot_version.expect("a snapshot was used");
    assert!(snap >= 30, "newest snapshot used, got {snap}");
    assert_eq!(b.events_read, 35 - snap);
}

/// A snapshot whose shape no longer decodes is ignored, not an error.
pub async fn stale_snapshot_is_ignored<B: Backend>() {
    let f = fresh!(B, "stale_snapshot_is_ignored");
    let repo = Repository::<Account, _>::new(f.store.clone()).with_snapshots(2);
    repo.execute(
        "z",
        AccountCommand::Open {
            owner: "ann".into(),
        },
    )
    .await
    .unwrap();
    repo.execute("z", AccountCommand::Deposit { amount: 4 })
        .await
        .unwrap();
    f.store
        .save_snapshot(Snapshot {
            stream: "account-z".into(),
            version: 2,
            state: br#"{"shape":"from an old release"}"#.to_vec(),
            taken_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let loaded = repo.load("z").await.unwrap();
    assert_eq!(
        (
            loaded.state.balance,
            loaded.version,
            loaded.snapshot_version
        ),
        (4, 2, None)
    );
}

/// `read_all_partition`: for several partition counts, the partitions of
/// `$all` (with and without a type filter) are disjoint, together are all of
/// it, hold each stream whole in the partition `Partition::of` names, in
/// `$all` order, paged like `read_all` (a short page is the end). A catch-up
/// reader of one partition checkpoints past other partitions' events up to
/// the head.
pub async fn partitioned_reads<B: Backend>() {
    use aftermath::subscription::{CatchUp, Partition, SubscriptionOptions};

    let f = fresh!(B, "partitioned_reads");
    let s = &f.store;
    let streams: Vec<String> = (0..24)
        .map(|i| match i % 4 {
            0 => format!("order-{i}"),
            1 => format!("customer-{i}"),
            2 => format!("ü-stream-{i}"),
            _ => format!("日本-{i}"),
        })
        .collect();
    for round in 0..4 {
        for (i, stream) in streams.iter().enumerate() {
            let events = if (i + round) % 3 == 0 {
                vec![raw("Pinged", "{}")]
            } else {
                deposits(0, 1 + (i % 2) as u64)
            };
            s.append(stream, ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
    }
    let all = all_events(s).await;
    assert!(all.len() > 100);
    let deposited: Vec<&StoredEvent> = all
        .iter()
        .filter(|e| e.event_type == "account.Deposited")
        .collect();
    assert!(
        s.read_all_partition(Position::ORIGIN, None, Partition::new(0, 2), 0)
            .await
            .unwrap()
            .is_empty()
    );

    for count in [1u32, 2, 3, 4, 7] {
        for types in [None, Some(&["account.Deposited"][..])] {
            let mut seen: Vec<StoredEvent> = Vec::new();
            for index in 0..count {
                let partition = Partition::new(index, count);
                let mut after = Position::ORIGIN;
                let mut mine = Vec::new();
                loop {
                    let page = s
                        .read_all_partition(after, types, partition, 5)
                        .await
                        .unwrap();
                    assert!(page.len() <= 5);
                    for e in &page {
                        assert!(e.position > after, "in order, after the cursor");
                        after = e.position;
                        assert_eq!(
                            Partition::of(&e.stream, count),
                            index,
                            "{} read in partition {partition}",
                            e.stream
                        );
                        if types.is_some() {
                            assert_eq!(e.event_type, "account.Deposited");
                        }
                    }
                    let short = page.len() < 5;
                    mine.extend(page);
                    if short {
                        break;
                    }
                }
                // Per stream: every version of the stream (of these types),
                // ascending.
                let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
                for e in &mine {
                    versions.entry(&e.stream).or_default().push(e.version);
                }
                for (stream, got) in versions {
                    let want: Vec<u64> = all
                        .iter()
                        .filter(|e| e.stream == stream)
                        .filter(|e| types.is_none() || e.event_type == "account.Deposited")
                        .map(|e| e.version)
                        .collect();
                    assert_eq!(got, want, "stream {stream} in partition {partition}");
                }
                seen.extend(mine);
            }
            seen.sort_by_key(|e| e.position);
            let want: Vec<Uuid> = match types {
                None => all.iter().map(|e| e.id).collect(),
                Some(_) => deposited.iter().map(|e| e.id).collect(),
            };
            let got: Vec<Uuid> = seen.iter().map(|e| e.id).collect();
            assert_eq!(
                got, want,
                "{count} partitions, types {types:?}: each event once"
            );
        }
    }

    // A reader of the first stream's partition, after that stream's last
    // event: the log's tail is other partitions' only, and it still
    // checkpoints through the head.
    let count = 4;
    let index = Partition::of(&streams[0], count);
    let others: Vec<&String> = streams
        .iter()
        .filter(|st| Partition::of(st, count) != index)
        .collect();
    assert!(!others.is_empty());
    let tail = s
        .append(others[0], ExpectedVersion::Any, deposits(0, 3))
        .await
        .unwrap()
        .last_position
        .unwrap();
    let last_mine = all
        .iter()
        .filter(|e| Partition::of(&e.stream, count) == index)
        .map(|e| e.position)
        .max()
        .unwrap();
    let mut reader = CatchUp::new(
        s.clone(),
        Some(vec!["account.Deposited", "Pinged"]),
        last_mine,
        SubscriptionOptions::default().batch_size(2),
    )
    .partition(index, count);
    let page = reader.next_page().await.unwrap();
    assert!(page.events.is_empty() && page.caught_up);
    assert_eq!(page.through, tail, "checkpoints past other partitions");
    reader.advance(page.through);
    assert_eq!(reader.position(), tail);
}

/// Copies of one command (same command id) racing each other: every caller
/// gets the first result, none an error, and the command is decided once.
pub async fn repository_concurrent_copies_of_a_command<B: Backend>() {
    let f = fresh!(B, "repository_concurrent_copies_of_a_command");
    let repo = Repository::<Account, _>::new(f.store.clone()).max_attempts(100);
    for round in 0..5u64 {
        let account = format!("race{round}");
        // `Open` is rejected once executed: a copy that decides after the
        // first one landed must still get the first result.
        for command in [
            AccountCommand::Open {
                owner: "ann".into(),
            },
            AccountCommand::Deposit { amount: 7 },
        ] {
            let meta = CommandMeta::with_id(Uuid::now_v7());
            let copies: Vec<_> = (0..6)
                .map(|_| {
                    let (repo, account, command, meta) =
                        (repo.clone(), account.clone(), command.clone(), meta.clone());
                    tokio::spawn(async move { repo.execute_with(&account, command, meta).await })
                })
                .collect();
            let mut first = 0;
            for copy in copies {
                match copy.await.unwrap() {
                    Ok(done) => first += usize::from(!done.duplicate),
                    Err(e) => panic!("a copy of {command:?} failed: {e}"),
                }
            }
            assert_eq!(first, 1, "exactly one copy decided {command:?}");
        }
        let stream = format!("account-{account}");
        assert_eq!(
            f.store.stream_version(&stream).await.unwrap(),
            2,
            "each command stored once"
        );
    }
}

/// A raw event of `event_type` with `payload`, a fresh id, and
/// `correlation` as its correlation id.
fn correlated(event_type: &str, payload: &str, correlation: Uuid) -> aftermath::EventData {
    let mut event = raw(event_type, payload);
    event.metadata.correlation_id = correlation;
    event
}

/// The store, with `read_correlation` left to the trait's default (a scan
/// of `read_all` pages): the default is checked on every backend too.
#[derive(Clone)]
struct FullScan<S>(S);

#[async_trait::async_trait]
impl<S: EventStore> EventStore for FullScan<S> {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<aftermath::EventData>,
    ) -> Result<AppendResult, StoreError> {
        self.0.append(stream, expected, events).await
    }
    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.0.read_stream(stream, from, direction, limit).await
    }
    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.0.read_all(after, types, limit).await
    }
    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.0.stream_version(stream).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.0.head().await
    }
    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        self.0.find_event(id).await
    }
    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        self.0.watch_head()
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.0.save_snapshot(snapshot).await
    }
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        self.0.load_snapshot(stream).await
    }
}

/// Every event of `correlation` after `after`, read `page` at a time; each
/// page is checked to be at most `page` events, after its cursor, in order.
async fn correlation_pages<S: EventStore>(
    store: &S,
    correlation: Uuid,
    after: Position,
    page: usize,
) -> Vec<StoredEvent> {
    let mut cursor = after;
    let mut found = Vec::new();
    loop {
        let events = store
            .read_correlation(correlation, cursor, page)
            .await
            .expect("read a correlation");
        assert!(events.len() <= page, "a page holds at most `limit` events");
        for e in &events {
            assert!(e.position > cursor, "in $all order, after the cursor");
            assert_eq!(e.metadata.correlation_id, correlation);
            cursor = e.position;
        }
        let short = events.len() < page;
        found.extend(events);
        if short {
            return found;
        }
    }
}

/// `read_correlation` reads one conversation's events across streams, in
/// `$all` order, exclusive of `after`, at most `limit`, upcasted; events of
/// other correlations (also in the same streams) never appear. Checked on
/// the backend's own implementation and on the trait's default scan.
pub async fn read_correlation_across_streams<B: Backend>() {
    let upcasters = Upcasters::new()
        .register("account.Deposited", |mut v| {
            if let Some(cents) = v.get("cents").and_then(|c| c.as_str()).map(str::to_owned) {
                let amount: u64 = cents.parse().map_err(|e| format!("cents `{cents}`: {e}"))?;
                v = serde_json::json!({ "amount": amount });
            }
            Ok(v)
        })
        .register_renamed("account.Credited", "account.Deposited", Ok);
    let f = fresh!(B, "read_correlation_across_streams", upcasters);
    let s = &f.store;
    let order = Uuid::now_v7();
    let other = Uuid::now_v7();
    let mut want_ids = Vec::new();
    for round in 0..4u64 {
        for (i, stream) in ["order-7", "payment-7", "shipping-7"].iter().enumerate() {
            let mine = if (round + i as u64).is_multiple_of(2) {
                correlated("account.Credited", r#"{"cents":"7"}"#, order)
            } else {
                correlated(
                    "account.Deposited",
                    &format!(r#"{{"amount":{round}}}"#),
                    order,
                )
            };
            want_ids.push(mine.id);
            let theirs = correlated("account.Deposited", r#"{"amount":1}"#, other);
            // Another conversation in the same stream, and one of its own.
            s.append(stream, ExpectedVersion::Any, vec![theirs, mine])
                .await
                .unwrap();
            s.append(
                &format!("noise-{round}-{i}"),
                ExpectedVersion::Any,
                deposits(0, 2),
            )
            .await
            .unwrap();
        }
        if round == 1 {
            // More unrelated events than one page of the default scan
            // between two of the conversation's events.
            s.append(
                "noise-bulk",
                ExpectedVersion::NoStream,
                deposits(0, aftermath::store::CORRELATION_SCAN_PAGE as u64 + 40),
            )
            .await
            .unwrap();
        }
    }
    // Two events of the conversation in one batch.
    let batch = vec![
        correlated("account.Opened", r#"{"owner":"ann"}"#, order),
        correlated("account.Deposited", r#"{"cents":"9"}"#, order),
    ];
    want_ids.extend(batch.iter().map(|e| e.id));
    s.append("account-7", ExpectedVersion::NoStream, batch)
        .await
        .unwrap();

    let all = all_events(s).await;
    let want: Vec<StoredEvent> = all
        .iter()
        .filter(|e| e.metadata.correlation_id == order)
        .cloned()
        .collect();
    assert_eq!(
        want.iter().map(|e| e.id).collect::<Vec<_>>(),
        want_ids,
        "$all holds the conversation in append order"
    );
    let scan = FullScan(s.clone());
    for (how, store) in [
        ("backend", s as &dyn DynCorrelation),
        ("default scan", &scan as &dyn DynCorrelation),
    ] {
        let got = store
            .read(order, Position::ORIGIN, 100)
            .await
            .expect("read a correlation");
        assert_eq!(
            got, want,
            "{how}: every event of the conversation, as read_all reads it"
        );
        assert!(
            got.iter().all(|e| e.event_type != "account.Credited"),
            "{how}: upcasters apply"
        );
        let credited = got
            .iter()
            .find(|e| e.id == want_ids[0])
            .expect("the first event");
        assert_eq!(credited.event_type, "account.Deposited", "{how}: renamed");
        assert_eq!(
            credited.payload,
            br#"{"amount":7}"#.to_vec(),
            "{how}: upcast"
        );
        assert_eq!(got.last().unwrap().payload, br#"{"amount":9}"#.to_vec());
        // Exclusive of `after`, at most `limit`.
        let page = store.read(order, want[3].position, 4).await.unwrap();
        assert_eq!(page, want[4..8].to_vec(), "{how}: from the middle");
        let tail = store
            .read(order, want[want.len() - 2].position, 10)
            .await
            .unwrap();
        assert_eq!(
            tail,
            want[want.len() - 1..].to_vec(),
            "{how}: a short last page"
        );
        let end = store
            .read(order, want.last().unwrap().position, 10)
            .await
            .unwrap();
        assert!(end.is_empty(), "{how}: nothing after the last");
        assert!(
            store
                .read(order, Position::ORIGIN, 0)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .read(Uuid::now_v7(), Position::ORIGIN, 10)
                .await
                .unwrap()
                .is_empty(),
            "{how}: an unknown correlation reads as empty"
        );
        let theirs = store.read(other, Position::ORIGIN, 100).await.unwrap();
        assert_eq!(theirs.len(), 12, "{how}: the other conversation");
        assert!(theirs.iter().all(|e| e.metadata.correlation_id == other));
    }
    for page in [1, 2, 3, 5, 14, 15] {
        assert_eq!(
            correlation_pages(s, order, Position::ORIGIN, page).await,
            want,
            "backend, pages of {page}"
        );
        assert_eq!(
            correlation_pages(&scan, order, Position::ORIGIN, page).await,
            want,
            "default scan, pages of {page}"
        );
    }
}

/// `read_correlation` behind a `dyn` (the backend and the default side by
/// side in one loop).
#[async_trait::async_trait]
trait DynCorrelation: Send + Sync {
    async fn read(
        &self,
        correlation: Uuid,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;
}

#[async_trait::async_trait]
impl<S: EventStore> DynCorrelation for S {
    async fn read(
        &self,
        correlation: Uuid,
        after: Position,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read_correlation(correlation, after, limit).await
    }
}

/// Another aggregate's events, with a variant named like `AccountEvent`'s
/// and the same payload shape: with bare type names, a reader of either
/// enum would decode the other's `Opened` as its own without an error.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, aftermath::Event)]
#[event(prefix = "order")]
enum OrderEvent {
    Opened { owner: String },
    Shipped,
}

/// Every event of `$all` whose type `E` declares, read in small pages the
/// way every subscriber reads (types pushed into the store's query), each
/// decoded as a subscriber does: an event it does not know is an error.
async fn subscribe<S: EventStore, E: aftermath::Event>(store: &S) -> Vec<aftermath::Recorded<E>> {
    read_all_pages(store, Position::ORIGIN, Some(E::event_types()), 2)
        .map_ok(|stored| {
            stored
                .decode_known::<E>()
                .unwrap_or_else(|e| panic!("a subscriber got an event it does not know: {e}"))
        })
        .try_collect()
        .await
        .expect("read $all")
}

/// `AccountEvent::Opened` and `OrderEvent::Opened` in one store: a subscriber
/// of each receives only its own, because stored names carry the enum's
/// prefix (`account.Opened`, `order.Opened`).
pub async fn each_subscriber_receives_only_its_own_events<B: Backend>() {
    let f = fresh!(B, "each_subscriber_receives_only_its_own_events");
    let s = &f.store;
    for i in 0..3 {
        let owner = format!("owner-{i}");
        s.append(
            &format!("account-{i}"),
            ExpectedVersion::NoStream,
            vec![
                aftermath::EventData::fresh(&AccountEvent::Opened {
                    owner: owner.clone(),
                })
                .unwrap(),
            ],
        )
        .await
        .unwrap();
        s.append(
            &format!("order-{i}"),
            ExpectedVersion::NoStream,
            vec![
                aftermath::EventData::fresh(&OrderEvent::Opened { owner }).unwrap(),
                aftermath::EventData::fresh(&OrderEvent::Shipped).unwrap(),
            ],
        )
        .await
        .unwrap();
    }
    let stored: Vec<String> = all_events(s)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        stored.iter().filter(|t| *t == "account.Opened").count(),
        3,
        "{stored:?}"
    );
    assert_eq!(
        stored.iter().filter(|t| *t == "order.Opened").count(),
        3,
        "{stored:?}"
    );

    let accounts = subscribe::<_, AccountEvent>(s).await;
    assert_eq!(accounts.len(), 3, "only the three accounts' events");
    assert!(
        accounts.iter().all(|e| e.stream.starts_with("account-")),
        "{:?}",
        accounts.iter().map(|e| &e.stream).collect::<Vec<_>>()
    );
    let orders = subscribe::<_, OrderEvent>(s).await;
    assert_eq!(orders.len(), 6, "only the three orders' events");
    assert!(orders.iter().all(|e| e.stream.starts_with("order-")));
    assert_eq!(
        orders
            .iter()
            .filter(|e| matches!(e.event, OrderEvent::Opened { .. }))
            .count(),
        3
    );
    // Aggregate loads read their own stream as before.
    let repo = Repository::<Account, _>::new(s.clone());
    assert_eq!(
        repo.load("1").await.unwrap().state.owner.as_deref(),
        Some("owner-1")
    );
}

/// A store written before names were qualified (bare "Opened",
/// "Deposited", an old alias "MoneyWithdrawn") keeps loading with
/// `Upcasters::unqualified::<AccountEvent>()`: aggregates fold the old events
/// with the new ones, a subscriber of `AccountEvent` receives them under
/// their qualified names, a pure rename leaves the payload bytes as stored,
/// and bare names of other enums are not picked up.
pub async fn unqualified_names_of_old_stores_still_load<B: Backend>() {
    let upcasters = Upcasters::new().unqualified::<AccountEvent>();
    let f = fresh!(B, "unqualified_names_of_old_stores_still_load", upcasters);
    let s = &f.store;
    s.append(
        "account-old",
        ExpectedVersion::NoStream,
        vec![
            raw("Opened", r#"{ "owner": "ann" }"#),
            raw("Deposited", r#"{"amount":5}"#),
            raw("MoneyWithdrawn", r#"{"amount":2}"#),
        ],
    )
    .await
    .unwrap();
    s.append(
        "account-old",
        ExpectedVersion::Exact(3),
        vec![aftermath::EventData::fresh(&AccountEvent::Deposited { amount: 10 }).unwrap()],
    )
    .await
    .unwrap();
    s.append(
        "ping-1",
        ExpectedVersion::NoStream,
        vec![raw("Pinged", "{}")],
    )
    .await
    .unwrap();

    let repo = Repository::<Account, _>::new(s.clone());
    let loaded = repo.load("old").await.unwrap().state;
    assert_eq!(
        (loaded.owner.as_deref(), loaded.balance, loaded.applied),
        (Some("ann"), 13, 4)
    );

    let seen = subscribe::<_, AccountEvent>(s).await;
    assert_eq!(
        seen.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        vec![
            AccountEvent::Opened {
                owner: "ann".into()
            },
            AccountEvent::Deposited { amount: 5 },
            AccountEvent::Withdrew { amount: 2 },
            AccountEvent::Deposited { amount: 10 },
        ]
    );
    let stream = s
        .read_stream("account-old", 1, Direction::Forward, 10)
        .await
        .unwrap();
    assert_eq!(
        stream
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        [
            "account.Opened",
            "account.Deposited",
            "account.MoneyWithdrawn",
            "account.Deposited"
        ]
    );
    assert_eq!(
        stream[0].payload,
        br#"{ "owner": "ann" }"#.to_vec(),
        "a rename keeps the bytes"
    );
    let all = all_events(s).await;
    assert_eq!(
        all.last().unwrap().event_type,
        "Pinged",
        "other bare names stay as stored"
    );
}
