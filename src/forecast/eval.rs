//! The standard long-horizon evaluation protocol (`xlstm-forecast eval`): split the rows into
//! train / validation / test from the start, z-score every channel with the training rows'
//! statistics, fit on the training windows (selecting or early-stopping on the validation
//! windows), and score EVERY stride-1 test window whose horizon lies in the test rows, on the
//! z-scored scale.

use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use crate::data::{ChannelMatrix, Frequency};

use super::baseline::{LinearBaseline, SeasonalNaive};
use super::error::ForecastError;
use super::metrics::{ChannelMetrics, Metrics, MetricsAccumulator, seasonal_naive_scale};
use super::model::{Fit, Fitted, Predict, TrainingData};
use super::window::{SplitRows, SplitSpec, ZScore};
use super::xlstm::{Preset, ProgressCallback, XlstmForecaster};

/// Test windows forecast per batch.
const EVAL_BATCH_WINDOWS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelChoice {
    Xlstm,
    Linear,
    SeasonalNaive,
}

impl ModelChoice {
    pub fn name(self) -> &'static str {
        match self {
            Self::Xlstm => "xlstm",
            Self::Linear => "linear",
            Self::SeasonalNaive => "seasonal-naive",
        }
    }
}

/// The season length used by seasonal naive and the MASE scale for a data frequency: hourly →
/// 24, 15 minutes → 96, 10 minutes → 144, daily → 7 (a day or a week of steps); anything
/// else, or unknown → 1 (the naive forecast).
pub fn seasonal_period_for(frequency: Option<Frequency>) -> usize {
    const MINUTE: i64 = 60_000_000;
    match frequency.map(Frequency::micros) {
        Some(step) if step == 60 * MINUTE => 24,
        Some(step) if step == 15 * MINUTE => 96,
        Some(step) if step == 10 * MINUTE => 144,
        Some(step) if step == 24 * 60 * MINUTE => 7,
        _ => 1,
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub lookback: usize,
    pub horizon: usize,
    pub split: SplitSpec,
    pub model: ModelChoice,
    /// Season length for seasonal naive and the MASE scale.
    pub seasonal_period: usize,
    /// Model preset name or preset file (xLSTM only; default `small`).
    pub preset: Option<String>,
    /// Caps the preset's training epochs (xLSTM only).
    pub max_epochs: Option<usize>,
    /// Replaces the preset's seed (xLSTM only; the baselines are deterministic).
    pub seed: Option<u64>,
    /// Where the xLSTM model trains and predicts.
    pub device: Device,
}

impl EvalOptions {
    /// Options for `model` with the defaults: the `small` preset, its seed, the CPU.
    pub fn new(
        lookback: usize,
        horizon: usize,
        split: SplitSpec,
        model: ModelChoice,
        seasonal_period: usize,
    ) -> Self {
        Self {
            lookback,
            horizon,
            split,
            model,
            seasonal_period,
            preset: None,
            max_epochs: None,
            seed: None,
            device: Device::Cpu,
        }
    }
}

/// The preset `eval` and `train` use when none is named.
pub const DEFAULT_PRESET: &str = "small";

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    #[serde(flatten)]
    pub metrics: Metrics,
    /// Learnt parameters of the fitted model.
    pub params: usize,
    pub epochs: usize,
    pub train_seconds: f64,
    pub model: &'static str,
    pub preset: Option<String>,
    pub lookback: usize,
    pub horizon: usize,
    pub channels: usize,
    pub seasonal_period: usize,
    pub train_rows: usize,
    pub validation_rows: usize,
    pub test_rows: usize,
    /// Each channel's point accuracy on the test windows, in the series' channel order.
    pub per_channel: Vec<ChannelMetrics>,
}

/// Runs the protocol on `series` (raw values, `[time, channel]`, rows in time order).
pub fn evaluate(series: ChannelMatrix, options: &EvalOptions) -> Result<EvalReport, ForecastError> {
    evaluate_with_progress(series, options, None)
}

/// [`evaluate`], reporting the xLSTM model's training progress to `progress`.
pub fn evaluate_with_progress(
    mut series: ChannelMatrix,
    options: &EvalOptions,
    progress: Option<ProgressCallback<'_>>,
) -> Result<EvalReport, ForecastError> {
    let preset = match options.model {
        ModelChoice::Xlstm => {
            let mut preset = Preset::load(options.preset.as_deref().unwrap_or(DEFAULT_PRESET))?;
            if let Some(max_epochs) = options.max_epochs {
                if max_epochs == 0 {
                    return Err(ForecastError::invalid("max_epochs", "must be at least 1"));
                }
                preset.training.max_epochs = max_epochs;
            }
            if let Some(seed) = options.seed {
                preset.training.seed = seed;
            }
            Some(preset)
        }
        _ => {
            if options.preset.is_some() {
                return Err(ForecastError::invalid(
                    "preset",
                    format!(
                        "presets configure the xlstm model; the {} baseline has none",
                        options.model.name()
                    ),
                ));
            }
            None
        }
    };
    let (lookback, horizon) = (options.lookback, options.horizon);
    let split = options.split.resolve(series.steps)?;
    let train = split.train_windows(lookback, horizon)?;
    let validation = split.validation_windows(lookback, horizon)?;
    ZScore::fit(&series, split.train_range())?.apply(&mut series);
    let mase_scale = seasonal_naive_scale(&series, split.train_range(), options.seasonal_period)?;
    let data = TrainingData {
        series: &series,
        lookback,
        horizon,
        season: options.seasonal_period,
        train,
        validation,
    };
    match preset {
        Some(preset) => {
            let preset_name = preset.name.clone();
            let forecaster = XlstmForecaster::new(preset, options.device.clone());
            let mut report = score(
                |data| forecaster.fit_with_progress(data, progress),
                &data,
                &split,
                mase_scale,
                options,
            )?;
            report.preset = Some(preset_name);
            Ok(report)
        }
        None => match options.model {
            ModelChoice::Linear => score(
                |data| LinearBaseline::default().fit(data),
                &data,
                &split,
                mase_scale,
                options,
            ),
            _ => score(
                |data| SeasonalNaive::new(options.seasonal_period).fit(data),
                &data,
                &split,
                mase_scale,
                options,
            ),
        },
    }
}

fn score<M: Predict>(
    fit: impl FnOnce(&TrainingData<'_>) -> Result<Fitted<M>, ForecastError>,
    data: &TrainingData<'_>,
    split: &SplitRows,
    mase_scale: Vec<f64>,
    options: &EvalOptions,
) -> Result<EvalReport, ForecastError> {
    let started = Instant::now();
    let fitted = fit(data)?;
    let train_seconds = started.elapsed().as_secs_f64();
    let test = split.test_windows(data.lookback, data.horizon)?;
    let mut accumulator = MetricsAccumulator::new(mase_scale);
    test.for_each_block(
        data.series,
        data.lookback,
        data.horizon,
        EVAL_BATCH_WINDOWS,
        |inputs, targets| {
            let forecast = fitted.model.predict(&inputs)?;
            accumulator.add(&forecast, &targets)
        },
    )?;
    Ok(EvalReport {
        metrics: accumulator.finish(),
        per_channel: accumulator.per_channel(),
        params: fitted.model.parameter_count(),
        epochs: fitted.epochs,
        train_seconds,
        model: options.model.name(),
        preset: options.preset.clone(),
        lookback: data.lookback,
        horizon: data.horizon,
        channels: data.series.channels,
        seasonal_period: options.seasonal_period,
        train_rows: split.train,
        validation_rows: split.validation,
        test_rows: split.test,
    })
}
