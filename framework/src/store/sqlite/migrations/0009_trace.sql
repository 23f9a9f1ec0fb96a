-- aftermath schema version 9: the trace context in a column of its own.
--
-- `trace` holds an event's W3C trace context in binary: the trace id (16
-- bytes, big-endian), the parent span id (8), the flags (1), then the
-- `tracestate` as UTF-8; NULL when the event has none. From this version
-- on, `metadata` holds only the application's keys (`{}` or
-- `{"extra":{..}}`): the ids are in `correlation_id` / `causation_id`, and
-- a subscriber reads neither through JSON. Rows written before keep their
-- whole metadata JSON, trace context included, and read as they did.
ALTER TABLE events ADD COLUMN trace BLOB;
