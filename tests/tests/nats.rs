//! The NATS JetStream outbox and inbox against a real server.
//!
//! Runs when `AFTERMATH_NATS_URL` is set (e.g. `nats://127.0.0.1:4222`, a
//! server with JetStream on); without it each test prints `SKIPPED
//! nats::<test>: AFTERMATH_NATS_URL not set`, and with it set but the server
//! unreachable they fail. Every test creates a JetStream stream of its own
//! (unique name and subjects, file storage) and deletes it afterwards.
//!
//! The restart test stops and starts the local server
//! (`start-stop-daemon ... /usr/sbin/nats-server -js -sd /var/lib/nats-server`);
//! it takes [`SERVER_LOCK`] for writing, the other tests for reading, so
//! the restart never lands in another test of this binary.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aftermath::nats::{
    ContractError, InboxStore, MessageAttributes, NatsInbox, NatsOutbox, OutboxError,
    ParkedMessage, WindowPolicy, headers,
};
use aftermath::reactor::testkit::{Faults, FaultyCheckpoints, FaultyJournal, InjectedFault, Step};
use aftermath::reactor::{
    EffectContext, EffectJournal, ReactError, Reactor, ReactorOptions, ReactorRunner,
};
use aftermath::subscription::CheckpointStore;
use aftermath::trace::TraceContext;
use aftermath::worker::{Backoff, SubscriberError, SubscriberState, Worker};
use aftermath::{
    CommandMeta, EventStore, Position, Recorded, Repository, SqliteStore, StoredEvent,
};
use aftermath_tests::domain::{Account, AccountCommand, AccountEvent};
use aftermath_tests::nats::{
    AfterCommit, CommandMessage, LoseReplies, SERVER_LOCK, ServerGuard, Stored, TestStream, addr,
    connect, jetstream, map_message, publish, start_server, stop_server, stream_messages,
    stream_state, subject_of, url_or_skip,
};
use aftermath_tests::projections::{append_accounts, eventually};
use aftermath_tests::reactors::account_events;
use async_nats::jetstream::consumer::{self, PullConsumer};
use chrono::Utc;
use tempfile::TempDir;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const OUTBOX: &str = "integration-events";
const INBOX: &str = "commands";

async fn sqlite() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .expect("open store");
    (dir, store)
}

fn options() -> ReactorOptions {
    ReactorOptions::default()
        .retry_delay(Duration::from_millis(1), Duration::from_millis(20))
        .max_attempts(10)
        .poll_interval(Duration::from_millis(20))
}

fn random_below(n: u64) -> u64 {
    (Uuid::new_v4().as_u128() % u128::from(n.max(1))) as u64
}

/// Wraps a reactor and counts its calls per event.
struct Counting<R> {
    inner: R,
    calls: Arc<std::sync::Mutex<HashMap<Uuid, u32>>>,
}

#[async_trait::async_trait]
impl<R: Reactor> Reactor for Counting<R> {
    type Event = R::Event;

    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn react(
        &self,
        event: &Recorded<R::Event>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        *self.calls.lock().unwrap().entry(event.id).or_default() += 1;
        self.inner.react(event, ctx).await
    }
}

/// Checks that the stream holds each of `events` exactly once (by
/// `Nats-Msg-Id`, nothing else), each under its type's subject with the
/// outbox's headers and the stored payload, in version order per aggregate.
/// Returns the failures in words.
fn check_published(prefix: &str, events: &[StoredEvent], messages: &[Stored]) -> Vec<String> {
    let mut problems = Vec::new();
    let by_id: HashMap<Uuid, &StoredEvent> = events.iter().map(|e| (e.id, e)).collect();
    let mut seen: HashMap<Uuid, Vec<u64>> = HashMap::new();
    let mut last_version: HashMap<&str, u64> = HashMap::new();
    for m in messages {
        let Some(id) = m
            .header(headers::MSG_ID)
            .and_then(|v| v.parse::<Uuid>().ok())
        else {
            problems.push(format!("#{}: no Nats-Msg-Id event id", m.sequence));
            continue;
        };
        seen.entry(id).or_default().push(m.sequence);
        let Some(e) = by_id.get(&id) else {
            problems.push(format!("#{}: {id} is not one of the events", m.sequence));
            continue;
        };
        let expected = [
            (headers::TYPE, e.event_type.clone()),
            (headers::SOURCE, e.stream.clone()),
            (
                headers::CORRELATION_ID,
                e.metadata.correlation_id.to_string(),
            ),
            (headers::CAUSATION_ID, e.metadata.causation_id.to_string()),
        ];
        for (name, value) in expected {
            if m.header(name).as_deref() != Some(value.as_str()) {
                problems.push(format!(
                    "#{} ({} v{}): header {name} is {:?}, expected {value:?}",
                    m.sequence,
                    e.stream,
                    e.version,
                    m.header(name)
                ));
            }
        }
        let subject = format!("{prefix}.account.{}", e.event_type);
        if m.subject != subject {
            problems.push(format!(
                "#{}: subject {}, expected {subject}",
                m.sequence, m.subject
            ));
        }
        if m.payload != e.payload {
            problems.push(format!(
                "#{}: payload {:?}, stored {:?}",
                m.sequence,
                String::from_utf8_lossy(&m.payload),
                String::from_utf8_lossy(&e.payload)
            ));
        }
        if let Some(before) = last_version.insert(e.stream.as_str(), e.version)
            && before >= e.version
        {
            problems.push(format!(
                "#{}: {} v{} published after v{before}",
                m.sequence, e.stream, e.version
            ));
        }
    }
    for e in events {
        match seen.get(&e.id).map(Vec::as_slice) {
            Some([_]) => {}
            None => problems.push(format!("{} v{} ({}) missing", e.stream, e.version, e.id)),
            Some(sequences) => problems.push(format!(
                "{} v{} ({}) stored {} times: {sequences:?}",
                e.stream,
                e.version,
                e.id,
                sequences.len()
            )),
        }
    }
    problems
}

async fn journal_states(store: &SqliteStore, events: &[StoredEvent]) -> BTreeMap<String, usize> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let entries = EffectJournal::load(store, OUTBOX, &ids)
        .await
        .expect("load the journal");
    let mut states = BTreeMap::new();
    for e in events {
        let state = entries
            .get(&e.id)
            .map_or("missing", |entry| entry.state.as_str());
        *states.entry(state.to_owned()).or_default() += 1;
    }
    states
}

// ---------------------------------------------------------------------------
// Outbox
// ---------------------------------------------------------------------------

