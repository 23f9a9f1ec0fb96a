//! Consumer groups: the workers that run one partitioned subscriber share its
//! partitions fairly, and hand them over when a worker joins, leaves or dies.
//!
//! # Protocol
//!
//! A subscriber split into `count` [`Partition`]s forms the group
//! `<name>#*of<count>` ([`group_name`]). Every worker that runs it with leases
//! (see [`Worker::add_partitioned`](crate::worker::Worker::add_partitioned)):
//!
//! 1. sends a heartbeat ([`LeaseStore::heartbeat`]) every `ttl / 3`: a row per
//!    worker in the same database as the leases, live for `ttl`, or until the
//!    store can tell that the worker's process is gone (PostgreSQL: its
//!    presence session ended; SQLite: its process, on the same machine);
//! 2. computes the assignment from the live members the heartbeat returned
//!    ([`assign`]): members ordered by instance id, member `k` of `n` gets the
//!    contiguous partitions `k * count / n .. (k + 1) * count / n`, so every
//!    member holds `count / n` or one more;
//! 3. starts the partitions assigned to it (each waits for its own lease,
//!    as any leased subscriber does) and stops the ones that are not (the
//!    batch in flight commits, then the lease is released, so the new
//!    assignee takes it over at its next lease poll, without waiting for the
//!    lease to expire);
//! 4. on graceful shutdown, leaves the group first (the others reassign at
//!    their next heartbeat), then stops its partitions and releases them.
//!
//! A worker that dies stops heart-beating: after its membership expires
//! (`ttl`, sooner where the store can tell that its process is gone) the
//! others reassign its partitions, and each new assignee takes the lease over
//! once it expired or its holder is known gone.
//!
//! # What is safe and what is only fair
//!
//! The assignment only decides who *tries*: members see the membership at
//! slightly different times, so for a moment two may both want a partition,
//! or none. Safety does not depend on it. A partition runs only under its
//! lease, and every checkpoint, read-model commit and journal write checks
//! the lease's fencing token in the same transaction, so a partition moves
//! only after its old holder has stopped committing: its release (graceful),
//! or its lease expiry or known death, after which its late writes fail with
//! [`StoreError::LeaseLost`](crate::store::StoreError::LeaseLost). Views
//! agree again within one heartbeat period, and the partitions settle at
//! `count / n` (± 1) per member within a few lease periods of the last change.
//!
//! The assignment is not sticky: a join or leave may move partitions between
//! members that both stay (as Kafka's eager range assignor does). A move costs
//! one graceful stop and one lease poll.

use super::lease::Member;
#[allow(unused_imports)] // doc links
use super::{lease::LeaseStore, partition::Partition};

/// The consumer group of subscriber `name` split into `count` partitions:
/// `<name>#*of<count>`. Workers of another partition count form another
/// group (a layout change is a change of group).
///
/// ```
/// assert_eq!(aftermath::subscription::group_name("balances", 16), "balances#*of16");
/// ```
pub fn group_name(name: &str, count: u32) -> String {
    format!("{name}#*of{count}")
}

/// The partitions (of `count`) that member `instance` should run, given the
/// group's live `members`: with the members ordered by instance id, member
/// `k` of `n` gets `k * count / n .. (k + 1) * count / n`. Empty when
/// `instance` is not among `members` (it is not live: it should run
/// nothing).
///
/// ```
/// use aftermath::subscription::{assign, Member};
/// # let member = |id: &str| Member { group: "g".into(), owner: "o".into(), instance: id.into(),
/// #     joined_at: chrono::Utc::now(), expires_at: chrono::Utc::now() };
/// let members = vec![member("b"), member("a"), member("c")];
/// assert_eq!(assign(16, &members, "a"), (0..5).collect::<Vec<_>>());
/// assert_eq!(assign(16, &members, "b"), (5..10).collect::<Vec<_>>());
/// assert_eq!(assign(16, &members, "c"), (10..16).collect::<Vec<_>>());
/// assert!(assign(16, &members, "gone").is_empty());
/// ```
pub fn assign(count: u32, members: &[Member], instance: &str) -> Vec<u32> {
    let mut ids: Vec<&str> = members.iter().map(|m| m.instance.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let Some(k) = ids.iter().position(|id| *id == instance) else {
        return Vec::new();
    };
    let (n, k, count) = (ids.len() as u64, k as u64, u64::from(count));
    let first = (k * count / n) as u32;
    let end = ((k + 1) * count / n) as u32;
    (first..end).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                group: "g".into(),
                owner: "o".into(),
                instance: format!("m{i:03}"),
                joined_at: Utc::now(),
                expires_at: Utc::now(),
            })
            .collect()
    }

    #[test]
    fn every_partition_once_and_fair() {
        for count in [1u32, 2, 3, 4, 7, 16, 33, 64] {
            for n in 1..=20usize {
                let ms = members(n);
                let mut seen = vec![0u32; count as usize];
                let mut sizes = Vec::new();
                for m in &ms {
                    let mine = assign(count, &ms, &m.instance);
                    sizes.push(mine.len() as u32);
                    for p in mine {
                        seen[p as usize] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{count} over {n}: {seen:?}");
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "{count} over {n}: {sizes:?}");
                assert_eq!(*lo, count / n as u32, "{count} over {n}");
            }
        }
    }

    #[test]
    fn order_of_the_list_does_not_matter() {
        let mut ms = members(5);
        let before: Vec<_> = ms.iter().map(|m| assign(16, &ms, &m.instance)).collect();
        ms.reverse();
        let after: Vec<_> = ms
            .iter()
            .rev()
            .map(|m| assign(16, &ms, &m.instance))
            .collect();
        assert_eq!(before, after);
        assert_eq!(group_name("x", 4), "x#*of4");
    }
}
