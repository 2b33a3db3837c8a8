//! Building blocks of the xLSTM blocks (XLSTM.md §3), written with plain candle ops so that
//! autodiff differentiates them, and with the official parameter names and initialisers.
//!
//! Every constructor takes a `VarBuilder`: backed by a `VarMap` it creates fresh parameters
//! with the official initialisation; backed by tensors (e.g. a state dict) it loads them by the
//! official names (`weight`, `bias`, ...) under the builder's prefix.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::kernels::{conv, gate, headwise, norm};

/// eps of every LayerNorm / GroupNorm in the stack.
pub const NORM_EPS: f64 = 1e-5;

/// Official `small_init(dim)`: N(0, 2/(5·dim)).
pub fn small_init(dim: usize) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: (2.0 / (5.0 * dim as f64)).sqrt(),
    }
}

/// Official `wang_init(dim, num_blocks)`: N(0, (2/(num_blocks·√dim))²).
pub fn wang_init(dim: usize, num_blocks: usize) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: 2.0 / (num_blocks as f64 * (dim as f64).sqrt()),
    }
}

/// Fetches `name`; a parameter the builder creates fresh (a `VarMap` without it) starts at the
/// values `init` computes, for initialisations that `candle_nn::Init` cannot express
/// (linspace, power laws). Loading builders return the stored tensor untouched.
pub fn get_or_init_with(
    vb: &VarBuilder,
    shape: &[usize],
    name: &str,
    init: impl FnOnce(&Device) -> Result<Tensor>,
) -> Result<Tensor> {
    let fresh = !vb.contains_tensor(name);
    let t = vb.get_with_hints(shape, name, Init::Const(0.0))?;
    if fresh {
        let values = init(vb.device())?.to_dtype(t.dtype())?;
        if values.dims() != shape {
            candle_core::bail!(
                "initial values of {}.{name} have shape {:?}, expected {shape:?}",
                vb.prefix(),
                values.dims()
            );
        }
        // The fresh variable shares its storage with `t`: writing into it initialises the
        // VarMap entry, so the optimiser trains these values.
        t.slice_set(&values.contiguous()?, 0, 0)?;
    }
    Ok(t)
}

/// `n` evenly spaced f32 values from `start` to `end` inclusive (`[start]` when n = 1).
pub fn linspace(start: f64, end: f64, n: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..n)
        .map(|i| {
            let frac = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            (start + (end - start) * frac) as f32
        })
        .collect();
    Tensor::from_vec(values, n, device)
}

/// xlstm `LayerNorm`: over the last dim, scale `1 + weight` (weight initialised to 0), no bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(0.0))?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        norm::layer_norm(x, &(&self.weight + 1.0)?, None, NORM_EPS)
    }
}

/// `MultiHeadLayerNorm` / per-head GroupNorm: each head's DH values are normalised on their
/// own, then scaled by `1 + weight` (`weight` `[NH·DH]`, initialised to 0), no bias.
#[derive(Debug, Clone)]
pub struct MultiHeadLayerNorm {
    weight: Tensor,
    num_heads: usize,
}

impl MultiHeadLayerNorm {
    pub fn new(num_heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(num_heads * head_dim, "weight", Init::Const(0.0))?,
            num_heads,
        })
    }

    /// Head-major cell output `h` `[B, NH, S, DH]` → normalised features `[B, S, NH·DH]`.
    pub fn forward_heads(&self, h: &Tensor) -> Result<Tensor> {
        let nh = h.dims4()?.1;
        if nh != self.num_heads {
            candle_core::bail!(
                "multi-head layer norm: input has {nh} heads (shape {:?}), expected {}",
                h.dims(),
                self.num_heads
            );
        }
        norm::multi_head_layer_norm(h, &(&self.weight + 1.0)?, NORM_EPS)
    }
}

/// Depthwise causal conv1d with bias over `[B, S, C]`:
/// `y[t, c] = bias[c] + Σ_s weight[c, 0, s] · x[t − K + 1 + s, c]`.
///
/// The state is the last K inputs `[B, K, C]` (zeros before the sequence start); a forward pass
/// continues from a given state, so one code path serves whole sequences and single steps.
#[derive(Debug, Clone)]
pub struct CausalConv1d {
    /// `[C, 1, K]`, the official `conv.weight`.
    weight: Tensor,
    bias: Tensor,
    channels: usize,
    kernel_size: usize,
}

