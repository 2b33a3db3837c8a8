//! `xlstm-forecast quickstart`: from nothing to a running service in one command — the
//! configured store (the embedded SQLite file by default), a realistic sample series ending
//! at the current hour, a model trained through the real run queue with a progress bar, a
//! persisted forecast, an hourly fine-tune schedule, then `serve` with the URLs printed.

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DurationRound, TimeDelta, Utc};

use super::progress::TrainingProgressPrinter;
use super::serve::{self, Role, ServeArgs};
use crate::config::Settings;
use crate::data::{ImportOptions, import_csv};
use crate::forecast::synthetic::{SyntheticKind, SyntheticSpec, generate};
use crate::forecast::xlstm::TrainingProgress;
use crate::jobs::{
    TrainMode, WorkerConfig, WorkerPool, enqueue_train, put_schedule, standard_executors,
};
use crate::store::{self, RunStatus, ScheduleMode, ScheduleSpec, Series, Store};

const SERIES: &str = "demo";
/// Hourly fine-tune, five minutes past each hour.
const HOURLY_CRON: &str = "0 5 * * * *";

#[derive(Debug, clap::Args)]
pub struct QuickstartArgs {
    /// Address to listen on [default: server.bind from the settings].
    #[arg(long, value_name = "HOST:PORT")]
    pub bind: Option<SocketAddr>,
    /// Preset of the first model (tiny trains in seconds; small takes minutes on a CPU).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Hourly rows of the sample series (ending at the current hour).
    #[arg(long, default_value_t = 24 * 60)]
    pub rows: usize,
    /// Prepare everything, then exit instead of serving.
    #[arg(long)]
    pub no_serve: bool,
}

pub async fn run(args: QuickstartArgs, settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database_url();
    let store = store::connect(&url).await?;
    eprintln!("store: {}", crate::config::mask_database_url(&url));
    let series = ensure_sample_series(store.as_ref(), args.rows).await?;
    ensure_champion(&store, &series, &args.preset).await?;
    if store.get_schedule(series.id).await?.is_none() {
        put_schedule(
            store.as_ref(),
            None,
            &ScheduleSpec {
                series_id: series.id,
                cron: HOURLY_CRON.to_string(),
                timezone: "UTC".to_string(),
                mode: ScheduleMode::Finetune,
                enabled: true,
            },
        )
        .await?;
        eprintln!("schedule: fine-tune '{SERIES}' hourly ({HOURLY_CRON}, UTC)");
    }
    let bind = args.bind.unwrap_or(settings.server.bind);
    let base = format!("http://{bind}");
    eprintln!(
        "\nready:\n  dashboard  {base}/\n  API docs   {base}/docs/\n  forecast   curl '{base}/api/v1/series/{SERIES}/forecast?horizon=24&quantiles=0.1,0.5,0.9'\n"
    );
    if args.no_serve {
        return Ok(());
    }
    drop(store);
    serve::run(
        ServeArgs {
            bind: Some(bind),
            max_upload_bytes: crate::api::BodyLimits::DEFAULT_OBSERVATIONS_BYTES,
            role: Role::All,
            workers: 1,
            lease_seconds: 30.0,
            schedule_reload_seconds: 30,
        },
        settings,
    )
    .await
}

/// The sample series, created with `rows` hourly rows up to the current hour if missing.
async fn ensure_sample_series(store: &dyn Store, rows: usize) -> anyhow::Result<Series> {
    if let Some(series) = store.get_series(SERIES).await?
        && store.observation_range(SERIES).await?.count > 0
    {
        eprintln!("series '{SERIES}' exists: keeping it");
        return Ok(series);
    }
    let hour = Utc::now().duration_trunc(TimeDelta::hours(1))?;
    let start = hour - TimeDelta::hours(rows as i64 - 1);
    let spec = SyntheticSpec {
        start_micros: start.timestamp_micros(),
        ..SyntheticSpec::new(SyntheticKind::Hourly, rows, 4, 2026)
    };
    let sample = generate(&spec)?;
    let names = ["load_kw", "temperature_c", "occupancy", "solar_kw"];
    let mut csv = format!("ts,{}\n", names.join(","));
    for row in 0..rows {
        let ts = chrono::DateTime::from_timestamp_micros(sample.timestamp_micros(row))
            .context("timestamp")?;
        let values: Vec<String> = (0..4)
            .map(|c| sample.matrix.values[row * 4 + c].to_string())
            .collect();
        csv.push_str(&format!("{},{}\n", ts.to_rfc3339(), values.join(",")));
    }
    let mut options = ImportOptions::new(SERIES);
    options.frequency = Some(SyntheticKind::Hourly.frequency());
    import_csv(store, Cursor::new(csv.into_bytes()), &options).await?;
    eprintln!(
        "series '{SERIES}': {rows} hourly rows x 4 channels (synthetic: 3 loads with daily and weekly cycles, operating regimes, trend, level shifts and a nonlinear response to the temperature in the last channel)"
    );
    store
        .get_series(SERIES)
        .await?
        .context("the sample series was just imported")
}

/// Trains the first model through the run queue, showing its progress, unless one exists.
async fn ensure_champion(
    store: &Arc<dyn Store>,
    series: &Series,
    preset: &str,
) -> anyhow::Result<()> {
    if store.champion_model_version(series.id).await?.is_some() {
        eprintln!("model: a champion exists: keeping it");
        return Ok(());
    }
    let run = enqueue_train(
        store.as_ref(),
        series,
        TrainMode::Full,
        serde_json::json!({"mode": "full", "preset": preset}),
    )
    .await?;
    eprintln!("training preset '{preset}' (run {})", run.id);
    let workers = WorkerPool::start(
        store.clone(),
        standard_executors(store.clone(), candle_core::Device::Cpu),
        WorkerConfig {
            poll_interval: Duration::from_millis(50),
            ..WorkerConfig::default()
        },
    );
    let mut printer = TrainingProgressPrinter::new();
    let finished = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let current = store
            .get_run(run.id)
            .await?
            .context("the training run vanished")?;
        if let Ok(progress) = serde_json::from_value::<TrainingProgress>(current.progress.clone()) {
            let _ = printer.show(&progress);
        }
        if !matches!(current.status, RunStatus::Queued | RunStatus::Running) {
            break current;
        }
    };
    printer.finish();
    workers.shutdown().await;
    if finished.status != RunStatus::Succeeded {
        bail!(
            "training ended {}: {}",
            finished.status.as_str(),
            finished.error.unwrap_or_default()
        );
    }
    let version = store
        .get_model_version_summary(
            finished
                .model_version_id
                .context("the run names its model")?,
        )
        .await?
        .context("the trained model version")?;
    let metric = |key: &str| {
        version
            .metrics
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    eprintln!(
        "model {}: validation mse {:.3}, coverage of the 10-90% band {:.2}; forecast persisted",
        version.id,
        metric("val_mse"),
        metric("coverage_80")
    );
    Ok(())
}
