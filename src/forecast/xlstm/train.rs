//! The training loop: AdamW with a linear warm-up and cosine decay, global gradient-norm
//! clipping, early stopping on the validation point loss checked once or more per epoch (the
//! best check's weights are kept), seeded window order and dropout, a progress callback that
//! can also stop the run, and a hard stop with a clear error when the loss or the gradients
//! stop being finite. Each batch is cut into one shard per core (`crate::xlstm::shards`), so
//! runs with one seed are identical for one thread count.

use std::ops::{ControlFlow, Range};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use super::super::error::ForecastError;
use super::super::model::{Targets, TrainingData, WindowBatch};
use super::super::revin::{InstanceNorm, InstanceStats};
use super::network::{DEEP_SCALE, DropoutMasks, ForecastNetwork, NetworkOutput};
use super::preset::{PointLoss, TrainingConfig};
use crate::data::CALENDAR_FEATURES;
use crate::xlstm::shards::{backward_sharded, shard_ranges};

/// A loss above this (on the z-scored scale, where a useless forecast scores about 1) means
/// the run exploded.
const EXPLODED_LOSS: f64 = 1e6;

/// Parameters not trained by gradient: the ridge-initialised linear path, and the deep
/// correction's weight beside it (chosen on the validation windows at every check).
fn is_frozen(name: &str) -> bool {
    name.starts_with("linear_path.") || name == DEEP_SCALE
}

/// The deep correction's weights tried at every check: 0, 0.05, …, 1.
const DEEP_SCALE_STEPS: usize = 20;

/// The deep correction's weight is chosen per group of consecutive horizon steps: at most
/// this many groups over the steps the deep path forecasts.
const DEEP_SCALE_GROUPS: usize = 8;

/// The weight group of each horizon step: the first `deep` steps (the deep path's) in up to
/// [`DEEP_SCALE_GROUPS`] runs of equal length, later steps with the last run (the correction
/// is zero there, so every weight scores them alike).
fn deep_scale_groups(horizon: usize, deep: usize) -> Vec<usize> {
    let groups = DEEP_SCALE_GROUPS.min(deep).max(1);
    let deep = deep.max(1);
    (0..horizon)
        .map(|step| (step * groups / deep).min(groups - 1))
        .collect()
}

/// Reads a per-group weight list, or the single weight of models saved before there were
/// groups (it applied to every step: one group).
fn one_or_many_weights<'de, D>(deserializer: D) -> Result<Option<Vec<f64>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Weights {
        One(f64),
        Many(Vec<f64>),
    }
    Ok(
        Option::<Weights>::deserialize(deserializer)?.map(|weights| match weights {
            Weights::One(weight) => vec![weight],
            Weights::Many(weights) => weights,
        }),
    )
}

/// Windows per validation forward pass.
const VALIDATION_BLOCK: usize = 256;

/// One validation check: the end of an epoch, or a check within it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    /// Optimiser steps into `epoch` when the check came before the epoch's end; `None` at
    /// its end (and for epoch 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_epoch_step: Option<usize>,
    /// Mean training loss (point + weighted pinball) over the epoch's steps so far; `None`
    /// for epoch 0, the validation of the initial weights.
    pub train_loss: Option<f64>,
    /// Validation point loss (MSE or MAE on the z-scored scale), with the deep correction
    /// weighted by `deep_scale`.
    pub val_loss: f64,
    /// The weights of the deep correction beside the linear path that scored `val_loss`, one
    /// per group of horizon steps, nearest first (None without a linear path).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "one_or_many_weights"
    )]
    pub deep_scale: Option<Vec<f64>>,
    pub seconds: f64,
}

/// What the progress callback sees, after every optimiser step and every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingProgress {
    pub epoch: usize,
    pub max_epochs: usize,
    /// Steps done in the current epoch.
    pub step: usize,
    pub steps_per_epoch: usize,
    /// Running mean of the current epoch's training loss.
    pub train_loss: Option<f64>,
    /// Validation loss of the last finished epoch.
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    /// Seconds left if every remaining epoch runs (early stopping can only shorten it).
    pub eta_seconds: Option<f64>,
    pub history: Vec<EpochRecord>,
}

