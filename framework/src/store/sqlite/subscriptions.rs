//! What subscribers persist in a SQLite file: checkpoints, leases, skipped
//! events, and projection transactions (read-model writes and checkpoint
//! committed together through the store's one writer).

use std::ops::Deref;
use std::ptr::NonNull;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension};

use super::SqliteStore;
use crate::event::Position;
use crate::projection::{Commit, ProjectionState, ReadModelDb, SkippedEvent, TxWork};
use crate::store::StoreError;
use crate::subscription::{CheckpointStore, Holder, Lease, LeaseStore, Member};

/// A projection's view of the open transaction: the writer's connection,
/// whose writes commit together with the projection's checkpoint.
/// Dereferences to [`rusqlite::Connection`]; do not `BEGIN`, `COMMIT` or
/// `ROLLBACK` through it.
///
/// SQLite projections run on the store's writer thread: their `apply` may
/// only run SQL through this connection. A call to a store from there (an
/// append, a read, a checkpoint) fails at once with
/// [`StoreError::WriterReentry`] rather than deadlock the writer, and a batch
/// whose `apply` waits for anything else for more than a second is rolled
/// back with the same error.
pub struct SqliteTx {
    /// The writer's connection, exclusively borrowed for the duration of one
    /// job. Only `transact` creates a `SqliteTx`, and only lends it (`&mut`)
    /// to the work, which completes before the borrow ends.
    conn: NonNull<Connection>,
}

// SAFETY: a `SqliteTx` stands for `&mut Connection` (exclusive access), and
// `Connection` is `Send`; it is not `Sync`, so `&SqliteTx` never crosses
// threads while another thread uses it.
unsafe impl Send for SqliteTx {}

impl SqliteTx {
    /// Runs `f` with a handle on `conn` that lives only during the call.
    fn lend<R>(conn: &mut Connection, f: impl FnOnce(&mut SqliteTx) -> R) -> R {
        let mut tx = SqliteTx {
            conn: NonNull::from(conn),
        };
        f(&mut tx)
    }
}

impl Deref for SqliteTx {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        // SAFETY: `conn` points to the writer's connection, exclusively
        // borrowed for as long as this handle exists (see `lend`).
        unsafe { self.conn.as_ref() }
    }
}

pub(super) fn db(operation: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::database(operation, e)
}

pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn from_micros(m: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(m).unwrap_or_default()
}

pub(super) fn position(p: Position) -> i64 {
    i64::try_from(p.0).unwrap_or(i64::MAX)
}

/// Fails with `LeaseLost` unless `lease` is the current lease of its name.
pub(super) fn fence(conn: &Connection, lease: &Lease) -> Result<(), StoreError> {
    let current = conn
        .prepare_cached(
            "SELECT 1 FROM aftermath_leases WHERE name = ?1 AND instance = ?2 AND token = ?3",
        )
        .and_then(|mut s| {
            s.query_row((&lease.name, &lease.instance, lease.token as i64), |_| {
                Ok(())
            })
            .optional()
        })
        .map_err(db("checking the lease"))?;
    match current {
        Some(()) => Ok(()),
        None => Err(StoreError::LeaseLost {
            name: lease.name.clone(),
            owner: lease.owner.clone(),
            token: lease.token,
        }),
    }
}

/// The row of checkpoint `name`, if any.
fn load_row(conn: &Connection, name: &str) -> Result<Option<ProjectionState>, StoreError> {
    conn.prepare_cached("SELECT position, version FROM aftermath_checkpoints WHERE name = ?1")
        .and_then(|mut s| {
            s.query_row([name], |row| {
                Ok(ProjectionState {
                    position: Position(row.get::<_, i64>(0)?.max(0) as u64),
                    version: row.get::<_, Option<u32>>(1)?.unwrap_or(0),
                })
            })
            .optional()
        })
        .map_err(db("loading a checkpoint"))
}

fn save_checkpoint(
    conn: &Connection,
    name: &str,
    at: Position,
    version: Option<u32>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO aftermath_checkpoints (name, position, version, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET position = excluded.position,
             version = excluded.version, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| s.execute((name, position(at), version, micros(Utc::now()))))
    .map_err(db("saving a checkpoint"))?;
    Ok(())
}

