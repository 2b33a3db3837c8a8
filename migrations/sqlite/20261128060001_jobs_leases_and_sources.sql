-- Job queue and source pulls (issue 6). migrations/postgres holds the same
-- schema meaning for Postgres; change both together.

-- A cancel request for a running run: the worker holding its lease sees it at
-- its next heartbeat and stops. (A queued run is cancelled at once instead.)
ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1));

-- Workers look for running runs whose lease lapsed.
CREATE INDEX runs_leases ON runs (lease_expires_at) WHERE status = 'running';

-- A series bound to a table in the user's own Postgres: pull runs read new
-- rows with `query` (read-only, with the placeholder {{after}} for the last
-- stored timestamp) and upsert them like an import.
CREATE TABLE series_sources (
    series_id       INTEGER PRIMARY KEY REFERENCES series(id) ON DELETE CASCADE,
    -- A secret (it usually holds a password): never logged or returned unmasked.
    connection_url  TEXT NOT NULL CHECK (connection_url <> ''),
    query           TEXT NOT NULL CHECK (query <> ''),
    -- The timestamp column of the query's result; NULL = the first column.
    time_column     TEXT,
    created_at      INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    updated_at      INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;
