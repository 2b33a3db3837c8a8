// mLSTM on the GPU: the chunkwise form (forward and backward) and the recurrent step.
// Arithmetic, stabilisers and conventions are those of the fused CPU kernel
// (src/xlstm/kernels/mlstm/fused_cpu.rs), the oracle these kernels are tested against.
//
// Every head (bh = batch·NH + head) is an independent problem: qkv `[BH, S, 3·DH]`,
// gates `[BH, S, 2]` (igate, fgate pre-activations), state records `[C (DH·DH) | n (DH) | m]`.
// A chunk of L rows keeps its inputs and L×L matrices in shared memory, with rows padded by
// one float (strides DH + 1 and L + 1) so that threads reading down a column hit distinct banks.
//
// Forward: `mlstm_chunk_states` runs the recurrence over chunk states (one block per head,
// chunks in order) and records the state before every chunk and the last one; then
// `mlstm_chunk_rows` computes the output rows of every chunk in parallel (one block per
// (head, chunk)). Backward: `mlstm_chunk_state_grads` runs the state-gradient recurrence
// backwards (one block per head) and records the gradient reaching the state after every
// chunk; then `mlstm_chunk_grads` computes the input gradients of every chunk in parallel.
// The stabilisers are constants in the backward pass (exact for losses on h).
//
// Tape (kept between forward and backward by the caller): states `[BH, NC + 1, SL]`, then
// rows `[BH, S, DH + 2]` = h, the row stabiliser and the signed normaliser of every row.
// The parallel form is this chunkwise form with the initial state (0, 0, m = −inf): then
// every row stabiliser equals the parallel form's.
#include "common.cuh"

#define DENOMINATOR_EPS 1e-6f

__device__ __forceinline__ int state_len(int d) { return d * d + d + 1; }

// Serial prefix sum of logσ(fgate) over a chunk (the CPU order of summation) and the
// input gate pre-activations; run by one thread.
__device__ __forceinline__ void load_gate_terms(const float* gates, int len, float* cum,
                                                float* ig) {
    float total = 0.f;
    for (int tau = 0; tau < len; ++tau) {
        total += log_sigmoid(gates[2 * tau + 1]);
        cum[tau] = total;
        ig[tau] = gates[2 * tau];
    }
}

// Copies `len` rows of `width` columns starting at column `first` of rows of `stride` into
// rows of `dst_stride`.
__device__ __forceinline__ void load_rows(const float* src, int stride, int first, int width,
                                          int len, float* dst, int dst_stride) {
    for (int e = flat_thread(); e < len * width; e += flat_threads()) {
        dst[(e / width) * dst_stride + e % width] = src[(e / width) * stride + first + e % width];
    }
}

