//! What an xLSTM forecaster is (`ForecasterConfig`) and how it is trained (`TrainingConfig`),
//! bundled as named presets. The presets live in `models/*.toml` and are compiled into the
//! binary, so `--preset small` works wherever the binary runs; a path to a `.toml` file works
//! too.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::xlstm::XlstmConfig;

use super::super::error::ForecastError;
use super::super::model::DEFAULT_QUANTILE_LEVELS;

/// The presets shipped with the binary: `(name, TOML text)`.
const BUILT_IN: [(&str, &str); 3] = [
    ("tiny", include_str!("../../../models/tiny.toml")),
    ("small", include_str!("../../../models/small.toml")),
    ("base", include_str!("../../../models/base.toml")),
];

/// How channels meet the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelMode {
    /// Every channel is its own sequence through shared weights.
    Independent,
    /// One sequence per window whose tokens hold every channel's patch; the head forecasts
    /// all channels jointly.
    Mixing,
}

/// The loss on the point forecast (the quantiles always use the pinball loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointLoss {
    Mse,
    Mae,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForecasterConfig {
    pub patch_len: usize,
    pub patch_stride: usize,
    pub channel_mode: ChannelMode,
    /// Dropout on the patch embeddings and before the head, training only.
    pub dropout: f64,
    /// Rank of the point head: the flattened tokens are reduced to this many features before
    /// the map to the horizon, so the head's size barely grows with the horizon. Absent: one
    /// full linear map from the flattened tokens to the horizon.
    #[serde(default)]
    pub head_rank: Option<usize>,
    /// Horizon steps are calibrated in this many consecutive buckets of (nearly) equal length,
    /// each with its own width factor per quantile level: the band widens with the step as
    /// much as the validation residuals do.
    #[serde(default = "default_calibration_buckets")]
    pub calibration_buckets: usize,
    /// How the band is calibrated: `scale` keeps the quantile head's per-window band and
    /// scales it per bucket; `residual` replaces it by the empirical quantiles of the point
    /// forecast's residuals per horizon step (the baselines' band), in the windows' band
    /// widths ([`crate::forecast::band`]).
    #[serde(default)]
    pub calibration: CalibrationMethod,
    /// Also calibrate on training windows, not only on the validation windows (as many of
    /// each, evenly spaced). At long horizons the validation split holds few independent
    /// horizons and one season, while the training split spans more; but the training
    /// windows are in-sample for the deep path, which narrows the band by how much it fits
    /// them.
    #[serde(default)]
    pub calibrate_on_training_windows: bool,
    /// The deep path's point head forecasts only the first `deep_horizon` steps; later steps
    /// are the linear path's alone (requires `linear_path`). Absent: every step.
    #[serde(default)]
    pub deep_horizon: Option<usize>,
    /// A linear map from the lookback to the horizon beside the deep path: the closed-form
    /// ridge fit, kept fixed, so training starts from the linear baseline and the deep path
    /// learns what it misses. The deep correction's weight beside it (0 to 1) is chosen on
    /// the validation windows at every check and saved with the model.
    pub linear_path: bool,
    /// Calendar covariates: the hour of day and day of week of each window's last lookback row
    /// (sine/cosine pairs, in the series' time zone; UTC for a CSV) are embedded and added to
    /// every patch token, so the deep path knows where its lookback and horizon fall in the
    /// day and week. The windows must then carry their times.
    #[serde(default)]
    pub calendar_covariates: bool,
    #[serde(default = "default_quantile_levels")]
    pub quantile_levels: Vec<f32>,
    pub point_loss: PointLoss,
    /// Weight of the mean pinball loss against the point loss.
    pub quantile_loss_weight: f64,
    pub xlstm: XlstmConfig,
}

fn default_validations_per_epoch() -> usize {
    1
}

/// How the forecast band is calibrated on the calibration windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationMethod {
    /// Per horizon bucket and level, a factor on the quantile head's offset from the point.
    #[default]
    Scale,
    /// Per horizon step and level, the empirical quantile of the point forecast's residuals.
    Residual,
}

fn default_calibration_buckets() -> usize {
    1
}

fn default_quantile_levels() -> Vec<f32> {
    DEFAULT_QUANTILE_LEVELS.to_vec()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Windows per optimiser step (each window brings all its channels).
    pub batch_size: usize,
    pub max_epochs: usize,
    /// Peak learning rate, reached after the warm-up.
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Share of all steps spent warming the learning rate up linearly from 0.
    pub warmup_fraction: f64,
    /// The cosine decay ends at `learning_rate · min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Gradients are rescaled to at most this global L2 norm.
    pub grad_clip: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    /// Validation checks per epoch, evenly spaced in its steps, the last at its end; early
    /// stopping keeps the best check's weights and stops after `patience` epochs' worth of
    /// checks without a better one.
    #[serde(default = "default_validations_per_epoch")]
    pub validations_per_epoch: usize,
    pub seed: u64,
    /// Training windows drawn per epoch (all of them when absent).
    pub max_windows_per_epoch: Option<usize>,
    /// Validation windows scored per epoch, evenly spaced (all of them when absent).
    pub max_validation_windows: Option<usize>,
    /// Fine-tuning multiplies the learning rate by this and caps the epochs at
    /// `finetune_max_epochs`.
    pub finetune_lr_factor: f64,
    pub finetune_max_epochs: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub description: String,
    /// Lookback and horizon used when the caller does not give them.
    pub lookback: usize,
    pub horizon: usize,
    pub model: ForecasterConfig,
    pub training: TrainingConfig,
}

