//! Operators' view of a store: every subscriber's checkpoint and lease, how
//! far behind the head it is, and what waits for a human (parked effects,
//! blocked streams, parked process instances, skipped projection events,
//! parked inbox messages). [`settled`] answers "is everything settled up to
//! the head?" in one call; the `aftermath` command-line tool prints it, and
//! an application's own admin endpoint can call it too.
//!
//! ```no_run
//! # async fn example() -> Result<(), aftermath::StoreError> {
//! use aftermath::SqliteStore;
//!
//! let store = SqliteStore::open("shop.db").await?;
//! let report = aftermath::admin::settled(&store).await?;
//! for s in &report.subscribers {
//!     println!("{}: {} events behind", s.name, s.lag_events);
//! }
//! if !report.is_settled() {
//!     eprintln!("not settled: {}", report.summary());
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::event::{Event, Position};
use crate::process::ProcessRecord;
use crate::projection::{ReadModelDb, SkippedEvent};
use crate::reactor::{Effect, EffectJournal, EffectState};
use crate::store::{Direction, EventStore, StoreError};

/// How many events [`Admin::backlog`] counts at most before it stops
/// counting (and reports [`Backlog::capped`]).
pub const BACKLOG_CAP: u64 = 100_000;

/// One row of the store's checkpoints: how far a subscriber got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointRow {
    /// The subscriber (`<name>` or, for a partition, `<name>#<i>of<n>`), or
    /// an internal row (`<name>#partitions`, `<name>#cleaned`).
    pub name: String,
    /// The position of the last event it handled.
    pub position: Position,
    /// The read model's layout version (projections only).
    pub version: Option<u32>,
    /// When the row was last written.
    pub updated_at: DateTime<Utc>,
}

impl CheckpointRow {
    /// Whether this row is bookkeeping rather than a subscriber's
    /// checkpoint: a partitioned projection's layout (`<name>#partitions`)
    /// or a reactor's cleanup mark (`<name>#cleaned`).
    pub fn is_internal(&self) -> bool {
        is_internal(&self.name)
    }
}

/// Whether checkpoint row `name` is bookkeeping (see
/// [`CheckpointRow::is_internal`]).
pub fn is_internal(name: &str) -> bool {
    name.ends_with("#partitions") || name.ends_with("#cleaned")
}

/// The subscriber a checkpoint or lease name belongs to: `shipping#0of4`
/// belongs to `shipping`.
pub fn base_name(name: &str) -> &str {
    name.split_once('#').map_or(name, |(base, _)| base)
}

/// One row of the store's leases: who runs a subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseRow {
    /// The subscriber (or partition) the lease is for.
    pub name: String,
    /// The holder's owner name (as given to the worker).
    pub owner: String,
    /// The holder's instance id (unique per running worker).
    pub instance: String,
    /// The fencing token, increased at every takeover.
    pub token: u64,
    /// When the lease runs out unless renewed; in the past when released
    /// or expired.
    pub expires_at: DateTime<Utc>,
}

/// The events after a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// How many events there are after the position (at most the cap given
    /// to [`Admin::backlog`]).
    pub events: u64,
    /// Whether counting stopped at the cap: there are more.
    pub capped: bool,
    /// When the first of them was recorded, if any.
    pub oldest: Option<DateTime<Utc>>,
}

/// One stream of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    /// The stream's name.
    pub stream: String,
    /// Its version (the version of its last event).
    pub version: u64,
    /// How many events it holds.
    pub events: u64,
    /// When its last event was recorded.
    pub last_write: DateTime<Utc>,
}

/// An inbox message that could not be turned into a command, without its
/// payload (see `aftermath::nats::InboxStore::parked_messages` for the raw
/// bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedMessageInfo {
    /// The inbox.
    pub inbox: String,
    /// The message id.
    pub message_id: String,
    /// The subject it came on.
    pub subject: String,
    /// Why it was parked.
    pub error: String,
    /// When.
    pub parked_at: DateTime<Utc>,
}

