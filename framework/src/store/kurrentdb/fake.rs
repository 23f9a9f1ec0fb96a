//! An in-memory stand-in for a KurrentDB server, answering the [`Server`]
//! calls the way the server does (as far as the store relies on it):
//! 0-based revisions, `$all` positions that are sparse byte offsets with
//! commit == prepare, forward `$all` reads that include their start and
//! backward ones that exclude it, backward stream reads that do not clamp a
//! start beyond the end, `$maxCount`, a `$metadata` event in `$$<stream>`
//! for it, server-side event-type filters (regexes run by the `regex`
//! crate), and subscriptions that can be dropped on purpose. Plus fault
//! injection for the tests.

use std::collections::HashMap;
use std::sync::Mutex;

use ::kurrentdb::{CurrentRevision, Error, StreamPosition, StreamState};
use async_trait::async_trait;
use chrono::Utc;
use futures::stream::BoxStream;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use super::mapping::ServerFilter;
use super::server::{Proposed, Rec, Server};

type Pos = ::kurrentdb::Position;

#[derive(Default)]
struct Inner {
    log: Vec<Rec>,
    streams: HashMap<String, Vec<usize>>,
    max_count: HashMap<String, u64>,
    next: u64,
    /// Streams whose next append commits but answers with an error (a lost
    /// answer).
    lose_answers: Vec<String>,
    /// Where subscriptions were asked to start.
    subscription_starts: Vec<StreamPosition<Pos>>,
    appends: usize,
}

/// See the module docs.
pub(crate) struct FakeServer {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Rec>,
    /// Bumped to drop every live subscription.
    epoch: watch::Sender<u64>,
}

