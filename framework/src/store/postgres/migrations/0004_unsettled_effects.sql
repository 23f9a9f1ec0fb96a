-- aftermath schema version 4: `held` also lists effects that were started or
-- failed and not yet done, so an effect released by an operator that crashed
-- before `done` runs again (the checkpoint is already past it).
CREATE INDEX effects_unsettled ON {schema}.effects (reactor, stream, position)
    WHERE state IN ('parked', 'retry_requested', 'blocked', 'started', 'failed');
DROP INDEX {schema}.effects_held;
