//! Inner loops of the fused sLSTM scan, with an AVX2+FMA implementation chosen at run time
//! and a portable one for every other CPU.
//!
//! Explicit intrinsics rather than auto-vectorisation: the crate's dev profile builds with
//! opt-level 1, where LLVM does not vectorise loops, and the scan is run from tests and
//! benchmarks in that profile too. The vector transcendental functions (`exp`, `ln`) are the
//! Cephes single-precision polynomials (about 2 ulp); tanh and sigmoid are built from `exp`
//! in forms that cannot overflow.

/// Per-unit state of one (batch row, head) pair, each slice `DH` long.
pub(super) struct UnitState<'a> {
    pub h: &'a mut [f32],
    pub c: &'a mut [f32],
    pub n: &'a mut [f32],
    pub m: &'a mut [f32],
}

/// Values of one backward step of one pair, each slice `DH` long unless noted.
pub(super) struct BackwardStep<'a> {
    /// The forward tape of this step, `[TAPE_VALUES, DH]`.
    pub tape: &'a [f32],
    pub c_prev: &'a [f32],
    pub n_prev: &'a [f32],
    /// Gradient of the loss with respect to this step's output h.
    pub grad_h: &'a [f32],
    /// Gradient reaching h_t through the next step's recurrent input.
    pub grad_h_recurrent: &'a [f32],
    /// In: gradients of c_t, n_t from later steps; out: those of c_{t-1}, n_{t-1}.
    pub dc: &'a mut [f32],
    pub dn: &'a mut [f32],
    /// Out: gradients of the gate pre-activations, `[4, DH]`.
    pub dp: &'a mut [f32],
    /// Out (first step only): gradient of the initial stabiliser m₀.
    pub dm0: Option<&'a mut [f32]>,
}

/// Which implementation of the inner loops runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernels {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::xlstm::kernels::simd::avx2_fma() {
            return Kernels::Avx2Fma;
        }
        Kernels::Portable
    }

    /// `acc += Σ_k weights[k] · rows[k]`, rows of `acc.len()` values stored one after another.
    pub fn accumulate_rows(self, acc: &mut [f32], weights: &[f32], rows: &[f32]) {
        assert_eq!(
            rows.len(),
            weights.len() * acc.len(),
            "accumulate_rows sizes"
        );
        match self {
            Kernels::Portable => portable::accumulate_rows(acc, weights, rows),
            // SAFETY: this variant is only constructed after detecting AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2Fma => unsafe { avx2::accumulate_rows(acc, weights, rows) },
        }
    }

    /// `dots[k] = rows[k] · vector` for every row k of `vector.len()` values: the gradient
    /// reaching a matrix-vector product's input.
    pub fn row_dots(self, rows: &[f32], vector: &[f32], dots: &mut [f32]) {
        assert_eq!(rows.len(), dots.len() * vector.len(), "row_dots sizes");
        match self {
            Kernels::Portable => portable::row_dots(rows, vector, dots),
            // SAFETY: this variant is only constructed after detecting AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2Fma => unsafe { avx2::row_dots(rows, vector, dots) },
        }
    }

    /// One forward step of every unit of a pair: from the gate pre-activations `pre` `[4, DH]`
    /// updates `state`, writes h to `h_out` and, when given, the tape `[TAPE_VALUES, DH]`.
    pub fn forward_step(
        self,
        pre: &[f32],
        state: &mut UnitState,
        h_out: &mut [f32],
        tape: Option<&mut [f32]>,
    ) {
        let dh = h_out.len();
        assert!(
            pre.len() == 4 * dh
                && state.h.len() == dh
                && state.c.len() == dh
                && state.n.len() == dh
                && state.m.len() == dh
                && tape
                    .as_ref()
                    .is_none_or(|t| t.len() == super::fused_cpu::TAPE_VALUES * dh),
            "forward_step sizes"
        );
        let mut tape = tape;
        let vector_units = match self {
            Kernels::Portable => 0,
            // SAFETY: this variant is only constructed after detecting AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2Fma => unsafe {
                avx2::forward_step(pre, state, h_out, tape.as_deref_mut())
            },
        };
        portable::forward_step(vector_units, pre, state, h_out, tape);
    }

    /// One backward step of every unit of a pair (stabiliser held constant).
    pub fn backward_step(self, step: &mut BackwardStep) {
        let dh = step.dc.len();
        assert!(
            step.tape.len() == super::fused_cpu::TAPE_VALUES * dh
                && step.c_prev.len() == dh
                && step.n_prev.len() == dh
                && step.grad_h.len() == dh
                && step.grad_h_recurrent.len() == dh
                && step.dn.len() == dh
                && step.dp.len() == 4 * dh
                && step.dm0.as_ref().is_none_or(|d| d.len() == dh),
            "backward_step sizes"
        );
        let vector_units = match self {
            Kernels::Portable => 0,
            // SAFETY: this variant is only constructed after detecting AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2Fma => unsafe { avx2::backward_step(step) },
        };
        portable::backward_step(vector_units, step);
    }
}