// grid (BH), block (256). Shared: k, v `[L, DH + 1]`, cum, ig, weights `[L]`, 2 scalars.
// initial `[BH, SL]`; states `[BH, NC + 1, SL]` (written); final_states `[BH, SL]` (written).
extern "C" __global__ void mlstm_chunk_states_f32(
    const float* __restrict__ qkv, const float* __restrict__ gates,
    const float* __restrict__ initial, float* __restrict__ states,
    float* __restrict__ final_states, int seq_len, int d, int chunk, int num_chunks) {
    const int bh = blockIdx.x;
    const int sl = state_len(d);
    const int tid = flat_thread(), nt = flat_threads();
    const int ds = d + 1;
    float* k_s = smem;
    float* v_s = k_s + chunk * ds;
    float* cum = v_s + chunk * ds;
    float* ig = cum + chunk;
    float* wrow = ig + chunk;
    float* scalars = wrow + chunk;  // m_next, carry
    const float key_scale = rsqrtf((float)d);
    const float* qkv_h = qkv + (size_t)bh * seq_len * 3 * d;
    const float* gates_h = gates + (size_t)bh * seq_len * 2;
    float* states_h = states + (size_t)bh * (num_chunks + 1) * sl;
    for (int e = tid; e < sl; e += nt) states_h[e] = initial[(size_t)bh * sl + e];
    for (int c = 0; c < num_chunks; ++c) {
        const int start = c * chunk;
        const int len = min(chunk, seq_len - start);
        const float* prev = states_h + (size_t)c * sl;
        float* next = states_h + (size_t)(c + 1) * sl;
        __syncthreads();  // prev is complete; the previous chunk's shared data is consumed
        load_rows(qkv_h + (size_t)start * 3 * d, 3 * d, d, d, len, k_s, ds);
        load_rows(qkv_h + (size_t)start * 3 * d, 3 * d, 2 * d, d, len, v_s, ds);
        if (tid == 0) {
            load_gate_terms(gates_h + 2 * start, len, cum, ig);
            const float total = cum[len - 1];
            const float m_prev = prev[sl - 1];
            float m_next = total + m_prev;
            for (int tau = 0; tau < len; ++tau) {
                wrow[tau] = (total - cum[tau]) + ig[tau];
                m_next = fmaxf(m_next, wrow[tau]);
            }
            scalars[0] = m_next;
            scalars[1] = expf((total + m_prev) - m_next);
        }
        __syncthreads();
        const float m_next = scalars[0], carry = scalars[1];
        for (int tau = tid; tau < len; tau += nt) wrow[tau] = expf(wrow[tau] - m_next);
        __syncthreads();
        for (int e = tid; e < sl; e += nt) {
            float value;
            if (e < d * d) {
                const int a = e / d, b = e % d;
                float acc = carry * prev[e];
                for (int tau = 0; tau < len; ++tau) {
                    acc += k_s[tau * ds + a] * wrow[tau] * key_scale * v_s[tau * ds + b];
                }
                value = acc;
            } else if (e < d * d + d) {
                const int a = e - d * d;
                float keys = 0.f;
                for (int tau = 0; tau < len; ++tau) keys += k_s[tau * ds + a] * wrow[tau] * key_scale;
                value = carry * prev[e] + keys;
            } else {
                value = m_next;
            }
            next[e] = value;
            if (c == num_chunks - 1) final_states[(size_t)bh * sl + e] = value;
        }
    }
}

