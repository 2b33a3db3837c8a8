//! Training, fine-tuning and forecasting on a whole series in its own units, as the CLI and
//! the service do: the most recent rows are held out for validation, channels are z-scored
//! with the training rows' statistics (kept in the manifest and reused by fine-tunes and
//! forecasts), and forecasts come with the timestamps that continue the series.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::data::{
    CALENDAR_FEATURES, ChannelMatrix, DataError, Frequency, SeriesFrame, infer_frequency,
};

use super::super::error::ForecastError;
use super::super::eval::seasonal_period_for;
use super::super::metrics::{MetricsAccumulator, seasonal_naive_scale};
use super::super::model::{Predict, TrainingData, WindowBatch};
use super::super::window::{SplitRows, ZScore};
use super::artefact::{DataDescription, ParentModel};
use super::forecaster::{XlstmForecaster, XlstmModel};
use super::train::ProgressCallback;

/// Share of the rows held out for validation (early stopping, calibration, metrics).
pub const DEFAULT_VALIDATION_FRACTION: f64 = 0.2;

/// A series in its own units, rows in time order.
#[derive(Debug, Clone)]
pub struct SeriesData {
    pub series: Option<String>,
    pub channels: Vec<String>,
    pub ts_micros: Vec<i64>,
    pub matrix: ChannelMatrix,
    /// The row spacing; inferred from the timestamps when absent.
    pub frequency: Option<Frequency>,
}

impl SeriesData {
    /// A regular frame from the store (`data::load_frame`) as the forecaster takes it.
    pub fn from_frame(frame: &SeriesFrame) -> Result<Self, DataError> {
        Ok(Self {
            series: Some(frame.series.clone()),
            channels: frame.channels.clone(),
            ts_micros: frame.ts_micros()?,
            matrix: frame.channel_matrix()?,
            frequency: Some(frame.frequency),
        })
    }

    fn frequency(&self) -> Option<Frequency> {
        self.frequency.or_else(|| infer_frequency(&self.ts_micros))
    }
}

/// Splits `rows` into training rows and the most recent `fraction` for validation, with room
/// for at least one window on each side.
fn split_rows(
    rows: usize,
    lookback: usize,
    horizon: usize,
    fraction: f64,
) -> Result<SplitRows, ForecastError> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(ForecastError::invalid(
            "validation_fraction",
            format!("must be in (0, 1), got {fraction}"),
        ));
    }
    let validation = ((rows as f64 * fraction).round() as usize).max(horizon);
    let needed = lookback + 2 * horizon;
    if rows < needed || rows - validation < lookback + horizon {
        return Err(ForecastError::invalid(
            "series",
            format!(
                "{rows} rows are too few for lookback {lookback} and horizon {horizon}: \
                 training needs lookback + horizon rows and validation at least {} more \
                 (at least {} rows)",
                validation,
                lookback + horizon + validation
            ),
        ));
    }
    Ok(SplitRows {
        train: rows - validation,
        validation,
        test: 0,
    })
}

