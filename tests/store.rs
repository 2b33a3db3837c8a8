//! The `Store` contract, run against both backends (a fresh Postgres database
//! and a fresh SQLite file per test).

#[macro_use]
mod common;

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use xlstm_forecast::store::{
    self, ForecastPoint, ModelVersionStatus, NewForecast, NewModelVersion, NewRun,
    ObservationBatch, RunFilter, RunKind, RunOutcome, RunStatus, ScheduleMode, ScheduleSpec,
    Series, SeriesSpec, Store, StoreError,
};

fn spec(name: &str, channels: &[&str]) -> SeriesSpec {
    SeriesSpec {
        name: name.to_string(),
        frequency: Some("1h".to_string()),
        timezone: "Europe/Berlin".to_string(),
        channels: channels.iter().map(|channel| channel.to_string()).collect(),
    }
}

const HOUR_MICROS: i64 = 3_600_000_000;

/// `rows` hourly timestamps from 2024-01-01T00:00Z, channel c at row r = c * 1000 + r.
fn hourly_batch(channels: &[&str], rows: usize) -> ObservationBatch {
    let start = Utc
        .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp_micros();
    ObservationBatch {
        channels: channels.iter().map(|channel| channel.to_string()).collect(),
        ts_micros: (0..rows as i64)
            .map(|row| start + row * HOUR_MICROS)
            .collect(),
        values: (0..channels.len())
            .map(|c| (0..rows).map(|r| Some((c * 1000 + r) as f64)).collect())
            .collect(),
    }
}

async fn import(
    store: &Arc<dyn Store>,
    spec: &SeriesSpec,
    batch: &ObservationBatch,
) -> store::ImportSummary {
    let mut session = store.begin_import(spec).await.unwrap();
    session.write(batch).await.unwrap();
    session.commit().await.unwrap()
}

async fn create(store: &Arc<dyn Store>, name: &str) -> Series {
    store
        .create_series(&spec(name, &["load", "temp"]))
        .await
        .unwrap()
}

fn at(hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, 1, hour, 0, 0).unwrap()
}

fn model_version(
    series_id: i64,
    status: ModelVersionStatus,
    parent: Option<i64>,
) -> NewModelVersion {
    NewModelVersion {
        series_id,
        config: json!({"preset": "small", "lookback": 96}),
        artefact: vec![1, 2, 3, 4, 5],
        normalisation: json!({"mean": [1.0, 2.0], "std": [0.5, 0.25]}),
        data_from: at(0),
        data_to: at(23),
        metrics: json!({"val_mae": 0.25}),
        status,
        parent_version_id: parent,
    }
}

fn new_run(series_id: i64) -> NewRun {
    NewRun {
        series_id,
        kind: RunKind::Train,
        requested: json!({"epochs": 3}),
        max_attempts: 2,
        schedule_id: None,
        scheduled_for: None,
    }
}

fn forecast(
    series_id: i64,
    model_version_id: i64,
    issued_at: DateTime<Utc>,
    offset: f64,
) -> NewForecast {
    let points = (1..=3)
        .flat_map(|step| {
            ["temp", "load"]
                .into_iter()
                .map(move |channel| ForecastPoint {
                    step,
                    ts: issued_at + chrono::Duration::hours(i64::from(step)),
                    channel: channel.to_string(),
                    mean: offset + f64::from(step),
                    quantiles: vec![
                        offset + f64::from(step) - 1.0,
                        offset + f64::from(step) + 1.0,
                    ],
                })
        })
        .collect();
    NewForecast {
        series_id,
        model_version_id,
        issued_at,
        horizon: 3,
        quantile_levels: vec![0.1, 0.9],
        points,
    }
}

