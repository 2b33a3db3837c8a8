//! sLSTM recurrent scan (XLSTM.md §2): exponential input gate, sigmoid forget gate, normaliser
//! state and stabiliser, with block-diagonal (per-head) recurrent weights.
//!
//! Layouts (H = NH·DH, head-major inside H: unit `head·DH + d`):
//! * `x` gate pre-activations from the input side `[B, S, 4H]`, `x[b, t, g·H + head·DH + d]`,
//!   gates in the order i, f, z, o;
//! * `r` recurrent weights `[NH, DH_in, 4, DH_out]`: `rec_g[b, head, j] = Σ_k h[b, head, k]·r[head, k, g, j]`;
//! * `bias` `[NH, 4, DH]`;
//! * states `[B, H]` each (h, c, n, m), stacked `[4, B, H]`.
//!
//! The "empty state" rule (`m_t = ĩ` when `n_{t-1} = 0`) is decided per element, like the
//! official CUDA kernel. The official vanilla backend decides it once for the whole `[B, H]`
//! tensor (`torch.all(n == 0)`); both agree for the all-zero initial state and for any initial
//! state whose `n` has no zeros, which covers every state the recurrence itself produces
//! (`n_t ≥ 1` after the first step).
//!
//! [`scan`] dispatches by device: CPU runs the fused custom op (`fused_cpu`, f32 only, hand-written
//! backward that treats the stabiliser m as a constant, which is exact for losses on h), a CUDA
//! device (feature `cuda`) the same scan as one kernel launch per direction (`fused_cuda`); any
//! other device runs [`reference::scan`].

mod fused_cpu;
#[cfg(feature = "cuda")]
mod fused_cuda;
pub mod reference;
mod rows;
mod simd;

use candle_core::{DType, Device, Error, Result, Tensor};

/// Number of gates (i, f, z, o).
pub const NUM_GATES: usize = 4;

/// Rows of a fused scan's packed output per (batch, head) after the S rows of h: the final
/// h, c, n, m.
const STATE_ROWS: usize = 4;

/// Recurrent state of the sLSTM cell; each tensor is `[B, H]` with H = NH·DH (head-major).
#[derive(Debug, Clone)]
pub struct SlstmState {
    pub h: Tensor,
    pub c: Tensor,
    pub n: Tensor,
    pub m: Tensor,
}

impl SlstmState {
    /// The all-zero state the official cell starts from.
    pub fn zeros(batch: usize, hidden: usize, device: &Device) -> Result<Self> {
        let zeros = Tensor::zeros((batch, hidden), DType::F32, device)?;
        Ok(Self {
            h: zeros.clone(),
            c: zeros.clone(),
            n: zeros.clone(),
            m: zeros,
        })
    }

    /// `[4, B, H]` in the order h, c, n, m (the official state layout).
    pub fn stacked(&self) -> Result<Tensor> {
        Tensor::stack(&[&self.h, &self.c, &self.n, &self.m], 0)
    }

    /// Inverse of [`SlstmState::stacked`]: `t` must be `[4, B, H]`.
    pub fn from_stacked(t: &Tensor) -> Result<Self> {
        match t.dims() {
            [4, _, _] => Ok(Self {
                h: t.get(0)?,
                c: t.get(1)?,
                n: t.get(2)?,
                m: t.get(3)?,
            }),
            dims => Err(Error::Msg(format!(
                "slstm state: stacked state has shape {dims:?}, expected [4, B, H] (h, c, n, m)"
            ))),
        }
    }
}

/// Runs the sLSTM over a whole sequence.
///
/// `x` `[B, S, 4H]` gate pre-activations (i, f, z, o, gate-major), `r` `[NH, DH, 4, DH]`,
/// `bias` `[NH, 4, DH]`, `initial` `None` for the all-zero state. Returns h for every step
/// `[B, NH, S, DH]` and the final state. Inputs must be f32 on the CPU; on a CUDA device x, r
/// and bias may be bf16 (computed in f32, h returned in bf16) with f32 states.
pub fn scan(
    x: &Tensor,
    r: &Tensor,
    bias: &Tensor,
    initial: Option<&SlstmState>,
) -> Result<(Tensor, SlstmState)> {
    match x.device() {
        Device::Cpu => fused_cpu::scan(x, r, bias, initial),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => fused_cuda::scan(x, r, bias, initial),
        _ => reference::scan(x, r, bias, initial),
    }
}