fn datetime(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// Trains a new model on `data` with lookback `lookback` and horizon `horizon`.
pub fn train_on_series(
    forecaster: &XlstmForecaster,
    data: &SeriesData,
    lookback: usize,
    horizon: usize,
    validation_fraction: f64,
    progress: Option<ProgressCallback<'_>>,
) -> Result<XlstmModel, ForecastError> {
    let split = split_rows(data.matrix.steps, lookback, horizon, validation_fraction)?;
    let zscore = ZScore::fit(&data.matrix, split.train_range())?;
    let mut scaled = data.matrix.clone();
    zscore.apply(&mut scaled);
    let season = seasonal_period_for(data.frequency());
    let training = training_data(&scaled, &split, lookback, horizon, season)?;
    let mut model = forecaster.fit_with_progress(&training, progress)?.model;
    model.manifest.data = Some(describe(data, &zscore, &split));
    record_metrics(&mut model, &training, &split)?;
    Ok(model)
}

/// Fine-tunes `parent` on `data` (the same channels), keeping its z-scoring, lookback and
/// horizon; the result records `parent_ref`.
pub fn finetune_on_series(
    parent: &XlstmModel,
    parent_ref: ParentModel,
    data: &SeriesData,
    validation_fraction: f64,
    progress: Option<ProgressCallback<'_>>,
) -> Result<XlstmModel, ForecastError> {
    let description = parent.manifest.data.as_ref().ok_or_else(|| {
        ForecastError::invalid(
            "model",
            "the model was not trained on a series; it cannot be fine-tuned",
        )
    })?;
    check_channels(description, data)?;
    let shape = parent.manifest.shape;
    let split = split_rows(
        data.matrix.steps,
        shape.lookback,
        shape.horizon,
        validation_fraction,
    )?;
    let zscore = ZScore {
        mean: description.zscore_mean.clone(),
        std: description.zscore_std.clone(),
    };
    let mut scaled = data.matrix.clone();
    zscore.apply(&mut scaled);
    let season = seasonal_period_for(data.frequency());
    let training = training_data(&scaled, &split, shape.lookback, shape.horizon, season)?;
    let mut model = parent.finetune(&training, parent_ref, progress)?.model;
    model.manifest.data = Some(describe(data, &zscore, &split));
    record_metrics(&mut model, &training, &split)?;
    Ok(model)
}

fn check_channels(description: &DataDescription, data: &SeriesData) -> Result<(), ForecastError> {
    if description.channels != data.channels {
        return Err(ForecastError::invalid(
            "channels",
            format!(
                "the model was trained on channels [{}], the data has [{}]",
                description.channels.join(", "),
                data.channels.join(", ")
            ),
        ));
    }
    Ok(())
}

fn training_data<'a>(
    scaled: &'a ChannelMatrix,
    split: &SplitRows,
    lookback: usize,
    horizon: usize,
    season: usize,
) -> Result<TrainingData<'a>, ForecastError> {
    Ok(TrainingData {
        series: scaled,
        lookback,
        horizon,
        season,
        train: split.train_windows(lookback, horizon)?,
        validation: split.validation_windows(lookback, horizon)?,
    })
}

fn describe(data: &SeriesData, zscore: &ZScore, split: &SplitRows) -> DataDescription {
    DataDescription {
        series: data.series.clone(),
        channels: data.channels.clone(),
        frequency: data.frequency().map(|f| f.to_string()),
        zscore_mean: zscore.mean.clone(),
        zscore_std: zscore.std.clone(),
        data_from: data.ts_micros.first().copied().and_then(datetime),
        data_to: data.ts_micros.last().copied().and_then(datetime),
        train_rows: split.train,
        validation_rows: split.validation,
    }
}

/// Scores the model on every validation window (z-scored scale) into the manifest's metrics.
fn record_metrics(
    model: &mut XlstmModel,
    training: &TrainingData<'_>,
    split: &SplitRows,
) -> Result<(), ForecastError> {
    let scale = seasonal_naive_scale(training.series, split.train_range(), training.season)?;
    let mut accumulator = MetricsAccumulator::new(scale);
    training.validation.for_each_block(
        training.series,
        training.lookback,
        training.horizon,
        256,
        |inputs, targets| accumulator.add(&model.predict(&inputs)?, &targets),
    )?;
    let metrics = accumulator.finish();
    let summary = &model.manifest.training;
    let entries = [
        ("val_mse", serde_json::json!(metrics.mse)),
        ("val_mae", serde_json::json!(metrics.mae)),
        ("val_mase", serde_json::json!(metrics.mase)),
        ("val_wql", serde_json::json!(metrics.wql)),
        ("coverage_80", serde_json::json!(metrics.coverage_80)),
        ("val_windows", serde_json::json!(metrics.windows)),
        ("epochs", serde_json::json!(summary.epochs)),
        ("best_epoch", serde_json::json!(summary.best_epoch)),
        ("deep_scale", serde_json::json!(summary.deep_scale)),
        ("train_seconds", serde_json::json!(summary.train_seconds)),
        ("params", serde_json::json!(model.parameter_count())),
    ];
    for (key, value) in entries {
        model.manifest.metrics.insert(key.to_string(), value);
    }
    Ok(())
}

