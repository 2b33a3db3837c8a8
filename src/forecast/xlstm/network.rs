//! The forecasting network: patch embedding of instance-normalised windows (values and their
//! missing-value mask; optionally plus an embedding of the calendar), the residual xLSTM stack
//! over the patch tokens, and two heads — a flatten head for the point forecast (optionally
//! low-rank; added to an optional linear lookback→horizon path) and a pooled head for the
//! quantiles, built as cumulative positive increments so that they never cross. Everything
//! here is on the windows' own (RevIN) scale.

use candle_core::{D, Device, Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::xlstm::XlstmStack;
use crate::xlstm::layers::get_or_init_with;
use crate::xlstm::shards::{infer_sharded, shard_ranges};

use super::preset::{ChannelMode, ForecasterConfig};

/// The calendar features the network takes: the first of the windows' `CALENDAR_FEATURES`,
/// the hour of day and the day of week (sine/cosine pairs). Not the day of year: with a year or
/// two of training rows it names the date, and the network learnt that year's events from it
/// (ETTm1-96 +4.3 % with it, BENCHMARKS.md "Calendar covariates").
const CALENDAR_COVARIATES: usize = 4;

/// Spread (on the RevIN scale) of the Gaussian the quantile head starts from.
const INITIAL_QUANTILE_STD: f64 = 0.7;

/// The shape of the data a network is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkShape {
    pub lookback: usize,
    pub horizon: usize,
    pub channels: usize,
}

/// How the lookback is cut into patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Patching {
    /// Oldest steps dropped so that the patches end exactly at the last step.
    skip: usize,
    len: usize,
    stride: usize,
    count: usize,
}

impl Patching {
    fn new(lookback: usize, len: usize, stride: usize) -> Result<Self> {
        if len > lookback {
            candle_core::bail!("patch_len {len} exceeds the lookback {lookback}");
        }
        let skip = (lookback - len) % stride;
        Ok(Self {
            skip,
            len,
            stride,
            count: (lookback - skip - len) / stride + 1,
        })
    }

    /// Lookback steps read by the patches, patch by patch.
    fn indices(&self, device: &Device) -> Result<Tensor> {
        let indices: Vec<u32> = (0..self.count)
            .flat_map(|patch| {
                let first = self.skip + patch * self.stride;
                (first..first + self.len).map(|step| step as u32)
            })
            .collect();
        Tensor::new(indices, device)
    }
}

/// Training-time dropout masks, drawn by the trainer's seeded generator.
pub trait DropoutMasks {
    /// A `{0, 1/(1-p)}` mask of `dims`.
    fn mask(&mut self, dims: &[usize], device: &Device) -> Result<Tensor>;
}

#[derive(Debug, Clone)]
pub struct ForecastNetwork {
    cfg: ForecasterConfig,
    shape: NetworkShape,
    patching: Patching,
    patch_indices: Tensor,
    embed: Linear,
    /// Calendar features `[CALENDAR_COVARIATES]` → a token offset `[E]` (with
    /// `calendar_covariates`).
    calendar_embed: Option<Linear>,
    position: Tensor,
    stack: XlstmStack,
    point_head: PointHead,
    quantile_head: Linear,
    linear_path: Option<LinearPath>,
}

/// The linear lookback→horizon path and the weight the deep correction gets beside it.
#[derive(Debug, Clone)]
struct LinearPath {
    map: Linear,
    /// `[H]`: forecast = linear + deep_scale · deep, per horizon step. 1 while training;
    /// afterwards the values in [0, 1] that scored best on the validation windows at the kept
    /// check (see `train`): a deep correction that only partly carries over to unseen windows
    /// is shrunk toward the linear forecast instead of being kept whole or dropped, and how
    /// much carries over changes with the lead time.
    deep_scale: Tensor,
}

/// The point head over the flattened tokens `[S, tokens·E]`.
#[derive(Debug, Clone)]
enum PointHead {
    /// One linear map to every horizon output: `tokens·E·H` weights, which grows with the
    /// horizon (about 0.97M at E=64, 21 tokens, H=720) and overfits at long horizons.
    Flatten(Linear),
    /// `reduce` to `rank` features, then `expand` to the horizon: `rank·(tokens·E + H)`
    /// weights, so the horizon adds only `rank` weights per step.
    LowRank { reduce: Linear, expand: Linear },
}

