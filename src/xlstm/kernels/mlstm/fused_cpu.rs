//! Fused CPU kernels: one candle custom op per form, each with a hand-written
//! backward pass, parallelised over batch × heads with rayon.
//!
//! Packing (candle custom ops take at most three inputs and return one output):
//! * inputs: `qkv` = q, k, v concatenated on the last dim; `gates` = igate, fgate
//!   stacked on a new last dim; for the chunkwise form and the step the state
//!   record `[C (DH·DH) | n (DH) | m]` per head.
//! * outputs: one row per time step `[h (DH) | m_row | b_row]` (the row stabiliser and
//!   the signed normaliser, which the backward pass reuses); the chunkwise form
//!   appends the state record before every chunk and the final state record.
//!   The thin public wrappers split these with `narrow`, so candle's autodiff routes
//!   the gradients of h and of the final state back into one `bwd` call.
//!
//! The backward pass treats every stabiliser as a constant (see the parent module)
//! and recomputes the intra-chunk decay weights instead of storing them, so memory
//! stays O(S·DH + S/L·DH²) per head; the parallel form is the chunkwise kernel with a
//! single chunk and no carried state.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Error, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::{
    DENOMINATOR_EPS, MlstmState, check_chunk_size, check_sequence_inputs, check_state,
    check_step_inputs,
};

/// Values stored after h in every output row: the row stabiliser and the signed normaliser.
const ROW_STATS: usize = 2;

fn state_record_len(head_dim: usize) -> usize {
    head_dim * head_dim + head_dim + 1
}

fn log_sigmoid(x: f32) -> f32 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// d logσ(x) / dx = σ(−x).
fn log_sigmoid_derivative(x: f32) -> f32 {
    1.0 / (1.0 + x.exp())
}

/// Sizes of the per-head problem.
#[derive(Debug, Clone, Copy)]
struct HeadGeometry {
    seq_len: usize,
    head_dim: usize,
    /// Rows per chunk; the parallel form uses one chunk of `seq_len` rows.
    chunk_size: usize,
}

impl HeadGeometry {
    fn qkv_width(&self) -> usize {
        3 * self.head_dim
    }

    fn row_width(&self) -> usize {
        self.head_dim + ROW_STATS
    }

    fn rows_len(&self) -> usize {
        self.seq_len * self.row_width()
    }

    fn num_chunks(&self) -> usize {
        self.seq_len.div_ceil(self.chunk_size)
    }

    fn state_len(&self) -> usize {
        state_record_len(self.head_dim)
    }

    /// Packed chunkwise output per head: rows, then NC + 1 state records.
    fn chunkwise_output_len(&self) -> usize {
        self.rows_len() + (self.num_chunks() + 1) * self.state_len()
    }

    fn key_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// A state record `[C | n | m]` viewed as its parts.
#[derive(Clone, Copy)]
struct StateView<'a> {
    c: &'a [f32],
    n: &'a [f32],
    m: f32,
}

impl<'a> StateView<'a> {
    fn new(record: &'a [f32], head_dim: usize) -> Self {
        let (c, rest) = record.split_at(head_dim * head_dim);
        Self {
            c,
            n: &rest[..head_dim],
            m: rest[head_dim],
        }
    }
}

/// Vector primitives of the inner loops. Kernels are generic over this so that the
/// same code is compiled once portably and once with AVX2+FMA.
trait Lanes: Copy {
    /// `x · y` over the common length.
    fn dot(self, x: &[f32], y: &[f32]) -> f32;
    /// `y += alpha · x` over the common length.
    fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]);
}

#[derive(Clone, Copy)]
struct Portable;

impl Lanes for Portable {
    #[inline(always)]
    fn dot(self, x: &[f32], y: &[f32]) -> f32 {
        // Four partial sums break the add dependency chain.
        let mut acc = [0f32; 4];
        let mut xs = x.chunks_exact(4);
        let mut ys = y.chunks_exact(4);
        for (xc, yc) in (&mut xs).zip(&mut ys) {
            for j in 0..4 {
                acc[j] += xc[j] * yc[j];
            }
        }
        let tail: f32 = xs
            .remainder()
            .iter()
            .zip(ys.remainder())
            .map(|(a, b)| a * b)
            .sum();
        (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
    }

    #[inline(always)]
    fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * xi;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Lanes;

    /// Proof that the running CPU has AVX2 and FMA; only [`Avx2Fma::detect`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2Fma {
        _detected: (),
    }

