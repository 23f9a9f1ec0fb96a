-- aftermath PostgreSQL schema version 7: who holds a lease, beyond its owner
-- name.
--
-- `instance` is unique per running worker (a fixed owner name on two
-- processes no longer shares one fencing token). `holder_pid` and
-- `holder_start` name the holder's presence session (the backend pid and
-- backend start of a connection the holder keeps open while it runs): when
-- no such session exists any more (pg_stat_activity), the holder is gone and
-- another worker takes the lease over at once instead of waiting for it to
-- expire.
ALTER TABLE {schema}.leases ADD COLUMN instance text NOT NULL DEFAULT '';
ALTER TABLE {schema}.leases ADD COLUMN holder_pid integer;
ALTER TABLE {schema}.leases ADD COLUMN holder_start timestamptz;
