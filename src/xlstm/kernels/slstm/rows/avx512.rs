//! Row groups in AVX-512F: 16 lanes, so a head of DH = 16·V units is V vectors per gate, and
//! the recurrent product's 4·V·K accumulators (16 for the K·V = 4 used here) stay in
//! registers.
//!
//! Every value is computed by the same operations in the same order as `simd`'s AVX2 step
//! (the same Cephes polynomials, the same NaN rules), so the two paths give the same bits.

use super::super::NUM_GATES;
use super::super::fused_cpu::{
    TAPE_C, TAPE_F, TAPE_I, TAPE_N, TAPE_O, TAPE_SIG_NEG_F, TAPE_VALUES, TAPE_Z,
};
use super::super::simd::each;
use super::{HeadScan, RowScan, ScanRows, prefetch_ahead};
use crate::xlstm::kernels::vmath::{EXP_POLYNOMIAL, LN_POLYNOMIAL};
use std::arch::x86_64::*;

const LANES: usize = 16;

/// The row-group scan in AVX-512F.
pub(super) struct Avx512;

impl ScanRows for Avx512 {
    const LANES: usize = LANES;
    const ROW_VECTORS: usize = 4;

    unsafe fn scan_rows<const K: usize, const V: usize, const Q: usize>(
        rows: [&mut RowScan<'_>; K],
        head: HeadScan<'_>,
    ) {
        // SAFETY: passed on from the caller.
        unsafe {
            // At V = 2, accumulator arrays of exactly 8 vectors were 25 % slower than arrays of
            // 16 (BENCHMARKS.md, ninth speed pass): the compiler kept the 8 in registers through
            // the gate arithmetic and spilled around it, where 16 stay in memory between the
            // product and the gates.
            if V == 2 {
                scan_rows::<K, 2, 16>(rows, head)
            } else {
                scan_rows::<K, V, Q>(rows, head)
            }
        }
    }
}

/// Whether this CPU runs these row groups.
pub(super) fn available() -> bool {
    crate::xlstm::kernels::simd::avx512()
}

/// Scans K rows of one head with V·16 units per head.
///
/// # Safety
/// AVX-512F must be available ([`available`]); the rows and head as [`ScanRows::scan_rows`]
/// states, with DH = 16·V and accumulator arrays of Q ≥ 4·V vectors.
#[target_feature(enable = "avx512f")]
unsafe fn scan_rows<const K: usize, const V: usize, const Q: usize>(
    mut rows: [&mut RowScan<'_>; K],
    head: HeadScan<'_>,
) {
    let HeadScan {
        r_head,
        head_offset,
        seq_len,
        hidden,
        ..
    } = head;
    let dh = V * LANES;
    debug_assert_eq!(head.head_dim, dh);
    debug_assert!(Q >= NUM_GATES * V);
    let gates_width = NUM_GATES * dh;
    let step_width = NUM_GATES * hidden;
    let zero = _mm512_setzero_ps();
    // SAFETY: every offset below stays inside the slices, whose lengths the caller guarantees.
    unsafe {
        let mut c = [[zero; V]; K];
        let mut n = [[zero; V]; K];
        let mut m = [[zero; V]; K];
        let mut h_prev = [std::ptr::null::<f32>(); K];
        for (r, row) in rows.iter().enumerate() {
            for v in 0..V {
                c[r][v] = _mm512_loadu_ps(row.initial[1].as_ptr().add(v * LANES));
                n[r][v] = _mm512_loadu_ps(row.initial[2].as_ptr().add(v * LANES));
                m[r][v] = _mm512_loadu_ps(row.initial[3].as_ptr().add(v * LANES));
            }
            h_prev[r] = row.initial[0].as_ptr();
        }
        let out = rows.each_mut().map(|row| row.out.as_mut_ptr());
        let tape = rows
            .each_mut()
            .map(|row| row.tape.as_deref_mut().map(<[f32]>::as_mut_ptr));
        let x = rows.each_ref().map(|row| row.x);
        let weights = r_head.as_ptr();
        let bias = weights.add(dh * gates_width);

        for t in 0..seq_len {
            for x in x {
                prefetch_ahead(x, t, &head);
            }
            // Pre-activations: bias + input, then the recurrent product in k order.
            let mut pre = [[zero; Q]; K];
            for r in 0..K {
                let x_t = x[r].as_ptr().add(t * step_width + head_offset);
                for g in 0..NUM_GATES {
                    for v in 0..V {
                        let q = g * V + v;
                        pre[r][q] = _mm512_add_ps(
                            _mm512_loadu_ps(bias.add(q * LANES)),
                            _mm512_loadu_ps(x_t.add(g * hidden + v * LANES)),
                        );
                    }
                }
            }
            for k in 0..dh {
                let row_k = weights.add(k * gates_width);
                let mut w = [zero; Q];
                for (q, w) in w.iter_mut().enumerate().take(NUM_GATES * V) {
                    *w = _mm512_loadu_ps(row_k.add(q * LANES));
                }
                for r in 0..K {
                    let h_k = _mm512_set1_ps(*h_prev[r].add(k));
                    for q in 0..NUM_GATES * V {
                        pre[r][q] = _mm512_fmadd_ps(h_k, w[q], pre[r][q]);
                    }
                }
            }
            // The gates two vectors at a time, as in the AVX2 row groups: of two rows (K is 1,
            // 2 or 4), or of one row's two vectors.
            if K >= 2 {
                for v in 0..V {
                    for first in (0..K).step_by(2) {
                        let vectors = [first * V + v, (first + 1) * V + v];
                        advance::<K, V, Q, 2>(
                            &pre,
                            [&mut c, &mut n, &mut m],
                            vectors,
                            &out,
                            &tape,
                            t,
                        );
                    }
                }
            } else if V >= 2 {
                for v in (0..V).step_by(2) {
                    advance::<K, V, Q, 2>(
                        &pre,
                        [&mut c, &mut n, &mut m],
                        [v, v + 1],
                        &out,
                        &tape,
                        t,
                    );
                }
            } else {
                advance::<K, V, Q, 1>(&pre, [&mut c, &mut n, &mut m], [0], &out, &tape, t);
            }
            for r in 0..K {
                h_prev[r] = out[r].add(t * dh);
            }
        }
        for r in 0..K {
            let final_rows = out[r].add(seq_len * dh);
            for v in 0..V {
                let at = |row: usize| final_rows.add(row * dh + v * LANES);
                _mm512_storeu_ps(at(0), _mm512_loadu_ps(h_prev[r].add(v * LANES)));
                _mm512_storeu_ps(at(1), c[r][v]);
                _mm512_storeu_ps(at(2), n[r][v]);
                _mm512_storeu_ps(at(3), m[r][v]);
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Gates {
    i_pre: __m512,
    f_pre: __m512,
    z_pre: __m512,
    o_pre: __m512,
}

#[derive(Clone, Copy)]
struct Step {
    h: __m512,
    c: __m512,
    n: __m512,
    m: __m512,
    i: __m512,
    f: __m512,
    z: __m512,
    o: __m512,
    /// e^{−|f̃|}, from which the tape's σ(−f̃) is computed.
    e_f: __m512,
}

/// Steps the N vectors `vectors` (each `row · V + vector`) of a row group at step `t`: their
/// gates from `pre`, their c, n, m (`[row][vector]` each) in `state`; writes h (and the tape)
/// of each.
///
/// # Safety
/// As [`scan_rows`], with `t < seq_len` and every index below K·V.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn advance<const K: usize, const V: usize, const Q: usize, const N: usize>(
    pre: &[[__m512; Q]; K],
    state: [&mut [[__m512; V]; K]; 3],
    vectors: [usize; N],
    out: &[*mut f32; K],
    tape: &[Option<*mut f32>; K],
    t: usize,
) {
    let dh = V * LANES;
    let zero = _mm512_setzero_ps();
    let mut gates = [Gates {
        i_pre: zero,
        f_pre: zero,
        z_pre: zero,
        o_pre: zero,
    }; N];
    let (mut c, mut n, mut m) = ([zero; N], [zero; N], [zero; N]);
    for j in 0..N {
        let (r, v) = (vectors[j] / V, vectors[j] % V);
        gates[j] = Gates {
            i_pre: pre[r][v],
            f_pre: pre[r][V + v],
            z_pre: pre[r][2 * V + v],
            o_pre: pre[r][3 * V + v],
        };
        (c[j], n[j], m[j]) = (state[0][r][v], state[1][r][v], state[2][r][v]);
    }
    let steps = steps::<N>(gates, c, n, m);
    for j in 0..N {
        let (r, v) = (vectors[j] / V, vectors[j] % V);
        let step = &steps[j];
        // SAFETY: row r's output and tape hold step t's DH values (caller).
        unsafe {
            _mm512_storeu_ps(out[r].add(t * dh + v * LANES), step.h);
            if let Some(tape_t) = tape[r].map(|p| p.add(t * TAPE_VALUES * dh)) {
                let at = |slot: usize| tape_t.add(slot * dh + v * LANES);
                _mm512_storeu_ps(at(TAPE_C), step.c);
                _mm512_storeu_ps(at(TAPE_N), step.n);
                _mm512_storeu_ps(at(TAPE_I), step.i);
                _mm512_storeu_ps(at(TAPE_F), step.f);
                _mm512_storeu_ps(at(TAPE_Z), step.z);
                _mm512_storeu_ps(at(TAPE_O), step.o);
                _mm512_storeu_ps(at(TAPE_SIG_NEG_F), sig_neg(gates[j].f_pre, step.e_f));
            }
        }
        (state[0][r][v], state[1][r][v], state[2][r][v]) = (step.c, step.n, step.m);
    }
}

/// N independent steps of 16 units, one operation at a time across the N (why: `simd`'s AVX2
/// `steps`); each lane goes through the operations of that AVX2 step.
#[inline]
#[target_feature(enable = "avx512f")]
fn steps<const N: usize>(
    g: [Gates; N],
    c: [__m512; N],
    n: [__m512; N],
    m: [__m512; N],
) -> [Step; N] {
    let one = _mm512_set1_ps(1.0);
    let zero = _mm512_setzero_ps();
    // logσ(f̃) = min(f̃, 0) − ln(1 + e^{−|f̃|}).
    let e_f = exp::<N>(each!(|j| _mm512_sub_ps(zero, _mm512_abs_ps(g[j].f_pre))));
    let ln_f = ln_at_least_one::<N>(each!(|j| _mm512_add_ps(one, e_f[j])));
    let log_f: [__m512; N] = each!(|j| _mm512_sub_ps(_mm512_min_ps(zero, g[j].f_pre), ln_f[j]));
    // tanh(z̃) = sign(z̃)·(1 − e^{−2|z̃|}) / (1 + e^{−2|z̃|}).
    let e_z = exp::<N>(each!(|j| _mm512_mul_ps(
        _mm512_set1_ps(-2.0),
        _mm512_abs_ps(g[j].z_pre)
    )));
    let e_o = exp::<N>(each!(|j| _mm512_sub_ps(zero, _mm512_abs_ps(g[j].o_pre))));

    let log_f_plus_m: [__m512; N] = each!(|j| _mm512_add_ps(m[j], log_f[j]));
    // Per-element empty-state rule (see the module docs of `slstm`).
    let empty: [__mmask16; N] = each!(|j| _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(n[j], zero));
    // maxps returns its second operand when either is NaN: keep a NaN of either side.
    let m_new: [__m512; N] = each!(|j| {
        let max = _mm512_max_ps(log_f_plus_m[j], g[j].i_pre);
        let max = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(log_f_plus_m[j], log_f_plus_m[j]),
            max,
            log_f_plus_m[j],
        );
        _mm512_mask_blend_ps(empty[j], max, g[j].i_pre)
    });
    // One exponential for both gates (`portable::stabilised_input_and_forget`).
    let d: [__m512; N] = each!(|j| _mm512_sub_ps(g[j].i_pre, log_f_plus_m[j]));
    let e = exp::<N>(each!(|j| _mm512_sub_ps(zero, _mm512_abs_ps(d[j]))));
    let z: [__m512; N] = each!(|j| {
        let tanh_abs = _mm512_div_ps(_mm512_sub_ps(one, e_z[j]), _mm512_add_ps(one, e_z[j]));
        or(tanh_abs, and(g[j].z_pre, _mm512_set1_ps(-0.0)))
    });
    let o: [__m512; N] = each!(|j| {
        let o_non_negative = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(g[j].o_pre, zero);
        _mm512_div_ps(
            _mm512_mask_blend_ps(o_non_negative, e_o[j], one),
            _mm512_add_ps(one, e_o[j]),
        )
    });
    each!(|j| {
        let e = _mm512_min_ps(one, e[j]);
        let i = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_GE_OQ>(d[j], zero) | empty[j],
            e,
            one,
        );
        let f = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(d[j], zero), e, one);
        let c_new = _mm512_fmadd_ps(f, c[j], _mm512_mul_ps(i, z[j]));
        let n_new = _mm512_fmadd_ps(f, n[j], i);
        let h_new = _mm512_div_ps(_mm512_mul_ps(o[j], c_new), n_new);
        Step {
            h: h_new,
            c: c_new,
            n: n_new,
            m: m_new[j],
            i,
            f,
            z: z[j],
            o: o[j],
            e_f: e_f[j],
        }
    })
}

/// σ(−f̃) for the tape, from the step's e^{−|f̃|}; only training needs it.
#[inline]
#[target_feature(enable = "avx512f")]
fn sig_neg(f_pre: __m512, e_f: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let f_non_negative = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f_pre, _mm512_setzero_ps());
    _mm512_div_ps(
        _mm512_mask_blend_ps(f_non_negative, one, e_f),
        _mm512_add_ps(one, e_f),
    )
}

#[inline]
#[target_feature(enable = "avx512f")]
fn and(a: __m512, b: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_castps_si512(a),
        _mm512_castps_si512(b),
    ))
}

