//! Accuracy of forecasts against actuals, accumulated over any number of batches. All metrics
//! are on the scale the forecasts and actuals are given in (the z-scored scale in `eval`), and
//! only observed actual cells count.
//!
//! - `mse`, `mae`: mean squared / absolute error over every observed (window, step, channel).
//! - `mase`: per channel, the forecast MAE divided by the in-sample MAE of the seasonal naive
//!   forecast on the training rows, `mean_t |y_t − y_{t−m}|` (Hyndman & Koehler 2006, the
//!   definition GluonTS uses per series); then the mean over channels. Undefined (NaN) when a
//!   channel's training series is exactly periodic.
//! - `wql`: mean over the quantile levels τ of `2 · Σ ρ_τ(y, q_τ) / Σ |y|`, with the pinball
//!   loss `ρ_τ(y, q) = max(τ (y − q), (τ − 1)(y − q))` (GluonTS' mean weighted quantile loss).
//! - `coverage_80`: share of observed actuals with `q_0.1 ≤ y ≤ q_0.9`; NaN when the forecast
//!   lacks either level.
//!
//! [`MetricsAccumulator::per_channel`] gives `mse`, `mae` and `mase` of each channel alone: an
//! average over channels hides the one channel a model gets wrong.

use std::ops::Range;

use crate::data::ChannelMatrix;

use super::error::ForecastError;
use super::model::{Forecast, Targets};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Metrics {
    pub mse: f64,
    pub mae: f64,
    pub mase: f64,
    pub wql: f64,
    pub coverage_80: f64,
    /// Windows scored.
    pub windows: usize,
}

/// One channel's point accuracy, on the same scale as [`Metrics`]; NaN for a channel without
/// an observed actual.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ChannelMetrics {
    pub mse: f64,
    pub mae: f64,
    pub mase: f64,
    /// Observed actual cells scored.
    pub cells: usize,
}

/// The seasonal naive in-sample MAE per channel over `rows` of `series`: the MASE scale.
/// Pairs with a missing cell are skipped.
pub fn seasonal_naive_scale(
    series: &ChannelMatrix,
    rows: Range<usize>,
    period: usize,
) -> Result<Vec<f64>, ForecastError> {
    if period == 0 || rows.len() <= period {
        return Err(ForecastError::invalid(
            "season_period",
            format!(
                "a season of {period} steps needs more than {period} rows, the training split has {}",
                rows.len()
            ),
        ));
    }
    let channels = series.channels;
    let mut sum = vec![0.0_f64; channels];
    let mut count = vec![0_usize; channels];
    for row in rows.start + period..rows.end {
        for channel in 0..channels {
            let (now, before) = (
                row * channels + channel,
                (row - period) * channels + channel,
            );
            if !series.missing[now] && !series.missing[before] {
                sum[channel] +=
                    (f64::from(series.values[now]) - f64::from(series.values[before])).abs();
                count[channel] += 1;
            }
        }
    }
    Ok(sum
        .iter()
        .zip(&count)
        .map(|(sum, count)| {
            if *count == 0 {
                f64::NAN
            } else {
                sum / *count as f64
            }
        })
        .collect())
}

/// Running sums behind [`Metrics`].
#[derive(Debug, Clone)]
pub struct MetricsAccumulator {
    mase_scale: Vec<f64>,
    squared_error_per_channel: Vec<f64>,
    absolute_error_per_channel: Vec<f64>,
    observed_per_channel: Vec<usize>,
    pinball: f64,
    absolute_actual: f64,
    quantile_levels: Option<Vec<f32>>,
    covered: usize,
    windows: usize,
}

const LEVEL_TOLERANCE: f32 = 1e-6;

impl MetricsAccumulator {
    /// `mase_scale`: one value per channel, see [`seasonal_naive_scale`].
    pub fn new(mase_scale: Vec<f64>) -> Self {
        let channels = mase_scale.len();
        Self {
            mase_scale,
            squared_error_per_channel: vec![0.0; channels],
            absolute_error_per_channel: vec![0.0; channels],
            observed_per_channel: vec![0; channels],
            pinball: 0.0,
            absolute_actual: 0.0,
            quantile_levels: None,
            covered: 0,
            windows: 0,
        }
    }

