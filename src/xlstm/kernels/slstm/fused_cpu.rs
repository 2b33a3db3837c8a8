//! Fused CPU sLSTM scan: one custom op for the forward pass over the whole sequence and one
//! for its hand-written backward pass.
//!
//! The recurrence is block-diagonal per head, so every (batch row, head) pair is an independent
//! scan; the forward pass runs those pairs in parallel with rayon, each keeping its head's
//! `[DH + 1, 4, DH]` weights (recurrent rows plus the bias row) hot in cache. While gradients
//! are tracked it records, per step and unit, the values the backward pass needs (a "tape",
//! kept inside the op like torch's `ctx.save_for_backward`), so the backward pass evaluates no
//! transcendental function. The backward pass runs one task per batch row (its slice of the
//! input gradient is contiguous) and reduces the per-row weight gradients at the end.
//!
//! Gradients treat the stabiliser m as a constant (like the official CUDA kernel), which is
//! exact for losses on h: h does not depend on the stabiliser. The initial m₀ is an input and
//! does get its exact gradient (it sets the weight of the initial c₀, n₀ against new inputs).
//! Gradients reaching the final m are ignored; the final h, c, n pass theirs on.

use super::{NUM_GATES, ScanDims, SlstmState};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows of the packed output per (batch, head) after the S rows of h: final h, c, n, m.
const STATE_ROWS: usize = 4;

/// Per step and unit the tape holds these values (index into a `[TAPE_VALUES, DH]` block).
const TAPE_C: usize = 0;
const TAPE_N: usize = 1;
const TAPE_I: usize = 2;
const TAPE_F: usize = 3;
const TAPE_Z: usize = 4;
const TAPE_O: usize = 5;
/// σ(−f̃) = d logσ(f̃) / d f̃.
const TAPE_SIG_NEG_F: usize = 6;
const TAPE_VALUES: usize = 7;

pub(super) fn scan(
    x: &Tensor,
    r: &Tensor,
    bias: &Tensor,
    initial: Option<&SlstmState>,
) -> Result<(Tensor, SlstmState)> {
    let dims = ScanDims::check("slstm fused CPU scan", x, r, bias, initial)?;
    if x.dtype() != DType::F32 {
        return Err(Error::Msg(format!(
            "slstm fused CPU scan: inputs have dtype {:?}; this kernel computes in f32 only, \
             convert with to_dtype(DType::F32)",
            x.dtype()
        )));
    }
    let ScanDims {
        batch,
        seq_len,
        heads,
        head_dim,
    } = dims;
    let x = x.contiguous()?;
    // The bias becomes an extra input row of the recurrent weights (for a constant input 1),
    // so the op needs only three inputs; autodiff through `cat` routes its gradient back.
    let r_aug = Tensor::cat(&[r, &bias.unsqueeze(1)?], 1)?.contiguous()?;
    let init = match initial {
        Some(state) => state.stacked()?.contiguous()?,
        None => Tensor::zeros((4, batch, dims.hidden()), DType::F32, x.device())?,
    };
    let needs_tape = x.track_op() || r_aug.track_op() || init.track_op();
    let op = ScanForward {
        dims,
        tape: needs_tape.then(OnceLock::new),
    };
    let packed = x.apply_op3(&r_aug, &init, op)?; // [B, NH, S + 4, DH]
    let h = packed.narrow(2, 0, seq_len)?;
    let final_state = packed
        .narrow(2, seq_len, STATE_ROWS)?
        .permute((2, 0, 1, 3))?
        .reshape((STATE_ROWS, batch, heads * head_dim))?;
    Ok((h, SlstmState::from_stacked(&final_state)?))
}

/// The f32 contents of a contiguous CPU tensor argument.
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
    expected_len: usize,
) -> Result<&'a [f32]> {
    let all = match storage {
        CpuStorage::F32(values) => values.as_slice(),
        other => {
            return Err(Error::Msg(format!(
                "slstm fused CPU scan: {what} has dtype {:?}, expected f32",
                other.dtype()
            )));
        }
    };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        Error::Msg(format!(
            "slstm fused CPU scan: {what} is not contiguous (layout {layout:?})"
        ))
    })?;
    if end - start != expected_len {
        return Err(Error::Msg(format!(
            "slstm fused CPU scan: {what} has {} elements, expected {expected_len}",
            end - start
        )));
    }
    Ok(&all[start..end])
}

