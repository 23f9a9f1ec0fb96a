//! The conformance suite against a KurrentDB (or EventStoreDB 20.6+) server,
//! plus checks of the mapping that only a server can confirm.
//!
//! Built with the tests crate's `kurrentdb` feature; runs when
//! `AFTERMATH_ESDB_URL` is set (e.g. `esdb://127.0.0.1:2113?tls=false`).
//! Every test uses a fresh namespace, so tests share the server without
//! seeing each other (their streams stay on the server: use a throwaway
//! one). Without the variable each test prints SKIPPED; with it set but the
//! server unreachable, the tests fail.

use std::time::Duration;

use aftermath::store::kurrentdb::client::{
    Client, ReadAllOptions, ReadStreamOptions, StreamPosition,
};
use aftermath::store::{Direction, EventStore, ExpectedVersion};
use aftermath::{KurrentOptions, KurrentStore, Position, Upcasters};
use aftermath_tests::{Backend, Fresh, deposits, raw};
use uuid::Uuid;

/// The server URL, or why these tests cannot run.
fn url() -> Result<String, String> {
    match std::env::var("AFTERMATH_ESDB_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => Err("AFTERMATH_ESDB_URL not set (e.g. esdb://127.0.0.1:2113?tls=false)".to_owned()),
    }
}

/// A namespace no other test (or run) uses.
fn fresh_namespace() -> String {
    format!("t{}", Uuid::new_v4().simple())
}

async fn connect(url: &str, options: KurrentOptions) -> KurrentStore {
    KurrentStore::connect_with(url, options)
        .await
        .unwrap_or_else(|e| {
            panic!("AFTERMATH_ESDB_URL is set ({url}) but the store cannot connect: {e}")
        })
}

struct Kurrent;

#[async_trait::async_trait]
impl Backend for Kurrent {
    type Store = KurrentStore;
    const NAME: &'static str = "kurrentdb";
    async fn open(upcasters: Upcasters) -> Result<Fresh<KurrentStore>, String> {
        let url = url()?;
        let options = KurrentOptions::default()
            .namespace(fresh_namespace())
            .upcasters(upcasters);
        Ok(Fresh {
            store: connect(&url, options).await,
            guard: Box::new(()),
        })
    }
}

aftermath_tests::conformance_tests!(Kurrent);

/// Skips (printing why) when no server is configured.
macro_rules! url_or_skip {
    ($test:literal) => {
        match url() {
            Ok(url) => url,
            Err(reason) => {
                aftermath_tests::skip_notice!("SKIPPED kurrentdb::{}: {reason}", $test);
                return;
            }
        }
    };
}

fn client(url: &str) -> Client {
    Client::new(url.parse().expect("a client URL")).expect("a client")
}

/// What the server stores: our ids, `<namespace>.<stream>` at revision
/// version - 1, `<namespace>.<type>` as JSON, metadata with the
/// conventional keys, and `$all` positions whose commit and prepare
/// positions are equal and are the store's positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sees_the_documented_mapping() {
    let url = url_or_skip!("the_server_sees_the_documented_mapping");
    let ns = fresh_namespace();
    let store = connect(&url, KurrentOptions::default().namespace(&ns)).await;
    let mut batch = deposits(0, 3);
    batch[1].metadata.extra.insert("user".into(), "ann".into());
    let done = store
        .append("map-1", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let ours = store
        .read_stream("map-1", 1, Direction::Forward, 10)
        .await
        .unwrap();

    let client = client(&url);
    let options = ReadStreamOptions::default()
        .position(StreamPosition::Start)
        .forwards()
        .max_count(10);
    let mut read = client
        .read_stream(format!("{ns}.map-1"), &options)
        .await
        .unwrap();
    let mut seen = 0;
    while let Some(event) = read.next().await.unwrap() {
        let recorded = event.get_original_event();
        let i = seen;
        seen += 1;
        assert_eq!(recorded.id, batch[i].id, "our id is the server's");
        assert_eq!(recorded.revision + 1, ours[i].version);
        assert_eq!(recorded.event_type, format!("{ns}.Deposited"));
        assert!(recorded.is_json, "JSON payloads keep the JSON content type");
        assert_eq!(recorded.data.to_vec(), batch[i].payload);
        let meta: serde_json::Value = serde_json::from_slice(&recorded.custom_metadata).unwrap();
        assert_eq!(
            meta["$correlationId"],
            batch[i].metadata.correlation_id.to_string()
        );
        assert_eq!(
            meta["$causationId"],
            batch[i].metadata.causation_id.to_string()
        );
        assert_eq!(
            recorded.position.commit, recorded.position.prepare,
            "gRPC writes: commit == prepare"
        );
        assert_eq!(Position(recorded.position.commit), ours[i].position);
    }
    assert_eq!(seen, 3);
    assert_eq!(
        ours[1].metadata.extra.get("user").map(String::as_str),
        Some("ann")
    );
    assert_eq!(done.last_position, Some(ours[2].position));

    // The same positions in $all, in the same order.
    let options = ReadAllOptions::default()
        .position(StreamPosition::Start)
        .forwards()
        .max_count(100_000);
    let mut all = client.read_all(&options).await.unwrap();
    let mut found = Vec::new();
    while let Some(event) = all.next().await.unwrap() {
        let recorded = event.get_original_event();
        if recorded.stream_id() == format!("{ns}.map-1") {
            found.push(Position(recorded.position.commit));
        }
    }
    assert_eq!(found, ours.iter().map(|e| e.position).collect::<Vec<_>>());
}

/// Stores in different namespaces share the server without seeing each
/// other's events, heads or ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_isolated() {
    let url = url_or_skip!("namespaces_are_isolated");
    let a = connect(&url, KurrentOptions::default().namespace(fresh_namespace())).await;
    let b = connect(&url, KurrentOptions::default().namespace(fresh_namespace())).await;
    let batch = deposits(0, 2);
    a.append("iso-1", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert_eq!(b.head().await.unwrap(), Position::ORIGIN);
    assert!(
        b.read_all(Position::ORIGIN, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.stream_version("iso-1").await.unwrap(), 0);
    assert!(b.find_event(batch[0].id).await.unwrap().is_none());
    // Ids are unique per namespace.
    b.append("iso-1", ExpectedVersion::NoStream, batch)
        .await
        .unwrap();
    assert_eq!(
        a.read_all(Position::ORIGIN, None, 10).await.unwrap().len(),
        2
    );
}

/// Another handle's append wakes `watch_head` through the `$all`
/// subscription, without polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_handle_moves_the_watch() {
    let url = url_or_skip!("another_handle_moves_the_watch");
    let ns = fresh_namespace();
    let follower = connect(&url, KurrentOptions::default().namespace(&ns)).await;
    let writer = connect(&url, KurrentOptions::default().namespace(&ns)).await;
    let mut watch = follower.watch_head();
    // Give the subscription a moment to start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = writer
        .append("wh-1", ExpectedVersion::NoStream, vec![raw("Pinged", "{}")])
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|p| *p >= done.last_position.unwrap()),
    )
    .await
    .expect("the subscription moved the follower's head")
    .unwrap();
}
