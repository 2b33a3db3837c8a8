//! The retraining policy around the training executor: a scheduled run pulls
//! first, and a fine-tune with nothing new is skipped with the reason.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use xlstm_forecast::jobs::scheduler::fire;
use xlstm_forecast::jobs::{Executors, RetrainingPolicy, WorkerConfig, WorkerPool};
use xlstm_forecast::store::{
    ModelVersionStatus, NewModelVersion, ObservationBatch, RunKind, RunStatus, ScheduleMode,
    ScheduleSpec, SecretUrl, SourceSpec, Store,
};

use crate::common::fresh_postgres;
use crate::fixtures::{StepExecutor, create_series, enqueue, run_of, wait_until};

fn hour(h: i64) -> i64 {
    Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp_micros()
        + h * 3_600_000_000
}

async fn import_hours(
    store: &Arc<dyn Store>,
    series: &xlstm_forecast::store::Series,
    hours: std::ops::Range<i64>,
) {
    let mut spec = xlstm_forecast::store::SeriesSpec {
        name: series.name.clone(),
        frequency: series.frequency.clone(),
        timezone: series.timezone.clone(),
        channels: series.channels.clone(),
    };
    spec.channels.truncate(1);
    let mut session = store.begin_import(&spec).await.unwrap();
    session
        .write(&ObservationBatch {
            channels: spec.channels.clone(),
            ts_micros: hours.clone().map(hour).collect(),
            values: vec![hours.map(|h| Some(h as f64)).collect()],
        })
        .await
        .unwrap();
    session.commit().await.unwrap();
}

fn policy(store: &Arc<dyn Store>, training: Arc<StepExecutor>) -> Executors {
    let wrapped = Arc::new(RetrainingPolicy::new(store.clone(), training));
    Executors::new()
        .with(RunKind::Train, wrapped.clone())
        .with(RunKind::Finetune, wrapped)
}

fn quick() -> WorkerConfig {
    WorkerConfig {
        poll_interval: Duration::from_millis(20),
        ..WorkerConfig::default()
    }
}

store_tests! {
    async fn a_finetune_without_new_data_is_skipped_with_the_reason(store) {
        let series = create_series(&store, "s").await;
        import_hours(&store, &series, 0..24).await;
        let champion = store
            .insert_model_version(&NewModelVersion {
                series_id: series.id,
                config: json!({"preset": "tiny"}),
                artefact: vec![1, 2, 3],
                normalisation: json!({}),
                data_from: Utc.timestamp_micros(hour(0)).unwrap(),
                data_to: Utc.timestamp_micros(hour(23)).unwrap(),
                metrics: json!({}),
                status: ModelVersionStatus::Ready,
                parent_version_id: None,
            })
            .await
            .unwrap();
        store.promote_model_version(champion.id).await.unwrap();
        let training = StepExecutor::new(1, Duration::from_millis(1));
        let pool = WorkerPool::start(store.clone(), policy(&store, training.clone()), quick());

        let stale = enqueue(&store, series.id, RunKind::Finetune).await;
        wait_until(Duration::from_secs(10), "the fine-tune", || {
            let store = store.clone();
            async move { run_of(&store, stale.id).await.status.is_final() }
        })
        .await;
        let skipped = run_of(&store, stale.id).await;
        assert_eq!(skipped.status, RunStatus::Skipped);
        let reason = skipped.error.unwrap();
        assert!(reason.starts_with(&format!("no new data since the champion (model version {})", champion.id)), "{reason}");
        assert!(training.executed().is_empty(), "nothing trained");

        // A full training run is not skipped, and new data un-skips a fine-tune.
        let full = enqueue(&store, series.id, RunKind::Train).await;
        import_hours(&store, &series, 24..26).await;
        let fresh = enqueue(&store, series.id, RunKind::Finetune).await;
        wait_until(Duration::from_secs(10), "both runs", || {
            let store = store.clone();
            async move {
                run_of(&store, full.id).await.status.is_final()
                    && run_of(&store, fresh.id).await.status.is_final()
            }
        })
        .await;
        pool.shutdown().await;
        assert_eq!(run_of(&store, full.id).await.status, RunStatus::Succeeded);
        assert_eq!(run_of(&store, fresh.id).await.status, RunStatus::Succeeded);
        assert_eq!(training.executed().len(), 2);
    }

    async fn a_scheduled_run_pulls_its_source_first(store) {
        let user = fresh_postgres().await;
        let mut user_connection = PgConnection::connect(user.url()).await.unwrap();
        user_connection
            .execute("CREATE TABLE m AS SELECT TIMESTAMPTZ '2024-01-01 00:00+00' + make_interval(hours => h) AS ts, h::float8 AS load FROM generate_series(0, 9) AS h")
            .await
            .unwrap();
        let series = create_series(&store, "s").await;
        store
            .upsert_source(&SourceSpec {
                series_id: series.id,
                connection_url: SecretUrl::new(user.url()),
                query: "SELECT ts, load FROM m WHERE ts > {{after}}".into(),
                time_column: None,
            })
            .await
            .unwrap();
        let schedule = store
            .upsert_schedule(&ScheduleSpec {
                series_id: series.id,
                cron: "0 0 3 * * *".into(),
                timezone: "UTC".into(),
                mode: ScheduleMode::Full,
                enabled: true,
            })
            .await
            .unwrap();
        let scheduled = fire(store.as_ref(), &schedule, Utc.with_ymd_and_hms(2024, 1, 2, 3, 0, 0).unwrap())
            .await
            .unwrap()
            .run;
        assert_eq!(scheduled.kind, RunKind::Train);
        let training = StepExecutor::new(1, Duration::from_millis(1));
        let pool = WorkerPool::start(store.clone(), policy(&store, training.clone()), quick());
        wait_until(Duration::from_secs(20), "the scheduled run", || {
            let store = store.clone();
            async move { run_of(&store, scheduled.id).await.status.is_final() }
        })
        .await;
        pool.shutdown().await;
        let done = run_of(&store, scheduled.id).await;
        assert_eq!(done.status, RunStatus::Succeeded, "{done:?}");
        assert_eq!(store.observation_range("s").await.unwrap().count, 10, "pulled before training");
        assert_eq!(training.executed(), vec![(scheduled.id, 1)]);
        drop(user_connection);
    }
}
