//! The xLSTM forecaster as a `Fit` configuration and a `Predict` model: fitting builds the
//! network with seeded weights, starts its linear path from the closed-form ridge fit,
//! trains, and calibrates the quantiles on the validation windows; a fitted model can be
//! fine-tuned on newer data, saved and loaded.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

use super::super::baseline::LinearBaseline;
use super::super::error::ForecastError;
use super::super::model::{Fit, Fitted, Forecast, Predict, TrainingData, WindowBatch};
use super::super::revin::InstanceNorm;
use super::artefact::{ARTEFACT_FORMAT, ModelManifest, ParentModel};
use super::init::SeededVarMap;
use super::network::{ForecastNetwork, NetworkShape};
use super::preset::Preset;
use super::train::{self, ProgressCallback, Schedule, TensorBatch, TrainingSummary};

/// Windows per forward pass when forecasting.
const PREDICT_BLOCK: usize = 256;
/// Residuals per quantile level used to calibrate (a strided sample beyond this).
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
                calibration: vec![0.0; levels],
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

    /// Per quantile level, the shift that makes the level hold on the validation windows:
    /// the level's empirical quantile of `actual − predicted` on the windows' own scale.
    fn calibrate(&self, data: &TrainingData<'_>) -> Result<Vec<f32>, ForecastError> {
        let levels = self.manifest.preset.model.quantile_levels.clone();
        let windows = train::evenly_spaced(
            data.validation.count,
            self.manifest.preset.training.max_validation_windows,
        );
        let cells = windows.len() * data.horizon * data.series.channels;
        let stride = cells.div_ceil(CALIBRATION_SAMPLES).max(1);
        let mut residuals: Vec<Vec<f32>> = vec![Vec::new(); levels.len()];
        let mut cell_counter = 0_usize;
        for block in windows.chunks(PREDICT_BLOCK) {
            let (inputs, targets) =
                data.validation
                    .extract_indices(data.series, block, data.lookback, data.horizon)?;
            let (_, quantiles, stats) = self.forward_normalised(&inputs)?;
            for (cell, missing) in targets.missing.iter().enumerate() {
                cell_counter += 1;
                if *missing || cell_counter % stride != 0 {
                    continue;
                }
                let stat = (cell / (data.horizon * targets.channels)) * targets.channels
                    + cell % targets.channels;
                let actual = (targets.values[cell] - stats.centre[stat]) / stats.scale[stat];
                for (level, bucket) in residuals.iter_mut().enumerate() {
                    bucket.push(actual - quantiles[cell * levels.len() + level]);
                }
            }
        }
        residuals
            .iter_mut()
            .zip(&levels)
            .map(|(bucket, level)| {
                if bucket.is_empty() {
                    return Err(ForecastError::invalid(
                        "validation",
                        "no observed validation value to calibrate the quantiles on",
                    ));
                }
                bucket.sort_unstable_by(f32::total_cmp);
                let position = f64::from(*level) * (bucket.len() - 1) as f64;
                let below = position.floor() as usize;
                let above = (below + 1).min(bucket.len() - 1);
                let fraction = (position - below as f64) as f32;
                Ok(bucket[below] + (bucket[above] - bucket[below]) * fraction)
            })
            .collect()
    }

    /// Point forecasts `[B, H, C]` and raw quantiles `[B, H, C, Q]` on the windows' own
    /// scale, with the statistics to undo it.
    fn forward_normalised(
        &self,
        windows: &WindowBatch,
    ) -> Result<(Vec<f32>, Vec<f32>, super::super::revin::InstanceStats), ForecastError> {
        let batch = TensorBatch::new(&self.norm, windows, &self.device)?;
        let output = self.network.forward(&batch.values, &batch.observed, None)?;
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
        let levels = manifest.preset.model.quantile_levels.len();
        if manifest.calibration.len() != levels {
            return Err(ForecastError::invalid(
                "model",
                format!(
                    "the manifest has {} calibration shifts for {levels} quantile levels",
                    manifest.calibration.len()
                ),
            ));
        }
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
        let window_cells = shape.lookback * shape.channels;
        let mut first = 0;
        while first < windows.batch {
            let end = (first + PREDICT_BLOCK).min(windows.batch);
            let block = WindowBatch::new(
                end - first,
                shape.lookback,
                shape.channels,
                windows.values[first * window_cells..end * window_cells].to_vec(),
                windows.missing[first * window_cells..end * window_cells].to_vec(),
            )?;
            let (mean, mut quantiles, stats) = self.forward_normalised(&block)?;
            for cell in quantiles.chunks_mut(levels.len()) {
                for (value, shift) in cell.iter_mut().zip(&self.manifest.calibration) {
                    *value += shift;
                }
                // Shifts differ per level, so restore the order the head guarantees.
                cell.sort_unstable_by(f32::total_cmp);
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