store_tests! {
    async fn series_crud(store) {
        let created = store.create_series(&spec("energy", &["load", "temp"])).await.unwrap();
        assert_eq!(created.name, "energy");
        assert_eq!(created.channels, vec!["load", "temp"]);
        assert_eq!(created.timezone, "Europe/Berlin");
        assert_eq!(created.frequency.as_deref(), Some("1h"));

        assert_eq!(store.get_series("energy").await.unwrap(), Some(created.clone()));
        assert_eq!(store.get_series_by_id(created.id).await.unwrap(), Some(created.clone()));
        assert_eq!(store.get_series("missing").await.unwrap(), None);

        let duplicate = store.create_series(&spec("energy", &["x"])).await;
        assert!(matches!(duplicate, Err(StoreError::Conflict(_))), "{duplicate:?}");

        store.create_series(&spec("alpha", &["x"])).await.unwrap();
        let names: Vec<String> = store.list_series().await.unwrap().into_iter().map(|series| series.name).collect();
        assert_eq!(names, vec!["alpha", "energy"]);

        store.delete_series("energy").await.unwrap();
        assert_eq!(store.get_series("energy").await.unwrap(), None);
        assert!(matches!(store.delete_series("energy").await, Err(StoreError::NotFound { .. })));
    }

    async fn invalid_series_specs_are_rejected(store) {
        let bad_timezone = SeriesSpec { timezone: "Nowhere/Land".into(), ..spec("s", &["a"]) };
        assert!(matches!(store.create_series(&bad_timezone).await, Err(StoreError::Invalid { field: "timezone", .. })));
        assert!(matches!(store.create_series(&spec("s", &[])).await, Err(StoreError::Invalid { field: "channels", .. })));
        assert!(matches!(store.begin_import(&spec("", &["a"])).await.err(), Some(StoreError::Invalid { field: "name", .. })));
        assert!(store.list_series().await.unwrap().is_empty());
    }

    async fn import_creates_the_series_and_upserts(store) {
        let spec = spec("energy", &["load", "temp"]);
        let batch = hourly_batch(&["load", "temp"], 24);
        let first = import(&store, &spec, &batch).await;
        assert!(first.created_series);
        assert_eq!(first.series, "energy");
        assert_eq!(first.cells_written, 48);
        assert_eq!(first.first_ts_micros, Some(batch.ts_micros[0]));
        assert_eq!(first.last_ts_micros, Some(batch.ts_micros[23]));

        // The same batch again: nothing new, counts unchanged.
        let second = import(&store, &spec, &batch).await;
        assert!(!second.created_series);
        let range = store.observation_range("energy").await.unwrap();
        assert_eq!(range.count, 48);
        assert_eq!(range.first_ts_micros, Some(batch.ts_micros[0]));
        assert_eq!(range.last_ts_micros, Some(batch.ts_micros[23]));

        // Changed values update in place; missing cells leave stored values alone.
        let mut changed = hourly_batch(&["temp"], 2);
        changed.values[0] = vec![Some(-5.0), None];
        import(&store, &spec, &changed).await;
        let loaded = store.load_observations("energy", None, None, Some(&["temp".to_string()])).await.unwrap();
        assert_eq!(loaded.value[0], -5.0);
        assert_eq!(loaded.value[1], 1001.0);
        assert_eq!(store.observation_range("energy").await.unwrap().count, 48);
    }

    async fn each_committed_import_moves_the_data_revision_and_the_last_timestamp(store) {
        let spec = spec("energy", &["load", "temp"]);
        let created = create(&store, "energy").await;
        assert_eq!(created.data_revision, 0);
        assert_eq!(store.last_observation_micros(created.id).await.unwrap(), None);
        let batch = hourly_batch(&["load", "temp"], 24);
        import(&store, &spec, &batch).await;
        let after_first = store.get_series("energy").await.unwrap().unwrap();
        assert!(after_first.data_revision > created.data_revision);
        assert_eq!(store.last_observation_micros(created.id).await.unwrap(), Some(batch.ts_micros[23]));
        // A session rolled back (dropped) leaves the revision alone; an empty one too.
        let mut session = store.begin_import(&spec).await.unwrap();
        session.write(&hourly_batch(&["load"], 30)).await.unwrap();
        drop(session);
        store.begin_import(&spec).await.unwrap().commit().await.unwrap();
        assert_eq!(store.get_series("energy").await.unwrap().unwrap().data_revision, after_first.data_revision);
        assert_eq!(store.last_observation_micros(created.id).await.unwrap(), Some(batch.ts_micros[23]));
        // Rewriting old rows moves it although the last timestamp stays.
        let mut changed = hourly_batch(&["temp"], 1);
        changed.values[0] = vec![Some(-5.0)];
        import(&store, &spec, &changed).await;
        assert!(store.get_series("energy").await.unwrap().unwrap().data_revision > after_first.data_revision);
        assert_eq!(store.last_observation_micros(created.id).await.unwrap(), Some(batch.ts_micros[23]));
    }

    async fn import_with_several_batches_in_one_transaction(store) {
        let spec = spec("multi", &["a", "b"]);
        let batch = hourly_batch(&["a", "b"], 10);
        let mut session = store.begin_import(&spec).await.unwrap();
        let first_half = ObservationBatch {
            channels: batch.channels.clone(),
            ts_micros: batch.ts_micros[..5].to_vec(),
            values: batch.values.iter().map(|column| column[..5].to_vec()).collect(),
        };
        let second_half = ObservationBatch {
            channels: vec!["b".into()],
            ts_micros: batch.ts_micros[5..].to_vec(),
            values: vec![batch.values[1][5..].to_vec()],
        };
        // Overlaps both earlier batches: hours 3..=6 of channel a, new values.
        let overlapping = ObservationBatch {
            channels: vec!["a".into()],
            ts_micros: batch.ts_micros[3..7].to_vec(),
            values: vec![vec![Some(-1.0), Some(-2.0), Some(-3.0), Some(-4.0)]],
        };
        assert_eq!(session.write(&first_half).await.unwrap(), 10);
        assert_eq!(session.write(&second_half).await.unwrap(), 5);
        assert_eq!(session.write(&overlapping).await.unwrap(), 4);
        let summary = session.commit().await.unwrap();
        assert_eq!(summary.cells_written, 19);
        assert_eq!(summary.first_ts_micros, Some(batch.ts_micros[0]));
        assert_eq!(summary.last_ts_micros, Some(batch.ts_micros[9]));
        assert_eq!(store.observation_range("multi").await.unwrap().count, 17);
        let a = store
            .load_observations("multi", None, None, Some(&["a".to_string()]))
            .await
            .unwrap();
        assert_eq!(a.value, vec![0.0, 1.0, 2.0, -1.0, -2.0, -3.0, -4.0]);

        // A later session that goes back in time upserts; one that goes past
        // the end appends.
        let mut session = store.begin_import(&spec).await.unwrap();
        session.write(&hourly_batch(&["a", "b"], 12)).await.unwrap();
        session.commit().await.unwrap();
        let loaded = store.load_observations("multi", None, None, None).await.unwrap();
        assert_eq!(loaded.value.len(), 24);
        assert_eq!(loaded.value[6], 3.0, "hour 3 of channel a is back to its original value");
    }

    async fn concurrent_imports_of_a_new_series_both_land(store) {
        let spec = spec("race", &["a"]);
        let batch = hourly_batch(&["a"], 6);
        let early = ObservationBatch {
            channels: batch.channels.clone(),
            ts_micros: batch.ts_micros[..4].to_vec(),
            values: vec![batch.values[0][..4].to_vec()],
        };
        let late = ObservationBatch {
            channels: batch.channels.clone(),
            ts_micros: batch.ts_micros[2..].to_vec(),
            values: vec![vec![Some(-2.0), Some(-3.0), Some(-4.0), Some(-5.0)]],
        };
        let mut first = store.begin_import(&spec).await.unwrap();
        first.write(&early).await.unwrap();
        let second = {
            let store = store.clone();
            let spec = spec.clone();
            tokio::spawn(async move {
                let mut session = store.begin_import(&spec).await?;
                session.write(&late).await?;
                session.commit().await
            })
        };
        // Give the second import time to reach the point where it waits.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let first = first.commit().await.unwrap();
        let second = second.await.unwrap().unwrap();
        assert!(first.created_series);
        assert!(!second.created_series);
        let loaded = store.load_observations("race", None, None, None).await.unwrap();
        assert_eq!(loaded.value, vec![0.0, 1.0, -2.0, -3.0, -4.0, -5.0], "the later commit wins the overlap");
    }

    async fn concurrent_promotions_leave_one_champion(store) {
        let series = create(&store, "energy").await;
        let mut ids = Vec::new();
        for _ in 0..4 {
            let version = model_version(series.id, ModelVersionStatus::Ready, None);
            ids.push(store.insert_model_version(&version).await.unwrap().id);
        }
        let promotions: Vec<_> = (0..12)
            .map(|round| {
                let store = store.clone();
                let id = ids[round % ids.len()];
                tokio::spawn(async move { store.promote_model_version(id).await })
            })
            .collect();
        for promotion in promotions {
            promotion.await.unwrap().unwrap();
        }
        let versions = store.list_model_versions(series.id).await.unwrap();
        assert_eq!(versions.iter().filter(|version| version.is_champion).count(), 1);
    }

    async fn dropped_import_session_writes_nothing(store) {
        let spec = spec("ghost", &["a"]);
        {
            let mut session = store.begin_import(&spec).await.unwrap();
            session.write(&hourly_batch(&["a"], 5)).await.unwrap();
        }
        assert_eq!(store.get_series("ghost").await.unwrap(), None);

        // An existing series keeps its data when a later session is dropped.
        import(&store, &spec, &hourly_batch(&["a"], 2)).await;
        {
            let mut session = store.begin_import(&spec).await.unwrap();
            session.write(&hourly_batch(&["a"], 5)).await.unwrap();
        }
        assert_eq!(store.observation_range("ghost").await.unwrap().count, 2);
    }

    async fn unknown_channel_for_existing_series_is_rejected(store) {
        import(&store, &spec("energy", &["load", "temp"]), &hourly_batch(&["load", "temp"], 3)).await;
        let err = store.begin_import(&spec("energy", &["load", "wind"])).await.err().expect("rejected");
        match err {
            StoreError::Invalid { field, message } => {
                assert_eq!(field, "channels");
                assert_eq!(message, "unknown channel 'wind' for existing series 'energy' (known: load, temp)");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }

        // A batch naming an unknown channel is rejected too, and the session's
        // earlier writes are rolled back with it when it is dropped.
        let mut session = store.begin_import(&spec("energy", &["load"])).await.unwrap();
        session.write(&hourly_batch(&["load"], 10)).await.unwrap();
        let err = session.write(&hourly_batch(&["wind"], 1)).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid { field: "channels", .. }), "{err:?}");
        drop(session);
        assert_eq!(store.observation_range("energy").await.unwrap().count, 6);
    }

    async fn load_observations_filters_and_orders(store) {
        let spec = spec("energy", &["load", "temp", "wind"]);
        // Written out of order and with the batch's channels in a different order.
        let mut batch = hourly_batch(&["wind", "load", "temp"], 6);
        batch.ts_micros.reverse();
        batch.values[0][2] = None;
        import(&store, &spec, &batch).await;

        let all = store.load_observations("energy", None, None, None).await.unwrap();
        assert_eq!(all.channels, vec!["load", "temp", "wind"]);
        assert_eq!(all.value.len(), 17);
        let keys: Vec<(i64, u32)> = all.ts_micros.iter().copied().zip(all.channel.iter().copied()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "ordered by ts then channel");
        // Row 0 after the reversal holds the latest timestamp; check one value end to end.
        let latest = *batch.ts_micros.first().unwrap();
        let position = keys.iter().position(|&key| key == (latest, 2)).unwrap();
        assert_eq!(all.value[position], 0.0, "wind was the batch's first channel, value 0*1000 + row 0");

        let t = &batch.ts_micros;
        let (from, to) = (t[4], t[2]); // hours 1..=3 after the reversal
        let range = store.load_observations("energy", Some(from), Some(to), None).await.unwrap();
        assert!(range.ts_micros.iter().all(|ts| (from..=to).contains(ts)));
        assert_eq!(range.ts_micros.first(), Some(&from), "from is inclusive");
        assert_eq!(range.ts_micros.last(), Some(&to), "to is inclusive");
        assert_eq!(range.value.len(), 8, "3 rows × 3 channels minus the one missing wind cell");

        let wanted = vec!["wind".to_string(), "load".to_string()];
        let some = store.load_observations("energy", None, None, Some(&wanted)).await.unwrap();
        assert_eq!(some.channels, vec!["load", "temp", "wind"], "indices stay in series order");
        assert!(some.channel.iter().all(|&channel| channel == 0 || channel == 2));
        assert_eq!(some.value.len(), 11);

        let unknown = store.load_observations("energy", None, None, Some(&["nope".to_string()])).await;
        assert!(matches!(unknown, Err(StoreError::Invalid { field: "channels", .. })), "{unknown:?}");
        assert!(matches!(store.load_observations("missing", None, None, None).await, Err(StoreError::NotFound { .. })));
        let empty = store.load_observations("energy", Some(0), Some(1), None).await.unwrap();
        assert!(empty.value.is_empty());
    }

    async fn model_versions_and_champion(store) {
        let series = create(&store, "energy").await;
        let other = create(&store, "other").await;
        assert_eq!(store.champion_model_version(series.id).await.unwrap(), None);

        let first = store.insert_model_version(&model_version(series.id, ModelVersionStatus::Ready, None)).await.unwrap();
        assert!(!first.is_champion);
        assert_eq!(first.artefact_bytes, 5);
        let second =
            store.insert_model_version(&model_version(series.id, ModelVersionStatus::Ready, Some(first.id))).await.unwrap();
        assert_eq!(second.parent_version_id, Some(first.id));
        let rejected =
            store.insert_model_version(&model_version(series.id, ModelVersionStatus::Rejected, None)).await.unwrap();

        let fetched = store.get_model_version(first.id).await.unwrap().unwrap();
        assert_eq!(fetched.artefact, vec![1, 2, 3, 4, 5]);
        assert_eq!(fetched.summary.config, json!({"preset": "small", "lookback": 96}));
        assert_eq!(fetched.summary.data_from, at(0));
        assert_eq!(fetched.summary.data_to, at(23));
        assert_eq!(store.get_model_version(999_999).await.unwrap(), None);

        let listed: Vec<i64> = store.list_model_versions(series.id).await.unwrap().iter().map(|v| v.id).collect();
        assert_eq!(listed, vec![rejected.id, second.id, first.id], "newest first");

        store.promote_model_version(first.id).await.unwrap();
        assert_eq!(store.champion_model_version(series.id).await.unwrap().unwrap().summary.id, first.id);
        store.promote_model_version(second.id).await.unwrap();
        let champion = store.champion_model_version(series.id).await.unwrap().unwrap();
        assert_eq!(champion.summary.id, second.id);
        assert_eq!(champion.artefact, vec![1, 2, 3, 4, 5]);
        let champions = store.list_model_versions(series.id).await.unwrap().iter().filter(|v| v.is_champion).count();
        assert_eq!(champions, 1, "only one champion per series");
        // Promoting the champion again changes nothing.
        store.promote_model_version(second.id).await.unwrap();
        assert_eq!(store.champion_model_version(series.id).await.unwrap().unwrap().summary.id, second.id);

        assert!(matches!(store.promote_model_version(rejected.id).await, Err(StoreError::Conflict(_))));
        assert!(matches!(store.promote_model_version(999_999).await, Err(StoreError::NotFound { .. })));
        assert_eq!(store.champion_model_version(series.id).await.unwrap().unwrap().summary.id, second.id);

        // A parent must belong to the same series; the series must exist.
        let cross = store.insert_model_version(&model_version(other.id, ModelVersionStatus::Ready, Some(first.id))).await;
        assert!(matches!(cross, Err(StoreError::Invalid { field: "parent_version_id", .. })), "{cross:?}");
        let orphan = store.insert_model_version(&model_version(999_999, ModelVersionStatus::Ready, None)).await;
        assert!(matches!(orphan, Err(StoreError::NotFound { .. })), "{orphan:?}");
        let backwards = NewModelVersion { data_from: at(5), data_to: at(1), ..model_version(series.id, ModelVersionStatus::Ready, None) };
        assert!(matches!(store.insert_model_version(&backwards).await, Err(StoreError::Invalid { field: "data_from", .. })));
    }

    async fn runs_lifecycle_and_filters(store) {
        let series = create(&store, "energy").await;
        let other = create(&store, "other").await;
        let enqueued = store.enqueue_run(&new_run(series.id)).await.unwrap();
        assert!(enqueued.created);
        let run = enqueued.run;
        assert_eq!(run.status, RunStatus::Queued);
        assert_eq!(run.kind, RunKind::Train);
        assert_eq!(run.requested, json!({"epochs": 3}));
        assert_eq!((run.attempts, run.max_attempts), (0, 2));
        assert_eq!(run.progress, json!({}));

        let progress = json!({"epoch": 1, "step": 40, "losses": [0.9, 0.7], "eta_s": 12});
        store.update_run_progress(run.id, &progress).await.unwrap();
        let updated = store.get_run(run.id).await.unwrap().unwrap();
        assert_eq!(updated.progress, progress);
        assert!(updated.heartbeat_at.is_some());
        assert!(matches!(store.update_run_progress(999_999, &progress).await, Err(StoreError::NotFound { .. })));

        let version = store.insert_model_version(&model_version(series.id, ModelVersionStatus::Ready, None)).await.unwrap();
        let outcome = RunOutcome { status: RunStatus::Succeeded, error: None, model_version_id: Some(version.id) };
        let finished = store.finish_run(run.id, &outcome).await.unwrap();
        assert_eq!(finished.status, RunStatus::Succeeded);
        assert_eq!(finished.model_version_id, Some(version.id));
        assert!(finished.finished_at.is_some());
        assert!(matches!(store.finish_run(run.id, &outcome).await, Err(StoreError::Conflict(_))));
        assert!(matches!(store.finish_run(999_999, &outcome).await, Err(StoreError::NotFound { .. })));
        let not_final = RunOutcome { status: RunStatus::Running, error: None, model_version_id: None };
        assert!(matches!(store.finish_run(run.id, &not_final).await, Err(StoreError::Invalid { field: "status", .. })));

        let failed = store.enqueue_run(&NewRun { kind: RunKind::Finetune, ..new_run(series.id) }).await.unwrap().run;
        let failure = RunOutcome { status: RunStatus::Failed, error: Some("loss diverged (NaN)".into()), model_version_id: None };
        assert_eq!(store.finish_run(failed.id, &failure).await.unwrap().error.as_deref(), Some("loss diverged (NaN)"));
        let queued_other = store.enqueue_run(&new_run(other.id)).await.unwrap().run;

        let all: Vec<i64> = store.list_runs(&RunFilter::default()).await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(all, vec![queued_other.id, failed.id, run.id], "newest first");
        let of_series = RunFilter { series_id: Some(series.id), ..RunFilter::default() };
        let listed: Vec<i64> = store.list_runs(&of_series).await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(listed, vec![failed.id, run.id]);
        let queued = RunFilter { status: Some(RunStatus::Queued), ..RunFilter::default() };
        let listed: Vec<i64> = store.list_runs(&queued).await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(listed, vec![queued_other.id]);
        let both = RunFilter { series_id: Some(series.id), status: Some(RunStatus::Failed), limit: None };
        assert_eq!(store.list_runs(&both).await.unwrap().len(), 1);
        let limited = RunFilter { limit: Some(2), ..RunFilter::default() };
        assert_eq!(store.list_runs(&limited).await.unwrap().len(), 2);

        assert!(matches!(store.enqueue_run(&new_run(999_999)).await, Err(StoreError::NotFound { .. })));
        let no_attempts = NewRun { max_attempts: 0, ..new_run(series.id) };
        assert!(matches!(store.enqueue_run(&no_attempts).await, Err(StoreError::Invalid { field: "max_attempts", .. })));
    }

    async fn scheduled_enqueue_is_idempotent(store) {
        let series = create(&store, "energy").await;
        let schedule = store
            .upsert_schedule(&ScheduleSpec {
                series_id: series.id,
                cron: "0 0 3 * * *".into(),
                timezone: "UTC".into(),
                mode: ScheduleMode::Finetune,
                enabled: true,
            })
            .await
            .unwrap();
        let fire = NewRun { schedule_id: Some(schedule.id), scheduled_for: Some(at(3)), ..new_run(series.id) };
        let first = store.enqueue_run(&fire).await.unwrap();
        let again = store.enqueue_run(&fire).await.unwrap();
        assert!(first.created);
        assert!(!again.created);
        assert_eq!(again.run.id, first.run.id);
        assert_eq!(first.run.scheduled_for, Some(at(3)));
        let next_day = store.enqueue_run(&NewRun { scheduled_for: Some(at(4)), ..fire.clone() }).await.unwrap();
        assert!(next_day.created);
        assert_eq!(store.list_runs(&RunFilter::default()).await.unwrap().len(), 2);
        let unknown = NewRun { schedule_id: Some(999_999), ..fire };
        assert!(matches!(store.enqueue_run(&unknown).await, Err(StoreError::Invalid { field: "schedule_id", .. })));
    }

    async fn schedules_upsert_get_delete(store) {
        let series = create(&store, "energy").await;
        let other = create(&store, "other").await;
        assert_eq!(store.get_schedule(series.id).await.unwrap(), None);
        let spec = ScheduleSpec {
            series_id: series.id,
            cron: "0 0 3 * * *".into(),
            timezone: "Europe/Berlin".into(),
            mode: ScheduleMode::Finetune,
            enabled: true,
        };
        let created = store.upsert_schedule(&spec).await.unwrap();
        assert_eq!((created.cron.as_str(), created.mode, created.enabled), ("0 0 3 * * *", ScheduleMode::Finetune, true));
        let replaced = store
            .upsert_schedule(&ScheduleSpec { cron: "0 30 4 * * Sun".into(), mode: ScheduleMode::Full, ..spec.clone() })
            .await
            .unwrap();
        assert_eq!(replaced.id, created.id, "one schedule per series");
        assert_eq!(replaced.mode, ScheduleMode::Full);
        assert!(replaced.updated_at >= created.updated_at);
        assert_eq!(store.get_schedule(series.id).await.unwrap(), Some(replaced.clone()));

        store.upsert_schedule(&ScheduleSpec { series_id: other.id, enabled: false, ..spec.clone() }).await.unwrap();
        let enabled: Vec<i64> = store.list_enabled_schedules().await.unwrap().iter().map(|s| s.series_id).collect();
        assert_eq!(enabled, vec![series.id]);

        store.delete_schedule(series.id).await.unwrap();
        assert_eq!(store.get_schedule(series.id).await.unwrap(), None);
        assert!(matches!(store.delete_schedule(series.id).await, Err(StoreError::NotFound { .. })));

        let bad_tz = ScheduleSpec { timezone: "Mars/Base".into(), ..spec.clone() };
        assert!(matches!(store.upsert_schedule(&bad_tz).await, Err(StoreError::Invalid { field: "timezone", .. })));
        let missing = ScheduleSpec { series_id: 999_999, ..spec };
        assert!(matches!(store.upsert_schedule(&missing).await, Err(StoreError::NotFound { .. })));
    }

    async fn forecasts_insert_and_latest(store) {
        let series = create(&store, "energy").await;
        let other = create(&store, "other").await;
        let version = store.insert_model_version(&model_version(series.id, ModelVersionStatus::Ready, None)).await.unwrap();
        assert_eq!(store.latest_forecast(series.id).await.unwrap(), None);

        let older = store.insert_forecast(&forecast(series.id, version.id, at(1), 0.0)).await.unwrap();
        let newer_input = forecast(series.id, version.id, at(2), 100.0);
        let newer = store.insert_forecast(&newer_input).await.unwrap();
        assert_ne!(older.id, newer.id);

        let latest = store.latest_forecast(series.id).await.unwrap().unwrap();
        assert_eq!(latest, newer);
        assert_eq!(latest.issued_at, at(2));
        assert_eq!(latest.quantile_levels, vec![0.1, 0.9]);
        assert_eq!(latest.points.len(), 6);
        let first = &latest.points[0];
        assert_eq!((first.step, first.channel.as_str()), (1, "load"), "ordered by step, then channel name");
        assert_eq!(first.mean, 101.0);
        assert_eq!(first.quantiles, vec![100.0, 102.0]);
        assert_eq!(first.ts, at(3));
        assert_eq!(store.latest_forecast(other.id).await.unwrap(), None);

        let mut ragged = forecast(series.id, version.id, at(3), 0.0);
        ragged.points[0].quantiles.pop();
        assert!(matches!(store.insert_forecast(&ragged).await, Err(StoreError::Invalid { field: "points", .. })));
        let wrong_model = forecast(other.id, version.id, at(3), 0.0);
        assert!(matches!(
            store.insert_forecast(&wrong_model).await,
            Err(StoreError::Invalid { field: "model_version_id", .. })
        ));
        assert_eq!(store.latest_forecast(series.id).await.unwrap().unwrap().id, newer.id);

        let listed = store.list_forecasts(series.id, 10).await.unwrap();
        assert_eq!(listed, vec![newer.clone(), older.clone()], "most recently issued first, with points");
        assert_eq!(store.list_forecasts(series.id, 1).await.unwrap(), vec![newer]);
        assert!(store.list_forecasts(other.id, 10).await.unwrap().is_empty());
    }

    async fn model_version_summary_without_artefact(store) {
        let series = create(&store, "energy").await;
        let version = store.insert_model_version(&model_version(series.id, ModelVersionStatus::Ready, None)).await.unwrap();
        assert_eq!(store.get_model_version_summary(version.id).await.unwrap(), Some(version.clone()));
        store.promote_model_version(version.id).await.unwrap();
        assert!(store.get_model_version_summary(version.id).await.unwrap().unwrap().is_champion);
        assert_eq!(store.get_model_version_summary(999_999).await.unwrap(), None);
    }

    async fn schedules_need_a_six_field_cron_expression(store) {
        let series = create(&store, "energy").await;
        for cron in ["0 3 * * *", "", "0 0 25 * * *", "0 0 3 * * * 2030"] {
            let spec = ScheduleSpec {
                series_id: series.id,
                cron: cron.into(),
                timezone: "UTC".into(),
                mode: ScheduleMode::Finetune,
                enabled: true,
            };
            assert!(
                matches!(store.upsert_schedule(&spec).await, Err(StoreError::Invalid { field: "cron", .. })),
                "{cron:?}"
            );
        }
        assert_eq!(store.get_schedule(series.id).await.unwrap(), None);
    }

    async fn series_names_must_be_path_safe(store) {
        for name in ["has space", "a/b", ".hidden"] {
            assert!(
                matches!(store.create_series(&spec(name, &["load"])).await, Err(StoreError::Invalid { field: "name", .. })),
                "{name}"
            );
        }
        assert!(store.list_series().await.unwrap().is_empty());
    }

    async fn deleting_a_series_cascades(store) {
        let spec = spec("energy", &["load", "temp"]);
        import(&store, &spec, &hourly_batch(&["load", "temp"], 10)).await;
        let series = store.get_series("energy").await.unwrap().unwrap();
        let version = store.insert_model_version(&model_version(series.id, ModelVersionStatus::Ready, None)).await.unwrap();
        store.promote_model_version(version.id).await.unwrap();
        let schedule = store
            .upsert_schedule(&ScheduleSpec {
                series_id: series.id,
                cron: "0 0 * * * *".into(),
                timezone: "UTC".into(),
                mode: ScheduleMode::Full,
                enabled: true,
            })
            .await
            .unwrap();
        let run = store
            .enqueue_run(&NewRun { schedule_id: Some(schedule.id), scheduled_for: Some(at(1)), ..new_run(series.id) })
            .await
            .unwrap()
            .run;
        store.insert_forecast(&forecast(series.id, version.id, at(1), 0.0)).await.unwrap();

        store.delete_series("energy").await.unwrap();
        assert_eq!(store.get_model_version(version.id).await.unwrap(), None);
        assert_eq!(store.get_run(run.id).await.unwrap(), None);
        assert_eq!(store.get_schedule(series.id).await.unwrap(), None);
        assert_eq!(store.latest_forecast(series.id).await.unwrap(), None);
        assert!(store.list_enabled_schedules().await.unwrap().is_empty());

        // The name is free again and starts empty.
        import(&store, &spec, &hourly_batch(&["load"], 1)).await;
        assert_eq!(store.observation_range("energy").await.unwrap().count, 1);
    }

    async fn store_answers_ping_and_migrations_are_idempotent(store) {
        store.ping().await.unwrap();
        let report = store.migrate().await.unwrap();
        assert!(report.newly_applied.is_empty(), "{report:?}");
        assert!(report.total_applied >= 1);
        assert_eq!(store.missing_migrations().await.unwrap(), vec![], "a migrated store misses none");
    }
}