impl PointHead {
    fn new(inputs: usize, outputs: usize, rank: Option<usize>, vb: VarBuilder) -> Result<Self> {
        match rank {
            None => Ok(Self::Flatten(zero_linear(inputs, outputs, vb)?)),
            Some(rank) => Ok(Self::LowRank {
                // The reduction starts random so that the expansion, which starts at zero
                // (the untrained network forecasts its linear path), gets a gradient at once.
                reduce: candle_nn::linear(inputs, rank, vb.pp("reduce"))?,
                expand: zero_linear(rank, outputs, vb.pp("expand"))?,
            }),
        }
    }
}

impl Module for PointHead {
    fn forward(&self, flat: &Tensor) -> Result<Tensor> {
        match self {
            Self::Flatten(linear) => linear.forward(flat),
            Self::LowRank { reduce, expand } => expand.forward(&reduce.forward(flat)?),
        }
    }
}

/// Network outputs on the RevIN scale: `point` `[B, H, C]`, `quantiles` `[B, H, C, Q]`;
/// `linear` `[B, H, C]` is the linear path's share of `point` (None without one).
pub struct NetworkOutput {
    pub point: Tensor,
    pub quantiles: Tensor,
    pub linear: Option<Tensor>,
}

impl ForecastNetwork {
    pub fn new(cfg: &ForecasterConfig, shape: NetworkShape, vb: VarBuilder) -> Result<Self> {
        let patching = Patching::new(shape.lookback, cfg.patch_len, cfg.patch_stride)?;
        let e = cfg.xlstm.embedding_dim;
        let (in_channels, out_channels) = match cfg.channel_mode {
            ChannelMode::Independent => (1, 1),
            ChannelMode::Mixing => (shape.channels, shape.channels),
        };
        let levels = cfg.quantile_levels.len();
        let embed = candle_nn::linear(2 * cfg.patch_len * in_channels, e, vb.pp("patch_embed"))?;
        let position = vb.get_with_hints(
            (patching.count, e),
            "position",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let calendar_embed = if cfg.calendar_covariates {
            Some(candle_nn::linear(
                CALENDAR_COVARIATES,
                e,
                vb.pp("calendar_embed"),
            )?)
        } else {
            None
        };
        let stack = XlstmStack::new(&cfg.xlstm, vb.pp("stack"))?;
        let head_outputs = shape.horizon * out_channels;
        // Zero heads: an untrained network forecasts exactly its linear path, and the
        // quantile head starts from a fixed Gaussian band around it.
        let point_head = PointHead::new(
            patching.count * e,
            deep_steps(cfg, shape.horizon) * out_channels,
            cfg.head_rank,
            vb.pp("point_head"),
        )?;
        let quantile_vb = vb.pp("quantile_head");
        let quantile_weight =
            quantile_vb.get_with_hints((head_outputs * levels, e), "weight", Init::Const(0.0))?;
        let quantile_bias =
            get_or_init_with(&quantile_vb, &[head_outputs * levels], "bias", |d| {
                Tensor::new(initial_quantile_increments(&cfg.quantile_levels), d)?
                    .repeat(head_outputs)
            })?;
        let quantile_head = Linear::new(quantile_weight, Some(quantile_bias));
        let linear_path = if cfg.linear_path {
            Some(LinearPath {
                map: zero_linear(shape.lookback, shape.horizon, vb.pp("linear_path"))?,
                deep_scale: vb.get_with_hints(shape.horizon, DEEP_SCALE, Init::Const(1.0))?,
            })
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            shape,
            patching,
            patch_indices: patching.indices(vb.device())?,
            embed,
            calendar_embed,
            position,
            stack,
            point_head,
            quantile_head,
            linear_path,
        })
    }

    pub fn shape(&self) -> NetworkShape {
        self.shape
    }