impl CausalConv1d {
    /// Parameters `conv.weight` `[C, 1, K]` and `conv.bias` `[C]` under `vb` (PyTorch's default
    /// init, U(±1/√K) for both).
    pub fn new(channels: usize, kernel_size: usize, vb: VarBuilder) -> Result<Self> {
        if kernel_size == 0 {
            candle_core::bail!("causal conv1d: kernel_size must be positive");
        }
        let bound = 1.0 / (kernel_size as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let vb = vb.pp("conv");
        Ok(Self {
            weight: vb.get_with_hints((channels, 1, kernel_size), "weight", init)?,
            bias: vb.get_with_hints(channels, "bias", init)?,
            channels,
            kernel_size,
        })
    }

    pub fn kernel_size(&self) -> usize {
        self.kernel_size
    }

    /// The all-zero state `[B, K, C]` (nothing seen yet).
    pub fn zero_state(&self, batch: usize, device: &Device) -> Result<Tensor> {
        Tensor::zeros((batch, self.kernel_size, self.channels), DType::F32, device)
    }

    /// `x` `[B, S, C]`, `state` the last K inputs before `x` (`None`: zeros). Returns the
    /// conv output `[B, S, C]` and the state after `x`.
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (batch, seq_len, channels) = x.dims3()?;
        if channels != self.channels {
            candle_core::bail!(
                "causal conv1d: input has shape {:?}, expected [B, S, {}]",
                x.dims(),
                self.channels
            );
        }
        let k = self.kernel_size;
        let padded = match state {
            Some(state) => {
                if state.dims() != [batch, k, channels] {
                    candle_core::bail!(
                        "causal conv1d: state has shape {:?}, expected [B, K, C] = [{batch}, {k}, {channels}]",
                        state.dims()
                    );
                }
                Tensor::cat(&[&state.narrow(1, 1, k - 1)?, x], 1)?
            }
            None => x.pad_with_zeros(1, k - 1, 0)?,
        };
        // [C, 1, K] → [K, C]: tap s of every channel as one row.
        let taps = self.weight.squeeze(1)?.t()?;
        let mut y = self.bias.broadcast_as(x.shape())?;
        for s in 0..k {
            let tap = taps.narrow(0, s, 1)?;
            y = (y + padded.narrow(1, s, seq_len)?.broadcast_mul(&tap)?)?;
        }
        // padded holds K−1 history entries then the S inputs: its last K rows are the new state.
        let new_state = padded.narrow(1, seq_len - 1, k)?.contiguous()?;
        Ok((y, new_state))
    }

    /// `SiLU(conv(x))` `[B, S, C]` continuing from `state` (`None`: zeros), by the fused
    /// conv + SiLU kernel: the input branch of both blocks.
    pub fn forward_silu(&self, x: &Tensor, state: Option<&Tensor>) -> Result<Tensor> {
        conv::causal_conv_silu(x, &self.weight.squeeze(1)?, &self.bias, state)
    }

    /// The state after `x` `[B, S, C]` when `state` (`None`: zeros) was the state before it:
    /// the last K inputs of history followed by `x`.
    pub fn next_state(&self, x: &Tensor, state: Option<&Tensor>) -> Result<Tensor> {
        let (batch, seq_len, _) = x.dims3()?;
        let k = self.kernel_size;
        if seq_len >= k {
            return x.narrow(1, seq_len - k, k)?.contiguous();
        }
        let history = match state {
            Some(state) => state.clone(),
            None => self.zero_state(batch, x.device())?,
        };
        Tensor::cat(&[&history.narrow(1, seq_len, k - seq_len)?, x], 1)
    }
}

