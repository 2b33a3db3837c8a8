//! Reversible instance normalisation (RevIN): each window's channels are shifted by their own
//! centre (mean or last value of the lookback) and optionally divided by their own standard
//! deviation; the inverse maps a forecast made on that scale back, means and quantiles alike.
//! Removing each window's level is what keeps a model robust to level shifts between the
//! training and test periods.

use super::model::{Forecast, WindowBatch};

/// What each window's channel is centred on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Centre {
    /// Mean of the observed lookback values (RevIN, RLinear).
    Mean,
    /// Last observed lookback value (NLinear).
    LastValue,
}

/// The transform's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceNorm {
    pub centre: Centre,
    /// Divide by the window's standard deviation `sqrt(var + eps)`; otherwise the scale is 1.
    pub scale: bool,
    pub eps: f32,
}

impl Default for InstanceNorm {
    fn default() -> Self {
        Self {
            centre: Centre::Mean,
            scale: true,
            eps: 1e-5,
        }
    }
}

/// Per-window, per-channel statistics, row-major `[batch, channels]`.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStats {
    pub batch: usize,
    pub channels: usize,
    pub centre: Vec<f32>,
    pub scale: Vec<f32>,
}

impl InstanceNorm {
    /// Statistics over the observed cells of each window's channel; a channel with no observed
    /// lookback cell gets centre 0 and scale 1 (it is left as it is).
    pub fn statistics(&self, windows: &WindowBatch) -> InstanceStats {
        let (batch, lookback, channels) = (windows.batch, windows.lookback, windows.channels);
        let mut centre = vec![0.0_f32; batch * channels];
        let mut scale = vec![1.0_f32; batch * channels];
        for window in 0..batch {
            for channel in 0..channels {
                let observed = (0..lookback)
                    .map(|step| windows.index(window, step, channel))
                    .filter(|cell| !windows.missing[*cell])
                    .map(|cell| f64::from(windows.values[cell]));
                let (count, sum) = observed
                    .clone()
                    .fold((0_usize, 0.0_f64), |(n, s), v| (n + 1, s + v));
                if count == 0 {
                    continue;
                }
                let mean = sum / count as f64;
                let stat = window * channels + channel;
                centre[stat] = match self.centre {
                    Centre::Mean => mean as f32,
                    Centre::LastValue => observed.clone().next_back().unwrap_or(mean) as f32,
                };
                if self.scale {
                    let variance = observed.map(|v| (v - mean).powi(2)).sum::<f64>() / count as f64;
                    scale[stat] = (variance + f64::from(self.eps)).sqrt() as f32;
                }
            }
        }
        InstanceStats {
            batch,
            channels,
            centre,
            scale,
        }
    }

    /// The windows on their own scale, with the statistics to undo it; missing cells stay 0.
    pub fn normalise(&self, windows: &WindowBatch) -> (WindowBatch, InstanceStats) {
        let stats = self.statistics(windows);
        let mut normalised = windows.clone();
        for (cell, value) in normalised.values.iter_mut().enumerate() {
            if !normalised.missing[cell] {
                let stat = stats.index_of_cell(cell, windows.lookback);
                *value = (*value - stats.centre[stat]) / stats.scale[stat];
            }
        }
        (normalised, stats)
    }

    /// Maps values `[batch, steps, channels]` made on the windows' own scale back.
    pub fn denormalise_values(&self, values: &mut [f32], steps: usize, stats: &InstanceStats) {
        for (cell, value) in values.iter_mut().enumerate() {
            let stat = stats.index_of_cell(cell, steps);
            *value = *value * stats.scale[stat] + stats.centre[stat];
        }
    }

    /// Maps a forecast made on the windows' own scale back: means and every quantile. The
    /// scale is positive, so quantile order is preserved.
    pub fn denormalise(&self, forecast: &mut Forecast, stats: &InstanceStats) {
        self.denormalise_values(&mut forecast.mean, forecast.horizon, stats);
        let levels = forecast.quantile_levels.len();
        for (cell, value) in forecast.quantiles.iter_mut().enumerate() {
            let stat = stats.index_of_cell(cell / levels, forecast.horizon);
            *value = *value * stats.scale[stat] + stats.centre[stat];
        }
    }
}

impl InstanceStats {
    /// The statistic of cell `cell` of a `[batch, steps, channels]` array.
    pub(crate) fn index_of_cell(&self, cell: usize, steps: usize) -> usize {
        let window = cell / (steps * self.channels);
        window * self.channels + cell % self.channels
    }
}
