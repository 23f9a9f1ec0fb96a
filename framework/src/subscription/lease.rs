//! Leases: one active owner per subscriber across processes.
//!
//! A lease row holds the subscriber name, the holder (an owner name and an
//! instance id), a fencing token and an expiry. The holder renews it well
//! before it expires; another instance takes it over only after it expired,
//! or at once when the store can tell that the holder is gone, which
//! increments the token. Every checkpoint and journal write of a leased
//! subscriber checks its token in the same transaction, so a stale holder
//! (paused, partitioned, or a second process with the same owner name)
//! cannot move the checkpoint after losing the lease.
//!
//! # Owner names and instances
//!
//! The owner name is for people: it says in the lease table (and in logs)
//! which worker holds what, e.g. a host or pod name, and may be fixed
//! across restarts. It does not fence anything. The fencing identity is the
//! [`Holder::instance`], unique per running worker (a random id drawn when
//! the worker is built): two processes configured with the same owner name
//! are two instances, so at most one of them holds a lease, and the other's
//! renewals and fenced writes fail with
//! [`StoreError::LeaseLost`]. Only the
//! same instance re-acquires its own lease without a takeover.
//!
//! # Fast takeover
//!
//! Where the store can tell that a holder is gone, a new instance takes its
//! lease over at once instead of waiting for it to expire:
//! - SQLite records the holder's OS process (pid, plus the machine's boot
//!   id and the process's start time, so a reused pid is not mistaken for
//!   it) and takes over when that process no longer exists. Only on Linux,
//!   and only on the same machine (a SQLite file is local; another boot id
//!   means another machine, which waits for the expiry).
//! - PostgreSQL records the backend pid and start time of a presence
//!   session: one connection per store handle (and its clones) kept open
//!   while it holds leases. When the holder's process dies its session ends,
//!   and an acquirer that no longer finds it in `pg_stat_activity` takes
//!   over.
//! - Elsewhere (memory, or when the store cannot tell), after the TTL.
//!
//! A wrong "gone" (the presence session dropped while its process lives)
//! costs only a takeover: the old holder's next fenced write or renewal
//! fails with `LeaseLost` and it stands by.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::store::StoreError;

/// A held lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The subscriber (or partition) it is for.
    pub name: String,
    /// Who holds it: the holder's owner name (for people, see
    /// [`Holder::owner`]).
    pub owner: String,
    /// The holder's instance id: what fences (see [`Holder::instance`]).
    pub instance: String,
    /// Fencing token: increases every time the lease changes owner.
    pub token: u64,
    /// When it expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// Who asks for a lease: an owner name for people and an instance id that
/// fences (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The owner name shown in the lease table and logs: may be fixed
    /// (a host or pod name), and may be shared by several processes.
    pub owner: String,
    /// Unique per running instance: two holders with the same owner name
    /// but different instances are different holders.
    pub instance: String,
}

impl Holder {
    /// A holder named `owner` with a fresh random instance id.
    pub fn new(owner: impl Into<String>) -> Self {
        Holder {
            owner: owner.into(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
}

/// Storage of leases.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes the lease `name` for `holder` for `ttl` if it is free,
    /// expired, held by an instance the store knows is gone, or already
    /// this instance's. `None` when another instance holds it (also one
    /// with the same owner name).
    async fn acquire(
        &self,
        name: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError>;

    /// Extends a held lease; [`StoreError::LeaseLost`] if it is no longer ours.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError>;

    /// Gives the lease up (it expires at once).
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Records `holder` as a live member of the consumer group `group` for
    /// `ttl` from now (joining it when it is not a member), and returns the
    /// group's live members, this one included, ordered by instance id.
    /// A member is live until its last heartbeat's `ttl` has passed, or
    /// until the store can tell that its process is gone (as for leases).
    /// See [`crate::subscription::group`].
    async fn heartbeat(
        &self,
        group: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Vec<Member>, StoreError>;

    /// Removes `holder` from `group` at once (a graceful leave: the others
    /// take its partitions over at their next heartbeat, without waiting
    /// for its membership to expire). No error when it is not a member.
    async fn leave(&self, group: &str, holder: &Holder) -> Result<(), StoreError>;

    /// The live members of every group, ordered by group and instance (for
    /// operators: `aftermath status`).
    async fn members(&self) -> Result<Vec<Member>, StoreError>;
}

/// A live member of a consumer group: one worker that runs the group's
/// partitioned subscriber (see [`crate::subscription::group`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The group: `<subscriber>#*of<count>`.
    pub group: String,
    /// The member's owner name (for people).
    pub owner: String,
    /// The member's instance id (unique per running worker).
    pub instance: String,
    /// When it joined (its first heartbeat since it last left or expired).
    pub joined_at: DateTime<Utc>,
    /// When its membership expires unless it sends another heartbeat.
    pub expires_at: DateTime<Utc>,
}

/// Leases in memory: for tests of several workers in one process.
#[derive(Clone, Default)]
pub struct MemoryLeases {
    rows: Arc<Mutex<HashMap<String, Lease>>>,
    members: Arc<Mutex<BTreeMap<(String, String), Member>>>,
}

impl MemoryLeases {
    /// No leases held.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that `lease` is still current.
    pub fn check(&self, lease: &Lease) -> Result<(), StoreError> {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        match rows.get(&lease.name) {
            Some(row) if row.token == lease.token && row.instance == lease.instance => Ok(()),
            _ => Err(StoreError::LeaseLost {
                name: lease.name.clone(),
                owner: lease.owner.clone(),
                token: lease.token,
            }),
        }
    }
}

fn expiry(ttl: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

#[async_trait]
impl LeaseStore for MemoryLeases {
    async fn acquire(
        &self,
        name: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        let token = match rows.get(name) {
            Some(row) if row.instance == holder.instance => row.token,
            Some(row) if row.expires_at > now => return Ok(None),
            Some(row) => row.token + 1,
            None => 1,
        };
        let lease = Lease {
            name: name.to_owned(),
            owner: holder.owner.clone(),
            instance: holder.instance.clone(),
            token,
            expires_at: expiry(ttl),
        };
        rows.insert(name.to_owned(), lease.clone());
        Ok(Some(lease))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError> {
        self.check(lease)?;
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let renewed = Lease {
            expires_at: expiry(ttl),
            ..lease.clone()
        };
        rows.insert(lease.name.clone(), renewed.clone());
        Ok(renewed)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(row) = rows.get_mut(&lease.name)
            && row.token == lease.token
            && row.instance == lease.instance
        {
            row.expires_at = Utc::now();
        }
        Ok(())
    }

    async fn heartbeat(
        &self,
        group: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Vec<Member>, StoreError> {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        members.retain(|_, m| m.expires_at > now);
        let key = (group.to_owned(), holder.instance.clone());
        let joined_at = members.get(&key).map_or(now, |m| m.joined_at);
        members.insert(
            key,
            Member {
                group: group.to_owned(),
                owner: holder.owner.clone(),
                instance: holder.instance.clone(),
                joined_at,
                expires_at: expiry(ttl),
            },
        );
        Ok(members
            .values()
            .filter(|m| m.group == group)
            .cloned()
            .collect())
    }

    async fn leave(&self, group: &str, holder: &Holder) -> Result<(), StoreError> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(group.to_owned(), holder.instance.clone()));
        Ok(())
    }

    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let now = Utc::now();
        Ok(self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|m| m.expires_at > now)
            .cloned()
            .collect())
    }
}