/// A process instance that waits for an operator (see
/// [`ProcessRunner::retry`](crate::process::ProcessRunner::retry) and
/// `skip`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedProcess {
    /// The instance's stream (`<process>-<instance>`).
    pub stream: String,
    /// The version of its `Parked` record.
    pub parked_version: u64,
    /// What went wrong.
    pub error: String,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// What a backend tells operators beyond the [`EventStore`],
/// [`EffectJournal`] and [`ReadModelDb`] APIs. Implemented by `SqliteStore`
/// and `PostgresStore` (features `sqlite` and `postgres`).
#[async_trait]
pub trait Admin: EventStore + EffectJournal + ReadModelDb {
    /// Every checkpoint row, by name (internal rows included: see
    /// [`CheckpointRow::is_internal`]).
    async fn checkpoints(&self) -> Result<Vec<CheckpointRow>, StoreError>;

    /// Every lease row, by name (expired and released ones included).
    async fn leases(&self) -> Result<Vec<LeaseRow>, StoreError>;

    /// The events after `after` in `$all`: how many (counting stops at
    /// `cap`) and when the first was recorded.
    async fn backlog(&self, after: Position, cap: u64) -> Result<Backlog, StoreError>;

    /// The streams of the log by name, those of `category` only when given
    /// (the streams named `<category>-...`), at most `limit`.
    async fn streams(
        &self,
        category: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamInfo>, StoreError>;

    /// The parked inbox messages, oldest first, without payloads. Works
    /// without the `nats` feature (the table is part of every schema).
    async fn parked_messages_info(&self) -> Result<Vec<ParkedMessageInfo>, StoreError>;

    /// The pending deadlines of every process manager, earliest first, at
    /// most `limit`.
    async fn deadlines(&self, limit: usize) -> Result<Vec<crate::process::Deadline>, StoreError>;

    /// The live members of every consumer group (see
    /// [`LeaseStore::members`](crate::subscription::LeaseStore::members)).
    async fn group_members(&self) -> Result<Vec<crate::subscription::Member>, StoreError>;
}

/// A consumer group in a [`Report`]: its live members and which partitions
/// each holds a live lease for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupStatus {
    /// The group: `<subscriber>#*of<count>`.
    pub group: String,
    /// The subscriber's name.
    pub subscriber: String,
    /// How many partitions it has.
    pub count: u32,
    /// The live members, by instance id.
    pub members: Vec<GroupMember>,
    /// Partitions no live lease holds now (between two holders, or waiting
    /// for a dead holder's lease to expire).
    pub unheld: Vec<u32>,
}

/// A member of a [`GroupStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    /// Its owner name.
    pub owner: String,
    /// Its instance id.
    pub instance: String,
    /// When it joined.
    pub joined_at: DateTime<Utc>,
    /// The partitions whose live lease it holds.
    pub partitions: Vec<u32>,
}

/// The groups of `members`, with the partitions each member holds by the
/// live `leases` at `now`. A lease held by an instance that is not a live
/// member (a worker that left or lost its membership while it finishes a
/// batch) is listed under that instance too.
pub fn groups(
    members: &[crate::subscription::Member],
    leases: &[LeaseRow],
    now: DateTime<Utc>,
) -> Vec<GroupStatus> {
    let mut groups: BTreeMap<String, GroupStatus> = BTreeMap::new();
    for m in members {
        let Some((subscriber, count)) = m
            .group
            .rsplit_once("#*of")
            .and_then(|(s, c)| Some((s.to_owned(), c.parse::<u32>().ok()?)))
        else {
            continue;
        };
        let group = groups
            .entry(m.group.clone())
            .or_insert_with(|| GroupStatus {
                group: m.group.clone(),
                subscriber,
                count,
                members: Vec::new(),
                unheld: Vec::new(),
            });
        group.members.push(GroupMember {
            owner: m.owner.clone(),
            instance: m.instance.clone(),
            joined_at: m.joined_at,
            partitions: Vec::new(),
        });
    }
    for group in groups.values_mut() {
        for index in 0..group.count {
            let key =
                crate::subscription::Partition::new(index, group.count).key(&group.subscriber);
            match leases.iter().find(|l| l.name == key && l.expires_at > now) {
                None => group.unheld.push(index),
                Some(lease) => match group
                    .members
                    .iter_mut()
                    .find(|m| m.instance == lease.instance)
                {
                    Some(member) => member.partitions.push(index),
                    None => group.members.push(GroupMember {
                        owner: lease.owner.clone(),
                        instance: lease.instance.clone(),
                        joined_at: now,
                        partitions: vec![index],
                    }),
                },
            }
        }
        group.members.sort_by(|a, b| a.instance.cmp(&b.instance));
    }
    groups.into_values().collect()
}

