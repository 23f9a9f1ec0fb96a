//! Metrics: after a known workload, the counters and gauges aftermath
//! records through the `metrics` facade have exactly the expected values.
//! One test in its own binary: the recorder is process-global.

use std::collections::BTreeMap;

use aftermath::reactor::{EffectContext, ReactError, Reactor, ReactorRunner};
use aftermath::{CommandMeta, ExecuteError, Recorded, Repository, SqliteStore};
use aftermath_tests::process::{Counter, CounterCommand, CounterEvent};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use uuid::Uuid;

/// Fails for good on the number 1.
struct Picky;

#[async_trait::async_trait]
impl Reactor for Picky {
    type Event = CounterEvent;

    fn name(&self) -> &str {
        "picky"
    }

    async fn react(
        &self,
        event: &Recorded<CounterEvent>,
        _: &EffectContext,
    ) -> Result<(), ReactError> {
        let CounterEvent::Added { n } = event.event;
        if n == 1 {
            return Err(ReactError::fatal("no ones"));
        }
        Ok(())
    }
}

/// `name{label=value,...}` -> value, for every metric recorded.
fn snapshot(snapshotter: &metrics_util::debugging::Snapshotter) -> BTreeMap<String, f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(samples) => samples.len() as f64,
            };
            (name, value)
        })
        .collect()
}

/// Three commands executed, one sent again (a duplicate), one rejected; a
/// reactor whose effect for the second event fails for good (parked) and
/// holds the third (blocked): the counters say exactly that, the running
/// subscriber's lag is 0 once caught up, and the store's gauges show one
/// parked and one blocked effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_workload_has_exact_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this binary");

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("metrics.db"))
        .await
        .unwrap();
    let counters = Repository::<Counter, _>::new(store.clone());
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate() {
        counters
            .execute_with(
                "c",
                CounterCommand::Add { n: n as u64 },
                CommandMeta::with_id(*id),
            )
            .await
            .expect("execute");
    }
    let again = counters
        .execute_with(
            "c",
            CounterCommand::Add { n: 1 },
            CommandMeta::with_id(ids[1]),
        )
        .await
        .expect("a resend returns the first result");
    assert!(again.duplicate);
    let rejected = counters.execute("c", CounterCommand::Add { n: 7 }).await;
    assert!(matches!(rejected, Err(ExecuteError::Rejected(_))));

    let runner = ReactorRunner::new(Picky, store.clone(), store.clone(), store.clone());
    runner.catch_up().await.expect("catch up");
    let report = aftermath::admin::record_metrics(&store)
        .await
        .expect("report");
    assert_eq!((report.parked_effects(), report.blocked_effects()), (1, 1));

    let got = snapshot(&snapshotter);
    let expected = [
        (
            "aftermath_commands_total{aggregate=counter,outcome=executed}",
            3.0,
        ),
        (
            "aftermath_commands_total{aggregate=counter,outcome=duplicate}",
            1.0,
        ),
        (
            "aftermath_commands_total{aggregate=counter,outcome=rejected}",
            1.0,
        ),
        ("aftermath_append_seconds{aggregate=counter}", 3.0),
        (
            "aftermath_effect_attempts_total{outcome=done,reactor=picky}",
            1.0,
        ),
        (
            "aftermath_effect_attempts_total{outcome=parked,reactor=picky}",
            1.0,
        ),
        ("aftermath_events_handled_total{subscriber=picky}", 3.0),
        ("aftermath_subscriber_lag_events{subscriber=picky}", 0.0),
        ("aftermath_subscriber_lag_seconds{subscriber=picky}", 0.0),
        ("aftermath_effects_parked{}", 1.0),
        ("aftermath_effects_blocked{}", 1.0),
        ("aftermath_processes_parked{}", 0.0),
        ("aftermath_inbox_parked{}", 0.0),
        ("aftermath_store_lag_events{subscriber=picky}", 0.0),
        ("aftermath_store_held{subscriber=picky}", 2.0),
    ];
    let mut wrong = Vec::new();
    for (name, value) in expected {
        match got.get(name) {
            Some(v) if *v == value => {}
            other => wrong.push(format!("{name}: expected {value}, got {other:?}")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\nall metrics: {got:#?}");
    // Nothing else was counted as an outcome (no conflicts, no errors, no retries).
    let outcomes: Vec<&String> = got
        .keys()
        .filter(|k| {
            k.contains("outcome=conflict")
                || k.contains("outcome=error")
                || k.contains("outcome=retry")
        })
        .collect();
    assert!(outcomes.is_empty(), "{outcomes:?}");
}