/// Forward op: inputs x `[B, S, 4H]`, r_aug `[NH, DH + 1, 4, DH]`, initial state `[4, B, H]`;
/// output `[B, NH, S + 4, DH]` (h for every step, then the final h, c, n, m).
struct ScanForward {
    dims: ScanDims,
    /// `Some` when gradients are tracked: filled by the forward pass, read by the backward pass;
    /// layout `[B, NH, S, TAPE_VALUES, DH]`.
    tape: Option<OnceLock<Vec<f32>>>,
}

impl CustomOp3 for ScanForward {
    fn name(&self) -> &'static str {
        "slstm-scan-fused-cpu"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        r_storage: &CpuStorage,
        r_layout: &Layout,
        init_storage: &CpuStorage,
        init_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ScanDims {
            batch,
            seq_len,
            heads,
            head_dim,
        } = self.dims;
        let hidden = self.dims.hidden();
        let x = contiguous_f32(
            x_storage,
            x_layout,
            "x",
            batch * seq_len * NUM_GATES * hidden,
        )?;
        let r_aug = contiguous_f32(
            r_storage,
            r_layout,
            "r_aug",
            heads * (head_dim + 1) * NUM_GATES * head_dim,
        )?;
        let init = contiguous_f32(
            init_storage,
            init_layout,
            "initial state",
            4 * batch * hidden,
        )?;

        let out_block = (seq_len + STATE_ROWS) * head_dim;
        let tape_block = seq_len * TAPE_VALUES * head_dim;
        let mut out = vec![0f32; batch * heads * out_block];
        let mut tape = match self.tape {
            Some(_) => vec![0f32; batch * heads * tape_block],
            None => Vec::new(),
        };
        let tape_blocks: Vec<Option<&mut [f32]>> = if tape.is_empty() {
            (0..batch * heads).map(|_| None).collect()
        } else {
            tape.chunks_mut(tape_block).map(Some).collect()
        };
        let r_block = (head_dim + 1) * NUM_GATES * head_dim;
        out.par_chunks_mut(out_block)
            .zip(tape_blocks.into_par_iter())
            .enumerate()
            .for_each(|(pair, (out, tape))| {
                let (b, head) = (pair / heads, pair % heads);
                forward_pair(
                    &self.dims,
                    b,
                    head,
                    x,
                    &r_aug[head * r_block..(head + 1) * r_block],
                    init,
                    out,
                    tape,
                );
            });
        if let Some(slot) = &self.tape {
            slot.set(tape).map_err(|_| {
                Error::Msg("slstm fused CPU scan: forward op ran twice on one tape".into())
            })?;
        }
        let shape = Shape::from((batch, heads, seq_len + STATE_ROWS, head_dim));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r_aug: &Tensor,
        init: &Tensor,
        _packed: &Tensor,
        grad_packed: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tape = self.tape.as_ref().and_then(OnceLock::get).ok_or_else(|| {
            Error::Msg(
                "slstm fused CPU scan: backward pass requested for a forward pass that ran \
                     without gradient tracking"
                    .into(),
            )
        })?;
        let ScanDims {
            batch,
            seq_len,
            heads,
            head_dim,
        } = self.dims;
        let hidden = self.dims.hidden();
        let grad_packed = grad_packed.contiguous()?;
        let grads = grad_packed.apply_op3_no_bwd(
            r_aug,
            init,
            &ScanBackward {
                dims: self.dims,
                tape,
            },
        )?;
        let dx_len = batch * seq_len * NUM_GATES * hidden;
        let dinit_len = 4 * batch * hidden;
        let dr_len = heads * (head_dim + 1) * NUM_GATES * head_dim;
        let dx = grads.narrow(0, 0, dx_len)?.reshape(x.shape())?;
        let dinit = grads
            .narrow(0, dx_len, dinit_len)?
            .reshape((batch, 4, hidden))?
            .transpose(0, 1)?;
        let dr = grads
            .narrow(0, dx_len + dinit_len, dr_len)?
            .reshape(r_aug.shape())?;
        Ok((Some(dx), Some(dr), Some(dinit)))
    }
}