/// One subscriber in a [`Report`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubscriberStatus {
    /// Its checkpoint name (`<name>` or `<name>#<i>of<n>`).
    pub name: String,
    /// Its checkpoint.
    pub position: Position,
    /// The read model's layout version (projections only).
    pub version: Option<u32>,
    /// When its checkpoint was last written.
    pub updated_at: DateTime<Utc>,
    /// Events of `$all` after its checkpoint (for a partition: of every
    /// partition, so an upper bound), at most [`BACKLOG_CAP`].
    pub lag_events: u64,
    /// Whether `lag_events` stopped at [`BACKLOG_CAP`].
    pub lag_capped: bool,
    /// How long ago the oldest event after its checkpoint was recorded
    /// (0 when it is at the head).
    pub lag_seconds: f64,
    /// Its lease, if it ever had one.
    pub lease: Option<LeaseRow>,
    /// Whether that lease is current (not expired or released).
    pub lease_active: bool,
    /// Its effects that hold their stream (parked, retry-requested,
    /// blocked): a reactor's, counted for each of its partitions.
    pub held: usize,
    /// Where it stands, from the above.
    pub state: SubscriberState,
}

/// Where a subscriber stands, as far as the store can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriberState {
    /// Effects of it are parked or blocked: they wait for an operator.
    Held,
    /// A worker holds its lease and it is at the head.
    Live,
    /// A worker holds its lease and it is behind the head.
    CatchingUp,
    /// No worker holds its lease (expired or released) and it is behind
    /// the head.
    Stopped,
    /// At the head, and no current lease (or it never used one).
    AtHead,
    /// Behind the head, and it never used a lease: whether it runs cannot
    /// be told.
    Behind,
}

impl SubscriberState {
    /// The state as shown: `held`, `live`, `catching up`, `stopped`,
    /// `at head`, `behind`.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriberState::Held => "held",
            SubscriberState::Live => "live",
            SubscriberState::CatchingUp => "catching up",
            SubscriberState::Stopped => "stopped",
            SubscriberState::AtHead => "at head",
            SubscriberState::Behind => "behind",
        }
    }
}

/// A reactor's effect that holds its stream: parked, retry-requested or
/// blocked behind one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldEffect {
    /// The reactor.
    pub reactor: String,
    /// The event.
    pub event_id: uuid::Uuid,
    /// Its stream.
    pub stream: String,
    /// Its position.
    pub position: Position,
    /// Its type.
    pub event_type: String,
    /// `parked`, `retry_requested` or `blocked`.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

impl From<&Effect> for HeldEffect {
    fn from(e: &Effect) -> Self {
        HeldEffect {
            reactor: e.reactor.clone(),
            event_id: e.event_id,
            stream: e.stream.clone(),
            position: e.position,
            event_type: e.event_type.clone(),
            state: e.state.as_str().to_owned(),
            attempts: e.attempts,
            last_error: e.last_error.clone(),
            updated_at: e.updated_at,
        }
    }
}

