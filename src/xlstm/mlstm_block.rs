//! The mLSTM block with pre up-projection (XLSTM.md §4), official parameter names
//! (`xlstm_norm`, `xlstm.proj_up`, `xlstm.conv1d.conv`, `xlstm.{q,k,v}_proj`,
//! `xlstm.mlstm_cell.{igate,fgate,outnorm}`, `xlstm.learnable_skip`, `xlstm.proj_down`):
//!
//! ```text
//! x_m, z = split(proj_up(LN(x)));  x_c = SiLU(conv(x_m))
//! q, k = Q(x_c), K(x_c);  v = V(x_m);  ĩ, f̃ = igate/fgate(concat(q, k, v))
//! h = (GroupNorm(mLSTM(q, k, v, ĩ, f̃)) + skip ⊙ x_c) ⊙ SiLU(z)
//! out = x + proj_down(h)
//! ```

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::config::{MlstmKernel, XlstmConfig};
use super::kernels::mlstm::{self, MlstmState};
use super::kernels::{gate, pack};
use super::layers::{
    CausalConv1d, LayerNorm, Linear, LinearHeadwiseExpand, MultiHeadLayerNorm, get_or_init_with,
    linspace, matmul_transposed, small_init, wang_init,
};

/// Chunk size of `forward_with_state` when the configured kernel is the parallel form.
const STATE_CHUNK_SIZE: usize = 64;

/// Carried state of one mLSTM block: the conv's last K inputs `[B, K, D]` and the cell state.
#[derive(Debug, Clone)]
pub struct MlstmBlockState {
    pub conv: Tensor,
    pub cell: MlstmState,
}

/// Everything computed from the block input before the cell runs.
struct CellInputs {
    /// SiLU(conv(x_m)) `[B, S, D]`, reused by the skip connection.
    x_conv: Tensor,
    /// The output-gate branch `[B, S, D]`.
    z: Tensor,
    /// q, k, v side by side `[B, NH, S, 3·DH]` (the kernels' packed layout).
    qkv: Tensor,
    /// Gate pre-activations `[B, NH, S, 2]` (igate, fgate).
    gates: Tensor,
    /// The conv input `[B, S, D]` (for the conv state after it).
    x_m: Tensor,
}

#[derive(Debug, Clone)]
pub struct MlstmBlock {
    norm: LayerNorm,
    proj_up: Linear,
    conv: CausalConv1d,
    q_proj: LinearHeadwiseExpand,
    k_proj: LinearHeadwiseExpand,
    v_proj: LinearHeadwiseExpand,
    /// `igate.weight` `[NH, 3D]`, `igate.bias` `[NH]`, and the same for fgate.
    igate_weight: Tensor,
    igate_bias: Tensor,
    fgate_weight: Tensor,
    fgate_bias: Tensor,
    outnorm: MultiHeadLayerNorm,
    learnable_skip: Tensor,
    proj_down: Linear,
    inner_dim: usize,
    num_heads: usize,
    kernel: MlstmKernel,
    dropout: f64,
}