fn record_skip(conn: &Connection, skip: &SkippedEvent) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO aftermath_skipped
         (subscriber, position, stream, version, event_type, error, skipped_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute((
            &skip.subscriber,
            position(skip.position),
            &skip.stream,
            skip.version as i64,
            &skip.event_type,
            &skip.error,
            micros(skip.skipped_at),
        ))
    })
    .map_err(db("recording a skipped event"))?;
    Ok(())
}

#[async_trait]
impl ReadModelDb for SqliteStore {
    type Tx = SqliteTx;

    async fn load_state(&self, projection: &str) -> Result<Option<ProjectionState>, StoreError> {
        let name = projection.to_owned();
        self.read(move |conn| load_row(conn, &name)).await
    }

    async fn transact<T: Send + 'static>(
        &self,
        commit: Commit,
        work: TxWork<Self, T>,
    ) -> Result<Result<T, crate::projection::HandlerFailure>, StoreError> {
        self.write_exclusive(move |conn| {
            if let Some(lease) = &commit.lease {
                fence(conn, lease)?;
            }
            // The compare of the fenced commit: the writer is the only
            // connection that writes, and this job holds it until the
            // commit, so nothing moves the rows between this check and the
            // checkpoint write below.
            let found = if commit.expected.is_some() {
                load_row(conn, &commit.projection)?
            } else {
                None
            };
            let found_layout = match &commit.layout {
                Some(guard) => load_row(conn, &guard.key)?,
                None => None,
            };
            commit.check(found, found_layout)?;
            conn.execute_batch("SAVEPOINT aftermath_projection")
                .map_err(db("opening the projection's savepoint"))?;
            // The work only runs SQL on this thread's connection, so its
            // future completes without waiting on anything else; one that
            // waits is given up (see `writer::block_on_job`).
            let outcome = SqliteTx::lend(conn, |tx| {
                super::writer::block_on_job(work(tx), super::writer::JOB_WAIT_LIMIT)
            })?;
            match outcome {
                Err(failure) => {
                    conn.execute_batch(
                        "ROLLBACK TO aftermath_projection; RELEASE aftermath_projection",
                    )
                    .map_err(db("rolling back a failed projection batch"))?;
                    Ok(Err(failure))
                }
                Ok(value) => {
                    conn.execute_batch("RELEASE aftermath_projection")
                        .map_err(db("releasing the projection's savepoint"))?;
                    save_checkpoint(
                        conn,
                        &commit.projection,
                        commit.position,
                        Some(commit.version),
                    )?;
                    if let Some(skip) = &commit.skipped {
                        record_skip(conn, skip)?;
                    }
                    Ok(Ok(value))
                }
            }
        })
        .await
    }

    async fn skipped(&self, subscriber: Option<&str>) -> Result<Vec<SkippedEvent>, StoreError> {
        let subscriber = subscriber.map(str::to_owned);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT subscriber, position, stream, version, event_type, error, skipped_at
                     FROM aftermath_skipped WHERE ?1 IS NULL OR subscriber = ?1
                     ORDER BY skipped_at, subscriber, position",
                )
                .map_err(db("listing skipped events"))?;
            let rows = stmt
                .query_map([&subscriber], |row| {
                    Ok(SkippedEvent {
                        subscriber: row.get(0)?,
                        position: Position(row.get::<_, i64>(1)?.max(0) as u64),
                        stream: row.get(2)?,
                        version: row.get::<_, i64>(3)?.max(0) as u64,
                        event_type: row.get(4)?,
                        error: row.get(5)?,
                        skipped_at: from_micros(row.get(6)?),
                    })
                })
                .map_err(db("listing skipped events"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(db("listing skipped events"))
        })
        .await
    }
}

#[async_trait]
impl CheckpointStore for SqliteStore {
    async fn load_checkpoint(&self, subscriber: &str) -> Result<Option<Position>, StoreError> {
        Ok(ReadModelDb::load_state(self, subscriber)
            .await?
            .map(|s| s.position))
    }

