//! Built-in baselines, usable like any forecaster: seasonal naive and a closed-form ridge
//! regression (RLinear). Both forecast on each window's own scale (instance normalisation)
//! and take their quantiles from the empirical distribution of validation residuals per
//! horizon step in band widths ([`super::band`]), so a window's band widens with its own
//! variability.

mod linear;
mod seasonal_naive;

pub use linear::{DEFAULT_RIDGE_GRID, LinearBaseline, LinearModel};
pub use seasonal_naive::{SeasonalNaive, SeasonalNaiveModel};

use super::band::band_widths;
use super::error::ForecastError;
use super::model::{Forecast, TrainingData, WindowBatch};
use super::revin::InstanceNorm;

/// Windows per block when streaming over a window set.
const BLOCK_WINDOWS: usize = 512;

/// A point forecaster on instance-normalised windows: `[batch, lookback, channels]` in,
/// `[batch, horizon, channels]` out, both on the windows' own scale.
trait NormalisedPoint {
    fn horizon(&self) -> usize;
    fn point(&self, normalised: &WindowBatch) -> Result<Vec<f32>, ForecastError>;
}

/// Per horizon step, the empirical quantiles of the residuals (actual minus point forecast,
/// on each window's own scale, divided by the window's band width) over every observed
/// validation cell: `[horizon, levels]`.
fn residual_quantile_offsets(
    model: &impl NormalisedPoint,
    norm: &InstanceNorm,
    data: &TrainingData<'_>,
    levels: &[f32],
) -> Result<Vec<f32>, ForecastError> {
    let horizon = model.horizon();
    let mut residuals: Vec<Vec<f32>> = vec![Vec::new(); horizon];
    data.validation.for_each_block(
        data.series,
        data.lookback,
        horizon,
        BLOCK_WINDOWS,
        |inputs, targets| {
            let (normalised, stats) = norm.normalise(&inputs);
            let widths = band_widths(&inputs, &stats, data.season, norm.eps);
            let point = model.point(&normalised)?;
            for (cell, predicted) in point.iter().enumerate() {
                if targets.missing[cell] {
                    continue;
                }
                let stat = stats.index_of_cell(cell, horizon);
                let actual = (targets.values[cell] - stats.centre[stat]) / stats.scale[stat];
                residuals[(cell / targets.channels) % horizon]
                    .push((actual - predicted) / widths[stat]);
            }
            Ok(())
        },
    )?;
    Ok(step_quantile_offsets(&mut residuals, levels)?.concat())
}

/// Per horizon step, the empirical quantiles at `levels` of that step's residuals:
/// `[step][level]`. Every step needs at least one residual.
pub(crate) fn step_quantile_offsets(
    residuals: &mut [Vec<f32>],
    levels: &[f32],
) -> Result<Vec<Vec<f32>>, ForecastError> {
    let mut offsets = Vec::with_capacity(residuals.len());
    for (step, step_residuals) in residuals.iter_mut().enumerate() {
        if step_residuals.is_empty() {
            return Err(ForecastError::invalid(
                "validation",
                format!(
                    "no observed validation value at horizon step {step} to calibrate quantiles"
                ),
            ));
        }
        step_residuals.sort_unstable_by(f32::total_cmp);
        offsets.push(
            levels
                .iter()
                .map(|level| empirical_quantile(step_residuals, *level))
                .collect(),
        );
    }
    Ok(offsets)
}

/// The quantile of a sorted sample by linear interpolation between order statistics
/// (Hyndman–Fan type 7, NumPy's default); non-decreasing in `level`.
fn empirical_quantile(sorted: &[f32], level: f32) -> f32 {
    let position = f64::from(level) * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let fraction = (position - below as f64) as f32;
    sorted[below] + (sorted[above] - sorted[below]) * fraction
}

/// The residual band: per horizon step, `[horizon, levels]` quantile offsets in band widths
/// ([`band_widths`] with this season).
#[derive(Debug, Clone)]
struct ResidualBand {
    levels: Vec<f32>,
    offsets: Vec<f32>,
    season: usize,
}

impl ResidualBand {
    fn calibrate(
        model: &impl NormalisedPoint,
        norm: &InstanceNorm,
        data: &TrainingData<'_>,
        levels: &[f32],
    ) -> Result<Self, ForecastError> {
        Ok(Self {
            levels: levels.to_vec(),
            offsets: residual_quantile_offsets(model, norm, data, levels)?,
            season: data.season,
        })
    }
}

/// Normalises the windows, forecasts on their scale, adds the band's offsets times each
/// window's width and maps everything back.
fn forecast_normalised(
    model: &impl NormalisedPoint,
    norm: &InstanceNorm,
    lookback: usize,
    band: &ResidualBand,
    windows: &WindowBatch,
) -> Result<Forecast, ForecastError> {
    if windows.lookback != lookback {
        return Err(ForecastError::invalid(
            "windows",
            format!(
                "the model was fitted with lookback {lookback}, the windows have {}",
                windows.lookback
            ),
        ));
    }
    let horizon = model.horizon();
    let (normalised, stats) = norm.normalise(windows);
    let widths = band_widths(windows, &stats, band.season, norm.eps);
    let mean = model.point(&normalised)?;
    let level_count = band.levels.len();
    let mut quantiles = Vec::with_capacity(mean.len() * level_count);
    for (cell, point) in mean.iter().enumerate() {
        let step = (cell / windows.channels) % horizon;
        let width = widths[stats.index_of_cell(cell, horizon)];
        quantiles.extend(
            band.offsets[step * level_count..(step + 1) * level_count]
                .iter()
                .map(|offset| point + offset * width),
        );
    }
    let mut forecast = Forecast {
        batch: windows.batch,
        horizon,
        channels: windows.channels,
        mean,
        quantile_levels: band.levels.clone(),
        quantiles,
    };
    norm.denormalise(&mut forecast, &stats);
    Ok(forecast)
}

fn check_levels(levels: &[f32]) -> Result<(), ForecastError> {
    let ascending = levels.windows(2).all(|pair| pair[0] < pair[1]);
    if levels.is_empty() || !ascending || levels.iter().any(|level| !(*level > 0.0 && *level < 1.0))
    {
        return Err(ForecastError::invalid(
            "quantile_levels",
            format!("expected strictly ascending levels in (0, 1), got {levels:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::empirical_quantile;

    #[test]
    fn empirical_quantile_interpolates_between_order_statistics() {
        let sorted = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(empirical_quantile(&sorted, 0.5), 3.0);
        assert_eq!(empirical_quantile(&sorted, 0.0), 1.0);
        assert_eq!(empirical_quantile(&sorted, 1.0), 8.0);
        // position 0.9 · 3 = 2.7 → 4 + 0.7 · 4
        assert!((empirical_quantile(&sorted, 0.9) - 6.8).abs() < 1e-6);
    }
}
