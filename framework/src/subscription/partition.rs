//! Partitioned subscribers: one subscriber split into `count` partitions by
//! a stable hash of the stream name, so that `count` workers share its load
//! while the events of each stream stay in one partition, in order.
//!
//! Each partition has its own checkpoint and lease, keyed
//! `<name>#<index>of<count>` ([`Partition::key`]). Every backend agrees on
//! which partition a stream belongs to: the hash is FNV-1a 64 of the
//! stream name's UTF-8 bytes, finished with MurmurHash3's 64-bit finalizer
//! ([`stream_hash`]), and partition `i` of `n` holds the streams whose hash
//! lies in the `i`-th of `n` equal ranges of `u64` ([`Partition::of`]:
//! `hash * n >> 64`); a range is one `BETWEEN` in SQL
//! ([`Partition::hash_range`]).
//!
//! The finalizer matters: FNV-1a alone barely mixes the last bytes of a
//! name into its top bits (nor anything but their lowest bits into its
//! lowest bit), so names that differ at the end, like `account-0` to
//! `account-3999`, fell 800 / 690 / 1400 / 1110 into 4 ranges; with the
//! finalizer every bit depends on every byte (980 / 1010 / 989 / 1021).
//!
//! Stores read a partition with
//! [`EventStore::read_all_partition`](crate::store::EventStore::read_all_partition):
//! by default a filter over `read_all` pages; PostgreSQL filters in SQL on a
//! stored hash column.
//!
//! Changing the number of partitions gives every partition a new key, so a
//! fresh checkpoint: see each runner's `partition` method for what that
//! means for it.

use std::fmt;

/// FNV-1a 64 offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(FNV_PRIME)
    })
}

/// MurmurHash3's 64-bit finalizer (`fmix64`): every output bit depends on
/// every input bit.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The stable hash of a stream name every backend partitions by: FNV-1a 64
/// over its UTF-8 bytes, then MurmurHash3's `fmix64` finalizer. Never
/// changes between versions (stored hashes and partition checkpoints
/// depend on it); the PostgreSQL backend has a twin in SQL.
///
/// ```
/// use aftermath::subscription::stream_hash;
/// assert_eq!(stream_hash(""), 0xefd01f60ba992926);
/// assert_eq!(stream_hash("a"), 0x82a2a958a9bece5b);
/// assert_eq!(stream_hash("foobar"), 0x2c22194922d1672b);
/// ```
pub fn stream_hash(stream: &str) -> u64 {
    fmix64(fnv1a_64(stream.as_bytes()))
}

/// The stored form of a stream hash in SQL: the unsigned hash minus 2^63
/// (its top bit flipped), which keeps its order in a signed 64-bit integer.
pub(crate) fn stored_hash(hash: u64) -> i64 {
    (hash ^ (1 << 63)) as i64
}

/// One of `count` partitions of a subscriber: the streams whose
/// [`stream_hash`] falls in the `index`-th of `count` equal ranges.
///
/// ```
/// use aftermath::subscription::Partition;
///
/// let partitions: Vec<Partition> = (0..4).map(|i| Partition::new(i, 4)).collect();
/// // Every stream is in exactly one partition.
/// for stream in ["order-1", "order-2", "customer-7", "ü-stream"] {
///     let owners: Vec<_> = partitions.iter().filter(|p| p.contains(stream)).collect();
///     assert_eq!(owners.len(), 1);
///     assert_eq!(owners[0].index, Partition::of(stream, 4));
/// }
/// assert_eq!(partitions[2].key("balances"), "balances#2of4");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition {
    /// Which partition, `0..count`.
    pub index: u32,
    /// How many partitions the subscriber is split into (at least 1).
    pub count: u32,
}

impl Partition {
    /// Partition `index` of `count`.
    ///
    /// # Panics
    ///
    /// When `count` is 0 or `index >= count` (a configuration error).
    pub fn new(index: u32, count: u32) -> Partition {
        match Partition::checked(index, count) {
            Some(p) => p,
            None => panic!(
                "partition {index} of {count} does not exist: count must be at least 1 and index below it"
            ),
        }
    }

    /// Partition `index` of `count`, or `None` when there is no such one.
    pub fn checked(index: u32, count: u32) -> Option<Partition> {
        (count >= 1 && index < count).then_some(Partition { index, count })
    }

    /// The partition (of `count`) that `stream` belongs to.
    pub fn of(stream: &str, count: u32) -> u32 {
        Self::of_hash(stream_hash(stream), count)
    }

    /// The partition (of `count`) of a stream with this [`stream_hash`].
    pub fn of_hash(hash: u64, count: u32) -> u32 {
        ((u128::from(hash) * u128::from(count.max(1))) >> 64) as u32
    }