/// Events of four aggregates, executed as commands with their own
/// correlation and causation ids, go through a NatsOutbox in a
/// ReactorRunner: each published event is in the stream once, under
/// `<prefix>.account.<type>`, with `Nats-Msg-Id` = event id and the event
/// type, stream, correlation and causation headers, the stored payload, in
/// version order per aggregate. A private event type (subject `None`) is
/// recorded done without being published. A replay from the origin
/// publishes nothing again (the journal holds every effect done).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_publishes_headers_and_subjects() {
    let Some(url) = url_or_skip("outbox_publishes_headers_and_subjects") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "outbox_headers", |_| {}).await;
    let (_dir, store) = sqlite().await;

    let accounts = Repository::<Account, _>::new(store.clone());
    let conversation = Uuid::new_v4();
    for round in 0..5u64 {
        for a in 0..4 {
            let command = match round {
                0 => AccountCommand::Open {
                    owner: format!("owner {a}"),
                },
                3 => AccountCommand::Withdraw { amount: 1 },
                _ => AccountCommand::Deposit {
                    amount: 10 * round + a,
                },
            };
            let meta = CommandMeta::with_id(Uuid::new_v4())
                .correlation(conversation)
                .causation(Uuid::new_v4());
            accounts
                .execute_with(&format!("{a}"), command, meta)
                .await
                .expect("execute");
        }
    }
    let events = account_events(&store).await;
    assert_eq!(events.len(), 20);
    // Withdrawals stay private in this test.
    let public: Vec<StoredEvent> = events
        .iter()
        .filter(|e| e.event_type != "account.Withdrawn")
        .cloned()
        .collect();
    assert_eq!(public.len(), 16);

    let prefix = stream.prefix.clone();
    let outbox = NatsOutbox::new(OUTBOX, js.clone(), move |e: &Recorded<AccountEvent>| {
        (!matches!(e.event, AccountEvent::Withdrew { .. })).then(|| subject_of(&prefix, e))
    });
    let runner = ReactorRunner::new(outbox, store.clone(), store.clone(), store.clone())
        .options(options().concurrency(3).batch_size(7));
    let started = Instant::now();
    runner.catch_up().await.expect("catch up");
    let took = started.elapsed();

    let messages = stream_messages(&js, &stream.name).await;
    let problems = check_published(&stream.prefix, &public, &messages);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(messages.len(), 16);
    assert!(
        messages
            .iter()
            .all(|m| m.header(headers::CORRELATION_ID) == Some(conversation.to_string())),
        "the conversation's correlation id travels with every message"
    );
    assert_eq!(
        journal_states(&store, &events).await,
        BTreeMap::from([("done".to_owned(), 20)]),
        "every effect, private ones included, is done"
    );

    // A replay publishes nothing again.
    CheckpointStore::save(&store, OUTBOX, None, Position::ORIGIN, None)
        .await
        .expect("reset the checkpoint");
    runner.catch_up().await.expect("replay");
    let state = stream_state(&js, &stream.name).await;
    assert_eq!((state.messages, state.last_sequence), (16, 16));
    eprintln!("published 16 of 20 events (4 private) in {took:?}; a replay published nothing");
}

/// A crash after the publish and before the journal records it done (the
/// FaultyJournal fails the `Done` write, four times) makes the runner
/// publish the event again with the same `Nats-Msg-Id`; JetStream drops the
/// repeat, so the stream holds each event exactly once and no sequence
/// number was spent on a repeat. Checkpoint-save crashes publish nothing
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_republish_after_crash_is_dropped_by_jetstream() {
    let Some(url) = url_or_skip("outbox_republish_after_crash_is_dropped_by_jetstream") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "outbox_republish", |_| {}).await;
    let (_dir, store) = sqlite().await;
    append_accounts(&store, 0, 40, 1, 5).await;
    let events = account_events(&store).await;

    let faults = Faults::new()
        .fail(Step::AfterCall, 1)
        .fail(Step::AfterCall, 7)
        .fail(Step::AfterCall, 20)
        .fail(Step::AfterCall, 33)
        .fail(Step::BeforeCheckpoint, 2);
    let calls = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let runner = || {
        let prefix = stream.prefix.clone();
        ReactorRunner::new(
            Counting {
                inner: NatsOutbox::new(OUTBOX, js.clone(), move |e| Some(subject_of(&prefix, e))),
                calls: calls.clone(),
            },
            store.clone(),
            FaultyJournal::new(store.clone(), faults.clone()),
            FaultyCheckpoints::new(store.clone(), faults.clone()),
        )
        .options(options().concurrency(2).batch_size(6))
    };
    let mut restarts = 0;
    loop {
        match runner().catch_up().await {
            Ok(_) => break,
            Err(SubscriberError::Store { source, .. })
                if InjectedFault::find(&source).is_some() =>
            {
                restarts += 1;
                assert!(restarts <= 5, "more restarts than injected faults");
            }
            Err(e) => panic!("unexpected failure: {e}"),
        }
    }
    assert_eq!(faults.fired().len(), 5, "{:?}", faults.fired());

    let calls = calls.lock().unwrap().clone();
    let republished: Vec<Uuid> = calls
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    let crashed: HashSet<Uuid> = faults
        .fired()
        .iter()
        .filter(|f| f.step == Step::AfterCall)
        .filter_map(|f| f.event_id)
        .collect();
    assert_eq!(crashed.len(), 4);
    assert_eq!(
        republished.iter().copied().collect::<HashSet<_>>(),
        crashed,
        "exactly the events whose Done write failed were published twice"
    );
    assert_eq!(calls.values().sum::<u32>(), 44);

    let state = stream_state(&js, &stream.name).await;
    assert_eq!(
        (state.messages, state.first_sequence, state.last_sequence),
        (40, 1, 40),
        "JetStream dropped the four re-publishes"
    );
    let messages = stream_messages(&js, &stream.name).await;
    let problems = check_published(&stream.prefix, &events, &messages);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        journal_states(&store, &events).await,
        BTreeMap::from([("done".to_owned(), 40)])
    );

    // What the runner saw on the re-publish: JetStream acknowledged it as a duplicate.
    let again = &messages[0];
    let (duplicate, sequence) = publish(
        &js,
        &again.subject,
        &again.header(headers::MSG_ID).unwrap(),
        &again.payload,
    )
    .await;
    assert!(duplicate, "a re-publish is acknowledged as a duplicate");
    assert_eq!(sequence, again.sequence);
    assert_eq!(stream_state(&js, &stream.name).await.messages, 40);
}

/// Waits until the stream holds at least `target` messages.
async fn published_at_least(js: &async_nats::jetstream::Context, name: &str, target: u64) {
    eventually(&format!("{target} messages in {name}"), WAIT, || async {
        (stream_state(js, name).await.messages >= target).then_some(())
    })
    .await
}

