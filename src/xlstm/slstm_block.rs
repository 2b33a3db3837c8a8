//! The sLSTM block with post up-projection (XLSTM.md §5), official parameter names
//! (`xlstm_norm`, `xlstm.conv1d.conv`, `xlstm.{fgate,igate,zgate,ogate}`,
//! `xlstm.slstm_cell.{_recurrent_kernel_,_bias_}`, `xlstm.group_norm`, `ffn_norm`, `ffn`):
//!
//! ```text
//! x̂ = LN(x);  x_c = SiLU(conv(x̂))
//! ĩ, f̃ = fgate(x_c), igate(x_c);  z̃, õ = zgate(x̂), ogate(x̂)     (official names swapped, §0.7)
//! x = x + GroupNorm(sLSTM(ĩ, f̃, z̃, õ))
//! out = x + FFN(LN_ffn(x))
//! ```
//!
//! The cell parameters are kept in the official vanilla layout (so a state dict round-trips and
//! the optimiser updates the stored tensors) and converted to the kernel's layout per forward.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::config::{SlstmBiasInit, SlstmRecurrentInit, XlstmConfig};
use super::kernels::slstm::{
    self, NUM_GATES, SlstmState, bias_from_vanilla, bias_to_vanilla, powerlaw_forget_bias,
    recurrent_kernel_from_vanilla,
};
use super::layers::{
    CausalConv1d, GatedFeedForward, LayerNorm, LinearHeadwiseExpand, MultiHeadLayerNorm,
    get_or_init_with, linspace, small_init,
};

/// Carried state of one sLSTM block: the conv's last K inputs `[B, K, E]` (absent without a
/// conv) and the cell state.
#[derive(Debug, Clone)]
pub struct SlstmBlockState {
    pub conv: Option<Tensor>,
    pub cell: SlstmState,
}

#[derive(Debug, Clone)]
pub struct SlstmBlock {
    norm: LayerNorm,
    conv: Option<CausalConv1d>,
    /// Produces the input-gate pre-activation (official name `fgate`).
    input_gate: LinearHeadwiseExpand,
    /// Produces the forget-gate pre-activation (official name `igate`).
    forget_gate: LinearHeadwiseExpand,
    z_gate: LinearHeadwiseExpand,
    o_gate: LinearHeadwiseExpand,
    /// `_recurrent_kernel_` `[NH, 4·DH, DH]` (vanilla layout).
    recurrent_kernel: Tensor,
    /// `_bias_` `[4·H]` (vanilla, gate-major).
    bias: Tensor,
    group_norm: MultiHeadLayerNorm,
    ffn_norm: LayerNorm,
    ffn: GatedFeedForward,
    num_heads: usize,
    dropout: f64,
}

impl SlstmBlock {
    /// `vb` is the block's prefix (`blocks.<idx>`); `block_idx` sets the power-law forget bias.
    pub fn new(cfg: &XlstmConfig, block_idx: usize, vb: VarBuilder) -> Result<Self> {
        let e = cfg.embedding_dim;
        let nh = cfg.slstm.num_heads;
        let dh = e / nh;
        let layer = vb.pp("xlstm");
        let conv = match cfg.slstm.conv_kernel_size {
            0 => None,
            k => Some(CausalConv1d::new(e, k, layer.pp("conv1d"))?),
        };
        let gate = |name: &str| LinearHeadwiseExpand::new(e, nh, small_init(e), layer.pp(name));
        let cell = layer.pp("slstm_cell");
        let uniform = Init::Uniform {
            lo: -1.0 / (e as f64).sqrt(),
            up: 1.0 / (e as f64).sqrt(),
        };
        let recurrent_shape = (nh, NUM_GATES * dh, dh);
        let recurrent_kernel = match cfg.slstm.recurrent_init {
            SlstmRecurrentInit::Zeros => {
                cell.get_with_hints(recurrent_shape, "_recurrent_kernel_", Init::Const(0.0))?
            }
            SlstmRecurrentInit::Standard => {
                cell.get_with_hints(recurrent_shape, "_recurrent_kernel_", uniform)?
            }
        };
        let bias = match cfg.slstm.bias_init {
            SlstmBiasInit::Standard => cell.get_with_hints(NUM_GATES * e, "_bias_", uniform)?,
            SlstmBiasInit::Zeros => {
                cell.get_with_hints(NUM_GATES * e, "_bias_", Init::Const(0.0))?
            }
            SlstmBiasInit::PowerlawBlockdependent => {
                get_or_init_with(&cell, &[NUM_GATES * e], "_bias_", |dev| {
                    bias_to_vanilla(&powerlaw_forget_bias(
                        nh,
                        dh,
                        block_idx,
                        cfg.num_blocks,
                        dev,
                    )?)
                })?
            }
            SlstmBiasInit::SmallInit => {
                get_or_init_with(&cell, &[NUM_GATES * e], "_bias_", |dev| {
                    small_init_bias(nh, dh, dev)
                })?
            }
        };
        Ok(Self {
            norm: LayerNorm::new(e, vb.pp("xlstm_norm"))?,
            conv,
            input_gate: gate("fgate")?,
            forget_gate: gate("igate")?,
            z_gate: gate("zgate")?,
            o_gate: gate("ogate")?,
            recurrent_kernel,
            bias,
            group_norm: MultiHeadLayerNorm::new(nh, dh, layer.pp("group_norm"))?,
            ffn_norm: LayerNorm::new(e, vb.pp("ffn_norm"))?,
            ffn: GatedFeedForward::new(e, cfg.ffn_dim(), cfg.num_blocks, vb.pp("ffn"))?,
            num_heads: nh,
            dropout: cfg.dropout,
        })
    }