/// logσ(v) and σ(−v), both finite for any finite v.
#[inline]
fn log_sigmoid_and_complement(v: f32) -> (f32, f32) {
    let e = (-v.abs()).exp();
    let log_sigmoid = v.min(0.0) - e.ln_1p();
    let sig_neg = if v >= 0.0 {
        e / (1.0 + e)
    } else {
        1.0 / (1.0 + e)
    };
    (log_sigmoid, sig_neg)
}

#[inline]
fn sigmoid(v: f32) -> f32 {
    let e = (-v.abs()).exp();
    if v >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// `acc += scale · row`.
#[inline]
fn axpy(acc: &mut [f32], scale: f32, row: &[f32]) {
    for (a, &r) in acc.iter_mut().zip(row) {
        *a += scale * r;
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&p, &q)| p * q).sum()
}

/// Scans one (batch row, head) pair; `out` is its `[S + 4, DH]` block, `tape` its
/// `[S, TAPE_VALUES, DH]` block when gradients are tracked.
#[allow(clippy::too_many_arguments)]
fn forward_pair(
    dims: &ScanDims,
    b: usize,
    head: usize,
    x: &[f32],
    r_head: &[f32],
    init: &[f32],
    out: &mut [f32],
    mut tape: Option<&mut [f32]>,
) {
    let ScanDims {
        batch,
        seq_len,
        head_dim: dh,
        ..
    } = *dims;
    let hidden = dims.hidden();
    let gates_width = NUM_GATES * dh;
    let state_at = |row: usize| {
        let start = (row * batch + b) * hidden + head * dh;
        init[start..start + dh].to_vec()
    };
    let (mut h, mut c, mut n, mut m) = (state_at(0), state_at(1), state_at(2), state_at(3));
    let bias_row = &r_head[dh * gates_width..(dh + 1) * gates_width];
    let mut pre = vec![0f32; gates_width];

    for t in 0..seq_len {
        pre.copy_from_slice(bias_row);
        let x_t = &x[(b * seq_len + t) * NUM_GATES * hidden..];
        for g in 0..NUM_GATES {
            let x_gate = &x_t[g * hidden + head * dh..g * hidden + (head + 1) * dh];
            for (p, &v) in pre[g * dh..(g + 1) * dh].iter_mut().zip(x_gate) {
                *p += v;
            }
        }
        for (k, &h_k) in h.iter().enumerate() {
            axpy(
                &mut pre,
                h_k,
                &r_head[k * gates_width..(k + 1) * gates_width],
            );
        }
        let mut tape_t = tape
            .as_deref_mut()
            .map(|tape| &mut tape[t * TAPE_VALUES * dh..(t + 1) * TAPE_VALUES * dh]);
        for j in 0..dh {
            let (i_pre, f_pre, z_pre, o_pre) =
                (pre[j], pre[dh + j], pre[2 * dh + j], pre[3 * dh + j]);
            let (log_f, sig_neg_f) = log_sigmoid_and_complement(f_pre);
            let log_f_plus_m = m[j] + log_f;
            // Per-element empty-state rule (see the module docs of `slstm`).
            let m_new = if n[j] == 0.0 {
                i_pre
            } else {
                i_pre.max(log_f_plus_m)
            };
            let i = (i_pre - m_new).exp().min(1.0);
            let f = (log_f_plus_m - m_new).exp().min(1.0);
            let z = z_pre.tanh();
            let o = sigmoid(o_pre);
            let c_new = f * c[j] + i * z;
            let n_new = f * n[j] + i;
            let h_new = o * c_new / n_new;
            out[t * dh + j] = h_new;
            if let Some(tape_t) = tape_t.as_deref_mut() {
                tape_t[TAPE_C * dh + j] = c_new;
                tape_t[TAPE_N * dh + j] = n_new;
                tape_t[TAPE_I * dh + j] = i;
                tape_t[TAPE_F * dh + j] = f;
                tape_t[TAPE_Z * dh + j] = z;
                tape_t[TAPE_O * dh + j] = o;
                tape_t[TAPE_SIG_NEG_F * dh + j] = sig_neg_f;
            }
            h[j] = h_new;
            c[j] = c_new;
            n[j] = n_new;
            m[j] = m_new;
        }
    }
    for (row, state) in [&h, &c, &n, &m].into_iter().enumerate() {
        let start = (seq_len + row) * dh;
        out[start..start + dh].copy_from_slice(state);
    }
}

