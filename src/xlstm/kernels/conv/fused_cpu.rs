//! Fused CPU causal depthwise conv + SiLU: a candle custom op on (x, params, state) with a
//! hand-written backward pass, one rayon task per batch row.
//!
//! `params` `[K + 1, C]` holds the K taps of every channel then the bias, so that the op needs
//! at most three inputs; the state is an input only when the caller carries one. `x` is read in
//! place through its strides (the mLSTM block hands over a narrow of its up-projection), and
//! positions before the sequence start read the state's last K − 1 rows.
//!
//! Backward (p = the conv output before SiLU, recomputed rather than stored):
//! `dp = dy · σ(p)·(1 + p·(1 − σ(p)))`, `dx[t − K + 1 + s] += w_s ⊙ dp[t]`,
//! `dw_s += x[t − K + 1 + s] ⊙ dp[t]`, `dbias += dp[t]`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::super::cpu_data::{
    contiguous_data, cpu_storage, f32_data, output_buffer, sum_in_task_order,
};
use super::super::vmath;

const NAME: &str = "causal-conv-silu";

/// The `[B, S, C]` rows of x inside its storage (unit stride along C).
#[derive(Debug, Clone, Copy)]
struct Rows {
    batch: usize,
    seq_len: usize,
    channels: usize,
    offset: usize,
    batch_stride: usize,
    seq_stride: usize,
}

impl Rows {
    fn from_layout(layout: &Layout) -> Result<Self> {
        match (layout.dims(), layout.stride()) {
            (&[batch, seq_len, channels], &[batch_stride, seq_stride, c_stride])
                if c_stride == 1 || channels == 1 =>
            {
                Ok(Self {
                    batch,
                    seq_len,
                    channels,
                    offset: layout.start_offset(),
                    batch_stride,
                    seq_stride,
                })
            }
            _ => Err(Error::Msg(format!(
                "{NAME}: x has layout {layout:?}, expected [B, S, C] with unit stride along C"
            ))),
        }
    }

    #[inline]
    fn row<'a>(&self, data: &'a [f32], b: usize, t: usize) -> &'a [f32] {
        let start = self.offset + b * self.batch_stride + t * self.seq_stride;
        &data[start..start + self.channels]
    }
}

/// The input row at position `j` (relative to the sequence start) of batch row `b`: x for
/// `j ≥ 0`, else state row `K + j`, else zeros (no state).
#[inline(always)]
fn source<'a>(
    x: &'a [f32],
    rows: &Rows,
    state: Option<&'a [f32]>,
    zeros: &'a [f32],
    b: usize,
    j: isize,
) -> &'a [f32] {
    if j >= 0 {
        return rows.row(x, b, j as usize);
    }
    match state {
        Some(state) => {
            let c = rows.channels;
            let k = state.len() / (rows.batch * c);
            let r = (k as isize + j) as usize;
            &state[(b * k + r) * c..(b * k + r + 1) * c]
        }
        None => zeros,
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + vmath::exp(-x))
}

/// Pre-activation of output row t: bias + Σ_s tap_s ⊙ source(t − K + 1 + s).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pre_activation(
    x: &[f32],
    rows: &Rows,
    state: Option<&[f32]>,
    zeros: &[f32],
    params: &[f32],
    b: usize,
    t: usize,
    out: &mut [f32],
) {
    let c = rows.channels;
    let k = params.len() / c - 1;
    out.copy_from_slice(&params[k * c..]);
    for s in 0..k {
        let j = t as isize + s as isize - (k as isize - 1);
        let src = source(x, rows, state, zeros, b, j);
        for ((o, w), v) in out.iter_mut().zip(&params[s * c..(s + 1) * c]).zip(src) {
            *o += w * v;
        }
    }
}

struct ConvSiluOp;

impl ConvSiluOp {
    fn forward(
        x: &[f32],
        rows: Rows,
        params: &[f32],
        state: Option<&[f32]>,
    ) -> (CpuStorage, Shape) {
        let c = rows.channels;
        let zeros = vec![0f32; c];
        let mut out = output_buffer(rows.batch * rows.seq_len * c);
        out.par_chunks_mut(rows.seq_len * c)
            .enumerate()
            .for_each(|(b, out)| {
                vmath::with_wide_vectors(
                    #[inline(always)]
                    || {
                        for (t, y) in out.chunks_exact_mut(c).enumerate() {
                            pre_activation(x, &rows, state, &zeros, params, b, t, y);
                            for v in y.iter_mut() {
                                *v *= sigmoid(*v);
                            }
                        }
                    },
                )
            });
        (
            CpuStorage::F32(out),
            Shape::from((rows.batch, rows.seq_len, c)),
        )
    }

