//! What every forecaster consumes and produces, and the two traits it implements, in the
//! spirit of augurs: a `Fit` configuration is fitted on training data and yields a `Predict`
//! model that maps lookback windows to forecasts.
//!
//! All tensors are flat row-major `Vec`s so that this layer stays independent of the tensor
//! library; models convert at their boundary.

use std::ops::Range;

use crate::data::{CALENDAR_FEATURES, ChannelMatrix};

use super::error::ForecastError;
use super::window::WindowSet;

/// Quantile levels a forecaster emits unless configured otherwise.
pub const DEFAULT_QUANTILE_LEVELS: [f32; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// A batch of lookback windows: `values` and `missing` are row-major `[batch, lookback,
/// channels]`; a missing cell holds 0.0 and must not be read as an observation.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowBatch {
    pub batch: usize,
    pub lookback: usize,
    pub channels: usize,
    pub values: Vec<f32>,
    pub missing: Vec<bool>,
    /// Row-major `[batch, CALENDAR_FEATURES]`: the calendar features of each window's last
    /// lookback row (the rows are evenly spaced, so they place every lookback and horizon
    /// step in the day, week and year), when the series' times are known.
    pub calendar: Option<Vec<f32>>,
}

impl WindowBatch {
    pub fn new(
        batch: usize,
        lookback: usize,
        channels: usize,
        values: Vec<f32>,
        missing: Vec<bool>,
    ) -> Result<Self, ForecastError> {
        let cells = batch * lookback * channels;
        if values.len() != cells || missing.len() != cells {
            return Err(ForecastError::invalid(
                "windows",
                format!(
                    "a batch of {batch} × {lookback} × {channels} needs {cells} values and mask \
                     cells, found {} and {}",
                    values.len(),
                    missing.len()
                ),
            ));
        }
        Ok(Self {
            batch,
            lookback,
            channels,
            values,
            missing,
            calendar: None,
        })
    }

    /// The same windows with the calendar features of their last lookback rows.
    pub fn with_calendar(self, calendar: Vec<f32>) -> Result<Self, ForecastError> {
        if calendar.len() != self.batch * CALENDAR_FEATURES {
            return Err(ForecastError::invalid(
                "windows",
                format!(
                    "a batch of {} windows needs {} calendar values, found {}",
                    self.batch,
                    self.batch * CALENDAR_FEATURES,
                    calendar.len()
                ),
            ));
        }
        Ok(Self {
            calendar: Some(calendar),
            ..self
        })
    }

    pub fn index(&self, window: usize, step: usize, channel: usize) -> usize {
        (window * self.lookback + step) * self.channels + channel
    }

    /// Windows `range` of this batch, with their calendar features.
    pub fn select(&self, range: Range<usize>) -> Self {
        let cells = self.lookback * self.channels;
        Self {
            batch: range.len(),
            lookback: self.lookback,
            channels: self.channels,
            values: self.values[range.start * cells..range.end * cells].to_vec(),
            missing: self.missing[range.start * cells..range.end * cells].to_vec(),
            calendar: self.calendar.as_ref().map(|rows| {
                rows[range.start * CALENDAR_FEATURES..range.end * CALENDAR_FEATURES].to_vec()
            }),
        }
    }
}

/// The actual values over the horizon of each window: row-major `[batch, horizon, channels]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    pub batch: usize,
    pub horizon: usize,
    pub channels: usize,
    pub values: Vec<f32>,
    pub missing: Vec<bool>,
}

/// Point forecasts `mean` `[batch, horizon, channels]` and `quantiles` `[batch, horizon,
/// channels, levels]` at `quantile_levels` (ascending); quantiles never cross.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    pub batch: usize,
    pub horizon: usize,
    pub channels: usize,
    pub mean: Vec<f32>,
    pub quantile_levels: Vec<f32>,
    pub quantiles: Vec<f32>,
}

impl Forecast {
    pub fn mean_index(&self, window: usize, step: usize, channel: usize) -> usize {
        (window * self.horizon + step) * self.channels + channel
    }

    pub fn quantile_index(
        &self,
        window: usize,
        step: usize,
        channel: usize,
        level: usize,
    ) -> usize {
        self.mean_index(window, step, channel) * self.quantile_levels.len() + level
    }
}

/// What a forecaster is fitted on: a series already z-scored with its training statistics,
/// the windows to train on and the windows to validate (early-stop, select) on.
pub struct TrainingData<'a> {
    pub series: &'a ChannelMatrix,
    pub lookback: usize,
    pub horizon: usize,
    /// Steps per season of the series (from its frequency, [`crate::forecast::seasonal_period_for`];
    /// 1 when unknown): sets the width of the calibrated bands ([`crate::forecast::band`]).
    pub season: usize,
    pub train: WindowSet,
    pub validation: WindowSet,
}

/// A fitted model and how much fitting it took.
#[derive(Debug)]
pub struct Fitted<M> {
    pub model: M,
    /// Passes over the training windows: 1 for a closed-form fit, 0 when nothing is learnt
    /// from the training windows.
    pub epochs: usize,
}

/// A forecaster's configuration, which fitting turns into a [`Predict`] model.
pub trait Fit {
    type Model: Predict;

    fn fit(&self, data: &TrainingData<'_>) -> Result<Fitted<Self::Model>, ForecastError>;
}

/// A fitted forecaster.
pub trait Predict {
    fn lookback(&self) -> usize;
    fn horizon(&self) -> usize;
    fn quantile_levels(&self) -> &[f32];
    /// Learnt scalars (weights, biases, residual quantiles are not counted).
    fn parameter_count(&self) -> usize;
    /// Forecasts every window of `windows`, whose lookback must equal [`Predict::lookback`].
    fn predict(&self, windows: &WindowBatch) -> Result<Forecast, ForecastError>;
}