/// Starts `nats_helper outbox` on `db`.
fn spawn_outbox_helper(db: &str, url: &str, prefix: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nats_helper"))
        .args(["outbox", db, url, prefix, OUTBOX, "4", "32"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nats_helper")
}

/// Panics with the helper's output if it exited on its own.
fn assert_running(child: &mut Child, what: &str) {
    if let Some(status) = child.try_wait().expect("poll the helper") {
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        panic!("the helper exited {what}: {status}\n{err}");
    }
}

/// The issue's test. A worker process running the outbox on a SQLite file
/// is SIGKILLed at random moments nine times while events keep being
/// appended, and the NATS server is stopped and started again once in the
/// middle while a worker publishes. In the end the (file-backed) JetStream
/// stream holds every event exactly once (by `Nats-Msg-Id`: none missing,
/// no duplicates), in version order per aggregate, with its headers; the
/// journal holds every effect done, none parked. Re-publishes after a kill
/// or during the outage were dropped by JetStream's duplicate window,
/// which survives the server restart (checked directly too: right after
/// the restart, the first message published again is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_sigkilled_worker_and_server_restart_publish_each_event_once() {
    let Some(url) =
        url_or_skip("outbox_sigkilled_worker_and_server_restart_publish_each_event_once")
    else {
        return;
    };
    let _exclusive = SERVER_LOCK.write().await;
    let started = Instant::now();
    let server = addr(&url);
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "outbox_kill", |_| {}).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("events.db").display().to_string();
    let store = SqliteStore::open(&db).await.expect("open store");

    const ACCOUNTS: u64 = 16;
    const PER_ROUND: u64 = 400;
    const KILLS: usize = 9;
    const RESTART_AT: usize = 4;
    let mut appended = 0;
    appended += 240;
    append_accounts(&store, 0, appended, 3, ACCOUNTS).await;
    let mut restarted = Duration::ZERO;
    // (published, appended) at each kill.
    let mut kills = Vec::new();
    for round in 0..KILLS {
        append_accounts(&store, appended, PER_ROUND, 3, ACCOUNTS).await;
        appended += PER_ROUND;
        let mut published = stream_state(&js, &stream.name).await.messages;
        let mut child = spawn_outbox_helper(&db, &url, &stream.prefix);
        if round == RESTART_AT {
            // Let it publish, then take the server away under it.
            published_at_least(&js, &stream.name, published + 20).await;
            let outage = Instant::now();
            let _guard = ServerGuard(server);
            tokio::task::spawn_blocking(move || stop_server(server))
                .await
                .unwrap();
            // Events appended during the outage wait for the server.
            append_accounts(&store, appended, PER_ROUND, 3, ACCOUNTS).await;
            appended += PER_ROUND;
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_running(&mut child, "during the outage");
            tokio::task::spawn_blocking(move || start_server(server))
                .await
                .unwrap();
            restarted = outage.elapsed();
            // JetStream answers again (our own client reconnects too).
            published = eventually("JetStream after the restart", WAIT, || async {
                let stream = js.get_stream(&stream.name).await.ok()?;
                Some(stream.get_info().await.ok()?.state.messages)
            })
            .await;
            // The duplicate window survived the restart: the first message
            // published again is dropped.
            let first = js
                .get_stream(&stream.name)
                .await
                .unwrap()
                .get_raw_message(1)
                .await
                .unwrap();
            let id = first.headers.get(headers::MSG_ID).unwrap().to_string();
            let (duplicate, sequence) = publish(&js, &first.subject, &id, &first.payload).await;
            assert!(
                duplicate && sequence == 1,
                "a re-publish after the restart is dropped"
            );
        }
        // A random moment while it publishes: after 20 to half the backlog.
        let backlog = appended - published;
        published_at_least(
            &js,
            &stream.name,
            published + 20 + random_below(backlog / 2),
        )
        .await;
        assert_running(&mut child, "before its SIGKILL");
        child.kill().expect("SIGKILL the helper");
        child.wait().expect("reap the helper");
        kills.push((stream_state(&js, &stream.name).await.messages, appended));
    }

    // A last worker finishes the job and stops gracefully.
    let events = account_events(&store).await;
    assert_eq!(events.len() as u64, appended);
    let mut child = spawn_outbox_helper(&db, &url, &stream.prefix);
    eventually("every event published", WAIT, || async {
        (stream_state(&js, &stream.name).await.messages >= appended).then_some(())
    })
    .await;
    eventually("every effect done", WAIT, || async {
        let states = journal_states(&store, &events).await;
        (states.get("done") == Some(&events.len())).then_some(())
    })
    .await;
    drop(child.stdin.take());
    let status = child.wait().expect("wait for the helper");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        status.success() && out.contains("STOPPED"),
        "{status}: {out}"
    );

    let messages = stream_messages(&js, &stream.name).await;
    let problems = check_published(&stream.prefix, &events, &messages);
    assert!(problems.is_empty(), "{problems:#?}");
    let state = stream_state(&js, &stream.name).await;
    assert_eq!(state.messages, appended);
    let mid_stream = kills
        .iter()
        .filter(|(published, appended)| published < appended)
        .count();
    assert!(
        mid_stream >= KILLS - 2,
        "most kills landed mid-stream, with events left to publish: {kills:?}"
    );
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let entries = EffectJournal::load(&store, OUTBOX, &ids).await.unwrap();
    let retried = entries.values().filter(|e| e.attempts > 1).count();
    assert!(store.parked(Some(OUTBOX)).await.unwrap().is_empty());
    eprintln!(
        "{appended} events over {ACCOUNTS} aggregates, {KILLS} SIGKILLs ({mid_stream} mid-stream; \
         published/appended at each: {kills:?}), server down for {restarted:?}; {retried} events took \
         more than one attempt; the stream holds each once, in order per aggregate; {:?} in all",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Inbox
// ---------------------------------------------------------------------------

/// A durable pull consumer with explicit acks and a short ack wait (so a
/// message that was not acknowledged comes back quickly).
async fn durable_consumer(
    js: &async_nats::jetstream::Context,
    stream: &TestStream,
    name: &str,
) -> PullConsumer {
    js.get_stream(&stream.name)
        .await
        .expect("get the stream")
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(1),
            filter_subject: stream.subject("commands.>"),
            ..Default::default()
        })
        .await
        .expect("create the consumer")
}

/// Waits until the consumer has delivered and seen acknowledged every
/// message in the stream.
async fn drained(js: &async_nats::jetstream::Context, stream: &TestStream, name: &str) {
    eventually("the consumer to be drained", WAIT, || async {
        let last = stream_state(js, &stream.name).await.last_sequence;
        let info = js
            .get_stream(&stream.name)
            .await
            .ok()?
            .consumer_info(name)
            .await
            .ok()?;
        (info.num_pending == 0
            && info.num_ack_pending == 0
            && info.ack_floor.stream_sequence == last)
            .then_some(())
    })
    .await;
}