#[inline]
#[target_feature(enable = "avx512f")]
fn or(a: __m512, b: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(a),
        _mm512_castps_si512(b),
    ))
}

/// e^x (Cephes `expf`) of N vectors: the AVX2 `exp` of `simd` in 16 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp<const N: usize>(x: [__m512; N]) -> [__m512; N] {
    // NaN is the second operand of min/max, so it passes through.
    let x: [__m512; N] = each!(|j| _mm512_max_ps(
        _mm512_set1_ps(-88.376_26),
        _mm512_min_ps(_mm512_set1_ps(88.376_26), x[j]),
    ));
    // Round toward −∞, exceptions suppressed: floor.
    let fx: [__m512; N] = each!(|j| _mm512_roundscale_ps::<0x09>(_mm512_fmadd_ps(
        x[j],
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    )));
    let x: [__m512; N] = each!(|j| _mm512_fnmadd_ps(fx[j], _mm512_set1_ps(0.693_359_4), x[j]));
    let x: [__m512; N] = each!(|j| _mm512_fnmadd_ps(fx[j], _mm512_set1_ps(-2.121_944_4e-4), x[j]));
    let mut y = [_mm512_set1_ps(EXP_POLYNOMIAL[0]); N];
    for &coefficient in &EXP_POLYNOMIAL[1..] {
        y = each!(|j| _mm512_fmadd_ps(y[j], x[j], _mm512_set1_ps(coefficient)));
    }
    let y: [__m512; N] = each!(|j| _mm512_fmadd_ps(
        y[j],
        _mm512_mul_ps(x[j], x[j]),
        _mm512_add_ps(x[j], _mm512_set1_ps(1.0)),
    ));
    each!(|j| {
        let exponent = _mm512_add_epi32(_mm512_cvttps_epi32(fx[j]), _mm512_set1_epi32(127));
        _mm512_mul_ps(y[j], _mm512_castsi512_ps(_mm512_slli_epi32::<23>(exponent)))
    })
}

