//! The xLSTM forecaster as a `Fit` configuration and a `Predict` model: fitting builds the
//! network with seeded weights, starts its linear path from the closed-form ridge fit,
//! trains, and calibrates the quantiles on the validation windows; a fitted model can be
//! fine-tuned on newer data, saved and loaded.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

use super::super::band::band_widths;
use super::super::baseline::{LinearBaseline, step_quantile_offsets};
use super::super::error::ForecastError;
use super::super::model::{Fit, Fitted, Forecast, Predict, TrainingData, WindowBatch};
use super::super::revin::InstanceNorm;
use super::artefact::{ARTEFACT_FORMAT, ModelManifest, ParentModel, QuantileCalibration};
use super::init::SeededVarMap;
use super::network::{DEEP_SCALE, ForecastNetwork, NetworkShape};
use super::preset::{CalibrationMethod, Preset};
use super::train::{self, ProgressCallback, Schedule, TensorBatch, TrainingSummary};

/// Windows per forward pass when forecasting.
const PREDICT_BLOCK: usize = 256;
/// Validation cells (window, step, channel) used to calibrate (a strided sample beyond this).
const CALIBRATION_SAMPLES: usize = 200_000;

/// Fits xLSTM forecasters with a preset on a device.
#[derive(Debug, Clone)]
pub struct XlstmForecaster {
    pub preset: Preset,
    pub device: Device,
}

impl XlstmForecaster {
    pub fn new(preset: Preset, device: Device) -> Self {
        Self { preset, device }
    }

    /// Fits, reporting progress; the callback can stop the run (`ForecastError::Cancelled`).
    pub fn fit_with_progress(
        &self,
        data: &TrainingData<'_>,
        progress: Option<ProgressCallback<'_>>,
    ) -> Result<Fitted<XlstmModel>, ForecastError> {
        self.preset.validate()?;
        let shape = NetworkShape {
            lookback: data.lookback,
            horizon: data.horizon,
            channels: data.series.channels,
        };
        check_patch_fits(&self.preset, shape)?;
        check_calendar(&self.preset, data.series.calendar.is_some())?;
        let mut varmap = VarMap::new();
        let network = ForecastNetwork::new(
            &self.preset.model,
            shape,
            SeededVarMap::builder(&varmap, self.preset.training.seed, &self.device),
        )?;
        let norm = InstanceNorm::default();
        if self.preset.model.linear_path {
            let ridge = LinearBaseline::default().fit(data)?.model;
            let (weight, bias) = ridge.weights();
            varmap.set_one(
                "linear_path.weight",
                Tensor::from_vec(weight, (shape.horizon, shape.lookback), &self.device)?,
            )?;
            varmap.set_one(
                "linear_path.bias",
                Tensor::from_vec(bias, shape.horizon, &self.device)?,
            )?;
        }
        let training = &self.preset.training;
        let schedule = Schedule {
            training,
            learning_rate: training.learning_rate,
            max_epochs: training.max_epochs,
            point_loss: self.preset.model.point_loss,
            quantile_loss_weight: self.preset.model.quantile_loss_weight,
            quantile_levels: &self.preset.model.quantile_levels,
        };
        let summary = train::train(
            &network,
            &varmap,
            &norm,
            data,
            &schedule,
            &self.device,
            progress,
        )?;
        let model = XlstmModel::assemble(
            network,
            varmap,
            self.preset.clone(),
            summary,
            None,
            &self.device,
            data,
        )?;
        let epochs = model.manifest.training.epochs;
        Ok(Fitted { model, epochs })
    }
}

impl Fit for XlstmForecaster {
    type Model = XlstmModel;

    fn fit(&self, data: &TrainingData<'_>) -> Result<Fitted<XlstmModel>, ForecastError> {
        self.fit_with_progress(data, None)
    }
}

/// A preset with calendar covariates needs the rows' times.
fn check_calendar(preset: &Preset, has_calendar: bool) -> Result<(), ForecastError> {
    if preset.model.calendar_covariates && !has_calendar {
        return Err(ForecastError::invalid(
            "calendar_covariates",
            "the model takes calendar covariates, and the windows carry no times (give a \
             series or a CSV with a timestamp column)",
        ));
    }
    Ok(())
}