    pub fn config(&self) -> &ForecasterConfig {
        &self.cfg
    }

    /// Horizon steps the deep path forecasts (the first ones; the rest are the linear path's).
    pub fn deep_steps(&self) -> usize {
        deep_steps(&self.cfg, self.shape.horizon)
    }

    /// The linear path's weight `[H, L]` and bias `[H]`, when the network has one.
    pub fn linear_path(&self) -> Option<(&Tensor, &Tensor)> {
        self.linear_path.as_ref().map(|path| {
            (
                path.map.weight(),
                path.map.bias().expect("built with a bias"),
            )
        })
    }

    /// [`Self::forward`] without dropout and without recording ops for backpropagation, the
    /// batch cut into one shard per core (`crate::xlstm::shards`): the forecasts are the same,
    /// computed side by side.
    pub fn forward_inference(
        &self,
        values: &Tensor,
        observed: &Tensor,
        calendar: Option<&Tensor>,
    ) -> Result<NetworkOutput> {
        let shards = shard_ranges(values.device(), values.dim(0)?);
        let mut outputs = infer_sharded(&shards, |rows| {
            let rows_of = |t: &Tensor| t.narrow(0, rows.start, rows.len());
            let calendar = calendar.map(rows_of).transpose()?;
            self.forward(
                &rows_of(values)?,
                &rows_of(observed)?,
                calendar.as_ref(),
                None,
            )
        })?;
        if outputs.len() == 1 {
            return Ok(outputs.remove(0));
        }
        let points: Vec<&Tensor> = outputs.iter().map(|o| &o.point).collect();
        let quantiles: Vec<&Tensor> = outputs.iter().map(|o| &o.quantiles).collect();
        let linear: Option<Vec<&Tensor>> = outputs.iter().map(|o| o.linear.as_ref()).collect();
        Ok(NetworkOutput {
            point: Tensor::cat(&points, 0)?,
            quantiles: Tensor::cat(&quantiles, 0)?,
            linear: linear.map(|parts| Tensor::cat(&parts, 0)).transpose()?,
        })
    }