// grid (BH, NC), block (256). Shared: q, k, v `[L, DH + 1]`, weights `[L, L + 1]`, n_prev `[DH]`,
// cum, ig, row stabiliser, inter weight, denominator `[L]`.
// h `[BH, S, DH]` (written); rows `[BH, S, DH + 2]` (written unless null).
extern "C" __global__ void mlstm_chunk_rows_f32(
    const float* __restrict__ qkv, const float* __restrict__ gates,
    const float* __restrict__ states, float* __restrict__ h, float* __restrict__ rows,
    int seq_len, int d, int chunk, int num_chunks) {
    const int bh = blockIdx.x, c = blockIdx.y;
    const int sl = state_len(d);
    const int tid = flat_thread(), nt = flat_threads();
    const int start = c * chunk;
    const int len = min(chunk, seq_len - start);
    const int ds = d + 1, ls = chunk + 1;
    float* q_s = smem;
    float* k_s = q_s + chunk * ds;
    float* v_s = k_s + chunk * ds;
    float* w_s = v_s + chunk * ds;
    float* n_prev = w_s + chunk * ls;
    float* cum = n_prev + d;
    float* ig = cum + chunk;
    float* m_row = ig + chunk;
    float* inter = m_row + chunk;
    float* den = inter + chunk;
    const float key_scale = rsqrtf((float)d);
    const float* qkv_c = qkv + ((size_t)bh * seq_len + start) * 3 * d;
    const float* prev = states + ((size_t)bh * (num_chunks + 1) + c) * sl;
    const float m_prev = prev[sl - 1];
    load_rows(qkv_c, 3 * d, 0, d, len, q_s, ds);
    load_rows(qkv_c, 3 * d, d, d, len, k_s, ds);
    load_rows(qkv_c, 3 * d, 2 * d, d, len, v_s, ds);
    for (int a = tid; a < d; a += nt) n_prev[a] = prev[d * d + a];
    if (tid == 0) load_gate_terms(gates + ((size_t)bh * seq_len + start) * 2, len, cum, ig);
    __syncthreads();
    for (int tau = tid; tau < len; tau += nt) {
        float row_max = -INFINITY;
        for (int s = 0; s <= tau; ++s) row_max = fmaxf(row_max, (cum[tau] - cum[s]) + ig[s]);
        const float log_inter = cum[tau] + m_prev;
        const float m = fmaxf(row_max, log_inter);
        m_row[tau] = m;
        inter[tau] = expf(log_inter - m);
    }
    __syncthreads();
    for (int e = tid; e < len * len; e += nt) {
        const int tau = e / len, s = e % len;
        float w = 0.f;
        if (s <= tau) {
            float dot = 0.f;
            for (int a = 0; a < d; ++a) dot += q_s[tau * ds + a] * k_s[s * ds + a];
            const float decay = expf(((cum[tau] - cum[s]) + ig[s]) - m_row[tau]);
            w = dot * decay * key_scale;
        }
        w_s[tau * ls + s] = w;
    }
    __syncthreads();
    for (int tau = tid; tau < len; tau += nt) {
        float normaliser = 0.f;
        for (int s = 0; s <= tau; ++s) normaliser += w_s[tau * ls + s];
        float nq = 0.f;
        for (int a = 0; a < d; ++a) nq += n_prev[a] * q_s[tau * ds + a];
        normaliser += inter[tau] * nq;
        den[tau] = fmaxf(fabsf(normaliser), expf(-m_row[tau])) + DENOMINATOR_EPS;
        if (rows) {
            float* stats = rows + ((size_t)bh * seq_len + start + tau) * (d + 2) + d;
            stats[0] = m_row[tau];
            stats[1] = normaliser;
        }
    }
    __syncthreads();
    for (int e = tid; e < len * d; e += nt) {
        const int tau = e / d, j = e % d;
        float num = 0.f;
        for (int s = 0; s <= tau; ++s) num += w_s[tau * ls + s] * v_s[s * ds + j];
        float from_state = 0.f;
        for (int a = 0; a < d; ++a) from_state += q_s[tau * ds + a] * prev[a * d + j];
        const float value = (num + inter[tau] * from_state) / den[tau];
        h[((size_t)bh * seq_len + start + tau) * d + j] = value;
        if (rows) rows[((size_t)bh * seq_len + start + tau) * (d + 2) + j] = value;
    }
}

// Per-row terms of a chunk's backward pass from the tape: the denominator, the gradient of
// the normaliser b and the weight of the carried state in the row. One thread per row.
__device__ __forceinline__ void row_gradient_terms(const float* rows_c, const float* grad_h_c,
                                                   const float* cum, float m_prev, int d,
                                                   int len, float* den, float* grad_b,
                                                   float* inter, float* m_row) {
    for (int tau = flat_thread(); tau < len; tau += flat_threads()) {
        const float* row = rows_c + (size_t)tau * (d + 2);
        const float m = row[d], normaliser = row[d + 1];
        const float floor = expf(-m);
        const float dn = fmaxf(fabsf(normaliser), floor) + DENOMINATOR_EPS;
        float gh_dot_h = 0.f;
        for (int a = 0; a < d; ++a) gh_dot_h += grad_h_c[(size_t)tau * d + a] * row[a];
        const float grad_den = -gh_dot_h / dn;
        // The max picks |b| only above the floor; the floor depends on m alone.
        grad_b[tau] = fabsf(normaliser) > floor ? grad_den * copysignf(1.f, normaliser) : 0.f;
        den[tau] = dn;
        inter[tau] = expf((cum[tau] + m_prev) - m);
        m_row[tau] = m;
    }
}

// Sums one value per thread in a fixed order (deterministic); `red` holds blockDim floats.
__device__ float block_sum(float value, float* red) {
    const int tid = flat_thread(), nt = flat_threads();
    red[tid] = value;
    __syncthreads();
    float total = 0.f;
    if (tid == 0) {
        for (int i = 0; i < nt; ++i) total += red[i];
        red[0] = total;
    }
    __syncthreads();
    total = red[0];
    __syncthreads();
    return total;
}