/// Asks the cache for one head's four gate slots at step `t` of a row's `[S, 4H]` gate
/// values: gate g's DH units start at `g·H + head_offset`. Only a hint: no effect on values,
/// and none at all off x86-64.
#[inline(always)]
pub fn prefetch_gate_slots(
    steps: &[f32],
    t: usize,
    hidden: usize,
    head_offset: usize,
    head_dim: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::NUM_GATES;
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        const LINE_FLOATS: usize = 16;
        let step = &steps[t * NUM_GATES * hidden..(t + 1) * NUM_GATES * hidden];
        for gate in 0..NUM_GATES {
            let first = gate * hidden + head_offset;
            for unit in (first..first + head_dim).step_by(LINE_FLOATS) {
                // SAFETY: a prefetch only hints the cache; the address lies inside `steps`.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(step[unit..].as_ptr().cast()) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (steps, t, hidden, head_offset, head_dim);
}

mod portable {
    use super::super::fused_cpu::{
        TAPE_C, TAPE_F, TAPE_I, TAPE_N, TAPE_O, TAPE_SIG_NEG_F, TAPE_VALUES, TAPE_Z,
    };
    use super::{BackwardStep, UnitState};

    pub fn accumulate_rows(acc: &mut [f32], weights: &[f32], rows: &[f32]) {
        for (&w, row) in weights.iter().zip(rows.chunks_exact(acc.len())) {
            for (a, &r) in acc.iter_mut().zip(row) {
                *a += w * r;
            }
        }
    }

    pub fn row_dots(rows: &[f32], vector: &[f32], dots: &mut [f32]) {
        for (dot, row) in dots.iter_mut().zip(rows.chunks_exact(vector.len())) {
            *dot = row.iter().zip(vector).map(|(&r, &v)| r * v).sum();
        }
    }

    /// logσ(v) and σ(−v), finite for any finite v.
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

    /// `max` that keeps a NaN (like torch), where `f32::max` would drop it.
    fn max_or_nan(a: f32, b: f32) -> f32 {
        if a.is_nan() || b.is_nan() {
            f32::NAN
        } else {
            a.max(b)
        }
    }

    /// `min(v, 1)` that keeps a NaN.
    fn at_most_one(v: f32) -> f32 {
        if v > 1.0 { 1.0 } else { v }
    }

    /// `(e^{ĩ − m_new}, e^{logσ(f̃) + m − m_new})` from one exponential: m_new is one of the
    /// two exponents' first terms (ĩ, or logσ(f̃) + m; ĩ in an empty state), so one gate is
    /// e⁰ = 1 and the other e^{−|d|} for d = ĩ − (logσ(f̃) + m). A NaN d gives NaN gates.
    fn stabilised_input_and_forget(i_pre: f32, log_f_plus_m: f32, empty: bool) -> (f32, f32) {
        let d = i_pre - log_f_plus_m;
        let e = at_most_one((-d.abs()).exp());
        let i = if d >= 0.0 || empty { 1.0 } else { e };
        let f = if d < 0.0 { 1.0 } else { e };
        (i, f)
    }

    fn sigmoid(v: f32) -> f32 {
        let e = (-v.abs()).exp();
        if v >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        }
    }

    /// Units `first..DH` of [`super::Kernels::forward_step`].
    pub fn forward_step(
        first: usize,
        pre: &[f32],
        state: &mut UnitState,
        h_out: &mut [f32],
        mut tape: Option<&mut [f32]>,
    ) {
        let dh = h_out.len();
        for j in first..dh {
            let (i_pre, f_pre, z_pre, o_pre) =
                (pre[j], pre[dh + j], pre[2 * dh + j], pre[3 * dh + j]);
            let (log_f, sig_neg_f) = log_sigmoid_and_complement(f_pre);
            let log_f_plus_m = state.m[j] + log_f;
            // Per-element empty-state rule (see the module docs of `slstm`).
            let m_new = if state.n[j] == 0.0 {
                i_pre
            } else {
                max_or_nan(i_pre, log_f_plus_m)
            };
            let (i, f) = stabilised_input_and_forget(i_pre, log_f_plus_m, state.n[j] == 0.0);
            let z = z_pre.tanh();
            let o = sigmoid(o_pre);
            let c_new = f * state.c[j] + i * z;
            let n_new = f * state.n[j] + i;
            let h_new = o * c_new / n_new;
            h_out[j] = h_new;
            if let Some(tape) = tape.as_deref_mut() {
                tape[TAPE_C * dh + j] = c_new;
                tape[TAPE_N * dh + j] = n_new;
                tape[TAPE_I * dh + j] = i;
                tape[TAPE_F * dh + j] = f;
                tape[TAPE_Z * dh + j] = z;
                tape[TAPE_O * dh + j] = o;
                tape[TAPE_SIG_NEG_F * dh + j] = sig_neg_f;
            }
            state.h[j] = h_new;
            state.c[j] = c_new;
            state.n[j] = n_new;
            state.m[j] = m_new;
        }
        debug_assert!(tape.is_none_or(|t| t.len() == TAPE_VALUES * dh));
    }

    /// Units `first..DH` of [`super::Kernels::backward_step`].
    pub fn backward_step(first: usize, s: &mut BackwardStep) {
        let dh = s.dc.len();
        let value = |slot: usize, j: usize| s.tape[slot * dh + j];
        for j in first..dh {
            let (c, n, i, f, z, o) = (
                value(TAPE_C, j),
                value(TAPE_N, j),
                value(TAPE_I, j),
                value(TAPE_F, j),
                value(TAPE_Z, j),
                value(TAPE_O, j),
            );
            let grad_h = s.grad_h[j] + s.grad_h_recurrent[j];
            let inv_n = 1.0 / n;
            let c_over_n = c * inv_n;
            let dc_t = s.dc[j] + grad_h * o * inv_n;
            let dn_t = s.dn[j] - grad_h * o * c_over_n * inv_n;
            let d_forget = dc_t * s.c_prev[j] + dn_t * s.n_prev[j];
            s.dp[j] = (dc_t * z + dn_t) * i;
            s.dp[dh + j] = d_forget * f * value(TAPE_SIG_NEG_F, j);
            s.dp[2 * dh + j] = dc_t * i * (1.0 - z * z);
            s.dp[3 * dh + j] = grad_h * c_over_n * o * (1.0 - o);
            s.dc[j] = dc_t * f;
            s.dn[j] = dn_t * f;
            if let Some(dm0) = s.dm0.as_deref_mut() {
                // f₁ = exp(m₀ + logσ(f̃₁) − m₁) with m₁ held constant.
                dm0[j] = d_forget * f;
            }
        }
    }
}

/// `[T; N]` from an expression of the index `j`: one operation applied to N independent
/// vectors, so that neighbouring instructions belong to different dependency chains. Used by
/// the AVX2 step here and the AVX-512 row groups (`rows::avx512`).
#[cfg(target_arch = "x86_64")]
macro_rules! each {
    (|$j:ident| $e:expr) => {{
        // SAFETY: plain vectors (or structs of them), all overwritten below; a loop rather
        // than `array::from_fn`, whose closures were not inlined into these functions.
        let mut out = [unsafe { std::mem::zeroed() }; N];
        for $j in 0..N {
            out[$j] = $e;
        }
        out
    }};
}
#[cfg(target_arch = "x86_64")]
pub(super) use each;

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    //! Written with raw pointers and plain locals (no iterator adaptors, no arrays of vectors)
    //! so that opt-level 1 keeps the accumulators in registers. Every function here relies on
    //! the length checks of its caller in `Kernels`.
    use super::super::fused_cpu::{TAPE_C, TAPE_F, TAPE_I, TAPE_N, TAPE_O, TAPE_SIG_NEG_F, TAPE_Z};
    use super::{BackwardStep, UnitState};
    use crate::xlstm::kernels::vmath::{EXP_POLYNOMIAL, LN_POLYNOMIAL};
    use std::arch::x86_64::*;

    const LANES: usize = 8;

    /// Unaligned load of 8 floats. Not `_mm256_loadu_ps`: that goes through
    /// `ptr::copy_nonoverlapping`, whose debug-build precondition checks (this crate's dev
    /// profile keeps debug assertions) cost more than the arithmetic of these loops.
    ///
    /// # Safety
    /// `p..p + 8` must be readable.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_ptr(p: *const f32) -> __m256 {
        // SAFETY: caller guarantees 8 readable floats; `[f32; 8]` needs only f32 alignment.
        unsafe { std::mem::transmute::<[f32; LANES], __m256>(*(p as *const [f32; LANES])) }
    }

    /// Unaligned store of 8 floats (see [`load_ptr`]).
    ///
    /// # Safety
    /// `p..p + 8` must be writable.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_ptr(p: *mut f32, v: __m256) {
        // SAFETY: caller guarantees 8 writable floats; `[f32; 8]` needs only f32 alignment.
        unsafe { *(p as *mut [f32; LANES]) = std::mem::transmute::<__m256, [f32; LANES]>(v) }
    }

    /// # Safety
    /// `at + 8 <= s.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(s: &[f32], at: usize) -> __m256 {
        debug_assert!(at + LANES <= s.len());
        unsafe { load_ptr(s.as_ptr().add(at)) }
    }

    /// # Safety
    /// `at + 8 <= s.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(s: &mut [f32], at: usize, v: __m256) {
        debug_assert!(at + LANES <= s.len());
        unsafe { store_ptr(s.as_mut_ptr().add(at), v) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
        let sum1 = _mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1));
        _mm_cvtss_f32(sum1)
    }

    /// e^x (Cephes `expf`) of N vectors, one operation at a time across them; NaN stays NaN,
    /// large negative x gives 0, large positive saturates.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp<const N: usize>(x: [__m256; N]) -> [__m256; N] {
        // NaN is the second operand of min/max, so it passes through.
        let x: [__m256; N] = each!(|j| _mm256_max_ps(
            _mm256_set1_ps(-88.376_26),
            _mm256_min_ps(_mm256_set1_ps(88.376_26), x[j]),
        ));
        let fx: [__m256; N] = each!(|j| _mm256_floor_ps(_mm256_fmadd_ps(
            x[j],
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        )));
        let x: [__m256; N] = each!(|j| _mm256_fnmadd_ps(fx[j], _mm256_set1_ps(0.693_359_4), x[j]));
        let x: [__m256; N] =
            each!(|j| _mm256_fnmadd_ps(fx[j], _mm256_set1_ps(-2.121_944_4e-4), x[j]));
        let mut y = [_mm256_set1_ps(EXP_POLYNOMIAL[0]); N];
        for &coefficient in &EXP_POLYNOMIAL[1..] {
            y = each!(|j| _mm256_fmadd_ps(y[j], x[j], _mm256_set1_ps(coefficient)));
        }
        let y: [__m256; N] = each!(|j| _mm256_fmadd_ps(
            y[j],
            _mm256_mul_ps(x[j], x[j]),
            _mm256_add_ps(x[j], _mm256_set1_ps(1.0)),
        ));
        each!(|j| {
            let exponent = _mm256_add_epi32(_mm256_cvttps_epi32(fx[j]), _mm256_set1_epi32(127));
            _mm256_mul_ps(y[j], _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)))
        })
    }

    /// ln x for x ≥ 1 (Cephes `logf`; here only ln(1 + e) with 0 ≤ e ≤ 1 is needed), of N
    /// vectors as [`exp`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn ln_at_least_one<const N: usize>(x: [__m256; N]) -> [__m256; N] {
        let bits: [__m256i; N] = each!(|j| _mm256_castps_si256(x[j]));
        let e: [__m256; N] = each!(|j| _mm256_cvtepi32_ps(_mm256_sub_epi32(
            _mm256_srli_epi32(bits[j], 23),
            _mm256_set1_epi32(126),
        )));
        // Mantissa in [0.5, 1).
        let mantissa: [__m256; N] = each!(|j| _mm256_castsi256_ps(_mm256_or_si256(
            _mm256_and_si256(bits[j], _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x3f00_0000),
        )));
        let below: [__m256; N] = each!(|j| _mm256_cmp_ps(
            mantissa[j],
            _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
            _CMP_LT_OQ,
        ));
        let m: [__m256; N] = each!(|j| _mm256_add_ps(
            _mm256_sub_ps(mantissa[j], _mm256_set1_ps(1.0)),
            _mm256_and_ps(mantissa[j], below[j]),
        ));
        let e: [__m256; N] =
            each!(|j| _mm256_sub_ps(e[j], _mm256_and_ps(_mm256_set1_ps(1.0), below[j])));
        let z: [__m256; N] = each!(|j| _mm256_mul_ps(m[j], m[j]));
        let mut y = [_mm256_set1_ps(LN_POLYNOMIAL[0]); N];
        for &coefficient in &LN_POLYNOMIAL[1..] {
            y = each!(|j| _mm256_fmadd_ps(y[j], m[j], _mm256_set1_ps(coefficient)));
        }
        let y: [__m256; N] = each!(|j| _mm256_mul_ps(_mm256_mul_ps(y[j], m[j]), z[j]));
        let y: [__m256; N] =
            each!(|j| _mm256_fmadd_ps(e[j], _mm256_set1_ps(-2.121_944_4e-4), y[j]));
        let y: [__m256; N] = each!(|j| _mm256_fnmadd_ps(z[j], _mm256_set1_ps(0.5), y[j]));
        each!(|j| _mm256_fmadd_ps(e[j], _mm256_set1_ps(0.693_359_4), _mm256_add_ps(m[j], y[j])))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn abs(x: __m256) -> __m256 {
        _mm256_andnot_ps(_mm256_set1_ps(-0.0), x)
    }

    /// # Safety
    /// `rows.len() == weights.len() * acc.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate_rows(acc: &mut [f32], weights: &[f32], rows: &[f32]) {
        let width = acc.len();
        let count = weights.len();
        let acc_ptr = acc.as_mut_ptr();
        let mut col = 0;
        // SAFETY: every pointer read or written is `col + q < width` into `acc` or into one of
        // the `count` rows of `width` values. Inner loops step pointers with `wrapping_add`
        // (no debug-build overflow checks on the hot path).
        unsafe {
            // Eight accumulator vectors (64 columns) stay in registers across all rows.
            while col + 8 * LANES <= width {
                let out = acc_ptr.add(col);
                let mut a0 = load_ptr(out);
                let mut a1 = load_ptr(out.wrapping_add(LANES));
                let mut a2 = load_ptr(out.wrapping_add(2 * LANES));
                let mut a3 = load_ptr(out.wrapping_add(3 * LANES));
                let mut a4 = load_ptr(out.wrapping_add(4 * LANES));
                let mut a5 = load_ptr(out.wrapping_add(5 * LANES));
                let mut a6 = load_ptr(out.wrapping_add(6 * LANES));
                let mut a7 = load_ptr(out.wrapping_add(7 * LANES));
                let mut row = rows.as_ptr().add(col);
                let mut weight = weights.as_ptr();
                let weights_end = weight.wrapping_add(count);
                while weight != weights_end {
                    let w = _mm256_set1_ps(*weight);
                    a0 = _mm256_fmadd_ps(w, load_ptr(row), a0);
                    a1 = _mm256_fmadd_ps(w, load_ptr(row.wrapping_add(LANES)), a1);
                    a2 = _mm256_fmadd_ps(w, load_ptr(row.wrapping_add(2 * LANES)), a2);
                    a3 = _mm256_fmadd_ps(w, load_ptr(row.wrapping_add(3 * LANES)), a3);
                    a4 = _mm256_fmadd_ps(w, load_ptr(row.wrapping_add(4 * LANES)), a4);
                    a5 = _mm256_fmadd_ps(w, load_ptr(row.wrapping_add(5 * LANES)), a5);
                    a6 = _mm256_fmadd_ps(w, load_ptr(row.wrapping_add(6 * LANES)), a6);
                    a7 = _mm256_fmadd_ps(w, load_ptr(row.wrapping_add(7 * LANES)), a7);
                    row = row.wrapping_add(width);
                    weight = weight.wrapping_add(1);
                }
                store_ptr(out, a0);
                store_ptr(out.wrapping_add(LANES), a1);
                store_ptr(out.wrapping_add(2 * LANES), a2);
                store_ptr(out.wrapping_add(3 * LANES), a3);
                store_ptr(out.wrapping_add(4 * LANES), a4);
                store_ptr(out.wrapping_add(5 * LANES), a5);
                store_ptr(out.wrapping_add(6 * LANES), a6);
                store_ptr(out.wrapping_add(7 * LANES), a7);
                col += 8 * LANES;
            }
            while col + LANES <= width {
                let out = acc_ptr.add(col);
                let mut a = load_ptr(out);
                let mut row = rows.as_ptr().add(col);
                for &w in weights {
                    a = _mm256_fmadd_ps(_mm256_set1_ps(w), load_ptr(row), a);
                    row = row.wrapping_add(width);
                }
                store_ptr(out, a);
                col += LANES;
            }
            while col < width {
                let mut a = *acc_ptr.add(col);
                let mut row = rows.as_ptr().add(col);
                for &w in weights {
                    a += w * *row;
                    row = row.wrapping_add(width);
                }
                *acc_ptr.add(col) = a;
                col += 1;
            }
        }
    }

    /// # Safety
    /// `rows.len() == dots.len() * vector.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dots(rows: &[f32], vector: &[f32], dots: &mut [f32]) {
        let width = vector.len();
        let rows_ptr = rows.as_ptr();
        let v = vector.as_ptr();
        // SAFETY: offsets stay within row k (`k * width + col < (k + 1) * width`).
        unsafe {
            for (k, dot) in dots.iter_mut().enumerate() {
                let row = rows_ptr.add(k * width);
                // Four independent chains hide the FMA latency.
                let mut d0 = _mm256_setzero_ps();
                let mut d1 = _mm256_setzero_ps();
                let mut d2 = _mm256_setzero_ps();
                let mut d3 = _mm256_setzero_ps();
                let mut col = 0;
                while col + 4 * LANES <= width {
                    let r = row.add(col);
                    let u = v.add(col);
                    d0 = _mm256_fmadd_ps(load_ptr(r), load_ptr(u), d0);
                    d1 = _mm256_fmadd_ps(load_ptr(r.add(LANES)), load_ptr(u.add(LANES)), d1);
                    d2 =
                        _mm256_fmadd_ps(load_ptr(r.add(2 * LANES)), load_ptr(u.add(2 * LANES)), d2);
                    d3 =
                        _mm256_fmadd_ps(load_ptr(r.add(3 * LANES)), load_ptr(u.add(3 * LANES)), d3);
                    col += 4 * LANES;
                }
                while col + LANES <= width {
                    d0 = _mm256_fmadd_ps(load_ptr(row.add(col)), load_ptr(v.add(col)), d0);
                    col += LANES;
                }
                let mut total =
                    horizontal_sum(_mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3)));
                while col < width {
                    total += *row.add(col) * *v.add(col);
                    col += 1;
                }
                *dot = total;
            }
        }
    }

    /// Pre-activations of 8 units' four gates.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Gates {
        pub i_pre: __m256,
        pub f_pre: __m256,
        pub z_pre: __m256,
        pub o_pre: __m256,
    }

    /// One step of 8 units: the new state and what the tape records.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Step {
        pub h: __m256,
        pub c: __m256,
        pub n: __m256,
        pub m: __m256,
        pub i: __m256,
        pub f: __m256,
        pub z: __m256,
        pub o: __m256,
        f_pre: __m256,
        /// e^{−|f̃|}, from which the tape's σ(−f̃) is computed.
        e_f: __m256,
    }

    impl Step {
        /// σ(−f̃) for the tape, from the step's e^{−|f̃|}; only training needs it.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub(in super::super) fn sig_neg_f(&self) -> __m256 {
            let one = _mm256_set1_ps(1.0);
            let f_non_negative = _mm256_cmp_ps(self.f_pre, _mm256_setzero_ps(), _CMP_GE_OQ);
            _mm256_div_ps(
                _mm256_blendv_ps(one, self.e_f, f_non_negative),
                _mm256_add_ps(one, self.e_f),
            )
        }
    }

    /// The forward step of 8 units from their gate pre-activations and c, n, m. Both the
    /// pair-at-a-time scan and the AVX2 row groups (`rows::avx2`, through [`steps`]) compute
    /// it here, so the two give the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) fn step(g: Gates, c: __m256, n: __m256, m: __m256) -> Step {
        let [step] = steps([g], [c], [n], [m]);
        step
    }

    /// The forward steps of N independent groups of 8 units, one operation at a time across
    /// the N. A step is one long chain of dependent operations (an exponential, a logarithm,
    /// another exponential, a division); computed one group after the other, each chain's
    /// waits filled the out-of-order window before the next group's work came into view, and
    /// the row-group scan ran at about one instruction per cycle however many rows it held.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) fn steps<const N: usize>(
        g: [Gates; N],
        c: [__m256; N],
        n: [__m256; N],
        m: [__m256; N],
    ) -> [Step; N] {
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        // logσ(f̃) = min(f̃, 0) − ln(1 + e^{−|f̃|}); σ(−f̃) (for the tape) from the same
        // e^{−|f̃|}. NaN as the second operand of minps passes through.
        let e_f = exp::<N>(each!(|j| _mm256_sub_ps(zero, abs(g[j].f_pre))));
        let ln_f = ln_at_least_one::<N>(each!(|j| _mm256_add_ps(one, e_f[j])));
        let log_f: [__m256; N] = each!(|j| _mm256_sub_ps(_mm256_min_ps(zero, g[j].f_pre), ln_f[j]));
        // tanh(z̃) = sign(z̃)·(1 − e^{−2|z̃|}) / (1 + e^{−2|z̃|}).
        let e_z = exp::<N>(each!(|j| _mm256_mul_ps(
            _mm256_set1_ps(-2.0),
            abs(g[j].z_pre)
        )));
        let e_o = exp::<N>(each!(|j| _mm256_sub_ps(zero, abs(g[j].o_pre))));

        let log_f_plus_m: [__m256; N] = each!(|j| _mm256_add_ps(m[j], log_f[j]));
        // Per-element empty-state rule (see the module docs of `slstm`).
        let empty: [__m256; N] = each!(|j| _mm256_cmp_ps(n[j], zero, _CMP_EQ_OQ));
        // maxps/minps return their second operand when either is NaN; keep NaNs from both
        // sides so that a diverged input shows in the output (as with torch).
        let m_new: [__m256; N] = each!(|j| {
            let max = _mm256_max_ps(log_f_plus_m[j], g[j].i_pre);
            let max = _mm256_blendv_ps(
                max,
                log_f_plus_m[j],
                _mm256_cmp_ps(log_f_plus_m[j], log_f_plus_m[j], _CMP_UNORD_Q),
            );
            _mm256_blendv_ps(max, g[j].i_pre, empty[j])
        });
        // One exponential for both gates, as `portable::stabilised_input_and_forget`.
        let d: [__m256; N] = each!(|j| _mm256_sub_ps(g[j].i_pre, log_f_plus_m[j]));
        let e = exp::<N>(each!(|j| _mm256_sub_ps(zero, abs(d[j]))));
        let z: [__m256; N] = each!(|j| {
            let tanh_abs = _mm256_div_ps(_mm256_sub_ps(one, e_z[j]), _mm256_add_ps(one, e_z[j]));
            _mm256_or_ps(tanh_abs, _mm256_and_ps(g[j].z_pre, _mm256_set1_ps(-0.0)))
        });
        let o: [__m256; N] = each!(|j| {
            let o_non_negative = _mm256_cmp_ps(g[j].o_pre, zero, _CMP_GE_OQ);
            _mm256_div_ps(
                _mm256_blendv_ps(e_o[j], one, o_non_negative),
                _mm256_add_ps(one, e_o[j]),
            )
        });
        each!(|j| {
            let e = _mm256_min_ps(one, e[j]);
            let i = _mm256_blendv_ps(
                e,
                one,
                _mm256_or_ps(_mm256_cmp_ps(d[j], zero, _CMP_GE_OQ), empty[j]),
            );
            let f = _mm256_blendv_ps(e, one, _mm256_cmp_ps(d[j], zero, _CMP_LT_OQ));
            let c_new = _mm256_fmadd_ps(f, c[j], _mm256_mul_ps(i, z[j]));
            let n_new = _mm256_fmadd_ps(f, n[j], i);
            let h_new = _mm256_div_ps(_mm256_mul_ps(o[j], c_new), n_new);
            Step {
                h: h_new,
                c: c_new,
                n: n_new,
                m: m_new[j],
                i,
                f,
                z: z[j],
                o: o[j],
                f_pre: g[j].f_pre,
                e_f: e_f[j],
            }
        })
    }

    /// Vector part of `Kernels::forward_step`; returns the number of units handled.
    ///
    /// # Safety
    /// The slice lengths checked by `Kernels::forward_step`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward_step(
        pre: &[f32],
        state: &mut UnitState,
        h_out: &mut [f32],
        mut tape: Option<&mut [f32]>,
    ) -> usize {
        let dh = h_out.len();
        let mut j = 0;
        // SAFETY: j + 8 <= dh and every slice holds whole [.., DH] blocks (caller's checks).
        unsafe {
            while j + LANES <= dh {
                let step = step(
                    Gates {
                        i_pre: load(pre, j),
                        f_pre: load(pre, dh + j),
                        z_pre: load(pre, 2 * dh + j),
                        o_pre: load(pre, 3 * dh + j),
                    },
                    load(state.c, j),
                    load(state.n, j),
                    load(state.m, j),
                );
                store(h_out, j, step.h);
                if let Some(tape) = tape.as_deref_mut() {
                    store(tape, TAPE_C * dh + j, step.c);
                    store(tape, TAPE_N * dh + j, step.n);
                    store(tape, TAPE_I * dh + j, step.i);
                    store(tape, TAPE_F * dh + j, step.f);
                    store(tape, TAPE_Z * dh + j, step.z);
                    store(tape, TAPE_O * dh + j, step.o);
                    store(tape, TAPE_SIG_NEG_F * dh + j, step.sig_neg_f());
                }
                store(state.h, j, step.h);
                store(state.c, j, step.c);
                store(state.n, j, step.n);
                store(state.m, j, step.m);
                j += LANES;
            }
        }
        j
    }

    /// Vector part of `Kernels::backward_step`; returns the number of units handled.
    ///
    /// # Safety
    /// The slice lengths checked by `Kernels::backward_step`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn backward_step(s: &mut BackwardStep) -> usize {
        let dh = s.dc.len();
        let one = _mm256_set1_ps(1.0);
        let mut j = 0;
        // SAFETY: j + 8 <= dh and every slice holds whole [.., DH] blocks (caller's checks).
        unsafe {
            while j + LANES <= dh {
                let c = load(s.tape, TAPE_C * dh + j);
                let n = load(s.tape, TAPE_N * dh + j);
                let i = load(s.tape, TAPE_I * dh + j);
                let f = load(s.tape, TAPE_F * dh + j);
                let z = load(s.tape, TAPE_Z * dh + j);
                let o = load(s.tape, TAPE_O * dh + j);
                let sig_neg_f = load(s.tape, TAPE_SIG_NEG_F * dh + j);
                let grad_h = _mm256_add_ps(load(s.grad_h, j), load(s.grad_h_recurrent, j));
                let inv_n = _mm256_div_ps(one, n);
                let c_over_n = _mm256_mul_ps(c, inv_n);
                let grad_h_o = _mm256_mul_ps(grad_h, o);
                let dc_t = _mm256_fmadd_ps(grad_h_o, inv_n, load(s.dc, j));
                let dn_t =
                    _mm256_fnmadd_ps(_mm256_mul_ps(grad_h_o, c_over_n), inv_n, load(s.dn, j));
                let d_forget = _mm256_fmadd_ps(
                    dc_t,
                    load(s.c_prev, j),
                    _mm256_mul_ps(dn_t, load(s.n_prev, j)),
                );
                store(s.dp, j, _mm256_mul_ps(_mm256_fmadd_ps(dc_t, z, dn_t), i));
                let d_forget_f = _mm256_mul_ps(d_forget, f);
                store(s.dp, dh + j, _mm256_mul_ps(d_forget_f, sig_neg_f));
                store(
                    s.dp,
                    2 * dh + j,
                    _mm256_mul_ps(_mm256_mul_ps(dc_t, i), _mm256_fnmadd_ps(z, z, one)),
                );
                store(
                    s.dp,
                    3 * dh + j,
                    _mm256_mul_ps(
                        _mm256_mul_ps(grad_h, c_over_n),
                        _mm256_mul_ps(o, _mm256_sub_ps(one, o)),
                    ),
                );
                store(s.dc, j, _mm256_mul_ps(dc_t, f));
                store(s.dn, j, _mm256_mul_ps(dn_t, f));
                if let Some(dm0) = s.dm0.as_deref_mut() {
                    store(dm0, j, d_forget_f);
                }
                j += LANES;
            }
        }
        j
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The vector kernels against the portable ones on the same inputs (on CPUs without AVX2
    //! and FMA only the portable kernels exist and there is nothing to compare).
    use super::super::fused_cpu::TAPE_VALUES;
    use super::*;

    /// Deterministic pseudo-random values in [-scale, scale] (xorshift).
    pub(in super::super) fn values(seed: u64, len: usize, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                scale * ((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect()
    }

    fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (idx, (&x, &y)) in a.iter().zip(b).enumerate() {
            let ok = (x - y).abs() <= tol * (1.0 + y.abs()) || (x.is_nan() && y.is_nan());
            assert!(ok, "{what}[{idx}]: vector {x} vs portable {y}");
        }
    }

    fn vector_kernels() -> Option<Kernels> {
        let detected = Kernels::detect();
        (detected != Kernels::Portable).then_some(detected)
    }

    #[test]
    fn forward_step_matches_portable() {
        let Some(vector) = vector_kernels() else {
            return;
        };
        // DH = 19: two vector blocks and a scalar tail; pre-activations up to ±60 and a few
        // exactly-zero normalisers (the empty-state rule).
        let dh = 19;
        for (seed, scale) in [(1, 3.0), (2, 60.0)] {
            let pre = values(seed, 4 * dh, scale);
            let mut n = values(seed + 10, dh, 1.0);
            for v in n.iter_mut() {
                *v = v.abs() * 5.0;
            }
            n[0] = 0.0;
            n[9] = 0.0;
            let c: Vec<f32> = n
                .iter()
                .zip(values(seed + 20, dh, 1.0))
                .map(|(n, r)| n * r)
                .collect();
            let h = values(seed + 30, dh, 1.0);
            let m = values(seed + 40, dh, 30.0);
            let run = |kernels: Kernels| {
                let (mut h, mut c, mut n, mut m) = (h.clone(), c.clone(), n.clone(), m.clone());
                let mut h_out = vec![0f32; dh];
                let mut tape = vec![0f32; TAPE_VALUES * dh];
                let mut state = UnitState {
                    h: &mut h,
                    c: &mut c,
                    n: &mut n,
                    m: &mut m,
                };
                kernels.forward_step(&pre, &mut state, &mut h_out, Some(&mut tape));
                [h_out, tape, h, c, n, m]
            };
            let (fast, portable) = (run(vector), run(Kernels::Portable));
            for (name, (a, b)) in ["h_out", "tape", "h", "c", "n", "m"]
                .iter()
                .zip(fast.iter().zip(&portable))
            {
                assert!(a.iter().all(|v| v.is_finite()), "{name} not finite: {a:?}");
                assert_close(name, a, b, 2e-6);
            }
        }
    }

    #[test]
    fn backward_step_matches_portable() {
        let Some(vector) = vector_kernels() else {
            return;
        };
        let dh = 21;
        let mut tape = values(3, TAPE_VALUES * dh, 1.0);
        for v in tape[dh..2 * dh].iter_mut() {
            *v = 0.5 + v.abs(); // n > 0
        }
        let (c_prev, n_prev) = (values(4, dh, 1.0), values(5, dh, 2.0));
        let (grad_h, grad_h_recurrent) = (values(6, dh, 1.0), values(7, dh, 1.0));
        let run = |kernels: Kernels| {
            let (mut dc, mut dn) = (values(8, dh, 1.0), values(9, dh, 1.0));
            let mut dp = vec![0f32; 4 * dh];
            let mut dm0 = vec![0f32; dh];
            kernels.backward_step(&mut BackwardStep {
                tape: &tape,
                c_prev: &c_prev,
                n_prev: &n_prev,
                grad_h: &grad_h,
                grad_h_recurrent: &grad_h_recurrent,
                dc: &mut dc,
                dn: &mut dn,
                dp: &mut dp,
                dm0: Some(&mut dm0),
            });
            [dc, dn, dp, dm0]
        };
        let (fast, portable) = (run(vector), run(Kernels::Portable));
        for (name, (a, b)) in ["dc", "dn", "dp", "dm0"]
            .iter()
            .zip(fast.iter().zip(&portable))
        {
            assert_close(name, a, b, 1e-5);
        }
    }

    #[test]
    fn row_kernels_match_portable() {
        let Some(vector) = vector_kernels() else {
            return;
        };
        for width in [4 * 3, 4 * 8, 4 * 32, 4 * 13] {
            let count = width / 4 + 1;
            let rows = values(11, count * width, 1.0);
            let weights = values(12, count, 1.0);
            let start = values(13, width, 1.0);
            let (mut fast, mut portable) = (start.clone(), start.clone());
            vector.accumulate_rows(&mut fast, &weights, &rows);
            Kernels::Portable.accumulate_rows(&mut portable, &weights, &rows);
            assert_close("accumulate_rows", &fast, &portable, 1e-5);

            let vector_in = values(14, width, 1.0);
            let (mut dots_fast, mut dots_portable) = (vec![0f32; count], vec![0f32; count]);
            vector.row_dots(&rows, &vector_in, &mut dots_fast);
            Kernels::Portable.row_dots(&rows, &vector_in, &mut dots_portable);
            assert_close("row_dots", &dots_fast, &dots_portable, 1e-5);
        }
    }

    #[test]
    fn forward_step_propagates_nan() {
        let dh = 8;
        // A NaN in the input gate of unit 3, in the forget gate of unit 5.
        let mut pre = values(16, 4 * dh, 1.0);
        pre[3] = f32::NAN;
        pre[dh + 5] = f32::NAN;
        for kernels in [Some(Kernels::Portable), vector_kernels()]
            .into_iter()
            .flatten()
        {
            let (mut h, mut c, mut n, mut m) = (
                vec![0f32; dh],
                vec![0f32; dh],
                vec![1f32; dh],
                vec![0f32; dh],
            );
            let mut h_out = vec![0f32; dh];
            let mut state = UnitState {
                h: &mut h,
                c: &mut c,
                n: &mut n,
                m: &mut m,
            };
            kernels.forward_step(&pre, &mut state, &mut h_out, None);
            for (j, v) in h_out.iter().enumerate() {
                assert_eq!(
                    v.is_nan(),
                    j == 3 || j == 5,
                    "{kernels:?}: unit {j} gave {v}"
                );
            }
            assert!(
                m[3].is_nan() && m[5].is_nan(),
                "{kernels:?}: stabiliser {m:?}"
            );
        }
    }
}
