//! Reactors against a real local HTTP service
//! ([`aftermath_examples::effects_service`]) that deduplicates by
//! idempotency key: crashes injected at every step (in process, and a
//! SIGKILLed helper process), transient and permanent failures, parking
//! and its per-stream order, concurrency, replays, retention, and a reactor
//! inside a worker. SQLite files in temp dirs, plus the in-memory stores
//! where cheap.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aftermath::reactor::testkit::{
    Faults, FaultyCheckpoints, FaultyJournal, InjectedFault, ReactorTest, Step,
};
use aftermath::reactor::{
    Effect, EffectContext, EffectJournal, EffectState, MemoryJournal, ParkPolicy, ReactError,
    Reactor, ReactorOptions, ReactorRunner, idempotency_key,
};
use aftermath::subscription::{CheckpointStore, MemoryCheckpoints};
use aftermath::worker::{SubscriberError, SubscriberState, Worker};
use aftermath::{EventStore, MemoryStore, Position, Recorded, SqliteStore, StoredEvent};
use aftermath_examples::effects_service::EffectsService;
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::projections::{account_event, append_accounts, eventually, until};
use aftermath_tests::reactors::{
    Notifier, account_events, applied_per_stream, exactly_once, out_of_order,
};
use chrono::Utc;
use tempfile::TempDir;
use uuid::Uuid;

const NAME: &str = "notifier";
const WAIT: Duration = Duration::from_secs(30);

async fn sqlite() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .expect("open store");
    (dir, store)
}

/// A store in a fresh PostgreSQL schema (journal, checkpoints and log in
/// one), or `None` after printing SKIPPED when `AFTERMATH_PG_URL` is unset.
macro_rules! postgres_or_skip {
    ($test:literal) => {
        match aftermath_tests::postgres::fresh($test).await {
            Some(fresh) => fresh,
            None => return,
        }
    };
}

async fn service() -> EffectsService {
    EffectsService::start()
        .await
        .expect("start the effects service")
}

fn options() -> ReactorOptions {
    ReactorOptions::default()
        .retry_delay(Duration::from_millis(1), Duration::from_millis(10))
        .max_attempts(10)
        .poll_interval(Duration::from_millis(20))
}

fn find(events: &[StoredEvent], stream: &str, version: u64) -> StoredEvent {
    events
        .iter()
        .find(|e| e.stream == stream && e.version == version)
        .unwrap_or_else(|| panic!("no event {stream} v{version}"))
        .clone()
}

fn key(event: &StoredEvent) -> String {
    idempotency_key(NAME, event.id)
}

async fn entry<J: EffectJournal>(journal: &J, event: &StoredEvent) -> Effect {
    journal
        .load(NAME, &[event.id])
        .await
        .expect("load the journal")
        .remove(&event.id)
        .unwrap_or_else(|| panic!("no journal entry for {} v{}", event.stream, event.version))
}

async fn state<J: EffectJournal>(journal: &J, event: &StoredEvent) -> EffectState {
    entry(journal, event).await.state
}

/// Asserts that every event's effect is `Done`.
async fn all_done<J: EffectJournal>(journal: &J, events: &[StoredEvent]) {
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let entries = journal.load(NAME, &ids).await.expect("load the journal");
    let not_done: Vec<String> = events
        .iter()
        .filter(|e| entries.get(&e.id).map(|x| x.state) != Some(EffectState::Done))
        .map(|e| format!("{} v{}: {:?}", e.stream, e.version, entries.get(&e.id)))
        .collect();
    assert!(not_done.is_empty(), "not done: {not_done:#?}");
}

/// The checkpoint only passes journaled events (settled, or re-run from the journal).
async fn checkpoint_passes_settled_only<J: EffectJournal, C: CheckpointStore>(
    journal: &J,
    checkpoints: &C,
    events: &[StoredEvent],
) -> Position {
    let checkpoint = checkpoints
        .load_checkpoint(NAME)
        .await
        .expect("load the checkpoint")
        .unwrap_or(Position::ORIGIN);
    let passed: Vec<&StoredEvent> = events.iter().filter(|e| e.position <= checkpoint).collect();
    let ids: Vec<Uuid> = passed.iter().map(|e| e.id).collect();
    let entries = journal.load(NAME, &ids).await.expect("load the journal");
    for e in passed {
        let state = entries.get(&e.id).map(|x| x.state);
        assert!(
            // `Started`: re-run from the journal (a failed attempt waiting
            // out its backoff, then interrupted): the journal tracks it.
            state.is_some_and(|s| s.is_settled() || s == EffectState::Started),
            "checkpoint {checkpoint} passed {} v{} at {} whose effect is {state:?}",
            e.stream,
            e.version,
            e.position
        );
    }
    checkpoint
}

fn assert_exactly_once(service: &EffectsService, events: &[StoredEvent]) {
    let problems = exactly_once(service, NAME, events);
    assert!(problems.is_empty(), "not exactly once: {problems:#?}");
}

// ---------------------------------------------------------------------------
// Crashes at every step, transient and permanent failures, in one process.
// ---------------------------------------------------------------------------