/// Connecting twice to the same database applies the migrations once and keeps the data.
mod reconnect {
    use super::*;

    async fn reconnect_keeps_schema_and_data(url: &str) {
        let fresh = store::open(url).await.unwrap();
        let missing = fresh.missing_migrations().await.unwrap();
        assert_eq!(
            missing
                .first()
                .map(|migration| (migration.version, migration.description.as_str())),
            Some((20261128000001, "initial")),
            "a database never migrated misses every migration: {missing:?}"
        );
        let report = fresh.migrate().await.unwrap();
        assert_eq!(report.newly_applied.len(), missing.len());
        assert!(fresh.missing_migrations().await.unwrap().is_empty());
        assert!(
            !report.newly_applied.is_empty(),
            "the first migrate applies the schema"
        );
        create(&fresh, "kept").await;
        let again = store::connect(url).await.unwrap();
        assert!(again.migrate().await.unwrap().newly_applied.is_empty());
        assert!(again.get_series("kept").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn postgres() {
        let database = common::fresh_postgres().await;
        reconnect_keeps_schema_and_data(database.url()).await;
    }

    #[tokio::test]
    async fn sqlite() {
        let database = common::fresh_sqlite();
        reconnect_keeps_schema_and_data(database.url()).await;
        assert!(database.path().exists());
    }

    #[tokio::test]
    async fn sqlite_creates_missing_parent_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/deeper/x.db");
        let store = store::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        store.ping().await.unwrap();
        assert!(path.exists());
    }

    #[tokio::test]
    async fn unsupported_scheme_is_invalid() {
        let result = store::connect("mysql://localhost/db").await;
        assert!(matches!(
            result.err(),
            Some(StoreError::Invalid {
                field: "database_url",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn unreachable_postgres_is_unavailable() {
        let started = std::time::Instant::now();
        let result = store::connect("postgres://postgres:pw@127.0.0.1:1/none").await;
        match result.err() {
            Some(StoreError::Unavailable(message)) => {
                assert!(message.contains("127.0.0.1:1"), "{message}");
                assert!(!message.contains("pw@"), "the password leaked: {message}");
                assert!(
                    !message.contains("timed out"),
                    "the cause is hidden: {message}"
                );
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "a refused connection fails fast"
        );
    }
}
