//! Pulling from a second, real Postgres database holding the user's table.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};
use xlstm_forecast::jobs::{
    PullError, WorkerConfig, WorkerPool, enqueue_pull, pull_series, standard_executors,
};
use xlstm_forecast::store::{RunStatus, SecretUrl, Series, SourceSpec, Store};

use crate::common::{TestPostgres, fresh_postgres};
use crate::fixtures::{create_series, run_of, wait_until};

/// The user's database: a table of hourly meter readings.
async fn user_database() -> (TestPostgres, PgConnection) {
    let database = fresh_postgres().await;
    let mut connection = PgConnection::connect(database.url()).await.unwrap();
    connection
        .execute(
            "CREATE TABLE meters (at TIMESTAMPTZ NOT NULL, load DOUBLE PRECISION, temp NUMERIC, note TEXT);
             INSERT INTO meters SELECT TIMESTAMPTZ '2024-01-01 00:00:00+00' + make_interval(hours => h),
                 100 + h, 20.5 + h, 'ok' FROM generate_series(0, 4) AS h;",
        )
        .await
        .unwrap();
    (database, connection)
}

async fn bind(store: &Arc<dyn Store>, series: &Series, url: &str, query: &str) {
    store
        .upsert_source(&SourceSpec {
            series_id: series.id,
            connection_url: SecretUrl::new(url),
            query: query.to_string(),
            time_column: None,
        })
        .await
        .unwrap();
}

async fn cells(store: &Arc<dyn Store>) -> u64 {
    store.observation_range("s").await.unwrap().count
}

const QUERY: &str = "SELECT at AS ts, load, temp FROM meters WHERE at > {{after}} ORDER BY at";