/// Backward op: inputs grad of the packed output `[B, NH, S + 4, DH]`, r_aug, initial state;
/// output flat `[dx (B·S·4H) | d initial state as [B, 4, H] | d r_aug]`.
struct ScanBackward<'a> {
    dims: ScanDims,
    tape: &'a [f32],
}

impl CustomOp3 for ScanBackward<'_> {
    fn name(&self) -> &'static str {
        "slstm-scan-fused-cpu-backward"
    }

    fn cpu_fwd(
        &self,
        grad_storage: &CpuStorage,
        grad_layout: &Layout,
        r_storage: &CpuStorage,
        r_layout: &Layout,
        init_storage: &CpuStorage,
        init_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ScanDims {
            batch,
            seq_len,
            heads,
            head_dim,
        } = self.dims;
        let hidden = self.dims.hidden();
        let grad_out = contiguous_f32(
            grad_storage,
            grad_layout,
            "output gradient",
            batch * heads * (seq_len + STATE_ROWS) * head_dim,
        )?;
        let r_block = (head_dim + 1) * NUM_GATES * head_dim;
        let r_aug = contiguous_f32(r_storage, r_layout, "r_aug", heads * r_block)?;
        let init = contiguous_f32(
            init_storage,
            init_layout,
            "initial state",
            4 * batch * hidden,
        )?;

        let dx_row = seq_len * NUM_GATES * hidden;
        let dinit_row = 4 * hidden;
        let mut grads = vec![0f32; batch * (dx_row + dinit_row) + heads * r_block];
        let (dx, rest) = grads.split_at_mut(batch * dx_row);
        let (dinit, dr) = rest.split_at_mut(batch * dinit_row);
        let mut dr_per_row = vec![0f32; batch * heads * r_block];
        dx.par_chunks_mut(dx_row)
            .zip(dinit.par_chunks_mut(dinit_row))
            .zip(dr_per_row.par_chunks_mut(heads * r_block))
            .enumerate()
            .for_each(|(b, ((dx, dinit), dr))| {
                for head in 0..heads {
                    backward_pair(
                        &self.dims,
                        b,
                        head,
                        grad_out,
                        &r_aug[head * r_block..(head + 1) * r_block],
                        init,
                        self.tape,
                        dx,
                        dinit,
                        &mut dr[head * r_block..(head + 1) * r_block],
                    );
                }
            });
        for row in dr_per_row.chunks(heads * r_block) {
            for (total, &v) in dr.iter_mut().zip(row) {
                *total += v;
            }
        }
        let len = grads.len();
        Ok((CpuStorage::F32(grads), Shape::from(len)))
    }
}

