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
//! Every row stores `transaction_id xid8`: the 64-bit (epoch-extended, never
//! wrapping) id of the transaction that appended it, plus the log's
//! *offset* (below; 0 unless the log was moved), and `seq`, its index among
//! the events appended in that transaction. `$all` is ordered by
//! `(transaction_id, seq)`, and a reader reads only rows with
//! `transaction_id` below the *append horizon* `H`, computed by the schema's
//! `horizon(pg_current_snapshot())` inside the reading statement.
//!
//! # The append lock
//!
//! Every append holds the store's *append lock*, a shared
//! transaction-level advisory lock (`hashtext('<schema>.append'), 1`). The
//! append function takes it **before its transaction has an id** and refuses to run in a transaction that already has an id and
//! does not hold the lock yet (an append must be the first write of its
//! transaction; the store's own appends are single statements, so they
//! always are). The lock is held until the transaction ends.
//!
//! # The horizon
//!
//! A read is one statement with one snapshot `S`. `horizon(S)` first reads
//! the lock table once (`pg_locks`: the transactions holding the append
//! lock *now*, time `L`), then walks `S`'s running transactions (`xip`) in
//! id order and stops at the first id `t` that either holds the append lock
//! at `L`, or has committed by the time its status is checked (after `L`)
//! and has events in the log (looked up by a statement of its own, with a
//! snapshot taken after the status check, which sees all of a committed
//! transaction's rows): `H = t` (plus the offset). When there is none, `H`
//! is `S`'s `xmax` (every id below it had been handed out when `S` was
//! taken).
//!
//! # Why a reader can never skip
//!
//! Claim: every row with `transaction_id < H` that will ever exist is
//! visible to `S`, so a reader that has returned keys up to `p < (H, 0)`
//! has seen every event at or below `p`, and its next read `WHERE
//! (transaction_id, seq) > p` misses nothing behind it. Take an appending
//! transaction `T` with id `x < xmax(S)` (ids at or above `xmax` are never
//! below `H`):
//!
//! - `T` ended before `S` was taken: `S` sees all of its rows or none, and
//!   it can never add a row again.
//! - `T` was running at `S` (`x` is in `xip`). If it held the append lock at
//!   `L`, `H <= x`. If it had committed by the time its status was checked
//!   and appended here, the lookup after the check finds its rows: `H <= x`.
//!   If it committed without appending, or aborted, it has no rows to miss.
//!   Otherwise it was running at `L` and at the status check and did not
//!   hold the append lock at `L`. It cannot have appended before
//!   `L` (the lock is held until the transaction ends, and a rolled-back
//!   savepoint that released it also removed its rows), and it cannot
//!   append after `L` either: it already has an id, and the append function
//!   refuses a transaction with an id that does not hold the lock. So it
//!   has no events, and its id may safely be passed.
//!
//! Reading the lock table *before* the statuses matters: the other order
//! would let an appender commit between the two checks and be taken for a
//! non-appender. Hence what can hold readers back is exactly the appends to
//! this store still in flight: never a projection's read-model
//! transaction, another schema or database, an idle-in-transaction session
//! or a prepared transaction that did not append here. A paused append
//! holds readers back (they wait, never skip) until it ends; the store logs
//! a warning naming it and
//! [`PostgresStore::held_back`](super::PostgresStore::held_back) reports it.
//!
//! The same holds for [`head`](crate::store::EventStore::head): it is the
//! largest key below the horizon, so a subscriber that checkpoints at the
//! head (past events of types it does not read) cannot checkpoint past an
//! unfinished append. The horizon never moves back: ids are handed out in
//! increasing order, and an id once judged final stays final.
//!
//! Within one stream the `$all` order must also follow the versions. The
//! append function takes the stream's advisory lock *before* its transaction
//! has an id (ids are assigned at the first write), so of two appends to one
//! stream the second gets its id after the first committed: a larger id.
//! (That is why an append must be the first write of its transaction.)
//! Strict mode ([`PostgresOptions::strict_order`](super::PostgresOptions::strict_order))
//! first takes another lock (`hashtext('<schema>.append'), 0`) exclusively,
//! so that strict appends commit one at a time and positions follow commit
//! order.
//!
//! # Positions after a logical move
//!
//! Transaction ids belong to a cluster. After `pg_dump`/restore, a
//! logical-replication cutover or a cloud migration, the stored ids can be
//! ahead of the new cluster's counter: new appends would sort before old
//! events (behind every restored checkpoint) and old events would sit above
//! the horizon. So a stored id is the cluster's id plus `log_base.position_offset`
//! (migration 6), and every store runs `rebase_positions()` when it opens:
//! when the newest stored id is at or above the cluster's next id plus the
//! offset, it takes the append lock exclusively (no append in flight) and
//! raises the offset so that every id handed out from then on stores above
//! every stored one. Stored positions never change, so checkpoints,
//! journals and deadlines stay valid; the horizon carries the same offset.
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