// grid (BH), block (256). Shared: q, grad_num `[L, DH + 1]`, cum, ig, den, grad_b, inter, m_row
// `[L]`, 2 scalars, a reduction buffer of blockDim floats.
// grad_out: h gradient `[BH, S, DH]` then the final-state gradient `[BH, SL]`.
// carries `[BH, NC, DH·DH + DH]` (written): gradient reaching the state after every chunk.
// grad_initial `[BH, SL]` (written): gradient of the initial state (m: through (C, n)·e^m).
extern "C" __global__ void mlstm_chunk_state_grads_f32(
    const float* __restrict__ qkv, const float* __restrict__ gates,
    const float* __restrict__ states, const float* __restrict__ rows,
    const float* __restrict__ grad_out, float* __restrict__ carries,
    float* __restrict__ grad_initial, int batch_heads, int seq_len, int d, int chunk,
    int num_chunks) {
    const int bh = blockIdx.x;
    const int sl = state_len(d);
    const int cl = d * d + d;
    const int tid = flat_thread(), nt = flat_threads();
    const int ds = d + 1;
    float* q_s = smem;
    float* gn_s = q_s + chunk * ds;
    float* cum = gn_s + chunk * ds;
    float* ig = cum + chunk;
    float* den = ig + chunk;
    float* grad_b = den + chunk;
    float* inter = grad_b + chunk;
    float* m_row = inter + chunk;
    float* scalars = m_row + chunk;
    float* red = scalars + 2;
    const float* qkv_h = qkv + (size_t)bh * seq_len * 3 * d;
    const float* grad_h = grad_out + (size_t)bh * seq_len * d;
    const float* grad_final = grad_out + (size_t)batch_heads * seq_len * d + (size_t)bh * sl;
    const float* states_h = states + (size_t)bh * (num_chunks + 1) * sl;
    float* running = grad_initial + (size_t)bh * sl;
    for (int e = tid; e < cl; e += nt) running[e] = grad_final[e];
    for (int c = num_chunks - 1; c >= 0; --c) {
        const int start = c * chunk;
        const int len = min(chunk, seq_len - start);
        const float* prev = states_h + (size_t)c * sl;
        __syncthreads();
        for (int e = tid; e < cl; e += nt) carries[((size_t)bh * num_chunks + c) * cl + e] = running[e];
        load_rows(qkv_h + (size_t)start * 3 * d, 3 * d, 0, d, len, q_s, ds);
        load_rows(grad_h + (size_t)start * d, d, 0, d, len, gn_s, ds);
        if (tid == 0) {
            load_gate_terms(gates + ((size_t)bh * seq_len + start) * 2, len, cum, ig);
            const float m_prev = prev[sl - 1], m_next = prev[sl + sl - 1];
            scalars[0] = expf((cum[len - 1] + m_prev) - m_next);
        }
        __syncthreads();
        row_gradient_terms(rows + ((size_t)bh * seq_len + start) * (d + 2),
                           grad_h + (size_t)start * d, cum, prev[sl - 1], d, len, den, grad_b,
                           inter, m_row);
        __syncthreads();
        for (int e = tid; e < len * d; e += nt) gn_s[(e / d) * ds + e % d] /= den[e / d];
        __syncthreads();
        const float carry = scalars[0];
        for (int e = tid; e < cl; e += nt) {
            float acc = carry * running[e];
            if (e < d * d) {
                const int a = e / d, b = e % d;
                for (int tau = 0; tau < len; ++tau) acc += inter[tau] * q_s[tau * ds + a] * gn_s[tau * ds + b];
            } else {
                const int a = e - d * d;
                for (int tau = 0; tau < len; ++tau) acc += inter[tau] * grad_b[tau] * q_s[tau * ds + a];
            }
            running[e] = acc;
        }
    }
    __syncthreads();
    // The initial state means (C, n)·e^{m}: h depends on m only through that product.
    float partial = 0.f;
    for (int e = tid; e < cl; e += nt) partial += running[e] * states_h[e];
    const float grad_m = block_sum(partial, red);
    if (tid == 0) running[sl - 1] = isfinite(states_h[sl - 1]) ? grad_m : 0.f;
}

