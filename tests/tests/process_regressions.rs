//! Process-manager regressions found in review: upcasters reach the inputs
//! an instance keeps, a refusal after completion is recorded (and not sent
//! again on replay), a firing deadline is no longer "set".

use aftermath::prelude::*;
use aftermath::process::testkit::ProcessTest;
use aftermath::process::{
    CommandBus, Input, MemoryDeadlines, Outputs, ProcessManager, ProcessRunner, Route,
};
use aftermath::subscription::MemoryCheckpoints;
use aftermath::{Direction, SqliteOptions, Upcasters};
use serde::{Deserialize, Serialize};

// --- a gate that refuses to close twice -------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "gate")]
enum GateEvent {
    Opened {},
    Closed {},
}

#[derive(Default)]
struct Gate {
    closed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum GateCommand {
    Open,
    Close,
}

#[derive(Debug, thiserror::Error)]
#[error("the gate is already closed")]
struct AlreadyClosed;

impl Aggregate for Gate {
    const CATEGORY: &'static str = "gate";
    type Command = GateCommand;
    type Event = GateEvent;
    type Error = AlreadyClosed;
    fn decide(&self, c: GateCommand) -> Result<Vec<GateEvent>, AlreadyClosed> {
        match c {
            GateCommand::Close if self.closed => Err(AlreadyClosed),
            GateCommand::Close => Ok(vec![GateEvent::Closed {}]),
            GateCommand::Open => Ok(vec![GateEvent::Opened {}]),
        }
    }
    fn apply(&mut self, e: &GateEvent) {
        self.closed = matches!(e, GateEvent::Closed {});
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "shift")]
enum ShiftEvent {
    Ended { shift: String },
}

/// Closes the gate when a shift ends, and is done at once.
struct Closing;

impl ProcessManager for Closing {
    const NAME: &'static str = "closing";
    type Input = ShiftEvent;
    type State = ();
    fn route(&self, e: &Recorded<ShiftEvent>) -> Route {
        let ShiftEvent::Ended { shift } = &e.event;
        Route::Start(shift.clone())
    }
    fn apply(&self, _: &mut (), _: &Input<ShiftEvent>) {}
    fn handle(&self, _: &(), input: &Input<ShiftEvent>, out: &mut Outputs) {
        if input.event().is_some() {
            out.send::<Gate>("main", GateCommand::Close);
            out.complete();
        }
    }
}

#[tokio::test]
async fn refusal_after_completion_is_recorded_and_not_sent_again() {
    let store = MemoryStore::new();
    let gates = Repository::<Gate, _>::new(store.clone());
    gates.execute("main", GateCommand::Close).await.unwrap();
    store
        .append(
            "shift-1",
            ExpectedVersion::Any,
            vec![
                aftermath::EventData::fresh(&ShiftEvent::Ended {
                    shift: "s-1".into(),
                })
                .unwrap(),
            ],
        )
        .await
        .unwrap();
    let runner = |checkpoints| {
        ProcessRunner::new(
            Closing,
            store.clone(),
            CommandBus::new().register(Repository::<Gate, _>::new(store.clone())),
            MemoryDeadlines::new(),
            checkpoints,
        )
    };
    let first = runner(MemoryCheckpoints::new());
    first.catch_up().await.unwrap();
    first.catch_up().await.unwrap();
    let inst = first.instance("s-1").await.unwrap();
    assert!(inst.completed);
    let stream = store
        .read_stream(&inst.stream(), 1, Direction::Forward, 100)
        .await
        .unwrap();
    let last = stream.last().unwrap();
    assert_eq!(last.event_type, "aftermath.process.Received");
    assert!(
        String::from_utf8_lossy(&last.payload).contains("the gate is already closed"),
        "{}",
        String::from_utf8_lossy(&last.payload)
    );
    // The gate opens; a replay from the origin must not close it again.
    gates.execute("main", GateCommand::Open).await.unwrap();
    let replay = runner(MemoryCheckpoints::new());
    replay.catch_up().await.unwrap();
    replay.catch_up().await.unwrap();
    assert!(!gates.load("main").await.unwrap().state.closed);
    assert_eq!(
        store.stream_version(&inst.stream()).await.unwrap(),
        stream.len() as u64
    );
}

// --- upcasters reach the inputs an instance keeps ---------------------------

mod v1 {
    use super::*;
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    #[event(prefix = "pay")]
    pub enum Pay {
        Requested { order: String, cents: u64 },
        Settled { order: String },
    }
}

mod v2 {
    use super::*;
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    #[event(prefix = "pay")]
    pub enum Pay {
        Requested { order: String, amount: u64 },
        Settled { order: String },
    }
}

macro_rules! tally_process {
    ($name:ident, $m:ident, $field:ident) => {
        struct $name;
        impl ProcessManager for $name {
            const NAME: &'static str = "payments";
            type Input = $m::Pay;
            type State = u64;
            fn route(&self, e: &Recorded<$m::Pay>) -> Route {
                match &e.event {
                    $m::Pay::Requested { order, .. } => Route::Start(order.clone()),
                    $m::Pay::Settled { order } => Route::Continue(order.clone()),
                }
            }
            fn apply(&self, total: &mut u64, input: &Input<$m::Pay>) {
                if let Some($m::Pay::Requested { $field, .. }) = input.event() {
                    *total += $field;
                }
            }
            fn handle(&self, _: &u64, _: &Input<$m::Pay>, _: &mut Outputs) {}
        }
    };
}

tally_process!(PaymentsV1, v1, cents);
tally_process!(PaymentsV2, v2, amount);

#[tokio::test]
async fn upcasters_apply_to_inputs_kept_by_an_instance() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store
            .append(
                "pay-o1",
                ExpectedVersion::Any,
                vec![
                    aftermath::EventData::fresh(&v1::Pay::Requested {
                        order: "o1".into(),
                        cents: 250,
                    })
                    .unwrap(),
                ],
            )
            .await
            .unwrap();
        let runner = ProcessRunner::new(
            PaymentsV1,
            store.clone(),
            CommandBus::new(),
            store.clone(),
            store.clone(),
        );
        runner.catch_up().await.unwrap();
        assert_eq!(runner.instance("o1").await.unwrap().state, 250);
    }
    // v2 renamed the field; an upcaster brings old payloads along.
    let upcasters = Upcasters::new().register("pay.Requested", |mut v| {
        if let Some(cents) = v.get("cents").cloned() {
            v["amount"] = cents;
        }
        Ok(v)
    });
    let store = SqliteStore::open_with(&path, SqliteOptions::default().upcasters(upcasters))
        .await
        .unwrap();
    store
        .append(
            "pay-o1",
            ExpectedVersion::Any,
            vec![aftermath::EventData::fresh(&v2::Pay::Settled { order: "o1".into() }).unwrap()],
        )
        .await
        .unwrap();
    let runner = ProcessRunner::new(
        PaymentsV2,
        store.clone(),
        CommandBus::new(),
        store.clone(),
        store.clone(),
    );
    runner.catch_up().await.unwrap();
    let inst = runner.instance("o1").await.unwrap();
    assert_eq!(inst.state, 250);
    assert_eq!(inst.version, 2);
}