/// The message ids recorded on the events of `account` (the inbox stores
/// each event's message id in its metadata).
async fn message_ids(store: &SqliteStore, account: &str) -> Vec<String> {
    let stream = format!("account-{account}");
    account_events(store)
        .await
        .into_iter()
        .filter(|e| e.stream == stream)
        .map(|e| {
            e.metadata
                .extra
                .get("nats-message-id")
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

fn inbox_worker<S: EventStore + Clone>(
    consumer: PullConsumer,
    store: S,
    parking: SqliteStore,
) -> aftermath::worker::RunningWorker {
    Worker::new()
        .backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        })
        .add_subscriber(NatsInbox::new(
            INBOX,
            consumer,
            Repository::<Account, _>::new(store),
            parking,
            map_message,
        ))
        .start()
        .expect("unique subscriber names")
}

/// Every message's command takes effect once, however often it arrives:
/// - re-published inside the duplicate window: JetStream drops it;
/// - re-published after the window (a stream with a 1 s window): a second
///   copy in the stream, absorbed by the command id derived from the
///   message id;
/// - redelivered because the first attempt's append committed but its reply
///   was lost (the inbox fails, the worker restarts it, nothing was acked,
///   JetStream redelivers after the ack wait): absorbed the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbox_executes_each_message_once() {
    let Some(url) = url_or_skip("inbox_executes_each_message_once") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "inbox_once", |c| {
        c.duplicate_window = Duration::from_secs(1);
    })
    .await;
    let consumer = durable_consumer(&js, &stream, INBOX).await;
    let (_dir, store) = sqlite().await;
    // The 2nd and 9th appends commit, then fail as if the reply was lost.
    let lossy = LoseReplies::new(store.clone(), [2, 9], AfterCommit::Fail);
    let worker = inbox_worker(consumer, lossy.clone(), store.clone());

    let accounts = ["a0", "a1", "a2", "a3"];
    for a in accounts {
        publish(
            &js,
            &stream.subject("commands.open"),
            &format!("open-{a}"),
            &CommandMessage::open(a).bytes(),
        )
        .await;
    }
    drained(&js, &stream, INBOX).await;
    let mut expected: HashMap<&str, u64> = HashMap::new();
    let mut jetstream_dropped = 0;
    for i in 0..20u64 {
        let account = accounts[(i % 4) as usize];
        let id = format!("deposit-{i}");
        let payload = CommandMessage::deposit(account, 100 + i).bytes();
        let subject = stream.subject("commands.deposit");
        let (duplicate, _) = publish(&js, &subject, &id, &payload).await;
        assert!(!duplicate);
        *expected.entry(account).or_default() += 100 + i;
        if i % 5 == 0 {
            // Sent twice by an impatient client, inside the window.
            let (duplicate, _) = publish(&js, &subject, &id, &payload).await;
            assert!(duplicate, "JetStream drops a repeat inside the window");
            jetstream_dropped += 1;
        }
    }
    drained(&js, &stream, INBOX).await;
    assert_eq!(
        lossy.lost().len(),
        2,
        "two appends committed and lost their reply"
    );

    // After the duplicate window, the same message ids are new to JetStream.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut republished = 0;
    for i in [3u64, 6, 11] {
        let account = accounts[(i % 4) as usize];
        let (duplicate, _) = publish(
            &js,
            &stream.subject("commands.deposit"),
            &format!("deposit-{i}"),
            &CommandMessage::deposit(account, 100 + i).bytes(),
        )
        .await;
        assert!(!duplicate, "outside the window JetStream keeps the copy");
        republished += 1;
    }
    drained(&js, &stream, INBOX).await;
    let state = stream_state(&js, &stream.name).await;
    assert_eq!(
        state.messages,
        4 + 20 + 3,
        "the late copies are in the stream"
    );

    let repository = Repository::<Account, _>::new(store.clone());
    for a in accounts {
        let loaded = repository.load(a).await.unwrap();
        assert_eq!(loaded.state.balance, expected[a], "balance of {a}");
        assert_eq!(loaded.version, 1 + 5, "{a}: opened, then five deposits");
        let ids = message_ids(&store, a).await;
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            ids.len(),
            "{a}: one event per message: {ids:?}"
        );
    }
    assert!(store.parked_messages(None).await.unwrap().is_empty());
    let status = worker.status_of(INBOX).unwrap();
    assert_eq!(status.state, SubscriberState::Live, "{status:?}");
    worker.shutdown().await;
    eprintln!(
        "24 messages: {jetstream_dropped} repeats dropped by JetStream, {republished} late copies and 2 \
         redeliveries absorbed by the command ids; each command took effect once"
    );
}

/// Messages the inbox cannot execute are parked with their raw bytes and
/// why, and acknowledged: an undecodable payload, an unknown operation, a
/// command the account rejects, and a message id reused for another
/// account (its derived command id is taken). None is redelivered after
/// the ack wait, the worker stays live, and a parked message published
/// again is acknowledged without running: the rejected withdrawal does not
/// succeed on its second delivery after the balance grew.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbox_parks_what_it_cannot_execute() {
    let Some(url) = url_or_skip("inbox_parks_what_it_cannot_execute") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "inbox_parks", |c| {
        c.duplicate_window = Duration::from_millis(500);
    })
    .await;
    let consumer = durable_consumer(&js, &stream, INBOX).await;
    let (_dir, store) = sqlite().await;
    let worker = inbox_worker(consumer, store.clone(), store.clone());
    let subject = stream.subject("commands.account");
    let send = |id: &'static str, payload: Vec<u8>| {
        let (js, subject) = (js.clone(), subject.clone());
        async move { publish(&js, &subject, id, &payload).await }
    };

    send("open", CommandMessage::open("a1").bytes()).await;
    send("deposit", CommandMessage::deposit("a1", 100).bytes()).await;
    let garbage = b"\xff\x00 not json at all".to_vec();
    send("garbage", garbage.clone()).await;
    let mut unknown = CommandMessage::deposit("a1", 1);
    unknown.op = "transfer".into();
    send("unknown-op", unknown.bytes()).await;
    send("too-much", CommandMessage::withdraw("a1", 500).bytes()).await;
    send("reused", CommandMessage::deposit("a1", 10).bytes()).await;
    drained(&js, &stream, INBOX).await;
    // After the window: the same ids again, one for another account, one
    // (the rejected withdrawal) once the balance would allow it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    send("more", CommandMessage::deposit("a1", 1000).bytes()).await;
    let (duplicate, _) = send("reused", CommandMessage::deposit("a2", 10).bytes()).await;
    assert!(!duplicate);
    let (duplicate, _) = send("too-much", CommandMessage::withdraw("a1", 500).bytes()).await;
    assert!(!duplicate);
    drained(&js, &stream, INBOX).await;

    let parked: BTreeMap<String, ParkedMessage> = store
        .parked_messages(Some(INBOX))
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.message_id.clone(), m))
        .collect();
    assert_eq!(
        parked.keys().map(String::as_str).collect::<Vec<_>>(),
        ["garbage", "reused", "too-much", "unknown-op"],
        "{parked:#?}"
    );
    assert_eq!(parked["garbage"].payload, garbage, "raw bytes kept");
    assert_eq!(parked["garbage"].subject, subject);
    assert!(parked["garbage"].error.contains("not a command message"));
    assert!(
        parked["unknown-op"]
            .error
            .contains("unknown operation `transfer`")
    );
    assert!(
        parked["too-much"]
            .error
            .contains("rejected by account `a1`")
            && parked["too-much"].error.contains("insufficient funds"),
        "{}",
        parked["too-much"].error
    );
    assert!(
        parked["reused"]
            .error
            .contains("cannot execute on account `a2`"),
        "{}",
        parked["reused"].error
    );
    assert_eq!(
        parked["reused"].payload,
        CommandMessage::deposit("a2", 10).bytes(),
        "the copy that could not run is the one parked"
    );
    let a1 = Repository::<Account, _>::new(store.clone())
        .load("a1")
        .await
        .unwrap();
    assert_eq!(a1.state.balance, 1110, "the withdrawal never ran");
    assert_eq!(a1.version, 4);
    assert_eq!(store.stream_version("account-a2").await.unwrap(), 0);

    // Acknowledged, not redelivered forever.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = js
        .get_stream(&stream.name)
        .await
        .unwrap()
        .consumer_info(INBOX)
        .await
        .unwrap();
    let last = stream_state(&js, &stream.name).await.last_sequence;
    assert_eq!(
        (
            info.num_ack_pending,
            info.num_redelivered,
            info.ack_floor.stream_sequence,
            info.delivered.consumer_sequence
        ),
        (0, 0, last, last),
        "every message delivered once and acknowledged"
    );
    assert_eq!(store.parked_messages(None).await.unwrap().len(), 4);
    let status = worker.status_of(INBOX).unwrap();
    assert_eq!(status.state, SubscriberState::Live, "{status:?}");
    assert_eq!(status.handled, last);
    worker.shutdown().await;
}

