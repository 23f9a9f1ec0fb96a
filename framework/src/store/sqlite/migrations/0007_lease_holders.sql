-- aftermath schema version 7: who holds a lease, beyond its owner name.
--
-- `instance` is unique per running worker (a fixed owner name on two
-- processes no longer shares one fencing token); `holder_pid` and
-- `holder_start` name the holder's OS process (its pid, and its boot id and
-- start time, so a reused pid is not mistaken for the holder), so that a
-- worker on the same machine takes over at once when the holder is gone
-- instead of waiting for the lease to expire.
ALTER TABLE aftermath_leases ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE aftermath_leases ADD COLUMN holder_pid INTEGER;
ALTER TABLE aftermath_leases ADD COLUMN holder_start TEXT;