// --- a firing deadline is no longer set -------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "job")]
enum Job {
    Started { job: String },
}

/// Retries every 5 minutes, re-arming only when no retry is set.
struct Retrying;

impl ProcessManager for Retrying {
    const NAME: &'static str = "retrying";
    type Input = Job;
    type State = ();
    fn route(&self, e: &Recorded<Job>) -> Route {
        let Job::Started { job } = &e.event;
        Route::Start(job.clone())
    }
    fn apply(&self, _: &mut (), _: &Input<Job>) {}
    fn handle(&self, _: &(), _: &Input<Job>, out: &mut Outputs) {
        if !out.has_deadline("retry") {
            out.set_deadline_after("retry", chrono::Duration::minutes(5));
        }
    }
}

#[test]
fn a_firing_deadline_is_no_longer_set() {
    let mut t = ProcessTest::new(Retrying);
    let start = t.now();
    t.when(Job::Started { job: "j".into() })
        .assert_deadline_set("retry");
    let fired = t.advance(chrono::Duration::minutes(5));
    // Re-armed from its due time, and nothing cancelled.
    assert_eq!(
        fired.deadlines_set(),
        vec![("retry", start + chrono::Duration::minutes(10))]
    );
    assert!(fired.deadlines_cancelled().is_empty(), "{fired:?}");
}

// --- permanent failures park the instance with the place named, not retried forever --