/// Starts `nats_helper inbox` on `db`, aborting after its `abort_after`th append.
fn spawn_inbox_helper(db: &str, url: &str, stream: &str, abort_after: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nats_helper"))
        .args(["inbox", db, url, stream, INBOX, &abort_after.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nats_helper")
}

/// An inbox process crashes (aborts) right after an append commits and
/// before the message is acknowledged, three times. JetStream redelivers
/// each of those messages to the next process, whose repository recognises
/// the command id: every deposit took effect exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbox_crash_between_append_and_ack() {
    let Some(url) = url_or_skip("inbox_crash_between_append_and_ack") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let started = Instant::now();
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "inbox_crash", |_| {}).await;
    durable_consumer(&js, &stream, INBOX).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("events.db").display().to_string();
    let store = SqliteStore::open(&db).await.expect("open store");
    let repository = Repository::<Account, _>::new(store.clone());
    let accounts = ["b0", "b1", "b2"];
    for a in accounts {
        repository
            .execute(a, AccountCommand::Open { owner: a.into() })
            .await
            .unwrap();
    }
    let mut expected: HashMap<&str, u64> = HashMap::new();
    for i in 0..30u64 {
        let account = accounts[(i % 3) as usize];
        publish(
            &js,
            &stream.subject("commands.deposit"),
            &format!("d-{i}"),
            &CommandMessage::deposit(account, 1 + i).bytes(),
        )
        .await;
        *expected.entry(account).or_default() += 1 + i;
    }

    let mut aborted = Vec::new();
    for abort_after in [4, 6, 5] {
        let mut child = spawn_inbox_helper(&db, &url, &stream.name, abort_after);
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the helper did not crash");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let line = out
            .lines()
            .find(|l| l.starts_with("ABORT_AFTER_APPEND"))
            .unwrap_or_else(|| panic!("{status}: {out}"));
        assert!(!status.success());
        aborted.push(line.to_owned());
    }
    let mut child = spawn_inbox_helper(&db, &url, &stream.name, 0);
    drained(&js, &stream, INBOX).await;
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    for a in accounts {
        let loaded = repository.load(a).await.unwrap();
        assert_eq!(loaded.state.balance, expected[a], "balance of {a}");
        assert_eq!(loaded.version, 1 + 10, "{a}: opened, then ten deposits");
        let mut ids = message_ids(&store, a).await;
        ids.retain(|id| !id.is_empty());
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!((ids.len(), distinct.len()), (10, 10), "{a}: {ids:?}");
    }
    assert!(store.parked_messages(None).await.unwrap().is_empty());
    eprintln!(
        "3 crashes after an append, before its ack ({aborted:?}); 30 deposits took effect once; {:?}",
        started.elapsed()
    );
}

/// Parked-message retention (SQLite; needs no server): `cleanup_parked`
/// deletes rows parked before the cut-off and nothing else; parking is
/// idempotent per (inbox, message id) and keeps the first reason.
#[tokio::test]
async fn parked_retention_removes_old_rows_only() {
    let (_dir, store) = sqlite().await;
    let now = Utc::now();
    let parked = |inbox: &str, id: &str, days: i64, error: &str| ParkedMessage {
        inbox: inbox.into(),
        message_id: id.into(),
        subject: "orders.placed".into(),
        payload: vec![0xff, 0, 1],
        error: error.into(),
        parked_at: now - chrono::Duration::days(days),
    };
    for m in [
        parked("in", "old", 10, "first"),
        parked("in", "recent", 2, "first"),
        parked("in", "new", 0, "first"),
        parked("other", "old", 30, "first"),
    ] {
        store.park(&m).await.unwrap();
    }
    // Parking again keeps the first row.
    store.park(&parked("in", "new", 0, "second")).await.unwrap();
    assert!(store.is_parked("in", "old").await.unwrap());
    assert!(!store.is_parked("in", "never").await.unwrap());
    assert!(!store.is_parked("third", "old").await.unwrap());

    let cut = now - chrono::Duration::days(5);
    assert_eq!(store.cleanup_parked(cut).await.unwrap(), 2);
    assert_eq!(store.cleanup_parked(cut).await.unwrap(), 0);
    let left = store.parked_messages(None).await.unwrap();
    assert_eq!(
        left.iter()
            .map(|m| (m.inbox.as_str(), m.message_id.as_str(), m.error.as_str()))
            .collect::<Vec<_>>(),
        [("in", "recent", "first"), ("in", "new", "first")],
        "oldest first; the second park changed nothing"
    );
    assert_eq!(left[0].payload, vec![0xff, 0, 1]);
    assert_eq!(
        left[0].parked_at.timestamp_micros(),
        (now - chrono::Duration::days(2)).timestamp_micros()
    );
    assert_eq!(store.parked_messages(Some("other")).await.unwrap(), []);
}

// ---------------------------------------------------------------------------
// The message contract, the duplicate window, dedupe beyond it
// ---------------------------------------------------------------------------

/// A durable pull consumer (explicit acks, 1 s ack wait) on `filter`.
async fn consumer_on(
    js: &async_nats::jetstream::Context,
    stream: &TestStream,
    name: &str,
    filter: &str,
) -> PullConsumer {
    js.get_stream(&stream.name)
        .await
        .expect("get the stream")
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(1),
            filter_subject: filter.to_owned(),
            ..Default::default()
        })
        .await
        .expect("create the consumer")
}

/// The receiving side of an integration: an account event published by the
/// other service becomes the same operation on this service's account of
/// the same id (`ce-source` `account-<id>`), read through the contract.
fn mirror_event(message: &async_nats::Message) -> Result<(String, AccountCommand), String> {
    use aftermath::Event;
    let attributes = MessageAttributes::from_message(message).map_err(|e| e.to_string())?;
    let id = attributes
        .source
        .strip_prefix("account-")
        .ok_or_else(|| format!("ce-source `{}` is not an account", attributes.source))?;
    let event = AccountEvent::decode(&attributes.event_type, &message.payload)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "ce-type `{}` is not an account event",
                attributes.event_type
            )
        })?;
    let command = match event {
        AccountEvent::Opened { owner } => AccountCommand::Open { owner },
        AccountEvent::Deposited { amount } => AccountCommand::Deposit { amount },
        AccountEvent::Withdrew { amount } => AccountCommand::Withdraw { amount },
    };
    Ok((id.to_owned(), command))
}