    impl Avx2Fma {
        pub(super) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
                .then_some(Self { _detected: () })
        }
    }

    impl Lanes for Avx2Fma {
        #[inline(always)]
        fn dot(self, x: &[f32], y: &[f32]) -> f32 {
            // SAFETY: an `Avx2Fma` exists only if the CPU supports AVX2 and FMA.
            unsafe { dot(x, y) }
        }

        #[inline(always)]
        fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]) {
            // SAFETY: as in `dot`.
            unsafe { axpy(y, alpha, x) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn dot(x: &[f32], y: &[f32]) -> f32 {
        let len = x.len().min(y.len());
        let (xp, yp) = (x.as_ptr(), y.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY (all loads): i + 8 <= len or i + 16 <= len keeps every lane in bounds.
        while i + 16 <= len {
            unsafe {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(i + 8)),
                    _mm256_loadu_ps(yp.add(i + 8)),
                    acc1,
                );
            }
            i += 16;
        }
        if i + 8 <= len {
            unsafe {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i)), acc0);
            }
            i += 8;
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let pairs = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let pairs = _mm_add_ps(pairs, _mm_movehl_ps(pairs, pairs));
        let mut total = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
        while i < len {
            total += x[i] * y[i];
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let len = x.len().min(y.len());
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let alpha8 = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= len {
            // SAFETY: i + 8 <= len keeps every lane in bounds of both slices.
            unsafe {
                let updated = _mm256_fmadd_ps(
                    alpha8,
                    _mm256_loadu_ps(xp.add(i)),
                    _mm256_loadu_ps(yp.add(i)),
                );
                _mm256_storeu_ps(yp.add(i), updated);
            }
            i += 8;
        }
        while i < len {
            y[i] += alpha * x[i];
            i += 1;
        }
    }
}

/// Runs `$generic(lanes, args...)` with the fastest [`Lanes`] the CPU supports. The
/// AVX2 instance is a `#[target_feature]` function so the `#[inline(always)]` kernel
/// body and the intrinsics inline into it.
macro_rules! with_best_lanes {
    ($avx2_entry:ident, $generic:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(lanes) = avx2::Avx2Fma::detect() {
                // SAFETY: `detect` confirmed AVX2 and FMA.
                unsafe { $avx2_entry(lanes, $($arg),*) }
            } else {
                $generic(Portable, $($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $generic(Portable, $($arg),*)
        }
    }};
}

/// Per-head forward inputs and outputs.
struct HeadForward<'a> {
    /// `[S, 3·DH]` rows of q | k | v.
    qkv: &'a [f32],
    /// `[S, 2]` rows of igate | fgate pre-activations.
    gates: &'a [f32],
    /// Initial state record; None = parallel form (no state is carried).
    initial: Option<&'a [f32]>,
    /// `[S, DH + 2]` output rows.
    rows: &'a mut [f32],
    /// `NC + 1` state records (chunkwise form only; empty otherwise).
    states: &'a mut [f32],
}

/// Per-head backward inputs and outputs.
struct HeadBackward<'a> {
    qkv: &'a [f32],
    gates: &'a [f32],
    initial: Option<&'a [f32]>,
    /// Forward output rows and state records.
    rows: &'a [f32],
    states: &'a [f32],
    /// Gradient of the output rows (only the h part is read).
    grad_rows: &'a [f32],
    /// Gradient of the final state record (chunkwise form only).
    grad_final: Option<&'a [f32]>,
    grad_qkv: &'a mut [f32],
    grad_gates: &'a mut [f32],
    grad_initial: Option<&'a mut [f32]>,
}