/// A projection's event skipped by its policy, as in a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedInfo {
    /// The projection.
    pub subscriber: String,
    /// The event's position.
    pub position: Position,
    /// Its stream.
    pub stream: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its type.
    pub event_type: String,
    /// Why it was skipped.
    pub error: String,
    /// When.
    pub skipped_at: DateTime<Utc>,
}

impl From<SkippedEvent> for SkippedInfo {
    fn from(s: SkippedEvent) -> Self {
        SkippedInfo {
            subscriber: s.subscriber,
            position: s.position,
            stream: s.stream,
            version: s.version,
            event_type: s.event_type,
            error: s.error,
            skipped_at: s.skipped_at,
        }
    }
}

/// The answer of [`settled`]: where every subscriber stands and what waits
/// for an operator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The head of `$all` when the report was taken.
    pub head: Position,
    /// When the report was taken.
    pub taken_at: DateTime<Utc>,
    /// Every subscriber's checkpoint (internal rows left out), by name.
    pub subscribers: Vec<SubscriberStatus>,
    /// Effects that hold their stream (parked, retry-requested, blocked).
    pub held_effects: Vec<HeldEffect>,
    /// Parked process instances.
    pub parked_processes: Vec<ParkedProcess>,
    /// Events projections skipped by policy (they stay listed: skipping is
    /// final, so they do not make the store unsettled).
    pub skipped: Vec<SkippedInfo>,
    /// Parked inbox messages.
    pub parked_messages: Vec<ParkedMessageInfo>,
    /// Consumer groups: their live members and the partitions each holds.
    pub groups: Vec<GroupStatus>,
}

impl Report {
    /// Effects parked (or asked to be retried and not yet run).
    pub fn parked_effects(&self) -> usize {
        self.held_effects
            .iter()
            .filter(|e| e.state != EffectState::Blocked.as_str())
            .count()
    }

    /// Effects blocked behind a parked one of their stream.
    pub fn blocked_effects(&self) -> usize {
        self.held_effects.len() - self.parked_effects()
    }

    /// Whether something waits for an operator: a parked or blocked effect,
    /// a parked process instance or a parked inbox message.
    pub fn needs_attention(&self) -> bool {
        !self.held_effects.is_empty()
            || !self.parked_processes.is_empty()
            || !self.parked_messages.is_empty()
    }

    /// Whether every subscriber is at the head and nothing waits for an
    /// operator.
    pub fn is_settled(&self) -> bool {
        !self.needs_attention() && self.subscribers.iter().all(|s| s.lag_events == 0)
    }

    /// Sets the store's gauges from this report through the `metrics`
    /// facade (see [`crate::trace`]): what every replica would report alike,
    /// so call it where one scrape endpoint answers (after [`settled`]).
    ///
    /// Gauges: `aftermath_effects_parked`, `aftermath_effects_blocked`,
    /// `aftermath_processes_parked`, `aftermath_inbox_parked`,
    /// `aftermath_projection_events_skipped`, and per `subscriber`
    /// `aftermath_store_lag_events`, `aftermath_store_lag_seconds` and
    /// `aftermath_store_held` (its effects holding their stream).
    pub fn record_metrics(&self) {
        metrics::gauge!("aftermath_effects_parked").set(self.parked_effects() as f64);
        metrics::gauge!("aftermath_effects_blocked").set(self.blocked_effects() as f64);
        metrics::gauge!("aftermath_processes_parked").set(self.parked_processes.len() as f64);
        metrics::gauge!("aftermath_inbox_parked").set(self.parked_messages.len() as f64);
        metrics::gauge!("aftermath_projection_events_skipped").set(self.skipped.len() as f64);
        for s in &self.subscribers {
            let name = s.name.clone();
            metrics::gauge!("aftermath_store_lag_events", "subscriber" => name.clone())
                .set(s.lag_events as f64);
            metrics::gauge!("aftermath_store_lag_seconds", "subscriber" => name.clone())
                .set(s.lag_seconds);
            metrics::gauge!("aftermath_store_held", "subscriber" => name).set(s.held as f64);
        }
    }