    pub fn add(&mut self, forecast: &Forecast, actual: &Targets) -> Result<(), ForecastError> {
        let channels = self.mase_scale.len();
        if (forecast.batch, forecast.horizon, forecast.channels)
            != (actual.batch, actual.horizon, actual.channels)
            || actual.channels != channels
        {
            return Err(ForecastError::invalid(
                "forecast",
                format!(
                    "forecast shape [{}, {}, {}] does not match actuals [{}, {}, {}] with {channels} scaled channels",
                    forecast.batch,
                    forecast.horizon,
                    forecast.channels,
                    actual.batch,
                    actual.horizon,
                    actual.channels
                ),
            ));
        }
        let levels = &forecast.quantile_levels;
        match &self.quantile_levels {
            None => self.quantile_levels = Some(levels.clone()),
            Some(seen) if seen != levels => {
                return Err(ForecastError::invalid(
                    "forecast",
                    format!("quantile levels changed between batches: {seen:?} then {levels:?}"),
                ));
            }
            Some(_) => {}
        }
        let find = |wanted: f32| {
            levels
                .iter()
                .position(|level| (level - wanted).abs() < LEVEL_TOLERANCE)
        };
        let band = find(0.1).zip(find(0.9));
        let level_count = levels.len();
        for (cell, (&y, &missing)) in actual.values.iter().zip(&actual.missing).enumerate() {
            if missing {
                continue;
            }
            let channel = cell % channels;
            let y = f64::from(y);
            let error = y - f64::from(forecast.mean[cell]);
            self.squared_error_per_channel[channel] += error * error;
            self.absolute_error_per_channel[channel] += error.abs();
            self.observed_per_channel[channel] += 1;
            self.absolute_actual += y.abs();
            let quantiles = &forecast.quantiles[cell * level_count..(cell + 1) * level_count];
            for (level, quantile) in levels.iter().zip(quantiles) {
                let (tau, difference) = (f64::from(*level), y - f64::from(*quantile));
                self.pinball += (tau * difference).max((tau - 1.0) * difference);
            }
            if let Some((low, high)) = band
                && f64::from(quantiles[low]) <= y
                && y <= f64::from(quantiles[high])
            {
                self.covered += 1;
            }
        }
        self.windows += forecast.batch;
        Ok(())
    }

    /// Each channel's accuracy, in channel order.
    pub fn per_channel(&self) -> Vec<ChannelMetrics> {
        (0..self.mase_scale.len())
            .map(|channel| {
                let cells = self.observed_per_channel[channel];
                let mae = self.absolute_error_per_channel[channel] / cells as f64;
                let scale = self.mase_scale[channel];
                ChannelMetrics {
                    mse: self.squared_error_per_channel[channel] / cells as f64,
                    mae,
                    mase: if scale > 0.0 { mae / scale } else { f64::NAN },
                    cells,
                }
            })
            .collect()
    }

    pub fn finish(&self) -> Metrics {
        let observed = self.observed_per_channel.iter().sum::<usize>() as f64;
        let mae = self.absolute_error_per_channel.iter().sum::<f64>() / observed;
        let scored: Vec<ChannelMetrics> = self
            .per_channel()
            .into_iter()
            .filter(|channel| channel.cells > 0)
            .collect();
        let mase = scored.iter().map(|channel| channel.mase).sum::<f64>() / scored.len() as f64;
        let level_count = self.quantile_levels.as_ref().map_or(0, Vec::len) as f64;
        let has_band = self.quantile_levels.as_ref().is_some_and(|levels| {
            [0.1_f32, 0.9].iter().all(|wanted| {
                levels
                    .iter()
                    .any(|level| (level - wanted).abs() < LEVEL_TOLERANCE)
            })
        });
        Metrics {
            mse: self.squared_error_per_channel.iter().sum::<f64>() / observed,
            mae,
            mase,
            wql: 2.0 * self.pinball / self.absolute_actual / level_count,
            coverage_80: if has_band {
                self.covered as f64 / observed
            } else {
                f64::NAN
            },
            windows: self.windows,
        }
    }
}