/// Local cumulative log forget gate of a chunk: `cum[τ] = Σ_{s≤τ} logσ(f̃_s)`.
#[inline(always)]
fn chunk_log_forget_cumsum(gates: &[f32], cum: &mut [f32]) {
    let mut total = 0.0;
    for (c, g) in cum.iter_mut().zip(gates.chunks_exact(2)) {
        total += log_sigmoid(g[1]);
        *c = total;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_head_avx2(lanes: avx2::Avx2Fma, geometry: HeadGeometry, head: HeadForward<'_>) {
    forward_head(lanes, geometry, head)
}

#[inline(always)]
fn forward_head<L: Lanes>(lanes: L, geometry: HeadGeometry, head: HeadForward<'_>) {
    let HeadForward {
        qkv,
        gates,
        initial,
        rows,
        states,
    } = head;
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let row_width = geometry.row_width();
    let state_len = geometry.state_len();
    if let Some(initial) = initial {
        states[..state_len].copy_from_slice(initial);
    }
    let mut cum = vec![0f32; geometry.chunk_size];
    let mut log_weights = vec![0f32; geometry.chunk_size];
    for chunk in 0..geometry.num_chunks() {
        let start = chunk * geometry.chunk_size;
        let len = geometry.chunk_size.min(geometry.seq_len - start);
        let chunk_qkv = &qkv[start * qkv_width..(start + len) * qkv_width];
        let chunk_gates = &gates[start * 2..(start + len) * 2];
        let chunk_rows = &mut rows[start * row_width..(start + len) * row_width];
        let cum = &mut cum[..len];
        chunk_log_forget_cumsum(chunk_gates, cum);
        if initial.is_some() {
            let (before, after) = states.split_at_mut((chunk + 1) * state_len);
            let prev = StateView::new(&before[chunk * state_len..], d);
            chunk_rows_forward(
                lanes,
                geometry,
                chunk_qkv,
                chunk_gates,
                cum,
                Some(prev),
                chunk_rows,
                &mut log_weights,
            );
            chunk_state_forward(
                lanes,
                geometry,
                chunk_qkv,
                chunk_gates,
                cum,
                prev,
                &mut after[..state_len],
                &mut log_weights,
            );
        } else {
            chunk_rows_forward(
                lanes,
                geometry,
                chunk_qkv,
                chunk_gates,
                cum,
                None,
                chunk_rows,
                &mut log_weights,
            );
        }
    }
}

/// Output rows of one chunk from its own inputs and the state before it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_rows_forward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    gates: &[f32],
    cum: &[f32],
    prev: Option<StateView<'_>>,
    rows: &mut [f32],
    log_decay: &mut [f32],
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let key_scale = geometry.key_scale();
    for (tau, row) in rows.chunks_exact_mut(geometry.row_width()).enumerate() {
        let q = &qkv[tau * qkv_width..tau * qkv_width + d];
        let mut m_row = f32::NEG_INFINITY;
        for sigma in 0..=tau {
            let log_d = (cum[tau] - cum[sigma]) + gates[2 * sigma];
            log_decay[sigma] = log_d;
            m_row = m_row.max(log_d);
        }
        let log_inter = prev.map(|prev| cum[tau] + prev.m);
        if let Some(log_inter) = log_inter {
            m_row = m_row.max(log_inter);
        }
        let (h, stats) = row.split_at_mut(d);
        h.fill(0.0);
        let mut b = 0.0;
        for sigma in 0..=tau {
            let kv = &qkv[sigma * qkv_width + d..(sigma + 1) * qkv_width];
            let (k, v) = kv.split_at(d);
            let weight = lanes.dot(q, k) * key_scale * (log_decay[sigma] - m_row).exp();
            lanes.axpy(h, weight, v);
            b += weight;
        }
        if let (Some(prev), Some(log_inter)) = (prev, log_inter) {
            let inter_weight = (log_inter - m_row).exp();
            for (qa, c_row) in q.iter().zip(prev.c.chunks_exact(d)) {
                lanes.axpy(h, inter_weight * qa, c_row);
            }
            b += inter_weight * lanes.dot(prev.n, q);
        }
        let den = b.abs().max((-m_row).exp()) + DENOMINATOR_EPS;
        for x in h.iter_mut() {
            *x /= den;
        }
        stats[0] = m_row;
        stats[1] = b;
    }
}

/// The state after a chunk from the state before it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_state_forward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    gates: &[f32],
    cum: &[f32],
    prev: StateView<'_>,
    next: &mut [f32],
    log_input: &mut [f32],
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let key_scale = geometry.key_scale();
    let total = cum[cum.len() - 1];
    let mut m_next = total + prev.m;
    for (tau, log_in) in log_input[..cum.len()].iter_mut().enumerate() {
        *log_in = (total - cum[tau]) + gates[2 * tau];
        m_next = m_next.max(*log_in);
    }
    let carry = ((total + prev.m) - m_next).exp();
    let (c_next, rest) = next.split_at_mut(d * d);
    let (n_next, m_slot) = rest.split_at_mut(d);
    for (c, c_prev) in c_next.iter_mut().zip(prev.c) {
        *c = carry * c_prev;
    }
    for (n, n_prev) in n_next.iter_mut().zip(prev.n) {
        *n = carry * n_prev;
    }
    for (tau, row) in qkv.chunks_exact(qkv_width).enumerate() {
        let weight = (log_input[tau] - m_next).exp() * key_scale;
        let (k, v) = row[d..].split_at(d);
        for (ka, c_row) in k.iter().zip(c_next.chunks_exact_mut(d)) {
            lanes.axpy(c_row, weight * ka, v);
        }
        lanes.axpy(n_next, weight, k);
    }
    m_slot[0] = m_next;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_head_avx2(lanes: avx2::Avx2Fma, geometry: HeadGeometry, head: HeadBackward<'_>) {
    backward_head(lanes, geometry, head)
}

/// Scratch vectors of the backward pass of one head.
struct BackwardScratch {
    cum: Vec<f32>,
    log_weights: Vec<f32>,
    grad_cum: Vec<f32>,
    grad_num: Vec<f32>,
    grad_q: Vec<f32>,
    projected: Vec<f32>,
}

#[inline(always)]
fn backward_head<L: Lanes>(lanes: L, geometry: HeadGeometry, head: HeadBackward<'_>) {
    let HeadBackward {
        qkv,
        gates,
        initial,
        rows,
        states,
        grad_rows,
        grad_final,
        grad_qkv,
        grad_gates,
        grad_initial,
    } = head;
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let row_width = geometry.row_width();
    let state_len = geometry.state_len();
    let mut scratch = BackwardScratch {
        cum: vec![0.0; geometry.chunk_size],
        log_weights: vec![0.0; geometry.chunk_size],
        grad_cum: vec![0.0; geometry.chunk_size],
        grad_num: vec![0.0; d],
        grad_q: vec![0.0; d],
        projected: vec![0.0; d],
    };
    // Gradient w.r.t. the state after the current chunk (carry) and before it (next).
    let mut carry_c = vec![0f32; d * d];
    let mut carry_n = vec![0f32; d];
    if let Some(grad_final) = grad_final {
        carry_c.copy_from_slice(&grad_final[..d * d]);
        carry_n.copy_from_slice(&grad_final[d * d..d * d + d]);
    }
    let mut next_c = vec![0f32; d * d];
    let mut next_n = vec![0f32; d];
    for chunk in (0..geometry.num_chunks()).rev() {
        let start = chunk * geometry.chunk_size;
        let len = geometry.chunk_size.min(geometry.seq_len - start);
        let chunk_qkv = &qkv[start * qkv_width..(start + len) * qkv_width];
        let chunk_gates = &gates[start * 2..(start + len) * 2];
        let chunk_grad_qkv = &mut grad_qkv[start * qkv_width..(start + len) * qkv_width];
        let chunk_grad_gates = &mut grad_gates[start * 2..(start + len) * 2];
        chunk_log_forget_cumsum(chunk_gates, &mut scratch.cum[..len]);
        scratch.grad_cum[..len].fill(0.0);
        let prev = initial.map(|_| StateView::new(&states[chunk * state_len..], d));
        if let Some(prev) = prev {
            let m_next = states[(chunk + 2) * state_len - 1];
            next_c.fill(0.0);
            next_n.fill(0.0);
            chunk_state_backward(
                lanes,
                geometry,
                chunk_qkv,
                chunk_gates,
                prev,
                m_next,
                (&carry_c, &carry_n),
                (&mut next_c, &mut next_n),
                chunk_grad_qkv,
                chunk_grad_gates,
                &mut scratch,
            );
        }
        chunk_rows_backward(
            lanes,
            geometry,
            chunk_qkv,
            chunk_gates,
            prev,
            &rows[start * row_width..(start + len) * row_width],
            &grad_rows[start * row_width..(start + len) * row_width],
            (&mut next_c, &mut next_n),
            chunk_grad_qkv,
            chunk_grad_gates,
            &mut scratch,
        );
        // cum[τ] = Σ_{s≤τ} logσ(f̃_s), so dL/d logσ(f̃_s) = Σ_{τ≥s} dL/dcum[τ].
        let mut suffix = 0.0;
        for tau in (0..len).rev() {
            suffix += scratch.grad_cum[tau];
            chunk_grad_gates[2 * tau + 1] =
                suffix * log_sigmoid_derivative(chunk_gates[2 * tau + 1]);
        }
        std::mem::swap(&mut carry_c, &mut next_c);
        std::mem::swap(&mut carry_n, &mut next_n);
    }
    if let (Some(initial), Some(grad_initial)) = (initial, grad_initial) {
        let initial = StateView::new(initial, d);
        let (grad_c, rest) = grad_initial.split_at_mut(d * d);
        grad_c.copy_from_slice(&carry_c);
        rest[..d].copy_from_slice(&carry_n);
        // The initial state means (C, n)·e^{m}: h depends on m only through that product.
        rest[d] = lanes.dot(&carry_c, initial.c) + lanes.dot(&carry_n, initial.n);
    }
}

/// Backward of the state update of one chunk: adds to the gradients of k, v, igate
/// and `cum`, and to the gradient of the state before the chunk (`next`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_state_backward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    gates: &[f32],
    prev: StateView<'_>,
    m_next: f32,
    (carry_c, carry_n): (&[f32], &[f32]),
    (next_c, next_n): (&mut [f32], &mut [f32]),
    grad_qkv: &mut [f32],
    grad_gates: &mut [f32],
    scratch: &mut BackwardScratch,
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let key_scale = geometry.key_scale();
    let len = gates.len() / 2;
    let cum = &scratch.cum[..len];
    let total = cum[len - 1];
    let carry = ((total + prev.m) - m_next).exp();
    let grad_carry = lanes.dot(carry_c, prev.c) + lanes.dot(carry_n, prev.n);
    lanes.axpy(next_c, carry, carry_c);
    lanes.axpy(next_n, carry, carry_n);
    let mut grad_total = grad_carry * carry;
    let projected = &mut scratch.projected;
    for tau in 0..len {
        let weight = (((total - cum[tau]) + gates[2 * tau]) - m_next).exp();
        let (k, v) = qkv[tau * qkv_width + d..(tau + 1) * qkv_width].split_at(d);
        // projected = dC v + dn, the gradient w.r.t. the weighted key.
        for (p, (c_row, n_a)) in projected
            .iter_mut()
            .zip(carry_c.chunks_exact(d).zip(carry_n))
        {
            *p = lanes.dot(c_row, v) + n_a;
        }
        let grad_weight = key_scale * lanes.dot(k, projected);
        let (grad_k, grad_v) = grad_qkv[tau * qkv_width + d..(tau + 1) * qkv_width].split_at_mut(d);
        lanes.axpy(grad_k, weight * key_scale, projected);
        for (ka, c_row) in k.iter().zip(carry_c.chunks_exact(d)) {
            lanes.axpy(grad_v, weight * key_scale * ka, c_row);
        }
        let grad_log_input = grad_weight * weight;
        grad_total += grad_log_input;
        scratch.grad_cum[tau] -= grad_log_input;
        grad_gates[2 * tau] += grad_log_input;
    }
    scratch.grad_cum[len - 1] += grad_total;
}