    /// One line: the counts.
    pub fn summary(&self) -> String {
        let behind = self.subscribers.iter().filter(|s| s.lag_events > 0).count();
        format!(
            "{} subscriber(s), {behind} behind the head; {} parked effect(s), {} blocked, {} parked process instance(s), {} skipped projection event(s), {} parked inbox message(s)",
            self.subscribers.len(),
            self.parked_effects(),
            self.blocked_effects(),
            self.parked_processes.len(),
            self.skipped.len(),
            self.parked_messages.len(),
        )
    }
}

/// Releases the parked process instance whose stream is `stream` (a
/// `<process>.process-<instance>` stream, see
/// [`parked_processes`]): appends the same `Released` record that
/// [`ProcessRunner::retry`](crate::process::ProcessRunner::retry) (`skip`
/// false) or `skip` (`skip` true) appends, without the process manager's
/// types, so an operator's tool can do it. The runner carries the release
/// out when it reads the record: a retry handles the parked input again
/// (or sends the failed command again), a skip drops it; the inputs held
/// behind it follow. `Ok(false)` when the instance is not parked.
pub async fn release_process<S: EventStore + ?Sized>(
    store: &S,
    stream: &str,
    skip: bool,
) -> Result<bool, StoreError> {
    const PAGE: usize = 500;
    let Some((process, instance)) = stream.split_once(".process-") else {
        return Err(StoreError::InvalidStream {
            stream: stream.to_owned(),
            reason: "not a process instance stream (`<process>.process-<instance>`)",
        });
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut open: Option<(u64, u64)> = None;
        let mut version = 0;
        let mut correlation = None;
        loop {
            let page = store
                .read_stream(stream, version + 1, Direction::Forward, PAGE)
                .await?;
            let n = page.len();
            for e in page {
                version = e.version;
                correlation.get_or_insert(e.metadata.correlation_id);
                match ProcessRecord::decode(&e.event_type, &e.payload) {
                    Ok(Some(ProcessRecord::Parked { from_version, .. })) => {
                        open = Some((from_version, e.version));
                    }
                    Ok(Some(ProcessRecord::Released { parked_version, .. }))
                        if open.is_some_and(|(_, p)| p == parked_version) =>
                    {
                        open = None;
                    }
                    _ => {}
                }
            }
            if n < PAGE {
                break;
            }
        }
        let (Some((from_version, parked_version)), Some(correlation)) = (open, correlation) else {
            return Ok(false);
        };
        let record = ProcessRecord::Released {
            from_version,
            parked_version,
            skip,
        };
        let id = crate::process::record::control_id(process, instance, "released", version + 1);
        let metadata = crate::event::Metadata::caused_by(correlation);
        let data = crate::event::EventData::encode(&record, id, metadata).map_err(|_| {
            StoreError::InvalidStream {
                stream: stream.to_owned(),
                reason: "its `Released` record does not encode",
            }
        })?;
        match store
            .append(
                stream,
                crate::store::ExpectedVersion::Exact(version),
                vec![data],
            )
            .await
        {
            Ok(_) => return Ok(true),
            // The runner (or another operator) wrote meanwhile: look again.
            Err(StoreError::WrongExpectedVersion { .. } | StoreError::DuplicateEventId { .. })
                if attempts < 5 => {}
            Err(e) => return Err(e),
        }
    }
}

/// How many pending deadlines [`record_metrics`] counts at most.
pub const DEADLINES_COUNTED: usize = 100_000;

/// Takes a [`settled`] report, sets the store's gauges from it
/// ([`Report::record_metrics`]) and `aftermath_deadlines_pending` per
/// `process` (at most [`DEADLINES_COUNTED`] read), and returns the report.
/// Call it from a scrape endpoint's handler, before rendering.
pub async fn record_metrics<S: Admin>(store: &S) -> Result<Report, StoreError> {
    let report = settled(store).await?;
    report.record_metrics();
    // A process seen before with none pending now reads 0, not its last count.
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut pending: BTreeMap<String, u64> = BTreeMap::new();
    for d in store.deadlines(DEADLINES_COUNTED).await? {
        *pending.entry(d.process).or_default() += 1;
    }
    {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        for process in seen.iter() {
            pending.entry(process.clone()).or_default();
        }
        seen.extend(pending.keys().cloned());
    }
    for (process, n) in pending {
        metrics::gauge!("aftermath_deadlines_pending", "process" => process).set(n as f64);
    }
    Ok(report)
}