fn check_patch_fits(preset: &Preset, shape: NetworkShape) -> Result<(), ForecastError> {
    if preset.model.patch_len > shape.lookback {
        return Err(ForecastError::invalid(
            "lookback",
            format!(
                "lookback {} is shorter than the preset's patch_len {}",
                shape.lookback, preset.model.patch_len
            ),
        ));
    }
    Ok(())
}

/// A fitted xLSTM forecaster: the network, its variables and its manifest. Clones share the
/// variables (fine-tuning copies them).
#[derive(Clone)]
pub struct XlstmModel {
    network: ForecastNetwork,
    varmap: VarMap,
    device: Device,
    norm: InstanceNorm,
    pub manifest: ModelManifest,
}

impl std::fmt::Debug for XlstmModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlstmModel")
            .field("preset", &self.manifest.preset.name)
            .field("shape", &self.manifest.shape)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl XlstmModel {
    fn assemble(
        network: ForecastNetwork,
        varmap: VarMap,
        preset: Preset,
        training: TrainingSummary,
        parent: Option<ParentModel>,
        device: &Device,
        data: &TrainingData<'_>,
    ) -> Result<Self, ForecastError> {
        let levels = preset.model.quantile_levels.len();
        let mut model = Self {
            manifest: ModelManifest {
                format: ARTEFACT_FORMAT,
                library_version: env!("CARGO_PKG_VERSION").to_string(),
                kind: "xlstm".to_string(),
                shape: network.shape(),
                preset,
                calibration: QuantileCalibration::Scale {
                    bucket_len: network.shape().horizon,
                    factors: vec![vec![1.0; levels]],
                },
                training,
                data: None,
                parent,
                metrics: serde_json::Map::new(),
            },
            network,
            varmap,
            device: device.clone(),
            norm: InstanceNorm::default(),
        };
        model.manifest.calibration = model.calibrate(data)?;
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Warm-starts from these weights on `data` (same lookback, horizon and channels) with
    /// the preset's fine-tuning learning rate and epoch cap; the result records `parent`.
    pub fn finetune(
        &self,
        data: &TrainingData<'_>,
        parent: ParentModel,
        progress: Option<ProgressCallback<'_>>,
    ) -> Result<Fitted<XlstmModel>, ForecastError> {
        let shape = self.manifest.shape;
        check_calendar(&self.manifest.preset, data.series.calendar.is_some())?;
        let offered = (data.lookback, data.horizon, data.series.channels);
        if offered != (shape.lookback, shape.horizon, shape.channels) {
            return Err(ForecastError::invalid(
                "data",
                format!(
                    "the model was trained with lookback {}, horizon {} and {} channels; the \
                     fine-tuning data has lookback {}, horizon {} and {} channels",
                    shape.lookback, shape.horizon, shape.channels, offered.0, offered.1, offered.2
                ),
            ));
        }
        let varmap = VarMap::new();
        {
            let mut vars = varmap.data().lock().expect("var map lock poisoned");
            for (name, var) in train::sorted_vars(&self.varmap) {
                vars.insert(name, Var::from_tensor(&var.as_tensor().copy()?)?);
            }
        }
        let preset = self.manifest.preset.clone();
        let network = ForecastNetwork::new(
            &preset.model,
            shape,
            SeededVarMap::builder(&varmap, preset.training.seed, &self.device),
        )?;
        let training = &preset.training;
        let schedule = Schedule {
            training,
            learning_rate: training.learning_rate * training.finetune_lr_factor,
            max_epochs: training.finetune_max_epochs.max(1),
            point_loss: preset.model.point_loss,
            quantile_loss_weight: preset.model.quantile_loss_weight,
            quantile_levels: &preset.model.quantile_levels,
        };
        let summary = train::train(
            &network,
            &varmap,
            &self.norm,
            data,
            &schedule,
            &self.device,
            progress,
        )?;
        let mut model = Self::assemble(
            network,
            varmap,
            preset,
            summary,
            Some(parent),
            &self.device,
            data,
        )?;
        model.manifest.data = self.manifest.data.clone();
        let epochs = model.manifest.training.epochs;
        Ok(Fitted { model, epochs })
    }

    /// The band's calibration on the validation (and, if the preset says so, training)
    /// windows, on the windows' own scale. `scale`: per horizon bucket and quantile level,
    /// the factor on the raw quantile's offset from the point forecast that minimises the
    /// level's pinball loss there. `residual`: per horizon step and level, the empirical
    /// quantile of the point forecast's residuals, each divided by its window's band width.
    fn calibrate(&self, data: &TrainingData<'_>) -> Result<QuantileCalibration, ForecastError> {
        let levels = self.manifest.preset.model.quantile_levels.clone();
        let horizon = data.horizon;
        let bucket_len =
            horizon.div_ceil(self.manifest.preset.model.calibration_buckets.min(horizon));
        let buckets = horizon.div_ceil(bucket_len);
        let per_split = self.manifest.preset.training.max_validation_windows;
        let mut splits = vec![(
            &data.validation,
            train::evenly_spaced(data.validation.count, per_split),
        )];
        if self.manifest.preset.model.calibrate_on_training_windows {
            splits.push((
                &data.train,
                train::evenly_spaced(data.train.count, per_split),
            ));
        }
        let cells = splits
            .iter()
            .map(|(_, windows)| windows.len())
            .sum::<usize>()
            * horizon
            * data.series.channels;
        let stride = cells.div_ceil(CALIBRATION_SAMPLES).max(1);
        let method = self.manifest.preset.model.calibration;
        // Per bucket and level: (residual from the point, raw quantile's offset from it).
        let mut samples: Vec<Vec<Vec<(f32, f32)>>> = vec![vec![Vec::new(); levels.len()]; buckets];
        // Per step: residuals from the point (residual calibration only).
        let mut step_residuals: Vec<Vec<f32>> = vec![Vec::new(); horizon];
        let mut cell_counter = 0_usize;
        for (split, windows) in &splits {
            for block in windows.chunks(PREDICT_BLOCK) {
                let (inputs, targets) =
                    split.extract_indices(data.series, block, data.lookback, horizon)?;
                let (points, quantiles, stats) = self.forward_normalised(&inputs)?;
                let widths = band_widths(&inputs, &stats, data.season, self.norm.eps);
                for (cell, missing) in targets.missing.iter().enumerate() {
                    cell_counter += 1;
                    // Residual offsets are per step, so they use every cell; the scale
                    // factors, pooled over a bucket, a strided sample.
                    let sampled = method == CalibrationMethod::Residual
                        || cell_counter.is_multiple_of(stride);
                    if *missing || !sampled {
                        continue;
                    }
                    let stat = stats.index_of_cell(cell, horizon);
                    let actual = (targets.values[cell] - stats.centre[stat]) / stats.scale[stat];
                    let step = (cell / targets.channels) % horizon;
                    let point = points[cell];
                    if method == CalibrationMethod::Residual {
                        step_residuals[step].push((actual - point) / widths[stat]);
                        continue;
                    }
                    for (level, bucket) in samples[step / bucket_len].iter_mut().enumerate() {
                        bucket.push((
                            actual - point,
                            quantiles[cell * levels.len() + level] - point,
                        ));
                    }
                }
            }
        }
        if method == CalibrationMethod::Residual {
            return Ok(QuantileCalibration::Residual {
                offsets: step_quantile_offsets(&mut step_residuals, &levels)?,
                season: data.season,
            });
        }
        let mut factors = Vec::with_capacity(buckets);
        for bucket in &samples {
            if bucket[0].is_empty() {
                return Err(ForecastError::invalid(
                    "validation",
                    "no observed validation value to calibrate the quantiles on",
                ));
            }
            factors.push(
                bucket
                    .iter()
                    .zip(&levels)
                    .map(|(pairs, level)| pinball_optimal_factor(pairs, *level))
                    .collect(),
            );
        }
        Ok(QuantileCalibration::Scale {
            bucket_len,
            factors,
        })
    }

    /// Point forecasts `[B, H, C]` and raw quantiles `[B, H, C, Q]` on the windows' own
    /// scale, with the statistics to undo it.
    fn forward_normalised(
        &self,
        windows: &WindowBatch,
    ) -> Result<(Vec<f32>, Vec<f32>, super::super::revin::InstanceStats), ForecastError> {
        check_calendar(&self.manifest.preset, windows.calendar.is_some())?;
        let batch = TensorBatch::new(&self.norm, windows, &self.device)?;
        let output = self.network.forward_inference(
            &batch.values,
            &batch.observed,
            batch.calendar.as_ref(),
        )?;
        Ok((
            output.point.flatten_all()?.to_vec1::<f32>()?,
            output.quantiles.flatten_all()?.to_vec1::<f32>()?,
            batch.stats,
        ))
    }

    /// The weights as safetensors bytes (parameters in name order).
    pub fn weights_bytes(&self) -> Result<Vec<u8>, ForecastError> {
        let vars = train::sorted_vars(&self.varmap);
        let tensors: Vec<(String, Tensor)> = vars
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        safetensors::serialize(tensors, None)
            .map_err(|err| ForecastError::Numerical(format!("cannot serialise the weights: {err}")))
    }

    /// Rebuilds a model from [`XlstmModel::weights_bytes`] and its manifest; the weights must
    /// fit the manifest's architecture exactly.
    pub fn from_parts(
        weights: &[u8],
        manifest: ModelManifest,
        device: &Device,
    ) -> Result<Self, ForecastError> {
        manifest.preset.validate()?;
        let varmap = VarMap::new();
        let network = ForecastNetwork::new(
            &manifest.preset.model,
            manifest.shape,
            SeededVarMap::builder(&varmap, manifest.preset.training.seed, device),
        )?;
        let mut stored = candle_core::safetensors::load_buffer(weights, device).map_err(|err| {
            ForecastError::invalid(
                "model",
                format!("the weights are not a safetensors file: {err}"),
            )
        })?;
        for (name, var) in train::sorted_vars(&varmap) {
            let tensor = stored.remove(&name).ok_or_else(|| {
                ForecastError::invalid(
                    "model",
                    format!(
                        "the weights lack parameter {name} that the manifest's architecture needs"
                    ),
                )
            })?;
            // Models saved before the weight was chosen per horizon step hold one for all.
            let tensor = if name == DEEP_SCALE && tensor.elem_count() == 1 {
                tensor.reshape(())?.broadcast_as(var.dims())?.contiguous()?
            } else {
                tensor
            };
            if tensor.dims() != var.dims() {
                return Err(ForecastError::invalid(
                    "model",
                    format!(
                        "parameter {name} has shape {:?} in the weights but {:?} in the \
                         manifest's architecture",
                        tensor.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(&tensor.to_dtype(var.dtype())?)?;
        }
        if let Some(extra) = stored.keys().min() {
            return Err(ForecastError::invalid(
                "model",
                format!(
                    "the weights hold parameter {extra}, which the manifest's architecture lacks"
                ),
            ));
        }
        manifest.calibration.check(
            manifest.shape.horizon,
            manifest.preset.model.quantile_levels.len(),
        )?;
        Ok(Self {
            network,
            varmap,
            device: device.clone(),
            norm: InstanceNorm::default(),
            manifest,
        })
    }
}

impl Predict for XlstmModel {
    fn lookback(&self) -> usize {
        self.manifest.shape.lookback
    }

    fn horizon(&self) -> usize {
        self.manifest.shape.horizon
    }

    fn quantile_levels(&self) -> &[f32] {
        &self.manifest.preset.model.quantile_levels
    }

    fn parameter_count(&self) -> usize {
        train::sorted_vars(&self.varmap)
            .iter()
            .map(|(_, var)| var.elem_count())
            .sum()
    }

    fn predict(&self, windows: &WindowBatch) -> Result<Forecast, ForecastError> {
        let shape = self.manifest.shape;
        if windows.lookback != shape.lookback || windows.channels != shape.channels {
            return Err(ForecastError::invalid(
                "windows",
                format!(
                    "the model takes lookback {} with {} channels, the windows have lookback {} \
                     with {} channels",
                    shape.lookback, shape.channels, windows.lookback, windows.channels
                ),
            ));
        }
        let levels = self.quantile_levels().to_vec();
        let cells_per_window = shape.horizon * shape.channels;
        let mut forecast = Forecast {
            batch: windows.batch,
            horizon: shape.horizon,
            channels: shape.channels,
            mean: Vec::with_capacity(windows.batch * cells_per_window),
            quantile_levels: levels.clone(),
            quantiles: Vec::with_capacity(windows.batch * cells_per_window * levels.len()),
        };
        let mut first = 0;
        while first < windows.batch {
            let end = (first + PREDICT_BLOCK).min(windows.batch);
            let block = windows.select(first..end);
            let (mean, mut quantiles, stats) = self.forward_normalised(&block)?;
            let calibration = &self.manifest.calibration;
            let widths = band_widths(&block, &stats, calibration.season(), self.norm.eps);
            for (cell, (point, cell_quantiles)) in mean
                .iter()
                .zip(quantiles.chunks_mut(levels.len()))
                .enumerate()
            {
                let step = (cell / shape.channels) % shape.horizon;
                let width = widths[stats.index_of_cell(cell, shape.horizon)];
                calibration.apply(step, *point, width, cell_quantiles);
            }
            let mut part = Forecast {
                batch: end - first,
                horizon: shape.horizon,
                channels: shape.channels,
                mean,
                quantile_levels: levels.clone(),
                quantiles,
            };
            self.norm.denormalise(&mut part, &stats);
            forecast.mean.extend(part.mean);
            forecast.quantiles.extend(part.quantiles);
            first = end;
        }
        Ok(forecast)
    }
}

/// The factor `s` minimising `Σ ρ_τ(e − s·d)` over `(e, d)` pairs (residual from the point
/// forecast, raw quantile offset from it) for level `τ`. Where `d ≠ 0` the loss is
/// `|d|·ρ(r − s)` in `r = e/d` (level `τ` where `d > 0`, `1 − τ` where `d < 0`), so its
/// slope in `s` rises by `|d|` at each `r`: the minimum is where the slope turns
/// non-negative. Pairs with `d = 0` do not depend on `s`; with none left the factor is 1.
fn pinball_optimal_factor(pairs: &[(f32, f32)], level: f32) -> f32 {
    let level = f64::from(level);
    let mut ratios: Vec<(f64, f64)> = pairs
        .iter()
        .filter(|(_, offset)| *offset != 0.0)
        .map(|(residual, offset)| {
            (
                f64::from(*residual) / f64::from(*offset),
                f64::from(offset.abs()),
            )
        })
        .collect();
    if ratios.is_empty() {
        return 1.0;
    }
    ratios.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    // The slope below every ratio: −τ·Σd over d > 0 and −(1 − τ)·Σ|d| over d < 0.
    let mut slope: f64 = pairs
        .iter()
        .map(|(_, offset)| {
            let offset = f64::from(*offset);
            if offset > 0.0 {
                -level * offset
            } else {
                -(1.0 - level) * -offset
            }
        })
        .sum();
    for (ratio, weight) in &ratios {
        slope += weight;
        if slope >= 0.0 {
            return *ratio as f32;
        }
    }
    ratios[ratios.len() - 1].0 as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinball(pairs: &[(f32, f32)], level: f32, factor: f32) -> f64 {
        pairs
            .iter()
            .map(|(residual, offset)| {
                let u = f64::from(residual - factor * offset);
                u * (f64::from(level) - if u < 0.0 { 1.0 } else { 0.0 })
            })
            .sum()
    }

    #[test]
    fn the_factor_makes_a_unit_offset_the_residuals_quantile() {
        // With every offset 1 (or −1) the factor is the level's (mirrored) quantile.
        let residuals: Vec<f32> = (0..101).map(|i| i as f32 / 10.0 - 5.0).collect();
        let above: Vec<(f32, f32)> = residuals.iter().map(|e| (*e, 1.0)).collect();
        assert!((pinball_optimal_factor(&above, 0.9) - 4.0).abs() < 0.11);
        let below: Vec<(f32, f32)> = residuals.iter().map(|e| (*e, -1.0)).collect();
        assert!((pinball_optimal_factor(&below, 0.1) - 4.0).abs() < 0.11);
        assert_eq!(pinball_optimal_factor(&[(1.0, 0.0)], 0.9), 1.0);
    }

    #[test]
    fn the_factor_minimises_the_pinball_loss() {
        // Offsets of both signs and sizes: no factor on a fine grid does better.
        let pairs: Vec<(f32, f32)> = (0..200)
            .map(|i| {
                let residual = ((i * 37 % 101) as f32 - 50.0) / 20.0;
                let offset = ((i * 13 % 23) as f32 - 5.0) / 10.0;
                (residual, offset)
            })
            .collect();
        for level in [0.1_f32, 0.5, 0.8] {
            let best = pinball_optimal_factor(&pairs, level);
            let at_best = pinball(&pairs, level, best);
            for step in -400..=400 {
                let factor = step as f32 / 40.0;
                assert!(
                    at_best <= pinball(&pairs, level, factor) + 1e-6,
                    "{level} {factor}"
                );
            }
        }
    }
}
