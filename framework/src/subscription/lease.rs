//! Leases: one active owner per subscriber across processes.
//!
//! A lease row holds the subscriber name, the owner, a fencing token and an
//! expiry. The owner renews it well before it expires; another process takes
//! it over only after it expired, which increments the token. Every
//! checkpoint write of a leased subscriber checks its token in the same
//! transaction, so a stale owner (paused, partitioned) cannot move the
//! checkpoint after losing the lease.

use std::collections::HashMap;
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
    /// Who holds it (unique per worker process).
    pub owner: String,
    /// Fencing token: increases every time the lease changes owner.
    pub token: u64,
    /// When it expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// Storage of leases.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes the lease `name` for `owner` for `ttl` if it is free, expired,
    /// or already `owner`'s. `None` when another owner holds it.
    async fn acquire(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError>;

    /// Extends a held lease; [`StoreError::LeaseLost`] if it is no longer ours.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError>;

    /// Gives the lease up (it expires at once).
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;
}

/// Leases in memory: for tests of several workers in one process.
#[derive(Clone, Default)]
pub struct MemoryLeases {
    rows: Arc<Mutex<HashMap<String, Lease>>>,
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
            Some(row) if row.token == lease.token && row.owner == lease.owner => Ok(()),
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
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        let token = match rows.get(name) {
            Some(row) if row.owner == owner => row.token,
            Some(row) if row.expires_at > now => return Ok(None),
            Some(row) => row.token + 1,
            None => 1,
        };
        let lease = Lease {
            name: name.to_owned(),
            owner: owner.to_owned(),
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
            && row.owner == lease.owner
        {
            row.expires_at = Utc::now();
        }
        Ok(())
    }
}
