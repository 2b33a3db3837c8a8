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
    /// `x = exp(x − shift)` elementwise.
    fn exp_shifted(self, x: &mut [f32], shift: f32);
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

    #[inline(always)]
    fn exp_shifted(self, x: &mut [f32], shift: f32) {
        for xi in x.iter_mut() {
            *xi = (*xi - shift).exp();
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

    // The bodies call the intrinsics directly (no separate `#[target_feature]` helper):
    // at our crate's opt-level 1 LLVM does not inline such helpers, and a call per
    // 16-float row costs more than the row. Inlined into the `#[target_feature]`
    // kernel entry points, the intrinsics compile to plain AVX2/FMA instructions.
    impl Lanes for Avx2Fma {
        #[inline(always)]
        fn dot(self, x: &[f32], y: &[f32]) -> f32 {
            let len = x.len().min(y.len());
            let (xp, yp) = (x.as_ptr(), y.as_ptr());
            let mut i = 0;
            // SAFETY: an `Avx2Fma` exists only if the CPU supports AVX2 and FMA, and
            // every load reads lanes i..i + 8 < len of both slices.
            unsafe {
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                while i + 16 <= len {
                    acc0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xp.add(i)),
                        _mm256_loadu_ps(yp.add(i)),
                        acc0,
                    );
                    acc1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xp.add(i + 8)),
                        _mm256_loadu_ps(yp.add(i + 8)),
                        acc1,
                    );
                    i += 16;
                }
                if i + 8 <= len {
                    acc0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xp.add(i)),
                        _mm256_loadu_ps(yp.add(i)),
                        acc0,
                    );
                    i += 8;
                }
                let acc = _mm256_add_ps(acc0, acc1);
                let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                let mut total = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
                while i < len {
                    total += x[i] * y[i];
                    i += 1;
                }
                total
            }
        }

        #[inline(always)]
        fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]) {
            let len = x.len().min(y.len());
            let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
            let mut i = 0;
            // SAFETY: as in `dot`; every access touches lanes i..i + 8 < len.
            unsafe {
                let alpha8 = _mm256_set1_ps(alpha);
                while i + 8 <= len {
                    let updated = _mm256_fmadd_ps(
                        alpha8,
                        _mm256_loadu_ps(xp.add(i)),
                        _mm256_loadu_ps(yp.add(i)),
                    );
                    _mm256_storeu_ps(yp.add(i), updated);
                    i += 8;
                }
            }
            while i < len {
                y[i] += alpha * x[i];
                i += 1;
            }
        }

        #[inline(always)]
        fn exp_shifted(self, x: &mut [f32], shift: f32) {
            let len = x.len();
            let xp = x.as_mut_ptr();
            let mut i = 0;
            // SAFETY: as in `dot`; every access touches lanes i..i + 8 < len.
            unsafe {
                let shift8 = _mm256_set1_ps(shift);
                while i + 8 <= len {
                    let shifted = _mm256_sub_ps(_mm256_loadu_ps(xp.add(i)), shift8);
                    _mm256_storeu_ps(xp.add(i), exp8(shifted));
                    i += 8;
                }
            }
            while i < len {
                x[i] = (x[i] - shift).exp();
                i += 1;
            }
        }
    }

    /// `exp` of 8 lanes (Cephes `expf`: range reduction by ln 2, degree-5 polynomial;
    /// ~2 ulp). Below −87.3 the result is 0 (libm would return subnormals); NaN stays NaN.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        // ln 2 split so that n · LN2_HI is exact in f32.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const POLY: [f32; 6] = [
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ];
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            let lowest = _mm256_set1_ps(-87.336_55);
            let clamped = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0)), lowest);
            let n = _mm256_round_ps(
                _mm256_mul_ps(clamped, _mm256_set1_ps(LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), clamped);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut poly = _mm256_set1_ps(POLY[0]);
            for c in &POLY[1..] {
                poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(*c));
            }
            let mantissa = _mm256_fmadd_ps(
                poly,
                _mm256_mul_ps(r, r),
                _mm256_add_ps(r, _mm256_set1_ps(1.0)),
            );
            let exponent = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            let result = _mm256_mul_ps(mantissa, _mm256_castsi256_ps(exponent));
            let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lowest);
            let result = _mm256_blendv_ps(result, _mm256_setzero_ps(), underflow);
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
            _mm256_blendv_ps(result, x, nan)
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

