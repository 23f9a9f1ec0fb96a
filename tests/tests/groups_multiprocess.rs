//! Consumer groups (issue 16) across worker PROCESSES: a partitioned
//! projection, reactor and saga (16 partitions each, run by the
//! `group_worker` binary) shared by workers that join, leave gracefully and
//! are SIGKILLed while a workload is appended, on PostgreSQL (4 workers at
//! the peak) and on one SQLite file (3 at once). Afterwards it proves:
//!
//! - every effect exactly once: one `gfx_effects` row per account event,
//!   under its idempotency key (calls with a key are counted apart; only a
//!   SIGKILL may repeat a call, and the key absorbs it);
//! - the read model is exact: the balances equal a fold of the log, and
//!   every account event was applied once (its position is unique in
//!   `gbal_applied`, and every one is there);
//! - every saga instance completed, each seat reserved once;
//! - per-stream order: in apply order (a sequence taken at insert), each
//!   stream's versions increase, for the projection and the reactor;
//! - fencing: each applied row recorded, in the projection's transaction,
//!   the partition's lease row: its holder is the applying worker, and per
//!   partition, by position, the token never decreases and each token
//!   belongs to one worker instance (no two members committed a partition in
//!   overlapping lease terms);
//! - balance: with N live workers, each holds 16/N or one more of each
//!   group's partition leases, within a few lease periods.
//!
//! PostgreSQL runs when `AFTERMATH_PG_URL` is set (a set but unreachable
//! URL fails), and prints SKIPPED otherwise. Sizes (events in the log at the
//! end, saga records and command results included):
//! `AFTERMATH_GROUP_EVENTS` (PostgreSQL, default 100,000: about 2 to 2.5
//! minutes on 2 cores) and `AFTERMATH_GROUP_SQLITE_EVENTS` (default 10,000:
//! about 8 s). The workload is appended no faster than 0.8 ms per event, so
//! that every change of the group finds work in flight.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use aftermath::process::record::stream_of;
use aftermath::reactor::idempotency_key;
use aftermath::store::read_all_pages;
use aftermath::subscription::Partition;
use aftermath::{Position, SqliteStore, StoredEvent};
use aftermath_tests::child::Child;
use aftermath_tests::domain::AccountEvent;
use aftermath_tests::groups::{COUNT, EffectsDb, GroupResults, PROJECTION, REACTOR, place_ticket};
use aftermath_tests::postgres::{SchemaGuard, connect, url};
use aftermath_tests::projections::{Model, append_accounts};
use futures::TryStreamExt;

const HELPER: &str = env!("CARGO_BIN_EXE_group_worker");
/// The workers' lease (and membership) ttl.
const TTL: Duration = Duration::from_millis(1500);
/// How soon after a membership change the partitions must be spread
/// fairly again: a few (six) lease periods.
const SETTLE: Duration = Duration::from_millis(6 * TTL.as_millis() as u64);
/// Streams the account events are spread over.
const ACCOUNTS: u64 = 256;
/// Account events per append.
const PER_APPEND: u64 = 10;
/// The least time appending takes per event of the log: the workload is
/// appended over a while (80 s for 100,000 events), so that the three
/// subscribers have work in flight at every change of the group.
const PACE_PER_EVENT: Duration = Duration::from_micros(800);
/// Tasks appending the workload at once.
const APPENDERS: u64 = 3;
/// Log events per saga instance: the ticket, the instance's records
/// (input + command, input + completion) and the seat's event.
const PER_TICKET: u64 = 6;
/// The reactor's concurrency in `group_worker`: at most this many calls in
/// flight per partition when a worker is SIGKILLed.
const REACTOR_CONCURRENCY: u64 = 8;
const SAGA: &str = "reserve";

fn size(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{var}={v}: not a number"))
        })
        .unwrap_or(default)
}

/// What a run does to its workers.
enum Step {
    /// Start a new worker.
    Start,
    /// Ask worker `n` (in start order) to stop, and wait until it did.
    Stop(usize),
    /// SIGKILL worker `n`.
    Kill(usize),
}

