//! Row groups in AVX2 + FMA: 8 lanes, so a head of DH = 8·V units is V vectors per gate. A
//! row's recurrent product has 4·V accumulators, more than 16 registers hold for several rows,
//! so the product runs in chunks of a few accumulator vectors per row, each chunk reading the
//! rows' h once per k. The gates go through `simd`'s AVX2 step itself.

use super::super::NUM_GATES;
use super::super::fused_cpu::{
    TAPE_C, TAPE_F, TAPE_I, TAPE_N, TAPE_O, TAPE_SIG_NEG_F, TAPE_VALUES, TAPE_Z,
};
use super::super::simd::avx2::{Gates, steps};
use super::{HeadScan, RowScan, ScanRows, prefetch_ahead};
use std::arch::x86_64::*;

const LANES: usize = 8;

/// The row-group scan in AVX2 + FMA.
pub(super) struct Avx2;

impl ScanRows for Avx2 {
    const LANES: usize = LANES;
    const ROW_VECTORS: usize = 8;

    unsafe fn scan_rows<const K: usize, const V: usize, const Q: usize>(
        rows: [&mut RowScan<'_>; K],
        head: HeadScan<'_>,
    ) {
        // SAFETY: passed on from the caller.
        unsafe { scan_rows::<K, V, Q>(rows, head) }
    }
}

/// Whether this CPU runs these row groups.
pub(super) fn available() -> bool {
    crate::xlstm::kernels::simd::avx2_fma()
}

/// Scans K rows of one head with V·8 units per head.
///
/// # Safety
/// AVX2 and FMA must be available ([`available`]); the rows and head as
/// [`ScanRows::scan_rows`] states, with DH = 8·V.
#[target_feature(enable = "avx2,fma")]
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
    debug_assert_eq!(Q, NUM_GATES * V);
    let gates_width = NUM_GATES * dh;
    let step_width = NUM_GATES * hidden;
    // Accumulators per row in one chunk of the recurrent product: K·chunk accumulators plus K
    // broadcast h values stay within the 16 vector registers.
    let chunk = if K >= 3 { 2 } else { 4 };
    let zero = _mm256_setzero_ps();
    // SAFETY: every offset below stays inside the slices, whose lengths the caller guarantees.
    unsafe {
        let mut c = [[zero; V]; K];
        let mut n = [[zero; V]; K];
        let mut m = [[zero; V]; K];
        let mut h_prev = [std::ptr::null::<f32>(); K];
        for (r, row) in rows.iter().enumerate() {
            for v in 0..V {
                c[r][v] = _mm256_loadu_ps(row.initial[1].as_ptr().add(v * LANES));
                n[r][v] = _mm256_loadu_ps(row.initial[2].as_ptr().add(v * LANES));
                m[r][v] = _mm256_loadu_ps(row.initial[3].as_ptr().add(v * LANES));
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
            // Pre-activations, vector q = g·V + v: bias + input, then the recurrent product in
            // k order (the order of the pair scan's `accumulate_rows`).
            let mut pre = [[zero; Q]; K];
            for first in (0..NUM_GATES * V).step_by(chunk) {
                let mut acc = [[zero; 4]; K];
                for r in 0..K {
                    let x_t = x[r].as_ptr().add(t * step_width + head_offset);
                    for (j, acc) in acc[r].iter_mut().enumerate().take(chunk) {
                        let q = first + j;
                        *acc = _mm256_add_ps(
                            _mm256_loadu_ps(bias.add(q * LANES)),
                            _mm256_loadu_ps(x_t.add(q / V * hidden + q % V * LANES)),
                        );
                    }
                }
                for k in 0..dh {
                    let row_k = weights.add(k * gates_width + first * LANES);
                    for r in 0..K {
                        let h_k = _mm256_set1_ps(*h_prev[r].add(k));
                        for (j, acc) in acc[r].iter_mut().enumerate().take(chunk) {
                            *acc =
                                _mm256_fmadd_ps(h_k, _mm256_loadu_ps(row_k.add(j * LANES)), *acc);
                        }
                    }
                }
                for r in 0..K {
                    pre[r][first..first + chunk].copy_from_slice(&acc[r][..chunk]);
                }
            }
            // The gates two vectors at a time (`steps`): two independent chains interleaved,
            // of two rows (K is 1, 2 or 4), or of one row's two vectors. Four at a time measured
            // slower (registers spilled), one at a time 20 % slower.
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
                _mm256_storeu_ps(at(0), _mm256_loadu_ps(h_prev[r].add(v * LANES)));
                _mm256_storeu_ps(at(1), c[r][v]);
                _mm256_storeu_ps(at(2), n[r][v]);
                _mm256_storeu_ps(at(3), m[r][v]);
            }
        }
    }
}

/// Steps the N vectors `vectors` (each `row · V + vector`) of a row group at step `t`: their
/// gates from `pre`, their c, n, m (`[row][vector]` each) in `state`; writes h (and the tape)
/// of each.
///
/// # Safety
/// As [`scan_rows`], with `t < seq_len` and every index below K·V.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn advance<const K: usize, const V: usize, const Q: usize, const N: usize>(
    pre: &[[__m256; Q]; K],
    state: [&mut [[__m256; V]; K]; 3],
    vectors: [usize; N],
    out: &[*mut f32; K],
    tape: &[Option<*mut f32>; K],
    t: usize,
) {
    let dh = V * LANES;
    let zero = _mm256_setzero_ps();
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
            _mm256_storeu_ps(out[r].add(t * dh + v * LANES), step.h);
            if let Some(tape_t) = tape[r].map(|p| p.add(t * TAPE_VALUES * dh)) {
                let at = |slot: usize| tape_t.add(slot * dh + v * LANES);
                _mm256_storeu_ps(at(TAPE_C), step.c);
                _mm256_storeu_ps(at(TAPE_N), step.n);
                _mm256_storeu_ps(at(TAPE_I), step.i);
                _mm256_storeu_ps(at(TAPE_F), step.f);
                _mm256_storeu_ps(at(TAPE_Z), step.z);
                _mm256_storeu_ps(at(TAPE_O), step.o);
                _mm256_storeu_ps(at(TAPE_SIG_NEG_F), step.sig_neg_f());
            }
        }
        (state[0][r][v], state[1][r][v], state[2][r][v]) = (step.c, step.n, step.m);
    }
}