/// A chunk's gate terms, and its keys and values transposed, so that the intra-chunk
/// loops run along the key index σ over contiguous memory.
struct ChunkColumns {
    len: usize,
    /// `cum[τ] = Σ_{s≤τ} logσ(f̃_s)` within the chunk.
    cum: Vec<f32>,
    igate: Vec<f32>,
    /// `[DH, len]`: `keys_t[a·len + σ] = k_σ[a]`.
    keys_t: Vec<f32>,
    /// `[DH, len]`: `values_t[b·len + σ] = v_σ[b]`.
    values_t: Vec<f32>,
}

impl ChunkColumns {
    fn new(geometry: HeadGeometry) -> Self {
        let capacity = geometry.chunk_size;
        Self {
            len: 0,
            cum: vec![0.0; capacity],
            igate: vec![0.0; capacity],
            keys_t: vec![0.0; capacity * geometry.head_dim],
            values_t: vec![0.0; capacity * geometry.head_dim],
        }
    }

    #[inline(always)]
    fn load(&mut self, head_dim: usize, qkv: &[f32], gates: &[f32]) {
        let d = head_dim;
        let len = gates.len() / 2;
        self.len = len;
        let mut total = 0.0;
        for (tau, g) in gates.chunks_exact(2).enumerate() {
            total += log_sigmoid(g[1]);
            self.cum[tau] = total;
            self.igate[tau] = g[0];
        }
        for (sigma, row) in qkv.chunks_exact(3 * d).enumerate() {
            for a in 0..d {
                self.keys_t[a * len + sigma] = row[d + a];
                self.values_t[a * len + sigma] = row[2 * d + a];
            }
        }
    }

    fn key_column(&self, a: usize, n: usize) -> &[f32] {
        &self.keys_t[a * self.len..a * self.len + n]
    }

    fn value_column(&self, b: usize, n: usize) -> &[f32] {
        &self.values_t[b * self.len..b * self.len + n]
    }

    /// `out[σ] = exp(log D[τ, σ] − m_τ)` for σ ≤ τ, with m_τ the larger of the row
    /// maximum of log D and `floor`; returns m_τ. `floor` = −∞ when no state is carried.
    #[inline(always)]
    fn decay_row<L: Lanes>(&self, lanes: L, tau: usize, floor: f32, out: &mut [f32]) -> f32 {
        let mut m_row = floor;
        for (sigma, o) in out[..=tau].iter_mut().enumerate() {
            let log_d = (self.cum[tau] - self.cum[sigma]) + self.igate[sigma];
            *o = log_d;
            m_row = m_row.max(log_d);
        }
        lanes.exp_shifted(&mut out[..=tau], m_row);
        m_row
    }

    /// Like `decay_row` with the stabiliser already known (backward pass).
    #[inline(always)]
    fn decay_row_with<L: Lanes>(&self, lanes: L, tau: usize, m_row: f32, out: &mut [f32]) {
        for (sigma, o) in out[..=tau].iter_mut().enumerate() {
            *o = (self.cum[tau] - self.cum[sigma]) + self.igate[sigma];
        }
        lanes.exp_shifted(&mut out[..=tau], m_row);
    }

