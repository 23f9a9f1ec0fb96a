//! The order of `$all` in PostgreSQL, and why a reader can never skip an
//! event.
//!
//! # The trap
//!
//! The obvious design numbers events with a `bigserial` and has readers
//! follow the numbers. A number is taken when the row is *inserted*, but the
//! row becomes visible when its transaction *commits*, and transactions
//! commit in any order. Transaction A takes 41, transaction B takes 42, B
//! commits first; a reader reads "everything after 40", sees 42, remembers
//! 42, and later reads "everything after 42": A's 41, committed in between,
//! is skipped forever. Serializing every append behind one lock fixes that
//! and caps throughput at one commit at a time.
//!
//! # The order used here
//!
//! Every row stores `transaction_id xid8 DEFAULT pg_current_xact_id()`, the
//! 64-bit (epoch-extended, never wrapping) id of the transaction that
//! appended it, and `seq`, its index among the events appended in that
//! transaction. `$all` is ordered by `(transaction_id, seq)`, and a reader
//! reads only rows with `transaction_id < pg_snapshot_xmin(pg_current_snapshot())`:
//! the *horizon*, the smallest transaction id that was still running when the
//! reading statement took its snapshot.
//!
//! # Why a reader can never skip
//!
//! A read is one statement with one snapshot; the horizon `H` comes from that
//! same snapshot. Every transaction with an id below `H` had finished
//! (committed or aborted) when the snapshot was taken, so the snapshot sees
//! all of its rows or none, and it can never add a row again. Hence the rows
//! with `transaction_id < H` that the read sees are *final*: no row with a
//! key below `(H, 0)` will ever appear later. A reader that has returned
//! events up to key `p` (always `< (H, 0)`) has therefore seen every event
//! that will ever exist at or below `p`, and its next read, `WHERE
//! (transaction_id, seq) > p`, cannot miss anything behind it. Transactions at
//! or above the horizon (running, or committed while an older one still
//! runs) are simply not read yet: they delay readers, never make them skip.
//!
//! The same holds for [`head`](crate::store::EventStore::head): it is the
//! largest key below the horizon, so a subscriber that checkpoints at the
//! head (past events of types it does not read) cannot checkpoint past an
//! unfinished transaction. The horizon never moves back on a primary: a
//! transaction id is handed out above every id handed out before, so once
//! every transaction below `H` has finished, none below `H` can start.
//!
//! Within one stream the `$all` order must also follow the versions. The
//! append function takes the stream's advisory lock *before* its transaction
//! has an id (ids are assigned at the first write), so of two appends to one
//! stream the second gets its id after the first committed: a larger id.
//! (An append that is not the first write of its transaction would break
//! this; the store never does that.)
//!
//! A long-running transaction that holds an id (any write, in any database
//! of the cluster) holds the horizon back: readers then wait for it, the
//! store logs a warning naming it, and
//! [`PostgresStore::held_back`](super::PostgresStore::held_back) reports it.
//! Strict mode ([`PostgresOptions::strict_order`](super::PostgresOptions::strict_order))
//! additionally serializes appends so that positions follow commit order.
//!
//! # The position encoding
//!
//! A [`Position`] is one `u64`: `transaction_id << 20 | seq`. Limits: at most
//! 2^20 (1,048,576) events appended in one transaction, and transaction ids
//! below 2^44 (about 1.8 * 10^13: 557 years of a sustained 1,000 transactions
//! per second, 56 years at 10,000 per second, counting every transaction of
//! the cluster that writes). Position 0 (the origin) is below every key:
//! real transaction ids start at 3.

pub(super) use super::types::Xid8;
use crate::event::Position;

/// Bits of a position that hold the event's index within its transaction.
pub(super) const SEQ_BITS: u32 = 20;
/// The most events one transaction can append (`seq` is below this).
pub(super) const MAX_EVENTS_PER_TRANSACTION: u64 = 1 << SEQ_BITS;
/// Transaction ids must stay below this to fit a position.
pub(super) const MAX_TRANSACTION_ID: u64 = 1 << (64 - SEQ_BITS);

/// The key `(transaction_id, seq)` of a position. Any `u64` decodes (a
/// position the store never handed out still marks a place in the order).
pub(super) fn decode(position: Position) -> (Xid8, i32) {
    let seq = (position.0 & (MAX_EVENTS_PER_TRANSACTION - 1)) as i32;
    (Xid8(position.0 >> SEQ_BITS), seq)
}

/// The position of key `(transaction_id, seq)`, or why it has none.
pub(super) fn encode(transaction_id: Xid8, seq: i64) -> Result<Position, String> {
    if transaction_id.0 >= MAX_TRANSACTION_ID {
        return Err(format!(
            "transaction id {} is beyond 2^44, the largest a position can hold",
            transaction_id.0
        ));
    }
    let seq = u64::try_from(seq)
        .ok()
        .filter(|s| *s < MAX_EVENTS_PER_TRANSACTION)
        .ok_or_else(|| format!("seq {seq} is outside 0..2^20"))?;
    Ok(Position(transaction_id.0 << SEQ_BITS | seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_keep_the_order() {
        let keys = [(3, 0), (3, 1), (3, 1_048_575), (4, 0), (700_000, 17)];
        let positions: Vec<Position> = keys
            .iter()
            .map(|&(x, s)| encode(Xid8(x), s).unwrap())
            .collect();
        assert!(positions.windows(2).all(|p| p[0] < p[1]));
        for (&(x, s), p) in keys.iter().zip(&positions) {
            assert_eq!(decode(*p), (Xid8(x), s as i32));
        }
        assert!(Position::ORIGIN < positions[0]);
        assert_eq!(decode(Position::ORIGIN), (Xid8(0), 0));
        let top = encode(Xid8(MAX_TRANSACTION_ID - 1), 1_048_575).unwrap();
        assert_eq!(top, Position(u64::MAX));
        assert_eq!(
            decode(Position(u64::MAX)),
            (Xid8(MAX_TRANSACTION_ID - 1), 1_048_575)
        );
    }

    #[test]
    fn out_of_range_keys_are_refused() {
        assert!(encode(Xid8(MAX_TRANSACTION_ID), 0).is_err());
        assert!(encode(Xid8(5), 1 << 20).is_err());
        assert!(encode(Xid8(5), -1).is_err());
    }
}
