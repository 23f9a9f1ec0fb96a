//! Live latency: the time from the start of an append to a caught-up
//! reader holding the event.
//!
//! One writer appends single events, one at a time, each after a random
//! pause (so appends fall at every phase of a poll interval); a reader task
//! running [`CatchUp`] on its own store handle timestamps every event it
//! receives, and the writer matches its event by id. A latency sample is
//! `delivered - append started`: it includes the append's commit.
//!
//! The raw PostgreSQL baseline ([`raw_pg_latency`]) does the same with plain
//! sqlx: the writer appends (plus `pg_notify` in the transaction when the
//! reader listens), the reader waits for its wake-up and `SELECT`s the rows
//! after the last position it read.

use std::sync::Arc;
use std::time::Duration;

use aftermath::store::postgres::sqlx_postgres::PgListener;
use aftermath::subscription::{CatchUp, SubscriptionOptions};
use aftermath::{EventStore, ExpectedVersion};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::deposit;
use crate::raw_pg::{RawPg, RawPgError};

/// Errors of a latency run.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a latency run samples.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// Samples kept.
    pub samples: usize,
    /// Samples taken first and dropped (connections, statement caches).
    pub warm_up: usize,
    /// The pause before each append is uniform in `[0, max_gap]`.
    pub max_gap: Duration,
    /// The reader's `CatchUp` poll interval (for appends it is not told
    /// about).
    pub poll: Duration,
    /// Longest wait for one delivery before the run fails.
    pub timeout: Duration,
}

/// Latency samples.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Latencies { sorted: samples }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The nearest-rank percentile `p` (0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    /// The sum of all samples (for criterion's `iter_custom`).
    pub fn total(&self) -> Duration {
        self.sorted.iter().sum()
    }
}

/// A small xorshift generator for the pauses (no `rand` dependency).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        Jitter((Uuid::new_v4().as_u128() as u64) | 1)
    }

    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let nanos = max.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.0 % nanos)
    }
}

/// Waits for `id` on `delivered`; returns when the reader received it.
async fn delivery(
    delivered: &mut mpsc::UnboundedReceiver<(Uuid, Instant)>,
    id: Uuid,
    timeout: Duration,
) -> Result<Instant, BoxError> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, delivered.recv()).await {
            Ok(Some((got, at))) if got == id => return Ok(at),
            Ok(Some(_)) => {}
            Ok(None) => return Err("the reader stopped".into()),
            Err(_) => return Err(format!("event {id} not delivered within {timeout:?}").into()),
        }
    }
}

/// Appends single events to `stream` through `writer` while a [`CatchUp`]
/// reader on `reader` (started at its head) waits with `watch_head` and
/// polls every `options.poll`. `reader` may be a clone of `writer` (in
/// process) or another handle on the same database (another process).
pub async fn framework_latency<W, R>(
    writer: &W,
    reader: R,
    stream: &str,
    options: &LiveOptions,
) -> Result<Latencies, BoxError>
where
    W: EventStore + ?Sized,
    R: EventStore + Clone + 'static,
{
    let start = reader.head().await?;
    let subscription = SubscriptionOptions::default()
        .batch_size(1000)
        .poll_interval(options.poll);
    let mut catch_up = CatchUp::new(reader, None, start, subscription);
    let (sender, mut delivered) = mpsc::unbounded_channel();
    let (stop, mut stopping) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let page = catch_up.next_page().await?;
            let now = Instant::now();
            for event in &page.events {
                if sender.send((event.id, now)).is_err() {
                    return Ok::<(), aftermath::StoreError>(());
                }
            }
            catch_up.advance(page.through);
            if page.caught_up && !catch_up.wait_for_more(&mut stopping).await {
                return Ok(());
            }
        }
    });
    let mut jitter = Jitter::new();
    let mut samples = Vec::with_capacity(options.samples);
    let outcome = async {
        for i in 0..options.warm_up + options.samples {
            tokio::time::sleep(jitter.below(options.max_gap)).await;
            let event = deposit(1);
            let id = event.id;
            let began = Instant::now();
            writer
                .append(stream, ExpectedVersion::Any, vec![event])
                .await?;
            let at = delivery(&mut delivered, id, options.timeout).await?;
            if i >= options.warm_up {
                samples.push(at.saturating_duration_since(began));
            }
        }
        Ok::<(), BoxError>(())
    }
    .await;
    let _ = stop.send(true);
    let stopped = tokio::time::timeout(Duration::from_secs(10), task).await;
    outcome?;
    match stopped {
        Ok(joined) => joined??,
        Err(_) => return Err("the reader did not stop".into()),
    }
    Ok(Latencies::new(samples))
}