impl MlstmBlock {
    /// `vb` is the block's prefix (`blocks.<idx>`).
    pub fn new(cfg: &XlstmConfig, vb: VarBuilder) -> Result<Self> {
        let e = cfg.embedding_dim;
        let d = cfg.mlstm_inner_dim();
        let nh = cfg.mlstm.num_heads;
        let layer = vb.pp("xlstm");
        let qkv_blocks = d / cfg.mlstm.qkv_proj_blocksize;
        let cell = layer.pp("mlstm_cell");
        let gate = |name: &str| {
            cell.pp(name)
                .get_with_hints((nh, 3 * d), "weight", Init::Const(0.0))
        };
        Ok(Self {
            norm: LayerNorm::new(e, vb.pp("xlstm_norm"))?,
            proj_up: Linear::new(e, 2 * d, small_init(e), layer.pp("proj_up"))?,
            conv: CausalConv1d::new(d, cfg.mlstm.conv_kernel_size, layer.pp("conv1d"))?,
            q_proj: LinearHeadwiseExpand::new(d, qkv_blocks, small_init(e), layer.pp("q_proj"))?,
            k_proj: LinearHeadwiseExpand::new(d, qkv_blocks, small_init(e), layer.pp("k_proj"))?,
            v_proj: LinearHeadwiseExpand::new(d, qkv_blocks, small_init(e), layer.pp("v_proj"))?,
            igate_weight: gate("igate")?,
            igate_bias: cell.pp("igate").get_with_hints(
                nh,
                "bias",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.1,
                },
            )?,
            fgate_weight: gate("fgate")?,
            // One forget bias per head spread over [3, 6]: heads start with different memory spans.
            fgate_bias: get_or_init_with(&cell.pp("fgate"), &[nh], "bias", |dev| {
                linspace(3.0, 6.0, nh, dev)
            })?,
            outnorm: MultiHeadLayerNorm::new(nh, d / nh, cell.pp("outnorm"))?,
            learnable_skip: layer.get_with_hints(d, "learnable_skip", Init::Const(1.0))?,
            proj_down: Linear::new(d, e, wang_init(e, cfg.num_blocks), layer.pp("proj_down"))?,
            inner_dim: d,
            num_heads: nh,
            kernel: cfg.mlstm.kernel,
            dropout: cfg.dropout,
        })
    }

    /// `x` `[B, S, E]` → `[B, S, E]` with the configured kernel, from the zero state.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let inputs = self.cell_inputs(x, None)?;
        let (qkv, gates) = (&inputs.qkv, &inputs.gates);
        let h = match self.kernel {
            MlstmKernel::Parallel => mlstm::parallel_packed(qkv, gates)?,
            MlstmKernel::Chunkwise { chunk_size } => {
                mlstm::chunkwise_packed(qkv, gates, chunk_size, None)?.0
            }
        };
        self.output(x, &inputs, &h, train)
    }

    /// Continues from `state` over `x` `[B, S, E]` (chunkwise kernel); returns the output and
    /// the state after the last token. Inference only (no dropout).
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: &MlstmBlockState,
    ) -> Result<(Tensor, MlstmBlockState)> {
        let inputs = self.cell_inputs(x, Some(&state.conv))?;
        let chunk_size = match self.kernel {
            MlstmKernel::Chunkwise { chunk_size } => chunk_size,
            MlstmKernel::Parallel => STATE_CHUNK_SIZE,
        };
        let (h, cell) =
            mlstm::chunkwise_packed(&inputs.qkv, &inputs.gates, chunk_size, Some(&state.cell))?;
        let out = self.output(x, &inputs, &h, false)?;
        Ok((
            out,
            MlstmBlockState {
                conv: self.conv.next_state(&inputs.x_m, Some(&state.conv))?,
                cell,
            },
        ))
    }

    /// One token `x_t` `[B, 1, E]` with the recurrent kernel.
    pub fn step(&self, x_t: &Tensor, state: &MlstmBlockState) -> Result<(Tensor, MlstmBlockState)> {
        let inputs = self.cell_inputs(x_t, Some(&state.conv))?;
        let dh = self.inner_dim / self.num_heads;
        // [B, NH, 1, W] → the parts [B, NH, w] of the one token.
        let part = |t: &Tensor, i: usize, w: usize| t.narrow(3, i * w, w)?.squeeze(2);
        let (qkv, gates) = (&inputs.qkv, &inputs.gates);
        let (h, cell) = mlstm::step(
            &part(qkv, 0, dh)?,
            &part(qkv, 1, dh)?,
            &part(qkv, 2, dh)?,
            &part(gates, 0, 1)?.squeeze(2)?,
            &part(gates, 1, 1)?.squeeze(2)?,
            &state.cell,
        )?;
        let out = self.output(x_t, &inputs, &h.unsqueeze(2)?, false)?;
        Ok((
            out,
            MlstmBlockState {
                conv: self.conv.next_state(&inputs.x_m, Some(&state.conv))?,
                cell,
            },
        ))
    }

    fn cell_inputs(&self, x: &Tensor, conv_state: Option<&Tensor>) -> Result<CellInputs> {
        let (b, s, _) = x.dims3()?;
        let (d, nh) = (self.inner_dim, self.num_heads);
        let normed = self.norm.forward(x)?;
        let x_m = self.proj_up.forward_outputs(&normed, 0, d)?;
        let z = self.proj_up.forward_outputs(&normed, d, d)?;
        let x_conv = self.conv.forward_silu(&x_m, conv_state)?;
        // q, k (from the conv) and v (from x_m) side by side, [B, S, 3D]: the concatenation
        // both gates read, written in one pass.
        let q_k_v = LinearHeadwiseExpand::forward_side_by_side(
            &[&self.q_proj, &self.k_proj, &self.v_proj],
            [&x_conv, &x_m],
            2,
        )?;
        let gate_w = Tensor::cat(&[&self.igate_weight, &self.fgate_weight], 0)?;
        let gate_b = Tensor::cat(&[&self.igate_bias, &self.fgate_bias], 0)?;
        let gates = matmul_transposed(&q_k_v, &gate_w)?
            .broadcast_add(&gate_b)?
            .reshape((b, s, 2, nh))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let qkv = pack::pack_heads_side_by_side(&q_k_v, nh)?;
        Ok(CellInputs {
            qkv,
            gates,
            x_conv,
            z,
            x_m,
        })
    }

    /// Cell output `h` `[B, NH, S, DH]` → block output `x + proj_down(...)`.
    fn output(&self, x: &Tensor, inputs: &CellInputs, h: &Tensor, train: bool) -> Result<Tensor> {
        let h = gate::silu_gated_sum(
            &self.outnorm.forward_heads(h)?,
            &gate::scale_features(&inputs.x_conv, &self.learnable_skip)?,
            &inputs.z,
        )?;
        let y = self.proj_down.forward(&h)?;
        let y = if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(&y, self.dropout as f32)?
        } else {
            y
        };
        x + y
    }
}
