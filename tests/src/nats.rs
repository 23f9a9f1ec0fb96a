//! Helpers for the NATS JetStream suite (`tests/nats.rs`) and the
//! `nats_helper` binary: the server URL (or why the suite is skipped), a
//! JetStream stream per test (unique name and subjects, deleted afterwards),
//! reading a stream back, restarting the local server, the inbox's test
//! mapping of messages to account commands, and a store wrapper that
//! commits an append and then fails (a reply lost after the commit).

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aftermath::store::{AppendResult, Direction, Snapshot};
use aftermath::{EventData, EventStore, ExpectedVersion, Position, StoreError, StoredEvent};
use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::AccountCommand;

/// The variable naming the server.
pub const URL_VAR: &str = "AFTERMATH_NATS_URL";

/// The server URL, or why the NATS tests cannot run.
pub fn url() -> Result<String, String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => Err(format!("{URL_VAR} not set")),
    }
}

/// The server URL, or `None` after printing `SKIPPED nats::<test>: <why>`.
pub fn url_or_skip(test: &str) -> Option<String> {
    match url() {
        Ok(url) => Some(url),
        Err(reason) => {
            crate::report_skip(format_args!("SKIPPED nats::{test}: {reason}"));
            None
        }
    }
}

/// Connects to `url`; panics if the server does not answer (a set URL that
/// does not answer fails the test).
pub async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        // After a server restart, reconnect quickly.
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{URL_VAR}={url} is set but the server does not answer: {e}"))
}

/// A client that keeps trying to connect in the background (for helper
/// processes that may start while the server is down).
pub async fn connect_patiently(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(1))
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// A JetStream context whose requests and publish acks time out after `timeout`.
pub fn jetstream(client: async_nats::Client, timeout: Duration) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(timeout)
        .build(client)
}

/// A JetStream stream for one test: a unique name, subjects under a unique
/// prefix, file storage (it survives a server restart). Deleted on drop.
pub struct TestStream {
    /// The stream's name.
    pub name: String,
    /// Its subjects are `<prefix>.>`.
    pub prefix: String,
    url: String,
}

impl TestStream {
    /// Creates the stream for `test`; `configure` may change the config
    /// (e.g. the duplicate window) before it is created.
    pub async fn create(
        url: &str,
        js: &jetstream::Context,
        test: &str,
        configure: impl FnOnce(&mut stream::Config),
    ) -> TestStream {
        let id = Uuid::new_v4().simple().to_string();
        let name = format!("AFTERMATH_TEST_{}_{}", test.to_uppercase(), &id[..12]);
        let prefix = format!("aftermath-test.{test}.{}", &id[..12]);
        let mut config = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        };
        configure(&mut config);
        js.create_stream(config)
            .await
            .unwrap_or_else(|e| panic!("creating JetStream stream {name}: {e}"));
        TestStream {
            name,
            prefix,
            url: url.to_owned(),
        }
    }

    /// `<prefix>.<suffix>`.
    pub fn subject(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // The test's runtime may be the one dropping us: use a thread with a
        // runtime of its own.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(2))
                    .connect(url.as_str())
                    .await
                    .ok()?;
                let js = jetstream(client, Duration::from_secs(5));
                js.delete_stream(&name).await.ok().map(|_| ())
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(()))) {
            eprintln!("could not delete test stream {}", self.name);
        }
    }
}

/// One message stored in a stream.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its stream sequence.
    pub sequence: u64,
    /// Its subject.
    pub subject: String,
    /// Its headers.
    pub headers: async_nats::HeaderMap,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Stored {
    /// The value of header `name`, if set.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.as_str().to_owned())
    }
}

/// The stream's state (messages, first and last sequence, ...).
pub async fn stream_state(js: &jetstream::Context, name: &str) -> stream::State {
    js.get_stream(name)
        .await
        .unwrap_or_else(|e| panic!("getting stream {name}: {e}"))
        .get_info()
        .await
        .unwrap_or_else(|e| panic!("stream info of {name}: {e}"))
        .state
}

