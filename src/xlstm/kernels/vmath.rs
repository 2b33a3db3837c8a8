//! Branch-free f32 functions for elementwise loops, and a way to run such loops with the
//! wide vector instructions the CPU has.
//!
//! The crate is built for the baseline x86-64 (SSE2), and `f32::exp` or an `erf` from a math
//! library is a scalar call in the middle of a loop, so a loop over them is not vectorised.
//! These functions are written from arithmetic, fused multiply-adds (`mul_add`), comparisons
//! and bit casts only, which the compiler vectorises; [`with_wide_vectors`] compiles a loop
//! again with AVX-512 and with AVX2 and FMA, and runs the widest copy the CPU has. The
//! polynomials are chains of fused multiply-adds: one instruction where a multiply and an add
//! were two (the GeLU gate 23 % faster, BENCHMARKS.md, ninth speed pass). A CPU without FMA
//! runs the baseline copy, which computes them in software: the same bits, slowly.

/// Runs `f` compiled with AVX-512F, or else with AVX2 and FMA, when the CPU has them (on
/// x86-64), as is otherwise. 16-lane vectors halved the samples perf saw in the GeLU gate and
/// the causal conv against 8 lanes (BENCHMARKS.md, seventh speed pass). `f` should be a loop over `#[inline(always)]` arithmetic such as [`exp`] and
/// [`erf_and_gaussian`], and be marked `#[inline(always)]` itself: it is vectorised only where
/// it is inlined into the wide copy, and the dev profile's many codegen units otherwise may
/// compile it apart.
#[inline(always)]
pub(crate) fn with_wide_vectors<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn widest<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if super::simd::avx512() {
            // SAFETY: the CPU supports the features `widest` is compiled for.
            return unsafe { widest(f) };
        }
        if super::simd::avx2_fma() {
            // SAFETY: the CPU supports the features `wide` is compiled for.
            return unsafe { wide(f) };
        }
    }
    f()
}

/// Cephes `logf`'s polynomial in the reduced mantissa m, highest degree first (ln(1 + m) ≈ m −
/// m²/2 + m³·p(m)); both vector copies of `ln_at_least_one` (the sLSTM step in AVX2 and in
/// AVX-512) evaluate it by Horner's rule from these.
pub(crate) const LN_POLYNOMIAL: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_4e-1,
    -2.499_999_4e-1,
    3.333_333e-1,
];

/// Cephes `expf`'s polynomial in the reduced argument r, highest degree first (e^r ≈ 1 + r +
/// r²·p(r)); every copy of the exponential, scalar or in intrinsics, evaluates it by Horner's
/// rule from these.
pub(crate) const EXP_POLYNOMIAL: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// e^x (Cephes `expf`, about 2 ulp). NaN stays NaN; below about −87.6, where e^x is
/// subnormal, the result is 0; above 88.38 it saturates at e^88.38.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const BOUND: f32 = 88.376_26;
    // clamp, not min/max: it passes NaN through.
    let x = x.clamp(-BOUND, BOUND);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = (-n).mul_add(0.693_359_4, x);
    let r = (-n).mul_add(-2.121_944_4e-4, r);
    let [c0, c1, c2, c3, c4, c5] = EXP_POLYNOMIAL;
    let p = c0
        .mul_add(r, c1)
        .mul_add(r, c2)
        .mul_add(r, c3)
        .mul_add(r, c4)
        .mul_add(r, c5);
    let y = p.mul_add(r * r, r) + 1.0;
    // 2^n from its exponent bits: n is in [−127, 127] after the bound, and 2^−127 comes out as
    // 0. n is taken from the low mantissa bits of n + 1.5·2²³ (0x4B40_0000), not by `n as
    // i32`: that cast saturates and maps NaN to 0, and the compiler turns it into one scalar
    // conversion per lane, which made the whole function scalar. A NaN gives some power of
    // two here and stays NaN through y.
    const SHIFTER: f32 = 12_582_912.0;
    let biased = (n + SHIFTER).to_bits().wrapping_sub(0x4B40_0000 - 127);
    y * f32::from_bits(biased << 23)
}

/// ln(1 + x) for x in [0, 1] (the range log-sigmoid needs, x = e^{−|v|}), within a few ulp:
/// ln(1 + x) = 2·atanh(t) with t = x / (2 + x) ≤ 1/3, by its odd series to t¹⁵ (the next term
/// is below 2⁻²⁶ of the sum). t is formed without 1 + x, so small x keep their precision.
#[inline(always)]
pub(crate) fn ln_1p_unit(x: f32) -> f32 {
    let t = x / (2.0 + x);
    let s = t * t;
    let series = (1.0f32 / 15.0)
        .mul_add(s, 1.0 / 13.0)
        .mul_add(s, 1.0 / 11.0)
        .mul_add(s, 1.0 / 9.0)
        .mul_add(s, 1.0 / 7.0)
        .mul_add(s, 1.0 / 5.0)
        .mul_add(s, 1.0 / 3.0);
    let t2 = t + t;
    (t2 * s).mul_add(series, t2)
}