    async fn save(
        &self,
        subscriber: &str,
        expected: Option<Position>,
        at: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        let name = subscriber.to_owned();
        let lease = lease.cloned();
        // One writer job: the compare and the write cannot interleave with
        // another write.
        self.write(move |conn| {
            if let Some(lease) = &lease {
                fence(conn, lease)?;
            }
            if expected.is_some() {
                let found = load_row(conn, &name)?.map(|s| s.position);
                crate::subscription::checkpoint::check_expected(&name, expected, found)?;
            }
            save_checkpoint(conn, &name, at, None)
        })
        .await
    }
}

fn expiry(ttl: Duration) -> i64 {
    micros(Utc::now()).saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX))
}

/// This machine's boot id and the start time of process `pid` (clock ticks
/// since boot), as `<boot id>:<start>`: with the pid, names one process
/// for as long as the machine runs (a reused pid has another start time).
/// `None` where `/proc` does not tell (not Linux) or the process is gone.
fn process_identity(pid: u32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime); the command name (field 2) may hold spaces, so
    // count from its closing parenthesis.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let start = after_name.split_whitespace().nth(19)?;
    Some(format!("{}:{start}", boot.trim()))
}

/// This machine's boot id, if known.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|b| b.trim().to_owned())
}

/// Whether the lease holder recorded as (`pid`, `identity`) is known to be
/// gone: it ran on this machine since its last boot, and no process with
/// that pid and start time exists any more. `false` when it cannot be told
/// (another machine, not Linux, an old row without a holder).
fn holder_gone(pid: Option<i64>, identity: Option<&str>) -> bool {
    let (Some(pid), Some(identity), Some(boot)) = (pid, identity, boot_id()) else {
        return false;
    };
    let Some((recorded_boot, _)) = identity.split_once(':') else {
        return false;
    };
    if recorded_boot != boot {
        return false;
    }
    let Ok(pid) = u32::try_from(pid) else {
        return false;
    };
    process_identity(pid).as_deref() != Some(identity)
}