    /// `out[σ] = (q · k_σ) / √DH · decay[σ]` for σ ≤ τ.
    #[inline(always)]
    fn weight_row<L: Lanes>(
        &self,
        lanes: L,
        q: &[f32],
        key_scale: f32,
        decay: &[f32],
        out: &mut [f32],
    ) {
        let n = decay.len();
        let out = &mut out[..n];
        out.fill(0.0);
        for (a, qa) in q.iter().enumerate() {
            lanes.axpy(out, *qa, self.key_column(a, n));
        }
        for (w, dec) in out.iter_mut().zip(decay) {
            *w = *w * key_scale * dec;
        }
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
    let mut columns = ChunkColumns::new(geometry);
    let mut decay = vec![0f32; geometry.chunk_size];
    let mut weights = vec![0f32; geometry.chunk_size];
    for chunk in 0..geometry.num_chunks() {
        let start = chunk * geometry.chunk_size;
        let len = geometry.chunk_size.min(geometry.seq_len - start);
        let chunk_qkv = &qkv[start * qkv_width..(start + len) * qkv_width];
        columns.load(d, chunk_qkv, &gates[start * 2..(start + len) * 2]);
        let chunk_rows = &mut rows[start * row_width..(start + len) * row_width];
        if initial.is_some() {
            let (before, after) = states.split_at_mut((chunk + 1) * state_len);
            let prev = StateView::new(&before[chunk * state_len..], d);
            chunk_rows_forward(
                lanes,
                geometry,
                chunk_qkv,
                &columns,
                Some(prev),
                chunk_rows,
                (&mut decay, &mut weights),
            );
            chunk_state_forward(
                lanes,
                geometry,
                chunk_qkv,
                &columns,
                prev,
                &mut after[..state_len],
                &mut decay,
            );
        } else {
            chunk_rows_forward(
                lanes,
                geometry,
                chunk_qkv,
                &columns,
                None,
                chunk_rows,
                (&mut decay, &mut weights),
            );
        }
    }
}

/// Output rows of one chunk from its own inputs and the state before it.
#[inline(always)]
fn chunk_rows_forward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    columns: &ChunkColumns,
    prev: Option<StateView<'_>>,
    rows: &mut [f32],
    (decay, weights): (&mut [f32], &mut [f32]),
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let key_scale = geometry.key_scale();
    for (tau, row) in rows.chunks_exact_mut(geometry.row_width()).enumerate() {
        let n = tau + 1;
        let q = &qkv[tau * qkv_width..tau * qkv_width + d];
        let log_inter = prev.map(|prev| columns.cum[tau] + prev.m);
        let m_row = columns.decay_row(lanes, tau, log_inter.unwrap_or(f32::NEG_INFINITY), decay);
        columns.weight_row(lanes, q, key_scale, &decay[..n], weights);
        let weights = &weights[..n];
        let (h, stats) = row.split_at_mut(d);
        for (b, hb) in h.iter_mut().enumerate() {
            *hb = lanes.dot(weights, columns.value_column(b, n));
        }
        let mut normaliser: f32 = weights.iter().sum();
        if let (Some(prev), Some(log_inter)) = (prev, log_inter) {
            let inter_weight = (log_inter - m_row).exp();
            for (qa, c_row) in q.iter().zip(prev.c.chunks_exact(d)) {
                lanes.axpy(h, inter_weight * qa, c_row);
            }
            normaliser += inter_weight * lanes.dot(prev.n, q);
        }
        let den = normaliser.abs().max((-m_row).exp()) + DENOMINATOR_EPS;
        for x in h.iter_mut() {
            *x /= den;
        }
        stats[0] = m_row;
        stats[1] = normaliser;
    }
}