/// A worker process of the run.
struct Member {
    child: Child,
    tag: String,
    instance: String,
    live: bool,
}

/// How to start a worker process: the arguments after the tag's position
/// differ per backend.
type Spawn = Box<dyn Fn(&str) -> Child>;

struct Run<S> {
    store: S,
    spawn: Spawn,
    /// Account events and tickets to append.
    accounts: u64,
    tickets: u64,
    /// The least time appending takes (so that the workers' changes happen
    /// while there is work to do, however fast they are).
    pace: Duration,
    /// The steps, each once the projection, the reactor and the saga are
    /// each at least that share through the workload.
    plan: Vec<(f64, Vec<Step>)>,
    members: Vec<Member>,
}

impl<S: GroupResults> Run<S> {
    fn start(&mut self) {
        let tag = format!("w{}", self.members.len());
        let mut child = (self.spawn)(&tag);
        let started = child.expect("STARTED", Duration::from_secs(60));
        let mut parts = started.split(' ');
        assert_eq!(parts.next(), Some(tag.as_str()), "{started}");
        let instance = parts.next().expect("an instance id").to_owned();
        self.members.push(Member {
            child,
            tag,
            instance,
            live: true,
        });
    }

    fn stop(&mut self, n: usize) {
        let m = &mut self.members[n];
        m.child.stop();
        m.child.expect("STOPPED", Duration::from_secs(60));
        assert!(
            m.child.wait(Duration::from_secs(20)).success(),
            "{} exits cleanly",
            m.tag
        );
        m.live = false;
    }

    fn kill(&mut self, n: usize) {
        let m = &mut self.members[n];
        m.child.kill();
        m.live = false;
    }

    fn live(&self) -> Vec<&Member> {
        self.members.iter().filter(|m| m.live).collect()
    }