/// Leases in the SQLite file. Besides the owner name and instance, a row
/// records the holder's OS process (pid, boot id and start time): an
/// acquirer on the same machine takes a lease over at once when that
/// process is gone (see [`crate::subscription::lease`]).
#[async_trait]
impl LeaseStore for SqliteStore {
    async fn acquire(
        &self,
        name: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let name = name.to_owned();
        let holder = holder.clone();
        let pid = std::process::id();
        let identity = process_identity(pid);
        // One writer job in the writer's `BEGIN IMMEDIATE` transaction: the
        // read and the write below cannot interleave with another process's.
        self.write(move |conn| {
            let now = micros(Utc::now());
            let expires_at = expiry(ttl);
            type Row = (String, i64, i64, Option<i64>, Option<String>);
            let row: Option<Row> = conn
                .prepare_cached(
                    "SELECT instance, token, expires_at, holder_pid, holder_start
                     FROM aftermath_leases WHERE name = ?1",
                )
                .and_then(|mut s| {
                    s.query_row([&name], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()
                })
                .map_err(db("acquiring a lease"))?;
            let token = match row {
                None => 1,
                // Ours: keep the token.
                Some((instance, token, ..)) if instance == holder.instance => token,
                // Expired, or its holder's process is gone: take it over.
                Some((_, token, expires, pid, identity))
                    if expires <= now || holder_gone(pid, identity.as_deref()) =>
                {
                    token + 1
                }
                Some(_) => return Ok(None),
            };
            conn.prepare_cached(
                "INSERT INTO aftermath_leases
                     (name, owner, instance, token, expires_at, holder_pid, holder_start)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,
                     instance = excluded.instance, token = excluded.token,
                     expires_at = excluded.expires_at, holder_pid = excluded.holder_pid,
                     holder_start = excluded.holder_start",
            )
            .and_then(|mut s| {
                s.execute((
                    &name,
                    &holder.owner,
                    &holder.instance,
                    token,
                    expires_at,
                    i64::from(pid),
                    &identity,
                ))
            })
            .map_err(db("acquiring a lease"))?;
            Ok(Some(Lease {
                name,
                owner: holder.owner,
                instance: holder.instance,
                token: token as u64,
                expires_at: from_micros(expires_at),
            }))
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError> {
        let lease = lease.clone();
        self.write(move |conn| {
            let expires_at = expiry(ttl);
            let updated = conn
                .prepare_cached(
                    "UPDATE aftermath_leases SET expires_at = ?4 WHERE name = ?1 AND instance = ?2 AND token = ?3",
                )
                .and_then(|mut s| s.execute((&lease.name, &lease.instance, lease.token as i64, expires_at)))
                .map_err(db("renewing a lease"))?;
            if updated == 0 {
                return Err(StoreError::LeaseLost {
                    name: lease.name,
                    owner: lease.owner,
                    token: lease.token,
                });
            }
            Ok(Lease {
                expires_at: from_micros(expires_at),
                ..lease
            })
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE aftermath_leases SET expires_at = 0 WHERE name = ?1 AND instance = ?2 AND token = ?3",
            )
            .and_then(|mut s| s.execute((&lease.name, &lease.instance, lease.token as i64)))
            .map_err(db("releasing a lease"))?;
            Ok(())
        })
        .await
    }

    async fn heartbeat(
        &self,
        group: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Vec<Member>, StoreError> {
        let group = group.to_owned();
        let holder = holder.clone();
        let pid = std::process::id();
        let identity = process_identity(pid);
        self.write(move |conn| {
            let now = micros(Utc::now());
            let failed = || db("sending a group heartbeat");
            conn.prepare_cached(
                "INSERT INTO aftermath_members AS m
                     (group_name, instance, owner, joined_at, expires_at, holder_pid, holder_start)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (group_name, instance) DO UPDATE SET owner = excluded.owner,
                     joined_at = CASE WHEN m.expires_at <= ?4 THEN ?4 ELSE m.joined_at END,
                     expires_at = excluded.expires_at, holder_pid = excluded.holder_pid,
                     holder_start = excluded.holder_start",
            )
            .and_then(|mut s| {
                s.execute((
                    &group,
                    &holder.instance,
                    &holder.owner,
                    now,
                    expiry(ttl),
                    i64::from(pid),
                    &identity,
                ))
            })
            .map_err(failed())?;
            // Rows expired for an hour are dropped.
            conn.prepare_cached(
                "DELETE FROM aftermath_members WHERE group_name = ?1 AND expires_at < ?2",
            )
            .and_then(|mut s| s.execute((&group, now - 3_600_000_000)))
            .map_err(failed())?;
            live_members(conn, Some(&group), now)
        })
        .await
    }

    async fn leave(&self, group: &str, holder: &Holder) -> Result<(), StoreError> {
        let group = group.to_owned();
        let instance = holder.instance.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "DELETE FROM aftermath_members WHERE group_name = ?1 AND instance = ?2",
            )
            .and_then(|mut s| s.execute((&group, &instance)))
            .map_err(db("leaving a group"))?;
            Ok(())
        })
        .await
    }

    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.read(|conn| live_members(conn, None, micros(Utc::now())))
            .await
    }
}

/// The live members of `group` (every group without one), ordered by
/// group and instance: not expired at `now`, and not known gone.
fn live_members(
    conn: &Connection,
    group: Option<&str>,
    now: i64,
) -> Result<Vec<Member>, StoreError> {
    type Row = (
        String,
        String,
        String,
        i64,
        i64,
        Option<i64>,
        Option<String>,
    );
    let found: Vec<Row> = rows(
        conn,
        "reading group members",
        "SELECT group_name, owner, instance, joined_at, expires_at, holder_pid, holder_start
         FROM aftermath_members
         WHERE (?1 IS NULL OR group_name = ?1) AND expires_at > ?2
         ORDER BY group_name, instance",
        (group, now),
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        },
    )?;
    Ok(found
        .into_iter()
        .filter(|(.., pid, identity)| !holder_gone(*pid, identity.as_deref()))
        .map(|(group, owner, instance, joined, expires, ..)| Member {
            group,
            owner,
            instance,
            joined_at: from_micros(joined),
            expires_at: from_micros(expires),
        })
        .collect())
}