/// The state after a chunk from the state before it.
#[inline(always)]
fn chunk_state_forward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    columns: &ChunkColumns,
    prev: StateView<'_>,
    next: &mut [f32],
    log_input: &mut [f32],
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let key_scale = geometry.key_scale();
    let len = columns.len;
    let cum = &columns.cum[..len];
    let total = cum[len - 1];
    let mut m_next = total + prev.m;
    for (tau, log_in) in log_input[..len].iter_mut().enumerate() {
        *log_in = (total - cum[tau]) + columns.igate[tau];
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

/// Work buffers of the backward pass of one head.
struct BackwardScratch {
    /// Per key σ of the current row.
    decay: Vec<f32>,
    weights: Vec<f32>,
    grad_weights: Vec<f32>,
    grad_scores: Vec<f32>,
    /// Per row of the chunk: dL/dcum and dL/d igate.
    grad_cum: Vec<f32>,
    grad_igate: Vec<f32>,
    /// `[DH, L]` gradients of the transposed keys and values of the chunk.
    grad_keys_t: Vec<f32>,
    grad_values_t: Vec<f32>,
    /// Per head-dim vectors of the current row.
    grad_num: Vec<f32>,
    grad_q: Vec<f32>,
    projected: Vec<f32>,
}

impl BackwardScratch {
    fn new(geometry: HeadGeometry) -> Self {
        let (chunk, d) = (geometry.chunk_size, geometry.head_dim);
        Self {
            decay: vec![0.0; chunk],
            weights: vec![0.0; chunk],
            grad_weights: vec![0.0; chunk],
            grad_scores: vec![0.0; chunk],
            grad_cum: vec![0.0; chunk],
            grad_igate: vec![0.0; chunk],
            grad_keys_t: vec![0.0; chunk * d],
            grad_values_t: vec![0.0; chunk * d],
            grad_num: vec![0.0; d],
            grad_q: vec![0.0; d],
            projected: vec![0.0; d],
        }
    }
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
    let mut columns = ChunkColumns::new(geometry);
    let mut scratch = BackwardScratch::new(geometry);
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
        columns.load(d, chunk_qkv, chunk_gates);
        scratch.grad_cum[..len].fill(0.0);
        scratch.grad_igate[..len].fill(0.0);
        scratch.grad_keys_t[..len * d].fill(0.0);
        scratch.grad_values_t[..len * d].fill(0.0);
        let prev = initial.map(|_| StateView::new(&states[chunk * state_len..], d));
        if let Some(prev) = prev {
            let m_next = states[(chunk + 2) * state_len - 1];
            next_c.fill(0.0);
            next_n.fill(0.0);
            chunk_state_backward(
                lanes,
                geometry,
                chunk_qkv,
                &columns,
                prev,
                m_next,
                (&carry_c, &carry_n),
                (&mut next_c, &mut next_n),
                chunk_grad_qkv,
                &mut scratch,
            );
        }
        chunk_rows_backward(
            lanes,
            geometry,
            chunk_qkv,
            &columns,
            prev,
            &rows[start * row_width..(start + len) * row_width],
            &grad_rows[start * row_width..(start + len) * row_width],
            (&mut next_c, &mut next_n),
            chunk_grad_qkv,
            &mut scratch,
        );
        for (sigma, grad_row) in chunk_grad_qkv.chunks_exact_mut(qkv_width).enumerate() {
            for a in 0..d {
                grad_row[d + a] += scratch.grad_keys_t[a * len + sigma];
                grad_row[2 * d + a] += scratch.grad_values_t[a * len + sigma];
            }
        }
        // cum[τ] = Σ_{s≤τ} logσ(f̃_s), so dL/d logσ(f̃_s) = Σ_{τ≥s} dL/dcum[τ].
        let chunk_grad_gates = &mut grad_gates[start * 2..(start + len) * 2];
        let mut suffix = 0.0;
        for tau in (0..len).rev() {
            suffix += scratch.grad_cum[tau];
            chunk_grad_gates[2 * tau] = scratch.grad_igate[tau];
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
    columns: &ChunkColumns,
    prev: StateView<'_>,
    m_next: f32,
    (carry_c, carry_n): (&[f32], &[f32]),
    (next_c, next_n): (&mut [f32], &mut [f32]),
    grad_qkv: &mut [f32],
    scratch: &mut BackwardScratch,
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let key_scale = geometry.key_scale();
    let len = columns.len;
    let cum = &columns.cum[..len];
    let total = cum[len - 1];
    let carry = ((total + prev.m) - m_next).exp();
    let grad_carry = lanes.dot(carry_c, prev.c) + lanes.dot(carry_n, prev.n);
    lanes.axpy(next_c, carry, carry_c);
    lanes.axpy(next_n, carry, carry_n);
    let mut grad_total = grad_carry * carry;
    let projected = &mut scratch.projected;
    for tau in 0..len {
        let weight = (((total - cum[tau]) + columns.igate[tau]) - m_next).exp();
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
        scratch.grad_igate[tau] += grad_log_input;
    }
    scratch.grad_cum[len - 1] += grad_total;
}

/// Backward of the output rows of one chunk: adds to the gradients of q (directly),
/// k and v (transposed, in the scratch), igate and `cum`, and to the gradient of the
/// state before the chunk (`next`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_rows_backward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    columns: &ChunkColumns,
    prev: Option<StateView<'_>>,
    rows: &[f32],
    grad_rows: &[f32],
    (next_c, next_n): (&mut [f32], &mut [f32]),
    grad_qkv: &mut [f32],
    scratch: &mut BackwardScratch,
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let row_width = geometry.row_width();
    let key_scale = geometry.key_scale();
    let len = columns.len;
    let BackwardScratch {
        decay,
        weights,
        grad_weights,
        grad_scores,
        grad_cum,
        grad_igate,
        grad_keys_t,
        grad_values_t,
        grad_num,
        grad_q,
        projected,
    } = scratch;
    for tau in 0..len {
        let n = tau + 1;
        let row = &rows[tau * row_width..(tau + 1) * row_width];
        let (h, stats) = row.split_at(d);
        let (m_row, normaliser) = (stats[0], stats[1]);
        let grad_h = &grad_rows[tau * row_width..tau * row_width + d];
        let floor = (-m_row).exp();
        let den = normaliser.abs().max(floor) + DENOMINATOR_EPS;
        for (gn, gh) in grad_num.iter_mut().zip(grad_h) {
            *gn = gh / den;
        }
        let grad_den = -lanes.dot(grad_h, h) / den;
        // The max picks |b| only above the floor; the floor depends on m alone.
        let grad_normaliser = if normaliser.abs() > floor {
            grad_den * normaliser.signum()
        } else {
            0.0
        };
        let q = &qkv[tau * qkv_width..tau * qkv_width + d];
        columns.decay_row_with(lanes, tau, m_row, decay);
        columns.weight_row(lanes, q, key_scale, &decay[..n], weights);
        let (decay, weights) = (&decay[..n], &weights[..n]);
        // dL/dweight[σ] = grad_num · v_σ + dL/db
        let grad_weights = &mut grad_weights[..n];
        grad_weights.fill(grad_normaliser);
        for (b, gn) in grad_num.iter().enumerate() {
            lanes.axpy(grad_weights, *gn, columns.value_column(b, n));
            lanes.axpy(&mut grad_values_t[b * len..b * len + n], *gn, weights);
        }
        let grad_scores = &mut grad_scores[..n];
        let mut grad_cum_tau = 0.0;
        for sigma in 0..n {
            grad_scores[sigma] = grad_weights[sigma] * decay[sigma] * key_scale;
            let grad_log_decay = grad_weights[sigma] * weights[sigma];
            grad_cum_tau += grad_log_decay;
            grad_cum[sigma] -= grad_log_decay;
            grad_igate[sigma] += grad_log_decay;
        }
        for (a, (gq, qa)) in grad_q.iter_mut().zip(q).enumerate() {
            *gq = lanes.dot(grad_scores, columns.key_column(a, n));
            lanes.axpy(&mut grad_keys_t[a * len..a * len + n], *qa, grad_scores);
        }
        if let Some(prev) = prev {
            let inter_weight = ((columns.cum[tau] + prev.m) - m_row).exp();
            // projected = C_prev · grad_num
            for (p, c_row) in projected.iter_mut().zip(prev.c.chunks_exact(d)) {
                *p = lanes.dot(c_row, grad_num);
            }
            let grad_inter_weight =
                lanes.dot(q, projected) + grad_normaliser * lanes.dot(prev.n, q);
            lanes.axpy(grad_q, inter_weight, projected);
            lanes.axpy(grad_q, inter_weight * grad_normaliser, prev.n);
            grad_cum_tau += grad_inter_weight * inter_weight;
            for (qa, c_row) in q.iter().zip(next_c.chunks_exact_mut(d)) {
                lanes.axpy(c_row, inter_weight * qa, grad_num);
            }
            lanes.axpy(next_n, inter_weight * grad_normaliser, q);
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
