//! Process manager metrics: the fulfillment saga whose shipping deadline
//! passes (in memory, virtual clock) fires exactly one deadline and counts
//! every command it sent by outcome. Its own binary: the recorder is
//! process-global.

use aftermath_tests::process::{MemoryBackend, fulfillment_missed_shipping_deadline};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missed_deadline_is_counted_once() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this binary");

    fulfillment_missed_shipping_deadline::<MemoryBackend>().await;

    // One snapshot: taking one drains the counters.
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        snapshot
            .iter()
            .filter(|(key, ..)| {
                let key = key.key();
                key.name() == name
                    && labels
                        .iter()
                        .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
            })
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    };
    assert_eq!(
        counter(
            "aftermath_deadlines_fired_total",
            &[("process", "fulfillment")]
        ),
        1,
        "the shipping deadline fired once"
    );
    let accepted = counter(
        "aftermath_process_commands_total",
        &[("process", "fulfillment"), ("outcome", "accepted")],
    );
    // Reserve, charge, book; after the deadline: call off, refund, release, cancel.
    assert_eq!(
        accepted, 7,
        "commands the saga sent and their targets accepted"
    );
    assert_eq!(
        counter(
            "aftermath_process_commands_total",
            &[("process", "fulfillment"), ("outcome", "parked")]
        ),
        0
    );
}