pub type ProgressCallback<'a> = &'a mut dyn FnMut(&TrainingProgress) -> ControlFlow<()>;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Epochs trained (not counting epoch 0, the initial validation).
    pub epochs: usize,
    /// The epoch whose weights were kept (0: the initial weights).
    pub best_epoch: usize,
    /// Steps into `best_epoch` when the kept weights came from a check within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_mid_epoch_step: Option<usize>,
    pub best_val_loss: f64,
    /// The deep correction's weights in the kept model, per group of horizon steps (None
    /// without a linear path).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "one_or_many_weights"
    )]
    pub deep_scale: Option<Vec<f64>>,
    pub stopped_early: bool,
    pub train_seconds: f64,
    pub history: Vec<EpochRecord>,
}

/// One run's knobs, resolved from the preset (a fine-tune scales them down).
pub(super) struct Schedule<'a> {
    pub training: &'a TrainingConfig,
    pub learning_rate: f64,
    pub max_epochs: usize,
    pub point_loss: PointLoss,
    pub quantile_loss_weight: f64,
    pub quantile_levels: &'a [f32],
}

/// A batch as tensors: inputs on the RevIN scale, targets on the z-scored scale.
pub(super) struct TensorBatch {
    pub values: Tensor,
    pub observed: Tensor,
    /// `[B, CALENDAR_FEATURES]` when the windows carry their times.
    pub calendar: Option<Tensor>,
    pub stats: InstanceStats,
    pub centre: Tensor,
    pub scale: Tensor,
}

impl TensorBatch {
    pub fn new(
        norm: &InstanceNorm,
        windows: &WindowBatch,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (mut normalised, stats) = norm.normalise(windows);
        // Whatever a missing cell holds, the network sees 0 there and the mask says why.
        for (value, missing) in normalised.values.iter_mut().zip(&windows.missing) {
            if *missing {
                *value = 0.0;
            }
        }
        let dims = (windows.batch, windows.lookback, windows.channels);
        let observed: Vec<f32> = windows
            .missing
            .iter()
            .map(|m| if *m { 0.0 } else { 1.0 })
            .collect();
        let stat_dims = (windows.batch, 1, windows.channels);
        let calendar = windows
            .calendar
            .as_ref()
            .map(|rows| Tensor::from_slice(rows, (windows.batch, CALENDAR_FEATURES), device))
            .transpose()?;
        Ok(Self {
            values: Tensor::from_vec(normalised.values, dims, device)?,
            observed: Tensor::from_vec(observed, dims, device)?,
            calendar,
            centre: Tensor::from_slice(&stats.centre, stat_dims, device)?,
            scale: Tensor::from_slice(&stats.scale, stat_dims, device)?,
            stats,
        })
    }

    /// Network outputs mapped back to the input scale: `[B, H, C]` and `[B, H, C, Q]`.
    pub fn denormalise(&self, output: &NetworkOutput) -> candle_core::Result<(Tensor, Tensor)> {
        let point = self.denormalise_point(&output.point)?;
        let quantiles = output
            .quantiles
            .broadcast_mul(&self.scale.unsqueeze(3)?)?
            .broadcast_add(&self.centre.unsqueeze(3)?)?;
        Ok((point, quantiles))
    }

    /// A `[B, H, C]` forecast mapped back to the input scale.
    fn denormalise_point(&self, point: &Tensor) -> candle_core::Result<Tensor> {
        point
            .broadcast_mul(&self.scale)?
            .broadcast_add(&self.centre)
    }
}

/// Targets as tensors: values and a 1/0 observed mask, `[B, H, C]`.
struct TargetTensors {
    values: Tensor,
    observed: Tensor,
    count: f64,
}

impl TargetTensors {
    fn new(targets: &Targets, device: &Device) -> candle_core::Result<Self> {
        let dims = (targets.batch, targets.horizon, targets.channels);
        let observed: Vec<f32> = targets
            .missing
            .iter()
            .map(|m| if *m { 0.0 } else { 1.0 })
            .collect();
        let count = observed.iter().map(|v| f64::from(*v)).sum();
        Ok(Self {
            values: Tensor::from_slice(&targets.values, dims, device)?,
            observed: Tensor::from_vec(observed, dims, device)?,
            count,
        })
    }
}