impl FakeServer {
    pub(crate) fn new() -> FakeServer {
        FakeServer {
            inner: Mutex::new(Inner {
                // The log starts with the server's own records.
                next: 4096,
                ..Inner::default()
            }),
            live: broadcast::channel(100_000).0,
            epoch: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Writes events as another writer would, without any check.
    pub(crate) fn inject(&self, stream: &str, events: Vec<Proposed>) -> u64 {
        self.write(&mut self.lock(), stream, events)
    }

    /// Stores an event at an explicit `(commit, prepare)` position, like a
    /// legacy TCP transaction.
    pub(crate) fn inject_legacy(&self, stream: &str, event: Proposed, commit: u64, prepare: u64) {
        let mut inner = self.lock();
        let index = inner.log.len();
        let revision = inner.streams.get(stream).map_or(0, |s| s.len() as u64);
        let rec = Rec {
            stream: stream.to_owned(),
            id: event.id,
            revision,
            event_type: event.event_type,
            data: event.data,
            metadata: event.metadata,
            commit,
            prepare,
            created: Utc::now(),
        };
        inner.next = inner.next.max(commit) + 100;
        inner.log.push(rec);
        inner
            .streams
            .entry(stream.to_owned())
            .or_default()
            .push(index);
    }

    /// The next append to `stream` commits but answers with an error.
    pub(crate) fn lose_next_answer(&self, stream: &str) {
        self.lock().lose_answers.push(stream.to_owned());
    }

    /// Drops every live subscription (with an error).
    pub(crate) fn drop_subscriptions(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Where subscriptions were asked to start, in order.
    pub(crate) fn subscription_starts(&self) -> Vec<StreamPosition<Pos>> {
        self.lock().subscription_starts.clone()
    }

    /// How many appends (of any stream) were accepted.
    pub(crate) fn appends(&self) -> usize {
        self.lock().appends
    }

    /// Every event of a server stream, as stored.
    pub(crate) fn stream(&self, stream: &str) -> Vec<Rec> {
        let inner = self.lock();
        inner
            .streams
            .get(stream)
            .map(|s| s.iter().map(|&i| inner.log[i].clone()).collect())
            .unwrap_or_default()
    }

    /// All streams' names.
    pub(crate) fn stream_names(&self) -> Vec<String> {
        self.lock().streams.keys().cloned().collect()
    }

    fn write(&self, inner: &mut Inner, stream: &str, events: Vec<Proposed>) -> u64 {
        let first = inner.streams.get(stream).map_or(0, |s| s.len() as u64);
        let mut last = 0;
        for (revision, event) in (first..).zip(events) {
            let position = inner.next;
            // Sparse positions: a record takes some bytes.
            inner.next += 128 + event.data.len() as u64 + event.metadata.len() as u64;
            let rec = Rec {
                stream: stream.to_owned(),
                id: event.id,
                revision,
                event_type: event.event_type,
                data: event.data,
                metadata: event.metadata,
                commit: position,
                prepare: position,
                created: Utc::now(),
            };
            let index = inner.log.len();
            inner.log.push(rec.clone());
            inner
                .streams
                .entry(stream.to_owned())
                .or_default()
                .push(index);
            let _ = self.live.send(rec);
            last = revision;
        }
        inner.appends += 1;
        last
    }

    /// The indices (into the log) of a stream's readable events.
    fn readable(inner: &Inner, stream: &str) -> Option<Vec<usize>> {
        let indices = inner.streams.get(stream)?;
        let skip = inner
            .max_count
            .get(stream)
            .map_or(0, |&max| indices.len().saturating_sub(max as usize));
        Some(indices[skip..].to_vec())
    }
}

/// The server's filter, evaluated like the server does (with the default
/// `$all` rule that hides `$epoch-information` and the like, not modeled).
fn passes(filter: &ServerFilter, rec: &Rec) -> bool {
    match filter {
        ServerFilter::TypeRegex(r) => regex::Regex::new(r)
            .expect("a valid regex")
            .is_match(&rec.event_type),
        ServerFilter::TypePrefix(p) => rec.event_type.starts_with(p.as_str()),
    }
}

#[async_trait]
impl Server for FakeServer {
    async fn append(
        &self,
        stream: &str,
        expected: StreamState,
        events: Vec<Proposed>,
    ) -> ::kurrentdb::Result<u64> {
        // Let other tasks interleave, as a network round trip would.
        tokio::task::yield_now().await;
        let mut inner = self.lock();
        let current = match inner.streams.get(stream) {
            Some(s) if !s.is_empty() => CurrentRevision::Current(s.len() as u64 - 1),
            _ => CurrentRevision::NoStream,
        };
        let ok = match (expected, current) {
            (StreamState::Any, _) => true,
            (StreamState::NoStream, CurrentRevision::NoStream) => true,
            (StreamState::StreamExists, CurrentRevision::Current(_)) => true,
            (StreamState::StreamRevision(r), CurrentRevision::Current(c)) => r == c,
            _ => false,
        };
        if !ok {
            return Err(Error::WrongExpectedVersion { expected, current });
        }
        let last = self.write(&mut inner, stream, events);
        if let Some(i) = inner.lose_answers.iter().position(|s| s == stream) {
            inner.lose_answers.remove(i);
            return Err(Error::ServerError("the answer was lost".to_owned()));
        }
        Ok(last)
    }

    async fn read_stream(
        &self,
        stream: &str,
        start: StreamPosition<u64>,
        backwards: bool,
        count: usize,
    ) -> ::kurrentdb::Result<Vec<Rec>> {
        tokio::task::yield_now().await;
        let inner = self.lock();
        let Some(indices) = Self::readable(&inner, stream) else {
            return Err(Error::ResourceNotFound);
        };
        let recs: Vec<&Rec> = indices.iter().map(|&i| &inner.log[i]).collect();
        let picked: Vec<Rec> = if backwards {
            let end = match start {
                StreamPosition::End => recs.last().map_or(0, |r| r.revision),
                StreamPosition::Start => 0,
                StreamPosition::Position(r) => r,
            };
            // The range [end - count + 1, end], as far as it exists.
            let low = (end + 1).saturating_sub(count as u64);
            recs.iter()
                .rev()
                .filter(|r| r.revision <= end && r.revision >= low)
                .map(|r| (*r).clone())
                .collect()
        } else {
            let from = match start {
                StreamPosition::Start => 0,
                StreamPosition::End => u64::MAX,
                StreamPosition::Position(r) => r,
            };
            recs.iter()
                .filter(|r| r.revision >= from)
                .take(count)
                .map(|r| (*r).clone())
                .collect()
        };
        Ok(picked)
    }

    async fn read_all(
        &self,
        start: StreamPosition<Pos>,
        backwards: bool,
        filter: &ServerFilter,
        count: usize,
    ) -> ::kurrentdb::Result<Vec<Rec>> {
        tokio::task::yield_now().await;
        let inner = self.lock();
        let mut log: Vec<&Rec> = inner.log.iter().collect();
        log.sort_by_key(|r| r.position());
        let picked = if backwards {
            log.iter()
                .rev()
                .filter(|r| match start {
                    StreamPosition::Position(p) => r.position() < p,
                    _ => true,
                })
                .filter(|r| passes(filter, r))
                .take(count)
                .map(|r| (*r).clone())
                .collect()
        } else {
            log.iter()
                .filter(|r| match start {
                    StreamPosition::Position(p) => r.position() >= p,
                    StreamPosition::End => false,
                    StreamPosition::Start => true,
                })
                .filter(|r| passes(filter, r))
                .take(count)
                .map(|r| (*r).clone())
                .collect()
        };
        Ok(picked)
    }

    async fn set_max_count(&self, stream: &str, max_count: u64) -> ::kurrentdb::Result<()> {
        let mut inner = self.lock();
        inner.max_count.insert(stream.to_owned(), max_count);
        let meta = Proposed {
            id: Uuid::new_v4(),
            event_type: "$metadata".to_owned(),
            data: format!(r#"{{"$maxCount":{max_count}}}"#).into_bytes(),
            metadata: Vec::new(),
        };
        self.write(&mut inner, &format!("$${stream}"), vec![meta]);
        Ok(())
    }

    fn subscribe_all(
        &self,
        start: StreamPosition<Pos>,
        filter: &ServerFilter,
    ) -> BoxStream<'static, ::kurrentdb::Result<Rec>> {
        // Live first, then the catch-up under the lock: nothing falls between.
        let live = self.live.subscribe();
        let mut epoch = self.epoch.subscribe();
        epoch.borrow_and_update();
        let mut inner = self.lock();
        inner.subscription_starts.push(start);
        let mut log: Vec<Rec> = inner.log.clone();
        drop(inner);
        log.sort_by_key(|r| r.position());
        let after = match start {
            StreamPosition::Start => None,
            StreamPosition::Position(p) => Some(p),
            StreamPosition::End => log.last().map(|r| r.position()),
        };
        let filter = filter.clone();
        let catch_up: Vec<Rec> = log
            .into_iter()
            .filter(|r| after.is_none_or(|a| r.position() > a))
            .filter(|r| passes(&filter, r))
            .collect();
        let seen = catch_up
            .last()
            .map(|r| r.position())
            .or(after)
            .unwrap_or(Pos {
                commit: 0,
                prepare: 0,
            });
        let state = (catch_up.into_iter(), live, epoch, seen, filter, false);
        Box::pin(futures::stream::unfold(
            state,
            |(mut catch_up, mut live, mut epoch, mut seen, filter, done)| async move {
                if done {
                    return None;
                }
                if let Some(rec) = catch_up.next() {
                    return Some((Ok(rec), (catch_up, live, epoch, seen, filter, false)));
                }
                loop {
                    tokio::select! {
                        _ = epoch.changed() => {
                            let e = Error::ServerError("subscription dropped".to_owned());
                            return Some((Err(e), (catch_up, live, epoch, seen, filter, true)));
                        }
                        rec = live.recv() => match rec {
                            Ok(rec) if rec.position() > seen && passes(&filter, &rec) => {
                                seen = rec.position();
                                return Some((Ok(rec), (catch_up, live, epoch, seen, filter, false)));
                            }
                            Ok(_) => {}
                            Err(_) => {
                                let e = Error::ServerError("subscription lagged".to_owned());
                                return Some((Err(e), (catch_up, live, epoch, seen, filter, true)));
                            }
                        }
                    }
                }
            },
        ))
    }
}