#[tokio::test]
async fn unreadable_target_stream_parks_the_instance_naming_the_command() {
    let store = MemoryStore::new();
    // The gate's stream holds an event its aggregate cannot decode.
    store
        .append(
            "gate-main",
            ExpectedVersion::Any,
            vec![aftermath::EventData {
                id: uuid::Uuid::now_v7(),
                event_type: "Melted".into(),
                payload: b"{}".to_vec(),
                metadata: aftermath::Metadata::caused_by(uuid::Uuid::now_v7()),
            }],
        )
        .await
        .unwrap();
    store
        .append(
            "shift-1",
            ExpectedVersion::Any,
            vec![
                aftermath::EventData::fresh(&ShiftEvent::Ended {
                    shift: "s-1".into(),
                })
                .unwrap(),
            ],
        )
        .await
        .unwrap();
    let runner = ProcessRunner::new(
        Closing,
        store.clone(),
        CommandBus::new().register(Repository::<Gate, _>::new(store.clone())),
        MemoryDeadlines::new(),
        MemoryCheckpoints::new(),
    );
    runner.catch_up().await.unwrap();
    let started = std::time::Instant::now();
    // The runner goes on; the instance is parked, listed with the error.
    runner.catch_up().await.unwrap();
    let parked = runner.parked().await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let (instance, parking) = &parked[0];
    assert_eq!(instance, "s-1");
    assert!(parking.command.is_some() && parking.input.is_none());
    assert!(parking.error.contains("gate-main"), "{}", parking.error);
    // Not retried with backoff: a permanent error parks at once.
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "timer")]
enum Timer {
    Armed { timer: String, days: i64 },
}

/// Sets a deadline as many days ahead as the event says.
struct Timers;

impl ProcessManager for Timers {
    const NAME: &'static str = "timers";
    type Input = Timer;
    type State = ();
    fn route(&self, e: &Recorded<Timer>) -> Route {
        let Timer::Armed { timer, .. } = &e.event;
        Route::Start(timer.clone())
    }
    fn apply(&self, _: &mut (), _: &Input<Timer>) {}
    fn handle(&self, _: &(), input: &Input<Timer>, out: &mut Outputs) {
        if let Some(Timer::Armed { days, .. }) = input.event() {
            out.set_deadline_after("ring", chrono::Duration::days(*days));
        }
    }
}

#[tokio::test]
async fn a_deadline_out_of_range_parks_the_instance_naming_the_deadline() {
    let store = MemoryStore::new();
    store
        .append(
            "timer-in",
            ExpectedVersion::Any,
            vec![
                aftermath::EventData::fresh(&Timer::Armed {
                    timer: "t".into(),
                    days: 100_000_000,
                })
                .unwrap(),
            ],
        )
        .await
        .unwrap();
    let runner = ProcessRunner::new(
        Timers,
        store.clone(),
        CommandBus::new(),
        MemoryDeadlines::new(),
        MemoryCheckpoints::new(),
    );
    runner.catch_up().await.unwrap();
    let parked = runner.parked().await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let (instance, parking) = &parked[0];
    assert_eq!(instance, "t");
    assert!(parking.input.is_some());
    assert!(
        parking.error.contains("deadline `ring`"),
        "{}",
        parking.error
    );
    assert!(parking.error.contains("out of range"), "{}", parking.error);
}

#[tokio::test]
async fn a_clock_jump_wakes_a_live_runner() {
    let store = MemoryStore::new();
    let clock = aftermath::process::ManualClock::at(chrono::Utc::now());
    let runner = ProcessRunner::new(
        Timers,
        store.clone(),
        CommandBus::new(),
        MemoryDeadlines::new(),
        MemoryCheckpoints::new(),
    )
    .clock(clock.clone())
    // Polls far too rarely to find the deadline by itself.
    .options(
        aftermath::process::ProcessOptions::default()
            .deadline_poll(std::time::Duration::from_secs(3600)),
    );
    let worker = aftermath::worker::Worker::new()
        .add_subscriber(runner)
        .start()
        .expect("unique subscriber names");
    store
        .append(
            "timer-in",
            ExpectedVersion::Any,
            vec![
                aftermath::EventData::fresh(&Timer::Armed {
                    timer: "t".into(),
                    days: 1,
                })
                .unwrap(),
            ],
        )
        .await
        .unwrap();
    let fired = || async {
        let stream = store
            .read_stream("timers.process-t", 1, Direction::Forward, 100)
            .await
            .unwrap();
        stream
            .iter()
            .any(|e| String::from_utf8_lossy(&e.payload).contains("\"kind\":\"Deadline\""))
    };
    // Armed, and its deadline scheduled (the record read back).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.stream_version("timers.process-t").await.unwrap() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the input was not handled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!fired().await);
    clock.advance(chrono::Duration::days(1));
    while !fired().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock jump did not wake the runner"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    worker.shutdown().await;
}
