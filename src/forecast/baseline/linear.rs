//! RLinear: one ridge regression from the L lookback values (plus an intercept) to the H
//! horizon values, shared by all channels (channel-independent), fitted in closed form on
//! instance-normalised windows, each window weighted by its scale² so that the fit minimises
//! the error after the normalisation is undone (RLinear's loss).
//!
//! The normal equations `XᵀX` `[(L+1)²]` and `XᵀY` `[(L+1) × H]` are accumulated in one
//! streaming pass over the training windows, so the windows are never all in memory. The
//! ridge strength is picked from a small grid by the validation MSE on the z-scored scale
//! (after undoing the instance normalisation), all candidates scored in one pass.

use super::super::error::ForecastError;
use super::super::linalg::{accumulate_normal_equations, cholesky_solve, matmul};
use super::super::model::{
    DEFAULT_QUANTILE_LEVELS, Fit, Fitted, Forecast, Predict, TrainingData, WindowBatch,
};
use super::super::revin::InstanceNorm;
use super::{BLOCK_WINDOWS, NormalisedPoint, ResidualBand, check_levels, forecast_normalised};

/// Ridge strengths tried, per training sample: the penalty is `λ · samples · ‖w‖²` (the
/// intercept is not penalised), so a value means the same for short and long series.
pub const DEFAULT_RIDGE_GRID: [f64; 7] = [1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0];

#[derive(Debug, Clone, PartialEq)]
pub struct LinearBaseline {
    pub norm: InstanceNorm,
    pub ridge_grid: Vec<f64>,
    pub quantile_levels: Vec<f32>,
}

