//! The standard long-horizon evaluation protocol (`xlstm-forecast eval`): split the rows into
//! train / validation / test from the start, z-score every channel with the training rows'
//! statistics, fit on the training windows (selecting or early-stopping on the validation
//! windows), and score EVERY stride-1 test window whose horizon lies in the test rows, on the
//! z-scored scale.

use std::time::Instant;

use serde::Serialize;

use crate::data::{ChannelMatrix, Frequency};

use super::baseline::{LinearBaseline, SeasonalNaive};
use super::error::ForecastError;
use super::metrics::{Metrics, MetricsAccumulator, seasonal_naive_scale};
use super::model::{Fit, Predict, TrainingData};
use super::window::{SplitRows, SplitSpec, ZScore};

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
    /// Model preset name (xLSTM only).
    pub preset: Option<String>,
}

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
}

/// Runs the protocol on `series` (raw values, `[time, channel]`, rows in time order).
pub fn evaluate(
    mut series: ChannelMatrix,
    options: &EvalOptions,
) -> Result<EvalReport, ForecastError> {
    if options.model == ModelChoice::Xlstm {
        return Err(ForecastError::Unavailable(
            "the xlstm forecaster is not available in this build yet".to_string(),
        ));
    }
    if options.preset.is_some() {
        return Err(ForecastError::invalid(
            "preset",
            format!(
                "presets configure the xlstm model; the {} baseline has none",
                options.model.name()
            ),
        ));
    }
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
        train,
        validation,
    };
    match options.model {
        ModelChoice::Linear => score(
            &LinearBaseline::default(),
            &data,
            &split,
            mase_scale,
            options,
        ),
        ModelChoice::SeasonalNaive => score(
            &SeasonalNaive::new(options.seasonal_period),
            &data,
            &split,
            mase_scale,
            options,
        ),
        ModelChoice::Xlstm => unreachable!("rejected above"),
    }
}

fn score<F: Fit>(
    forecaster: &F,
    data: &TrainingData<'_>,
    split: &SplitRows,
    mase_scale: Vec<f64>,
    options: &EvalOptions,
) -> Result<EvalReport, ForecastError> {
    let started = Instant::now();
    let fitted = forecaster.fit(data)?;
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
