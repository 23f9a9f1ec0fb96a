//! A real, local HTTP service that stands in for an external system a
//! reactor talks to (a mailer, a payment provider), and a tiny client for it.
//!
//! The service is a cooperating receiver: it deduplicates by the
//! `Idempotency-Key` header. `POST /<effect>` with a key it has not seen
//! applies the effect and answers `201 Created`; a repeated key answers
//! `409 Conflict` and is **not** applied again. Every call is recorded, so a
//! test can check that each effect was applied exactly once, in which order,
//! and how many calls overlapped.
//!
//! Faults can be injected while it runs: fail the next N calls or a random
//! fraction of them with `503 Service Unavailable` (transient, nothing
//! applied), fail one key or every body containing some text (say, an
//! address the provider refuses) with `400 Bad Request` (permanent until
//! healed), and add latency. The latency is spent *after* the effect is applied and
//! before the answer is written, so a caller that crashes or times out in
//! that window has made the effect happen without hearing about it: exactly
//! the case idempotency keys exist for.
//!
//! The HTTP is minimal HTTP/1.1 written by hand over tokio sockets (no HTTP
//! library): one request per connection, `Content-Length` bodies only.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use aftermath_examples::effects_service::{EffectsService, post};
//!
//! let service = EffectsService::start().await?;
//! assert_eq!(post(service.addr(), "/mail", "key-1", b"hello").await?, 201);
//! assert_eq!(post(service.addr(), "/mail", "key-1", b"hello").await?, 409); // not applied again
//! assert_eq!(service.applied("key-1"), 1);
//! assert_eq!(service.duplicates(), 1);
//! # Ok::<(), std::io::Error>(())
//! # }).unwrap();
//! ```

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aftermath::reactor::ReactError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Largest request head (request line and headers) the service accepts.
const MAX_HEAD: usize = 16 * 1024;
/// Largest body either side accepts.
const MAX_BODY: usize = 1024 * 1024;

/// How long [`post`] waits for the whole exchange.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// One applied effect, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// 1 for the first effect applied, then 2, 3, ...
    pub seq: u64,
    /// The request path without the leading `/` (the effect's name).
    pub effect: String,
    /// The idempotency key.
    pub key: String,
    /// The request body (lossy UTF-8).
    pub body: String,
    /// When it was applied.
    pub at: Instant,
}

/// One call, whatever its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The request path without the leading `/`.
    pub effect: String,
    /// The idempotency key (empty when the header was missing).
    pub key: String,
    /// The status the service answered.
    pub status: u16,
    /// The request body (lossy UTF-8).
    pub body: String,
    /// When the request arrived (after its body was read).
    pub at: Instant,
}

#[derive(Default)]
struct State {
    // Configuration (faults).
    fail_next: u64,
    fail_fraction: f64,
    failing_keys: HashSet<String>,
    failing_bodies: HashSet<String>,
    latency: Duration,
    rng: u64,
    // What happened.
    applied: HashMap<String, u64>,
    applied_log: Vec<Applied>,
    calls: Vec<Call>,
    duplicates: u64,
    faults: u64,
    in_flight: usize,
    max_in_flight: usize,
}