/// ln x for x ≥ 1 (Cephes `logf`) of N vectors: the AVX2 `ln_at_least_one` of `simd` in 16
/// lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn ln_at_least_one<const N: usize>(x: [__m512; N]) -> [__m512; N] {
    let bits: [__m512i; N] = each!(|j| _mm512_castps_si512(x[j]));
    let e: [__m512; N] = each!(|j| _mm512_cvtepi32_ps(_mm512_sub_epi32(
        _mm512_srli_epi32::<23>(bits[j]),
        _mm512_set1_epi32(126),
    )));
    // Mantissa in [0.5, 1).
    let mantissa: [__m512; N] = each!(|j| _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(bits[j], _mm512_set1_epi32(0x007f_ffff)),
        _mm512_set1_epi32(0x3f00_0000),
    )));
    let below: [__mmask16; N] = each!(|j| _mm512_cmp_ps_mask::<_CMP_LT_OQ>(
        mantissa[j],
        _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
    ));
    let m: [__m512; N] = each!(|j| _mm512_add_ps(
        _mm512_sub_ps(mantissa[j], _mm512_set1_ps(1.0)),
        _mm512_maskz_mov_ps(below[j], mantissa[j]),
    ));
    let e: [__m512; N] =
        each!(|j| _mm512_sub_ps(e[j], _mm512_maskz_mov_ps(below[j], _mm512_set1_ps(1.0))));
    let z: [__m512; N] = each!(|j| _mm512_mul_ps(m[j], m[j]));
    let mut y = [_mm512_set1_ps(LN_POLYNOMIAL[0]); N];
    for &coefficient in &LN_POLYNOMIAL[1..] {
        y = each!(|j| _mm512_fmadd_ps(y[j], m[j], _mm512_set1_ps(coefficient)));
    }
    let y: [__m512; N] = each!(|j| _mm512_mul_ps(_mm512_mul_ps(y[j], m[j]), z[j]));
    let y: [__m512; N] = each!(|j| _mm512_fmadd_ps(e[j], _mm512_set1_ps(-2.121_944_4e-4), y[j]));
    let y: [__m512; N] = each!(|j| _mm512_fnmadd_ps(z[j], _mm512_set1_ps(0.5), y[j]));
    each!(|j| _mm512_fmadd_ps(e[j], _mm512_set1_ps(0.693_359_4), _mm512_add_ps(m[j], y[j])))
}
