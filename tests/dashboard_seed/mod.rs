//! The data both dashboard tests look at, written through the `Store` trait:
//! one series with two channels of hourly observations up to the last hour,
//! a champion model version and a newer challenger, runs in several states
//! (one still training, with a loss history), two past forecasts that the
//! actuals have caught up with and a latest forecast reaching into the future.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use chrono::{DateTime, Duration, DurationRound, Utc};
use serde_json::json;
use xlstm_forecast::store::{
    ForecastPoint, NewForecast, NewModelVersion, NewRun, ObservationBatch, RunKind, RunOutcome,
    RunStatus, ScheduleMode, ScheduleSpec, SeriesSpec, Store,
};

pub const CHANNELS: [&str; 2] = ["load", "temp"];
pub const OBSERVED_HOURS: i64 = 240;
pub const QUANTILE_LEVELS: [f64; 3] = [0.1, 0.5, 0.9];
pub const LATEST_HORIZON: u32 = 48;

pub struct Seeded {
    pub series_id: i64,
    /// The newest observation (an hour before `now`, on the hour).
    pub last_observation: DateTime<Utc>,
    pub champion_id: i64,
    pub challenger_id: i64,
    pub succeeded_run_id: i64,
    pub running_run_id: i64,
    pub failed_run_id: i64,
    pub latest_forecast_id: i64,
}

/// The value of channel `channel` at `at`: a daily cycle plus a trend.
pub fn actual(channel: usize, at: DateTime<Utc>) -> f64 {
    let hours = at.timestamp() as f64 / 3600.0;
    let day = (hours * std::f64::consts::TAU / 24.0).sin();
    match channel {
        0 => 100.0 + 20.0 * day + 0.01 * (hours % 1000.0),
        _ => 12.0 + 5.0 * day,
    }
}