/// The model's MSE on the most recent `validation_fraction` of `data`'s rows (every stride-1
/// window whose horizon lies there), with errors scaled by each channel's standard deviation
/// over the rows before them: a yardstick on which models with different preprocessing compare
/// fairly on the same recent data (registry promotion).
pub fn recent_validation_mse(
    model: &XlstmModel,
    data: &SeriesData,
    validation_fraction: f64,
) -> Result<f64, ForecastError> {
    let description = model.manifest.data.as_ref().ok_or_else(|| {
        ForecastError::invalid(
            "model",
            "the model was not trained on a series; it cannot be scored on one",
        )
    })?;
    check_channels(description, data)?;
    let (lookback, horizon) = (model.lookback(), model.horizon());
    let split = split_rows(data.matrix.steps, lookback, horizon, validation_fraction)?;
    let yardstick = ZScore::fit(&data.matrix, split.train_range())?;
    let model_scale = ZScore {
        mean: description.zscore_mean.clone(),
        std: description.zscore_std.clone(),
    };
    let mut scaled = data.matrix.clone();
    model_scale.apply(&mut scaled);
    let channels = data.matrix.channels;
    let (mut sum, mut count) = (0.0_f64, 0_usize);
    split
        .validation_windows(lookback, horizon)?
        .for_each_block(&scaled, lookback, horizon, 256, |inputs, targets| {
            let forecast = model.predict(&inputs)?;
            for (cell, missing) in targets.missing.iter().enumerate() {
                if *missing {
                    continue;
                }
                let channel = cell % channels;
                let error = (f64::from(forecast.mean[cell]) - f64::from(targets.values[cell]))
                    * model_scale.std[channel]
                    / yardstick.std[channel];
                sum += error * error;
                count += 1;
            }
            Ok(())
        })?;
    if count == 0 {
        return Err(ForecastError::invalid(
            "series",
            "the recent rows hold no observed value to score on",
        ));
    }
    Ok(sum / count as f64)
}

/// A forecast in the series' units and time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesForecast {
    /// Time of the last row the forecast starts after.
    pub origin: DateTime<Utc>,
    pub timestamps: Vec<DateTime<Utc>>,
    pub channels: Vec<String>,
    pub quantile_levels: Vec<f32>,
    /// `[step][channel]`.
    pub mean: Vec<Vec<f32>>,
    /// `[step][channel][level]`, levels as in `quantile_levels`.
    pub quantiles: Vec<Vec<Vec<f32>>>,
}

impl SeriesForecast {
    /// The first `horizon` steps with only the quantile levels at positions `levels` (in the
    /// order given).
    pub fn select(&self, horizon: usize, levels: &[usize]) -> Self {
        let horizon = horizon.min(self.timestamps.len());
        Self {
            origin: self.origin,
            timestamps: self.timestamps[..horizon].to_vec(),
            channels: self.channels.clone(),
            quantile_levels: levels.iter().map(|&l| self.quantile_levels[l]).collect(),
            mean: self.mean[..horizon].to_vec(),
            quantiles: self.quantiles[..horizon]
                .iter()
                .map(|step| {
                    step.iter()
                        .map(|channel| levels.iter().map(|&l| channel[l]).collect())
                        .collect()
                })
                .collect(),
        }
    }
}