/// Block-diagonal linear map without bias (official `LinearHeadwiseExpand`, expand factor 1):
/// the D input features are cut into NB blocks of d = D/NB and block `blk` is mapped by
/// `weight[blk]` `[d, d]`: `y[blk·d + o] = Σ_i weight[blk, o, i] · x[blk·d + i]`.
#[derive(Debug, Clone)]
pub struct LinearHeadwiseExpand {
    /// `[NB, d, d]`, the official `weight`.
    weight: Tensor,
}

impl LinearHeadwiseExpand {
    pub fn new(dim: usize, num_blocks: usize, init: Init, vb: VarBuilder) -> Result<Self> {
        if num_blocks == 0 || !dim.is_multiple_of(num_blocks) {
            candle_core::bail!(
                "linear headwise: {num_blocks} blocks do not divide the feature dim {dim} ({})",
                vb.prefix()
            );
        }
        let d = dim / num_blocks;
        Ok(Self {
            weight: vb.get_with_hints((num_blocks, d, d), "weight", init)?,
        })
    }

    /// The outputs of several maps of one size side by side, the first `maps_on_first` of
    /// them reading `inputs[0]` and the others `inputs[1]`; in one pass, without the
    /// concatenation of separate outputs.
    pub fn forward_side_by_side(
        maps: &[&Self],
        inputs: [&Tensor; 2],
        maps_on_first: usize,
    ) -> Result<Tensor> {
        let weights: Vec<&Tensor> = maps.iter().map(|map| &map.weight).collect();
        headwise::headwise_linear_side_by_side(inputs, &weights, maps_on_first)
    }
}

impl Module for LinearHeadwiseExpand {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        headwise::headwise_linear(x, &self.weight)
    }
}

/// `x W^T` for `x` `[.., in]` and `W` `[out, in]` as one GEMM over all leading dims: `x` is
/// flattened to `[rows, in]`. A batched product would broadcast W to `[B, in, out]`, and its
/// backward pass would compute B weight gradients and then sum them over B.
pub(crate) fn matmul_transposed(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out_dim, in_dim) = weight.dims2()?;
    let mut out_shape = x.dims().to_vec();
    match out_shape.last_mut() {
        Some(last) if *last == in_dim && in_dim > 0 => *last = out_dim,
        _ => candle_core::bail!(
            "linear: x has shape {:?}, expected [.., {in_dim}]",
            x.dims()
        ),
    }
    let rows = x.elem_count() / in_dim;
    x.contiguous()?
        .reshape((rows, in_dim))?
        .matmul(&weight.t()?)?
        .reshape(out_shape)
}

/// `y = x Wᵀ` without bias, `W` `[out, in]` (PyTorch `nn.Linear(bias=False)`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, init: Init, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", init)?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Outputs `first..first + count` only: `x W[first..first + count]ᵀ`. Splitting a layer's
    /// outputs this way, rather than narrowing its whole output, keeps each part contiguous and
    /// leaves the backward pass a narrow of the small weight instead of zero-padded copies of
    /// the large output.
    pub fn forward_outputs(&self, x: &Tensor, first: usize, count: usize) -> Result<Tensor> {
        matmul_transposed(x, &self.weight.narrow(0, first, count)?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_transposed(x, &self.weight)
    }
}

/// Official `GatedFeedForward` (`ffn_gated`, GeLU): `g, u = split(proj_up(x))`,
/// `y = proj_down(GeLU(g) ⊙ u)` with the exact erf GeLU.
#[derive(Debug, Clone)]
pub struct GatedFeedForward {
    proj_up: Linear,
    proj_down: Linear,
}

impl GatedFeedForward {
    /// `proj_up` small_init(E), `proj_down` wang_init(E, num_blocks).
    pub fn new(
        embedding_dim: usize,
        ffn_dim: usize,
        num_blocks: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            proj_up: Linear::new(
                embedding_dim,
                2 * ffn_dim,
                small_init(embedding_dim),
                vb.pp("proj_up"),
            )?,
            proj_down: Linear::new(
                ffn_dim,
                embedding_dim,
                wang_init(embedding_dim, num_blocks),
                vb.pp("proj_down"),
            )?,
        })
    }
}