impl State {
    /// xorshift64*: a uniform number in [0, 1).
    fn random(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running service. Dropping it stops accepting connections.
pub struct EffectsService {
    addr: SocketAddr,
    state: Shared,
    accept: JoinHandle<()>,
}

impl Drop for EffectsService {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl EffectsService {
    /// Starts the service on `127.0.0.1` at a free port, on the current
    /// tokio runtime.
    pub async fn start() -> io::Result<EffectsService> {
        Self::start_on("127.0.0.1:0".parse().expect("a socket address")).await
    }

    /// Starts the service on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> io::Result<EffectsService> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::new(Mutex::new(State {
            rng: 0x9e37_79b9_7f4a_7c15,
            ..State::default()
        }));
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(EffectsService {
            addr,
            state,
            accept,
        })
    }

    /// Where the service listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    // ---- faults ----

    /// Answers the next `n` calls with 503 (nothing applied).
    pub fn fail_next(&self, n: u64) {
        lock(&self.state).fail_next = n;
    }

    /// Answers a random `fraction` (0.0 to 1.0) of calls with 503.
    pub fn fail_fraction(&self, fraction: f64) {
        lock(&self.state).fail_fraction = fraction.clamp(0.0, 1.0);
    }

    /// Seeds the random faults (they are deterministic per seed and call order).
    pub fn seed(&self, seed: u64) {
        lock(&self.state).rng = seed | 1;
    }

    /// Answers every call with this idempotency key with 400 (a permanent
    /// failure) until [`EffectsService::heal_key`].
    pub fn fail_key(&self, key: &str) {
        lock(&self.state).failing_keys.insert(key.to_owned());
    }

    /// Stops failing `key`.
    pub fn heal_key(&self, key: &str) {
        lock(&self.state).failing_keys.remove(key);
    }

    /// Answers every call whose body contains `text` with 400 (a permanent
    /// failure: an address the mail provider refuses, a card the payment
    /// provider declines) until [`EffectsService::heal_body`].
    pub fn fail_body(&self, text: &str) {
        lock(&self.state).failing_bodies.insert(text.to_owned());
    }

    /// Stops failing bodies containing `text`.
    pub fn heal_body(&self, text: &str) {
        lock(&self.state).failing_bodies.remove(text);
    }

    /// Waits this long before answering each call (after applying it).
    pub fn latency(&self, latency: Duration) {
        lock(&self.state).latency = latency;
    }

    /// Removes every fault and the latency.
    pub fn heal(&self) {
        let mut state = lock(&self.state);
        state.fail_next = 0;
        state.fail_fraction = 0.0;
        state.failing_keys.clear();
        state.failing_bodies.clear();
        state.latency = Duration::ZERO;
    }

    // ---- what happened ----

    /// How many times the effect with this key was applied (0 or 1 unless
    /// the service itself is broken).
    pub fn applied(&self, key: &str) -> u64 {
        lock(&self.state).applied.get(key).copied().unwrap_or(0)
    }

    /// Applications per key.
    pub fn applied_counts(&self) -> HashMap<String, u64> {
        lock(&self.state).applied.clone()
    }

    /// Applied effects in arrival order.
    pub fn applied_log(&self) -> Vec<Applied> {
        lock(&self.state).applied_log.clone()
    }

    /// Every call received, in arrival order.
    pub fn call_log(&self) -> Vec<Call> {
        lock(&self.state).calls.clone()
    }

    /// Calls received.
    pub fn calls(&self) -> u64 {
        lock(&self.state).calls.len() as u64
    }

    /// Calls refused as repeats of a key already applied (409).
    pub fn duplicates(&self) -> u64 {
        lock(&self.state).duplicates
    }

    /// Calls failed by an injected fault (503 or 400).
    pub fn faults(&self) -> u64 {
        lock(&self.state).faults
    }

    /// Calls received (body read) and not answered yet.
    pub fn in_flight(&self) -> usize {
        lock(&self.state).in_flight
    }

    /// The most calls handled at once since the start (or the last reset).
    pub fn max_in_flight(&self) -> usize {
        lock(&self.state).max_in_flight
    }

    /// Forgets the calls, applied effects and counters (not the faults).
    pub fn reset_records(&self) {
        let mut state = lock(&self.state);
        state.applied.clear();
        state.applied_log.clear();
        state.calls.clear();
        state.duplicates = 0;
        state.faults = 0;
        state.max_in_flight = state.in_flight;
    }
}

async fn accept_loop(listener: TcpListener, state: Shared) {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                let _ = socket.set_nodelay(true);
                tokio::spawn(serve(socket, state.clone()));
            }
            // Out of file descriptors and the like: back off a little.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Decrements the in-flight count however the handler ends.
struct InFlight(Shared);

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.0).in_flight -= 1;
    }
}

struct Request {
    method: String,
    path: String,
    key: Option<String>,
    body: Vec<u8>,
}