/// Forecasts the `horizon` steps after the last row of `data` from its last `lookback` rows.
pub fn forecast_latest(
    model: &XlstmModel,
    data: &SeriesData,
    horizon: usize,
) -> Result<SeriesForecast, ForecastError> {
    let description = model.manifest.data.as_ref().ok_or_else(|| {
        ForecastError::invalid(
            "model",
            "the model was not trained on a series; it has no z-scoring to apply",
        )
    })?;
    check_channels(description, data)?;
    let (lookback, limit) = (model.lookback(), model.horizon());
    if horizon == 0 || horizon > limit {
        return Err(ForecastError::invalid(
            "horizon",
            format!("must be between 1 and the model's horizon {limit}, got {horizon}"),
        ));
    }
    let rows = data.matrix.steps;
    if rows < lookback {
        return Err(ForecastError::invalid(
            "series",
            format!("the model needs the last {lookback} rows, the series has {rows}"),
        ));
    }
    let frequency = data
        .frequency()
        .or_else(|| {
            description
                .frequency
                .as_deref()
                .and_then(|f| f.parse().ok())
        })
        .ok_or_else(|| {
            ForecastError::invalid(
                "series",
                "cannot tell the series' frequency to date the forecast",
            )
        })?;
    let channels = data.matrix.channels;
    let first = (rows - lookback) * channels;
    let mut window = ChannelMatrix {
        steps: lookback,
        channels,
        values: data.matrix.values[first..].to_vec(),
        missing: data.matrix.missing[first..].to_vec(),
        calendar: None,
    };
    if window.missing.iter().all(|missing| *missing) {
        return Err(ForecastError::invalid(
            "series",
            format!("the last {lookback} rows hold no observed value"),
        ));
    }
    let zscore = ZScore {
        mean: description.zscore_mean.clone(),
        std: description.zscore_std.clone(),
    };
    zscore.apply(&mut window);
    let mut windows = WindowBatch::new(1, lookback, channels, window.values, window.missing)?;
    if let Some(calendar) = &data.matrix.calendar {
        windows = windows.with_calendar(calendar[(rows - 1) * CALENDAR_FEATURES..].to_vec())?;
    }
    let forecast = model.predict(&windows)?;
    let levels = forecast.quantile_levels.len();
    let unscale = |value: f32, channel: usize| {
        (f64::from(value) * zscore.std[channel] + zscore.mean[channel]) as f32
    };
    let last = *data.ts_micros.last().expect("rows >= lookback >= 1");
    let origin = datetime(last)
        .ok_or_else(|| ForecastError::invalid("series", "last timestamp out of range"))?;
    let timestamps = (1..=horizon as i64)
        .map(|step| {
            datetime(last + step * frequency.micros()).ok_or_else(|| {
                ForecastError::invalid("horizon", "forecast timestamps out of range")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mean = (0..horizon)
        .map(|step| {
            (0..channels)
                .map(|channel| {
                    unscale(
                        forecast.mean[forecast.mean_index(0, step, channel)],
                        channel,
                    )
                })
                .collect()
        })
        .collect();
    let quantiles = (0..horizon)
        .map(|step| {
            (0..channels)
                .map(|channel| {
                    (0..levels)
                        .map(|level| {
                            unscale(
                                forecast.quantiles
                                    [forecast.quantile_index(0, step, channel, level)],
                                channel,
                            )
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    Ok(SeriesForecast {
        origin,
        timestamps,
        channels: data.channels.clone(),
        quantile_levels: forecast.quantile_levels,
        mean,
        quantiles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_keeps_the_first_steps_and_the_named_levels() {
        let at = |hour: i64| DateTime::from_timestamp(hour * 3600, 0).unwrap();
        let forecast = SeriesForecast {
            origin: at(0),
            timestamps: vec![at(1), at(2), at(3)],
            channels: vec!["a".into(), "b".into()],
            quantile_levels: vec![0.1, 0.5, 0.9],
            mean: vec![vec![1.0, 10.0], vec![2.0, 20.0], vec![3.0, 30.0]],
            quantiles: (1..=3)
                .map(|step| {
                    (1..=2)
                        .map(|channel| {
                            (1..=3)
                                .map(|level| (100 * step + 10 * channel + level) as f32)
                                .collect()
                        })
                        .collect()
                })
                .collect(),
        };
        let selected = forecast.select(2, &[2, 0]);
        assert_eq!(selected.timestamps, vec![at(1), at(2)]);
        assert_eq!(selected.quantile_levels, vec![0.9, 0.1]);
        assert_eq!(selected.mean, vec![vec![1.0, 10.0], vec![2.0, 20.0]]);
        assert_eq!(selected.quantiles[1][1], vec![223.0, 221.0]);
        assert_eq!(forecast.select(3, &[0, 1, 2]), forecast);
    }

    #[test]
    fn validation_takes_the_most_recent_rows() {
        let split = split_rows(1000, 96, 24, 0.2).unwrap();
        assert_eq!((split.train, split.validation), (800, 200));
        let err = split_rows(100, 96, 24, 0.2).unwrap_err().to_string();
        assert!(err.contains("too few"), "{err}");
    }
}
