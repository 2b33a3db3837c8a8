//! Fused CPU kernels: one candle custom op per form, each with a hand-written
//! backward pass, parallelised over batch × heads with rayon.
//!
//! Packing (candle custom ops take at most three inputs and return one output):
//! * inputs: `qkv` = q, k, v concatenated on the last dim; `gates` = igate, fgate
//!   stacked on a new last dim; for the chunkwise form and the step the state
//!   record `[C (DH·DH) | n (DH) | m]` per head.
//! * outputs: h `[B, NH, S, DH]`; the chunkwise form's output is flat, h of every head
//!   followed by every head's final state record, so that the wrapper returns h as a
//!   contiguous view of it (the small final state as copies) and candle's autodiff routes
//!   the gradients of both back into one `bwd` call.
//! * tape: internally every head computes rows `[h (DH) | m_row | b_row]` (the row
//!   stabiliser and the signed normaliser) and, for the chunkwise form, the state record
//!   before every chunk; while gradients are tracked the op keeps them for its backward
//!   pass (torch's `save_for_backward`), which borrows the inputs instead of copying them.
//!
//! The backward pass treats every stabiliser as a constant (see the parent module)
//! and recomputes the intra-chunk decay weights instead of storing them, so memory
//! stays O(S·DH + S/L·DH²) per head; the parallel form is the chunkwise kernel with a
//! single chunk and no carried state.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Error, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::super::cpu_data::{contiguous_data, output_buffer, with_contiguous};
use super::super::vmath;
use super::{
    DENOMINATOR_EPS, MlstmState, check_chunk_size, check_sequence_inputs, check_state,
    check_step_inputs, pack_gates, pack_qkv, pack_state, state_record_len, unpack_state,
};

/// Values stored after h in every output row: the row stabiliser and the signed normaliser.
const ROW_STATS: usize = 2;

/// d logσ(x) / dx = σ(−x).
#[inline(always)]
fn log_sigmoid_derivative(x: f32) -> f32 {
    1.0 / (1.0 + vmath::exp(x))
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

    /// The rows of chunk `chunk` in a head's `[S, width]` values.
    fn chunk_rows<'a>(&self, values: &'a [f32], width: usize, chunk: usize) -> &'a [f32] {
        let start = chunk * self.chunk_size;
        let end = (start + self.chunk_size).min(self.seq_len);
        &values[start * width..end * width]
    }

    fn num_chunks(&self) -> usize {
        self.seq_len.div_ceil(self.chunk_size)
    }

    fn state_len(&self) -> usize {
        state_record_len(self.head_dim)
    }

    /// What the chunkwise form records per head: rows, then NC + 1 state records.
    fn chunkwise_record_len(&self) -> usize {
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
    /// Values per vector: slices of a multiple of this length need no scalar tail.
    const WIDTH: usize;
    /// `x · y` over the common length.
    fn dot(self, x: &[f32], y: &[f32]) -> f32;
    /// `Σ x`, in partial sums (one running sum is a chain of dependent additions).
    fn sum(self, x: &[f32]) -> f32;
    /// `y += alpha · x` over the common length.
    fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]);
    /// `x = exp(x − shift)` elementwise.
    fn exp_shifted(self, x: &mut [f32], shift: f32);
    /// `x.iter().fold(init, f32::max)`: the largest of `init` and the values, NaNs among the
    /// values ignored. One running maximum is a chain of dependent comparisons, each waiting
    /// for the last: the row stabilisers' folds were a tenth of the chunkwise forward.
    fn max_from(self, init: f32, x: &[f32]) -> f32;
    /// `out = x · scale · y` elementwise over the length of `out`.
    fn scaled_product(self, out: &mut [f32], x: &[f32], y: &[f32], scale: f32);
    /// Columns `first..first + width` of the row-major `rows` (row stride `stride`), transposed:
    /// `out[a·n + σ] = rows[σ·stride + first + a]` for the n = `out.len() / width` rows.
    fn transpose(self, rows: &[f32], stride: usize, first: usize, width: usize, out: &mut [f32]);
    /// `C[i, j] += Σ_p A[i, p] · B[p, j]` for `dims = (m, n, k)`: i < m, j < n, p < k; B and C have
    /// contiguous rows (`B[p, j] = b[p·ldb + j]`, `C[i, j] = c[i·ldc + j]`).
    #[allow(clippy::too_many_arguments)]
    fn gemm_acc(
        self,
        dims: (usize, usize, usize),
        a: Strided<'_>,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    );
}

/// A read-only matrix with arbitrary strides: `A[i, p] = data[i·row + p·col]`, so a
/// transposed view is the same data with the strides swapped.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    row: usize,
    col: usize,
}

impl<'a> Strided<'a> {
    fn rows(data: &'a [f32], row: usize) -> Self {
        Self { data, row, col: 1 }
    }

    fn transposed(self) -> Self {
        Self {
            data: self.data,
            row: self.col,
            col: self.row,
        }
    }

    /// The submatrix from row `i` and column `p` on.
    fn starting_at(self, i: usize, p: usize) -> Self {
        Self {
            data: &self.data[i * self.row + p * self.col..],
            ..self
        }
    }

    #[inline(always)]
    fn at(&self, i: usize, p: usize) -> f32 {
        self.data[i * self.row + p * self.col]
    }
}

/// A triangle of a chunk's L×L product known to be zero or not wanted, which
/// [`causal_gemm_acc`] skips: causal masks make half of every such product vanish.
#[derive(Clone, Copy)]
enum Causal {
    /// Only `C[i, j]` with `j ≤ i` is wanted; the rest of C is left as it was.
    LowerOutput,
    /// `A[i, p] = 0` for `p > i`.
    LowerA,
    /// `A[i, p] = 0` for `p < i` (the transpose of a lower-triangular matrix).
    UpperA,
}

/// `gemm_acc` skipping the `causal` triangle, eight rows of C at a time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn causal_gemm_acc<L: Lanes>(
    lanes: L,
    causal: Causal,
    (m, n, k): (usize, usize, usize),
    a: Strided<'_>,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    const ROWS: usize = 8;
    for first in (0..m).step_by(ROWS) {
        let rows = ROWS.min(m - first);
        let c_rows = &mut c[first * ldc..];
        match causal {
            Causal::LowerOutput => lanes.gemm_acc(
                (rows, n.min(first + rows), k),
                a.starting_at(first, 0),
                b,
                ldb,
                c_rows,
                ldc,
            ),
            Causal::LowerA => lanes.gemm_acc(
                (rows, n, k.min(first + rows)),
                a.starting_at(first, 0),
                b,
                ldb,
                c_rows,
                ldc,
            ),
            Causal::UpperA if first < k => lanes.gemm_acc(
                (rows, n, k - first),
                a.starting_at(first, first),
                &b[first * ldb..],
                ldb,
                c_rows,
                ldc,
            ),
            Causal::UpperA => {}
        }
    }
}