fn mirror_worker(consumer: PullConsumer, store: SqliteStore) -> aftermath::worker::RunningWorker {
    Worker::new()
        .backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        })
        .add_subscriber(NatsInbox::new(
            INBOX,
            consumer,
            Repository::<Account, _>::new(store.clone()),
            store,
            mirror_event,
        ))
        .start()
        .expect("unique subscriber names")
}

/// Publishes a copy of a stored message with its headers; `keep_msg_id`
/// false drops `Nats-Msg-Id` (as a replay tool that keeps only the
/// CloudEvents headers would). Returns JetStream's duplicate flag.
async fn republish(js: &async_nats::jetstream::Context, m: &Stored, keep_msg_id: bool) -> bool {
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in m.headers.iter() {
        let name: &str = name.as_ref();
        if !keep_msg_id && name == headers::MSG_ID {
            continue;
        }
        for value in values {
            headers.append(name, value.as_str());
        }
    }
    js.publish_with_headers(m.subject.clone(), headers, m.payload.clone().into())
        .await
        .expect("publish")
        .await
        .expect("publish ack")
        .duplicate
}

/// The contract, read by a generic CloudEvents parser: a message the
/// outbox published decodes with the `cloudevents-sdk` crate's binary-mode
/// decoder (the `ce-` headers and `content-type` rules that the NATS binding
/// shares with the HTTP one) into a valid CloudEvents 1.0 event whose id is
/// the event id (= `Nats-Msg-Id`), type the stored type, source the
/// stream, time the recorded time, data the stored JSON payload, and whose
/// extensions carry correlation, causation, stream version and the
/// `traceparent` given in the command's metadata. `MessageAttributes`
/// reads the same back, and percent-encoded values round-trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn published_message_decodes_as_a_cloudevent() {
    use cloudevents::{AttributesReader, Data, event::SpecVersion};
    let Some(url) = url_or_skip("published_message_decodes_as_a_cloudevent") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "contract", |_| {}).await;
    let (_dir, store) = sqlite().await;
    let accounts = Repository::<Account, _>::new(store.clone());
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (correlation, causation) = (Uuid::new_v4(), Uuid::new_v4());
    accounts
        .execute_with(
            "c1",
            AccountCommand::Open {
                owner: "Zoë \"Z\" 100%".into(),
            },
            CommandMeta::with_id(Uuid::new_v4())
                .correlation(correlation)
                .causation(causation)
                .extra("traceparent", traceparent),
        )
        .await
        .unwrap();
    accounts
        .execute("c1", AccountCommand::Deposit { amount: 42 })
        .await
        .unwrap();
    let events = account_events(&store).await;
    let prefix = stream.prefix.clone();
    let outbox = NatsOutbox::new(OUTBOX, js.clone(), move |e: &Recorded<AccountEvent>| {
        Some(subject_of(&prefix, e))
    });
    ReactorRunner::new(outbox, store.clone(), store.clone(), store.clone())
        .options(options())
        .catch_up()
        .await
        .unwrap();
    let messages = stream_messages(&js, &stream.name).await;
    assert_eq!(messages.len(), 2);

    for (m, e) in messages.iter().zip(&events) {
        let mut http_headers = http::HeaderMap::new();
        for (name, values) in m.headers.iter() {
            for value in values {
                http_headers.append(
                    http::HeaderName::from_bytes(AsRef::<str>::as_ref(name).as_bytes()).unwrap(),
                    http::HeaderValue::from_str(value.as_str()).unwrap(),
                );
            }
        }
        let ce = cloudevents::binding::http::to_event(&http_headers, m.payload.clone())
            .unwrap_or_else(|err| panic!("#{} is not a CloudEvent: {err}", m.sequence));
        assert_eq!(ce.specversion(), SpecVersion::V10);
        assert_eq!(ce.id(), e.id.to_string());
        assert_eq!(m.header(headers::MSG_ID), Some(e.id.to_string()));
        assert_eq!(ce.ty(), e.event_type);
        assert_eq!(ce.source().to_string(), "account-c1");
        assert_eq!(ce.time(), Some(&e.recorded_at));
        assert_eq!(ce.datacontenttype(), Some("application/json"));
        let data: serde_json::Value = match ce.data() {
            Some(Data::Json(v)) => v.clone(),
            Some(Data::Binary(b)) => serde_json::from_slice(b).unwrap(),
            Some(Data::String(s)) => serde_json::from_str(s).unwrap(),
            None => panic!("no data"),
        };
        assert_eq!(
            data,
            serde_json::from_slice::<serde_json::Value>(&e.payload).unwrap()
        );
        let ext = |name: &str| ce.extension(name).map(|v| v.to_string());
        assert_eq!(
            ext("correlationid"),
            Some(e.metadata.correlation_id.to_string())
        );
        assert_eq!(
            ext("causationid"),
            Some(e.metadata.causation_id.to_string())
        );
        assert_eq!(ext("streamversion"), Some(e.version.to_string()));
        let expected_trace = e.metadata.trace.as_ref().map(|t| t.traceparent());
        assert_eq!(ext("traceparent"), expected_trace);

        let read = MessageAttributes::from_message(&async_nats::Message {
            subject: m.subject.clone().into(),
            reply: None,
            payload: m.payload.clone().into(),
            headers: Some(m.headers.clone()),
            status: None,
            description: None,
            length: 0,
        })
        .unwrap();
        assert_eq!(read.id, e.id.to_string());
        assert_eq!(read.event_type, e.event_type);
        assert_eq!(read.source, e.stream);
        assert_eq!(read.time, Some(e.recorded_at));
        assert_eq!(read.stream_version, Some(e.version));
        assert_eq!(read.correlation_id, Some(e.metadata.correlation_id));
        assert_eq!(read.traceparent, expected_trace);
    }
    assert_eq!(events[0].metadata.correlation_id, correlation);
    assert_eq!(
        messages[0].header(headers::TRACEPARENT).as_deref(),
        Some(traceparent),
        "the first event's metadata carried the trace context"
    );
    assert_eq!(messages[1].header(headers::TRACEPARENT), None);
    let odd = "Zoë \"Z\" 100%";
    let encoded = aftermath::nats::encode_header_value(odd);
    assert_eq!(encoded, "Zo%C3%AB%20%22Z%22%20100%25");
    assert_eq!(
        aftermath::nats::decode_header_value(&encoded).as_deref(),
        Some(odd)
    );
    assert_eq!(aftermath::nats::decode_header_value("bad%zz"), None);
}

/// A message without the contract's headers is a typed error naming the
/// header and the subject.
#[test]
fn message_without_the_contract_is_a_typed_error() {
    let message = |pairs: &[(&str, &str)]| {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        async_nats::Message {
            subject: "orders.placed".into(),
            reply: None,
            payload: Vec::new().into(),
            headers: Some(h),
            status: None,
            description: None,
            length: 0,
        }
    };
    let err = MessageAttributes::from_message(&message(&[])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "message on `orders.placed` has no `ce-specversion` header"
    );
    let err = MessageAttributes::from_message(&message(&[("ce-specversion", "0.3")])).unwrap_err();
    assert!(
        matches!(
            err,
            ContractError::Invalid {
                header: "ce-specversion",
                ..
            }
        ),
        "{err}"
    );
    let err = MessageAttributes::from_message(&message(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "x"),
        ("ce-type", "order.Placed"),
        ("ce-source", "order-1"),
        ("ce-time", "yesterday"),
    ]))
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("header `ce-time` is \"yesterday\": not RFC 3339"),
        "{err}"
    );
}

