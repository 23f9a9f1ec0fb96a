//! The reactor the reactor tests and `reactor_helper` run: it posts each
//! account event to the local HTTP effects service
//! ([`aftermath_examples::effects_service`]) with the effect's idempotency
//! key, and helpers to compare what the service applied with the store.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use aftermath::reactor::{EffectContext, ReactError, Reactor, idempotency_key};
use aftermath::store::read_all_pages;
use aftermath::{Event, EventStore, Position, Recorded, StoredEvent};
use aftermath_examples::effects_service::{EffectsService, classify, post_timeout};
use futures::TryStreamExt;
use uuid::Uuid;

use crate::domain::AccountEvent;

/// Posts `/<event type>` with body `"<stream> <version> <event id>"`.
pub struct Notifier {
    name: String,
    addr: SocketAddr,
    timeout: Duration,
}

impl Notifier {
    /// A notifier named `name` posting to the service at `addr`, with a 2 s timeout.
    pub fn new(name: &str, addr: SocketAddr) -> Self {
        Notifier {
            name: name.to_owned(),
            addr,
            timeout: Duration::from_secs(2),
        }
    }

    /// Sets the call timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

#[async_trait::async_trait]
impl Reactor for Notifier {
    type Event = AccountEvent;

    fn name(&self) -> &str {
        &self.name
    }

    async fn react(
        &self,
        event: &Recorded<AccountEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let path = format!("/{}", event.event.event_type());
        let body = format!("{} {} {}", event.stream, event.version, event.id);
        classify(
            post_timeout(
                self.addr,
                &path,
                &ctx.idempotency_key,
                body.as_bytes(),
                self.timeout,
            )
            .await,
        )
    }
}

/// What a [`Notifier`] posted, parsed from the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    /// The event's stream.
    pub stream: String,
    /// Its version.
    pub version: u64,
    /// Its id.
    pub event_id: Uuid,
}

/// Parses a [`Notifier`] body.
pub fn parse(body: &str) -> Posted {
    let mut parts = body.split(' ');
    let (Some(stream), Some(version), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("not a notifier body: {body:?}");
    };
    Posted {
        stream: stream.to_owned(),
        version: version.parse().expect("a version"),
        event_id: id.parse().expect("an event id"),
    }
}

/// Every account event in the store, in `$all` order.
pub async fn account_events<S: EventStore>(store: &S) -> Vec<StoredEvent> {
    read_all_pages(
        store,
        Position::ORIGIN,
        Some(AccountEvent::event_types()),
        500,
    )
    .try_collect()
    .await
    .expect("read the account events")
}

/// Checks that the service applied the effect of every event in `events`
/// exactly once for reactor `name`, by idempotency key and by the event id
/// in the body, and nothing else. Returns the failures in words.
pub fn exactly_once(service: &EffectsService, name: &str, events: &[StoredEvent]) -> Vec<String> {
    let mut problems = Vec::new();
    let counts = service.applied_counts();
    let mut by_event: HashMap<Uuid, u64> = HashMap::new();
    for applied in service.applied_log() {
        *by_event.entry(parse(&applied.body).event_id).or_default() += 1;
    }
    for e in events {
        let key = idempotency_key(name, e.id);
        let n = counts.get(&key).copied().unwrap_or(0);
        if n != 1 {
            problems.push(format!(
                "{} v{} ({}): applied {n} times under its key",
                e.stream, e.version, e.id
            ));
        }
        let m = by_event.get(&e.id).copied().unwrap_or(0);
        if m != 1 {
            problems.push(format!(
                "{} v{} ({}): applied {m} times in all",
                e.stream, e.version, e.id
            ));
        }
    }
    if by_event.len() != events.len() {
        problems.push(format!(
            "{} distinct events applied, {} expected",
            by_event.len(),
            events.len()
        ));
    }
    problems
}

/// The versions applied per stream, in arrival order at the service.
pub fn applied_per_stream(service: &EffectsService) -> BTreeMap<String, Vec<u64>> {
    let mut streams: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for applied in service.applied_log() {
        let posted = parse(&applied.body);
        streams
            .entry(posted.stream)
            .or_default()
            .push(posted.version);
    }
    streams
}

/// Streams whose effects did not arrive in version order.
pub fn out_of_order(service: &EffectsService) -> Vec<String> {
    applied_per_stream(service)
        .into_iter()
        .filter(|(_, versions)| versions.windows(2).any(|w| w[1] <= w[0]))
        .map(|(stream, versions)| format!("{stream}: {versions:?}"))
        .collect()
}