/// Every message in the stream, in sequence order.
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> Vec<Stored> {
    let stream = js
        .get_stream(name)
        .await
        .unwrap_or_else(|e| panic!("getting stream {name}: {e}"));
    let state = stream_state(js, name).await;
    let mut messages = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        match stream.get_raw_message(sequence).await {
            Ok(m) => messages.push(Stored {
                sequence: m.sequence,
                subject: m.subject.to_string(),
                headers: m.headers,
                payload: m.payload.to_vec(),
            }),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => panic!("reading message {sequence} of {name}: {e}"),
        }
    }
    messages
}

/// Publishes `payload` to `subject` with `Nats-Msg-Id: message_id`; returns
/// whether JetStream dropped it as a duplicate, and its sequence.
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    message_id: &str,
    payload: &[u8],
) -> (bool, u64) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(aftermath::nats::headers::MSG_ID, message_id);
    let ack = js
        .publish_with_headers(subject.to_owned(), headers, payload.to_vec().into())
        .await
        .unwrap_or_else(|e| panic!("publishing to {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("publish ack from {subject}: {e}"));
    (ack.duplicate, ack.sequence)
}

// ---------------------------------------------------------------------------
// The local server: stop and start it (the restart test).
// ---------------------------------------------------------------------------

/// The server's executable, as started on this machine.
pub const SERVER: &str = "/usr/sbin/nats-server";

/// The address in `url` (`nats://host:port`).
pub fn addr(url: &str) -> SocketAddr {
    let hostport = url
        .trim_start_matches("nats://")
        .trim_end_matches('/')
        .to_owned();
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve the address of {url}"))
}

/// Whether something accepts TCP connections at `addr` (connects only; sends nothing).
pub fn port_answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Stops the local server (SIGTERM, waits up to 10 s for it to exit) and
/// waits until its port is closed.
pub fn stop_server(addr: SocketAddr) {
    let status = Command::new("start-stop-daemon")
        .args(["--stop", "--retry", "10", "--exec", SERVER])
        .status()
        .expect("run start-stop-daemon --stop");
    assert!(status.success(), "stopping nats-server failed: {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while port_answers(addr) {
        assert!(
            Instant::now() < deadline,
            "nats-server still answers at {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the local server as this machine does (JetStream on, file
/// storage in /var/lib/nats-server) unless it runs, and waits until its
/// port answers.
pub fn start_server(addr: SocketAddr) {
    if let Err(e) = try_start_server(addr) {
        panic!("{e}");
    }
}

/// [`start_server`], returning what went wrong instead of panicking.
pub fn try_start_server(addr: SocketAddr) -> Result<(), String> {
    let status = Command::new("start-stop-daemon")
        .args([
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            SERVER,
            "--",
            "-a",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-js",
            "-sd",
            "/var/lib/nats-server",
            "-l",
            "/var/log/nats-server.log",
        ])
        .status()
        .map_err(|e| format!("running start-stop-daemon --start: {e}"))?;
    if !status.success() {
        return Err(format!("starting nats-server failed: {status}"));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !port_answers(addr) {
        if Instant::now() > deadline {
            return Err(format!("nats-server does not answer at {addr}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Created when a test stops the server: starts it again when dropped,
/// whatever happened to the test (other tests and other people need it).
pub struct ServerGuard(pub SocketAddr);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if !port_answers(self.0)
            && let Err(e) = try_start_server(self.0)
        {
            eprintln!("could not start nats-server again: {e}");
        }
    }
}

/// Taken for writing by the test that restarts the server, for reading by
/// the others: the restart never lands in another test of this binary.
pub static SERVER_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------
// The inbox's messages: account commands as JSON.
// ---------------------------------------------------------------------------

/// A command message for the test inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMessage {
    /// The account.
    pub account: String,
    /// `open`, `deposit` or `withdraw`.
    pub op: String,
    /// The owner (`open`) or nothing.
    #[serde(default)]
    pub owner: String,
    /// The amount (`deposit`, `withdraw`).
    #[serde(default)]
    pub amount: u64,
}

impl CommandMessage {
    /// Opens `account`.
    pub fn open(account: &str) -> Self {
        CommandMessage {
            account: account.to_owned(),
            op: "open".into(),
            owner: format!("owner of {account}"),
            amount: 0,
        }
    }

    /// Deposits `amount` into `account`.
    pub fn deposit(account: &str, amount: u64) -> Self {
        CommandMessage {
            account: account.to_owned(),
            op: "deposit".into(),
            owner: String::new(),
            amount,
        }
    }

    /// Withdraws `amount` from `account`.
    pub fn withdraw(account: &str, amount: u64) -> Self {
        CommandMessage {
            op: "withdraw".into(),
            ..Self::deposit(account, amount)
        }
    }

    /// As JSON bytes.
    pub fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("encode a command message")
    }
}

/// The inbox mapping: JSON [`CommandMessage`] -> (account, command).
pub fn map_message(message: &async_nats::Message) -> Result<(String, AccountCommand), String> {
    let m: CommandMessage = serde_json::from_slice(&message.payload)
        .map_err(|e| format!("not a command message: {e}"))?;
    let command = match m.op.as_str() {
        "open" => AccountCommand::Open { owner: m.owner },
        "deposit" => AccountCommand::Deposit { amount: m.amount },
        "withdraw" => AccountCommand::Withdraw { amount: m.amount },
        other => return Err(format!("unknown operation `{other}`")),
    };
    Ok((m.account, command))
}

// ---------------------------------------------------------------------------
// A store that loses the reply of chosen appends.
// ---------------------------------------------------------------------------

/// What [`LoseReplies`] does after an append it was told to break commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterCommit {
    /// Return an error, as if the reply was lost (a timeout).
    Fail,
    /// Abort the process (a crash between the commit and the ack).
    Abort,
}

/// Wraps a store: the appends numbered in `nth` (1-based, counting this
/// wrapper's successful appends) commit, then fail or abort the process.
#[derive(Clone)]
pub struct LoseReplies<S> {
    inner: S,
    nth: Arc<HashSet<u64>>,
    then: AfterCommit,
    appends: Arc<Mutex<u64>>,
    lost: Arc<Mutex<Vec<AppendResult>>>,
}

impl<S: EventStore + Clone> LoseReplies<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, nth: impl IntoIterator<Item = u64>, then: AfterCommit) -> Self {
        LoseReplies {
            inner,
            nth: Arc::new(nth.into_iter().collect()),
            then,
            appends: Arc::default(),
            lost: Arc::default(),
        }
    }

    /// The appends that committed and then failed.
    pub fn lost(&self) -> Vec<AppendResult> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait::async_trait]
impl<S: EventStore + Clone> EventStore for LoseReplies<S> {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let result = self.inner.append(stream, expected, events).await?;
        let n = {
            let mut appends = self.appends.lock().unwrap_or_else(|e| e.into_inner());
            *appends += 1;
            *appends
        };
        if !self.nth.contains(&n) {
            return Ok(result);
        }
        match self.then {
            AfterCommit::Abort => {
                println!("ABORT_AFTER_APPEND {stream} {}", result.last_version);
                std::process::abort();
            }
            AfterCommit::Fail => {
                self.lost
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(result.clone());
                Err(StoreError::Closed(format!(
                    "injected: append #{n} to {stream} committed, its reply was lost"
                )))
            }
        }
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_stream(stream, from, direction, limit).await
    }

    async fn read_all(
        &self,
        after: Position,
        types: Option<&[&str]>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_all(after, types, limit).await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }

    async fn find_event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        self.inner.find_event(id).await
    }

    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        self.inner.watch_head()
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(snapshot).await
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream).await
    }
}

// ---------------------------------------------------------------------------
// The outbox's subjects.
// ---------------------------------------------------------------------------

/// The subject the test outboxes publish an account event to:
/// `<prefix>.<category>.<event type>` (e.g. `….account.Deposited`).
pub fn subject_of(
    prefix: &str,
    event: &aftermath::Recorded<crate::domain::AccountEvent>,
) -> String {
    use aftermath::Event;
    let category = event.stream.split('-').next().unwrap_or("unknown");
    format!("{prefix}.{category}.{}", event.event.event_type())
}
