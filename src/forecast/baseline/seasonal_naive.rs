//! Seasonal naive: every horizon step repeats the value one season earlier, the last season
//! of the lookback repeated (period 1 repeats the last value: the naive forecast).

use super::super::error::ForecastError;
use super::super::model::{
    DEFAULT_QUANTILE_LEVELS, Fit, Fitted, Forecast, Predict, TrainingData, WindowBatch,
};
use super::super::revin::InstanceNorm;
use super::{NormalisedPoint, ResidualBand, check_levels, forecast_normalised};

#[derive(Debug, Clone, PartialEq)]
pub struct SeasonalNaive {
    /// Season length in steps (see [`crate::forecast::seasonal_period_for`]).
    pub period: usize,
    pub quantile_levels: Vec<f32>,
}

impl SeasonalNaive {
    pub fn new(period: usize) -> Self {
        Self {
            period,
            quantile_levels: DEFAULT_QUANTILE_LEVELS.to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SeasonalNaiveModel {
    period: usize,
    lookback: usize,
    horizon: usize,
    norm: InstanceNorm,
    band: ResidualBand,
}

struct Repeat {
    period: usize,
    horizon: usize,
}

impl NormalisedPoint for Repeat {
    fn horizon(&self) -> usize {
        self.horizon
    }

    fn point(&self, windows: &WindowBatch) -> Result<Vec<f32>, ForecastError> {
        let (lookback, channels) = (windows.lookback, windows.channels);
        if self.period > lookback {
            return Err(ForecastError::invalid(
                "lookback",
                format!(
                    "lookback {lookback} is shorter than the season of {} steps",
                    self.period
                ),
            ));
        }
        let mut point = Vec::with_capacity(windows.batch * self.horizon * channels);
        for window in 0..windows.batch {
            for step in 0..self.horizon {
                let source = lookback - self.period + step % self.period;
                let row = windows.index(window, source, 0);
                point.extend_from_slice(&windows.values[row..row + channels]);
            }
        }
        Ok(point)
    }
}

impl Fit for SeasonalNaive {
    type Model = SeasonalNaiveModel;

    fn fit(&self, data: &TrainingData<'_>) -> Result<Fitted<SeasonalNaiveModel>, ForecastError> {
        check_levels(&self.quantile_levels)?;
        if self.period == 0 {
            return Err(ForecastError::invalid(
                "season_period",
                "must be at least 1",
            ));
        }
        if self.period > data.lookback {
            return Err(ForecastError::invalid(
                "lookback",
                format!(
                    "lookback {} is shorter than the season of {} steps",
                    data.lookback, self.period
                ),
            ));
        }
        let norm = InstanceNorm::default();
        let repeat = Repeat {
            period: self.period,
            horizon: data.horizon,
        };
        let band = ResidualBand::calibrate(&repeat, &norm, data, &self.quantile_levels)?;
        Ok(Fitted {
            model: SeasonalNaiveModel {
                period: self.period,
                lookback: data.lookback,
                horizon: data.horizon,
                norm,
                band,
            },
            epochs: 0,
        })
    }
}

impl Predict for SeasonalNaiveModel {
    fn lookback(&self) -> usize {
        self.lookback
    }

    fn horizon(&self) -> usize {
        self.horizon
    }

    fn quantile_levels(&self) -> &[f32] {
        &self.band.levels
    }

    fn parameter_count(&self) -> usize {
        0
    }

    fn predict(&self, windows: &WindowBatch) -> Result<Forecast, ForecastError> {
        let repeat = Repeat {
            period: self.period,
            horizon: self.horizon,
        };
        forecast_normalised(&repeat, &self.norm, self.lookback, &self.band, windows)
    }
}