impl Module for GatedFeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_down
            .forward(&gate::gelu_gated(&self.proj_up.forward(x)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use std::collections::HashMap;

    fn from_map(pairs: &[(&str, Tensor)]) -> VarBuilder<'static> {
        let map: HashMap<String, Tensor> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
    }

    #[test]
    fn causal_conv_matches_definition_and_state_continues() -> Result<()> {
        let dev = Device::Cpu;
        let (c, k) = (3, 4);
        let weight = Tensor::randn(0f32, 1.0, (c, 1, k), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, c, &dev)?;
        let conv = CausalConv1d::new(
            c,
            k,
            from_map(&[("conv.weight", weight.clone()), ("conv.bias", bias.clone())]),
        )?;
        let x = Tensor::randn(0f32, 1.0, (2, 7, c), &dev)?;
        let (y, _) = conv.forward_with_state(&x, None)?;
        let (xv, wv, bv, yv) = (
            x.to_vec3::<f32>()?,
            weight.to_vec3::<f32>()?,
            bias.to_vec1::<f32>()?,
            y.to_vec3::<f32>()?,
        );
        for (b, (xs, ys)) in xv.iter().zip(&yv).enumerate() {
            for (t, y_row) in ys.iter().enumerate() {
                for ch in 0..c {
                    let mut want = bv[ch];
                    for (s, w) in wv[ch][0].iter().enumerate() {
                        if let Some(src) = (t + s + 1).checked_sub(k) {
                            want += w * xs[src][ch];
                        }
                    }
                    assert!(
                        (want - y_row[ch]).abs() < 1e-5,
                        "b{b} t{t} c{ch}: {want} vs {}",
                        y_row[ch]
                    );
                }
            }
        }
        // Two halves with the carried state equal the whole sequence, including 1-step pieces.
        let (y1, s1) = conv.forward_with_state(&x.narrow(1, 0, 2)?, None)?;
        let (y2, s2) = conv.forward_with_state(&x.narrow(1, 2, 1)?, Some(&s1))?;
        let (y3, _) = conv.forward_with_state(&x.narrow(1, 3, 4)?, Some(&s2))?;
        let joined = Tensor::cat(&[y1, y2, y3], 1)?;
        let diff = (joined - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "carried-state conv differs by {diff}");
        Ok(())
    }

    #[test]
    fn headwise_linear_is_block_diagonal() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 2.0 * 3.0 * 3.0, &dev)?.reshape((2, 3, 3))?;
        let lin =
            LinearHeadwiseExpand::new(6, 2, Init::Const(0.0), from_map(&[("weight", w.clone())]))?;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        let y = lin.forward(&x)?.to_vec2::<f32>()?;
        let (xv, wv) = (x.to_vec2::<f32>()?, w.to_vec3::<f32>()?);
        for (r, row) in y.iter().enumerate() {
            for blk in 0..2 {
                for o in 0..3 {
                    let want: f32 = (0..3).map(|i| wv[blk][o][i] * xv[r][blk * 3 + i]).sum();
                    assert!((want - row[blk * 3 + o]).abs() < 1e-4);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fresh_parameters_take_custom_initial_values() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let t = get_or_init_with(&vb, &[3], "b", |dev| Tensor::new(&[3f32, 4.5, 6.0], dev))?;
        assert_eq!(t.to_vec1::<f32>()?, vec![3.0, 4.5, 6.0]);
        let stored = varmap.data().lock().unwrap()["b"]
            .as_tensor()
            .to_vec1::<f32>()?;
        assert_eq!(stored, vec![3.0, 4.5, 6.0]);
        Ok(())
    }

    #[test]
    fn layer_norm_scale_is_one_plus_weight() -> Result<()> {
        let dev = Device::Cpu;
        let norm = LayerNorm::new(
            4,
            from_map(&[("weight", Tensor::new(&[0f32, 1.0, 0.0, -1.0], &dev)?)]),
        )?;
        let y = norm
            .forward(&Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &dev)?)?
            .to_vec2::<f32>()?;
        let sd = (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 / sd, 2.0 * -0.5 / sd, 0.5 / sd, 0.0];
        for (a, b) in y[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-5);
        }
        Ok(())
    }
}