/// Sums of the masked losses of one batch: `(point, pinball)`, each a scalar tensor; divide
/// by the observed target count for means.
fn loss_sums(
    point: &Tensor,
    quantiles: &Tensor,
    targets: &TargetTensors,
    point_loss: PointLoss,
    levels: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let point_sum = point_cell_losses(point, targets, point_loss)?.sum_all()?;
    // Pinball: τ·max(y − q, 0) + (1 − τ)·max(q − y, 0), averaged over the levels.
    let above = targets.values.unsqueeze(3)?.broadcast_sub(quantiles)?;
    let pinball = (above.relu()?.broadcast_mul(levels)?
        + above.neg()?.relu()?.broadcast_mul(&(1.0 - levels)?)?)?
    .mean(3)?;
    let pinball_sum = (pinball * &targets.observed)?.sum_all()?;
    Ok((point_sum, pinball_sum))
}

/// The point loss of every target cell, `[B, H, C]`, 0 where the target is missing.
fn point_cell_losses(
    point: &Tensor,
    targets: &TargetTensors,
    point_loss: PointLoss,
) -> candle_core::Result<Tensor> {
    let error = (point - &targets.values)?;
    let cells = match point_loss {
        PointLoss::Mse => error.sqr()?,
        PointLoss::Mae => error.abs()?,
    };
    cells * &targets.observed
}

/// The point loss summed per horizon step over the observed target values: `[H]` values.
fn step_sums(
    point: &Tensor,
    targets: &TargetTensors,
    point_loss: PointLoss,
) -> candle_core::Result<Vec<f32>> {
    point_cell_losses(point, targets, point_loss)?
        .sum(2)?
        .sum(0)?
        .to_vec1()
}

struct SeededDropout {
    rng: StdRng,
    rate: f64,
}