/// Six injected crashes (two per step) with 15% random 503s and one event
/// failing with 400: every other effect happens exactly once, the fatal one
/// is parked with its error and holds its stream back, and after the
/// service is fixed an operator retry makes it (and the held events) happen
/// once, in order.
async fn crashes_at_every_step<S, J, C>(store: S, journal: J, checkpoints: C)
where
    S: EventStore + Clone,
    J: EffectJournal + Clone,
    C: CheckpointStore + Clone,
{
    let service = service().await;
    service.seed(7);
    service.fail_fraction(0.15);
    append_accounts(&store, 0, 60, 1, 6).await;
    let events = account_events(&store).await;
    let fatal = find(&events, "account-2", 4);
    service.fail_key(&key(&fatal));

    let faults = Faults::new()
        .fail(Step::BeforeCall, 3)
        .fail(Step::BeforeCall, 40)
        .fail(Step::AfterCall, 5)
        .fail(Step::AfterCall, 30)
        .fail(Step::BeforeCheckpoint, 2)
        .fail(Step::BeforeCheckpoint, 5);
    let runner = || {
        ReactorRunner::new(
            Notifier::new(NAME, service.addr()),
            store.clone(),
            FaultyJournal::new(journal.clone(), faults.clone()),
            FaultyCheckpoints::new(checkpoints.clone(), faults.clone()),
        )
        .options(options().batch_size(8).concurrency(4))
    };
    // Restart after each failure, as a worker would.
    let mut restarts = 0;
    loop {
        let result = runner().catch_up().await;
        checkpoint_passes_settled_only(&journal, &checkpoints, &events).await;
        match result {
            Ok(_) => break,
            Err(SubscriberError::Store { source, .. }) => {
                assert!(
                    InjectedFault::find(&source).is_some(),
                    "unexpected failure: {source}"
                );
                restarts += 1;
                assert!(restarts <= 6, "more restarts than injected faults");
            }
            Err(e) => panic!("unexpected failure: {e}"),
        }
    }
    let fired = faults.fired();
    assert_eq!(fired.len(), 6, "every planned fault fired: {fired:?}");

    // The fatal one: parked at once (one call), with its error.
    let parked = journal.parked(Some(NAME)).await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert_eq!(parked[0].event_id, fatal.id);
    assert_eq!(parked[0].state, EffectState::Parked);
    assert_eq!(parked[0].attempts, 1);
    assert!(
        parked[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("400"),
        "{:?}",
        parked[0].last_error
    );
    let fatal_calls = service
        .call_log()
        .iter()
        .filter(|c| c.key == key(&fatal))
        .count();
    assert_eq!(fatal_calls, 1, "a fatal failure is not retried");
    // It holds back the rest of its stream only.
    let held: Vec<StoredEvent> = events
        .iter()
        .filter(|e| e.stream == fatal.stream && e.version > fatal.version)
        .cloned()
        .collect();
    assert!(!held.is_empty());
    for e in &held {
        assert_eq!(state(&journal, e).await, EffectState::Blocked);
        assert_eq!(service.applied(&key(e)), 0);
    }
    let flowed: Vec<StoredEvent> = events
        .iter()
        .filter(|e| e.id != fatal.id && !held.iter().any(|h| h.id == e.id))
        .cloned()
        .collect();
    assert_exactly_once_among(&service, &flowed);
    all_done(&journal, &flowed).await;

    // A crash between the call and its Done write made the runner call again
    // with the same key: the service refused the repeat.
    for f in fired.iter().filter(|f| f.step == Step::AfterCall) {
        let e = events
            .iter()
            .find(|e| Some(e.id) == f.event_id)
            .expect("the event");
        assert!(entry(&journal, e).await.attempts >= 2);
        assert_eq!(service.applied(&key(e)), 1);
    }
    assert!(
        service.duplicates() >= 2,
        "duplicates refused: {}",
        service.duplicates()
    );

    // The operator fixes the service and retries.
    service.heal();
    assert!(journal.retry(NAME, fatal.id).await.unwrap());
    runner().catch_up().await.expect("catch up after the retry");
    assert_exactly_once(&service, &events);
    assert!(
        out_of_order(&service).is_empty(),
        "{:?}",
        out_of_order(&service)
    );
    all_done(&journal, &events).await;
    assert!(journal.parked(None).await.unwrap().is_empty());
    checkpoint_passes_settled_only(&journal, &checkpoints, &events).await;
}

/// [`exactly_once`] restricted to `events` (others may not have happened yet).
fn assert_exactly_once_among(service: &EffectsService, events: &[StoredEvent]) {
    let counts = service.applied_counts();
    let wrong: Vec<String> = events
        .iter()
        .filter(|e| counts.get(&key(e)).copied() != Some(1))
        .map(|e| format!("{} v{}: {:?}", e.stream, e.version, counts.get(&key(e))))
        .collect();
    assert!(wrong.is_empty(), "not applied exactly once: {wrong:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_every_step_sqlite() {
    let (_dir, store) = sqlite().await;
    crashes_at_every_step(store.clone(), store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_every_step_postgres() {
    let (_guard, store) = postgres_or_skip!("crashes_at_every_step");
    crashes_at_every_step(store.clone(), store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_every_step_memory() {
    crashes_at_every_step(
        MemoryStore::new(),
        MemoryJournal::new(),
        MemoryCheckpoints::new(),
    )
    .await;
}

/// The test kit, with the HTTP reactor: a crash at every write of every
/// step, redelivery of everything, and a lost journal, on memory and on
/// SQLite files. The service applied every key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testkit_crash_at_every_write() {
    let service = service().await;
    service.seed(11);
    service.fail_fraction(0.1);
    let test = ReactorTest::new(Notifier::new("kit", service.addr()))
        .events((0..8u64).map(|k| (format!("account-{}", k % 3), account_event(k, 3))))
        .options(
            ReactorOptions::default()
                .batch_size(3)
                .concurrency(2)
                .max_attempts(20)
                .retry_delay(Duration::from_millis(1), Duration::from_millis(5)),
        );

    let memory = test.run().await.expect("run on memory");
    println!("{memory}");
    memory.assert_each_effect_keyed_once();
    memory.assert_all_done();

    let dir = tempfile::tempdir().unwrap();
    let files = AtomicUsize::new(0);
    let on_sqlite = test
        .run_on(|| {
            let path = dir
                .path()
                .join(format!("kit-{}.db", files.fetch_add(1, Ordering::Relaxed)));
            async move {
                let store = SqliteStore::open(path).await?;
                Ok((store.clone(), store.clone(), store))
            }
        })
        .await
        .expect("run on SQLite");
    println!("{on_sqlite}");
    on_sqlite.assert_each_effect_keyed_once();
    on_sqlite.assert_all_done();

    for report in [&memory, &on_sqlite] {
        // Every write of every step was a crash point.
        for (i, step) in Step::ALL.into_iter().enumerate() {
            let writes = report.scenarios[0].writes[i];
            let crashes = report
                .scenarios
                .iter()
                .filter(|s| matches!(s.scenario, aftermath::reactor::testkit::Scenario::Crash { step: t, .. } if t == step))
                .count();
            assert_eq!(crashes, writes, "one crash scenario per write {step}");
            assert!(writes >= if step == Step::BeforeCheckpoint { 3 } else { 8 });
        }
        // Crashes after the call, and the lost journal, re-sent keys.
        assert!(report.repeated_calls() > 0);
    }
    // The receiver applied each key once, whatever the runner re-sent.
    let counts = service.applied_counts();
    assert!(counts.values().all(|n| *n == 1));
    assert_eq!(
        counts.len(),
        memory.distinct_keys() + on_sqlite.distinct_keys()
    );
    assert!(service.duplicates() > 0);
}

// ---------------------------------------------------------------------------
// A helper process, SIGKILLed at random moments.
// ---------------------------------------------------------------------------

fn random_below(n: u64) -> u64 {
    (Uuid::new_v4().as_u128() % u128::from(n.max(1))) as u64
}

/// Waits for `child` to exit, up to `timeout`.
async fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the helper") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the helper did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A reactor process on a SQLite file is SIGKILLed five times while a call
/// is in flight (after a random amount of progress), then run to the end:
/// every event's effect was applied exactly once at the service (per key and
/// per event), in per-stream order, and a call cut off by a kill was sent
/// again with the same key and refused as a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_process_applies_each_effect_once() {
    let (dir, store) = sqlite().await;
    append_accounts(&store, 0, 240, 1, 12).await;
    let events = account_events(&store).await;
    let service = service().await;
    service.latency(Duration::from_millis(15));
    service.seed(3);
    service.fail_fraction(0.05);
    let db = dir.path().join("events.db");
    let helper = env!("CARGO_BIN_EXE_reactor_helper");
    let args = |cmd: &mut Command| {
        cmd.arg("run")
            .arg(&db)
            .arg(service.addr().to_string())
            .arg(NAME)
            .arg("4")
            .arg("16");
    };

    let mut kills = 0;
    for _ in 0..5 {
        let mut cmd = Command::new(helper);
        args(&mut cmd);
        let mut child = cmd.stdout(Stdio::null()).spawn().expect("spawn the helper");
        let target = service.applied_counts().len() + 10 + random_below(30) as usize;
        let deadline = Instant::now() + WAIT;
        let exited = loop {
            if child.try_wait().expect("poll the helper").is_some() {
                break true;
            }
            if service.applied_counts().len() >= target && service.in_flight() > 0 {
                break false;
            }
            assert!(Instant::now() < deadline, "the helper made no progress");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        if exited {
            break;
        }
        child.kill().expect("SIGKILL the helper");
        child.wait().expect("reap the helper");
        kills += 1;
    }
    assert!(kills >= 3, "only {kills} kills landed before the end");
    let applied_before_last = service.applied_counts().len();
    assert!(
        applied_before_last < events.len(),
        "the kills landed mid-way"
    );

    let mut cmd = Command::new(helper);
    args(&mut cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the helper");
    let status = wait_exit(&mut child, Duration::from_secs(120)).await;
    assert!(status.success(), "the last run failed: {status}");
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains("CAUGHT_UP"), "{out}");

    assert_exactly_once(&service, &events);
    assert!(
        out_of_order(&service).is_empty(),
        "{:?}",
        out_of_order(&service)
    );
    all_done(&store, &events).await;
    println!(
        "{kills} kills; {} calls for {} events, {} repeats refused, {} injected 503s",
        service.calls(),
        events.len(),
        service.duplicates(),
        service.faults()
    );
    assert!(
        service.duplicates() >= 1,
        "a call cut off by a kill is sent again with the same key"
    );
}

// ---------------------------------------------------------------------------
// Parking: sequence-aware dead letters.
// ---------------------------------------------------------------------------

fn notifier_runner<S>(
    store: &S,
    service: &EffectsService,
    options: ReactorOptions,
) -> ReactorRunner<Notifier, S, S, S>
where
    S: EventStore + EffectJournal + CheckpointStore + Clone,
{
    ReactorRunner::new(
        Notifier::new(NAME, service.addr()),
        store.clone(),
        store.clone(),
        store.clone(),
    )
    .options(options)
}

/// A parked event holds back the later events of its stream only; it is
/// listed with its error; later events of the stream keep being held; a
/// retry that fails again parks it again; a successful retry releases the
/// held events, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_event_holds_its_stream_only_until_retried() {
    let (_dir, store) = sqlite().await;
    parked_event_holds_its_stream(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_event_holds_its_stream_only_until_retried_postgres() {
    let (_guard, store) = postgres_or_skip!("parked_event_holds_its_stream_only_until_retried");
    parked_event_holds_its_stream(store).await;
}

async fn parked_event_holds_its_stream<S>(store: S)
where
    S: EventStore + EffectJournal + CheckpointStore + Clone,
{
    let service = service().await;
    append_accounts(&store, 0, 15, 1, 3).await;
    let events = account_events(&store).await;
    let poison = find(&events, "account-0", 2);
    service.fail_key(&key(&poison));
    let runner = notifier_runner(&store, &service, options());
    runner.catch_up().await.unwrap();

    let streams = applied_per_stream(&service);
    assert_eq!(streams["account-0"], [1]);
    assert_eq!(streams["account-1"], [1, 2, 3, 4, 5]);
    assert_eq!(streams["account-2"], [1, 2, 3, 4, 5]);
    let parked = store.parked(Some(NAME)).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event_id, poison.id);
    assert_eq!(
        (parked[0].stream.as_str(), parked[0].position),
        ("account-0", poison.position)
    );
    assert!(
        parked[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("HTTP 400"),
        "{:?}",
        parked[0].last_error
    );
    assert_eq!(store.parked(None).await.unwrap(), parked);
    for v in 3..=5 {
        assert_eq!(
            state(&store, &find(&events, "account-0", v)).await,
            EffectState::Blocked
        );
    }
    let held = store.held(NAME).await.unwrap();
    assert_eq!(held.len(), 4, "the parked event and the three behind it");

    // Later events: held in account-0, flowing elsewhere.
    append_accounts(&store, 15, 3, 1, 3).await;
    let events = account_events(&store).await;
    runner.catch_up().await.unwrap();
    assert_eq!(
        state(&store, &find(&events, "account-0", 6)).await,
        EffectState::Blocked
    );
    assert_eq!(
        applied_per_stream(&service)["account-1"],
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(applied_per_stream(&service)["account-0"], [1]);

    // A retry while the service still refuses: parked again, still holding.
    assert!(store.retry(NAME, poison.id).await.unwrap());
    assert!(
        !store.retry(NAME, poison.id).await.unwrap(),
        "already requested"
    );
    runner.catch_up().await.unwrap();
    assert_eq!(state(&store, &poison).await, EffectState::Parked);
    assert_eq!(
        service
            .call_log()
            .iter()
            .filter(|c| c.key == key(&poison))
            .count(),
        2
    );
    assert_eq!(applied_per_stream(&service)["account-0"], [1]);

    // Fixed: the retry releases the held events in order.
    service.heal_key(&key(&poison));
    assert!(store.retry(NAME, poison.id).await.unwrap());
    runner.catch_up().await.unwrap();
    assert_eq!(
        applied_per_stream(&service)["account-0"],
        [1, 2, 3, 4, 5, 6]
    );
    assert_exactly_once(&service, &events);
    all_done(&store, &events).await;
    assert!(store.parked(None).await.unwrap().is_empty());
    assert!(store.held(NAME).await.unwrap().is_empty());
    let retried = entry(&store, &poison).await;
    assert_eq!(
        retried.attempts, 1,
        "an operator retry starts a fresh round of attempts"
    );
}

/// Skipping a parked event releases the events held behind it; the skipped
/// effect never happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_releases_held_events() {
    let (_dir, store) = sqlite().await;
    skip_releases_held(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_releases_held_events_postgres() {
    let (_guard, store) = postgres_or_skip!("skip_releases_held_events");
    skip_releases_held(store).await;
}

async fn skip_releases_held<S>(store: S)
where
    S: EventStore + EffectJournal + CheckpointStore + Clone,
{
    let service = service().await;
    append_accounts(&store, 0, 15, 1, 3).await;
    let events = account_events(&store).await;
    let poison = find(&events, "account-1", 3);
    service.fail_key(&key(&poison));
    let runner = notifier_runner(&store, &service, options());
    runner.catch_up().await.unwrap();
    assert_eq!(applied_per_stream(&service)["account-1"], [1, 2]);

    assert!(store.skip(NAME, poison.id).await.unwrap());
    assert!(
        !store.skip(NAME, poison.id).await.unwrap(),
        "no longer parked"
    );
    assert!(
        !store.retry(NAME, poison.id).await.unwrap(),
        "a skipped effect cannot be retried"
    );
    runner.catch_up().await.unwrap();
    assert_eq!(applied_per_stream(&service)["account-1"], [1, 2, 4, 5]);
    assert_eq!(state(&store, &poison).await, EffectState::Skipped);
    assert_eq!(service.applied(&key(&poison)), 0);
    let others: Vec<StoredEvent> = events
        .iter()
        .filter(|e| e.id != poison.id)
        .cloned()
        .collect();
    assert_exactly_once_among(&service, &others);
    all_done(&store, &others).await;
    assert!(store.held(NAME).await.unwrap().is_empty());

    // A reset checkpoint does not bring it back.
    CheckpointStore::save(&store, NAME, None, Position::ORIGIN, None)
        .await
        .unwrap();
    runner.catch_up().await.unwrap();
    assert_eq!(service.applied(&key(&poison)), 0);
}

/// `ParkPolicy::Continue` parks without holding the stream; `retry_all`
/// retries every parked effect of the reactor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_policy_does_not_hold_and_retry_all() {
    let (store, journal, checkpoints) = (
        MemoryStore::new(),
        MemoryJournal::new(),
        MemoryCheckpoints::new(),
    );
    let service = service().await;
    append_accounts(&store, 0, 15, 1, 3).await;
    let events = account_events(&store).await;
    let poisons = [find(&events, "account-0", 2), find(&events, "account-1", 4)];
    for p in &poisons {
        service.fail_key(&key(p));
    }
    let runner = ReactorRunner::new(
        Notifier::new(NAME, service.addr()),
        store.clone(),
        journal.clone(),
        checkpoints.clone(),
    )
    .options(options().park_policy(ParkPolicy::Continue));
    runner.catch_up().await.unwrap();
    let streams = applied_per_stream(&service);
    assert_eq!(streams["account-0"], [1, 3, 4, 5]);
    assert_eq!(streams["account-1"], [1, 2, 3, 5]);
    assert_eq!(streams["account-2"], [1, 2, 3, 4, 5]);
    assert_eq!(journal.parked(Some(NAME)).await.unwrap().len(), 2);
    assert!(
        journal
            .held(NAME)
            .await
            .unwrap()
            .iter()
            .all(|e| e.state == EffectState::Parked),
        "nothing blocked"
    );

    service.heal();
    assert_eq!(journal.retry_all(NAME).await.unwrap(), 2);
    assert_eq!(journal.retry_all("another-reactor").await.unwrap(), 0);
    runner.catch_up().await.unwrap();
    assert_exactly_once(&service, &events);
    all_done(&journal, &events).await;
}

/// A transient failure is retried with exponential backoff and jitter
/// (delays within [d, 1.25 d] plus scheduling slack) up to max attempts,
/// then parked; a fatal one is parked at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_back_off_then_park() {
    let (store, journal, checkpoints) = (
        MemoryStore::new(),
        MemoryJournal::new(),
        MemoryCheckpoints::new(),
    );
    let service = service().await;
    append_accounts(&store, 0, 1, 1, 1).await;
    let events = account_events(&store).await;
    service.fail_next(1_000);
    let first = Duration::from_millis(100);
    let runner = ReactorRunner::new(
        Notifier::new(NAME, service.addr()),
        store.clone(),
        journal.clone(),
        checkpoints.clone(),
    )
    .options(
        options()
            .max_attempts(4)
            .retry_delay(first, Duration::from_secs(1)),
    );
    runner.catch_up().await.unwrap();

    let parked = entry(&journal, &events[0]).await;
    assert_eq!(parked.state, EffectState::Parked);
    assert_eq!(parked.attempts, 4);
    let error = parked.last_error.unwrap();
    assert!(
        error.contains("gave up after 4 attempts") && error.contains("503"),
        "{error}"
    );
    let calls = service.call_log();
    assert_eq!(calls.len(), 4);
    assert!(
        calls
            .iter()
            .all(|c| c.status == 503 && c.key == key(&events[0]))
    );
    for (i, pair) in calls.windows(2).enumerate() {
        let gap = pair[1].at - pair[0].at;
        let base = first * (1 << i);
        assert!(
            gap >= base && gap <= base.mul_f64(1.25) + Duration::from_millis(100),
            "delay before attempt {}: {gap:?}, expected {base:?} to {:?}",
            i + 2,
            base.mul_f64(1.25)
        );
    }

    service.fail_next(0);
    assert!(journal.retry(NAME, events[0].id).await.unwrap());
    runner.catch_up().await.unwrap();
    assert_exactly_once(&service, &events);
    assert_eq!(entry(&journal, &events[0]).await.attempts, 1);
}

// ---------------------------------------------------------------------------
// Concurrency, replays, locks, retention.
// ---------------------------------------------------------------------------

/// With concurrency 16 over 48 streams, effects of one stream arrive in
/// order while different streams' calls overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_keep_per_stream_order() {
    let (_dir, store) = sqlite().await;
    let service = service().await;
    service.latency(Duration::from_millis(3));
    append_accounts(&store, 0, 480, 1, 48).await;
    let events = account_events(&store).await;
    // A call that timed out would be sent again while the first is still in
    // the service, so no timeouts here.
    let runner = ReactorRunner::new(
        Notifier::new(NAME, service.addr()).timeout(Duration::from_secs(60)),
        store.clone(),
        store.clone(),
        store.clone(),
    )
    .options(options().concurrency(16).batch_size(120));
    runner.catch_up().await.unwrap();
    assert_exactly_once(&service, &events);
    assert!(
        out_of_order(&service).is_empty(),
        "{:?}",
        out_of_order(&service)
    );
    let overlap = service.max_in_flight();
    println!("at most {overlap} calls in flight");
    assert!(
        overlap > 1 && overlap <= 16,
        "{overlap} calls in flight at most"
    );
    all_done(&store, &events).await;
}

/// Resetting the checkpoint to the origin never re-runs a done effect (nor
/// a parked one).
async fn checkpoint_reset_never_reruns<S, J, C>(store: S, journal: J, checkpoints: C)
where
    S: EventStore + Clone,
    J: EffectJournal + Clone,
    C: CheckpointStore + Clone,
{
    let service = service().await;
    append_accounts(&store, 0, 30, 1, 4).await;
    let events = account_events(&store).await;
    let poison = find(&events, "account-3", 7);
    service.fail_key(&key(&poison));
    let runner = ReactorRunner::new(
        Notifier::new(NAME, service.addr()),
        store.clone(),
        journal.clone(),
        checkpoints.clone(),
    )
    .options(options().batch_size(7).concurrency(3));
    runner.catch_up().await.unwrap();
    let calls = service.calls();
    assert_eq!(calls, 30);
    for _ in 0..2 {
        checkpoints
            .save(NAME, None, Position::ORIGIN, None)
            .await
            .unwrap();
        runner.catch_up().await.unwrap();
        assert_eq!(service.calls(), calls, "a replay re-ran an effect");
    }
    assert_eq!(state(&journal, &poison).await, EffectState::Parked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_reset_never_reruns_sqlite() {
    let (_dir, store) = sqlite().await;
    checkpoint_reset_never_reruns(store.clone(), store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_reset_never_reruns_postgres() {
    let (_guard, store) = postgres_or_skip!("checkpoint_reset_never_reruns");
    checkpoint_reset_never_reruns(store.clone(), store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_reset_never_reruns_memory() {
    checkpoint_reset_never_reruns(
        MemoryStore::new(),
        MemoryJournal::new(),
        MemoryCheckpoints::new(),
    )
    .await;
}

/// While the external call runs, the runner holds no database transaction
/// or lock: another connection takes SQLite's write lock at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lock_is_held_during_the_call() {
    let (dir, store) = sqlite().await;
    let service = service().await;
    service.latency(Duration::from_millis(1500));
    append_accounts(&store, 0, 1, 1, 1).await;
    let runner = ReactorRunner::new(
        Notifier::new(NAME, service.addr()).timeout(Duration::from_secs(30)),
        store.clone(),
        store.clone(),
        store.clone(),
    )
    .options(options());
    let task = tokio::spawn(async move {
        runner.catch_up().await.unwrap();
        runner
    });
    until("a call in flight", WAIT, || {
        (service.in_flight() == 1).then_some(())
    })
    .await;

    // Another connection takes the write lock without waiting.
    let path = dir.path().join("events.db");
    let took = tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(Duration::ZERO).unwrap();
        let start = Instant::now();
        conn.execute_batch("BEGIN IMMEDIATE; CREATE TABLE probe (x INTEGER); COMMIT;")
            .expect("the write lock is free during the call");
        start.elapsed()
    })
    .await
    .unwrap();
    // And the store's own writer is free too.
    append_accounts(&store, 1, 1, 1, 1).await;
    assert_eq!(
        service.in_flight(),
        1,
        "both writes happened during the call"
    );
    println!("another connection took the write lock in {took:?}");

    let runner = task.await.unwrap();
    runner.catch_up().await.unwrap();
    let events = account_events(&store).await;
    assert_exactly_once(&service, &events);
    all_done(&store, &events).await;
}

/// `cleanup` deletes one reactor's done and skipped entries changed before
/// the cut-off and at or before the position bound, and nothing else.
async fn cleanup_removes_old_finished_only<J: EffectJournal>(journal: J) {
    let old = Utc::now() - chrono::Duration::days(30);
    let cutoff = Utc::now() - chrono::Duration::days(7);
    let recent = Utc::now() - chrono::Duration::days(1);
    let states = [
        EffectState::Done,
        EffectState::Skipped,
        EffectState::Parked,
        EffectState::Blocked,
        EffectState::Started,
        EffectState::Failed,
        EffectState::RetryRequested,
    ];
    let mut entries = Vec::new();
    for (i, state) in states.iter().enumerate() {
        for (j, at) in [old, recent].into_iter().enumerate() {
            let effect = Effect {
                reactor: NAME.to_owned(),
                event_id: Uuid::now_v7(),
                position: Position((i * 2 + j) as u64 + 1),
                stream: format!("s-{i}"),
                event_type: "account.Deposited".into(),
                state: *state,
                attempts: 1,
                last_error: None,
                created_at: at,
                updated_at: at,
            };
            journal.record(&effect, None).await.unwrap();
            entries.push(effect);
        }
    }
    // Another reactor's old finished entry, at the first position.
    let other = Effect {
        reactor: "other".to_owned(),
        event_id: Uuid::now_v7(),
        ..entries[0].clone()
    };
    journal.record(&other, None).await.unwrap();
    // Done-old is at position 1, skipped-old at 3: the bound keeps the latter.
    assert_eq!(journal.cleanup(NAME, cutoff, Position(2)).await.unwrap(), 1);
    assert_eq!(
        journal
            .cleanup(NAME, cutoff, Position(u64::MAX))
            .await
            .unwrap(),
        1
    );
    let ids: Vec<Uuid> = entries.iter().map(|e| e.event_id).collect();
    let left = journal.load(NAME, &ids).await.unwrap();
    for e in &entries {
        let removed =
            matches!(e.state, EffectState::Done | EffectState::Skipped) && e.updated_at == old;
        assert_eq!(
            left.contains_key(&e.event_id),
            !removed,
            "{:?} at {}",
            e.state,
            e.updated_at
        );
    }
    assert_eq!(
        journal
            .cleanup(NAME, cutoff, Position(u64::MAX))
            .await
            .unwrap(),
        0
    );
    let others = journal.load("other", &[other.event_id]).await.unwrap();
    assert!(
        others.contains_key(&other.event_id),
        "another reactor's entry was cleaned up"
    );
}

/// A reactor split into 2 partitions handles every event and its journal is
/// cleaned up; then it is split into 3. The new partitions start without
/// checkpoints, but after the cleanup mark: no effect runs again, and the
/// events appended later are handled once. Without the mark they would read
/// the log from the origin and find no journal entries.
async fn partition_change_after_cleanup_never_reruns<S, J, C>(store: S, journal: J, checkpoints: C)
where
    S: EventStore + Clone,
    J: EffectJournal + Clone,
    C: CheckpointStore + Clone,
{
    let service = service().await;
    append_accounts(&store, 0, 12, 1, 3).await;
    let runners = |count: u32| {
        (0..count)
            .map(|index| {
                ReactorRunner::new(
                    Notifier::new(NAME, service.addr()),
                    store.clone(),
                    journal.clone(),
                    checkpoints.clone(),
                )
                .options(options().batch_size(5))
                .partition(index, count)
            })
            .collect::<Vec<_>>()
    };
    let old = runners(2);
    for runner in &old {
        runner.catch_up().await.unwrap();
    }
    let first = account_events(&store).await;
    assert_eq!(service.calls(), first.len() as u64);
    let cleaned = old[1]
        .cleanup(Utc::now() + chrono::Duration::days(1))
        .await
        .unwrap();
    assert_eq!(
        cleaned as usize,
        first.len(),
        "every finished entry is cleaned up"
    );
    // Both partitions passed every event (a checkpoint may pass the last
    // event, up to the head it read), and the mark is their minimum.
    let mark = checkpoints
        .load_checkpoint("notifier#cleaned")
        .await
        .unwrap();
    let last = first.iter().map(|e| e.position).max().unwrap();
    assert!(
        mark.is_some_and(|m| m >= last),
        "cleanup mark {mark:?} below the last event {last}"
    );
    append_accounts(&store, 12, 4, 1, 2).await;
    for runner in &runners(3) {
        runner.catch_up().await.unwrap();
    }
    let all = account_events(&store).await;
    assert_eq!(
        service.calls(),
        all.len() as u64,
        "an effect ran again after the partition count changed"
    );
    assert_exactly_once(&service, &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_change_after_cleanup_never_reruns_sqlite() {
    let (_dir, store) = sqlite().await;
    partition_change_after_cleanup_never_reruns(store.clone(), store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_change_after_cleanup_never_reruns_postgres() {
    let (_guard, store) = postgres_or_skip!("partition_change_after_cleanup_never_reruns");
    partition_change_after_cleanup_never_reruns(store.clone(), store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_change_after_cleanup_never_reruns_memory() {
    partition_change_after_cleanup_never_reruns(
        MemoryStore::new(),
        MemoryJournal::new(),
        MemoryCheckpoints::new(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_old_finished_only_sqlite() {
    let (_dir, store) = sqlite().await;
    cleanup_removes_old_finished_only(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_old_finished_only_postgres() {
    let (_guard, store) = postgres_or_skip!("cleanup_removes_old_finished_only");
    cleanup_removes_old_finished_only(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_old_finished_only_memory() {
    cleanup_removes_old_finished_only(MemoryJournal::new()).await;
}

/// `effects_for` lists every reactor's entries of the given events, by
/// position then reactor name, whatever the order (and repeats) of the ids,
/// also for more ids than one query takes.
async fn effects_for_lists_every_reactor<J: EffectJournal>(journal: J) {
    // Whole seconds: every journal stores microseconds.
    let at = chrono::DateTime::from_timestamp(Utc::now().timestamp() - 3600, 0).unwrap();
    let entry = |reactor: &str, event_id: Uuid, position: u64, state: EffectState| Effect {
        reactor: reactor.to_owned(),
        event_id,
        position: Position(position),
        stream: format!("s-{}", position % 3),
        event_type: "account.Deposited".into(),
        state,
        attempts: 1,
        last_error: (state == EffectState::Parked).then(|| "refused".to_owned()),
        created_at: at,
        updated_at: at,
    };
    // Positions do not follow the ids' order; one event per reactor subset.
    let events: Vec<(Uuid, u64)> = [40u64, 10, 30, 20, 50]
        .into_iter()
        .map(|p| (Uuid::now_v7(), p))
        .collect();
    let mut recorded = Vec::new();
    for (i, (id, position)) in events.iter().enumerate() {
        let reactors: &[&str] = match i % 3 {
            0 => &["notifier", "billing", "Audit"],
            1 => &["notifier"],
            _ => &["billing", "notifier"],
        };
        for (k, reactor) in reactors.iter().enumerate() {
            let state = [EffectState::Done, EffectState::Parked, EffectState::Started][k % 3];
            let effect = entry(reactor, *id, *position, state);
            journal.record(&effect, None).await.unwrap();
            recorded.push(effect);
        }
    }
    // An event no reactor has seen, and one not asked for.
    let unseen = Uuid::now_v7();
    let other = entry("notifier", Uuid::now_v7(), 25, EffectState::Done);
    journal.record(&other, None).await.unwrap();

    let want = |ids: &[Uuid]| {
        let mut want: Vec<Effect> = recorded
            .iter()
            .filter(|e| ids.contains(&e.event_id))
            .cloned()
            .collect();
        want.sort_by(|a, b| (a.position, &a.reactor).cmp(&(b.position, &b.reactor)));
        want
    };
    let asked = [events[3].0, events[0].0, unseen, events[3].0, events[1].0];
    let got = journal.effects_for(&asked).await.unwrap();
    assert_eq!(got, want(&asked));
    let reactors: Vec<(u64, &str)> = got
        .iter()
        .map(|e| (e.position.0, e.reactor.as_str()))
        .collect();
    assert_eq!(
        reactors,
        vec![
            (10, "notifier"),
            (20, "Audit"),
            (20, "billing"),
            (20, "notifier"),
            (40, "Audit"),
            (40, "billing"),
            (40, "notifier"),
        ],
        "by position, then reactor name in byte order"
    );
    assert!(journal.effects_for(&[]).await.unwrap().is_empty());
    assert!(journal.effects_for(&[unseen]).await.unwrap().is_empty());

    // Many ids (several queries' worth), the real ones at both ends and in
    // the middle.
    let all: Vec<Uuid> = events.iter().map(|(id, _)| *id).collect();
    let mut many: Vec<Uuid> = (0..12_000).map(|_| Uuid::new_v4()).collect();
    many[0] = all[4];
    many[6_001] = all[1];
    many[11_999] = all[2];
    many.push(all[0]);
    many.push(all[3]);
    let got = journal.effects_for(&many).await.unwrap();
    assert_eq!(got, want(&all));
    assert_eq!(got.len(), recorded.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_for_lists_every_reactor_sqlite() {
    let (_dir, store) = sqlite().await;
    effects_for_lists_every_reactor(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_for_lists_every_reactor_postgres() {
    let (_guard, store) = postgres_or_skip!("effects_for_lists_every_reactor");
    effects_for_lists_every_reactor(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_for_lists_every_reactor_memory() {
    effects_for_lists_every_reactor(MemoryJournal::new()).await;
}

// ---------------------------------------------------------------------------
// Inside a worker.
// ---------------------------------------------------------------------------

/// A reactor in a worker (with leases) is shut down gracefully mid-stream:
/// the call in flight finishes and is recorded, the checkpoint passes only
/// settled events; after a restart every effect happened once and no call
/// was ever repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_graceful_shutdown_mid_stream() {
    let (_dir, store) = sqlite().await;
    let service = service().await;
    service.latency(Duration::from_millis(2));
    append_accounts(&store, 0, 300, 1, 10).await;
    let events = account_events(&store).await;
    let start = || {
        Worker::new()
            .with_leases(store.clone(), Duration::from_secs(5))
            .add_subscriber(notifier_runner(
                &store,
                &service,
                options().concurrency(4).batch_size(50),
            ))
            .start()
            .expect("unique subscriber names")
    };

    let worker = start();
    until("100 effects applied", WAIT, || {
        (service.applied_counts().len() >= 100).then_some(())
    })
    .await;
    worker.shutdown().await;
    let applied = service.applied_counts().len();
    assert!(
        applied < events.len(),
        "stopped mid-stream ({applied} applied)"
    );
    let checkpoint = checkpoint_passes_settled_only(&store, &store, &events).await;
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let entries = EffectJournal::load(&store, NAME, &ids).await.unwrap();
    assert!(
        entries.values().all(|e| e.state == EffectState::Done),
        "a graceful stop leaves no effect half-done"
    );
    assert_eq!(
        entries.len(),
        applied,
        "every applied effect is recorded done"
    );
    println!("stopped with {applied} applied, checkpoint {checkpoint}");

    let worker = start();
    until("all effects applied", WAIT, || {
        let status = worker.status_of(NAME)?;
        (service.applied_counts().len() == events.len()
            && status.state == SubscriberState::Live
            && status.lag.events == 0)
            .then_some(())
    })
    .await;
    worker.shutdown().await;
    assert_exactly_once(&service, &events);
    assert_eq!(service.duplicates(), 0, "no call was repeated");
    assert_eq!(service.calls() as usize, events.len());
    assert!(out_of_order(&service).is_empty());
    all_done(&store, &events).await;
}

/// A running worker notices an operator's retry (by polling) and releases
/// the held events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_picks_up_operator_retry() {
    let (_dir, store) = sqlite().await;
    let service = service().await;
    append_accounts(&store, 0, 12, 1, 3).await;
    let events = account_events(&store).await;
    let poison = find(&events, "account-2", 1);
    service.fail_key(&key(&poison));
    let worker = Worker::new()
        .add_subscriber(notifier_runner(&store, &service, options()))
        .start()
        .expect("unique subscriber names");
    eventually("the poison parked", WAIT, || async {
        (store.parked(Some(NAME)).await.unwrap().len() == 1 && service.applied_counts().len() == 8)
            .then_some(())
    })
    .await;
    service.heal();
    assert!(store.retry(NAME, poison.id).await.unwrap());
    until("every effect applied", WAIT, || {
        (service.applied_counts().len() == 12).then_some(())
    })
    .await;
    worker.shutdown().await;
    assert_exactly_once(&service, &events);
    assert!(out_of_order(&service).is_empty());
}

// ---------------------------------------------------------------------------
// Figures (not a test: run on demand).
// ---------------------------------------------------------------------------

struct Noop;

#[async_trait::async_trait]
impl Reactor for Noop {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        NAME
    }
    async fn react(&self, _: &Recorded<AccountEvent>, _: &EffectContext) -> Result<(), ReactError> {
        Ok(())
    }
}

/// Throughput figures:
/// `cargo test -p aftermath-tests --test reactors throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run on demand"]
async fn throughput_figures() {
    for concurrency in [1, 16] {
        let store = MemoryStore::new();
        append_accounts(&store, 0, 5_000, 1, 100).await;
        let runner =
            ReactorRunner::new(Noop, store, MemoryJournal::new(), MemoryCheckpoints::new())
                .options(options().concurrency(concurrency).batch_size(500));
        let start = Instant::now();
        runner.catch_up().await.unwrap();
        let took = start.elapsed();
        println!(
            "no-op effect in memory, concurrency {concurrency}: 5000 events in {took:?} = {:.0} events/s",
            5_000.0 / took.as_secs_f64()
        );
    }
    for (concurrency, streams) in [(1, 100), (16, 100)] {
        let (_dir, store) = sqlite().await;
        append_accounts(&store, 0, 5_000, 1, streams).await;
        let runner = ReactorRunner::new(Noop, store.clone(), store.clone(), store.clone())
            .options(options().concurrency(concurrency).batch_size(500));
        let start = Instant::now();
        runner.catch_up().await.unwrap();
        let took = start.elapsed();
        println!(
            "no-op effect on SQLite, concurrency {concurrency}: 5000 events in {took:?} = {:.0} events/s",
            5_000.0 / took.as_secs_f64()
        );
    }
    let mut rates = Vec::new();
    for (concurrency, n) in [(1usize, 200u64), (16, 2_000)] {
        let (_dir, store) = sqlite().await;
        let service = service().await;
        service.latency(Duration::from_millis(5));
        append_accounts(&store, 0, n, 1, 64).await;
        let runner = notifier_runner(
            &store,
            &service,
            options().concurrency(concurrency).batch_size(500),
        );
        let start = Instant::now();
        runner.catch_up().await.unwrap();
        let took = start.elapsed();
        let rate = n as f64 / took.as_secs_f64();
        rates.push(rate);
        println!(
            "HTTP effect with 5 ms latency, concurrency {concurrency}: {n} events in {took:?} = {rate:.0} events/s (max {} in flight)",
            service.max_in_flight()
        );
        assert_eq!(service.applied_counts().len() as u64, n);
    }
    println!(
        "concurrency 16 / concurrency 1 = {:.1}x",
        rates[1] / rates[0]
    );
}

// ---------------------------------------------------------------------------
// Start position and journal bookkeeping.
// ---------------------------------------------------------------------------

/// A reactor that starts from `Now` handles the events appended after its
/// first start, even if it is restarted before any of them arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_now_is_remembered_across_restarts() {
    let (_dir, store) = sqlite().await;
    let service = service().await;
    append_accounts(&store, 0, 5, 1, 2).await;
    let runner = || {
        notifier_runner(
            &store,
            &service,
            options().start_from(aftermath::subscription::StartFrom::Now),
        )
    };
    runner().catch_up().await.unwrap();
    assert_eq!(
        service.calls(),
        0,
        "history before the first start is not handled"
    );
    // Restarted (a new runner) after more events were appended.
    append_accounts(&store, 5, 3, 1, 2).await;
    runner().catch_up().await.unwrap();
    let events = account_events(&store).await;
    assert_exactly_once(&service, &events[5..]);
}

/// A journal entry keeps its creation time as its state changes.
async fn entries_keep_created_at<J: EffectJournal>(journal: J) {
    let created = Utc::now() - chrono::Duration::hours(1);
    let mut effect = Effect {
        reactor: NAME.to_owned(),
        event_id: Uuid::now_v7(),
        position: Position(1),
        stream: "s".into(),
        event_type: "account.Deposited".into(),
        state: EffectState::Started,
        attempts: 1,
        last_error: None,
        created_at: created,
        updated_at: created,
    };
    journal.record(&effect, None).await.unwrap();
    effect.state = EffectState::Done;
    effect.created_at = Utc::now();
    effect.updated_at = effect.created_at;
    journal.record(&effect, None).await.unwrap();
    let stored = journal
        .load(NAME, &[effect.event_id])
        .await
        .unwrap()
        .remove(&effect.event_id)
        .unwrap();
    assert_eq!(stored.state, EffectState::Done);
    assert_eq!(
        stored.created_at.timestamp_micros(),
        created.timestamp_micros()
    );
    assert_eq!(
        stored.updated_at.timestamp_micros(),
        effect.updated_at.timestamp_micros()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_keep_created_at_sqlite() {
    let (_dir, store) = sqlite().await;
    entries_keep_created_at(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_keep_created_at_postgres() {
    let (_guard, store) = postgres_or_skip!("entries_keep_created_at");
    entries_keep_created_at(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_keep_created_at_memory() {
    entries_keep_created_at(MemoryJournal::new()).await;
}

/// Shutdown interrupts a retry backoff at once; the effect stays `Failed`
/// (the checkpoint does not pass it) and after a restart its attempts go on
/// counting, with the same key, until it happens once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_backoff_resumes_attempts() {
    let (_dir, store) = sqlite().await;
    let service = service().await;
    append_accounts(&store, 0, 1, 1, 1).await;
    let events = account_events(&store).await;
    service.fail_next(3);
    let slow = options().retry_delay(Duration::from_secs(5), Duration::from_secs(10));
    let worker = Worker::new()
        .add_subscriber(notifier_runner(&store, &service, slow))
        .start()
        .expect("unique subscriber names");
    eventually("the first attempt failed", WAIT, || async {
        (service.calls() == 1 && state(&store, &events[0]).await == EffectState::Failed)
            .then_some(())
    })
    .await;
    let stopping = Instant::now();
    worker.shutdown().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?}",
        stopping.elapsed()
    );
    let failed = entry(&store, &events[0]).await;
    assert_eq!((failed.state, failed.attempts), (EffectState::Failed, 1));
    // The checkpoint may pass the failed event: its next attempt runs
    // from the journal, so the backoff holds neither the page nor other
    // streams.
    checkpoint_passes_settled_only(&store, &store, &events).await;

    let worker = Worker::new()
        .add_subscriber(notifier_runner(&store, &service, options()))
        .start()
        .expect("unique subscriber names");
    until("the effect applied", WAIT, || {
        (service.applied(&key(&events[0])) == 1).then_some(())
    })
    .await;
    worker.shutdown().await;
    let done = entry(&store, &events[0]).await;
    assert_eq!((done.state, done.attempts), (EffectState::Done, 4));
    assert!(service.call_log().iter().all(|c| c.key == key(&events[0])));
    assert_exactly_once(&service, &events);
}

/// An event that does not decode is parked with the decode error and holds
/// its stream; skipping it releases the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_event_is_parked_with_its_error() {
    let (store, journal, checkpoints) = (
        MemoryStore::new(),
        MemoryJournal::new(),
        MemoryCheckpoints::new(),
    );
    let service = service().await;
    let bad = aftermath_tests::raw("account.Deposited", r#"{"amount":"lots"}"#);
    let bad_id = bad.id;
    store
        .append("account-0", aftermath::ExpectedVersion::Any, vec![bad])
        .await
        .unwrap();
    append_accounts(&store, 0, 4, 1, 2).await;
    let events = account_events(&store).await;
    let runner = ReactorRunner::new(
        Notifier::new(NAME, service.addr()),
        store.clone(),
        journal.clone(),
        checkpoints.clone(),
    )
    .options(options());
    runner.catch_up().await.unwrap();
    let parked = journal.parked(Some(NAME)).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event_id, bad_id);
    assert!(
        parked[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("does not decode"),
        "{:?}",
        parked[0].last_error
    );
    assert_eq!(applied_per_stream(&service).get("account-0"), None);
    assert_eq!(applied_per_stream(&service)["account-1"], [1, 2]);

    assert!(journal.skip(NAME, bad_id).await.unwrap());
    runner.catch_up().await.unwrap();
    assert_eq!(applied_per_stream(&service)["account-0"], [2, 3]);
    let good: Vec<StoredEvent> = events.into_iter().filter(|e| e.id != bad_id).collect();
    assert_exactly_once(&service, &good);
}

// ---------------------------------------------------------------------------
// The test kit itself.
// ---------------------------------------------------------------------------

/// Fails every first attempt transiently, and deposits above 90 fatally.
struct Picky;

#[async_trait::async_trait]
impl Reactor for Picky {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        "picky"
    }
    async fn react(
        &self,
        event: &Recorded<AccountEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        match event.event {
            AccountEvent::Deposited { amount } if amount > 90 => Err(ReactError::fatal("too much")),
            _ if ctx.attempt == 1 => Err(ReactError::retry("busy")),
            _ => Ok(()),
        }
    }
}

/// With retries and a fatal failure in every scenario, the kit reports the
/// parked effect (and those held behind it) without calling it a broken
/// promise; `assert_all_done` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testkit_reports_parked_effects() {
    let report = ReactorTest::new(Picky)
        .event(
            "a",
            AccountEvent::Opened {
                owner: "ann".into(),
            },
        )
        .event("a", AccountEvent::Deposited { amount: 95 })
        .event(
            "b",
            AccountEvent::Opened {
                owner: "bob".into(),
            },
        )
        .event("a", AccountEvent::Deposited { amount: 5 })
        .event("b", AccountEvent::Deposited { amount: 5 })
        .run()
        .await
        .unwrap();
    report.assert_each_effect_keyed_once();
    for s in &report.scenarios {
        assert_eq!(s.state_of(1), Some(EffectState::Parked), "{}", s.scenario);
        assert_eq!(s.state_of(3), Some(EffectState::Blocked), "{}", s.scenario);
        assert_eq!(s.state_of(4), Some(EffectState::Done), "{}", s.scenario);
        assert_eq!(s.calls_for(3).len(), 0, "held back, never called");
        let fatal = s.calls_for(1);
        assert_eq!(fatal.len(), 1, "{}: {fatal:?}", s.scenario);
    }
    let all_done = std::panic::catch_unwind(|| report.assert_all_done());
    assert!(all_done.is_err());
}

/// A journal that loses `Done` writes: the kit catches the effects that
/// run again on redelivery.
#[derive(Clone, Default)]
struct Forgetful(MemoryJournal);

#[async_trait::async_trait]
impl EffectJournal for Forgetful {
    async fn load(
        &self,
        reactor: &str,
        events: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, Effect>, aftermath::StoreError> {
        self.0.load(reactor, events).await
    }
    async fn effects_for(&self, event_ids: &[Uuid]) -> Result<Vec<Effect>, aftermath::StoreError> {
        self.0.effects_for(event_ids).await
    }
    async fn record(
        &self,
        effect: &Effect,
        lease: Option<&aftermath::subscription::Lease>,
    ) -> Result<(), aftermath::StoreError> {
        if effect.state == EffectState::Done {
            return Ok(());
        }
        self.0.record(effect, lease).await
    }
    async fn held(&self, reactor: &str) -> Result<Vec<Effect>, aftermath::StoreError> {
        self.0.held(reactor).await
    }
    async fn parked(&self, reactor: Option<&str>) -> Result<Vec<Effect>, aftermath::StoreError> {
        self.0.parked(reactor).await
    }
    async fn retry(&self, reactor: &str, event_id: Uuid) -> Result<bool, aftermath::StoreError> {
        self.0.retry(reactor, event_id).await
    }
    async fn retry_all(&self, reactor: &str) -> Result<u64, aftermath::StoreError> {
        self.0.retry_all(reactor).await
    }
    async fn skip(&self, reactor: &str, event_id: Uuid) -> Result<bool, aftermath::StoreError> {
        self.0.skip(reactor, event_id).await
    }
    async fn cleanup(
        &self,
        reactor: &str,
        before: chrono::DateTime<Utc>,
        through: Position,
    ) -> Result<u64, aftermath::StoreError> {
        self.0.cleanup(reactor, before, through).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testkit_catches_a_journal_that_forgets() {
    let test = ReactorTest::new(Noop).event(
        "a",
        AccountEvent::Opened {
            owner: "ann".into(),
        },
    );
    let report = test
        .scenario_on(
            aftermath::reactor::testkit::Scenario::Redelivery,
            (
                MemoryStore::new(),
                Forgetful::default(),
                MemoryCheckpoints::new(),
            ),
        )
        .await
        .unwrap();
    let violations = report.violations.join("\n");
    assert!(
        violations.contains("after its effect was recorded done"),
        "{violations}"
    );
    assert!(violations.contains("was left started"), "{violations}");
}