    /// `x` `[B, S, E]` → `[B, S, E]` from the zero state.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.run(x, None, train)?.0)
    }

    /// Continues from `state` over `x` `[B, S, E]` (any S ≥ 1, so also one step); returns the
    /// output and the state after the last token. Inference only (no dropout).
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: &SlstmBlockState,
    ) -> Result<(Tensor, SlstmBlockState)> {
        self.run(x, Some(state), false)
    }

    fn run(
        &self,
        x: &Tensor,
        state: Option<&SlstmBlockState>,
        train: bool,
    ) -> Result<(Tensor, SlstmBlockState)> {
        let normed = self.norm.forward(x)?;
        let (x_conv, conv_state) = match &self.conv {
            Some(conv) => {
                let carried = state.and_then(|s| s.conv.as_ref());
                (
                    conv.forward_silu(&normed, carried)?,
                    Some(conv.next_state(&normed, carried)?),
                )
            }
            None => (normed.clone(), None),
        };
        // Gate-major [B, S, 4H] in the order i, f, z, o.
        let gates = LinearHeadwiseExpand::forward_side_by_side(
            &[
                &self.input_gate,
                &self.forget_gate,
                &self.z_gate,
                &self.o_gate,
            ],
            [&x_conv, &normed],
            2,
        )?;
        let r = recurrent_kernel_from_vanilla(&self.recurrent_kernel)?;
        let bias = bias_from_vanilla(&self.bias, self.num_heads)?;
        let (h, cell) = slstm::scan(&gates, &r, &bias, state.map(|s| &s.cell))?;
        let y = self.group_norm.forward_heads(&h)?;
        let x = (x + self.maybe_dropout(y, train)?)?;
        let ffn_out = self.ffn.forward(&self.ffn_norm.forward(&x)?)?;
        let out = (&x + self.maybe_dropout(ffn_out, train)?)?;
        Ok((
            out,
            SlstmBlockState {
                conv: conv_state,
                cell,
            },
        ))
    }

    fn maybe_dropout(&self, y: Tensor, train: bool) -> Result<Tensor> {
        if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(&y, self.dropout as f32)
        } else {
            Ok(y)
        }
    }
}

/// Official "small_init" sLSTM bias in the vanilla layout: forget bias linspace(3, 6, DH) in
/// every head, other gates 0.
fn small_init_bias(num_heads: usize, head_dim: usize, device: &Device) -> Result<Tensor> {
    let hidden = num_heads * head_dim;
    let forget = linspace(3.0, 6.0, head_dim, device)?.repeat(num_heads)?;
    let zeros = Tensor::zeros(hidden, forget.dtype(), device)?;
    Tensor::cat(&[&zeros, &forget, &zeros, &zeros], 0)
}
