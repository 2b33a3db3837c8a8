//! The executor of train and finetune runs: loads the series, trains a new model or
//! fine-tunes the champion on a blocking thread (progress reported as it goes, cancellation
//! honoured between steps), writes the complete model version, and promotes it only when its
//! error on the most recent validation rows is no worse than the champion's on the same rows;
//! a promotion persists a fresh forecast for the dashboards.

use std::ops::ControlFlow;
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::Device;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::executor::{ExecutionOutcome, RunContext, RunExecutor, RunFailure, StopReason};
use crate::data::{FrameOptions, load_frame};
use crate::forecast::DEFAULT_PRESET;
use crate::forecast::ForecastError;
use crate::forecast::xlstm::{
    DEFAULT_VALIDATION_FRACTION, ModelManifest, ParentModel, Preset, SeriesData, SeriesForecast,
    TrainingProgress, XlstmForecaster, XlstmModel, finetune_on_series, forecast_latest,
    recent_validation_mse, train_on_series,
};
use crate::store::{
    ForecastPoint, ModelVersion, ModelVersionStatus, NewForecast, NewModelVersion, Run, RunKind,
    Series, Store,
};

/// Settings a train request may change on its preset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOverrides {
    pub lookback: Option<usize>,
    pub horizon: Option<usize>,
    pub max_epochs: Option<usize>,
    pub seed: Option<u64>,
    pub learning_rate: Option<f64>,
    pub batch_size: Option<usize>,
}

/// What a train or finetune run asks for (the run's `requested` document).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    /// A preset name; default: the champion's preset, else `small`.
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub overrides: TrainOverrides,
}

impl TrainRequest {
    /// Reads the request of `run`; other keys (`mode`, `trigger`) are the queue's.
    pub fn of_run(run: &Run) -> Result<Self, ForecastError> {
        let mut document = run.requested.clone();
        if let Value::Object(map) = &mut document {
            map.retain(|key, _| key == "preset" || key == "overrides");
        }
        serde_json::from_value(document)
            .map_err(|err| ForecastError::invalid("overrides", err.to_string()))
    }

    /// The preset this request trains with: named, else `fallback`, with the overrides
    /// applied and validated. `(preset, lookback, horizon)`.
    pub fn resolve(&self, fallback: &str) -> Result<(Preset, usize, usize), ForecastError> {
        let mut preset = Preset::load(self.preset.as_deref().unwrap_or(fallback))?;
        let o = &self.overrides;
        if let Some(max_epochs) = o.max_epochs {
            preset.training.max_epochs = max_epochs;
        }
        if let Some(seed) = o.seed {
            preset.training.seed = seed;
        }
        if let Some(learning_rate) = o.learning_rate {
            preset.training.learning_rate = learning_rate;
        }
        if let Some(batch_size) = o.batch_size {
            preset.training.batch_size = batch_size;
        }
        if let Some(lookback) = o.lookback {
            preset.lookback = lookback;
        }
        if let Some(horizon) = o.horizon {
            preset.horizon = horizon;
        }
        preset.validate()?;
        let (lookback, horizon) = (preset.lookback, preset.horizon);
        Ok((preset, lookback, horizon))
    }
}

/// The `config` document of a stored version: what readers want at a glance, and the whole
/// manifest the model is rebuilt from.
pub fn version_config(manifest: &ModelManifest) -> Value {
    json!({
        "preset": manifest.preset.name,
        "lookback": manifest.shape.lookback,
        "horizon": manifest.shape.horizon,
        "channels": manifest.data.as_ref().map(|d| d.channels.clone()),
        "quantile_levels": manifest.preset.model.quantile_levels,
        "manifest": manifest,
    })
}

/// Rebuilds the model of a stored version.
pub fn load_model_version(
    version: &ModelVersion,
    device: &Device,
) -> Result<XlstmModel, ForecastError> {
    let manifest = version.summary.config.get("manifest").ok_or_else(|| {
        ForecastError::invalid(
            "model",
            format!("model version {} has no manifest", version.summary.id),
        )
    })?;
    let manifest = ModelManifest::from_json(&manifest.to_string())?;
    XlstmModel::from_parts(&version.artefact, manifest, device)
}