/// The outbox checks at start that the stream keeps message ids for as
/// long as it may re-publish: a 1 s window against the default 10-minute
/// horizon is reported (Warn) or refused (Refuse) with the stream, the
/// window and the horizon named; a window of an hour covers it; a subject
/// no stream takes is a lookup error naming the subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_checks_the_duplicate_window_at_start() {
    let Some(url) = url_or_skip("outbox_checks_the_duplicate_window_at_start") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let short = TestStream::create(&url, &js, "window_short", |c| {
        c.duplicate_window = Duration::from_secs(1);
    })
    .await;
    let long = TestStream::create(&url, &js, "window_long", |c| {
        c.duplicate_window = Duration::from_secs(3600);
        c.max_age = Duration::from_secs(7200);
    })
    .await;
    let outbox = || NatsOutbox::new(OUTBOX, js.clone(), |_: &Recorded<AccountEvent>| None);

    let warned = outbox()
        .check_duplicate_window(&short.subject("x"))
        .await
        .expect("Warn reports, it does not refuse");
    assert_eq!(warned.stream, short.name);
    assert_eq!(warned.duplicate_window, Duration::from_secs(1));
    assert_eq!(warned.retry_horizon, Duration::from_secs(600));
    assert!(!warned.covered());

    let refused = outbox()
        .window_policy(WindowPolicy::Refuse)
        .check_duplicate_window(&short.subject("x"))
        .await
        .unwrap_err();
    assert_eq!(
        refused,
        OutboxError::WindowTooShort {
            outbox: OUTBOX.into(),
            stream: short.name.clone(),
            window: Duration::from_secs(1),
            horizon: Duration::from_secs(600),
        }
    );
    assert!(refused.to_string().contains(&short.name), "{refused}");

    let covered = outbox()
        .window_policy(WindowPolicy::Refuse)
        .check_duplicate_window(&long.subject("x"))
        .await
        .unwrap();
    assert!(covered.covered());
    // A horizon computed from the runner's options and a restart allowance.
    let horizon = NatsOutbox::<AccountEvent>::retry_horizon_of(
        &ReactorOptions::default().max_attempts(4),
        Duration::from_secs(60),
    );
    assert_eq!(horizon, Duration::from_secs(4 * (30 + 30) + 60));
    let refused = outbox()
        .retry_horizon(Duration::from_secs(7200))
        .window_policy(WindowPolicy::Refuse)
        .check_duplicate_window(&long.subject("x"))
        .await
        .unwrap_err();
    assert!(matches!(refused, OutboxError::WindowTooShort { .. }));

    let nowhere = format!("aftermath-test.nowhere.{}", Uuid::new_v4().simple());
    let lookup = outbox().check_duplicate_window(&nowhere).await.unwrap_err();
    assert!(
        matches!(&lookup, OutboxError::Lookup { subject, .. } if *subject == nowhere),
        "{lookup}"
    );
}

/// Dedupe that does not depend on the broker's window. One service's
/// outbox publishes account events into a stream whose duplicate window is
/// 1 s; the other service's inbox mirrors them. After the window, every
/// message is published again (the outbox's re-publish after a long outage,
/// simulated with the same headers), and once more without `Nats-Msg-Id`
/// (a replay that keeps the CloudEvents headers only): JetStream stores all
/// the copies, yet each event took effect once on the receiver, also after
/// the receiver restarted (a new worker on the same file). The retention:
/// an executed message id is remembered as long as the receiver's events
/// are stored; a parked one (a rejected withdrawal) as long as its parked
/// row: re-published, it is acknowledged without running, and once
/// `cleanup_parked` removed the row it is a new message again (it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbox_dedupes_after_the_duplicate_window() {
    let Some(url) = url_or_skip("inbox_dedupes_after_the_duplicate_window") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "after_window", |c| {
        c.duplicate_window = Duration::from_secs(1);
    })
    .await;
    let filter = stream.subject(">");
    let (_sender_dir, sender) = sqlite().await;
    let (_receiver_dir, receiver) = sqlite().await;
    let accounts = Repository::<Account, _>::new(sender.clone());
    for a in ["m1", "m2"] {
        accounts
            .execute(a, AccountCommand::Open { owner: a.into() })
            .await
            .unwrap();
        for amount in [10, 20, 30] {
            accounts
                .execute(a, AccountCommand::Deposit { amount })
                .await
                .unwrap();
        }
    }
    let prefix = stream.prefix.clone();
    let outbox = NatsOutbox::new(OUTBOX, js.clone(), move |e: &Recorded<AccountEvent>| {
        Some(subject_of(&prefix, e))
    });
    let runner = ReactorRunner::new(outbox, sender.clone(), sender.clone(), sender.clone())
        .options(options());
    runner.catch_up().await.unwrap();
    let consumer = consumer_on(&js, &stream, INBOX, &filter).await;
    let worker = mirror_worker(consumer, receiver.clone());
    drained(&js, &stream, INBOX).await;
    let first = stream_messages(&js, &stream.name).await;
    assert_eq!(first.len(), 8);

    tokio::time::sleep(Duration::from_millis(1300)).await;
    for m in &first {
        assert!(
            !republish(&js, m, true).await,
            "outside the window JetStream keeps the copy"
        );
    }
    drained(&js, &stream, INBOX).await;
    worker.shutdown().await;
    // The receiver restarts; the copies without Nats-Msg-Id arrive.
    let consumer = js
        .get_stream(&stream.name)
        .await
        .unwrap()
        .get_consumer(INBOX)
        .await
        .unwrap();
    let worker = mirror_worker(consumer, receiver.clone());
    for m in &first {
        assert!(!republish(&js, m, false).await);
    }
    drained(&js, &stream, INBOX).await;
    assert_eq!(
        stream_state(&js, &stream.name).await.messages,
        24,
        "three copies of each"
    );

    let mirrored = Repository::<Account, _>::new(receiver.clone());
    for a in ["m1", "m2"] {
        let loaded = mirrored.load(a).await.unwrap();
        assert_eq!((loaded.version, loaded.state.balance), (4, 60), "{a}");
        let ids = message_ids(&receiver, a).await;
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 4, "{a}: {ids:?}");
    }

    // Retention of a parked message id.
    accounts
        .execute("m1", AccountCommand::Withdraw { amount: 60 })
        .await
        .unwrap();
    // The receiver's m1 is short of 60 once the sender's withdrawal of 60
    // arrives if an extra withdrawal of 50 came first: published by hand.
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in [
        (headers::MSG_ID, "manual-withdrawal"),
        (headers::SPEC_VERSION, "1.0"),
        (headers::ID, "manual-withdrawal"),
        (headers::TYPE, "account.Withdrawn"),
        (headers::SOURCE, "account-m1"),
    ] {
        h.insert(k, v);
    }
    let manual = stream.subject("manual");
    let withdraw_50 = br#"{"amount":50}"#.to_vec();
    js.publish_with_headers(manual.clone(), h.clone(), withdraw_50.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    drained(&js, &stream, INBOX).await;
    runner.catch_up().await.unwrap();
    drained(&js, &stream, INBOX).await;
    let parked = receiver.parked_messages(Some(INBOX)).await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert!(
        parked[0].error.contains("rejected by account `m1`")
            && parked[0].error.contains("insufficient funds"),
        "{}",
        parked[0].error
    );
    let rejected_id = parked[0].message_id.clone();
    let rejected = stream_messages(&js, &stream.name)
        .await
        .into_iter()
        .find(|m| m.header(headers::MSG_ID).as_deref() == Some(rejected_id.as_str()))
        .unwrap();
    // The receiver gets the money back; the parked withdrawal, published
    // again after the window, is still not run.
    mirrored
        .execute("m1", AccountCommand::Deposit { amount: 100 })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!republish(&js, &rejected, true).await);
    drained(&js, &stream, INBOX).await;
    assert_eq!(mirrored.load("m1").await.unwrap().state.balance, 110);
    // After the parked row is cleaned up, the id is new again.
    assert_eq!(receiver.cleanup_parked(Utc::now()).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!republish(&js, &rejected, true).await);
    drained(&js, &stream, INBOX).await;
    assert_eq!(
        mirrored.load("m1").await.unwrap().state.balance,
        50,
        "once its parked row is gone, a message id is new: the withdrawal ran"
    );
    let status = worker.status_of(INBOX).unwrap();
    assert_eq!(status.state, SubscriberState::Live, "{status:?}");
    worker.shutdown().await;
}