/// Backward of the output rows of one chunk: adds to the gradients of q, k, v, igate
/// and `cum`, and to the gradient of the state before the chunk (`next`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_rows_backward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    gates: &[f32],
    prev: Option<StateView<'_>>,
    rows: &[f32],
    grad_rows: &[f32],
    (next_c, next_n): (&mut [f32], &mut [f32]),
    grad_qkv: &mut [f32],
    grad_gates: &mut [f32],
    scratch: &mut BackwardScratch,
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let row_width = geometry.row_width();
    let key_scale = geometry.key_scale();
    let len = gates.len() / 2;
    let BackwardScratch {
        cum,
        log_weights: log_decay,
        grad_cum,
        grad_num,
        grad_q,
        projected,
    } = scratch;
    for tau in 0..len {
        let row = &rows[tau * row_width..(tau + 1) * row_width];
        let (h, stats) = row.split_at(d);
        let (m_row, b) = (stats[0], stats[1]);
        let grad_h = &grad_rows[tau * row_width..tau * row_width + d];
        let floor = (-m_row).exp();
        let den = b.abs().max(floor) + DENOMINATOR_EPS;
        for (gn, gh) in grad_num.iter_mut().zip(grad_h) {
            *gn = gh / den;
        }
        let grad_den = -lanes.dot(grad_h, h) / den;
        // The max picks |b| only above the floor; the floor depends on m alone.
        let grad_b = if b.abs() > floor {
            grad_den * b.signum()
        } else {
            0.0
        };
        let q = &qkv[tau * qkv_width..tau * qkv_width + d];
        grad_q.fill(0.0);
        for sigma in 0..=tau {
            log_decay[sigma] = (cum[tau] - cum[sigma]) + gates[2 * sigma];
        }
        let mut grad_cum_tau = 0.0;
        for sigma in 0..=tau {
            let (k, v) = qkv[sigma * qkv_width + d..(sigma + 1) * qkv_width].split_at(d);
            let decay = (log_decay[sigma] - m_row).exp();
            let weight = lanes.dot(q, k) * key_scale * decay;
            let grad_weight = lanes.dot(grad_num, v) + grad_b;
            let (grad_k, grad_v) =
                grad_qkv[sigma * qkv_width + d..(sigma + 1) * qkv_width].split_at_mut(d);
            lanes.axpy(grad_v, weight, grad_num);
            let grad_score = grad_weight * decay * key_scale;
            lanes.axpy(grad_q, grad_score, k);
            lanes.axpy(grad_k, grad_score, q);
            let grad_log_decay = grad_weight * weight;
            grad_cum_tau += grad_log_decay;
            grad_cum[sigma] -= grad_log_decay;
            grad_gates[2 * sigma] += grad_log_decay;
        }
        if let Some(prev) = prev {
            let inter_weight = ((cum[tau] + prev.m) - m_row).exp();
            // projected = C_prev · grad_num
            for (p, c_row) in projected.iter_mut().zip(prev.c.chunks_exact(d)) {
                *p = lanes.dot(c_row, grad_num);
            }
            let grad_inter_weight = lanes.dot(q, projected) + grad_b * lanes.dot(prev.n, q);
            lanes.axpy(grad_q, inter_weight, projected);
            lanes.axpy(grad_q, inter_weight * grad_b, prev.n);
            grad_cum_tau += grad_inter_weight * inter_weight;
            for (qa, c_row) in q.iter().zip(next_c.chunks_exact_mut(d)) {
                lanes.axpy(c_row, inter_weight * qa, grad_num);
            }
            lanes.axpy(next_n, inter_weight * grad_b, q);
        }
        grad_cum[tau] += grad_cum_tau;
        lanes.axpy(
            &mut grad_qkv[tau * qkv_width..tau * qkv_width + d],
            1.0,
            grad_q,
        );
    }
}