impl Default for LinearBaseline {
    fn default() -> Self {
        Self {
            norm: InstanceNorm::default(),
            ridge_grid: DEFAULT_RIDGE_GRID.to_vec(),
            quantile_levels: DEFAULT_QUANTILE_LEVELS.to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LinearModel {
    lookback: usize,
    horizon: usize,
    norm: InstanceNorm,
    /// The chosen ridge strength (per training sample).
    pub ridge: f64,
    /// Validation MSE (z-scored scale) of each grid value, in grid order; `None` where the
    /// regularised system could not be solved.
    pub validation_mse: Vec<(f64, Option<f64>)>,
    band: ResidualBand,
    regression: Regression,
}

/// `weights` `[(lookback + 1), horizon]`: one row per lookback step, the intercept last.
#[derive(Debug, Clone)]
struct Regression {
    lookback: usize,
    horizon: usize,
    weights: Vec<f64>,
}

impl Regression {
    fn features(&self) -> usize {
        self.lookback + 1
    }
}

/// The design rows of a normalised batch, one per (window, channel): `[rows, lookback + 1]`.
fn design_rows(windows: &WindowBatch) -> Vec<f64> {
    let (lookback, channels) = (windows.lookback, windows.channels);
    let mut rows = Vec::with_capacity(windows.batch * channels * (lookback + 1));
    for window in 0..windows.batch {
        for channel in 0..channels {
            rows.extend(
                (0..lookback)
                    .map(|step| f64::from(windows.values[windows.index(window, step, channel)])),
            );
            rows.push(1.0);
        }
    }
    rows
}

impl NormalisedPoint for Regression {
    fn horizon(&self) -> usize {
        self.horizon
    }

    fn point(&self, windows: &WindowBatch) -> Result<Vec<f32>, ForecastError> {
        let rows = windows.batch * windows.channels;
        let outputs = matmul(
            &design_rows(windows),
            rows,
            self.features(),
            &self.weights,
            self.horizon,
        )?;
        Ok(
            channel_rows_to_forecast(&outputs, windows.batch, windows.channels, self.horizon, 1)
                .into_iter()
                .map(|value| value as f32)
                .collect(),
        )
    }
}

/// Reorders `[batch · channels, horizon · candidates]` rows into `candidates` consecutive
/// `[batch, horizon, channels]` arrays.
fn channel_rows_to_forecast(
    rows: &[f64],
    batch: usize,
    channels: usize,
    horizon: usize,
    candidates: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; candidates * batch * horizon * channels];
    for window in 0..batch {
        for channel in 0..channels {
            let row = &rows[(window * channels + channel) * horizon * candidates..]
                [..horizon * candidates];
            for candidate in 0..candidates {
                for step in 0..horizon {
                    out[((candidate * batch + window) * horizon + step) * channels + channel] =
                        row[candidate * horizon + step];
                }
            }
        }
    }
    out
}

impl Fit for LinearBaseline {
    type Model = LinearModel;

    fn fit(&self, data: &TrainingData<'_>) -> Result<Fitted<LinearModel>, ForecastError> {
        check_levels(&self.quantile_levels)?;
        if self.ridge_grid.is_empty()
            || self
                .ridge_grid
                .iter()
                .any(|ridge| !(*ridge > 0.0 && ridge.is_finite()))
        {
            return Err(ForecastError::invalid(
                "ridge_grid",
                format!(
                    "expected positive finite ridge strengths, got {:?}",
                    self.ridge_grid
                ),
            ));
        }
        let (lookback, horizon) = (data.lookback, data.horizon);
        let features = lookback + 1;
        let norm = self.norm;

        let mut gram = vec![0.0_f64; features * features];
        let mut cross = vec![0.0_f64; features * horizon];
        let mut samples = 0_usize;
        data.train.for_each_block(
            data.series,
            lookback,
            horizon,
            BLOCK_WINDOWS,
            |inputs, targets| {
                let (normalised, stats) = norm.normalise(&inputs);
                let design = design_rows(&normalised);
                let channels = inputs.channels;
                // Keep only (window, channel) rows whose whole horizon is observed.
                let mut x = Vec::with_capacity(design.len());
                let mut y = Vec::with_capacity(inputs.batch * channels * horizon);
                let mut rows = 0;
                for window in 0..inputs.batch {
                    for channel in 0..channels {
                        let cells =
                            (0..horizon).map(|step| (window * horizon + step) * channels + channel);
                        if cells.clone().any(|cell| targets.missing[cell]) {
                            continue;
                        }
                        // Each row weighted by its window's scale²: the squared error is then
                        // the error after undoing the instance normalisation, the scale the
                        // forecast is judged on. Unweighted, a nearly constant lookback (scale
                        // down to sqrt(eps)) turns any later change into a target in the
                        // hundreds, and a few such windows decide the fit.
                        let stat = window * channels + channel;
                        let (centre, scale) = (stats.centre[stat], stats.scale[stat]);
                        y.extend(cells.map(|cell| f64::from(targets.values[cell] - centre)));
                        let row = window * channels + channel;
                        x.extend(
                            design[row * features..(row + 1) * features]
                                .iter()
                                .map(|v| v * f64::from(scale)),
                        );
                        rows += 1;
                    }
                }
                if rows > 0 {
                    accumulate_normal_equations(
                        &x, &y, rows, features, horizon, &mut gram, &mut cross,
                    )?;
                }
                samples += rows;
                Ok(())
            },
        )?;
        if samples == 0 {
            return Err(ForecastError::invalid(
                "train",
                "no training window has a fully observed horizon",
            ));
        }

        // Solve for every ridge strength, then score all candidates in one validation pass.
        let mut solutions: Vec<(f64, Option<Vec<f64>>)> = Vec::with_capacity(self.ridge_grid.len());
        for &ridge in &self.ridge_grid {
            let mut regularised = gram.clone();
            for feature in 0..lookback {
                regularised[feature * features + feature] += ridge * samples as f64;
            }
            solutions.push((
                ridge,
                cholesky_solve(&regularised, features, &cross, horizon).ok(),
            ));
        }
        let solved: Vec<(f64, &Vec<f64>)> = solutions
            .iter()
            .filter_map(|(ridge, weights)| weights.as_ref().map(|weights| (*ridge, weights)))
            .collect();
        if solved.is_empty() {
            return Err(ForecastError::Numerical(format!(
                "the ridge regression could not be solved for any strength in {:?}",
                self.ridge_grid
            )));
        }
        let candidates = solved.len();
        // [features, candidates · horizon]: candidate k's weights in columns k·H .. (k+1)·H.
        let mut stacked = vec![0.0_f64; features * candidates * horizon];
        for (candidate, (_, weights)) in solved.iter().enumerate() {
            for feature in 0..features {
                stacked[(feature * candidates + candidate) * horizon..][..horizon]
                    .copy_from_slice(&weights[feature * horizon..(feature + 1) * horizon]);
            }
        }
        let mut squared_error = vec![0.0_f64; candidates];
        let mut observed = 0_usize;
        data.validation.for_each_block(
            data.series,
            lookback,
            horizon,
            BLOCK_WINDOWS,
            |inputs, targets| {
                let (normalised, stats) = norm.normalise(&inputs);
                let rows = inputs.batch * inputs.channels;
                let outputs = matmul(
                    &design_rows(&normalised),
                    rows,
                    features,
                    &stacked,
                    candidates * horizon,
                )?;
                let forecasts = channel_rows_to_forecast(
                    &outputs,
                    inputs.batch,
                    inputs.channels,
                    horizon,
                    candidates,
                );
                let cells = targets.values.len();
                for cell in 0..cells {
                    if targets.missing[cell] {
                        continue;
                    }
                    observed += 1;
                    let stat = stats.index_of_cell(cell, horizon);
                    for (candidate, error) in squared_error.iter_mut().enumerate() {
                        let predicted = forecasts[candidate * cells + cell]
                            * f64::from(stats.scale[stat])
                            + f64::from(stats.centre[stat]);
                        *error += (f64::from(targets.values[cell]) - predicted).powi(2);
                    }
                }
                Ok(())
            },
        )?;
        if observed == 0 {
            return Err(ForecastError::invalid(
                "validation",
                "no observed value in the validation windows' horizons to choose the ridge strength",
            ));
        }
        let best = (0..candidates)
            .min_by(|a, b| squared_error[*a].total_cmp(&squared_error[*b]))
            .expect("at least one solved candidate");
        let ridge = solved[best].0;
        let regression = Regression {
            lookback,
            horizon,
            weights: solved[best].1.clone(),
        };
        let mut scores = squared_error.iter().map(|error| error / observed as f64);
        let validation_mse = solutions
            .iter()
            .map(|(ridge, weights)| (*ridge, weights.as_ref().and_then(|_| scores.next())))
            .collect();
        let band = ResidualBand::calibrate(&regression, &norm, data, &self.quantile_levels)?;
        Ok(Fitted {
            model: LinearModel {
                lookback,
                horizon,
                norm,
                ridge,
                validation_mse,
                band,
                regression,
            },
            epochs: 1,
        })
    }
}

impl LinearModel {
    /// The fitted map on instance-normalised windows as `(weight [H, L], bias [H])`, row-major:
    /// `y[h] = Σ_l weight[h, l] · x[l] + bias[h]`.
    pub fn weights(&self) -> (Vec<f32>, Vec<f32>) {
        let r = &self.regression;
        let mut weight = Vec::with_capacity(r.horizon * r.lookback);
        for step in 0..r.horizon {
            weight.extend((0..r.lookback).map(|l| r.weights[l * r.horizon + step] as f32));
        }
        let bias = (0..r.horizon)
            .map(|step| r.weights[r.lookback * r.horizon + step] as f32)
            .collect();
        (weight, bias)
    }

    pub fn norm(&self) -> &InstanceNorm {
        &self.norm
    }
}

impl Predict for LinearModel {
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
        self.regression.weights.len()
    }

    fn predict(&self, windows: &WindowBatch) -> Result<Forecast, ForecastError> {
        forecast_normalised(
            &self.regression,
            &self.norm,
            self.lookback,
            &self.band,
            windows,
        )
    }
}