// grid (BH, NC), block (256). The gradients of q, k, v and both gates for the rows of one
// chunk, from the tape and the gradient reaching the state after the chunk (carries).
// Shared: q, k, v, grad_num, projection, grad_q, grad_k, grad_v `[L, DH + 1]`; decay,
// weights, weight gradients `[L, L + 1]`; cum, ig, fgate, m_row, den, grad_b, inter, input weights,
// grad_cum, grad_ig, grad_log_input `[L]`; scalars; a reduction buffer of blockDim floats.
extern "C" __global__ void mlstm_chunk_grads_f32(
    const float* __restrict__ qkv, const float* __restrict__ gates,
    const float* __restrict__ states, const float* __restrict__ rows,
    const float* __restrict__ grad_out, const float* __restrict__ carries,
    float* __restrict__ grad_qkv, float* __restrict__ grad_gates, int seq_len, int d,
    int chunk, int num_chunks) {
    const int bh = blockIdx.x, c = blockIdx.y;
    const int sl = state_len(d);
    const int cl = d * d + d;
    const int tid = flat_thread(), nt = flat_threads();
    const int start = c * chunk;
    const int len = min(chunk, seq_len - start);
    const int ds = d + 1, ls = chunk + 1;
    const int ld = chunk * ds;
    float* q_s = smem;
    float* k_s = q_s + ld;
    float* v_s = k_s + ld;
    float* gn_s = v_s + ld;
    float* proj = gn_s + ld;
    float* gq = proj + ld;
    float* gk = gq + ld;
    float* gv = gk + ld;
    float* dec_s = gv + ld;
    float* w_s = dec_s + chunk * ls;
    float* gw_s = w_s + chunk * ls;
    float* cum = gw_s + chunk * ls;
    float* ig = cum + chunk;
    float* fpre = ig + chunk;
    float* m_row = fpre + chunk;
    float* den = m_row + chunk;
    float* grad_b = den + chunk;
    float* inter = grad_b + chunk;
    float* wrow = inter + chunk;
    float* gcum = wrow + chunk;
    float* gig = gcum + chunk;
    float* gli = gig + chunk;
    float* scalars = gli + chunk;  // carry, m_next, grad_total
    float* red = scalars + 4;
    const float key_scale = rsqrtf((float)d);
    const float* qkv_c = qkv + ((size_t)bh * seq_len + start) * 3 * d;
    const float* gates_c = gates + ((size_t)bh * seq_len + start) * 2;
    const float* grad_h_c = grad_out + ((size_t)bh * seq_len + start) * d;
    const float* prev = states + ((size_t)bh * (num_chunks + 1) + c) * sl;
    const float* carry_c = carries + ((size_t)bh * num_chunks + c) * cl;
    const float* carry_n = carry_c + d * d;
    const float m_prev = prev[sl - 1];

    load_rows(qkv_c, 3 * d, 0, d, len, q_s, ds);
    load_rows(qkv_c, 3 * d, d, d, len, k_s, ds);
    load_rows(qkv_c, 3 * d, 2 * d, d, len, v_s, ds);
    load_rows(grad_h_c, d, 0, d, len, gn_s, ds);
    for (int e = tid; e < len * d; e += nt) {
        const int i = (e / d) * ds + e % d;
        gq[i] = gk[i] = gv[i] = 0.f;
    }
    for (int tau = tid; tau < len; tau += nt) {
        gcum[tau] = gig[tau] = 0.f;
        fpre[tau] = gates_c[2 * tau + 1];
    }
    if (tid == 0) {
        load_gate_terms(gates_c, len, cum, ig);
        const float total = cum[len - 1];
        const float m_next = prev[sl + sl - 1];
        scalars[0] = expf((total + m_prev) - m_next);
        scalars[1] = m_next;
    }
    __syncthreads();
    const float carry = scalars[0], m_next = scalars[1];
    const float total = cum[len - 1];
    row_gradient_terms(rows + ((size_t)bh * seq_len + start) * (d + 2), grad_h_c, cum, m_prev, d,
                       len, den, grad_b, inter, m_row);
    for (int tau = tid; tau < len; tau += nt) wrow[tau] = expf(((total - cum[tau]) + ig[tau]) - m_next);
    __syncthreads();

    // --- The state update of this chunk (CPU: chunk_state_backward). ---
    for (int e = tid; e < len * d; e += nt) {
        // proj[τ, a] = Σ_b dC[a, b]·v_τ[b] + dn[a]: the gradient of the weighted key of row τ.
        const int tau = e / d, a = e % d, i = tau * ds + a;
        gn_s[i] /= den[tau];
        float acc = carry_n[a];
        for (int b = 0; b < d; ++b) acc += v_s[tau * ds + b] * carry_c[a * d + b];
        proj[i] = acc;
    }
    float partial = 0.f;
    for (int e = tid; e < cl; e += nt) partial += carry_c[e] * prev[e];
    const float grad_carry = block_sum(partial, red);  // synchronises
    for (int e = tid; e < len * d; e += nt) {
        const int tau = e / d, x = e % d, i = tau * ds + x;
        float acc = 0.f;
        for (int a = 0; a < d; ++a) acc += k_s[tau * ds + a] * wrow[tau] * key_scale * carry_c[a * d + x];
        gv[i] += acc;
        gk[i] += wrow[tau] * key_scale * proj[i];
    }
    for (int tau = tid; tau < len; tau += nt) {
        float kp = 0.f;
        for (int a = 0; a < d; ++a) kp += k_s[tau * ds + a] * proj[tau * ds + a];
        const float g = key_scale * kp * wrow[tau];
        gli[tau] = g;
        gcum[tau] -= g;
        gig[tau] += g;
    }
    __syncthreads();
    if (tid == 0) {
        float grad_total = grad_carry * carry;
        for (int tau = 0; tau < len; ++tau) grad_total += gli[tau];
        gcum[len - 1] += grad_total;
    }

    // --- The output rows of this chunk (CPU: chunk_rows_backward). ---
    for (int e = tid; e < len * len; e += nt) {
        const int tau = e / len, s = e % len;
        float decay = 0.f, w = 0.f, gw = 0.f;
        if (s <= tau) {
            float qk = 0.f, gnv = 0.f;
            for (int a = 0; a < d; ++a) {
                qk += q_s[tau * ds + a] * k_s[s * ds + a];
                gnv += gn_s[tau * ds + a] * v_s[s * ds + a];
            }
            decay = expf(((cum[tau] - cum[s]) + ig[s]) - m_row[tau]);
            w = qk * decay * key_scale;
            gw = grad_b[tau] + gnv;
        }
        dec_s[tau * ls + s] = decay;
        w_s[tau * ls + s] = w;
        gw_s[tau * ls + s] = gw;
    }
    for (int e = tid; e < len * d; e += nt) {
        // proj[τ, a] = Σ_b C_prev[a, b]·grad_num_τ[b]
        const int tau = e / d, a = e % d;
        float acc = 0.f;
        for (int b = 0; b < d; ++b) acc += gn_s[tau * ds + b] * prev[a * d + b];
        proj[tau * ds + a] = acc;
    }
    __syncthreads();
    for (int e = tid; e < len * d; e += nt) {
        const int s = e / d, x = e % d;
        float acc = 0.f;
        for (int tau = s; tau < len; ++tau) acc += w_s[tau * ls + s] * gn_s[tau * ds + x];
        gv[s * ds + x] += acc;
    }
    for (int e = tid; e < len * len; e += nt) {
        const int tau = e / len, s = e % len;
        const int at = tau * ls + s;
        const float gw = gw_s[at];
        gw_s[at] = gw * w_s[at];                   // gradient of log D[τ, s]
        dec_s[at] = gw * dec_s[at] * key_scale;    // gradient of the score q_τ·k_s
    }
    for (int tau = tid; tau < len; tau += nt) {
        float qp = 0.f, nq = 0.f;
        for (int a = 0; a < d; ++a) {
            qp += q_s[tau * ds + a] * proj[tau * ds + a];
            nq += prev[d * d + a] * q_s[tau * ds + a];
        }
        const float grad_inter = qp + grad_b[tau] * nq;
        gcum[tau] += grad_inter * inter[tau];
    }
    __syncthreads();
    for (int i = tid; i < len; i += nt) {
        float row_sum = 0.f, col_sum = 0.f;
        for (int s = 0; s <= i; ++s) row_sum += gw_s[i * ls + s];
        for (int tau = i; tau < len; ++tau) col_sum += gw_s[tau * ls + i];
        gcum[i] += row_sum - col_sum;
        gig[i] += col_sum;
    }
    for (int e = tid; e < len * d; e += nt) {
        const int tau = e / d, a = e % d, i = tau * ds + a;
        float acc_q = 0.f, acc_k = 0.f;
        for (int s = 0; s <= tau; ++s) acc_q += dec_s[tau * ls + s] * k_s[s * ds + a];
        for (int r = tau; r < len; ++r) acc_k += dec_s[r * ls + tau] * q_s[r * ds + a];
        const float w = inter[tau];
        gq[i] = acc_q + w * proj[i] + w * grad_b[tau] * prev[d * d + a];
        gk[i] += acc_k;
    }
    __syncthreads();

    // cum[τ] = Σ_{s≤τ} logσ(f̃_s), so dL/d logσ(f̃_s) = Σ_{τ≥s} dL/dcum[τ].
    float* grad_gates_c = grad_gates + ((size_t)bh * seq_len + start) * 2;
    for (int tau = tid; tau < len; tau += nt) {
        float suffix = 0.f;
        for (int r = len - 1; r >= tau; --r) suffix += gcum[r];
        grad_gates_c[2 * tau] = gig[tau];
        grad_gates_c[2 * tau + 1] = suffix / (1.f + expf(fpre[tau]));
    }
    float* grad_qkv_c = grad_qkv + ((size_t)bh * seq_len + start) * 3 * d;
    for (int e = tid; e < len * d; e += nt) {
        const int tau = e / d, a = e % d, i = tau * ds + a;
        float* row = grad_qkv_c + (size_t)tau * 3 * d;
        row[a] = gq[i];
        row[d + a] = gk[i];
        row[2 * d + a] = gv[i];
    }
}