impl DropoutMasks for SeededDropout {
    fn mask(&mut self, dims: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let keep = (1.0 / (1.0 - self.rate)) as f32;
        let count = dims.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| {
                if self.rng.random::<f64>() < self.rate {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        Tensor::from_vec(values, dims, device)
    }
}

/// The trainable variables in name order, so that every sum over them is reproducible.
pub(super) fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("var map lock poisoned");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Rescales `grads` to a global L2 norm of at most `limit`; returns the norm before.
fn clip_gradients(
    vars: &[(String, Var)],
    grads: &mut GradStore,
    limit: f64,
) -> candle_core::Result<f64> {
    let mut squared = 0.0_f64;
    for (_, var) in vars {
        if let Some(grad) = grads.get(var) {
            squared += f64::from(grad.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = squared.sqrt();
    if norm.is_finite() && norm > limit {
        let factor = limit / norm;
        for (_, var) in vars {
            if let Some(grad) = grads.remove(var) {
                grads.insert(var, (grad * factor)?);
            }
        }
    }
    Ok(norm)
}

fn learning_rate_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let floor = peak * min_ratio;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// One validation check's score.
#[derive(Debug, Clone)]
pub(super) struct ValidationScore {
    /// Mean point loss per observed target value.
    pub loss: f64,
    /// With a linear path: per group of horizon steps ([`deep_scale_groups`]), the weight of
    /// the deep correction (0, 0.05, …, 1) that scored lowest there; `loss` is with these.
    /// Ties go to the larger weight, so an untrained (zero) correction keeps 1. The network
    /// must hold weight 1 while scored.
    pub deep_scale: Option<Vec<f64>>,
}

/// Mean validation point loss of `network` over `windows` (indices of `data.validation`).
pub(super) fn validation_loss(
    network: &ForecastNetwork,
    norm: &InstanceNorm,
    data: &TrainingData<'_>,
    windows: &[usize],
    point_loss: PointLoss,
    device: &Device,
) -> Result<ValidationScore, ForecastError> {
    // Largest weight first, so that `min_by` (which keeps the first of equal values) breaks
    // ties toward it.
    let scales: Vec<f64> = if network.linear_path().is_some() {
        (0..=DEEP_SCALE_STEPS)
            .rev()
            .map(|i| i as f64 / DEEP_SCALE_STEPS as f64)
            .collect()
    } else {
        vec![1.0]
    };
    let groups = deep_scale_groups(data.horizon, network.deep_steps());
    let group_count = groups.iter().max().map_or(1, |last| last + 1);
    // sums[weight][group]
    let mut sums = vec![vec![0.0_f64; group_count]; scales.len()];
    let add_per_step = |sums: &mut Vec<f64>, per_step: Vec<f32>| {
        for (step, sum) in per_step.into_iter().enumerate() {
            sums[groups[step]] += f64::from(sum);
        }
    };
    let mut count = 0.0_f64;
    for block in windows.chunks(VALIDATION_BLOCK) {
        let (inputs, targets) =
            data.validation
                .extract_indices(data.series, block, data.lookback, data.horizon)?;
        let batch = TensorBatch::new(norm, &inputs, device)?;
        let targets = TargetTensors::new(&targets, device)?;
        let output =
            network.forward_inference(&batch.values, &batch.observed, batch.calendar.as_ref())?;
        let point = batch.denormalise_point(&output.point)?;
        match &output.linear {
            Some(linear) => {
                let linear = batch.denormalise_point(linear)?;
                let correction = (&point - &linear)?;
                for (sums, scale) in sums.iter_mut().zip(&scales) {
                    let forecast = (&linear + (&correction * *scale)?)?;
                    add_per_step(sums, step_sums(&forecast, &targets, point_loss)?);
                }
            }
            None => add_per_step(&mut sums[0], step_sums(&point, &targets, point_loss)?),
        }
        count += targets.count;
    }
    if count == 0.0 {
        return Err(ForecastError::invalid(
            "validation",
            "the validation windows hold no observed target value",
        ));
    }
    let (loss_sum, weights) = weigh_deep_correction(&sums, &scales);
    Ok(ValidationScore {
        loss: loss_sum / count,
        deep_scale: network.linear_path().map(|_| weights),
    })
}

/// Per group of horizon steps, the weight of the deep correction that scores lowest there (the
/// first, i.e. largest, of equals), and the loss summed over the groups with those weights.
/// `sums[weight][group]` are loss sums, `weights` descending.
fn weigh_deep_correction(sums: &[Vec<f64>], weights: &[f64]) -> (f64, Vec<f64>) {
    let groups = sums.first().map_or(0, Vec::len);
    let (mut loss_sum, mut chosen) = (0.0, Vec::with_capacity(groups));
    for group in 0..groups {
        let (best, sum) = sums
            .iter()
            .map(|per_group| per_group[group])
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one weight is tried");
        loss_sum += sum;
        chosen.push(weights[best]);
    }
    (loss_sum, chosen)
}

/// The input and target tensors of each shard of `windows` (training window indices).
fn training_shards(
    data: &TrainingData<'_>,
    norm: &InstanceNorm,
    windows: &[usize],
    shards: &[Range<usize>],
    device: &Device,
) -> Result<Vec<(TensorBatch, TargetTensors)>, ForecastError> {
    shards
        .iter()
        .map(|rows| {
            let (inputs, targets) = data.train.extract_indices(
                data.series,
                &windows[rows.clone()],
                data.lookback,
                data.horizon,
            )?;
            Ok((
                TensorBatch::new(norm, &inputs, device)?,
                TargetTensors::new(&targets, device)?,
            ))
        })
        .collect()
}

/// `count` indices spread evenly over `0..total` (all of them when `count >= total`).
pub(super) fn evenly_spaced(total: usize, count: Option<usize>) -> Vec<usize> {
    match count {
        Some(count) if count < total => (0..count).map(|i| i * total / count).collect(),
        _ => (0..total).collect(),
    }
}

/// Trains the variables of `varmap` (those of `network`) in place; on return they hold the
/// best epoch's weights.
pub(super) fn train(
    network: &ForecastNetwork,
    varmap: &VarMap,
    norm: &InstanceNorm,
    data: &TrainingData<'_>,
    schedule: &Schedule<'_>,
    device: &Device,
    mut progress: Option<ProgressCallback<'_>>,
) -> Result<TrainingSummary, ForecastError> {
    let started = Instant::now();
    let training = schedule.training;
    if data.train.count == 0 {
        return Err(ForecastError::invalid(
            "train",
            "there are no training windows",
        ));
    }
    if data.validation.count == 0 {
        return Err(ForecastError::invalid(
            "validation",
            "there are no validation windows",
        ));
    }
    // The linear path keeps its closed-form ridge fit: AdamW's normalised steps would walk
    // those small, precise weights away within an epoch, and the deep path learns the
    // residual around them instead.
    let vars: Vec<(String, Var)> = sorted_vars(varmap)
        .into_iter()
        .filter(|(name, _)| !is_frozen(name))
        .collect();
    // The checks score the whole deep correction and weigh it themselves (a fine-tune's
    // parent may hold a smaller weight).
    let groups = deep_scale_groups(data.horizon, network.deep_steps());
    if network.linear_path().is_some() {
        set_deep_scale(varmap, &groups, &[1.0], device)?;
    }
    let mut optimiser = AdamW::new(
        vars.iter().map(|(_, var)| var.clone()).collect(),
        ParamsAdamW {
            lr: schedule.learning_rate,
            weight_decay: training.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let levels = Tensor::new(schedule.quantile_levels, device)?;
    let validation_windows = evenly_spaced(data.validation.count, training.max_validation_windows);
    let windows_per_epoch = training
        .max_windows_per_epoch
        .map_or(data.train.count, |cap| cap.min(data.train.count));
    let steps_per_epoch = windows_per_epoch.div_ceil(training.batch_size);
    let total_steps = steps_per_epoch * schedule.max_epochs;
    let warmup = ((total_steps as f64 * training.warmup_fraction).ceil() as usize).max(1);
    let mut order_rng = StdRng::seed_from_u64(training.seed);
    // Each step's shards draw their dropout masks from their own generators, seeded from this
    // one in shard order.
    let mut dropout_seeds = StdRng::seed_from_u64(training.seed.wrapping_add(1));
    let dropout_rate = network.config().dropout;

    let initial_started = Instant::now();
    let initial = validation_loss(
        network,
        norm,
        data,
        &validation_windows,
        schedule.point_loss,
        device,
    )?;
    let mut history = vec![EpochRecord {
        epoch: 0,
        mid_epoch_step: None,
        train_loss: None,
        val_loss: initial.loss,
        deep_scale: initial.deep_scale.clone(),
        seconds: initial_started.elapsed().as_secs_f64(),
    }];
    // Steps between validation checks; the last check of an epoch is at its end.
    let checks_per_epoch = training
        .validations_per_epoch
        .clamp(1, steps_per_epoch.max(1));
    let check_every = steps_per_epoch.div_ceil(checks_per_epoch);
    let patience_checks = training.patience.max(1) * checks_per_epoch;
    let mut checks_since_best = 0_usize;
    // (epoch, mid-epoch step, score) of the best check so far.
    let initial_loss = initial.loss;
    let mut best: (usize, Option<usize>, ValidationScore) = (0, None, initial);
    let mut best_weights = snapshot(&vars)?;
    let mut order: Vec<usize> = (0..data.train.count).collect();
    let mut global_step = 0;
    let mut stopped_early = false;
    let mut report = TrainingProgress {
        epoch: 0,
        max_epochs: schedule.max_epochs,
        step: 0,
        steps_per_epoch,
        train_loss: None,
        val_loss: Some(initial_loss),
        best_val_loss: Some(initial_loss),
        eta_seconds: None,
        history: history.clone(),
    };
    let training_started = Instant::now();
    let mut epochs = 0;
    let mut out_of_patience = false;
    for epoch in 1..=schedule.max_epochs {
        let epoch_started = Instant::now();
        shuffle(&mut order, &mut order_rng);
        let (mut loss_sum, mut loss_steps) = (0.0_f64, 0_usize);
        for (step, batch_windows) in order[..windows_per_epoch]
            .chunks(training.batch_size)
            .enumerate()
        {
            let shards = shard_ranges(device, batch_windows.len());
            let shard_data = training_shards(data, norm, batch_windows, &shards, device)?;
            let target_count: f64 = shard_data.iter().map(|(_, t)| t.count).sum();
            // A batch without an observed target trains nothing but still counts as a step,
            // so the checks stay where they are.
            if target_count > 0.0 {
                let shard_seeds: Vec<u64> = shards.iter().map(|_| dropout_seeds.random()).collect();
                // Each shard's loss is its share of the batch mean, so the shards' gradients
                // add up to the batch's.
                let (shard_losses, mut grads) = backward_sharded(&shards, |i, _| {
                    let (batch, targets) = &shard_data[i];
                    let mut dropout = SeededDropout {
                        rng: StdRng::seed_from_u64(shard_seeds[i]),
                        rate: dropout_rate,
                    };
                    let output = network.forward(
                        &batch.values,
                        &batch.observed,
                        batch.calendar.as_ref(),
                        Some(&mut dropout),
                    )?;
                    let (point, quantiles) = batch.denormalise(&output)?;
                    let (point_sum, pinball_sum) =
                        loss_sums(&point, &quantiles, targets, schedule.point_loss, &levels)?;
                    (point_sum + (pinball_sum * schedule.quantile_loss_weight)?)? / target_count
                })?;
                let mut loss_value = 0.0;
                for loss in &shard_losses {
                    loss_value += f64::from(loss.to_scalar::<f32>()?);
                }
                if !loss_value.is_finite() || loss_value > EXPLODED_LOSS {
                    return Err(diverged(
                        epoch,
                        step,
                        format!("the training loss is {loss_value}"),
                    ));
                }
                let norm = clip_gradients(&vars, &mut grads, training.grad_clip)?;
                if !norm.is_finite() {
                    return Err(diverged(
                        epoch,
                        step,
                        format!("the gradient norm is {norm}"),
                    ));
                }
                optimiser.set_learning_rate(learning_rate_at(
                    global_step,
                    total_steps,
                    warmup,
                    schedule.learning_rate,
                    training.min_lr_ratio,
                ));
                optimiser.step(&grads)?;
                global_step += 1;
                loss_sum += loss_value;
                loss_steps += 1;
                if let Some(callback) = progress.as_mut() {
                    report.epoch = epoch;
                    report.step = step + 1;
                    report.train_loss = Some(loss_sum / loss_steps as f64);
                    let per_step = training_started.elapsed().as_secs_f64() / global_step as f64;
                    report.eta_seconds = Some(per_step * (total_steps - global_step) as f64);
                    if callback(&report).is_break() {
                        return Err(ForecastError::Cancelled);
                    }
                }
            }
            let steps_done = step + 1;
            if steps_done % check_every != 0 && steps_done != steps_per_epoch {
                continue;
            }
            let at_epoch_end = steps_done == steps_per_epoch;
            let train_loss = (loss_steps > 0).then(|| loss_sum / loss_steps as f64);
            let score = validation_loss(
                network,
                norm,
                data,
                &validation_windows,
                schedule.point_loss,
                device,
            )?;
            let val_loss = score.loss;
            if !val_loss.is_finite() {
                return Err(diverged(
                    epoch,
                    steps_done,
                    format!("the validation loss is {val_loss}"),
                ));
            }
            let mid_epoch_step = (!at_epoch_end).then_some(steps_done);
            history.push(EpochRecord {
                epoch,
                mid_epoch_step,
                train_loss,
                val_loss,
                deep_scale: score.deep_scale.clone(),
                seconds: epoch_started.elapsed().as_secs_f64(),
            });
            if val_loss < best.2.loss {
                best = (epoch, mid_epoch_step, score);
                best_weights = snapshot(&vars)?;
                checks_since_best = 0;
            } else {
                checks_since_best += 1;
            }
            report.val_loss = Some(val_loss);
            report.best_val_loss = Some(best.2.loss);
            report.history = history.clone();
            if let Some(callback) = progress.as_mut()
                && callback(&report).is_break()
            {
                return Err(ForecastError::Cancelled);
            }
            if checks_since_best >= patience_checks {
                out_of_patience = true;
                break;
            }
        }
        epochs = epoch;
        if out_of_patience {
            stopped_early = epoch < schedule.max_epochs
                || history
                    .last()
                    .is_some_and(|record| record.mid_epoch_step.is_some());
            break;
        }
    }
    for ((_, var), weights) in vars.iter().zip(&best_weights) {
        var.set(weights)?;
    }
    if let Some(weights) = &best.2.deep_scale {
        set_deep_scale(varmap, &groups, weights, device)?;
    }
    Ok(TrainingSummary {
        epochs,
        best_epoch: best.0,
        best_mid_epoch_step: best.1,
        best_val_loss: best.2.loss,
        deep_scale: best.2.deep_scale,
        stopped_early,
        train_seconds: started.elapsed().as_secs_f64(),
        history,
    })
}

/// Sets each horizon step's weight to its group's (`weights` of one value: every step's).
fn set_deep_scale(
    varmap: &VarMap,
    groups: &[usize],
    weights: &[f64],
    device: &Device,
) -> candle_core::Result<()> {
    let data = varmap.data().lock().expect("var map lock poisoned");
    let var = data
        .get(DEEP_SCALE)
        .ok_or_else(|| candle_core::Error::Msg(format!("no {DEEP_SCALE} variable")))?;
    let per_step: Vec<f32> = groups
        .iter()
        .map(|group| weights[(*group).min(weights.len() - 1)] as f32)
        .collect();
    var.set(&Tensor::new(per_step, device)?)
}

fn snapshot(vars: &[(String, Var)]) -> candle_core::Result<Vec<Tensor>> {
    vars.iter().map(|(_, var)| var.as_tensor().copy()).collect()
}

fn shuffle(order: &mut [usize], rng: &mut StdRng) {
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
}

fn diverged(epoch: usize, step: usize, what: String) -> ForecastError {
    ForecastError::Numerical(format!(
        "training diverged at epoch {epoch}, step {step}: {what}; the run stopped (try a lower \
         learning_rate or grad_clip)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_then_decays_to_the_floor() {
        let lr = |step| learning_rate_at(step, 100, 10, 1.0, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!(lr(50) < lr(20));
        assert!((lr(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn weight_groups_split_the_deep_steps_and_give_later_steps_the_last() {
        assert_eq!(
            deep_scale_groups(12, 12),
            vec![0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7]
        );
        assert_eq!(deep_scale_groups(6, 3), vec![0, 1, 2, 2, 2, 2]);
        let groups = deep_scale_groups(720, 96);
        assert!(groups[..12].iter().all(|group| *group == 0));
        assert_eq!(groups[12], 1);
        assert!(groups[95..].iter().all(|group| *group == 7));
    }

    #[test]
    fn each_group_keeps_the_largest_of_its_lowest_scoring_weights() {
        let weights = [1.0, 0.5, 0.0];
        // sums[weight][group]: group 0 is best without the correction, group 1 with half of
        // it, group 2 is untrained (every weight scores the same).
        let sums = vec![
            vec![12.0, 9.0, 3.0],
            vec![11.0, 8.0, 3.0],
            vec![10.0, 10.0, 3.0],
        ];
        let (loss, chosen) = weigh_deep_correction(&sums, &weights);
        assert_eq!(chosen, vec![0.0, 0.5, 1.0]);
        assert_eq!(loss, 10.0 + 8.0 + 3.0);
    }

    #[test]
    fn a_single_saved_weight_reads_as_one_group() {
        let record: EpochRecord = serde_json::from_str(
            r#"{"epoch": 1, "train_loss": 0.4, "val_loss": 0.5, "deep_scale": 0.6, "seconds": 1.0}"#,
        )
        .unwrap();
        assert_eq!(record.deep_scale, Some(vec![0.6]));
        let record: EpochRecord = serde_json::from_str(
            r#"{"epoch": 1, "train_loss": 0.4, "val_loss": 0.5, "deep_scale": [0.6, 0.2], "seconds": 1.0}"#,
        )
        .unwrap();
        assert_eq!(record.deep_scale, Some(vec![0.6, 0.2]));
        let record: EpochRecord = serde_json::from_str(
            r#"{"epoch": 0, "train_loss": null, "val_loss": 0.5, "seconds": 1.0}"#,
        )
        .unwrap();
        assert_eq!(record.deep_scale, None);
    }

    #[test]
    fn evenly_spaced_indices_cover_the_range() {
        assert_eq!(evenly_spaced(10, Some(4)), vec![0, 2, 5, 7]);
        assert_eq!(evenly_spaced(3, Some(4)), vec![0, 1, 2]);
        assert_eq!(evenly_spaced(3, None), vec![0, 1, 2]);
    }
}