impl Preset {
    /// A built-in preset by name, or a preset file when `name` ends in `.toml`.
    pub fn load(name: &str) -> Result<Self, ForecastError> {
        if name.ends_with(".toml") {
            let text = std::fs::read_to_string(Path::new(name)).map_err(|err| {
                ForecastError::invalid("preset", format!("cannot read {name}: {err}"))
            })?;
            return Self::parse(&text, name);
        }
        match BUILT_IN.iter().find(|(built_in, _)| *built_in == name) {
            Some((_, text)) => Self::parse(text, name),
            None => Err(ForecastError::invalid(
                "preset",
                format!(
                    "unknown preset {name:?}; built in: {} (or a path to a .toml file)",
                    Self::built_in_names().join(", ")
                ),
            )),
        }
    }

    pub fn built_in_names() -> Vec<&'static str> {
        BUILT_IN.iter().map(|(name, _)| *name).collect()
    }

    fn parse(text: &str, source: &str) -> Result<Self, ForecastError> {
        let preset: Self = toml::from_str(text)
            .map_err(|err| ForecastError::invalid("preset", format!("{source}: {err}")))?;
        preset.validate()?;
        Ok(preset)
    }

    pub fn validate(&self) -> Result<(), ForecastError> {
        let model = &self.model;
        let invalid = |field: &str, message: String| Err(ForecastError::invalid(field, message));
        if model.patch_len == 0 || model.patch_stride == 0 {
            return invalid(
                "model.patch_len",
                "patch_len and patch_stride must be at least 1".into(),
            );
        }
        if !(0.0..1.0).contains(&model.dropout) {
            return invalid(
                "model.dropout",
                format!("must be in [0, 1), got {}", model.dropout),
            );
        }
        if model.head_rank == Some(0) {
            return invalid("model.head_rank", "must be at least 1 when given".into());
        }
        if model.deep_horizon == Some(0) || (model.deep_horizon.is_some() && !model.linear_path) {
            return invalid(
                "model.deep_horizon",
                "must be at least 1, and needs linear_path for the steps beyond it".into(),
            );
        }
        if model.calibration_buckets == 0 {
            return invalid("model.calibration_buckets", "must be at least 1".into());
        }
        let levels = &model.quantile_levels;
        if levels.is_empty()
            || !levels.windows(2).all(|pair| pair[0] < pair[1])
            || levels.iter().any(|level| !(*level > 0.0 && *level < 1.0))
        {
            return invalid(
                "model.quantile_levels",
                format!("expected strictly ascending levels in (0, 1), got {levels:?}"),
            );
        }
        model
            .xlstm
            .validate()
            .map_err(|err| ForecastError::invalid("model.xlstm", err.to_string()))?;
        let training = &self.training;
        if training.validations_per_epoch == 0 {
            return invalid(
                "training.validations_per_epoch",
                "must be at least 1".into(),
            );
        }
        if training.batch_size == 0 || training.max_epochs == 0 {
            return invalid(
                "training.batch_size",
                "batch_size and max_epochs must be at least 1".into(),
            );
        }
        if !(training.learning_rate > 0.0 && training.learning_rate.is_finite()) {
            return invalid(
                "training.learning_rate",
                format!("must be positive, got {}", training.learning_rate),
            );
        }
        if !(0.0..1.0).contains(&training.warmup_fraction) {
            return invalid(
                "training.warmup_fraction",
                format!("must be in [0, 1), got {}", training.warmup_fraction),
            );
        }
        if training.grad_clip <= 0.0 {
            return invalid(
                "training.grad_clip",
                format!("must be positive, got {}", training.grad_clip),
            );
        }
        if self.lookback == 0 || self.horizon == 0 {
            return invalid("lookback", "lookback and horizon must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_preset_parses_and_validates() {
        for name in Preset::built_in_names() {
            let preset = Preset::load(name).unwrap();
            assert_eq!(preset.name, name);
        }
    }

    #[test]
    fn an_unknown_preset_names_the_built_in_ones() {
        let err = Preset::load("huge").unwrap_err().to_string();
        assert!(err.contains("tiny, small, base"), "{err}");
    }
}