pub async fn seed(store: &dyn Store, series_name: &str) -> Seeded {
    let now = Utc::now();
    let last_observation = now
        .duration_trunc(Duration::hours(1))
        .expect("truncate to the hour")
        - Duration::hours(1);
    let first_observation = last_observation - Duration::hours(OBSERVED_HOURS - 1);
    let spec = SeriesSpec {
        name: series_name.to_string(),
        frequency: Some("1h".to_string()),
        timezone: "UTC".to_string(),
        channels: CHANNELS.iter().map(|c| c.to_string()).collect(),
    };
    let times: Vec<DateTime<Utc>> = (0..OBSERVED_HOURS)
        .map(|hour| first_observation + Duration::hours(hour))
        .collect();
    let batch = ObservationBatch {
        channels: spec.channels.clone(),
        ts_micros: times.iter().map(|at| at.timestamp_micros()).collect(),
        values: (0..CHANNELS.len())
            .map(|channel| times.iter().map(|&at| Some(actual(channel, at))).collect())
            .collect(),
    };
    let mut import = store.begin_import(&spec).await.expect("begin the import");
    import.write(&batch).await.expect("write observations");
    import.commit().await.expect("commit observations");
    let series = store
        .get_series(series_name)
        .await
        .expect("read the series")
        .expect("the import created the series");

    let version = |val_mse: f64, parent: Option<i64>| NewModelVersion {
        series_id: series.id,
        config: json!({"preset": "tiny", "lookback": 96, "horizon": LATEST_HORIZON}),
        artefact: vec![7; 4096],
        normalisation: json!({"mean": [100.0, 12.0], "std": [14.0, 3.5]}),
        data_from: first_observation,
        data_to: last_observation,
        metrics: json!({
            "val_mse": val_mse, "val_mae": val_mse.sqrt() * 0.8, "coverage_80": 0.79,
            "epochs": 12, "train_seconds": 41.5, "params": 52_113,
        }),
        status: xlstm_forecast::store::ModelVersionStatus::Ready,
        parent_version_id: parent,
    };
    let champion = store
        .insert_model_version(&version(0.21, None))
        .await
        .expect("insert the first model version");
    store
        .promote_model_version(champion.id)
        .await
        .expect("promote the first model version");
    let challenger = store
        .insert_model_version(&version(0.24, Some(champion.id)))
        .await
        .expect("insert the fine-tuned model version");

    let enqueue = |kind: RunKind, requested: serde_json::Value| NewRun {
        series_id: series.id,
        kind,
        requested,
        max_attempts: 3,
        schedule_id: None,
        scheduled_for: None,
    };
    let history = |epochs: u32| {
        (1..=epochs)
            .map(|epoch| {
                let e = f64::from(epoch);
                json!({"epoch": epoch, "train_loss": 1.0 / e, "val_loss": 1.1 / e + 0.05, "seconds": 3.4 * e})
            })
            .collect::<Vec<_>>()
    };
    let succeeded = store
        .enqueue_run(&enqueue(
            RunKind::Train,
            json!({"mode": "full", "preset": "tiny"}),
        ))
        .await
        .expect("enqueue the training run")
        .run;
    store
        .update_run_progress(
            succeeded.id,
            &json!({"epoch": 12, "max_epochs": 12, "step": 40, "steps_per_epoch": 40,
                    "train_loss": 0.083, "val_loss": 0.142, "best_val_loss": 0.139,
                    "eta_seconds": 0, "history": history(12)}),
        )
        .await
        .expect("record the training progress");
    store
        .finish_run(
            succeeded.id,
            &RunOutcome {
                status: RunStatus::Succeeded,
                error: None,
                model_version_id: Some(champion.id),
            },
        )
        .await
        .expect("finish the training run");
    let failed = store
        .enqueue_run(&enqueue(RunKind::Finetune, json!({"mode": "finetune"})))
        .await
        .expect("enqueue the failing run")
        .run;
    store
        .finish_run(
            failed.id,
            &RunOutcome {
                status: RunStatus::Failed,
                error: Some("training diverged: loss is NaN at epoch 3".to_string()),
                model_version_id: None,
            },
        )
        .await
        .expect("fail the run");
    let running = store
        .enqueue_run(&enqueue(RunKind::Finetune, json!({"mode": "finetune"})))
        .await
        .expect("enqueue the running run")
        .run;
    store
        .update_run_progress(
            running.id,
            &json!({"epoch": 5, "max_epochs": 20, "step": 12, "steps_per_epoch": 40,
                    "train_loss": 0.2, "val_loss": 0.27, "best_val_loss": 0.27,
                    "eta_seconds": 51, "history": history(5)}),
        )
        .await
        .expect("record the running progress");

    store
        .upsert_schedule(&ScheduleSpec {
            series_id: series.id,
            cron: "0 0 3 * * *".to_string(),
            timezone: "UTC".to_string(),
            mode: ScheduleMode::Finetune,
            enabled: true,
        })
        .await
        .expect("schedule nightly fine-tuning");

    // Two past forecasts the actuals have caught up with, then the latest one.
    for issued_hours_ago in [72, 48] {
        let origin = last_observation - Duration::hours(issued_hours_ago);
        store
            .insert_forecast(&forecast(series.id, champion.id, origin, 24, 3.0))
            .await
            .expect("insert a past forecast");
    }
    let latest = store
        .insert_forecast(&forecast(
            series.id,
            champion.id,
            last_observation,
            LATEST_HORIZON,
            0.0,
        ))
        .await
        .expect("insert the latest forecast");

    Seeded {
        series_id: series.id,
        last_observation,
        champion_id: champion.id,
        challenger_id: challenger.id,
        succeeded_run_id: succeeded.id,
        running_run_id: running.id,
        failed_run_id: failed.id,
        latest_forecast_id: latest.id,
    }
}

/// A forecast from `origin` (its last observation) whose point forecast is
/// the true value off by `bias`, with a band that widens with the step.
fn forecast(
    series_id: i64,
    model_version_id: i64,
    origin: DateTime<Utc>,
    horizon: u32,
    bias: f64,
) -> NewForecast {
    let mut points = Vec::new();
    for step in 1..=horizon {
        let ts = origin + Duration::hours(i64::from(step));
        for (index, channel) in CHANNELS.iter().enumerate() {
            let mean = actual(index, ts) + bias;
            let spread = 2.0 + 0.2 * f64::from(step);
            points.push(ForecastPoint {
                step,
                ts,
                channel: channel.to_string(),
                mean,
                quantiles: vec![mean - spread, mean, mean + spread],
            });
        }
    }
    NewForecast {
        series_id,
        model_version_id,
        issued_at: origin,
        horizon,
        quantile_levels: QUANTILE_LEVELS.to_vec(),
        points,
    }
}