async fn serve(mut socket: TcpStream, state: Shared) {
    let request = match read_request(&mut socket).await {
        Ok(request) => request,
        Err(e) => {
            let _ = respond(&mut socket, 400, &e.to_string()).await;
            return;
        }
    };
    let (status, latency, in_flight) = {
        let mut s = lock(&state);
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        let guard = InFlight(state.clone());
        let effect = request.path.trim_start_matches('/').to_owned();
        let key = request.key.clone().unwrap_or_default();
        let body = String::from_utf8_lossy(&request.body).into_owned();
        let status = if request.method != "POST" {
            405
        } else if key.is_empty() {
            400
        } else if s.failing_keys.contains(&key)
            || s.failing_bodies
                .iter()
                .any(|text| body.contains(text.as_str()))
        {
            s.faults += 1;
            400
        } else if s.fail_next > 0 {
            s.fail_next -= 1;
            s.faults += 1;
            503
        } else if s.fail_fraction > 0.0 && s.random() < s.fail_fraction {
            s.faults += 1;
            503
        } else if s.applied.contains_key(&key) {
            s.duplicates += 1;
            409
        } else {
            s.applied.insert(key.clone(), 1);
            let seq = s.applied_log.len() as u64 + 1;
            s.applied_log.push(Applied {
                seq,
                effect: effect.clone(),
                key: key.clone(),
                body: body.clone(),
                at: Instant::now(),
            });
            201
        };
        s.calls.push(Call {
            effect,
            key,
            status,
            body,
            at: Instant::now(),
        });
        (status, s.latency, guard)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // No longer in flight once the latency is spent and the answer goes
    // out: a caller cannot send its next call before reading this answer.
    drop(in_flight);
    // The caller may be gone (crashed, timed out): nothing to do about it.
    let _ = respond(&mut socket, status, reason(status)).await;
}

/// The reason phrase of a status the service answers.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

async fn respond(socket: &mut TcpStream, status: u16, body: &str) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads a request or response head (through the blank line) and returns it
/// with whatever body bytes came along.
async fn read_head(socket: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head =
                String::from_utf8(buf[..end].to_vec()).map_err(|_| invalid("head is not UTF-8"))?;
            return Ok((head, buf[end + 4..].to_vec()));
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("head too large"));
        }
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` (case-insensitive) in a head's header lines.
fn header<'a>(lines: &[&'a str], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads the rest of a `Content-Length` body.
async fn read_body(
    socket: &mut TcpStream,
    lines: &[&str],
    mut body: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let length: usize = match header(lines, "content-length") {
        Some(v) => v.parse().map_err(|_| invalid("bad Content-Length"))?,
        None => 0,
    };
    if length > MAX_BODY {
        return Err(invalid("body too large"));
    }
    if body.len() < length {
        let start = body.len();
        body.resize(length, 0);
        socket.read_exact(&mut body[start..]).await?;
    }
    body.truncate(length);
    Ok(body)
}

async fn read_request(socket: &mut TcpStream) -> io::Result<Request> {
    let (head, rest) = read_head(socket).await?;
    let lines: Vec<&str> = head.split("\r\n").collect();
    let mut request_line = lines[0].split(' ');
    let (Some(method), Some(path), Some(version)) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
    ) else {
        return Err(invalid("bad request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(invalid("not HTTP/1.x"));
    }
    let key = header(&lines[1..], "idempotency-key").map(str::to_owned);
    let body = read_body(socket, &lines[1..], rest).await?;
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        key,
        body,
    })
}

/// Sends `POST <path>` with an `Idempotency-Key` header and `body` to the
/// service at `addr`, and returns the response status. Gives up with
/// [`io::ErrorKind::TimedOut`] after [`DEFAULT_TIMEOUT`].
pub async fn post(addr: SocketAddr, path: &str, key: &str, body: &[u8]) -> io::Result<u16> {
    post_timeout(addr, path, key, body, DEFAULT_TIMEOUT).await
}

/// [`post`] with a timeout for the whole exchange (connect, send, answer).
pub async fn post_timeout(
    addr: SocketAddr,
    path: &str,
    key: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<u16> {
    let exchange = async {
        let mut socket = TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        socket.write_all(&request).await?;
        let (head, rest) = read_head(&mut socket).await?;
        let lines: Vec<&str> = head.split("\r\n").collect();
        let status = lines[0]
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid(format!("bad status line `{}`", lines[0])))?;
        read_body(&mut socket, &lines[1..], rest).await?;
        Ok(status)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {addr} within {timeout:?}"),
        )),
    }
}

/// What a reactor should make of a call's outcome: 2xx and 409 (the key was
/// already applied) mean the effect happened; 408, 425, 429, 5xx and I/O
/// errors (refused, reset, timed out) are transient; any other status is
/// permanent.
pub fn classify(result: io::Result<u16>) -> Result<(), ReactError> {
    match result {
        Ok(200..=299 | 409) => Ok(()),
        Ok(status @ (408 | 425 | 429 | 500..=599)) => Err(ReactError::Retry(format!(
            "HTTP {status} {}",
            reason(status)
        ))),
        Ok(status) => Err(ReactError::Fatal(format!(
            "HTTP {status} {}",
            reason(status)
        ))),
        Err(e) => Err(ReactError::retry(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn applies_once_and_injects_faults() {
        let service = EffectsService::start().await.unwrap();
        let addr = service.addr();
        assert_eq!(post(addr, "/a", "k1", b"one").await.unwrap(), 201);
        assert_eq!(post(addr, "a", "k1", b"one").await.unwrap(), 409);
        service.fail_next(2);
        assert_eq!(post(addr, "/a", "k2", b"").await.unwrap(), 503);
        assert_eq!(post(addr, "/a", "k2", b"").await.unwrap(), 503);
        assert_eq!(post(addr, "/a", "k2", b"").await.unwrap(), 201);
        service.fail_key("k3");
        assert_eq!(post(addr, "/a", "k3", b"").await.unwrap(), 400);
        service.heal_key("k3");
        assert_eq!(post(addr, "/a", "k3", b"three").await.unwrap(), 201);
        service.fail_body("mallory@");
        assert_eq!(post(addr, "/m", "k4", b"to mallory@x").await.unwrap(), 400);
        service.heal_body("mallory@");
        assert_eq!(post(addr, "/m", "k4", b"to mallory@x").await.unwrap(), 201);
        assert_eq!(service.call_log()[7].body, "to mallory@x");
        assert_eq!(service.applied("k1"), 1);
        assert_eq!(service.duplicates(), 1);
        assert_eq!(service.faults(), 4);
        assert_eq!(service.calls(), 9);
        let log = service.applied_log();
        assert_eq!(
            log.iter()
                .map(|a| (a.key.as_str(), a.body.as_str()))
                .collect::<Vec<_>>(),
            [
                ("k1", "one"),
                ("k2", ""),
                ("k3", "three"),
                ("k4", "to mallory@x")
            ]
        );
        assert_eq!(log[0].effect, "a");

        service.fail_fraction(0.5);
        let mut failed = 0;
        for i in 0..200 {
            if post(addr, "/b", &format!("r{i}"), b"").await.unwrap() == 503 {
                failed += 1;
            }
        }
        assert!((50..150).contains(&failed), "{failed} of 200 failed");
        service.heal();

        service.latency(Duration::from_millis(300));
        let timed_out = post_timeout(addr, "/c", "slow", b"", Duration::from_millis(50)).await;
        assert_eq!(timed_out.unwrap_err().kind(), io::ErrorKind::TimedOut);
        // Applied even though the caller gave up: the retry is refused.
        assert_eq!(service.applied("slow"), 1);
        assert_eq!(classify(post(addr, "/c", "slow", b"").await), Ok(()));
        assert!(matches!(classify(Ok(503)), Err(ReactError::Retry(_))));
        assert!(matches!(classify(Ok(400)), Err(ReactError::Fatal(_))));
    }
}