/// Sizes of one scan call, validated from the argument shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanDims {
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl ScanDims {
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// (dx, d r_aug, d initial state) from a fused backward pass's flat output
    /// `[dx (B·S·4H) | d initial state as [B, 4, H] | d r_aug × weight_rows]`; several copies of
    /// the weight gradient (one per batch row) are summed here, in a fixed order.
    fn unpack_grads(
        &self,
        grads: &Tensor,
        x: &Tensor,
        r_aug: &Tensor,
        weight_rows: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let hidden = self.hidden();
        let dx_len = self.batch * self.seq_len * NUM_GATES * hidden;
        let dinit_len = 4 * self.batch * hidden;
        let dx = grads.narrow(0, 0, dx_len)?.reshape(x.shape())?;
        let dinit = grads
            .narrow(0, dx_len, dinit_len)?
            .reshape((self.batch, 4, hidden))?
            .transpose(0, 1)?;
        let r_len = r_aug.elem_count();
        let dr = grads
            .narrow(0, dx_len + dinit_len, weight_rows * r_len)?
            .reshape((weight_rows, r_len))?
            .sum(0)?
            .reshape(r_aug.shape())?;
        Ok((dx, dr, dinit))
    }

    /// h `[B, NH, S, DH]` and the final state from a fused scan's output `[B, NH, S + 4, DH]`.
    fn unpack_output(&self, packed: &Tensor) -> Result<(Tensor, SlstmState)> {
        let h = packed.narrow(2, 0, self.seq_len)?;
        let final_state = packed
            .narrow(2, self.seq_len, STATE_ROWS)?
            .permute((2, 0, 1, 3))?
            .reshape((STATE_ROWS, self.batch, self.hidden()))?;
        Ok((h, SlstmState::from_stacked(&final_state)?))
    }

    /// Checks shapes, dtypes and devices of the scan arguments (`what` names the caller in errors).
    pub fn check(
        what: &str,
        x: &Tensor,
        r: &Tensor,
        bias: &Tensor,
        initial: Option<&SlstmState>,
    ) -> Result<Self> {
        let (heads, head_dim) = match r.dims() {
            &[nh, dh_in, NUM_GATES, dh_out] if dh_in == dh_out && nh > 0 && dh_in > 0 => {
                (nh, dh_in)
            }
            dims => {
                return Err(Error::Msg(format!(
                    "{what}: r has shape {dims:?}, expected [NH, DH, 4, DH] with NH, DH > 0"
                )));
            }
        };
        let hidden = heads * head_dim;
        let (batch, seq_len) = match x.dims() {
            &[b, s, g] if g == NUM_GATES * hidden && b > 0 && s > 0 => (b, s),
            dims => {
                return Err(Error::Msg(format!(
                    "{what}: x has shape {dims:?}, expected [B, S, 4·H] = [B, S, {}] with B, S > 0 \
                     (H = NH·DH from r)",
                    NUM_GATES * hidden
                )));
            }
        };
        if bias.dims() != [heads, NUM_GATES, head_dim] {
            return Err(Error::Msg(format!(
                "{what}: bias has shape {:?}, expected [NH, 4, DH] = [{heads}, 4, {head_dim}]",
                bias.dims()
            )));
        }
        let mut named = vec![("x", x), ("r", r), ("bias", bias)];
        if let Some(state) = initial {
            for (name, t) in [
                ("initial.h", &state.h),
                ("initial.c", &state.c),
                ("initial.n", &state.n),
                ("initial.m", &state.m),
            ] {
                if t.dims() != [batch, hidden] {
                    return Err(Error::Msg(format!(
                        "{what}: {name} has shape {:?}, expected [B, H] = [{batch}, {hidden}]",
                        t.dims()
                    )));
                }
                named.push((name, t));
            }
        }
        // bf16 inputs (on a CUDA device) come with f32 states: the kernels keep states in f32.
        let state_dtype = match x.dtype() {
            DType::BF16 => DType::F32,
            dtype => dtype,
        };
        for (name, t) in named {
            let (expected, why) = if name.starts_with("initial.") {
                (state_dtype, "the state dtype for x's dtype")
            } else {
                (x.dtype(), "the dtype of x")
            };
            if t.dtype() != expected {
                return Err(Error::Msg(format!(
                    "{what}: {name} has dtype {:?}, expected {expected:?} ({why})",
                    t.dtype(),
                )));
            }
            if !t.device().same_device(x.device()) {
                return Err(Error::Msg(format!(
                    "{what}: {name} is on {:?}, expected the device of x ({:?})",
                    t.device(),
                    x.device()
                )));
            }
        }
        Ok(Self {
            batch,
            seq_len,
            heads,
            head_dim,
        })
    }
}

/// The fused scans' inputs: x contiguous, the bias as an extra input row of the recurrent
/// weights `r_aug` `[NH, DH + 1, 4, DH]` (for a constant input 1, so that the ops need only
/// three inputs; autodiff through `cat` routes its gradient back), the initial state stacked
/// `[4, B, H]`.
struct ScanInputs {
    x: Tensor,
    r_aug: Tensor,
    init: Tensor,
}

impl ScanInputs {
    fn new(
        dims: ScanDims,
        x: &Tensor,
        r: &Tensor,
        bias: &Tensor,
        initial: Option<&SlstmState>,
    ) -> Result<Self> {
        Ok(Self {
            x: x.contiguous()?,
            r_aug: Tensor::cat(&[r, &bias.unsqueeze(1)?], 1)?.contiguous()?,
            init: match initial {
                Some(state) => state.stacked()?.contiguous()?,
                None => Tensor::zeros((4, dims.batch, dims.hidden()), x.dtype(), x.device())?,
            },
        })
    }
}

