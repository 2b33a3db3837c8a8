//! The mLSTM kernels' [`Lanes`] on CPUs with AVX-512: the chunk products (`gemm_acc`) in
//! 16-lane vectors, everything else as with AVX2. The products are the kernels' largest share
//! of time (about a third of the chunkwise forward + backward at DH 32, BENCHMARKS.md), and
//! at DH 32 one row of C is two 16-lane vectors where AVX2 needs four 8-lane ones.

use std::arch::x86_64::*;

use super::avx2::Avx2Fma;
use super::{Lanes, Strided, check_gemm_bounds};

/// Proof that the running CPU has AVX-512F as well as AVX2 and FMA; only
/// [`Avx512::detect`] makes one.
#[derive(Clone, Copy)]
pub(super) struct Avx512 {
    avx2: Avx2Fma,
}

impl Avx512 {
    pub(super) fn detect() -> Option<Self> {
        let avx2 = Avx2Fma::detect()?;
        crate::xlstm::kernels::simd::avx512().then_some(Self { avx2 })
    }

    /// One row block of `gemm_acc`: `ROWS` (1 or 4) rows of C from column 0 to n, 32 columns
    /// per step in registers, then 16, then the rest under a lane mask.
    ///
    /// # Safety
    /// AVX-512F is available and `check_gemm_bounds` passed.
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
        // SAFETY: the caller checked that rows i..i + ROWS of A and C, and rows 0..k of B,
        // are in bounds for columns 0..n; the masked tail touches only columns below n.
        unsafe {
            let ap = a.data.as_ptr();
            let a_at = |r: usize, p: usize| *ap.add((i + r) * a.row + p * a.col);
            let c_at = |r: usize, j: usize| c.add((i + r) * ldc + j);
            let mut j = 0;
            while j + 32 <= n {
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                for p in 0..k {
                    let b0 = _mm512_loadu_ps(b.add(p * ldb + j));
                    let b1 = _mm512_loadu_ps(b.add(p * ldb + j + 16));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let a_rp = _mm512_set1_ps(a_at(r, p));
                        acc_r[0] = _mm512_fmadd_ps(a_rp, b0, acc_r[0]);
                        acc_r[1] = _mm512_fmadd_ps(a_rp, b1, acc_r[1]);
                    }
                }
                for (r, acc_r) in acc.iter().enumerate() {
                    let out = c_at(r, j);
                    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc_r[0]));
                    let out = out.add(16);
                    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc_r[1]));
                }
                j += 32;
            }
            while j < n {
                let width = (n - j).min(16);
                let mask: __mmask16 = if width == 16 { !0 } else { (1 << width) - 1 };
                let mut acc = [_mm512_setzero_ps(); ROWS];
                for p in 0..k {
                    let b0 = _mm512_maskz_loadu_ps(mask, b.add(p * ldb + j));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        *acc_r = _mm512_fmadd_ps(_mm512_set1_ps(a_at(r, p)), b0, *acc_r);
                    }
                }
                for (r, acc_r) in acc.iter().enumerate() {
                    let out = c_at(r, j);
                    let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), *acc_r);
                    _mm512_mask_storeu_ps(out, mask, sum);
                }
                j += width;
            }
        }
    }
}

impl Lanes for Avx512 {
    const WIDTH: usize = Avx2Fma::WIDTH;

    #[inline(always)]
    fn dot(self, x: &[f32], y: &[f32]) -> f32 {
        self.avx2.dot(x, y)
    }

    #[inline(always)]
    fn sum(self, x: &[f32]) -> f32 {
        self.avx2.sum(x)
    }

    #[inline(always)]
    fn axpy(self, y: &mut [f32], alpha: f32, x: &[f32]) {
        self.avx2.axpy(y, alpha, x)
    }

    #[inline(always)]
    fn exp_shifted(self, x: &mut [f32], shift: f32) {
        self.avx2.exp_shifted(x, shift)
    }

    #[inline(always)]
    fn max_from(self, init: f32, x: &[f32]) -> f32 {
        self.avx2.max_from(init, x)
    }

    #[inline(always)]
    fn scaled_product(self, out: &mut [f32], x: &[f32], y: &[f32], scale: f32) {
        self.avx2.scaled_product(out, x, y, scale)
    }

    #[inline(always)]
    fn transpose(self, rows: &[f32], stride: usize, first: usize, width: usize, out: &mut [f32]) {
        self.avx2.transpose(rows, stride, first, width, out)
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
        // SAFETY: AVX-512F is present (an `Avx512` exists) and the bounds check above covers
        // every row block.
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

#[cfg(test)]
mod tests {
    use super::super::Portable;
    use super::*;

    /// A deterministic spread of values in [−1, 1).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    /// Every lane implementation the CPU runs computes the portable products: row blocks of
    /// four and one, 32 and 16 columns and masked tails, plain and transposed A.
    #[test]
    fn vector_products_match_the_portable_ones() {
        let avx2 = Avx2Fma::detect();
        let avx512 = Avx512::detect();
        for (m, n, k) in [
            (1, 1, 1),
            (3, 7, 5),
            (4, 16, 8),
            (8, 32, 32),
            (9, 40, 3),
            (6, 24, 17),
        ] {
            let a = values(m * k, 1);
            let b = values(k * (n + 3), 2);
            for transposed in [false, true] {
                let a = if transposed {
                    Strided::rows(&a, m).transposed()
                } else {
                    Strided::rows(&a, k)
                };
                let ldc = n + 5;
                let start = values(m * ldc, 3);
                let mut want = start.clone();
                Portable.gemm_acc((m, n, k), a, &b, n + 3, &mut want, ldc);
                let check = |got: &[f32], name: &str| {
                    for (index, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{name} ({m}, {n}, {k}) at {index}: {g} vs {w}"
                        );
                    }
                };
                if let Some(lanes) = avx2 {
                    let mut got = start.clone();
                    lanes.gemm_acc((m, n, k), a, &b, n + 3, &mut got, ldc);
                    check(&got, "avx2");
                }
                if let Some(lanes) = avx512 {
                    let mut got = start.clone();
                    lanes.gemm_acc((m, n, k), a, &b, n + 3, &mut got, ldc);
                    check(&got, "avx512");
                }
            }
        }
    }
}