// grid (BH), block (256). qkv `[BH, 3·DH]`, gates `[BH, 2]`, state `[BH, SL]`;
// out `[BH, DH + SL]` = h, then the new state record. Shared: 2 scalars.
extern "C" __global__ void mlstm_step_f32(const float* __restrict__ qkv,
                                          const float* __restrict__ gates,
                                          const float* __restrict__ state,
                                          float* __restrict__ out, int d) {
    const int bh = blockIdx.x;
    const int sl = state_len(d);
    const int tid = flat_thread(), nt = flat_threads();
    const float* q = qkv + (size_t)bh * 3 * d;
    const float* k = q + d;
    const float* v = k + d;
    const float* prev = state + (size_t)bh * sl;
    float* h = out + (size_t)bh * (d + sl);
    float* next = h + d;
    float* scalars = smem;
    if (tid == 0) {
        const float i_pre = gates[2 * bh], f_pre = gates[2 * bh + 1];
        const float log_forget = log_sigmoid(f_pre) + prev[sl - 1];
        const float m = fmaxf(log_forget, i_pre);
        scalars[0] = expf(log_forget - m);
        scalars[1] = expf(i_pre - m) * rsqrtf((float)d);
        next[sl - 1] = m;
    }
    __syncthreads();
    const float forget = scalars[0], input = scalars[1];
    for (int e = tid; e < d * d + d; e += nt) {
        if (e < d * d) {
            const int a = e / d, b = e % d;
            next[e] = forget * prev[e] + input * k[a] * v[b];
        } else {
            const int a = e - d * d;
            next[e] = forget * prev[e] + input * k[a];
        }
    }
    __syncthreads();
    const float m = next[sl - 1];
    for (int b = tid; b < d; b += nt) {
        float num = 0.f, nq = 0.f;
        for (int a = 0; a < d; ++a) {
            num += q[a] * next[a * d + b];
            nq += next[d * d + a] * q[a];
        }
        h[b] = num / (fmaxf(fabsf(nq), expf(-m)) + DENOMINATOR_EPS);
    }
}