/// Is everything settled up to the head? Reads every checkpoint, lease and
/// dead letter of `store` and the events each subscriber has still to
/// handle. See [`Report::is_settled`] and [`Report::needs_attention`].
pub async fn settled<S: Admin>(store: &S) -> Result<Report, StoreError> {
    let taken_at = Utc::now();
    let head = store.head().await?;
    let lease_rows = store.leases().await?;
    let groups = groups(&store.group_members().await?, &lease_rows, taken_at);
    let leases: BTreeMap<String, LeaseRow> = lease_rows
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect();
    let rows: Vec<CheckpointRow> = store
        .checkpoints()
        .await?
        .into_iter()
        .filter(|r| !r.is_internal())
        .collect();
    let reactors: BTreeSet<String> = rows.iter().map(|r| base_name(&r.name).to_owned()).collect();
    let mut held_effects: Vec<HeldEffect> = store
        .parked(None)
        .await?
        .iter()
        .map(HeldEffect::from)
        .collect();
    for reactor in &reactors {
        for e in store.held(reactor).await? {
            if e.state == EffectState::Blocked {
                held_effects.push(HeldEffect::from(&e));
            }
        }
    }
    let mut subscribers = Vec::new();
    for row in rows {
        let backlog = if row.position >= head {
            Backlog {
                events: 0,
                capped: false,
                oldest: None,
            }
        } else {
            store.backlog(row.position, BACKLOG_CAP).await?
        };
        let lease = leases.get(&row.name).cloned();
        let lease_active = lease.as_ref().is_some_and(|l| l.expires_at > taken_at);
        let held = held_effects
            .iter()
            .filter(|e| e.reactor == base_name(&row.name))
            .count();
        let behind = backlog.events > 0;
        let state = match (held > 0, lease_active, lease.is_some(), behind) {
            (true, ..) => SubscriberState::Held,
            (false, true, _, false) => SubscriberState::Live,
            (false, true, _, true) => SubscriberState::CatchingUp,
            (false, false, true, true) => SubscriberState::Stopped,
            (false, false, false, true) => SubscriberState::Behind,
            (false, false, _, false) => SubscriberState::AtHead,
        };
        subscribers.push(SubscriberStatus {
            lease_active,
            held,
            state,
            lease,
            lag_events: backlog.events,
            lag_capped: backlog.capped,
            lag_seconds: backlog.oldest.map_or(0.0, |t| {
                ((taken_at - t).num_milliseconds().max(0) as f64) / 1000.0
            }),
            name: row.name,
            position: row.position,
            version: row.version,
            updated_at: row.updated_at,
        });
    }
    Ok(Report {
        head,
        taken_at,
        subscribers,
        held_effects,
        parked_processes: parked_processes(store).await?,
        skipped: store
            .skipped(None)
            .await?
            .into_iter()
            .map(SkippedInfo::from)
            .collect(),
        parked_messages: store.parked_messages_info().await?,
        groups,
    })
}