/// Panics unless every element `gemm_acc` touches is in bounds, so that SIMD
/// implementations may index without further checks.
#[inline(always)]
fn check_gemm_bounds(
    (m, n, k): (usize, usize, usize),
    a: Strided<'_>,
    b: &[f32],
    ldb: usize,
    c: &[f32],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        (m - 1) * a.row + (k - 1) * a.col < a.data.len(),
        "gemm: A out of bounds"
    );
    assert!((k - 1) * ldb + n <= b.len(), "gemm: B out of bounds");
    assert!((m - 1) * ldc + n <= c.len(), "gemm: C out of bounds");
}

#[derive(Clone, Copy)]
struct Portable;

impl Lanes for Portable {
    const WIDTH: usize = 1;

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
    fn sum(self, x: &[f32]) -> f32 {
        let mut acc = [0f32; 4];
        let mut xs = x.chunks_exact(4);
        for xc in &mut xs {
            for j in 0..4 {
                acc[j] += xc[j];
            }
        }
        let tail: f32 = xs.remainder().iter().sum();
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

    #[inline(always)]
    fn max_from(self, init: f32, x: &[f32]) -> f32 {
        x.iter().fold(init, |m, v| m.max(*v))
    }

    #[inline(always)]
    fn scaled_product(self, out: &mut [f32], x: &[f32], y: &[f32], scale: f32) {
        for (o, (xi, yi)) in out.iter_mut().zip(x.iter().zip(y)) {
            *o = xi * scale * yi;
        }
    }

    #[inline(always)]
    fn transpose(self, rows: &[f32], stride: usize, first: usize, width: usize, out: &mut [f32]) {
        let n = check_transpose_bounds(rows, stride, first, width, out);
        transpose_block(rows, stride, first, n, (0..n, 0..width), out);
    }

    #[inline(always)]
    fn gemm_acc(
        self,
        (m, n, k): (usize, usize, usize),
        a: Strided<'_>,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        check_gemm_bounds((m, n, k), a, b, ldb, c, ldc);
        for i in 0..m {
            let c_row = &mut c[i * ldc..i * ldc + n];
            for p in 0..k {
                self.axpy(c_row, a.at(i, p), &b[p * ldb..p * ldb + n]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Lanes, Strided, check_gemm_bounds, check_transpose_bounds, transpose_block};

    /// Proof that the running CPU has AVX2 and FMA; only [`Avx2Fma::detect`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2Fma {
        _detected: (),
    }

    impl Avx2Fma {
        pub(super) fn detect() -> Option<Self> {
            crate::xlstm::kernels::simd::avx2_fma().then_some(Self { _detected: () })
        }
    }

    // The bodies call the intrinsics directly (no separate `#[target_feature]` helper):
    // at our crate's opt-level 1 LLVM does not inline such helpers, and a call per
    // 16-float row costs more than the row. Inlined into the `#[target_feature]`
    // kernel entry points, the intrinsics compile to plain AVX2/FMA instructions.
    impl Lanes for Avx2Fma {
        const WIDTH: usize = 8;

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
        fn sum(self, x: &[f32]) -> f32 {
            let len = x.len();
            let xp = x.as_ptr();
            let mut i = 0;
            // SAFETY: as in `dot`; every load reads lanes i..i + 8 < len.
            unsafe {
                let mut acc = _mm256_setzero_ps();
                while i + 8 <= len {
                    acc = _mm256_add_ps(acc, _mm256_loadu_ps(xp.add(i)));
                    i += 8;
                }
                let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                let mut total = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
                while i < len {
                    total += x[i];
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

        #[inline(always)]
        fn max_from(self, init: f32, x: &[f32]) -> f32 {
            let len = x.len();
            let xp = x.as_ptr();
            let mut i = 0;
            let mut best = init;
            // SAFETY: as in `dot`; every load reads lanes i..i + 8 < len.
            unsafe {
                if len >= 8 {
                    // maxps returns its second operand when either is NaN: with the running
                    // maxima second (never NaN: they start at −∞), NaN values drop out as in
                    // `f32::max`.
                    let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
                    while i + 8 <= len {
                        acc = _mm256_max_ps(_mm256_loadu_ps(xp.add(i)), acc);
                        i += 8;
                    }
                    let quad =
                        _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                    let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
                    best = best.max(_mm_cvtss_f32(_mm_max_ss(
                        pair,
                        _mm_shuffle_ps(pair, pair, 1),
                    )));
                }
            }
            x[i..].iter().fold(best, |m, v| m.max(*v))
        }

        #[inline(always)]
        fn scaled_product(self, out: &mut [f32], x: &[f32], y: &[f32], scale: f32) {
            let len = out.len();
            assert!(
                x.len() >= len && y.len() >= len,
                "scaled_product: inputs too short"
            );
            let (op, xp, yp) = (out.as_mut_ptr(), x.as_ptr(), y.as_ptr());
            let mut i = 0;
            // SAFETY: as in `dot`; every access touches lanes i..i + 8 < len.
            unsafe {
                let scale8 = _mm256_set1_ps(scale);
                while i + 8 <= len {
                    let scaled = _mm256_mul_ps(_mm256_loadu_ps(xp.add(i)), scale8);
                    _mm256_storeu_ps(op.add(i), _mm256_mul_ps(scaled, _mm256_loadu_ps(yp.add(i))));
                    i += 8;
                }
            }
            while i < len {
                out[i] = x[i] * scale * y[i];
                i += 1;
            }
        }

        #[inline(always)]
        fn transpose(
            self,
            rows: &[f32],
            stride: usize,
            first: usize,
            width: usize,
            out: &mut [f32],
        ) {
            let n = check_transpose_bounds(rows, stride, first, width, out);
            let (full_rows, full_columns) = (n / 8 * 8, width / 8 * 8);
            let (rp, op) = (rows.as_ptr(), out.as_mut_ptr());
            // SAFETY: AVX2 is present (an `Avx2Fma` exists); every 8×8 block reads rows
            // σ0..σ0 + 8 ≤ n at columns first + a0..first + a0 + 8 ≤ first + width and writes
            // rows a0..a0 + 8 ≤ width of `out` at σ0..σ0 + 8 ≤ n, in bounds by the check.
            unsafe {
                for sigma0 in (0..full_rows).step_by(8) {
                    for a0 in (0..full_columns).step_by(8) {
                        let load =
                            |i: usize| _mm256_loadu_ps(rp.add((sigma0 + i) * stride + first + a0));
                        let (r0, r1, r2, r3) = (load(0), load(1), load(2), load(3));
                        let (r4, r5, r6, r7) = (load(4), load(5), load(6), load(7));
                        // Pairs of rows interleaved, then pairs of pairs: each 128-bit half
                        // holds one output row's four values from rows 0–3 or 4–7.
                        let t0 = _mm256_unpacklo_ps(r0, r1);
                        let t1 = _mm256_unpackhi_ps(r0, r1);
                        let t2 = _mm256_unpacklo_ps(r2, r3);
                        let t3 = _mm256_unpackhi_ps(r2, r3);
                        let t4 = _mm256_unpacklo_ps(r4, r5);
                        let t5 = _mm256_unpackhi_ps(r4, r5);
                        let t6 = _mm256_unpacklo_ps(r6, r7);
                        let t7 = _mm256_unpackhi_ps(r6, r7);
                        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                        let store = |i: usize, v: __m256| {
                            _mm256_storeu_ps(op.add((a0 + i) * n + sigma0), v)
                        };
                        store(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
                        store(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
                        store(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
                        store(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
                        store(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
                        store(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
                        store(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
                        store(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
                    }
                }
            }
            transpose_block(rows, stride, first, n, (0..n, full_columns..width), out);
            transpose_block(rows, stride, first, n, (full_rows..n, 0..full_columns), out);
        }

        #[inline(always)]
        fn gemm_acc(
            self,
            (m, n, k): (usize, usize, usize),
            a: Strided<'_>,
            b: &[f32],
            ldb: usize,
            c: &mut [f32],
            ldc: usize,
        ) {
            check_gemm_bounds((m, n, k), a, b, ldb, c, ldc);
            if n == 0 || k == 0 {
                return;
            }
            let (bp, cp) = (b.as_ptr(), c.as_mut_ptr());
            let mut i = 0;
            // SAFETY: AVX2/FMA are present (an `Avx2Fma` exists) and the bounds check
            // above covers every row block.
            unsafe {
                while i + 4 <= m {
                    Self::gemm_rows::<4>(i, (n, k), a, bp, ldb, cp, ldc);
                    i += 4;
                }
                while i < m {
                    Self::gemm_rows::<1>(i, (n, k), a, bp, ldb, cp, ldc);
                    i += 1;
                }
            }
        }
    }

    impl Avx2Fma {
        /// One row block of `gemm_acc`: `ROWS` (1 or 4) rows of C from column 0 to n,
        /// 16 columns per step in registers, then 8, then single columns.
        ///
        /// # Safety
        /// AVX2 and FMA are available and `check_gemm_bounds` passed.
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemm_rows<const ROWS: usize>(
            i: usize,
            (n, k): (usize, usize),
            a: Strided<'_>,
            b: *const f32,
            ldb: usize,
            c: *mut f32,
            ldc: usize,
        ) {
            // SAFETY: the caller checked that rows i..i + ROWS of A and C, and rows
            // 0..k of B, are in bounds for columns 0..n.
            unsafe {
                let ap = a.data.as_ptr();
                let a_at = |r: usize, p: usize| *ap.add((i + r) * a.row + p * a.col);
                let c_at = |r: usize, j: usize| c.add((i + r) * ldc + j);
                let mut j = 0;
                while j + 16 <= n {
                    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
                    for p in 0..k {
                        let b0 = _mm256_loadu_ps(b.add(p * ldb + j));
                        let b1 = _mm256_loadu_ps(b.add(p * ldb + j + 8));
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let a_rp = _mm256_set1_ps(a_at(r, p));
                            acc_r[0] = _mm256_fmadd_ps(a_rp, b0, acc_r[0]);
                            acc_r[1] = _mm256_fmadd_ps(a_rp, b1, acc_r[1]);
                        }
                    }
                    for (r, acc_r) in acc.iter().enumerate() {
                        let out = c_at(r, j);
                        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), acc_r[0]));
                        let out = out.add(8);
                        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), acc_r[1]));
                    }
                    j += 16;
                }
                while j + 8 <= n {
                    let mut acc = [_mm256_setzero_ps(); ROWS];
                    for p in 0..k {
                        let b0 = _mm256_loadu_ps(b.add(p * ldb + j));
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            *acc_r = _mm256_fmadd_ps(_mm256_set1_ps(a_at(r, p)), b0, *acc_r);
                        }
                    }
                    for (r, acc_r) in acc.iter().enumerate() {
                        let out = c_at(r, j);
                        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), *acc_r));
                    }
                    j += 8;
                }
                while j < n {
                    for r in 0..ROWS {
                        let mut total = 0.0;
                        for p in 0..k {
                            total += a_at(r, p) * *b.add(p * ldb + j);
                        }
                        *c_at(r, j) += total;
                    }
                    j += 1;
                }
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
        const POLY: [f32; 6] = crate::xlstm::kernels::vmath::EXP_POLYNOMIAL;
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

/// Runs `$generic(lanes, args...)` with the fastest [`Lanes`] the CPU supports (AVX-512,
/// AVX2 + FMA, portable). The vector instances are `#[target_feature]` functions so the
/// `#[inline(always)]` kernel body and the intrinsics inline into them.
macro_rules! with_best_lanes {
    ($avx512_entry:ident, $avx2_entry:ident, $generic:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(lanes) = avx512::Avx512::detect() {
                // SAFETY: `detect` confirmed AVX-512F, AVX2 and FMA.
                unsafe { $avx512_entry(lanes, $($arg),*) }
            } else if let Some(lanes) = avx2::Avx2Fma::detect() {
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

/// Asks the cache for `values`, one request per 64-byte line: a head's next chunk of q, k, v
/// while the current one is computed. The transposes that read a chunk's keys and values
/// waited on these lines (a quarter of the forward head's samples at DH 32, S 96: the packed
/// inputs of all heads exceed L2). Only a hint: no effect on values, none off x86-64.
#[inline(always)]
fn prefetch(values: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(16) {
        // SAFETY: a prefetch only hints the cache; the address lies inside `values`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
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
    /// Gradient of h, one row of `grad_h_width` (≥ DH) values per step.
    grad_rows: &'a [f32],
    grad_h_width: usize,
    /// Gradient of the final state record (chunkwise form only).
    grad_final: Option<&'a [f32]>,
    grad_qkv: &'a mut [f32],
    grad_gates: &'a mut [f32],
    grad_initial: Option<&'a mut [f32]>,
}

/// Per-head work buffers (reused across the heads one rayon worker processes).
/// `L` = chunk length (S for the parallel form); matrices are row-major.
struct HeadScratch {
    /// `[L]`: local cumulative log forget gate, input gate, per-row values.
    cum: Vec<f32>,
    igate: Vec<f32>,
    row_stabiliser: Vec<f32>,
    row_grad_normaliser: Vec<f32>,
    grad_cum: Vec<f32>,
    grad_igate: Vec<f32>,
    /// `[DH, L]`: keys and values transposed, keys scaled by their input weight.
    keys_t: Vec<f32>,
    values_t: Vec<f32>,
    weighted_keys_t: Vec<f32>,
    /// `[L, L]`: decay factors, weights, scores or weight gradients, score gradients.
    decay: Vec<f32>,
    weights: Vec<f32>,
    square: Vec<f32>,
    grad_scores: Vec<f32>,
    /// `[L, DH]`
    rows_a: Vec<f32>,
    rows_b: Vec<f32>,
    rows_c: Vec<f32>,
    /// `[DH, DH]`: a transposed state matrix.
    small_t: Vec<f32>,
    /// `[L]`: one row of log-decay gradients.
    row: Vec<f32>,
}

impl HeadScratch {
    fn new(geometry: HeadGeometry) -> Self {
        let (l, d) = (geometry.chunk_size, geometry.head_dim);
        Self {
            cum: vec![0.0; l],
            igate: vec![0.0; l],
            row_stabiliser: vec![0.0; l],
            row_grad_normaliser: vec![0.0; l],
            grad_cum: vec![0.0; l],
            grad_igate: vec![0.0; l],
            keys_t: vec![0.0; d * l],
            values_t: vec![0.0; d * l],
            weighted_keys_t: vec![0.0; d * l],
            decay: vec![0.0; l * l],
            weights: vec![0.0; l * l],
            square: vec![0.0; l * l],
            grad_scores: vec![0.0; l * l],
            rows_a: vec![0.0; l * d],
            rows_b: vec![0.0; l * d],
            rows_c: vec![0.0; l * d],
            small_t: vec![0.0; d * d],
            row: vec![0.0; l],
        }
    }

    /// Gate terms and transposed keys of a chunk of `gates.len() / 2` rows; with
    /// `values`, the transposed values too (only the backward pass reads them).
    #[inline(always)]
    fn load_chunk<L: Lanes>(
        &mut self,
        lanes: L,
        d: usize,
        qkv: &[f32],
        gates: &[f32],
        values: bool,
    ) {
        let len = gates.len() / 2;
        // The log-sigmoids first, in a loop of their own that vectorises, then their
        // running sum.
        for ((cum, igate), g) in self
            .cum
            .iter_mut()
            .zip(&mut self.igate)
            .zip(gates.chunks_exact(2))
        {
            *cum = vmath::log_sigmoid(g[1]);
            *igate = g[0];
        }
        let mut total = 0.0;
        for cum in &mut self.cum[..len] {
            total += *cum;
            *cum = total;
        }
        lanes.transpose(qkv, 3 * d, d, d, &mut self.keys_t[..d * len]);
        if values {
            lanes.transpose(qkv, 3 * d, 2 * d, d, &mut self.values_t[..d * len]);
        }
    }

    /// `decay[τ, σ] = log D[τ, σ] = (cum[τ] − cum[σ]) + igate[σ]` for σ ≤ τ.
    #[inline(always)]
    fn fill_log_decay(&mut self, len: usize) {
        for tau in 0..len {
            let row = &mut self.decay[tau * len..tau * len + tau + 1];
            let total = self.cum[tau];
            for ((log_d, cum), igate) in row.iter_mut().zip(&self.cum).zip(&self.igate) {
                *log_d = (total - cum) + igate;
            }
        }
    }

    /// From log D and the row stabilisers: `decay = exp(log D − m)` on and below the
    /// diagonal and 0 above; `weights = (q·k)/√DH ⊙ decay` (0 above the diagonal).
    #[inline(always)]
    fn fill_weights<L: Lanes>(
        &mut self,
        lanes: L,
        geometry: HeadGeometry,
        qkv: &[f32],
        len: usize,
    ) {
        let d = geometry.head_dim;
        for tau in 0..len {
            let row = &mut self.decay[tau * len..(tau + 1) * len];
            // Up to a whole vector past the diagonal (values there are overwritten with 0
            // below): the scalar tail of `exp_shifted` is a libm call per value, and a
            // row's tail averaged half a vector, most of the chunk's exponentials.
            let exponentiated = (tau + 1).next_multiple_of(L::WIDTH).min(len);
            lanes.exp_shifted(&mut row[..exponentiated], self.row_stabiliser[tau]);
            row[tau + 1..].fill(0.0);
        }
        let square = &mut self.square[..len * len];
        square.fill(0.0);
        causal_gemm_acc(
            lanes,
            Causal::LowerOutput,
            (len, len, d),
            Strided::rows(qkv, 3 * d),
            &self.keys_t[..d * len],
            len,
            square,
            len,
        );
        lanes.scaled_product(
            &mut self.weights[..len * len],
            square,
            &self.decay[..len * len],
            geometry.key_scale(),
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn forward_head_avx512(
    lanes: avx512::Avx512,
    geometry: HeadGeometry,
    head: HeadForward<'_>,
    scratch: &mut HeadScratch,
) {
    forward_head(lanes, geometry, head, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_head_avx2(
    lanes: avx2::Avx2Fma,
    geometry: HeadGeometry,
    head: HeadForward<'_>,
    scratch: &mut HeadScratch,
) {
    forward_head(lanes, geometry, head, scratch)
}

#[inline(always)]
fn forward_head<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    head: HeadForward<'_>,
    scratch: &mut HeadScratch,
) {
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
    for chunk in 0..geometry.num_chunks() {
        let start = chunk * geometry.chunk_size;
        let len = geometry.chunk_size.min(geometry.seq_len - start);
        let chunk_qkv = geometry.chunk_rows(qkv, qkv_width, chunk);
        if chunk + 1 < geometry.num_chunks() {
            prefetch(geometry.chunk_rows(qkv, qkv_width, chunk + 1));
        }
        scratch.load_chunk(
            lanes,
            d,
            chunk_qkv,
            &gates[start * 2..(start + len) * 2],
            false,
        );
        let chunk_rows = &mut rows[start * row_width..(start + len) * row_width];
        if initial.is_some() {
            let (before, after) = states.split_at_mut((chunk + 1) * state_len);
            let prev = StateView::new(&before[chunk * state_len..], d);
            chunk_rows_forward(lanes, geometry, chunk_qkv, Some(prev), chunk_rows, scratch);
            chunk_state_forward(
                lanes,
                geometry,
                chunk_qkv,
                prev,
                &mut after[..state_len],
                scratch,
            );
        } else {
            chunk_rows_forward(lanes, geometry, chunk_qkv, None, chunk_rows, scratch);
        }
    }
}

/// Output rows of one chunk from its own inputs and the state before it.
#[inline(always)]
fn chunk_rows_forward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    prev: Option<StateView<'_>>,
    rows: &mut [f32],
    scratch: &mut HeadScratch,
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let len = qkv.len() / qkv_width;
    scratch.fill_log_decay(len);
    for tau in 0..len {
        let row_max = lanes.max_from(
            f32::NEG_INFINITY,
            &scratch.decay[tau * len..tau * len + tau + 1],
        );
        let log_inter = prev.map_or(f32::NEG_INFINITY, |prev| scratch.cum[tau] + prev.m);
        scratch.row_stabiliser[tau] = row_max.max(log_inter);
    }
    scratch.fill_weights(lanes, geometry, qkv, len);
    let num = &mut scratch.rows_a[..len * d];
    num.fill(0.0);
    causal_gemm_acc(
        lanes,
        Causal::LowerA,
        (len, d, len),
        Strided::rows(&scratch.weights[..len * len], len),
        &qkv[2 * d..],
        qkv_width,
        num,
        d,
    );
    if let Some(prev) = prev {
        // rows_b[τ] = C_prevᵀ q_τ
        let inter = &mut scratch.rows_b[..len * d];
        inter.fill(0.0);
        lanes.gemm_acc(
            (len, d, d),
            Strided::rows(qkv, qkv_width),
            prev.c,
            d,
            inter,
            d,
        );
    }
    for (tau, row) in rows.chunks_exact_mut(geometry.row_width()).enumerate() {
        let m_row = scratch.row_stabiliser[tau];
        let (h, stats) = row.split_at_mut(d);
        h.copy_from_slice(&scratch.rows_a[tau * d..(tau + 1) * d]);
        let mut normaliser = lanes.sum(&scratch.weights[tau * len..tau * len + tau + 1]);
        if let Some(prev) = prev {
            let inter_weight = ((scratch.cum[tau] + prev.m) - m_row).exp();
            lanes.axpy(h, inter_weight, &scratch.rows_b[tau * d..(tau + 1) * d]);
            let q = &qkv[tau * qkv_width..tau * qkv_width + d];
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

/// The state after a chunk from the state before it. Leaves the input weights
/// `exp(a_τ − m_next)` in `scratch.row` and the weighted keys in `weighted_keys_t`.
#[inline(always)]
fn chunk_state_forward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    prev: StateView<'_>,
    next: &mut [f32],
    scratch: &mut HeadScratch,
) {
    let d = geometry.head_dim;
    let len = qkv.len() / geometry.qkv_width();
    let total = scratch.cum[len - 1];
    let m_next = input_weights(lanes, scratch, len, prev.m, None);
    let carry = ((total + prev.m) - m_next).exp();
    let (c_next, rest) = next.split_at_mut(d * d);
    let (n_next, m_slot) = rest.split_at_mut(d);
    for (c, c_prev) in c_next.iter_mut().zip(prev.c) {
        *c = carry * c_prev;
    }
    lanes.gemm_acc(
        (d, d, len),
        Strided::rows(&scratch.weighted_keys_t[..d * len], len),
        &qkv[2 * d..],
        geometry.qkv_width(),
        c_next,
        d,
    );
    for (a, (n, n_prev)) in n_next.iter_mut().zip(prev.n).enumerate() {
        let keys = lanes.sum(&scratch.weighted_keys_t[a * len..(a + 1) * len]);
        *n = carry * n_prev + keys;
    }
    m_slot[0] = m_next;
}

/// Input weights of a chunk's state update: `row[τ] = exp(a_τ − m_next)` with
/// `a_τ = (g − cum[τ]) + igate[τ]`, and `weighted_keys_t[a, τ] = k_τ[a]·row[τ]/√DH`.
/// Returns `m_next` (computed unless given).
#[inline(always)]
fn input_weights<L: Lanes>(
    lanes: L,
    scratch: &mut HeadScratch,
    len: usize,
    m_prev: f32,
    m_next: Option<f32>,
) -> f32 {
    let total = scratch.cum[len - 1];
    let d = scratch.keys_t.len() / scratch.cum.len();
    for tau in 0..len {
        scratch.row[tau] = (total - scratch.cum[tau]) + scratch.igate[tau];
    }
    let m_next = m_next.unwrap_or_else(|| lanes.max_from(total + m_prev, &scratch.row[..len]));
    let key_scale = 1.0 / (d as f32).sqrt();
    lanes.exp_shifted(&mut scratch.row[..len], m_next);
    for (weighted, keys) in scratch.weighted_keys_t[..d * len]
        .chunks_exact_mut(len)
        .zip(scratch.keys_t.chunks_exact(len))
    {
        lanes.scaled_product(weighted, keys, &scratch.row[..len], key_scale);
    }
    m_next
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn backward_head_avx512(
    lanes: avx512::Avx512,
    geometry: HeadGeometry,
    head: HeadBackward<'_>,
    scratch: &mut HeadScratch,
) {
    backward_head(lanes, geometry, head, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_head_avx2(
    lanes: avx2::Avx2Fma,
    geometry: HeadGeometry,
    head: HeadBackward<'_>,
    scratch: &mut HeadScratch,
) {
    backward_head(lanes, geometry, head, scratch)
}

#[inline(always)]
fn backward_head<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    head: HeadBackward<'_>,
    scratch: &mut HeadScratch,
) {
    let HeadBackward {
        qkv,
        gates,
        initial,
        rows,
        states,
        grad_rows,
        grad_h_width,
        grad_final,
        grad_qkv,
        grad_gates,
        grad_initial,
    } = head;
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let row_width = geometry.row_width();
    let state_len = geometry.state_len();
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
        let chunk_qkv = geometry.chunk_rows(qkv, qkv_width, chunk);
        if chunk > 0 {
            prefetch(geometry.chunk_rows(qkv, qkv_width, chunk - 1));
        }
        let chunk_gates = &gates[start * 2..(start + len) * 2];
        scratch.load_chunk(lanes, d, chunk_qkv, chunk_gates, true);
        scratch.grad_cum[..len].fill(0.0);
        scratch.grad_igate[..len].fill(0.0);
        // The chunk's q, k, v gradients are summed in place, in its rows of `grad_qkv`.
        let chunk_grad_qkv = &mut grad_qkv[start * qkv_width..(start + len) * qkv_width];
        chunk_grad_qkv.fill(0.0);
        let prev = initial.map(|_| StateView::new(&states[chunk * state_len..], d));
        next_c.fill(0.0);
        next_n.fill(0.0);
        if let Some(prev) = prev {
            let m_next = states[(chunk + 2) * state_len - 1];
            chunk_state_backward(
                lanes,
                geometry,
                chunk_qkv,
                prev,
                m_next,
                (&carry_c, &carry_n),
                (&mut next_c, &mut next_n),
                chunk_grad_qkv,
                scratch,
            );
        }
        chunk_rows_backward(
            lanes,
            geometry,
            chunk_qkv,
            prev,
            &rows[start * row_width..(start + len) * row_width],
            &grad_rows[start * grad_h_width..(start + len) * grad_h_width],
            grad_h_width,
            (&mut next_c, &mut next_n),
            chunk_grad_qkv,
            scratch,
        );
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

/// Panics unless [`Lanes::transpose`]'s arguments are in bounds; returns the row count n.
#[inline(always)]
fn check_transpose_bounds(
    rows: &[f32],
    stride: usize,
    first: usize,
    width: usize,
    out: &[f32],
) -> usize {
    let n = out.len().checked_div(width).unwrap_or(0);
    assert!(
        n == 0
            || (out.len() == n * width
                && first + width <= stride
                && (n - 1) * stride + first + width <= rows.len()),
        "transpose: out of bounds"
    );
    n
}

/// The part `sigmas × columns` of [`Lanes::transpose`], one value at a time (bounds checked by
/// [`check_transpose_bounds`]).
#[inline(always)]
fn transpose_block(
    rows: &[f32],
    stride: usize,
    first: usize,
    n: usize,
    (sigmas, columns): (std::ops::Range<usize>, std::ops::Range<usize>),
    out: &mut [f32],
) {
    for sigma in sigmas {
        let row = &rows[sigma * stride + first..];
        for a in columns.clone() {
            // SAFETY: a < width and σ < n, so a·n + σ < width·n = out.len() (checked).
            unsafe { *out.get_unchecked_mut(a * n + sigma) = *row.get_unchecked(a) };
        }
    }
}

/// `out[j·d + i] = m[i·d + j]` for a d×d matrix.
#[inline(always)]
fn transpose_square<L: Lanes>(lanes: L, m: &[f32], d: usize, out: &mut [f32]) {
    lanes.transpose(m, d, 0, d, &mut out[..d * d]);
}

/// Backward of the state update of one chunk: adds to the k and v gradients in `grad_qkv`
/// (the chunk's `[L, 3·DH]` rows), to the igate and `cum` gradients and to the gradient of the
/// state before the chunk (`next`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_state_backward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    prev: StateView<'_>,
    m_next: f32,
    (carry_c, carry_n): (&[f32], &[f32]),
    (next_c, next_n): (&mut [f32], &mut [f32]),
    grad_qkv: &mut [f32],
    scratch: &mut HeadScratch,
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let key_scale = geometry.key_scale();
    let len = qkv.len() / qkv_width;
    let total = scratch.cum[len - 1];
    input_weights(lanes, scratch, len, prev.m, Some(m_next));
    let carry = ((total + prev.m) - m_next).exp();
    let grad_carry = lanes.dot(carry_c, prev.c) + lanes.dot(carry_n, prev.n);
    lanes.axpy(next_c, carry, carry_c);
    lanes.axpy(next_n, carry, carry_n);
    let mut grad_total = grad_carry * carry;
    // rows_b[τ] = dC v_τ + dn: the gradient w.r.t. the weighted key of row τ.
    transpose_square(lanes, carry_c, d, &mut scratch.small_t);
    let projected = &mut scratch.rows_b[..len * d];
    for row in projected.chunks_exact_mut(d) {
        row.copy_from_slice(carry_n);
    }
    lanes.gemm_acc(
        (len, d, d),
        Strided::rows(&qkv[2 * d..], qkv_width),
        &scratch.small_t,
        d,
        projected,
        d,
    );
    // grad_v[τ] += weight_τ/√DH · Σ_a k_τ[a] dC[a, :]
    lanes.gemm_acc(
        (len, d, d),
        Strided::rows(&scratch.weighted_keys_t[..d * len], len).transposed(),
        carry_c,
        d,
        &mut grad_qkv[2 * d..],
        qkv_width,
    );
    for tau in 0..len {
        let weight = scratch.row[tau];
        let k = &qkv[tau * qkv_width + d..tau * qkv_width + 2 * d];
        let projected = &scratch.rows_b[tau * d..(tau + 1) * d];
        lanes.axpy(
            &mut grad_qkv[tau * qkv_width + d..tau * qkv_width + 2 * d],
            weight * key_scale,
            projected,
        );
        let grad_log_input = key_scale * lanes.dot(k, projected) * weight;
        grad_total += grad_log_input;
        scratch.grad_cum[tau] -= grad_log_input;
        scratch.grad_igate[tau] += grad_log_input;
    }
    scratch.grad_cum[len - 1] += grad_total;
}

/// Backward of the output rows of one chunk: adds to the q, k and v gradients in `grad_qkv`
/// (the chunk's `[L, 3·DH]` rows), to the igate and `cum` gradients and to the gradient of
/// the state before the chunk (`next`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_rows_backward<L: Lanes>(
    lanes: L,
    geometry: HeadGeometry,
    qkv: &[f32],
    prev: Option<StateView<'_>>,
    rows: &[f32],
    grad_rows: &[f32],
    grad_h_width: usize,
    (next_c, next_n): (&mut [f32], &mut [f32]),
    grad_qkv: &mut [f32],
    scratch: &mut HeadScratch,
) {
    let d = geometry.head_dim;
    let qkv_width = geometry.qkv_width();
    let row_width = geometry.row_width();
    let key_scale = geometry.key_scale();
    let len = qkv.len() / qkv_width;
    // rows_a[τ] = dL/dnum_τ; row_grad_normaliser[τ] = dL/db_τ.
    for tau in 0..len {
        let row = &rows[tau * row_width..(tau + 1) * row_width];
        let (h, stats) = row.split_at(d);
        let (m_row, normaliser) = (stats[0], stats[1]);
        let grad_h = &grad_rows[tau * grad_h_width..tau * grad_h_width + d];
        let floor = (-m_row).exp();
        let den = normaliser.abs().max(floor) + DENOMINATOR_EPS;
        for (gn, gh) in scratch.rows_a[tau * d..(tau + 1) * d]
            .iter_mut()
            .zip(grad_h)
        {
            *gn = gh / den;
        }
        let grad_den = -lanes.dot(grad_h, h) / den;
        // The max picks |b| only above the floor; the floor depends on m alone.
        scratch.row_grad_normaliser[tau] = if normaliser.abs() > floor {
            grad_den * normaliser.signum()
        } else {
            0.0
        };
        scratch.row_stabiliser[tau] = m_row;
    }
    scratch.fill_log_decay(len);
    scratch.fill_weights(lanes, geometry, qkv, len);
    let grad_num = &scratch.rows_a[..len * d];
    // square[τ, σ] = dL/dweight[τ, σ] = grad_num_τ · v_σ + dL/db_τ
    let grad_weights = &mut scratch.square[..len * len];
    for (tau, row) in grad_weights.chunks_exact_mut(len).enumerate() {
        row.fill(scratch.row_grad_normaliser[tau]);
    }
    causal_gemm_acc(
        lanes,
        Causal::LowerOutput,
        (len, len, d),
        Strided::rows(grad_num, d),
        &scratch.values_t[..d * len],
        len,
        grad_weights,
        len,
    );
    let weights = &scratch.weights[..len * len];
    causal_gemm_acc(
        lanes,
        Causal::UpperA,
        (len, d, len),
        Strided::rows(weights, len).transposed(),
        grad_num,
        d,
        &mut grad_qkv[2 * d..],
        qkv_width,
    );
    lanes.scaled_product(
        &mut scratch.grad_scores[..len * len],
        grad_weights,
        &scratch.decay[..len * len],
        key_scale,
    );
    for tau in 0..len {
        let n = tau + 1;
        let grad_log_decay = &mut scratch.row[..n];
        lanes.scaled_product(
            grad_log_decay,
            &grad_weights[tau * len..tau * len + n],
            &weights[tau * len..tau * len + n],
            1.0,
        );
        let grad_cum_tau = lanes.sum(grad_log_decay);
        lanes.axpy(&mut scratch.grad_cum[..n], -1.0, grad_log_decay);
        lanes.axpy(&mut scratch.grad_igate[..n], 1.0, grad_log_decay);
        scratch.grad_cum[tau] += grad_cum_tau;
    }
    let grad_scores = &scratch.grad_scores[..len * len];
    causal_gemm_acc(
        lanes,
        Causal::LowerA,
        (len, d, len),
        Strided::rows(grad_scores, len),
        &qkv[d..],
        qkv_width,
        grad_qkv,
        qkv_width,
    );
    causal_gemm_acc(
        lanes,
        Causal::UpperA,
        (len, d, len),
        Strided::rows(grad_scores, len).transposed(),
        qkv,
        qkv_width,
        &mut grad_qkv[d..],
        qkv_width,
    );
    if let Some(prev) = prev {
        // rows_b[τ] = C_prev · grad_num_τ
        transpose_square(lanes, prev.c, d, &mut scratch.small_t);
        let projected = &mut scratch.rows_b[..len * d];
        projected.fill(0.0);
        lanes.gemm_acc(
            (len, d, d),
            Strided::rows(grad_num, d),
            &scratch.small_t,
            d,
            projected,
            d,
        );
        for tau in 0..len {
            let q = &qkv[tau * qkv_width..tau * qkv_width + d];
            let grad_b = scratch.row_grad_normaliser[tau];
            let inter_weight = ((scratch.cum[tau] + prev.m) - scratch.row_stabiliser[tau]).exp();
            let projected = &scratch.rows_b[tau * d..(tau + 1) * d];
            let grad_inter_weight = lanes.dot(q, projected) + grad_b * lanes.dot(prev.n, q);
            let grad_q = &mut grad_qkv[tau * qkv_width..tau * qkv_width + d];
            lanes.axpy(grad_q, inter_weight, projected);
            lanes.axpy(grad_q, inter_weight * grad_b, prev.n);
            scratch.grad_cum[tau] += grad_inter_weight * inter_weight;
            lanes.axpy(next_n, inter_weight * grad_b, q);
            // rows_c[τ] = inter_weight_τ · grad_num_τ, for dC_prev = Qᵀ rows_c
            let weighted = &mut scratch.rows_c[tau * d..(tau + 1) * d];
            weighted.fill(0.0);
            lanes.axpy(
                weighted,
                inter_weight,
                &scratch.rows_a[tau * d..(tau + 1) * d],
            );
        }
        lanes.gemm_acc(
            (d, d, len),
            Strided::rows(qkv, qkv_width).transposed(),
            &scratch.rows_c[..len * d],
            d,
            next_c,
            d,
        );
    }
}

/// Values the forward pass keeps for the backward pass while gradients are tracked (like
/// torch's `save_for_backward`): per head the rows `[h | m_row | b_row]` and, for the
/// chunkwise form, the state record before every chunk and the final one.
type Tape = Option<std::sync::OnceLock<Vec<f32>>>;

fn tape_for(inputs: &[&Tensor]) -> Tape {
    inputs
        .iter()
        .any(|t| t.track_op())
        .then(std::sync::OnceLock::new)
}

fn recorded<'a>(op: &str, tape: &'a Tape) -> Result<&'a [f32]> {
    tape.as_ref()
        .and_then(|t| t.get())
        .map(Vec::as_slice)
        .ok_or_else(|| {
            Error::Msg(format!(
                "{op}: backward pass without a recorded forward pass (inputs were not tracked)"
            ))
        })
}

/// The stabilised parallel form as a custom op on (qkv, gates); output h `[B, NH, S, DH]`.
struct ParallelOp {
    geometry: HeadGeometry,
    tape: Tape,
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
        let qkv = contiguous_data(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = contiguous_data(op, "gates", gates_storage, gates_layout)?;
        let (batch, heads) = (qkv_layout.dims()[0], qkv_layout.dims()[1]);
        let h_len = g.seq_len * g.head_dim;
        let mut rows = output_buffer(batch * heads * g.rows_len());
        let mut h = output_buffer(batch * heads * h_len);
        rows.par_chunks_mut(g.rows_len())
            .zip(h.par_chunks_mut(h_len))
            .enumerate()
            .for_each_init(
                || HeadScratch::new(g),
                |scratch, (head, (rows, h))| {
                    let forward = HeadForward {
                        qkv: &qkv[head * g.seq_len * g.qkv_width()..][..g.seq_len * g.qkv_width()],
                        gates: &gates[head * g.seq_len * 2..][..g.seq_len * 2],
                        initial: None,
                        rows,
                        states: &mut [],
                    };
                    with_best_lanes!(
                        forward_head_avx512,
                        forward_head_avx2,
                        forward_head(g, forward, scratch)
                    );
                    copy_h(g, rows, h);
                },
            );
        if let Some(tape) = &self.tape {
            let _ = tape.set(rows);
        }
        let shape = Shape::from((batch, heads, g.seq_len, g.head_dim));
        Ok((CpuStorage::F32(h), shape))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        gates: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let g = self.geometry;
        let rows = recorded(op, &self.tape)?;
        let mut grad_qkv = output_buffer(qkv.elem_count());
        let mut grad_gates = output_buffer(gates.elem_count());
        let qkv_len = g.seq_len * g.qkv_width();
        let h_len = g.seq_len * g.head_dim;
        with_contiguous(op, "qkv", qkv, |qkv_data| {
            with_contiguous(op, "gates", gates, |gates_data| {
                with_contiguous(op, "output gradient", grad_res, |grad_h| {
                    grad_qkv
                        .par_chunks_mut(qkv_len)
                        .zip(grad_gates.par_chunks_mut(g.seq_len * 2))
                        .enumerate()
                        .for_each_init(
                            || HeadScratch::new(g),
                            |scratch, (head, (grad_qkv, grad_gates))| {
                                let backward = HeadBackward {
                                    qkv: &qkv_data[head * qkv_len..][..qkv_len],
                                    gates: &gates_data[head * g.seq_len * 2..][..g.seq_len * 2],
                                    initial: None,
                                    rows: &rows[head * g.rows_len()..][..g.rows_len()],
                                    states: &[],
                                    grad_rows: &grad_h[head * h_len..][..h_len],
                                    grad_h_width: g.head_dim,
                                    grad_final: None,
                                    grad_qkv,
                                    grad_gates,
                                    grad_initial: None,
                                };
                                with_best_lanes!(
                                    backward_head_avx512,
                                    backward_head_avx2,
                                    backward_head(g, backward, scratch)
                                );
                            },
                        );
                    Ok(())
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(grad_qkv, qkv.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(grad_gates, gates.shape(), &Device::Cpu)?),
        ))
    }
}

/// Copies the h part of a head's rows `[h | m_row | b_row]` into `h` `[S, DH]`.
fn copy_h(g: HeadGeometry, rows: &[f32], h: &mut [f32]) {
    for (h_row, row) in h
        .chunks_exact_mut(g.head_dim)
        .zip(rows.chunks_exact(g.row_width()))
    {
        h_row.copy_from_slice(&row[..g.head_dim]);
    }
}

/// The chunkwise form as a custom op on (qkv, gates, initial state records). The one output
/// is flat: h of every head `[B, NH, S, DH]`, then every head's final state record
/// `[B, NH, DH·DH + DH + 1]`, so that h is a contiguous view of it and candle's autodiff routes
/// the gradients of h and of the final state into one `bwd` call.
struct ChunkwiseOp {
    geometry: HeadGeometry,
    tape: Tape,
}

impl ChunkwiseOp {
    /// Runs one head: its records (rows, then the state before every chunk and the last one)
    /// go to `record`, h and the final state to the output.
    fn forward_one(
        g: HeadGeometry,
        (qkv, gates, initial): (&[f32], &[f32], &[f32]),
        record: &mut [f32],
        (h, final_state): (&mut [f32], &mut [f32]),
        scratch: &mut HeadScratch,
    ) {
        let (rows, states) = record.split_at_mut(g.rows_len());
        let forward = HeadForward {
            qkv,
            gates,
            initial: Some(initial),
            rows,
            states,
        };
        with_best_lanes!(
            forward_head_avx512,
            forward_head_avx2,
            forward_head(g, forward, scratch)
        );
        copy_h(g, rows, h);
        final_state.copy_from_slice(&states[g.num_chunks() * g.state_len()..]);
    }
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
        let qkv = contiguous_data(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = contiguous_data(op, "gates", gates_storage, gates_layout)?;
        let initial = contiguous_data(op, "initial state", initial_storage, initial_layout)?;
        let heads = qkv_layout.dims()[0] * qkv_layout.dims()[1];
        let (h_len, state_len, record_len) = (
            g.seq_len * g.head_dim,
            g.state_len(),
            g.chunkwise_record_len(),
        );
        let inputs = |head: usize| {
            (
                &qkv[head * g.seq_len * g.qkv_width()..][..g.seq_len * g.qkv_width()],
                &gates[head * g.seq_len * 2..][..g.seq_len * 2],
                &initial[head * state_len..][..state_len],
            )
        };
        let mut out = output_buffer(heads * (h_len + state_len));
        let (h, final_states) = out.split_at_mut(heads * h_len);
        let outputs = h
            .par_chunks_mut(h_len)
            .zip(final_states.par_chunks_mut(state_len))
            .enumerate();
        match &self.tape {
            // Training: every head's records stay for the backward pass.
            Some(tape) => {
                let mut records = output_buffer(heads * record_len);
                outputs
                    .zip(records.par_chunks_mut(record_len))
                    .for_each_init(
                        || HeadScratch::new(g),
                        |scratch, ((head, output), record)| {
                            Self::forward_one(g, inputs(head), record, output, scratch)
                        },
                    );
                let _ = tape.set(records);
            }
            // Inference: one record buffer per worker, reused head after head.
            None => outputs.for_each_init(
                || (HeadScratch::new(g), vec![0f32; record_len]),
                |(scratch, record), (head, output)| {
                    Self::forward_one(g, inputs(head), record, output, scratch)
                },
            ),
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from(heads * (h_len + state_len)),
        ))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        gates: &Tensor,
        initial: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let g = self.geometry;
        let records = recorded(op, &self.tape)?;
        let mut grad_qkv = output_buffer(qkv.elem_count());
        let mut grad_gates = output_buffer(gates.elem_count());
        let mut grad_initial = output_buffer(initial.elem_count());
        let qkv_len = g.seq_len * g.qkv_width();
        let record_len = g.chunkwise_record_len();
        let state_len = g.state_len();
        let h_len = g.seq_len * g.head_dim;
        let heads = grad_initial.len() / state_len;
        with_contiguous(op, "qkv", qkv, |qkv_data| {
            with_contiguous(op, "gates", gates, |gates_data| {
                with_contiguous(op, "initial state", initial, |initial_data| {
                    with_contiguous(op, "output gradient", grad_res, |grad_out| {
                        let (grad_h, grad_final) = grad_out.split_at(heads * h_len);
                        grad_qkv
                            .par_chunks_mut(qkv_len)
                            .zip(grad_gates.par_chunks_mut(g.seq_len * 2))
                            .zip(grad_initial.par_chunks_mut(state_len))
                            .enumerate()
                            .for_each_init(
                                || HeadScratch::new(g),
                                |scratch, (head, ((grad_qkv, grad_gates), grad_initial))| {
                                    let (rows, states) = records[head * record_len..][..record_len]
                                        .split_at(g.rows_len());
                                    let backward = HeadBackward {
                                        qkv: &qkv_data[head * qkv_len..][..qkv_len],
                                        gates: &gates_data[head * g.seq_len * 2..][..g.seq_len * 2],
                                        initial: Some(
                                            &initial_data[head * state_len..][..state_len],
                                        ),
                                        rows,
                                        states,
                                        grad_rows: &grad_h[head * h_len..][..h_len],
                                        grad_h_width: g.head_dim,
                                        grad_final: Some(
                                            &grad_final[head * state_len..][..state_len],
                                        ),
                                        grad_qkv,
                                        grad_gates,
                                        grad_initial: Some(grad_initial),
                                    };
                                    with_best_lanes!(
                                        backward_head_avx512,
                                        backward_head_avx2,
                                        backward_head(g, backward, scratch)
                                    );
                                },
                            );
                        Ok(())
                    })
                })
            })
        })?;
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
        let qkv = contiguous_data(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = contiguous_data(op, "gates", gates_storage, gates_layout)?;
        let states = contiguous_data(op, "state", state_storage, state_layout)?;
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
                let log_forget = vmath::log_sigmoid(gates[1]) + prev.m;
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

/// Fused stabilised parallel form; see [`super::parallel`].
pub fn parallel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
) -> Result<Tensor> {
    check_sequence_inputs("mlstm parallel", q, k, v, igate, fgate)?;
    parallel_packed(&pack_qkv(q, k, v)?, &pack_gates(igate, fgate)?)
}

/// The parallel form on packed inputs (checked by the caller): qkv `[B, NH, S, 3·DH]`,
/// gates `[B, NH, S, 2]`. Returns h `[B, NH, S, DH]`.
pub(super) fn parallel_packed(qkv: &Tensor, gates: &Tensor) -> Result<Tensor> {
    let (_, _, seq_len, width) = qkv.dims4()?;
    let geometry = HeadGeometry {
        seq_len,
        head_dim: width / 3,
        chunk_size: seq_len,
    };
    let tape = tape_for(&[qkv, gates]);
    qkv.contiguous()?
        .apply_op2(&gates.contiguous()?, ParallelOp { geometry, tape })
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
    if let Some(state) = initial {
        check_state(OP, state, dims.batch, dims.heads, dims.head_dim, q.device())?;
    }
    chunkwise_packed(
        &pack_qkv(q, k, v)?,
        &pack_gates(igate, fgate)?,
        chunk_size,
        initial,
    )
}

/// The chunkwise form on packed inputs (checked by the caller); h is returned as a view
/// `[B, NH, S, DH]` of the op's output.
pub(super) fn chunkwise_packed(
    qkv: &Tensor,
    gates: &Tensor,
    chunk_size: usize,
    initial: Option<&MlstmState>,
) -> Result<(Tensor, MlstmState)> {
    let (batch, heads, seq_len, width) = qkv.dims4()?;
    let d = width / 3;
    let geometry = HeadGeometry {
        seq_len,
        head_dim: d,
        chunk_size: chunk_size.min(seq_len),
    };
    let initial = match initial {
        Some(state) => pack_state(state)?,
        None => Tensor::zeros(
            (batch, heads, geometry.state_len()),
            DType::F32,
            qkv.device(),
        )?,
    };
    let tape = tape_for(&[qkv, gates, &initial]);
    let out = qkv.contiguous()?.apply_op3(
        &gates.contiguous()?,
        &initial,
        ChunkwiseOp { geometry, tape },
    )?;
    let h_len = batch * heads * seq_len * d;
    let h = out
        .narrow(0, 0, h_len)?
        .reshape((batch, heads, seq_len, d))?;
    // The state is carried across calls: small copies, so that it does not pin the
    // O(S) output buffer for as long as a stream lives.
    let records = out
        .narrow(0, h_len, batch * heads * geometry.state_len())?
        .reshape((batch, heads, geometry.state_len()))?;
    let final_state = unpack_state(&records, d)?;
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