/// How the raw reader learns of new rows.
#[derive(Clone)]
pub enum RawWake {
    /// The writer, in the same process, signals after each append.
    InProcess(Arc<Notify>),
    /// `LISTEN` on a channel the writer's appends notify (the writer must be
    /// built [`RawPg::with_notify`] on that channel).
    Listen(String),
    /// Polls at this interval.
    Poll(Duration),
}

/// The raw sqlx version of [`framework_latency`]: `writer` appends single
/// events to `stream`; a reader task on `reader` waits for `wake`, then
/// `SELECT`s pages after the last position it read until a short page.
pub async fn raw_pg_latency(
    writer: &RawPg,
    reader: RawPg,
    wake: RawWake,
    stream: &str,
    options: &LiveOptions,
) -> Result<Latencies, BoxError> {
    let mut after = reader.last_position().await?;
    let mut listener = match &wake {
        RawWake::Listen(channel) => {
            let mut listener = PgListener::connect_with(reader.pool()).await?;
            listener.listen(channel).await?;
            Some(listener)
        }
        _ => None,
    };
    let (sender, mut delivered) = mpsc::unbounded_channel();
    let (stop, mut stopping) = watch::channel(false);
    let reader_wake = wake.clone();
    let task = tokio::spawn(async move {
        loop {
            let woken = async {
                match (&reader_wake, listener.as_mut()) {
                    (RawWake::InProcess(notify), _) => notify.notified().await,
                    (RawWake::Listen(_), Some(listener)) => {
                        listener.recv().await?;
                    }
                    (RawWake::Poll(every), _) => tokio::time::sleep(*every).await,
                    (RawWake::Listen(_), None) => unreachable!("a listener is made for Listen"),
                }
                Ok::<(), RawPgError>(())
            };
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => return Ok::<(), RawPgError>(()),
                woken = woken => woken?,
            }
            loop {
                let page = reader.read_all(after, 1000).await?;
                let now = Instant::now();
                for event in &page {
                    if sender.send((event.id, now)).is_err() {
                        return Ok(());
                    }
                }
                if let Some(last) = page.last() {
                    after = last.position.0 as i64;
                }
                if page.len() < 1000 {
                    break;
                }
            }
        }
    });
    let mut jitter = Jitter::new();
    let mut samples = Vec::with_capacity(options.samples);
    let outcome = async {
        let mut version = writer.stream_version(stream).await?;
        for i in 0..options.warm_up + options.samples {
            tokio::time::sleep(jitter.below(options.max_gap)).await;
            let event = deposit(1);
            let id = event.id;
            let began = Instant::now();
            version = writer
                .append(stream, ExpectedVersion::Exact(version), &[event])
                .await?;
            if let RawWake::InProcess(notify) = &wake {
                notify.notify_one();
            }
            let at = delivery(&mut delivered, id, options.timeout).await?;
            if i >= options.warm_up {
                samples.push(at.saturating_duration_since(began));
            }
        }
        Ok::<(), BoxError>(())
    }
    .await;
    let _ = stop.send(true);
    let stopped = tokio::time::timeout(Duration::from_secs(10), task).await;
    outcome?;
    match stopped {
        Ok(joined) => joined??,
        Err(_) => return Err("the raw reader did not stop".into()),
    }
    Ok(Latencies::new(samples))
}