    /// Appends the workload in the background, from [`APPENDERS`] tasks at
    /// once: rounds of account events and a ticket, interleaved.
    fn append(&self, rt: &tokio::runtime::Runtime) -> tokio::task::JoinHandle<()> {
        let (accounts, tickets, pace) = (self.accounts, self.tickets, self.pace);
        let rounds = tickets.max(1);
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|a| {
                let store = self.store.clone();
                let began = tokio::time::Instant::now();
                rt.spawn(async move {
                    for round in (a..rounds).step_by(APPENDERS as usize) {
                        // Not faster than `pace` for the whole workload.
                        tokio::time::sleep_until(
                            began + pace.mul_f64(round as f64 / rounds as f64),
                        )
                        .await;
                        let (k, until) =
                            (accounts * round / rounds, accounts * (round + 1) / rounds);
                        append_accounts(&store, k, until - k, PER_APPEND, ACCOUNTS).await;
                        if round < tickets {
                            place_ticket(&store, round).await;
                        }
                    }
                })
            })
            .collect();
        rt.spawn(async move {
            for task in tasks {
                task.await.expect("an appender");
            }
        })
    }

    /// Runs the plan while the workload is appended and processed, then
    /// waits until everything is processed.
    fn drive(&mut self, rt: &tokio::runtime::Runtime) {
        let began = Instant::now();
        let appender = self.append(rt);
        let plan = std::mem::take(&mut self.plan);
        for (share, steps) in plan {
            // Each of the three at least `share` through its work, so that
            // every one has work in flight at the change.
            let want = (
                (self.accounts as f64 * share) as u64,
                (self.tickets as f64 * share) as u64,
            );
            let at = self.wait_for(rt, began, &format!("the steps at {share}"), |p| {
                p.0 >= want.0 && p.1 >= want.0 && p.2 >= want.1
            });
            eprintln!(
                "groups: {:?} in: applied {}, effects {}, sagas completed {}; steps at {share}",
                began.elapsed(),
                at.0,
                at.1,
                at.2
            );
            for step in steps {
                match step {
                    Step::Start => self.start(),
                    Step::Stop(n) => self.stop(n),
                    Step::Kill(n) => self.kill(n),
                }
            }
            // The group settles at a fair share while the work goes on.
            let took = self.balanced(rt);
            eprintln!(
                "groups: {:?} in: balanced over {} workers {took:?} after the change",
                began.elapsed(),
                self.live().len()
            );
            self.no_failures();
        }
        rt.block_on(appender).expect("the appender");
        eprintln!("groups: {:?} in: all appended", began.elapsed());
        let want = (self.accounts, self.accounts, self.tickets);
        self.wait_for(rt, began, "everything processed", |p| p == want);
        eprintln!("groups: {:?} in: all processed", began.elapsed());
        self.no_failures();
    }

    /// Polls the progress (applied, effects, sagas completed) until `done`
    /// accepts it, reporting it every 10 s; after 5 minutes, reports what is
    /// missing per partition and fails.
    fn wait_for(
        &mut self,
        rt: &tokio::runtime::Runtime,
        began: Instant,
        what: &str,
        done: impl Fn((u64, u64, u64)) -> bool,
    ) -> (u64, u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut reported = Instant::now();
        loop {
            let p = rt.block_on(self.store.progress());
            if done(p) {
                return p;
            }
            if reported.elapsed() > Duration::from_secs(10) {
                eprintln!(
                    "groups: {:?} in: applied {}/{}, effects {}/{}, sagas completed {}/{}",
                    began.elapsed(),
                    p.0,
                    self.accounts,
                    p.1,
                    self.accounts,
                    p.2,
                    self.tickets
                );
                reported = Instant::now();
            }
            if Instant::now() > deadline {
                self.stall_report(rt);
                panic!("stalled: no {what} within 300 s: at {p:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What is missing, per partition, and who holds its lease.
    fn stall_report(&mut self, rt: &tokio::runtime::Runtime) {
        let log: Vec<StoredEvent> = rt
            .block_on(read_all_pages(&self.store, Position::ORIGIN, None, 2000).try_collect())
            .expect("read $all");
        let applied = rt.block_on(self.store.applied());
        let effects = rt.block_on(self.store.effects());
        let leases = rt.block_on(self.store.leases()).expect("the leases");
        let tags: HashMap<&str, &str> = self
            .members
            .iter()
            .map(|m| (m.instance.as_str(), m.tag.as_str()))
            .collect();
        let mut want: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut count = |group: &str, stream: &str, done: bool| {
            let key = Partition::new(Partition::of(stream, COUNT), COUNT).key(group);
            let row = want.entry(key).or_default();
            row.0 += 1;
            row.1 += usize::from(done);
        };
        let applied: BTreeSet<u64> = applied.iter().map(|a| a.position).collect();
        let effected: BTreeSet<u64> = effects.iter().map(|e| e.position).collect();
        let completed: BTreeSet<&str> = log
            .iter()
            .filter(|e| e.event_type == "aftermath.process.Completed")
            .map(|e| e.stream.as_str())
            .collect();
        for e in &log {
            if e.event_type.starts_with("account.") {
                count(PROJECTION, &e.stream, applied.contains(&e.position.0));
                count(REACTOR, &e.stream, effected.contains(&e.position.0));
            } else if e.event_type == "ticket.Placed" {
                let stream = stream_of(SAGA, e.stream.trim_start_matches("ticket-"));
                count(SAGA, &stream, completed.contains(stream.as_str()));
            }
        }
        let now = chrono::Utc::now();
        for (key, (all, done)) in want {
            let lease = leases.iter().find(|l| l.name == key).map(|l| {
                format!(
                    "{} token {} expires in {} ms",
                    tags.get(l.instance.as_str()).unwrap_or(&"?"),
                    l.token,
                    (l.expires_at - now).num_milliseconds()
                )
            });
            let mark = if done < all { "STALLED" } else { "done" };
            eprintln!("groups: {mark} {key}: {done}/{all}; lease {lease:?}");
        }
        for m in &mut self.members {
            let lines: Vec<String> = m.child.drain().iter().rev().take(3).cloned().collect();
            eprintln!("groups: {} (live {}): last lines {lines:?}", m.tag, m.live);
        }
    }

    fn no_failures(&mut self) {
        for m in &mut self.members {
            let failed: Vec<&String> = m
                .child
                .drain()
                .iter()
                .filter(|l| l.starts_with("FAILED"))
                .collect();
            assert!(failed.is_empty(), "{}: {failed:?}", m.tag);
        }
    }

    /// Waits until each live worker holds `COUNT / n` or one more of every
    /// group's partition leases, and every partition is held; returns how
    /// long it took.
    fn balanced(&self, rt: &tokio::runtime::Runtime) -> Duration {
        let live: Vec<(String, String)> = self
            .live()
            .iter()
            .map(|m| (m.instance.clone(), m.tag.clone()))
            .collect();
        let n = live.len();
        let fair = |k: usize| k == COUNT as usize / n || k == COUNT as usize / n + 1;
        let began = Instant::now();
        let store = self.store.clone();
        loop {
            let rows = rt.block_on(store.leases()).expect("read the leases");
            let now = chrono::Utc::now();
            let mut per: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            let mut held = 0;
            for group in [PROJECTION, REACTOR, SAGA] {
                for (instance, _) in &live {
                    per.insert((group, instance.as_str()), 0);
                }
                for index in 0..COUNT {
                    let key = Partition::new(index, COUNT).key(group);
                    if let Some(row) = rows
                        .iter()
                        .find(|r| r.name == key && r.expires_at > now)
                        .filter(|r| live.iter().any(|(i, _)| *i == r.instance))
                    {
                        *per.get_mut(&(group, row.instance.as_str())).unwrap() += 1;
                        held += 1;
                    }
                }
            }
            if held == 3 * COUNT as usize && per.values().all(|k| fair(*k)) {
                return began.elapsed();
            }
            assert!(
                began.elapsed() < SETTLE,
                "not balanced within {SETTLE:?}: {held} held; per (group, instance): {per:?}; live {live:?}",
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_all(&mut self) {
        let live: Vec<usize> = (0..self.members.len())
            .filter(|n| self.members[*n].live)
            .collect();
        for n in &live {
            self.members[*n].child.stop();
        }
        for n in live {
            let m = &mut self.members[n];
            m.child.expect("STOPPED", Duration::from_secs(60));
            assert!(m.child.wait(Duration::from_secs(20)).success());
            m.live = false;
        }
        self.no_failures();
    }

    /// Every assertion of the module docs.
    fn verify(&self, rt: &tokio::runtime::Runtime, killed: &[usize]) {
        let log: Vec<StoredEvent> = rt
            .block_on(read_all_pages(&self.store, Position::ORIGIN, None, 2000).try_collect())
            .expect("read $all");
        eprintln!("groups: {} events in the log", log.len());
        let accounts: Vec<&StoredEvent> = log
            .iter()
            .filter(|e| e.event_type.starts_with("account."))
            .collect();
        assert_eq!(accounts.len() as u64, self.accounts);

        // The read model: a fold of the log, every event applied once.
        let mut model = Model::default();
        for e in &accounts {
            model.fold(
                &e.decode_known::<AccountEvent>()
                    .expect("an account event decodes"),
            );
        }
        let applied = rt.block_on(self.store.applied());
        let balances = rt.block_on(self.store.balances());
        assert_eq!(
            balances, model.balances,
            "the read model is a fold of the log"
        );
        let mut positions: Vec<u64> = applied.iter().map(|a| a.position).collect();
        positions.sort_unstable();
        assert_eq!(positions, model.applied, "every event applied exactly once");

        // Per-stream order, and each event in its stream's partition.
        let mut versions: HashMap<&str, Vec<u64>> = HashMap::new();
        for a in &applied {
            assert_eq!(
                a.partition,
                Partition::new(Partition::of(&a.stream, COUNT), COUNT).key(PROJECTION),
                "{a:?}"
            );
            versions.entry(&a.stream).or_default().push(a.version);
        }
        for (stream, v) in &versions {
            assert!(
                v.iter().copied().eq(1..=v.len() as u64),
                "{stream}: applied out of order: {v:?}"
            );
        }

        // Fencing.
        let tags: HashMap<&str, &str> = self
            .members
            .iter()
            .map(|m| (m.instance.as_str(), m.tag.as_str()))
            .collect();
        let mut by_partition: BTreeMap<&str, Vec<&aftermath_tests::groups::Applied>> =
            BTreeMap::new();
        for a in &applied {
            assert_eq!(
                a.lease_instance.as_deref(),
                Some(a.instance.as_str()),
                "committed by a worker that did not hold the lease: {a:?}"
            );
            assert_eq!(
                tags.get(a.instance.as_str()),
                Some(&a.tag.as_str()),
                "{a:?}"
            );
            by_partition.entry(&a.partition).or_default().push(a);
        }
        let mut terms = 0;
        for (partition, mut rows) in by_partition {
            rows.sort_by_key(|a| a.position);
            let mut owner: BTreeMap<i64, &str> = BTreeMap::new();
            for w in rows.windows(2) {
                assert!(
                    w[1].token >= w[0].token,
                    "{partition}: the token went back: {:?} then {:?}",
                    w[0],
                    w[1]
                );
            }
            for a in &rows {
                let token = a.token.expect("a lease row");
                let first = *owner.entry(token).or_insert(&a.instance);
                assert_eq!(
                    first, a.instance,
                    "{partition}: token {token} used by two instances"
                );
            }
            let holders: Vec<String> = owner
                .iter()
                .map(|(t, i)| format!("{t}:{}", tags[i]))
                .collect();
            eprintln!("groups: {partition} terms {holders:?}");
            terms += owner.len();
        }
        eprintln!("groups: {terms} lease terms over {COUNT} projection partitions");

        // Every effect once, in stream order.
        let effects = rt.block_on(self.store.effects());
        let by_key: HashMap<&str, &aftermath_tests::groups::Effect> =
            effects.iter().map(|e| (e.key.as_str(), e)).collect();
        assert_eq!(effects.len(), accounts.len(), "one effect per event");
        for e in &accounts {
            let key = idempotency_key(REACTOR, e.id);
            let effect = by_key
                .get(key.as_str())
                .unwrap_or_else(|| panic!("no effect for {} v{}", e.stream, e.version));
            assert_eq!(
                (effect.stream.as_str(), effect.version, effect.position),
                (e.stream.as_str(), e.version, e.position.0)
            );
        }
        // Each SIGKILLed worker had done work when it was killed.
        for n in killed {
            let m = &self.members[*n];
            assert!(
                applied.iter().any(|a| a.instance == m.instance)
                    || effects.iter().any(|e| e.tag == m.tag),
                "the SIGKILLed {} had committed nothing: kill it later",
                m.tag
            );
        }
        let mut versions: HashMap<&str, Vec<u64>> = HashMap::new();
        for e in &effects {
            versions.entry(&e.stream).or_default().push(e.version);
        }
        for (stream, v) in &versions {
            assert!(
                v.iter().copied().eq(1..=v.len() as u64),
                "{stream}: effects out of order: {v:?}"
            );
        }
        let repeated: Vec<&&aftermath_tests::groups::Effect> =
            by_key.values().filter(|e| e.attempts > 1).collect();
        eprintln!(
            "groups: {} effects called more than once (SIGKILLs: {})",
            repeated.len(),
            killed.len()
        );
        assert!(
            repeated.len() as u64 <= killed.len() as u64 * REACTOR_CONCURRENCY * u64::from(COUNT),
            "more repeated calls than calls in flight at the SIGKILLs: {repeated:?}"
        );
        // A graceful hand-over finishes the calls in flight: only a call
        // first made by a SIGKILLed worker may be made again.
        let killed_tags: Vec<&str> = killed
            .iter()
            .map(|n| self.members[*n].tag.as_str())
            .collect();
        for e in &repeated {
            assert!(
                killed_tags.contains(&e.tag.as_str()),
                "called again although its first caller was not killed: {e:?}"
            );
        }

        // Every saga instance complete; each seat reserved once.
        let mut tickets = BTreeSet::new();
        let mut completed: HashMap<&str, usize> = HashMap::new();
        let mut reserved: HashMap<&str, usize> = HashMap::new();
        for e in &log {
            match e.event_type.as_str() {
                "ticket.Placed" => {
                    tickets.insert(e.stream.trim_start_matches("ticket-"));
                }
                "aftermath.process.Completed" => *completed.entry(&e.stream).or_default() += 1,
                "seat.Reserved" => *reserved.entry(&e.stream).or_default() += 1,
                _ => {}
            }
        }
        assert_eq!(tickets.len() as u64, self.tickets);
        for ticket in &tickets {
            let stream = stream_of(SAGA, ticket);
            assert_eq!(
                completed.get(stream.as_str()),
                Some(&1),
                "saga {ticket} completes"
            );
            assert_eq!(
                reserved.get(format!("seat-{ticket}").as_str()),
                Some(&1),
                "seat {ticket}"
            );
        }
        assert_eq!(completed.len(), tickets.len());
    }
}

/// (account events, tickets) for a log of about `total` events.
fn workload(total: u64) -> (u64, u64) {
    let tickets = total / 20;
    (total - tickets * PER_TICKET, tickets)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn groups_of_worker_processes_postgres() {
    let Some(url) = url() else {
        aftermath_tests::skip_notice!(
            "SKIPPED postgres::groups_of_worker_processes_postgres: AFTERMATH_PG_URL not set"
        );
        return;
    };
    let began = Instant::now();
    let rt = runtime();
    let guard = SchemaGuard::new(&url);
    let store = rt.block_on(connect(&url, &guard.schema));
    rt.block_on(EffectsDb::Pg(store.clone()).create());
    let (accounts, tickets) = workload(size("AFTERMATH_GROUP_EVENTS", 100_000));
    let (schema, ttl) = (guard.schema.clone(), TTL.as_millis().to_string());
    let mut run = Run {
        store,
        spawn: Box::new(move |tag| Child::spawn(HELPER, tag, &["pg", &url, &schema, tag, &ttl])),
        accounts,
        tickets,
        pace: PACE_PER_EVENT * (accounts + tickets * PER_TICKET) as u32,
        // 2 workers, 2 more, one leaves, one is killed (the other two take
        // its partitions over), a replacement joins: 3.
        plan: vec![
            (0.0, vec![Step::Start, Step::Start]),
            (0.2, vec![Step::Start, Step::Start]),
            (0.4, vec![Step::Stop(1)]),
            (0.55, vec![Step::Kill(2)]),
            (0.7, vec![Step::Start]),
        ],
        members: Vec::new(),
    };
    run.drive(&rt);
    let settled = run.balanced(&rt);
    eprintln!("groups: balanced {settled:?} after everything was processed");
    run.stop_all();
    run.verify(&rt, &[2]);
    eprintln!("groups: postgres run took {:?}", began.elapsed());
}

#[test]
fn groups_of_worker_processes_sqlite() {
    let began = Instant::now();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = rt.block_on(SqliteStore::open(&path)).unwrap();
    rt.block_on(EffectsDb::Sqlite(store.clone()).create());
    let (accounts, tickets) = workload(size("AFTERMATH_GROUP_SQLITE_EVENTS", 10_000));
    let (db, ttl) = (path.display().to_string(), TTL.as_millis().to_string());
    let mut run = Run {
        store,
        spawn: Box::new(move |tag| Child::spawn(HELPER, tag, &["sqlite", &db, tag, &ttl])),
        accounts,
        tickets,
        pace: PACE_PER_EVENT * (accounts + tickets * PER_TICKET) as u32,
        // At most 3 processes on the file: 2, a third, one killed, a
        // replacement, one leaves, another replacement: 3.
        plan: vec![
            (0.0, vec![Step::Start, Step::Start]),
            (0.2, vec![Step::Start]),
            (0.4, vec![Step::Kill(1)]),
            (0.55, vec![Step::Start]),
            (0.7, vec![Step::Stop(0)]),
            (0.85, vec![Step::Start]),
        ],
        members: Vec::new(),
    };
    run.drive(&rt);
    let settled = run.balanced(&rt);
    eprintln!("groups: balanced {settled:?} after everything was processed");
    run.stop_all();
    run.verify(&rt, &[1]);
    eprintln!("groups: sqlite run took {:?}", began.elapsed());
}
