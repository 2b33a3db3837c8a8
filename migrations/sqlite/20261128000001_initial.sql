-- The xlstm-forecast schema (SQLite). migrations/postgres holds the same
-- schema meaning for Postgres; change both together.
--
-- SQLite differences: timestamps are INTEGER microseconds since the Unix epoch
-- (UTC), which sort and compare as numbers; JSON documents and lists (channels,
-- quantile levels) are TEXT holding JSON; booleans are INTEGER 0/1.

CREATE TABLE series (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE CHECK (name <> ''),
    frequency   TEXT,                                  -- e.g. '1h', '15m'; NULL when irregular
    channels    TEXT NOT NULL CHECK (json_array_length(channels) > 0), -- JSON array of names, in order
    timezone    TEXT NOT NULL DEFAULT 'UTC',           -- IANA name
    created_at  INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;

-- Long form: one row per (series, ts, channel). `channel` is the index into
-- series.channels. The primary key is ordered (series, ts, channel): it enforces
-- uniqueness of (series, channel, ts) and, as a WITHOUT ROWID table, the rows
-- are stored in the order range reads return them.
CREATE TABLE observations (
    series_id   INTEGER NOT NULL REFERENCES series(id) ON DELETE CASCADE,
    ts          INTEGER NOT NULL,
    channel     INTEGER NOT NULL CHECK (channel >= 0),
    value       REAL NOT NULL,
    PRIMARY KEY (series_id, ts, channel)
) STRICT, WITHOUT ROWID;

CREATE TABLE model_versions (
    id                 INTEGER PRIMARY KEY,
    series_id          INTEGER NOT NULL REFERENCES series(id) ON DELETE CASCADE,
    config             TEXT NOT NULL,
    artefact           BLOB NOT NULL,                  -- safetensors bytes
    normalisation      TEXT NOT NULL,
    data_from          INTEGER NOT NULL,
    data_to            INTEGER NOT NULL,
    metrics            TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('ready', 'rejected')),
    parent_version_id  INTEGER REFERENCES model_versions(id) ON DELETE SET NULL,
    is_champion        INTEGER NOT NULL DEFAULT 0 CHECK (is_champion IN (0, 1)),
    created_at         INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CHECK (data_from <= data_to),
    CHECK (NOT is_champion OR status = 'ready')
) STRICT;
CREATE INDEX model_versions_by_series ON model_versions (series_id, id DESC);
-- At most one champion per series.
CREATE UNIQUE INDEX model_versions_one_champion ON model_versions (series_id) WHERE is_champion;

CREATE TABLE schedules (
    id          INTEGER PRIMARY KEY,
    series_id   INTEGER NOT NULL UNIQUE REFERENCES series(id) ON DELETE CASCADE,
    cron        TEXT NOT NULL,                         -- with a seconds field
    timezone    TEXT NOT NULL DEFAULT 'UTC',
    mode        TEXT NOT NULL CHECK (mode IN ('finetune', 'full')),
    enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at  INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    updated_at  INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;

CREATE TABLE runs (
    id                INTEGER PRIMARY KEY,
    series_id         INTEGER NOT NULL REFERENCES series(id) ON DELETE CASCADE,
    kind              TEXT NOT NULL CHECK (kind IN ('train', 'finetune', 'pull')),
    status            TEXT NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'skipped')),
    requested         TEXT NOT NULL DEFAULT '{}',      -- requested config / overrides (JSON)
    progress          TEXT NOT NULL DEFAULT '{}',      -- epoch, step, losses, eta (JSON)
    error             TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts      INTEGER NOT NULL CHECK (max_attempts >= 1),
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    schedule_id       INTEGER REFERENCES schedules(id) ON DELETE SET NULL,
    scheduled_for     INTEGER,
    model_version_id  INTEGER REFERENCES model_versions(id) ON DELETE SET NULL,
    created_at        INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    started_at        INTEGER,
    finished_at       INTEGER,
    heartbeat_at      INTEGER,
    -- Every process fires cron schedules; this makes the enqueue idempotent.
    UNIQUE (schedule_id, scheduled_for)
) STRICT;
CREATE INDEX runs_by_series ON runs (series_id, id DESC);
-- Workers look for queued runs and for running runs whose lease lapsed.
CREATE INDEX runs_claimable ON runs (status, created_at) WHERE status IN ('queued', 'running');

CREATE TABLE forecasts (
    id                INTEGER PRIMARY KEY,
    series_id         INTEGER NOT NULL REFERENCES series(id) ON DELETE CASCADE,
    model_version_id  INTEGER NOT NULL REFERENCES model_versions(id) ON DELETE CASCADE,
    issued_at         INTEGER NOT NULL,
    horizon           INTEGER NOT NULL CHECK (horizon >= 1),
    quantile_levels   TEXT NOT NULL,                   -- JSON array, strictly increasing, in (0, 1)
    created_at        INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;
CREATE INDEX forecasts_latest ON forecasts (series_id, issued_at DESC, id DESC);

-- One row per (forecast, step, channel, statistic) so that Grafana queries stay
-- plain SQL: the point forecast has quantile NULL, each quantile row carries
-- its level, e.g.
--   SELECT ts / 1000000 AS time, value FROM forecast_points
--   WHERE forecast_id = $id AND channel = 'load' AND quantile = 0.9 ORDER BY ts;
CREATE TABLE forecast_points (
    forecast_id  INTEGER NOT NULL REFERENCES forecasts(id) ON DELETE CASCADE,
    step         INTEGER NOT NULL CHECK (step >= 1),  -- 1 = first step after the data
    ts           INTEGER NOT NULL,
    channel      TEXT NOT NULL,
    quantile     REAL CHECK (quantile > 0 AND quantile < 1),
    value        REAL NOT NULL
) STRICT;
-- quantile NULL (the point forecast) is folded to -1 so the key stays unique.
CREATE UNIQUE INDEX forecast_points_key ON forecast_points (forecast_id, step, channel, ifnull(quantile, -1));