/// Official vanilla `_recurrent_kernel_` `[NH, 4·DH, DH]` (index `[head, g·DH + j, k]`) →
/// external `[NH, DH, 4, DH]` (index `[head, k, g, j]`).
pub fn recurrent_kernel_from_vanilla(t: &Tensor) -> Result<Tensor> {
    let (heads, rows, head_dim) = t.dims3().map_err(|_| {
        Error::Msg(format!(
            "recurrent_kernel_from_vanilla: tensor has shape {:?}, expected [NH, 4·DH, DH]",
            t.dims()
        ))
    })?;
    if rows != NUM_GATES * head_dim {
        return Err(Error::Msg(format!(
            "recurrent_kernel_from_vanilla: tensor has shape {:?}, expected [NH, 4·DH, DH] \
             (middle dim {rows} != 4·{head_dim})",
            t.dims()
        )));
    }
    t.reshape((heads, NUM_GATES, head_dim, head_dim))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// External `[NH, DH, 4, DH]` → official vanilla `_recurrent_kernel_` `[NH, 4·DH, DH]`.
pub fn recurrent_kernel_to_vanilla(t: &Tensor) -> Result<Tensor> {
    let (heads, head_dim) = match t.dims() {
        &[nh, dh_in, NUM_GATES, dh_out] if dh_in == dh_out => (nh, dh_in),
        dims => {
            return Err(Error::Msg(format!(
                "recurrent_kernel_to_vanilla: tensor has shape {dims:?}, expected [NH, DH, 4, DH]"
            )));
        }
    };
    t.permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((heads, NUM_GATES * head_dim, head_dim))
}

/// Official vanilla `_bias_` `[4·H]` (gate-major, index `g·H + head·DH + j`) → external
/// `[NH, 4, DH]`.
pub fn bias_from_vanilla(t: &Tensor, num_heads: usize) -> Result<Tensor> {
    let len = match t.dims() {
        &[len] if num_heads > 0 && len % (NUM_GATES * num_heads) == 0 && len > 0 => len,
        dims => {
            return Err(Error::Msg(format!(
                "bias_from_vanilla: tensor has shape {dims:?}, expected [4·H] with H divisible by \
                 num_heads = {num_heads}"
            )));
        }
    };
    let head_dim = len / (NUM_GATES * num_heads);
    t.reshape((NUM_GATES, num_heads, head_dim))?
        .transpose(0, 1)?
        .contiguous()
}

/// External `[NH, 4, DH]` → official vanilla `_bias_` `[4·H]` (gate-major).
pub fn bias_to_vanilla(t: &Tensor) -> Result<Tensor> {
    match t.dims() {
        &[_, NUM_GATES, _] => t.transpose(0, 1)?.contiguous()?.flatten_all(),
        dims => Err(Error::Msg(format!(
            "bias_to_vanilla: tensor has shape {dims:?}, expected [NH, 4, DH]"
        ))),
    }
}

/// The official default bias init `powerlaw_blockdependent` as `[NH, 4, DH]` f32: zero for the
/// i, z and o gates; for the forget gate, the same for every head,
/// `b_f[j] = 5 − 12·(j / (DH − 1))^(0.3 + 1.3·r)` with `r = block_idx / (num_blocks − 1)`
/// (0 for a single block). Long memory (b_f = 5) for unit 0 down to short memory (−7) for the
/// last unit; later blocks keep more units long-memory.
pub fn powerlaw_forget_bias(
    num_heads: usize,
    head_dim: usize,
    block_idx: usize,
    num_blocks: usize,
    device: &Device,
) -> Result<Tensor> {
    if num_heads == 0 || head_dim < 2 {
        return Err(Error::Msg(format!(
            "powerlaw_forget_bias: num_heads = {num_heads}, head_dim = {head_dim}; need \
             num_heads ≥ 1 and head_dim ≥ 2 (the power law spans the head's units)"
        )));
    }
    if block_idx >= num_blocks {
        return Err(Error::Msg(format!(
            "powerlaw_forget_bias: block_idx = {block_idx} is not below num_blocks = {num_blocks}"
        )));
    }
    let block_ratio = if num_blocks > 1 {
        block_idx as f64 / (num_blocks - 1) as f64
    } else {
        0.0
    };
    let exponent = 0.3 + 1.3 * block_ratio;
    let forget: Vec<f32> = (0..head_dim)
        .map(|j| (5.0 - 12.0 * (j as f64 / (head_dim - 1) as f64).powf(exponent)) as f32)
        .collect();
    let mut values = vec![0f32; num_heads * NUM_GATES * head_dim];
    for head in 0..num_heads {
        let start = (head * NUM_GATES + 1) * head_dim;
        values[start..start + head_dim].copy_from_slice(&forget);
    }
    Tensor::from_vec(values, (num_heads, NUM_GATES, head_dim), device)
}
