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

use super::super::cpu_data::output_buffer;
use super::rows::{HeadScan, RowGroups, RowScan};
use super::simd::{BackwardStep, Kernels, UnitState, prefetch_gate_slots};
use super::{NUM_GATES, STATE_ROWS, ScanDims, ScanInputs, SlstmState};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Per step and unit the tape holds these values (index into a `[TAPE_VALUES, DH]` block).
pub(super) const TAPE_C: usize = 0;
pub(super) const TAPE_N: usize = 1;
pub(super) const TAPE_I: usize = 2;
pub(super) const TAPE_F: usize = 3;
pub(super) const TAPE_Z: usize = 4;
pub(super) const TAPE_O: usize = 5;
/// σ(−f̃) = d logσ(f̃) / d f̃.
pub(super) const TAPE_SIG_NEG_F: usize = 6;
pub(super) const TAPE_VALUES: usize = 7;

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
    let ScanInputs { x, r_aug, init } = ScanInputs::new(dims, x, r, bias, initial)?;
    let needs_tape = x.track_op() || r_aug.track_op() || init.track_op();
    let op = ScanForward {
        dims,
        tape: needs_tape.then(OnceLock::new),
    };
    dims.unpack_output(&x.apply_op3(&r_aug, &init, op)?)
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
        let mut out = output_buffer(batch * heads * out_block);
        let mut tape = match self.tape {
            Some(_) => output_buffer(batch * heads * tape_block),
            None => Vec::new(),
        };
        let out_blocks: Vec<&mut [f32]> = out.chunks_mut(out_block).collect();
        let tape_blocks: Vec<Option<&mut [f32]>> = if tape.is_empty() {
            (0..batch * heads).map(|_| None).collect()
        } else {
            tape.chunks_mut(tape_block).map(Some).collect()
        };
        let inputs = ForwardInputs {
            dims: self.dims,
            x,
            r_aug,
            init,
        };
        match RowGroups::detect(head_dim) {
            Some(groups) => inputs.scan_row_groups(groups, out_blocks, tape_blocks),
            None => inputs.scan_pairs(Kernels::detect(), out_blocks, tape_blocks),
        }
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
        let grads = grad_packed.contiguous()?.apply_op3_no_bwd(
            r_aug,
            init,
            &ScanBackward {
                dims: self.dims,
                tape,
            },
        )?;
        let (dx, dr, dinit) = self.dims.unpack_grads(&grads, x, r_aug, 1)?;
        Ok((Some(dx), Some(dr), Some(dinit)))
    }
}

/// The forward op's inputs, checked; `x` `[B, S, 4H]`, `r_aug` `[NH, DH + 1, 4, DH]`, `init`
/// `[4, B, H]`.
struct ForwardInputs<'a> {
    dims: ScanDims,
    x: &'a [f32],
    r_aug: &'a [f32],
    init: &'a [f32],
}