fn rows<T>(
    conn: &Connection,
    operation: &'static str,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db(operation))?;
    let found = stmt
        .query_map(params, map)
        .map_err(db(operation))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db(operation))?;
    Ok(found)
}

/// Operators' reads (see [`crate::admin`]): plain queries on a read
/// connection, never a write.
#[async_trait]
impl crate::admin::Admin for SqliteStore {
    async fn group_members(&self) -> Result<Vec<Member>, StoreError> {
        LeaseStore::members(self).await
    }

    async fn deadlines(&self, limit: usize) -> Result<Vec<crate::process::Deadline>, StoreError> {
        self.all_deadlines(limit).await
    }

    async fn checkpoints(&self) -> Result<Vec<crate::admin::CheckpointRow>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                "listing checkpoints",
                "SELECT name, position, version, updated_at FROM aftermath_checkpoints ORDER BY name",
                [],
                |row| {
                    Ok(crate::admin::CheckpointRow {
                        name: row.get(0)?,
                        position: Position(row.get::<_, i64>(1)?.max(0) as u64),
                        version: row.get(2)?,
                        updated_at: from_micros(row.get(3)?),
                    })
                },
            )
        })
        .await
    }

    async fn leases(&self) -> Result<Vec<crate::admin::LeaseRow>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                "listing leases",
                "SELECT name, owner, instance, token, expires_at FROM aftermath_leases ORDER BY name",
                [],
                |row| {
                    Ok(crate::admin::LeaseRow {
                        name: row.get(0)?,
                        owner: row.get(1)?,
                        instance: row.get(2)?,
                        token: row.get::<_, i64>(3)?.max(0) as u64,
                        expires_at: from_micros(row.get(4)?),
                    })
                },
            )
        })
        .await
    }

    async fn backlog(
        &self,
        after: Position,
        cap: u64,
    ) -> Result<crate::admin::Backlog, StoreError> {
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let (events, oldest): (i64, Option<i64>) = conn
                .prepare_cached(
                    "SELECT count(*), (SELECT recorded_at FROM events WHERE position > ?1 ORDER BY position LIMIT 1)
                     FROM (SELECT 1 FROM events WHERE position > ?1 ORDER BY position LIMIT ?2)",
                )
                .and_then(|mut s| s.query_row((position(after), cap), |r| Ok((r.get(0)?, r.get(1)?))))
                .map_err(db("counting the events after a checkpoint"))?;
            Ok(crate::admin::Backlog {
                events: events.max(0) as u64,
                capped: events >= cap,
                oldest: oldest.map(from_micros),
            })
        })
        .await
    }

    async fn streams(
        &self,
        category: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::admin::StreamInfo>, StoreError> {
        let prefix = category.map(|c| format!("{c}-"));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            rows(
                conn,
                "listing streams",
                "SELECT stream, max(version), count(*), max(recorded_at) FROM events
                 WHERE ?1 IS NULL OR substr(stream, 1, length(?1)) = ?1
                 GROUP BY stream ORDER BY stream LIMIT ?2",
                (&prefix, limit),
                |row| {
                    Ok(crate::admin::StreamInfo {
                        stream: row.get(0)?,
                        version: row.get::<_, i64>(1)?.max(0) as u64,
                        events: row.get::<_, i64>(2)?.max(0) as u64,
                        last_write: from_micros(row.get(3)?),
                    })
                },
            )
        })
        .await
    }

    async fn parked_messages_info(
        &self,
    ) -> Result<Vec<crate::admin::ParkedMessageInfo>, StoreError> {
        self.read(|conn| {
            rows(
                conn,
                "listing parked inbox messages",
                "SELECT inbox, message_id, subject, error, parked_at FROM aftermath_inbox_parked
                 ORDER BY parked_at, inbox, message_id",
                [],
                |row| {
                    Ok(crate::admin::ParkedMessageInfo {
                        inbox: row.get(0)?,
                        message_id: row.get(1)?,
                        subject: row.get(2)?,
                        error: row.get(3)?,
                        parked_at: from_micros(row.get(4)?),
                    })
                },
            )
        })
        .await
    }
}