store_tests! {
    async fn pulls_are_incremental_idempotent_and_atomic(store) {
        let (user, mut user_connection) = user_database().await;
        let series = create_series(&store, "s").await;
        bind(&store, &series, user.url(), QUERY).await;

        let first = pull_series(store.as_ref(), &series).await.unwrap();
        assert_eq!((first.rows, first.cells_written), (5, 10));
        assert_eq!(first.after, None);
        assert_eq!(cells(&store).await, 10);
        let loaded = store.load_observations("s", None, None, Some(&["temp".to_string()])).await.unwrap();
        assert_eq!(loaded.value, vec![20.5, 21.5, 22.5, 23.5, 24.5], "NUMERIC arrives as numbers");

        let nothing_new = pull_series(store.as_ref(), &series).await.unwrap();
        assert_eq!(nothing_new.rows, 0);
        assert_eq!(nothing_new.after, first.last);

        user_connection
            .execute("INSERT INTO meters VALUES ('2024-01-01 05:00+00', 105, 25.5, 'ok'), ('2024-01-01 06:00+00', 106, NULL, 'ok')")
            .await
            .unwrap();
        let second = pull_series(store.as_ref(), &series).await.unwrap();
        assert_eq!((second.rows, second.cells_written), (2, 3), "only the new rows; NULL is a missing cell");
        assert_eq!(cells(&store).await, 13);

        // Re-pulling overlapping rows upserts: nothing is duplicated.
        bind(&store, &series, user.url(), "SELECT at AS ts, load, temp FROM meters WHERE at > {{after}} - interval '1 day'").await;
        let overlap = pull_series(store.as_ref(), &series).await.unwrap();
        assert_eq!(overlap.rows, 7);
        assert_eq!(cells(&store).await, 13);

        // A failing query changes nothing.
        bind(&store, &series, user.url(), "SELECT at AS ts, load FROM no_such_table WHERE at > {{after}}").await;
        let err = pull_series(store.as_ref(), &series).await.unwrap_err();
        assert!(matches!(&err, PullError::Query(message) if message.contains("no_such_table")), "{err}");
        assert_eq!(cells(&store).await, 13);

        // A bad row fails the whole pull, good rows before it included.
        user_connection
            .execute("INSERT INTO meters VALUES ('2024-01-01 07:00+00', 107, 27.5, 'ok'), ('2024-01-01 08:00+00', 'NaN', 28.5, 'bad')")
            .await
            .unwrap();
        bind(&store, &series, user.url(), QUERY).await;
        let err = pull_series(store.as_ref(), &series).await.unwrap_err();
        assert_eq!(err.to_string(), "pulled rows rejected: row 2, column 'load': value must be finite, found 'NaN'");
        assert_eq!(cells(&store).await, 13);

        // Columns that are not numbers are refused by name.
        bind(&store, &series, user.url(), "SELECT at, note FROM meters WHERE at > {{after}}").await;
        let err = pull_series(store.as_ref(), &series).await.unwrap_err();
        assert!(err.to_string().starts_with("column 'note' of the source query: has type TEXT"), "{err}");
        // Columns that are not channels of the series too, by the import's rule.
        bind(&store, &series, user.url(), "SELECT at, load AS power FROM meters WHERE at > {{after}} AND load < 108").await;
        let err = pull_series(store.as_ref(), &series).await.unwrap_err();
        assert!(err.to_string().contains("'power'"), "{err}");
        // The query runs read-only.
        user_connection.execute("CREATE SEQUENCE touched").await.unwrap();
        bind(&store, &series, user.url(), "SELECT at, load FROM meters WHERE at > {{after}} AND nextval('touched') > 0").await;
        let err = pull_series(store.as_ref(), &series).await.unwrap_err();
        assert!(err.to_string().contains("read-only transaction"), "{err}");
        assert_eq!(cells(&store).await, 13);
        drop(user_connection);
    }

    async fn local_timestamps_are_read_in_the_series_zone(store) {
        let (user, mut user_connection) = user_database().await;
        user_connection
            .execute("CREATE TABLE local_meters AS SELECT (at AT TIME ZONE 'UTC') AS at, load FROM meters")
            .await
            .unwrap();
        let series = store
            .create_series(&xlstm_forecast::store::SeriesSpec {
                name: "s".into(),
                frequency: Some("1h".into()),
                timezone: "Europe/Berlin".into(),
                channels: vec!["load".into()],
            })
            .await
            .unwrap();
        bind(&store, &series, user.url(), "SELECT at, load FROM local_meters WHERE at > {{after}}").await;
        let report = pull_series(store.as_ref(), &series).await.unwrap();
        // 00:00 local Berlin time (UTC+1 in January) is 23:00Z the day before.
        assert_eq!(report.first.unwrap().to_rfc3339(), "2023-12-31T23:00:00+00:00");
        drop(user_connection);
    }

    async fn a_pull_run_goes_through_the_queue(store) {
        let (user, user_connection) = user_database().await;
        let series = create_series(&store, "s").await;
        let unbound = enqueue_pull(store.as_ref(), &series).await.unwrap_err();
        assert!(matches!(unbound, PullError::NoSource(_)));

        // An unreachable source fails the run with the reason, password masked.
        bind(&store, &series, "postgres://reader:hunter2@127.0.0.1:1/nowhere", QUERY).await;
        let doomed = enqueue_pull(store.as_ref(), &series).await.unwrap();
        let config = WorkerConfig { poll_interval: Duration::from_millis(20), ..WorkerConfig::default() };
        let pool = WorkerPool::start(store.clone(), standard_executors(store.clone(), candle_core::Device::Cpu), config);
        wait_until(Duration::from_secs(20), "the failing pull", || {
            let store = store.clone();
            async move { run_of(&store, doomed.id).await.status.is_final() }
        })
        .await;
        let failed = run_of(&store, doomed.id).await;
        assert_eq!(failed.status, RunStatus::Failed);
        let reason = failed.error.unwrap();
        assert!(reason.starts_with("cannot connect to the source postgres://reader:****@127.0.0.1:1/nowhere"), "{reason}");
        assert!(!reason.contains("hunter2"));

        bind(&store, &series, user.url(), QUERY).await;
        let run = enqueue_pull(store.as_ref(), &series).await.unwrap();
        wait_until(Duration::from_secs(20), "the pull", || {
            let store = store.clone();
            async move { run_of(&store, run.id).await.status.is_final() }
        })
        .await;
        pool.shutdown().await;
        let done = run_of(&store, run.id).await;
        assert_eq!(done.status, RunStatus::Succeeded, "{done:?}");
        assert_eq!(done.progress["pull"]["rows"], 5);
        assert_eq!(cells(&store).await, 10);
        drop(user_connection);
    }
}