impl ForwardInputs<'_> {
    fn r_head(&self, head: usize) -> &[f32] {
        let r_block = (self.dims.head_dim + 1) * NUM_GATES * self.dims.head_dim;
        &self.r_aug[head * r_block..(head + 1) * r_block]
    }

    /// Pair `b · NH + head`'s block of every output: `out_blocks` `[S + 4, DH]` each,
    /// `tape_blocks` `[S, TAPE_VALUES, DH]` each when gradients are tracked.
    fn scan_pairs(
        &self,
        kernels: Kernels,
        out_blocks: Vec<&mut [f32]>,
        tape_blocks: Vec<Option<&mut [f32]>>,
    ) {
        let heads = self.dims.heads;
        out_blocks
            .into_par_iter()
            .zip(tape_blocks.into_par_iter())
            .enumerate()
            .for_each(|(pair, (out, tape))| {
                self.scan_pair(kernels, pair / heads, pair % heads, out, tape);
            });
    }

    /// Scans one (batch row, head) pair; `out` is its `[S + 4, DH]` block, `tape` its
    /// `[S, TAPE_VALUES, DH]` block when gradients are tracked.
    fn scan_pair(
        &self,
        kernels: Kernels,
        b: usize,
        head: usize,
        out: &mut [f32],
        mut tape: Option<&mut [f32]>,
    ) {
        let ScanDims {
            seq_len,
            head_dim: dh,
            ..
        } = self.dims;
        let hidden = self.dims.hidden();
        let gates_width = NUM_GATES * dh;
        let [mut h, mut c, mut n, mut m] = self.initial_state(b, head).map(<[f32]>::to_vec);
        let (recurrent_rows, bias_row) = self.r_head(head).split_at(dh * gates_width);
        let mut pre = vec![0f32; gates_width];
        let (h_rows, state_rows) = out.split_at_mut(seq_len * dh);

        for (t, h_out) in h_rows.chunks_exact_mut(dh).enumerate() {
            let x_t = &self.x[(b * seq_len + t) * NUM_GATES * hidden..];
            for (g, (pre_gate, bias_gate)) in pre
                .chunks_exact_mut(dh)
                .zip(bias_row.chunks_exact(dh))
                .enumerate()
            {
                let x_gate = &x_t[g * hidden + head * dh..g * hidden + (head + 1) * dh];
                for ((p, bias), x) in pre_gate.iter_mut().zip(bias_gate).zip(x_gate) {
                    *p = bias + x;
                }
            }
            kernels.accumulate_rows(&mut pre, &h, recurrent_rows);
            let tape_t = tape
                .as_deref_mut()
                .map(|tape| &mut tape[t * TAPE_VALUES * dh..(t + 1) * TAPE_VALUES * dh]);
            let mut state = UnitState {
                h: &mut h,
                c: &mut c,
                n: &mut n,
                m: &mut m,
            };
            kernels.forward_step(&pre, &mut state, h_out, tape_t);
        }
        for (row, state) in state_rows.chunks_exact_mut(dh).zip([&h, &c, &n, &m]) {
            row.copy_from_slice(state);
        }
    }

    /// Pair (b, head)'s initial h, c, n, m.
    fn initial_state(&self, b: usize, head: usize) -> [&[f32]; 4] {
        let ScanDims {
            batch, head_dim, ..
        } = self.dims;
        let hidden = self.dims.hidden();
        std::array::from_fn(|row| {
            let start = (row * batch + b) * hidden + head * head_dim;
            &self.init[start..start + head_dim]
        })
    }

    /// As [`ForwardInputs::scan_pairs`], a task per head and group of batch rows
    /// (`groups` must fit DH on this CPU: [`RowGroups::detect`]).
    fn scan_row_groups(
        &self,
        groups: RowGroups,
        out_blocks: Vec<&mut [f32]>,
        tape_blocks: Vec<Option<&mut [f32]>>,
    ) {
        let ScanDims {
            batch,
            seq_len,
            heads,
            head_dim,
        } = self.dims;
        assert!(
            groups.fits(head_dim),
            "{groups:?} row groups do not fit heads of {head_dim} units"
        );
        let step_width = NUM_GATES * self.dims.hidden();
        let mut scans: Vec<Option<RowScan>> = out_blocks
            .into_iter()
            .zip(tape_blocks)
            .enumerate()
            .map(|(pair, (out, tape))| {
                let (b, head) = (pair / heads, pair % heads);
                Some(RowScan {
                    x: &self.x[b * seq_len * step_width..(b + 1) * seq_len * step_width],
                    initial: self.initial_state(b, head),
                    out,
                    tape,
                })
            })
            .collect();
        let rows_per_task = groups.rows_per_task(head_dim);
        let mut tasks = Vec::new();
        for head in 0..heads {
            for first in (0..batch).step_by(rows_per_task) {
                let group: Vec<RowScan> = (first..(first + rows_per_task).min(batch))
                    .filter_map(|b| scans[b * heads + head].take())
                    .collect();
                tasks.push((head, group));
            }
        }
        tasks.into_par_iter().for_each(|(head, mut group)| {
            let head = HeadScan {
                r_head: self.r_head(head),
                head_dim,
                head_offset: head * head_dim,
                seq_len,
                hidden: self.dims.hidden(),
            };
            // SAFETY: `groups` fits DH (asserted above) and was found on this CPU; every slice
            // was cut to the lengths `RowGroups::scan` states.
            unsafe { groups.scan(&mut group, head) };
        });
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
        let kernels = Kernels::detect();
        dx.par_chunks_mut(dx_row)
            .zip(dinit.par_chunks_mut(dinit_row))
            .zip(dr_per_row.par_chunks_mut(heads * r_block))
            .enumerate()
            .for_each(|(b, ((dx, dinit), dr))| {
                for head in 0..heads {
                    backward_pair(
                        kernels,
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

/// Steps ahead (backwards in time) whose gradient slots the backward scan asks the cache for.
const BACKWARD_PREFETCH_STEPS: usize = 8;

/// Reverse-time scan of one (batch row, head) pair. Writes this head's slots of `dx` (the
/// `[S, 4H]` slice of row b) and `dinit` (`[4, H]` of row b), accumulates into `dr` (the head's
/// `[DH + 1, 4, DH]` block for row b).
#[allow(clippy::too_many_arguments)]
fn backward_pair(
    kernels: Kernels,
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
    let tape_step = TAPE_VALUES * dh;
    let tape_block = &tape[pair * seq_len * tape_step..(pair + 1) * seq_len * tape_step];
    let init_at = |row: usize| {
        let start = (row * batch + b) * hidden + head * dh;
        &init[start..start + dh]
    };
    let final_grad =
        |row: usize| grad_block[(seq_len + row) * dh..(seq_len + row + 1) * dh].to_vec();
    // Gradients reaching h_t through the recurrence, c_t and n_t from later steps; seeded by
    // the gradient of the final state (its m row is ignored: m is a constant).
    let (mut dh_next, mut dc, mut dn) = (final_grad(0), final_grad(1), final_grad(2));
    let mut dh_prev = vec![0f32; dh];
    let mut dm0 = vec![0f32; dh];
    let mut dp = vec![0f32; gates_width];
    let mut h_prev = vec![0f32; dh];
    // dR = Σ_t h_{t−1} ⊗ dp_t is off the recurrence's critical path: the scan keeps every
    // step's h_{t−1} (unit-major, `[DH, S]`) and dp_t (`[S, 4·DH]`), in the order it visits
    // the steps, and the sums follow the scan in register-blocked passes.
    let mut h_prev_by_unit = vec![0f32; dh * seq_len];
    let mut dp_by_step = vec![0f32; seq_len * gates_width];
    let recurrent_rows = &r_head[..dh * gates_width];

    for (visit, t) in (0..seq_len).rev().enumerate() {
        // dx's slots of a step lie as strided as x's (see `rows::prefetch_ahead`).
        if t >= BACKWARD_PREFETCH_STEPS {
            prefetch_gate_slots(dx, t - BACKWARD_PREFETCH_STEPS, hidden, head * dh, dh);
        }
        let (c_prev, n_prev): (&[f32], &[f32]) = if t > 0 {
            let prev = &tape_block[(t - 1) * tape_step..t * tape_step];
            for (j, h) in h_prev.iter_mut().enumerate() {
                // Same expression as the forward pass, so the same value.
                *h = prev[TAPE_O * dh + j] * prev[TAPE_C * dh + j] / prev[TAPE_N * dh + j];
            }
            (
                &prev[TAPE_C * dh..(TAPE_C + 1) * dh],
                &prev[TAPE_N * dh..(TAPE_N + 1) * dh],
            )
        } else {
            h_prev.copy_from_slice(init_at(0));
            (init_at(1), init_at(2))
        };
        kernels.backward_step(&mut BackwardStep {
            tape: &tape_block[t * tape_step..(t + 1) * tape_step],
            c_prev,
            n_prev,
            grad_h: &grad_block[t * dh..(t + 1) * dh],
            grad_h_recurrent: &dh_next,
            dc: &mut dc,
            dn: &mut dn,
            dp: &mut dp,
            dm0: (t == 0).then_some(&mut dm0[..]),
        });
        let dx_t = &mut dx[t * NUM_GATES * hidden..(t + 1) * NUM_GATES * hidden];
        for (g, dp_gate) in dp.chunks_exact(dh).enumerate() {
            dx_t[g * hidden + head * dh..g * hidden + (head + 1) * dh].copy_from_slice(dp_gate);
        }
        kernels.row_dots(recurrent_rows, &dp, &mut dh_prev);
        std::mem::swap(&mut dh_next, &mut dh_prev);
        for (j, &h) in h_prev.iter().enumerate() {
            h_prev_by_unit[j * seq_len + visit] = h;
        }
        // Kept apart from the scan's own small buffers: writing dp and h_{t−1} straight into
        // these large ones, or gathering h_{t−1} in a pass after the scan, measured slower.
        dp_by_step[visit * gates_width..(visit + 1) * gates_width].copy_from_slice(&dp);
    }
    let (dr_recurrent, dr_bias) = dr.split_at_mut(dh * gates_width);
    for (dr_row, h_unit) in dr_recurrent
        .chunks_exact_mut(gates_width)
        .zip(h_prev_by_unit.chunks_exact(seq_len))
    {
        kernels.accumulate_rows(dr_row, h_unit, &dp_by_step);
    }
    kernels.accumulate_rows(dr_bias, &vec![1.0; seq_len], &dp_by_step);
    for (row, grad) in [&dh_next, &dc, &dn, &dm0].into_iter().enumerate() {
        dinit[row * hidden + head * dh..row * hidden + (head + 1) * dh].copy_from_slice(grad);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    //! The row groups against the pair-at-a-time AVX2 scan: the same operations in the same
    //! order, so the same bits.
    use super::super::simd::tests::values;
    use super::*;

    #[test]
    fn row_groups_give_the_bits_of_the_pair_scan() {
        if Kernels::detect() != Kernels::Avx2Fma {
            eprintln!("skipped: this CPU lacks AVX2+FMA");
            return;
        }
        let all_groups = RowGroups::available();
        assert!(
            !all_groups.is_empty(),
            "AVX2 row groups exist on an AVX2 CPU"
        );
        // Batch sizes that leave groups of 3, 2 and 1 rows; DH of one to eight vectors;
        // pre-activations up to ±60; an initial state with some empty (n = 0) units.
        for (seed, (batch, seq_len, heads, head_dim, scale)) in [
            (7, 13, 2, 16, 3.0),
            (6, 5, 3, 16, 60.0),
            (3, 9, 2, 32, 3.0),
            (2, 4, 1, 64, 60.0),
            (1, 1, 1, 16, 1.0),
            (5, 7, 2, 8, 3.0),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = seed as u64 * 100;
            let dims = ScanDims {
                batch,
                seq_len,
                heads,
                head_dim,
            };
            let hidden = dims.hidden();
            let x = values(seed + 1, batch * seq_len * NUM_GATES * hidden, scale);
            let r_aug = values(seed + 2, heads * (head_dim + 1) * NUM_GATES * head_dim, 0.5);
            let mut init = values(seed + 3, 4 * batch * hidden, 2.0);
            for (unit, n) in init[2 * batch * hidden..3 * batch * hidden]
                .iter_mut()
                .enumerate()
            {
                *n = if unit % 5 == 0 { 0.0 } else { n.abs() * 3.0 };
            }
            let inputs = ForwardInputs {
                dims,
                x: &x,
                r_aug: &r_aug,
                init: &init,
            };
            let out_block = (seq_len + STATE_ROWS) * head_dim;
            let tape_block = seq_len * TAPE_VALUES * head_dim;
            let run = |row_groups: Option<RowGroups>, with_tape: bool| {
                let mut out = vec![f32::NAN; batch * heads * out_block];
                let mut tape = vec![f32::NAN; batch * heads * tape_block];
                let tape_blocks = tape
                    .chunks_mut(tape_block)
                    .map(|block| with_tape.then_some(block))
                    .collect();
                let out_blocks = out.chunks_mut(out_block).collect();
                match row_groups {
                    Some(groups) => inputs.scan_row_groups(groups, out_blocks, tape_blocks),
                    None => inputs.scan_pairs(Kernels::Avx2Fma, out_blocks, tape_blocks),
                }
                (out, tape)
            };
            for with_tape in [false, true] {
                let (pairs_out, pairs_tape) = run(None, with_tape);
                assert!(
                    pairs_out.iter().all(|v| v.is_finite()),
                    "case {seed}: pair scan"
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let fitting: Vec<RowGroups> = all_groups
                    .iter()
                    .copied()
                    .filter(|g| g.fits(head_dim))
                    .collect();
                assert!(
                    !fitting.is_empty(),
                    "case {seed}: no row groups fit DH {head_dim}"
                );
                for groups in fitting {
                    let (rows_out, rows_tape) = run(Some(groups), with_tape);
                    let case = format!("case {seed}, {groups:?}");
                    assert_eq!(bits(&rows_out), bits(&pairs_out), "{case}: outputs");
                    assert_eq!(bits(&rows_tape), bits(&pairs_tape), "{case}: tapes");
                }
            }
        }
    }
}