/// The process instances that are parked now, of every process manager,
/// oldest parking first: the streams with a `Parked` record that no
/// `Released` record has released since.
pub async fn parked_processes<S: EventStore + ?Sized>(
    store: &S,
) -> Result<Vec<ParkedProcess>, StoreError> {
    const PAGE: usize = 500;
    let mut streams = BTreeSet::new();
    let mut order = Vec::new();
    let mut from = Position::ORIGIN;
    loop {
        let page = store
            .read_all(from, Some(&["aftermath.process.Parked"]), PAGE)
            .await?;
        let n = page.len();
        for e in page {
            from = e.position;
            if streams.insert(e.stream.clone()) {
                order.push(e.stream);
            }
        }
        if n < PAGE {
            break;
        }
    }
    let mut found = Vec::new();
    for stream in order {
        let mut open: Option<ParkedProcess> = None;
        let mut version = 0;
        loop {
            let page = store
                .read_stream(&stream, version + 1, Direction::Forward, PAGE)
                .await?;
            let n = page.len();
            for e in page {
                version = e.version;
                match ProcessRecord::decode(&e.event_type, &e.payload) {
                    Ok(Some(ProcessRecord::Parked { error, .. })) => {
                        open = Some(ParkedProcess {
                            stream: e.stream.clone(),
                            parked_version: e.version,
                            error,
                            parked_at: e.recorded_at,
                        });
                    }
                    Ok(Some(ProcessRecord::Released { parked_version, .. }))
                        if open
                            .as_ref()
                            .is_some_and(|p| p.parked_version == parked_version) =>
                    {
                        open = None;
                    }
                    _ => {}
                }
            }
            if n < PAGE {
                break;
            }
        }
        found.extend(open);
    }
    found.sort_by_key(|p| p.parked_at);
    Ok(found)
}

/// Where a process instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessInstanceState {
    /// Started and neither completed nor parked.
    Running,
    /// Completed: later inputs are ignored.
    Completed,
    /// Parked: waits for an operator.
    Parked,
}

impl ProcessInstanceState {
    /// `running`, `completed` or `parked`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessInstanceState::Running => "running",
            ProcessInstanceState::Completed => "completed",
            ProcessInstanceState::Parked => "parked",
        }
    }
}

/// A process manager's instance, for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessInstanceInfo {
    /// The process manager (`ProcessManager::NAME`).
    pub process: String,
    /// The instance.
    pub instance: String,
    /// Its stream (`<process>.process-<instance>`).
    pub stream: String,
    /// Where it stands.
    pub state: ProcessInstanceState,
    /// Its stream's version.
    pub version: u64,
    /// When its stream was last written.
    pub last_write: DateTime<Utc>,
}

/// The instances of process manager `process` (of every one when `None`),
/// by stream name, at most `limit`, with their state. Lists the streams of
/// the log (every stream when `process` is `None`) and reads the
/// `Completed` and `Parked` records: for operators, not for a hot path.
pub async fn processes<S: Admin>(
    store: &S,
    process: Option<&str>,
    limit: usize,
) -> Result<Vec<ProcessInstanceInfo>, StoreError> {
    const PAGE: usize = 500;
    let category = process.map(|p| format!("{p}.process"));
    let streams = store
        .streams(
            category.as_deref(),
            if process.is_some() { limit } else { usize::MAX },
        )
        .await?;
    let mut completed = BTreeSet::new();
    let mut from = Position::ORIGIN;
    loop {
        let page = store
            .read_all(from, Some(&["aftermath.process.Completed"]), PAGE)
            .await?;
        let n = page.len();
        for e in page {
            from = e.position;
            completed.insert(e.stream);
        }
        if n < PAGE {
            break;
        }
    }
    let parked: BTreeSet<String> = parked_processes(store)
        .await?
        .into_iter()
        .map(|p| p.stream)
        .collect();
    Ok(streams
        .into_iter()
        .filter_map(|s| {
            let (process, instance) = s.stream.split_once(".process-")?;
            let state = if parked.contains(&s.stream) {
                ProcessInstanceState::Parked
            } else if completed.contains(&s.stream) {
                ProcessInstanceState::Completed
            } else {
                ProcessInstanceState::Running
            };
            Some(ProcessInstanceInfo {
                process: process.to_owned(),
                instance: instance.to_owned(),
                state,
                version: s.version,
                last_write: s.last_write,
                stream: s.stream,
            })
        })
        .take(limit)
        .collect())
}