/// Reverse-time scan of one (batch row, head) pair. Writes this head's slots of `dx` (the
/// `[S, 4H]` slice of row b) and `dinit` (`[4, H]` of row b), accumulates into `dr` (the head's
/// `[DH + 1, 4, DH]` block for row b).
#[allow(clippy::too_many_arguments)]
fn backward_pair(
    dims: &ScanDims,
    b: usize,
    head: usize,
    grad_out: &[f32],
    r_head: &[f32],
    init: &[f32],
    tape: &[f32],
    dx: &mut [f32],
    dinit: &mut [f32],
    dr: &mut [f32],
) {
    let ScanDims {
        batch,
        seq_len,
        heads,
        head_dim: dh,
    } = *dims;
    let hidden = dims.hidden();
    let gates_width = NUM_GATES * dh;
    let pair = b * heads + head;
    let grad_block =
        &grad_out[pair * (seq_len + STATE_ROWS) * dh..(pair + 1) * (seq_len + STATE_ROWS) * dh];
    let tape_block =
        &tape[pair * seq_len * TAPE_VALUES * dh..(pair + 1) * seq_len * TAPE_VALUES * dh];
    let init_at = |row: usize| {
        let start = (row * batch + b) * hidden + head * dh;
        &init[start..start + dh]
    };
    let final_grad =
        |row: usize| grad_block[(seq_len + row) * dh..(seq_len + row + 1) * dh].to_vec();
    // Gradients flowing into h_t (through the recurrence), c_t and n_t from later steps;
    // seeded by the gradient of the final state (its m row is ignored: m is a constant).
    let (mut dh_next, mut dc, mut dn) = (final_grad(0), final_grad(1), final_grad(2));
    let mut dm0 = vec![0f32; dh];
    let mut dp = vec![0f32; gates_width];
    let mut h_prev = vec![0f32; dh];

    for t in (0..seq_len).rev() {
        let tape_t = &tape_block[t * TAPE_VALUES * dh..(t + 1) * TAPE_VALUES * dh];
        let value = |slot: usize, j: usize| tape_t[slot * dh + j];
        let (c_prev, n_prev): (&[f32], &[f32]) = if t > 0 {
            let prev = &tape_block[(t - 1) * TAPE_VALUES * dh..t * TAPE_VALUES * dh];
            for j in 0..dh {
                // Same expression as the forward pass, so the same value.
                h_prev[j] = prev[TAPE_O * dh + j] * prev[TAPE_C * dh + j] / prev[TAPE_N * dh + j];
            }
            (
                &prev[TAPE_C * dh..(TAPE_C + 1) * dh],
                &prev[TAPE_N * dh..(TAPE_N + 1) * dh],
            )
        } else {
            h_prev.copy_from_slice(init_at(0));
            (init_at(1), init_at(2))
        };
        for j in 0..dh {
            let (c, n, i, f, z, o) = (
                value(TAPE_C, j),
                value(TAPE_N, j),
                value(TAPE_I, j),
                value(TAPE_F, j),
                value(TAPE_Z, j),
                value(TAPE_O, j),
            );
            let grad_h = grad_block[t * dh + j] + dh_next[j];
            let inv_n = 1.0 / n;
            let c_over_n = c * inv_n;
            let dc_t = dc[j] + grad_h * o * inv_n;
            let dn_t = dn[j] - grad_h * o * c_over_n * inv_n;
            let d_forget = dc_t * c_prev[j] + dn_t * n_prev[j];
            dp[j] = (dc_t * z + dn_t) * i;
            dp[dh + j] = d_forget * f * value(TAPE_SIG_NEG_F, j);
            dp[2 * dh + j] = dc_t * i * (1.0 - z * z);
            dp[3 * dh + j] = grad_h * c_over_n * o * (1.0 - o);
            dc[j] = dc_t * f;
            dn[j] = dn_t * f;
            if t == 0 {
                // f₁ = exp(m₀ + logσ(f̃₁) − m₁) with m₁ held constant.
                dm0[j] = d_forget * f;
            }
        }
        let dx_t = &mut dx[t * NUM_GATES * hidden..(t + 1) * NUM_GATES * hidden];
        for g in 0..NUM_GATES {
            dx_t[g * hidden + head * dh..g * hidden + (head + 1) * dh]
                .copy_from_slice(&dp[g * dh..(g + 1) * dh]);
        }
        axpy(&mut dr[dh * gates_width..], 1.0, &dp);
        for k in 0..dh {
            let row = k * gates_width..(k + 1) * gates_width;
            axpy(&mut dr[row.clone()], h_prev[k], &dp);
            dh_next[k] = dot(&r_head[row], &dp);
        }
    }
    for (row, grad) in [&dh_next, &dc, &dn, &dm0].into_iter().enumerate() {
        dinit[row * hidden + head * dh..row * hidden + (head + 1) * dh].copy_from_slice(grad);
    }
}