/// ln σ(v) = min(v, 0) − ln(1 + e^{−|v|}), from arithmetic only (see the module docs).
#[inline(always)]
pub(crate) fn log_sigmoid(v: f32) -> f32 {
    v.min(0.0) - ln_1p_unit(exp(-v.abs()))
}

/// `(erf(x), e^{−x²})`. The error function is Abramowitz & Stegun 7.1.26 (absolute error below
/// 1.5e−7, which is below f32's resolution of values near 1), which evaluates e^{−x²} anyway;
/// the normal density needs it too. NaN stays NaN.
#[inline(always)]
pub(crate) fn erf_and_gaussian(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = 1.061_405_4f32
        .mul_add(t, -1.453_152_1)
        .mul_add(t, 1.421_413_8)
        .mul_add(t, -0.284_496_74)
        .mul_add(t, 0.254_829_6)
        * t;
    let gaussian = exp(-a * a);
    ((-poly).mul_add(gaussian, 1.0).copysign(x), gaussian)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(got: f32, want: f64) -> f64 {
        (got as f64 - want).abs() / want.abs().max(1e-30)
    }

    #[test]
    fn ln_1p_and_log_sigmoid_match_double_precision() {
        let mut worst: f64 = 0.0;
        for i in 0..=100_000 {
            let x = i as f32 * 1e-5;
            worst = worst.max(relative_error(
                ln_1p_unit(x).max(1e-30),
                (x as f64).ln_1p().max(1e-30),
            ));
        }
        for x in [1e-30f32, 1e-20, 1e-10, 3e-8, 1e-6] {
            worst = worst.max(relative_error(ln_1p_unit(x), (x as f64).ln_1p()));
        }
        assert!(worst < 3e-7, "ln_1p relative error {worst}");
        let mut worst: f64 = 0.0;
        for i in -3000..=3000 {
            let v = i as f32 * 0.01;
            let want = (v as f64).min(0.0) - (-(v as f64).abs()).exp().ln_1p();
            worst = worst.max((log_sigmoid(v) as f64 - want).abs() / want.abs().max(1e-3));
        }
        assert!(worst < 1e-6, "log_sigmoid error {worst}");
    }

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        let mut worst: f64 = 0.0;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            worst = worst.max(relative_error(exp(x), (x as f64).exp()));
        }
        assert!(worst < 4e-7, "exp relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(1000.0).is_finite());
    }

    fn erf(x: f32) -> f32 {
        erf_and_gaussian(x).0
    }

    #[test]
    fn erf_matches_a_double_precision_series() {
        // erf by its Taylor series in f64 (converges fast for |x| ≤ 3), 1 beyond.
        let reference = |x: f64| -> f64 {
            if x.abs() > 3.0 {
                return x.signum() * (1.0 - libm_erfc_tail(x.abs()));
            }
            let (mut term, mut sum) = (x, x);
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut worst: f64 = 0.0;
        for i in -500..=500 {
            let x = i as f32 * 0.01;
            worst = worst.max((erf(x) as f64 - reference(x as f64)).abs());
        }
        assert!(worst < 3e-7, "erf absolute error {worst}");
        // The error is absolute: small near 1, but not relative to erf near 0.
        assert!(erf(0.0).abs() < 1e-7);
        assert!(erf(f32::NAN).is_nan());
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
        for x in [-3.0f32, -0.5, 0.0, 0.7, 2.5] {
            let g = erf_and_gaussian(x).1;
            assert!(relative_error(g, (-(x as f64) * x as f64).exp()) < 4e-7);
        }
    }

    /// erfc(x) for x > 3 by its asymptotic series: well under f32 resolution of 1 − erfc.
    fn libm_erfc_tail(x: f64) -> f64 {
        let mut sum = 1.0;
        let mut term = 1.0;
        for n in 1..6 {
            term *= -((2 * n - 1) as f64) / (2.0 * x * x);
            sum += term;
        }
        (-x * x).exp() / (x * std::f64::consts::PI.sqrt()) * sum
    }

    #[test]
    fn the_wide_copy_computes_the_same_values() {
        let xs: Vec<f32> = (-300..300).map(|i| i as f32 * 0.0137).collect();
        let narrow: Vec<f32> = xs.iter().map(|&x| erf(x) + exp(x)).collect();
        let wide: Vec<f32> = with_wide_vectors(
            #[inline(always)]
            || xs.iter().map(|&x| erf(x) + exp(x)).collect(),
        );
        for (a, b) in narrow.iter().zip(&wide) {
            // The fused multiply-adds are explicit (correctly rounded in both copies) and
            // nothing else may be contracted, so the two copies agree to the bit.
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }
}