/// A message whose command the receiving aggregate rejects is handled, not
/// retried: parked with its raw bytes, the subject and the aggregate's
/// reason, acknowledged (nothing pending, nothing redelivered after the ack
/// wait), counted as handled by a live worker, and a redelivered or
/// re-published copy is acknowledged without being decided again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbox_rejected_command_is_handled_once_and_visible() {
    let Some(url) = url_or_skip("inbox_rejected_command_is_handled_once_and_visible") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "inbox_rejected", |c| {
        c.duplicate_window = Duration::from_millis(500);
    })
    .await;
    let consumer = durable_consumer(&js, &stream, INBOX).await;
    let (_dir, store) = sqlite().await;
    let worker = inbox_worker(consumer, store.clone(), store.clone());
    let subject = stream.subject("commands.account");
    publish(&js, &subject, "open", &CommandMessage::open("r1").bytes()).await;
    let refused = CommandMessage::withdraw("r1", 5).bytes();
    publish(&js, &subject, "withdraw", &refused).await;
    drained(&js, &stream, INBOX).await;
    let parked = store.parked_messages(Some(INBOX)).await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert_eq!(
        (parked[0].message_id.as_str(), parked[0].subject.as_str()),
        ("withdraw", subject.as_str())
    );
    assert_eq!(parked[0].payload, refused, "raw bytes kept");
    assert!(
        parked[0].error.starts_with("rejected by account `r1`: ")
            && parked[0].error.contains("insufficient funds"),
        "{}",
        parked[0].error
    );
    // Past the ack wait: not redelivered.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = js
        .get_stream(&stream.name)
        .await
        .unwrap()
        .consumer_info(INBOX)
        .await
        .unwrap();
    assert_eq!((info.num_ack_pending, info.num_redelivered), (0, 0));
    // Money arrives; the same withdrawal again (after the window) is not run.
    publish(
        &js,
        &subject,
        "deposit",
        &CommandMessage::deposit("r1", 10).bytes(),
    )
    .await;
    let (duplicate, _) = publish(&js, &subject, "withdraw", &refused).await;
    assert!(!duplicate);
    drained(&js, &stream, INBOX).await;
    let r1 = Repository::<Account, _>::new(store.clone())
        .load("r1")
        .await
        .unwrap();
    assert_eq!(
        (r1.version, r1.state.balance),
        (2, 10),
        "opened and deposited only"
    );
    assert_eq!(store.parked_messages(None).await.unwrap().len(), 1);
    let status = worker.status_of(INBOX).unwrap();
    assert_eq!(
        (status.state.clone(), status.handled),
        (SubscriberState::Live, 4),
        "{status:?}"
    );
    worker.shutdown().await;
}

/// The trace context crosses NATS: an event recorded inside a trace is
/// published by the outbox with `ce-traceparent` of that trace; a command
/// message sent on with those trace headers is executed by the inbox, and
/// the events its command decides carry the same trace id (outbox header ->
/// inbox -> command -> events).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trace_context_crosses_nats() {
    let Some(url) = url_or_skip("trace_context_crosses_nats") else {
        return;
    };
    let _shared = SERVER_LOCK.read().await;
    let js = jetstream(connect(&url).await, Duration::from_secs(5));
    let stream = TestStream::create(&url, &js, "trace", |_| {}).await;
    let (_dir, store) = sqlite().await;
    let trace = TraceContext::parse(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        Some("vendor=x"),
    )
    .unwrap();
    Repository::<Account, _>::new(store.clone())
        .execute_with(
            "t1",
            AccountCommand::Open {
                owner: "tracer".into(),
            },
            CommandMeta::default().trace(&trace),
        )
        .await
        .expect("open");
    let prefix = stream.prefix.clone();
    let outbox = NatsOutbox::new(OUTBOX, js.clone(), move |e: &Recorded<AccountEvent>| {
        Some(subject_of(&prefix, e))
    });
    ReactorRunner::new(outbox, store.clone(), store.clone(), store.clone())
        .catch_up()
        .await
        .expect("publish");
    let messages = stream_messages(&js, &stream.name).await;
    assert_eq!(messages.len(), 1);
    let sent = messages[0]
        .header(headers::TRACEPARENT)
        .expect("the outbox publishes ce-traceparent");
    assert_eq!(
        messages[0].header(headers::TRACESTATE).as_deref(),
        Some("vendor=x")
    );
    let published = TraceContext::parse(&sent, None).expect("a valid traceparent");
    assert_eq!(published.trace_id(), trace.trace_id());

    // The receiving service: a command message with the trace headers.
    let (_receiver_dir, receiver) = sqlite().await;
    let consumer = durable_consumer(&js, &stream, INBOX).await;
    let mut trace_headers = async_nats::HeaderMap::new();
    trace_headers.insert(headers::MSG_ID, "traced-1");
    trace_headers.insert(headers::TRACEPARENT, sent.as_str());
    js.publish_with_headers(
        stream.subject("commands.open"),
        trace_headers,
        CommandMessage::open("r1").bytes().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let worker = inbox_worker(consumer, receiver.clone(), receiver.clone());
    drained(&js, &stream, INBOX).await;
    worker.shutdown().await;
    let events = account_events(&receiver).await;
    assert_eq!(events.len(), 1, "the inbox executed the command");
    let received =
        (events[0].metadata.trace.clone()).expect("the inbox's command stores the sender's trace");
    assert_eq!(received.trace_id(), trace.trace_id());
}
