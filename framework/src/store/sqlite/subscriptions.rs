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
use crate::subscription::{CheckpointStore, Lease, LeaseStore};

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
            "SELECT 1 FROM aftermath_leases WHERE name = ?1 AND owner = ?2 AND token = ?3",
        )
        .and_then(|mut s| {
            s.query_row((&lease.name, &lease.owner, lease.token as i64), |_| Ok(()))
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
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT position, version FROM aftermath_checkpoints WHERE name = ?1",
            )
            .and_then(|mut s| {
                s.query_row([&name], |row| {
                    Ok(ProjectionState {
                        position: Position(row.get::<_, i64>(0)?.max(0) as u64),
                        version: row.get::<_, Option<u32>>(1)?.unwrap_or(0),
                    })
                })
                .optional()
            })
            .map_err(db("loading a projection's checkpoint"))
        })
        .await
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
    async fn load(&self, subscriber: &str) -> Result<Option<Position>, StoreError> {
        Ok(ReadModelDb::load_state(self, subscriber)
            .await?
            .map(|s| s.position))
    }

    async fn save(
        &self,
        subscriber: &str,
        at: Position,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        let name = subscriber.to_owned();
        let lease = lease.cloned();
        self.write(move |conn| {
            if let Some(lease) = &lease {
                fence(conn, lease)?;
            }
            save_checkpoint(conn, &name, at, None)
        })
        .await
    }
}

fn expiry(ttl: Duration) -> i64 {
    micros(Utc::now()).saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX))
}

#[async_trait]
impl LeaseStore for SqliteStore {
    async fn acquire(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.write(move |conn| {
            let expires_at = expiry(ttl);
            // Free, expired, or already ours: take it; a new owner bumps the token.
            let token = conn
                .prepare_cached(
                    "INSERT INTO aftermath_leases (name, owner, token, expires_at) VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT (name) DO UPDATE SET
                         token = CASE WHEN aftermath_leases.owner = excluded.owner
                                      THEN aftermath_leases.token ELSE aftermath_leases.token + 1 END,
                         owner = excluded.owner,
                         expires_at = excluded.expires_at
                     WHERE aftermath_leases.owner = excluded.owner OR aftermath_leases.expires_at <= ?4
                     RETURNING token",
                )
                .and_then(|mut s| {
                    s.query_row((&name, &owner, expires_at, micros(Utc::now())), |row| {
                        row.get::<_, i64>(0)
                    })
                    .optional()
                })
                .map_err(db("acquiring a lease"))?;
            Ok(token.map(|token| Lease {
                name,
                owner,
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
                    "UPDATE aftermath_leases SET expires_at = ?4 WHERE name = ?1 AND owner = ?2 AND token = ?3",
                )
                .and_then(|mut s| s.execute((&lease.name, &lease.owner, lease.token as i64, expires_at)))
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
                "UPDATE aftermath_leases SET expires_at = 0 WHERE name = ?1 AND owner = ?2 AND token = ?3",
            )
            .and_then(|mut s| s.execute((&lease.name, &lease.owner, lease.token as i64)))
            .map_err(db("releasing a lease"))?;
            Ok(())
        })
        .await
    }
}
