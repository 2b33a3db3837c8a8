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
use super::{HeadScan, RowScan, ScanRows, prefetch_ahead};
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
    is_x86_feature_detected!("avx512f")
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
            for r in 0..K {
                let h_out = out[r].add(t * dh);
                let tape_t = tape[r].map(|p| p.add(t * TAPE_VALUES * dh));
                for v in 0..V {
                    let gates = Gates {
                        i_pre: pre[r][v],
                        f_pre: pre[r][V + v],
                        z_pre: pre[r][2 * V + v],
                        o_pre: pre[r][3 * V + v],
                    };
                    let step = step(gates, c[r][v], n[r][v], m[r][v]);
                    _mm512_storeu_ps(h_out.add(v * LANES), step.h);
                    if let Some(tape_t) = tape_t {
                        let at = |slot: usize| tape_t.add(slot * dh + v * LANES);
                        _mm512_storeu_ps(at(TAPE_C), step.c);
                        _mm512_storeu_ps(at(TAPE_N), step.n);
                        _mm512_storeu_ps(at(TAPE_I), step.i);
                        _mm512_storeu_ps(at(TAPE_F), step.f);
                        _mm512_storeu_ps(at(TAPE_Z), step.z);
                        _mm512_storeu_ps(at(TAPE_O), step.o);
                        _mm512_storeu_ps(at(TAPE_SIG_NEG_F), sig_neg(gates.f_pre, step.e_f));
                    }
                    c[r][v] = step.c;
                    n[r][v] = step.n;
                    m[r][v] = step.m;
                }
                h_prev[r] = h_out;
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

/// One step of 16 units: the operations of `simd`'s AVX2 `forward_step`, lane for lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn step(g: Gates, c: __m512, n: __m512, m: __m512) -> Step {
    let one = _mm512_set1_ps(1.0);
    let zero = _mm512_setzero_ps();
    // logσ(f̃) = min(f̃, 0) − ln(1 + e^{−|f̃|}).
    let e_f = exp(_mm512_sub_ps(zero, _mm512_abs_ps(g.f_pre)));
    let log_f = _mm512_sub_ps(
        _mm512_min_ps(zero, g.f_pre),
        ln_at_least_one(_mm512_add_ps(one, e_f)),
    );
    let log_f_plus_m = _mm512_add_ps(m, log_f);
    // Per-element empty-state rule (see the module docs of `slstm`).
    let empty = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(n, zero);
    // maxps returns its second operand when either is NaN: keep a NaN of either side.
    let max = _mm512_max_ps(log_f_plus_m, g.i_pre);
    let max = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(log_f_plus_m, log_f_plus_m),
        max,
        log_f_plus_m,
    );
    let m_new = _mm512_mask_blend_ps(empty, max, g.i_pre);
    // One exponential for both gates (`portable::stabilised_input_and_forget`).
    let d = _mm512_sub_ps(g.i_pre, log_f_plus_m);
    let e = _mm512_min_ps(one, exp(_mm512_sub_ps(zero, _mm512_abs_ps(d))));
    let i = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(d, zero) | empty, e, one);
    let f = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(d, zero), e, one);

    // tanh(z̃) = sign(z̃)·(1 − e^{−2|z̃|}) / (1 + e^{−2|z̃|}).
    let e_z = exp(_mm512_mul_ps(_mm512_set1_ps(-2.0), _mm512_abs_ps(g.z_pre)));
    let tanh_abs = _mm512_div_ps(_mm512_sub_ps(one, e_z), _mm512_add_ps(one, e_z));
    let z = or(tanh_abs, and(g.z_pre, _mm512_set1_ps(-0.0)));

    let e_o = exp(_mm512_sub_ps(zero, _mm512_abs_ps(g.o_pre)));
    let o_non_negative = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(g.o_pre, zero);
    let o = _mm512_div_ps(
        _mm512_mask_blend_ps(o_non_negative, e_o, one),
        _mm512_add_ps(one, e_o),
    );

    let c_new = _mm512_fmadd_ps(f, c, _mm512_mul_ps(i, z));
    let n_new = _mm512_fmadd_ps(f, n, i);
    let h_new = _mm512_div_ps(_mm512_mul_ps(o, c_new), n_new);
    Step {
        h: h_new,
        c: c_new,
        n: n_new,
        m: m_new,
        i,
        f,
        z,
        o,
        e_f,
    }
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

/// e^x (Cephes `expf`), the AVX2 `exp` of `simd` in 16 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp(x: __m512) -> __m512 {
    // NaN is the second operand of min/max, so it passes through.
    let x = _mm512_max_ps(
        _mm512_set1_ps(-88.376_26),
        _mm512_min_ps(_mm512_set1_ps(88.376_26), x),
    );
    // Round toward −∞, exceptions suppressed: floor.
    let fx = _mm512_roundscale_ps::<0x09>(_mm512_fmadd_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    ));
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), x);
    let y = _mm512_set1_ps(1.987_569_1e-4);
    let y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.398_199_9e-3));
    let y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.333_452e-3));
    let y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.166_579_6e-2));
    let y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(0.166_666_65));
    let y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(0.5));
    let y = _mm512_fmadd_ps(
        y,
        _mm512_mul_ps(x, x),
        _mm512_add_ps(x, _mm512_set1_ps(1.0)),
    );
    let exponent = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
    _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(exponent)))
}

/// ln x for x ≥ 1 (Cephes `logf`), the AVX2 `ln_at_least_one` of `simd` in 16 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn ln_at_least_one(x: __m512) -> __m512 {
    let bits = _mm512_castps_si512(x);
    let e = _mm512_cvtepi32_ps(_mm512_sub_epi32(
        _mm512_srli_epi32::<23>(bits),
        _mm512_set1_epi32(126),
    ));
    // Mantissa in [0.5, 1).
    let mantissa = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(bits, _mm512_set1_epi32(0x007f_ffff)),
        _mm512_set1_epi32(0x3f00_0000),
    ));
    let below =
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(mantissa, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let m = _mm512_add_ps(
        _mm512_sub_ps(mantissa, _mm512_set1_ps(1.0)),
        _mm512_maskz_mov_ps(below, mantissa),
    );
    let e = _mm512_sub_ps(e, _mm512_maskz_mov_ps(below, _mm512_set1_ps(1.0)));
    let z = _mm512_mul_ps(m, m);
    let y = _mm512_set1_ps(7.037_683_6e-2);
    let y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.151_461e-1));
    let y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.167_699_9e-1));
    let y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.242_014_1e-1));
    let y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.424_932_3e-1));
    let y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.666_805_8e-1));
    let y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(2.000_071_4e-1));
    let y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-2.499_999_4e-1));
    let y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(3.333_333e-1));
    let y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
    let y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.121_944_4e-4), y);
    let y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5), y);
    _mm512_fmadd_ps(e, _mm512_set1_ps(0.693_359_4), _mm512_add_ps(m, y))
}