/// The contiguous f32 data of a CPU tensor argument.
fn contiguous_f32<'a>(
    op: &str,
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: {what} is not contiguous")))?;
    Ok(&data[start..end])
}

/// Copies a CPU tensor's data into a Vec (the backward pass reads candle tensors).
fn tensor_data(op: &str, what: &str, t: &Tensor) -> Result<Vec<f32>> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(contiguous_f32(op, what, cpu, layout)?.to_vec()),
        _ => Err(Error::Msg(format!(
            "{op}: {what} is not on the CPU; this kernel is CPU-only"
        ))),
    }
}

/// The stabilised parallel form as a custom op on (qkv, gates); output `[B, NH, S, DH + 2]`.
struct ParallelOp {
    geometry: HeadGeometry,
}

impl CustomOp2 for ParallelOp {
    fn name(&self) -> &'static str {
        "mlstm-parallel"
    }

    fn cpu_fwd(
        &self,
        qkv_storage: &CpuStorage,
        qkv_layout: &Layout,
        gates_storage: &CpuStorage,
        gates_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let g = self.geometry;
        let qkv = contiguous_f32(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = contiguous_f32(op, "gates", gates_storage, gates_layout)?;
        let (batch, heads) = (qkv_layout.dims()[0], qkv_layout.dims()[1]);
        let mut rows = vec![0f32; batch * heads * g.rows_len()];
        rows.par_chunks_mut(g.rows_len())
            .enumerate()
            .for_each(|(head, rows)| {
                let head = HeadForward {
                    qkv: &qkv[head * g.seq_len * g.qkv_width()..][..g.seq_len * g.qkv_width()],
                    gates: &gates[head * g.seq_len * 2..][..g.seq_len * 2],
                    initial: None,
                    rows,
                    states: &mut [],
                };
                with_best_lanes!(forward_head_avx2, forward_head(g, head));
            });
        let shape = Shape::from((batch, heads, g.seq_len, g.row_width()));
        Ok((CpuStorage::F32(rows), shape))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        gates: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let g = self.geometry;
        let qkv_data = tensor_data(op, "qkv", qkv)?;
        let gates_data = tensor_data(op, "gates", gates)?;
        let rows = tensor_data(op, "forward output", res)?;
        let grad_rows = tensor_data(op, "output gradient", grad_res)?;
        let mut grad_qkv = vec![0f32; qkv_data.len()];
        let mut grad_gates = vec![0f32; gates_data.len()];
        let qkv_len = g.seq_len * g.qkv_width();
        grad_qkv
            .par_chunks_mut(qkv_len)
            .zip(grad_gates.par_chunks_mut(g.seq_len * 2))
            .enumerate()
            .for_each(|(head, (grad_qkv, grad_gates))| {
                let rows_range = head * g.rows_len()..(head + 1) * g.rows_len();
                let head = HeadBackward {
                    qkv: &qkv_data[head * qkv_len..][..qkv_len],
                    gates: &gates_data[head * g.seq_len * 2..][..g.seq_len * 2],
                    initial: None,
                    rows: &rows[rows_range.clone()],
                    states: &[],
                    grad_rows: &grad_rows[rows_range],
                    grad_final: None,
                    grad_qkv,
                    grad_gates,
                    grad_initial: None,
                };
                with_best_lanes!(backward_head_avx2, backward_head(g, head));
            });
        Ok((
            Some(Tensor::from_vec(grad_qkv, qkv.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(grad_gates, gates.shape(), &Device::Cpu)?),
        ))
    }
}

/// The chunkwise form as a custom op on (qkv, gates, initial state records); output
/// `[B, NH, S·(DH + 2) + (NC + 1)·state_len]`.
struct ChunkwiseOp {
    geometry: HeadGeometry,
}

impl CustomOp3 for ChunkwiseOp {
    fn name(&self) -> &'static str {
        "mlstm-chunkwise"
    }

    fn cpu_fwd(
        &self,
        qkv_storage: &CpuStorage,
        qkv_layout: &Layout,
        gates_storage: &CpuStorage,
        gates_layout: &Layout,
        initial_storage: &CpuStorage,
        initial_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let g = self.geometry;
        let qkv = contiguous_f32(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = contiguous_f32(op, "gates", gates_storage, gates_layout)?;
        let initial = contiguous_f32(op, "initial state", initial_storage, initial_layout)?;
        let (batch, heads) = (qkv_layout.dims()[0], qkv_layout.dims()[1]);
        let out_len = g.chunkwise_output_len();
        let mut out = vec![0f32; batch * heads * out_len];
        out.par_chunks_mut(out_len)
            .enumerate()
            .for_each(|(head, out)| {
                let (rows, states) = out.split_at_mut(g.rows_len());
                let head = HeadForward {
                    qkv: &qkv[head * g.seq_len * g.qkv_width()..][..g.seq_len * g.qkv_width()],
                    gates: &gates[head * g.seq_len * 2..][..g.seq_len * 2],
                    initial: Some(&initial[head * g.state_len()..][..g.state_len()]),
                    rows,
                    states,
                };
                with_best_lanes!(forward_head_avx2, forward_head(g, head));
            });
        Ok((CpuStorage::F32(out), Shape::from((batch, heads, out_len))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        gates: &Tensor,
        initial: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let g = self.geometry;
        let qkv_data = tensor_data(op, "qkv", qkv)?;
        let gates_data = tensor_data(op, "gates", gates)?;
        let initial_data = tensor_data(op, "initial state", initial)?;
        let out = tensor_data(op, "forward output", res)?;
        let grad_out = tensor_data(op, "output gradient", grad_res)?;
        let mut grad_qkv = vec![0f32; qkv_data.len()];
        let mut grad_gates = vec![0f32; gates_data.len()];
        let mut grad_initial = vec![0f32; initial_data.len()];
        let qkv_len = g.seq_len * g.qkv_width();
        let out_len = g.chunkwise_output_len();
        let state_len = g.state_len();
        grad_qkv
            .par_chunks_mut(qkv_len)
            .zip(grad_gates.par_chunks_mut(g.seq_len * 2))
            .zip(grad_initial.par_chunks_mut(state_len))
            .enumerate()
            .for_each(|(head, ((grad_qkv, grad_gates), grad_initial))| {
                let (rows, states) = out[head * out_len..][..out_len].split_at(g.rows_len());
                let (grad_rows, grad_states) =
                    grad_out[head * out_len..][..out_len].split_at(g.rows_len());
                let head = HeadBackward {
                    qkv: &qkv_data[head * qkv_len..][..qkv_len],
                    gates: &gates_data[head * g.seq_len * 2..][..g.seq_len * 2],
                    initial: Some(&initial_data[head * state_len..][..state_len]),
                    rows,
                    states,
                    grad_rows,
                    grad_final: Some(&grad_states[g.num_chunks() * state_len..]),
                    grad_qkv,
                    grad_gates,
                    grad_initial: Some(grad_initial),
                };
                with_best_lanes!(backward_head_avx2, backward_head(g, head));
            });
        Ok((
            Some(Tensor::from_vec(grad_qkv, qkv.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(grad_gates, gates.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(
                grad_initial,
                initial.shape(),
                &Device::Cpu,
            )?),
        ))
    }
}

/// One recurrent step as a custom op on (qkv, gates, state records); output
/// `[B, NH, DH + state_len]` = h then the new state record. No backward: the step
/// is for inference, and backpropagating through it fails loudly.
struct StepOp {
    head_dim: usize,
}

impl CustomOp3 for StepOp {
    fn name(&self) -> &'static str {
        "mlstm-step"
    }

    fn cpu_fwd(
        &self,
        qkv_storage: &CpuStorage,
        qkv_layout: &Layout,
        gates_storage: &CpuStorage,
        gates_layout: &Layout,
        state_storage: &CpuStorage,
        state_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let d = self.head_dim;
        let qkv = contiguous_f32(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = contiguous_f32(op, "gates", gates_storage, gates_layout)?;
        let states = contiguous_f32(op, "state", state_storage, state_layout)?;
        let (batch, heads) = (qkv_layout.dims()[0], qkv_layout.dims()[1]);
        let state_len = state_record_len(d);
        let out_len = d + state_len;
        let key_scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; batch * heads * out_len];
        out.par_chunks_mut(out_len)
            .zip(qkv.par_chunks(3 * d))
            .zip(gates.par_chunks(2))
            .zip(states.par_chunks(state_len))
            .for_each(|(((out, qkv), gates), state)| {
                let prev = StateView::new(state, d);
                let (q, kv) = qkv.split_at(d);
                let (k, v) = kv.split_at(d);
                let log_forget = log_sigmoid(gates[1]) + prev.m;
                let m = log_forget.max(gates[0]);
                let forget = (log_forget - m).exp();
                let input = (gates[0] - m).exp() * key_scale;
                let (h, record) = out.split_at_mut(d);
                let (c, rest) = record.split_at_mut(d * d);
                let (n, m_slot) = rest.split_at_mut(d);
                for ((c_row, c_prev), ka) in
                    c.chunks_exact_mut(d).zip(prev.c.chunks_exact(d)).zip(k)
                {
                    for ((cv, cp), vb) in c_row.iter_mut().zip(c_prev).zip(v) {
                        *cv = forget * cp + input * ka * vb;
                    }
                }
                for ((nv, np), ka) in n.iter_mut().zip(prev.n).zip(k) {
                    *nv = forget * np + input * ka;
                }
                m_slot[0] = m;
                h.fill(0.0);
                for (qa, c_row) in q.iter().zip(c.chunks_exact(d)) {
                    Portable.axpy(h, *qa, c_row);
                }
                let den = Portable.dot(n, q).abs().max((-m).exp()) + DENOMINATOR_EPS;
                for x in h.iter_mut() {
                    *x /= den;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((batch, heads, out_len))))
    }
}

/// Packs a state into contiguous records `[B, NH, DH·DH + DH + 1]`.
fn pack_state(state: &MlstmState) -> Result<Tensor> {
    Tensor::cat(
        &[
            state.c.flatten_from(2)?,
            state.n.clone(),
            state.m.unsqueeze(2)?,
        ],
        2,
    )?
    .contiguous()
}

/// Splits records `[B, NH, DH·DH + DH + 1]` into a state.
fn unpack_state(records: &Tensor, head_dim: usize) -> Result<MlstmState> {
    let (batch, heads, _) = records.dims3()?;
    let d = head_dim;
    Ok(MlstmState {
        c: records.narrow(2, 0, d * d)?.reshape((batch, heads, d, d))?,
        n: records.narrow(2, d * d, d)?.contiguous()?,
        m: records.narrow(2, d * d + d, 1)?.squeeze(2)?.contiguous()?,
    })
}

/// Fused stabilised parallel form; see [`super::parallel`].
pub fn parallel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
) -> Result<Tensor> {
    let dims = check_sequence_inputs("mlstm parallel", q, k, v, igate, fgate)?;
    let geometry = HeadGeometry {
        seq_len: dims.seq_len,
        head_dim: dims.head_dim,
        chunk_size: dims.seq_len,
    };
    let qkv = Tensor::cat(&[q, k, v], 3)?.contiguous()?;
    let gates = Tensor::stack(&[igate, fgate], 3)?.contiguous()?;
    let rows = qkv.apply_op2(&gates, ParallelOp { geometry })?;
    rows.narrow(3, 0, dims.head_dim)?.contiguous()
}

/// Fused chunkwise form; see [`super::chunkwise`].
pub fn chunkwise(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
    chunk_size: usize,
    initial: Option<&MlstmState>,
) -> Result<(Tensor, MlstmState)> {
    const OP: &str = "mlstm chunkwise";
    let dims = check_sequence_inputs(OP, q, k, v, igate, fgate)?;
    check_chunk_size(OP, chunk_size)?;
    let geometry = HeadGeometry {
        seq_len: dims.seq_len,
        head_dim: dims.head_dim,
        chunk_size: chunk_size.min(dims.seq_len),
    };
    let initial = match initial {
        Some(state) => {
            check_state(OP, state, dims.batch, dims.heads, dims.head_dim, q.device())?;
            pack_state(state)?
        }
        None => Tensor::zeros(
            (dims.batch, dims.heads, geometry.state_len()),
            DType::F32,
            q.device(),
        )?,
    };
    let qkv = Tensor::cat(&[q, k, v], 3)?.contiguous()?;
    let gates = Tensor::stack(&[igate, fgate], 3)?.contiguous()?;
    let out = qkv.apply_op3(&gates, &initial, ChunkwiseOp { geometry })?;
    let h = out
        .narrow(2, 0, geometry.rows_len())?
        .reshape((dims.batch, dims.heads, dims.seq_len, geometry.row_width()))?
        .narrow(3, 0, dims.head_dim)?
        .contiguous()?;
    let final_offset = geometry.rows_len() + geometry.num_chunks() * geometry.state_len();
    let final_state = unpack_state(
        &out.narrow(2, final_offset, geometry.state_len())?,
        dims.head_dim,
    )?;
    Ok((h, final_state))
}

/// Fused recurrent step; see [`super::step`]. Not differentiable.
pub fn step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
    state: &MlstmState,
) -> Result<(Tensor, MlstmState)> {
    let dims = check_step_inputs("mlstm step", q, k, v, igate, fgate, state)?;
    let qkv = Tensor::cat(&[q, k, v], 2)?.contiguous()?;
    let gates = Tensor::stack(&[igate, fgate], 2)?.contiguous()?;
    let out = qkv.apply_op3(
        &gates,
        &pack_state(state)?,
        StepOp {
            head_dim: dims.head_dim,
        },
    )?;
    let h = out.narrow(2, 0, dims.head_dim)?.contiguous()?;
    let record_len = state_record_len(dims.head_dim);
    let new_state = unpack_state(&out.narrow(2, dims.head_dim, record_len)?, dims.head_dim)?;
    Ok((h, new_state))
}