    /// (dx `[B, S, C]`, dparams `[K + 1, C]`, dstate `[B, K, C]` when a state was given).
    fn backward(
        x: &Tensor,
        params: &Tensor,
        state: Option<&Tensor>,
        grad_y: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (x_guard, x_layout) = x.storage_and_layout();
        let rows = Rows::from_layout(x_layout)?;
        let x_data = f32_data(NAME, "x", cpu_storage(NAME, "x", &x_guard)?)?;
        let params = params.contiguous()?;
        let (p_guard, p_layout) = params.storage_and_layout();
        let params_data = contiguous_data(
            NAME,
            "params",
            cpu_storage(NAME, "params", &p_guard)?,
            p_layout,
        )?;
        let state = state.map(|s| s.contiguous()).transpose()?;
        let state_guard = state.as_ref().map(|s| s.storage_and_layout());
        let state_data = match &state_guard {
            Some((guard, layout)) => Some(contiguous_data(
                NAME,
                "state",
                cpu_storage(NAME, "state", guard)?,
                layout,
            )?),
            None => None,
        };
        let grad_y = grad_y.contiguous()?;
        let (g_guard, g_layout) = grad_y.storage_and_layout();
        let grad_y = contiguous_data(
            NAME,
            "output gradient",
            cpu_storage(NAME, "output gradient", &g_guard)?,
            g_layout,
        )?;

        let (c, seq_len) = (rows.channels, rows.seq_len);
        let k = params_data.len() / c - 1;
        let zeros = vec![0f32; c];
        let mut grad_x = vec![0f32; rows.batch * seq_len * c];
        // Allocated without a state too (B·K·C floats) so every task has its slice.
        let mut grad_state = vec![0f32; rows.batch * k * c];
        let grad_params = grad_x
            .par_chunks_mut(seq_len * c)
            .zip(grad_state.par_chunks_mut(k * c))
            .enumerate()
            .map(|(b, (grad_x, grad_state))| {
                vmath::with_wide_vectors(
                    #[inline(always)]
                    || {
                        let (mut grad_params, mut row) =
                            (vec![0f32; (k + 1) * c], vec![0f32; 2 * c]);
                        let (pre, grad_pre) = row.split_at_mut(c);
                        for t in 0..seq_len {
                            pre_activation(
                                x_data,
                                &rows,
                                state_data,
                                &zeros,
                                params_data,
                                b,
                                t,
                                pre,
                            );
                            let dy = &grad_y[(b * seq_len + t) * c..(b * seq_len + t + 1) * c];
                            for ((g, p), d) in grad_pre.iter_mut().zip(pre.iter()).zip(dy) {
                                let sig = sigmoid(*p);
                                *g = d * sig * (1.0 + p * (1.0 - sig));
                            }
                            let (grad_taps, grad_bias) = grad_params.split_at_mut(k * c);
                            for (gb, g) in grad_bias.iter_mut().zip(grad_pre.iter()) {
                                *gb += g;
                            }
                            for s in 0..k {
                                let j = t as isize + s as isize - (k as isize - 1);
                                let src = source(x_data, &rows, state_data, &zeros, b, j);
                                let tap = &params_data[s * c..(s + 1) * c];
                                let grad_tap = &mut grad_taps[s * c..(s + 1) * c];
                                for ((gw, v), g) in
                                    grad_tap.iter_mut().zip(src).zip(grad_pre.iter())
                                {
                                    *gw += v * g;
                                }
                                let target = if j >= 0 {
                                    &mut grad_x[j as usize * c..(j as usize + 1) * c]
                                } else if state_data.is_some() {
                                    let r = (k as isize + j) as usize;
                                    &mut grad_state[r * c..(r + 1) * c]
                                } else {
                                    continue;
                                };
                                for ((gx, w), g) in target.iter_mut().zip(tap).zip(grad_pre.iter())
                                {
                                    *gx += w * g;
                                }
                            }
                        }
                        grad_params
                    },
                )
            })
            // One partial per batch row, summed in row order: deterministic whatever rayon's
            // split.
            .collect::<Vec<_>>();
        let grad_params = sum_in_task_order(grad_params, (k + 1) * c);
        let dev = Device::Cpu;
        let grad_x = Tensor::from_vec(grad_x, (rows.batch, seq_len, c), &dev)?;
        let grad_params = Tensor::from_vec(grad_params, (k + 1, c), &dev)?;
        let grad_state = state_data
            .is_some()
            .then(|| Tensor::from_vec(grad_state, (rows.batch, k, c), &dev))
            .transpose()?;
        Ok((grad_x, grad_params, grad_state))
    }
}

impl CustomOp2 for ConvSiluOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        params_storage: &CpuStorage,
        params_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = Rows::from_layout(x_layout)?;
        let x = f32_data(NAME, "x", x_storage)?;
        let params = contiguous_data(NAME, "params", params_storage, params_layout)?;
        Ok(Self::forward(x, rows, params, None))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_params, _) = Self::backward(x, params, None, grad_res)?;
        Ok((Some(grad_x), Some(grad_params)))
    }
}

impl CustomOp3 for ConvSiluOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        params_storage: &CpuStorage,
        params_layout: &Layout,
        state_storage: &CpuStorage,
        state_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = Rows::from_layout(x_layout)?;
        let x = f32_data(NAME, "x", x_storage)?;
        let params = contiguous_data(NAME, "params", params_storage, params_layout)?;
        let state = contiguous_data(NAME, "state", state_storage, state_layout)?;
        Ok(Self::forward(x, rows, params, Some(state)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        state: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_params, grad_state) = Self::backward(x, params, Some(state), grad_res)?;
        Ok((Some(grad_x), Some(grad_params), grad_state))
    }
}

/// Fused causal conv + SiLU; see [`super::causal_conv_silu`].
pub fn causal_conv_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    state: Option<&Tensor>,
) -> Result<Tensor> {
    let x = match Rows::from_layout(x.layout()) {
        Ok(_) => x.clone(),
        Err(_) => x.contiguous()?,
    };
    // [K + 1, C]: the taps as rows, then the bias (a few hundred floats).
    let params = Tensor::cat(&[&weight.t()?, &bias.unsqueeze(0)?], 0)?.contiguous()?;
    match state {
        Some(state) => x.apply_op3(&params, &state.contiguous()?, ConvSiluOp),
        None => x.apply_op2(&params, ConvSiluOp),
    }
}
