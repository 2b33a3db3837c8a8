-- A read-only role for Grafana (dashboards/grafana/): SELECT on every table,
-- nothing else. It cannot log in; give Grafana a login user in it:
--
--   CREATE ROLE grafana LOGIN PASSWORD 'choose-one' IN ROLE xlstm_forecast_reader;
--
-- Roles belong to the whole cluster while grants belong to one database, and
-- several databases (tests, staging) may share a cluster: the role is created
-- only when missing, tolerating another database's migration creating it at
-- the same moment. A service account without CREATEROLE skips the role with a
-- notice instead of failing the service's start; an administrator can create
-- it later and re-run the grants below by hand.
DO $migration$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'xlstm_forecast_reader') THEN
        BEGIN
            CREATE ROLE xlstm_forecast_reader NOLOGIN;
        EXCEPTION
            -- Created concurrently by a migration of another database.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'role xlstm_forecast_reader not created: % (create it as an administrator, then grant SELECT as in this migration)', SQLERRM;
                RETURN;
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO xlstm_forecast_reader', current_schema());
    GRANT SELECT ON series, observations, model_versions, schedules, runs, forecasts, forecast_points
        TO xlstm_forecast_reader;
    -- Tables later migrations create (as this same user) are readable too.
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO xlstm_forecast_reader',
                   current_schema());
END
$migration$;