    /// `values` and `observed` `[B, L, C]` (RevIN-normalised values, 0 where missing; 1.0 where
    /// observed), and with `calendar_covariates` `calendar` `[B, CALENDAR_FEATURES]` (each
    /// window's last lookback row) → forecasts on the same scale. `dropout` is `Some` only
    /// while training.
    pub fn forward(
        &self,
        values: &Tensor,
        observed: &Tensor,
        calendar: Option<&Tensor>,
        dropout: Option<&mut dyn DropoutMasks>,
    ) -> Result<NetworkOutput> {
        let (batch, lookback, channels) = values.dims3()?;
        let NetworkShape {
            horizon,
            lookback: expected_lookback,
            channels: expected_channels,
        } = self.shape;
        if lookback != expected_lookback || channels != expected_channels {
            candle_core::bail!(
                "forecast network: windows are [{batch}, {lookback}, {channels}], the network \
                 was built for lookback {expected_lookback} and {expected_channels} channels"
            );
        }
        let training = dropout.is_some();
        let mut dropout = dropout;
        let mut drop = |x: Tensor| -> Result<Tensor> {
            match dropout.as_deref_mut() {
                Some(masks) if self.cfg.dropout > 0.0 => {
                    let mask = masks.mask(x.dims(), x.device())?;
                    x.mul(&mask)
                }
                _ => Ok(x),
            }
        };
        // Sequences `[S, L, in_channels]`.
        let (sequences, seq_values, seq_observed) = match self.cfg.channel_mode {
            ChannelMode::Independent => {
                let per_channel = |t: &Tensor| {
                    t.permute((0, 2, 1))?
                        .contiguous()?
                        .reshape((batch * channels, lookback, 1))
                };
                (
                    batch * channels,
                    per_channel(values)?,
                    per_channel(observed)?,
                )
            }
            ChannelMode::Mixing => (batch, values.clone(), observed.clone()),
        };
        let patches = |t: &Tensor| -> Result<Tensor> {
            let in_channels = t.dim(2)?;
            t.index_select(&self.patch_indices, 1)?.reshape((
                sequences,
                self.patching.count,
                self.patching.len * in_channels,
            ))
        };
        let tokens = Tensor::cat(&[patches(&seq_values)?, patches(&seq_observed)?], D::Minus1)?;
        let mut tokens = self.embed.forward(&tokens)?.broadcast_add(&self.position)?;
        if let Some(calendar_embed) = &self.calendar_embed {
            let Some(calendar) = calendar else {
                candle_core::bail!(
                    "the model takes calendar covariates (calendar_covariates = true), and the \
                     windows carry no times"
                );
            };
            // `[B, E]` → one offset per sequence, shared by its tokens.
            let offset = calendar_embed.forward(&calendar.narrow(1, 0, CALENDAR_COVARIATES)?)?;
            let offset = match self.cfg.channel_mode {
                ChannelMode::Independent => offset
                    .unsqueeze(1)?
                    .broadcast_as((batch, channels, offset.dim(1)?))?
                    .reshape((sequences, 1, ()))?,
                ChannelMode::Mixing => offset.unsqueeze(1)?,
            };
            tokens = tokens.broadcast_add(&offset)?;
        }
        let hidden = self.stack.forward_t(&drop(tokens)?, training)?;

        let out_channels = match self.cfg.channel_mode {
            ChannelMode::Independent => 1,
            ChannelMode::Mixing => channels,
        };
        let flat = hidden.reshape((sequences, ()))?;
        let mut point = self.point_head.forward(&drop(flat)?)?;
        let deep = deep_steps(&self.cfg, horizon);
        if deep < horizon {
            // Steps beyond the deep path's reach are the linear path's alone; in (step,
            // channel) order they are the last outputs.
            let rest = Tensor::zeros(
                (sequences, (horizon - deep) * out_channels),
                point.dtype(),
                point.device(),
            )?;
            point = Tensor::cat(&[point, rest], 1)?;
        }
        let mut linear = None;
        if let Some(path) = &self.linear_path {
            // `[S, H·out]` in (step, channel) order, like the head.
            let forecast = match self.cfg.channel_mode {
                ChannelMode::Independent => path
                    .map
                    .forward(&seq_values.reshape((sequences, lookback))?)?,
                ChannelMode::Mixing => path
                    .map
                    .forward(&seq_values.transpose(1, 2)?.contiguous()?)?
                    .transpose(1, 2)?
                    .reshape((sequences, horizon * channels))?,
            };
            let scaled = point
                .reshape((sequences, horizon, out_channels))?
                .broadcast_mul(&path.deep_scale.unsqueeze(1)?)?
                .reshape((sequences, horizon * out_channels))?;
            point = (scaled + &forecast)?;
            linear = Some(forecast);
        }
        let levels = self.cfg.quantile_levels.len();
        let raw = self.quantile_head.forward(&hidden.mean(1)?)?.reshape((
            sequences,
            horizon * out_channels,
            levels,
        ))?;
        let increments = if levels > 1 {
            Tensor::cat(
                &[
                    raw.narrow(2, 0, 1)?,
                    softplus(&raw.narrow(2, 1, levels - 1)?)?,
                ],
                2,
            )?
        } else {
            raw
        };
        let quantiles = point.unsqueeze(2)?.broadcast_add(&increments.cumsum(2)?)?;
        // `[S, H·out]` → `[B, H, C]`.
        let windows_first = |t: Tensor| match self.cfg.channel_mode {
            ChannelMode::Independent => t
                .reshape((batch, channels, horizon))?
                .transpose(1, 2)?
                .contiguous(),
            ChannelMode::Mixing => t.reshape((batch, horizon, channels)),
        };
        let quantiles = match self.cfg.channel_mode {
            ChannelMode::Independent => quantiles
                .reshape((batch, channels, horizon, levels))?
                .permute((0, 2, 1, 3))?
                .contiguous()?,
            ChannelMode::Mixing => quantiles.reshape((batch, horizon, channels, levels))?,
        };
        Ok(NetworkOutput {
            point: windows_first(point)?,
            quantiles,
            linear: linear.map(windows_first).transpose()?,
        })
    }
}

