-- Forecast memo (issue 5). migrations/postgres holds the same schema meaning for
-- Postgres; change both together.

-- Bumped in the same transaction as every import that writes observations, so
-- that a forecast computed from a series' rows can be reused, by any API
-- process, for exactly as long as those rows are unchanged.
ALTER TABLE series ADD COLUMN data_revision INTEGER NOT NULL DEFAULT 0;