/// A series with its rows, as the forecaster takes it.
pub async fn load_series_data(store: &dyn Store, series: &Series) -> Result<SeriesData, String> {
    let frame = load_frame(
        store,
        &series.name,
        None,
        None,
        &FrameOptions::for_forecasting(),
    )
    .await
    .map_err(|err| format!("loading the series failed: {err}"))?;
    SeriesData::from_frame(&frame).map_err(|err| err.to_string())
}

/// The stored form of a forecast.
pub fn forecast_record(
    series_id: i64,
    model_version_id: i64,
    forecast: &SeriesForecast,
) -> NewForecast {
    let mut points = Vec::with_capacity(forecast.timestamps.len() * forecast.channels.len());
    for (step, ts) in forecast.timestamps.iter().enumerate() {
        for (channel, name) in forecast.channels.iter().enumerate() {
            points.push(ForecastPoint {
                step: step as u32 + 1,
                ts: *ts,
                channel: name.clone(),
                mean: widen(forecast.mean[step][channel]),
                quantiles: forecast.quantiles[step][channel]
                    .iter()
                    .map(|q| widen(*q))
                    .collect(),
            });
        }
    }
    NewForecast {
        series_id,
        model_version_id,
        issued_at: Utc::now(),
        horizon: forecast.timestamps.len() as u32,
        quantile_levels: forecast.quantile_levels.iter().map(|l| widen(*l)).collect(),
        points,
    }
}