    /// Whether `stream` belongs to this partition.
    pub fn contains(&self, stream: &str) -> bool {
        self.contains_hash(stream_hash(stream))
    }

    /// Whether a stream with this [`stream_hash`] belongs to this partition.
    pub fn contains_hash(&self, hash: u64) -> bool {
        Self::of_hash(hash, self.count) == self.index
    }

    /// The hashes of this partition's streams: `first..=last`. The ranges of
    /// the `count` partitions are adjacent and cover every `u64`.
    pub fn hash_range(&self) -> (u64, u64) {
        let span = 1u128 << 64;
        let count = u128::from(self.count);
        // Partition i holds h with i * 2^64 <= h * count < (i + 1) * 2^64.
        let start = |i: u128| (i * span).div_ceil(count);
        let first = start(u128::from(self.index));
        let end = start(u128::from(self.index) + 1);
        (first as u64, (end - 1) as u64)
    }

    /// [`Partition::hash_range`] in the stored form of a hash (see
    /// [`stored_hash`]): one `BETWEEN` over a signed integer column.
    pub(crate) fn stored_range(&self) -> (i64, i64) {
        let (first, last) = self.hash_range();
        (stored_hash(first), stored_hash(last))
    }

    /// The checkpoint and lease key of subscriber `name` in this partition:
    /// `<name>#<index>of<count>`.
    pub fn key(&self, name: &str) -> String {
        format!("{name}#{}of{}", self.index, self.count)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}of{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_vectors() {
        // FNV-1a 64, from the FNV reference test suite.
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"b"), 0xaf63df4c8601f1a5);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
        // fmix64 fixes 0 and is a bijection elsewhere.
        assert_eq!(fmix64(0), 0);
        // The stream hash: pinned, never to change.
        assert_eq!(stream_hash(""), 0xefd01f60ba992926);
        assert_eq!(stream_hash("a"), 0x82a2a958a9bece5b);
        assert_eq!(stream_hash("foobar"), 0x2c22194922d1672b);
        assert_eq!(stream_hash("account-0"), 0x31ca43fbb8e41910);
        // Multi-byte UTF-8 is hashed byte by byte.
        assert_eq!(stream_hash("ü"), fmix64(fnv1a_64(&[0xc3, 0xbc])));
    }

    #[test]
    fn ranges_are_adjacent_and_cover_u64() {
        for count in [1u32, 2, 3, 4, 5, 7, 8, 10, 16, 33, 100, 1000, u32::MAX] {
            let mut next = 0u64;
            let indices: Vec<u32> = if count > 2000 {
                vec![0, 1, count / 2, count - 2, count - 1]
            } else {
                (0..count).collect()
            };
            for (k, &index) in indices.iter().enumerate() {
                let p = Partition::new(index, count);
                let (first, last) = p.hash_range();
                if count <= 2000 || k == 0 {
                    assert_eq!(first, next, "partition {p} starts where the last ended");
                }
                assert!(first <= last, "partition {p} is not empty");
                assert!(p.contains_hash(first) && p.contains_hash(last), "{p}");
                if first > 0 {
                    assert!(!p.contains_hash(first - 1), "{p}");
                }
                if last < u64::MAX {
                    assert!(!p.contains_hash(last + 1), "{p}");
                    next = last + 1;
                } else {
                    assert_eq!(index, count - 1, "only the last partition ends at u64::MAX");
                }
            }
        }
    }

    #[test]
    fn membership_matches_the_ranges() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for count in [1u32, 2, 3, 4, 6, 7, 9, 64] {
                let index = Partition::of_hash(x, count);
                assert!(index < count);
                let (first, last) = Partition::new(index, count).hash_range();
                assert!(first <= x && x <= last, "{x} of {count}");
            }
        }
    }

    #[test]
    fn streams_spread_over_partitions() {
        let count = 4;
        let mut sizes = [0u32; 4];
        for i in 0..4000 {
            sizes[Partition::of(&format!("account-{i}"), count) as usize] += 1;
        }
        for size in sizes {
            assert!((900..1100).contains(&size), "uneven spread {sizes:?}");
        }
    }

    #[test]
    fn keys_and_validation() {
        assert_eq!(Partition::new(0, 1).key("p"), "p#0of1");
        assert_eq!(Partition::new(3, 8).key("bal"), "bal#3of8");
        assert!(Partition::checked(0, 0).is_none());
        assert!(Partition::checked(4, 4).is_none());
        assert!(Partition::checked(3, 4).is_some());
        assert!(std::panic::catch_unwind(|| Partition::new(2, 2)).is_err());
        // One partition holds everything.
        assert!(Partition::new(0, 1).contains("anything"));
        assert_eq!(Partition::new(0, 1).hash_range(), (0, u64::MAX));
    }
}