/// Name of the deep correction's weight beside the linear path (not trained by gradient).
pub const DEEP_SCALE: &str = "deep_scale";

/// Leading horizon steps the deep path's point head forecasts (all of them unless the
/// preset's `deep_horizon` is shorter).
fn deep_steps(cfg: &ForecasterConfig, horizon: usize) -> usize {
    cfg.deep_horizon.map_or(horizon, |steps| steps.min(horizon))
}

fn zero_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?;
    let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}

/// `log(1 + e^x)` without overflow: `max(x, 0) + log(1 + e^(−|x|))`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Raw quantile-head biases that produce the quantiles of N(0, INITIAL_QUANTILE_STD²): the
/// first level's offset, then the inverse softplus of each gap to the next level.
fn initial_quantile_increments(levels: &[f32]) -> Vec<f32> {
    let offsets: Vec<f64> = levels
        .iter()
        .map(|level| INITIAL_QUANTILE_STD * standard_normal_quantile(f64::from(*level)))
        .collect();
    let mut raw = vec![offsets[0] as f32];
    raw.extend(offsets.windows(2).map(|pair| {
        let gap = (pair[1] - pair[0]).max(1e-4);
        (gap.exp_m1()).ln() as f32
    }));
    raw
}

/// Φ⁻¹(p) by bisection on Φ (erf by Abramowitz–Stegun 7.1.26, |error| < 1.5e-7).
fn standard_normal_quantile(p: f64) -> f64 {
    let erf = |x: f64| {
        let sign = x.signum();
        let x = x.abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * x);
        let poly = t
            * (0.254_829_592
                + t * (-0.284_496_736
                    + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        sign * (1.0 - poly * (-x * x).exp())
    };
    let cdf = |z: f64| 0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2));
    let (mut lo, mut hi) = (-10.0_f64, 10.0_f64);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) < p { lo = mid } else { hi = mid }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantiles_match_the_tables() {
        assert!(standard_normal_quantile(0.5).abs() < 1e-6);
        assert!((standard_normal_quantile(0.9) - 1.281_551_6).abs() < 1e-5);
        assert!((standard_normal_quantile(0.1) + 1.281_551_6).abs() < 1e-5);
    }

    #[test]
    fn the_sharded_inference_forward_equals_the_whole_batch_forward() -> Result<()> {
        let preset = super::super::preset::Preset::load("tiny").expect("built-in preset");
        let shape = NetworkShape {
            lookback: 48,
            horizon: 12,
            channels: 3,
        };
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = super::super::init::SeededVarMap::builder(&varmap, 7, &dev);
        let network = ForecastNetwork::new(&preset.model, shape, vb)?;
        let values = Tensor::randn(0f32, 1.0, (7, 48, 3), &dev)?;
        let observed = Tensor::ones((7, 48, 3), candle_core::DType::F32, &dev)?;
        // `tiny` takes calendar covariates.
        let calendar = Tensor::randn(0f32, 1.0, (7, crate::data::CALENDAR_FEATURES), &dev)?;
        let whole = network.forward(&values, &observed, Some(&calendar), None)?;
        // Three threads: shards of 3, 2 and 2 windows.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a thread pool");
        let sharded =
            pool.install(|| network.forward_inference(&values, &observed, Some(&calendar)))?;
        for (a, b) in [
            (&whole.point, &sharded.point),
            (&whole.quantiles, &sharded.quantiles),
        ] {
            assert_eq!(a.dims(), b.dims());
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "the shards' forecasts differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn patches_end_at_the_last_step() {
        let p = Patching::new(336, 16, 8).unwrap();
        assert_eq!((p.skip, p.count), (0, 41));
        let p = Patching::new(100, 16, 8).unwrap();
        // (100 − 16) % 8 = 4 oldest steps dropped; last patch covers steps 84..100.
        assert_eq!((p.skip, p.count), (4, 11));
        assert_eq!(p.skip + (p.count - 1) * p.stride + p.len, 100);
    }
}