/// The f64 a reader of the f32 expects (0.1, not 0.10000000149011612): the shortest decimal
/// that round-trips the f32, read back as f64.
fn widen(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

pub struct TrainingExecutor {
    store: Arc<dyn Store>,
    device: Device,
}

impl TrainingExecutor {
    pub fn new(store: Arc<dyn Store>, device: Device) -> Self {
        Self { store, device }
    }
}

/// What the blocking training thread hands back.
struct Trained {
    model: XlstmModel,
    /// The series it was trained on; the promoted model forecasts from it.
    data: SeriesData,
    recent_mse: f64,
    champion_recent_mse: Option<f64>,
}

#[async_trait]
impl RunExecutor for TrainingExecutor {
    async fn execute(&self, run: &Run, ctx: RunContext) -> Result<ExecutionOutcome, RunFailure> {
        let store = self.store.as_ref();
        let series = store
            .get_series_by_id(run.series_id)
            .await
            .map_err(RunFailure::failed)?
            .ok_or_else(|| {
                RunFailure::failed(format!("series {} no longer exists", run.series_id))
            })?;
        let request = TrainRequest::of_run(run).map_err(RunFailure::failed)?;
        let data = load_series_data(store, &series)
            .await
            .map_err(RunFailure::Failed)?;
        let champion = match store
            .champion_model_version(series.id)
            .await
            .map_err(RunFailure::failed)?
        {
            Some(version) => {
                let model = load_model_version(&version, &self.device).map_err(|err| {
                    RunFailure::failed(format!("loading the champion failed: {err}"))
                })?;
                Some((version.summary.id, model))
            }
            None => None,
        };
        let fallback = champion
            .as_ref()
            .map_or(DEFAULT_PRESET.to_string(), |(_, model)| {
                model.manifest.preset.name.clone()
            });
        let finetune = run.kind == RunKind::Finetune && champion.is_some();
        let resolved = if finetune {
            None
        } else {
            Some(request.resolve(&fallback).map_err(RunFailure::failed)?)
        };
        ctx.check_continue()?;

        let reporter = ctx.reporter();
        let device = self.device.clone();
        let trained = tokio::task::spawn_blocking(move || -> Result<Trained, ForecastError> {
            let mut report = |progress: &TrainingProgress| {
                reporter.report(serde_json::to_value(progress).unwrap_or(Value::Null));
                match reporter.stop_reason() {
                    Some(_) => ControlFlow::Break(()),
                    None => ControlFlow::Continue(()),
                }
            };
            let model = match (&champion, resolved) {
                (Some((id, parent)), None) => {
                    let parent_ref = ParentModel {
                        version_id: Some(*id),
                        data_to: parent.manifest.data.as_ref().and_then(|d| d.data_to),
                        library_version: parent.manifest.library_version.clone(),
                    };
                    finetune_on_series(
                        parent,
                        parent_ref,
                        &data,
                        DEFAULT_VALIDATION_FRACTION,
                        Some(&mut report),
                    )?
                }
                (_, Some((preset, lookback, horizon))) => train_on_series(
                    &XlstmForecaster::new(preset, device),
                    &data,
                    lookback,
                    horizon,
                    DEFAULT_VALIDATION_FRACTION,
                    Some(&mut report),
                )?,
                (None, None) => unreachable!("a fine-tune without a champion trains in full"),
            };
            let recent_mse = recent_validation_mse(&model, &data, DEFAULT_VALIDATION_FRACTION)?;
            // A champion that cannot be scored on today's data (other channels, too few rows
            // for its window) is no yardstick: the new model replaces it.
            let champion_recent_mse = champion.as_ref().and_then(|(_, parent)| {
                recent_validation_mse(parent, &data, DEFAULT_VALIDATION_FRACTION).ok()
            });
            Ok(Trained {
                model,
                data,
                recent_mse,
                champion_recent_mse,
            })
        })
        .await
        .map_err(|err| RunFailure::failed(format!("the training thread failed: {err}")))?;
        let trained = match trained {
            Ok(trained) => trained,
            Err(ForecastError::Cancelled) => {
                return Err(RunFailure::Stopped(
                    ctx.stop_reason().unwrap_or(StopReason::Cancelled),
                ));
            }
            Err(err) => return Err(RunFailure::failed(err)),
        };
        // Nothing is written for a run that was cancelled or taken over meanwhile.
        ctx.check_continue()?;
        self.record(&series, trained).await
    }
}

impl TrainingExecutor {
    async fn record(
        &self,
        series: &Series,
        trained: Trained,
    ) -> Result<ExecutionOutcome, RunFailure> {
        let store = self.store.as_ref();
        let Trained {
            mut model,
            data,
            recent_mse,
            champion_recent_mse,
        } = trained;
        let promote = champion_recent_mse.is_none_or(|champion| recent_mse <= champion);
        let recorded = [
            ("recent_mse", json!(recent_mse)),
            ("champion_recent_mse", json!(champion_recent_mse)),
            ("promoted", json!(promote)),
        ];
        for (key, value) in recorded {
            model.manifest.metrics.insert(key.to_string(), value);
        }
        let manifest = &model.manifest;
        let description = manifest.data.clone().expect("trained on a series");
        let metrics = Value::Object(manifest.metrics.clone());
        let config = version_config(manifest);
        let version = store
            .insert_model_version(&NewModelVersion {
                series_id: series.id,
                config,
                artefact: model.weights_bytes().map_err(RunFailure::failed)?,
                normalisation: json!({
                    "zscore_mean": description.zscore_mean,
                    "zscore_std": description.zscore_std,
                }),
                data_from: description.data_from.unwrap_or_else(Utc::now),
                data_to: description.data_to.unwrap_or_else(Utc::now),
                metrics,
                status: ModelVersionStatus::Ready,
                parent_version_id: manifest.parent.as_ref().and_then(|p| p.version_id),
            })
            .await
            .map_err(RunFailure::failed)?;
        if promote {
            store
                .promote_model_version(version.id)
                .await
                .map_err(RunFailure::failed)?;
            let horizon = manifest.shape.horizon;
            let forecast =
                tokio::task::spawn_blocking(move || forecast_latest(&model, &data, horizon))
                    .await
                    .map_err(|err| {
                        RunFailure::failed(format!("the forecast thread failed: {err}"))
                    })?
                    .map_err(|err| {
                        RunFailure::failed(format!(
                            "forecasting with the new champion failed: {err}"
                        ))
                    })?;
            store
                .insert_forecast(&forecast_record(series.id, version.id, &forecast))
                .await
                .map_err(RunFailure::failed)?;
        }
        Ok(ExecutionOutcome::Succeeded {
            model_version_id: Some(version.id),
        })
    }
}
