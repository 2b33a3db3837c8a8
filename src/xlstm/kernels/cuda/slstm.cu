// sLSTM scan on the GPU: one launch for the whole forward pass over time, one for the whole
// backward pass. Layouts, tape and arithmetic are those of the fused CPU kernel
// (src/xlstm/kernels/slstm/fused_cpu.rs), which is the oracle these kernels are tested against.
//
// Grid: (batch tiles, heads); block: (4·DH gate units, rows of the batch tile). The head's
// recurrent weights `[DH + 1, 4·DH]` (bias as the last row) stay on-chip for the whole scan
// when they fit in shared memory (`weights_in_shared`), with a padded row stride so that both
// the forward (row-wise) and backward (column-wise) reads are free of bank conflicts.
#include "common.cuh"

// Per step and unit the tape holds these values; the same slots as the CPU kernel's TAPE_*.
#define TAPE_C 0
#define TAPE_N 1
#define TAPE_I 2
#define TAPE_F 3
#define TAPE_Z 4
#define TAPE_O 5
#define TAPE_SIG_NEG_F 6
#define TAPE_VALUES 7
// Rows of the packed output after the S rows of h: final h, c, n, m.
#define STATE_ROWS 4

// Loads the head's augmented weights into shared memory (padded stride) when asked; returns
// the pointer and row stride to read them through.
__device__ __forceinline__ const float* head_weights(const float* w_head, float* w_shared,
                                                     int dh, int in_shared, int* stride) {
    const int gates = 4 * dh;
    if (!in_shared) {
        *stride = gates;
        return w_head;
    }
    *stride = gates + 1;
    for (int e = flat_thread(); e < (dh + 1) * gates; e += flat_threads()) {
        w_shared[(e / gates) * (gates + 1) + e % gates] = w_head[e];
    }
    return w_shared;
}

// x `[B, S, 4H]`, r_aug `[NH, DH + 1, 4, DH]`, init `[4, B, H]` (h, c, n, m);
// out `[B, NH, S + 4, DH]` (h of every step, then the final h, c, n, m);
// tape `[B, NH, S, TAPE_VALUES, DH]` or null (inference).
// Dynamic shared memory: weights (if in shared) `(DH + 1)·(4·DH + 1)`, then h `[rows, DH]`,
// then pre-activations `[rows, 4·DH]`.
extern "C" __global__ void slstm_scan_forward_f32(
    const float* __restrict__ x, const float* __restrict__ r_aug, const float* __restrict__ init,
    float* __restrict__ out, float* __restrict__ tape, int batch, int seq_len, int heads, int dh,
    int weights_in_shared) {
    const int gates = 4 * dh;
    const int hidden = heads * dh;
    const int j = threadIdx.x;
    const int row = threadIdx.y;
    const int head = blockIdx.y;
    const int b = blockIdx.x * blockDim.y + row;
    const bool valid = b < batch;
    const int b_safe = valid ? b : 0;
    float* w_shared = smem;
    float* h_s = smem + (weights_in_shared ? (dh + 1) * (gates + 1) : 0);
    float* pre_s = h_s + blockDim.y * dh;
    int w_stride;
    const float* w = head_weights(r_aug + (size_t)head * (dh + 1) * gates, w_shared, dh,
                                  weights_in_shared, &w_stride);

    // Threads j < DH carry the state of unit j.
    float c = 0.f, n = 0.f, m = 0.f;
    if (j < dh) {
        float h0 = 0.f;
        if (valid) {
            const size_t at = (size_t)b * hidden + head * dh + j;
            const size_t plane = (size_t)batch * hidden;
            h0 = init[at];
            c = init[plane + at];
            n = init[2 * plane + at];
            m = init[3 * plane + at];
        }
        h_s[row * dh + j] = h0;
    }
    __syncthreads();

    const int gate = j / dh, unit = j % dh;
    const float bias = w[dh * w_stride + j];
    const size_t x_step = (size_t)4 * hidden;
    const float* x_j = x + (size_t)b_safe * seq_len * x_step + (size_t)gate * hidden + head * dh + unit;
    const size_t pair = (size_t)b_safe * heads + head;
    float* out_pair = out + pair * (seq_len + STATE_ROWS) * dh;
    float* tape_pair = tape ? tape + pair * seq_len * TAPE_VALUES * dh : nullptr;
    const float* h_row = h_s + row * dh;
    float* pre_row = pre_s + row * gates;

    float x_next = valid ? x_j[0] : 0.f;
    for (int t = 0; t < seq_len; ++t) {
        // Same summation order as the CPU kernel: bias, input, then the recurrent rows.
        float acc = bias + x_next;
        if (valid && t + 1 < seq_len) x_next = x_j[(t + 1) * x_step];
        for (int k = 0; k < dh; ++k) acc += h_row[k] * w[k * w_stride + j];
        pre_row[j] = acc;
        __syncthreads();
        if (j < dh) {
            const float i_pre = pre_row[j], f_pre = pre_row[dh + j];
            const float z_pre = pre_row[2 * dh + j], o_pre = pre_row[3 * dh + j];
            const float log_f = log_sigmoid(f_pre);
            const float log_f_plus_m = m + log_f;
            // Per-element empty-state rule (module docs of `slstm`).
            const float m_new = n == 0.f ? i_pre : max_or_nan(i_pre, log_f_plus_m);
            const float ig = at_most_one(expf(i_pre - m_new));
            const float fg = at_most_one(expf(log_f_plus_m - m_new));
            const float z = tanhf(z_pre);
            const float o = sigmoid(o_pre);
            c = fg * c + ig * z;
            n = fg * n + ig;
            m = m_new;
            const float h = o * c / n;
            if (valid) {
                out_pair[t * dh + j] = h;
                if (tape_pair) {
                    float* slot = tape_pair + (size_t)t * TAPE_VALUES * dh + j;
                    slot[TAPE_C * dh] = c;
                    slot[TAPE_N * dh] = n;
                    slot[TAPE_I * dh] = ig;
                    slot[TAPE_F * dh] = fg;
                    slot[TAPE_Z * dh] = z;
                    slot[TAPE_O * dh] = o;
                    slot[TAPE_SIG_NEG_F * dh] = sigmoid_neg(f_pre);
                }
            }
            h_s[row * dh + j] = h;
        }
        __syncthreads();
    }
    if (j < dh && valid) {
        float* final_rows = out_pair + (size_t)seq_len * dh + j;
        final_rows[0] = h_row[j];
        final_rows[dh] = c;
        final_rows[2 * dh] = n;
        final_rows[3 * dh] = m;
    }
}

// Reverse-time scan. grad_out `[B, NH, S + 4, DH]`, r_aug, init and tape as in the forward
// pass. grads (flat): dx `[B, S, 4H]`, then d init `[B, 4, H]`, then per batch row the weight
// gradient `[B, NH, DH + 1, 4·DH]` (summed over B by the caller, in a fixed order).
// DHT > 0: the head dim at compile time, weight gradients accumulate in registers; DHT = 0:
// any head dim, each thread accumulates its own column in global memory.
// Dynamic shared memory: weights (if in shared), then h_prev `[rows, DH]`, then dp `[rows, 4·DH]`.
template <int DHT>
__device__ void slstm_scan_backward(
    const float* __restrict__ grad_out, const float* __restrict__ r_aug,
    const float* __restrict__ init, const float* __restrict__ tape, float* __restrict__ grads,
    int batch, int seq_len, int heads, int dh, int weights_in_shared) {
    const int gates = 4 * dh;
    const int hidden = heads * dh;
    const int j = threadIdx.x;
    const int row = threadIdx.y;
    const int head = blockIdx.y;
    const int b = blockIdx.x * blockDim.y + row;
    const bool valid = b < batch;
    const int b_safe = valid ? b : 0;
    float* w_shared = smem;
    float* h_s = smem + (weights_in_shared ? (dh + 1) * (gates + 1) : 0);
    float* dp_s = h_s + blockDim.y * dh;
    int w_stride;
    const float* w = head_weights(r_aug + (size_t)head * (dh + 1) * gates, w_shared, dh,
                                  weights_in_shared, &w_stride);

    const size_t pair = (size_t)b_safe * heads + head;
    const float* grad_pair = grad_out + pair * (seq_len + STATE_ROWS) * dh;
    const float* tape_pair = tape + pair * seq_len * TAPE_VALUES * dh;
    const size_t x_step = (size_t)4 * hidden;
    float* dx = grads;
    float* dinit = grads + (size_t)batch * seq_len * x_step;
    float* dr_rows = dinit + (size_t)batch * 4 * hidden;
    float* dr_col = dr_rows + pair * (dh + 1) * gates + j;
    const int gate = j / dh, unit = j % dh;
    float* dx_j = dx + (size_t)b_safe * seq_len * x_step + (size_t)gate * hidden + head * dh + unit;

    float acc[DHT > 0 ? DHT : 1];
    if (DHT > 0) {
#pragma unroll
        for (int k = 0; k < (DHT > 0 ? DHT : 1); ++k) acc[k] = 0.f;
    } else if (valid) {
        for (int k = 0; k < dh; ++k) dr_col[k * gates] = 0.f;
    }
    float bias_acc = 0.f;

    // Threads j < DH: gradients reaching h, c, n of unit j from later steps, seeded by the
    // gradient of the final state (its m row is ignored: m is a constant).
    float dh_rec = 0.f, dc = 0.f, dn = 0.f, dm0 = 0.f;
    const size_t plane = (size_t)batch * hidden;
    const size_t init_at = (size_t)b_safe * hidden + head * dh + j;
    if (j < dh && valid) {
        dh_rec = grad_pair[(size_t)seq_len * dh + j];
        dc = grad_pair[(size_t)(seq_len + 1) * dh + j];
        dn = grad_pair[(size_t)(seq_len + 2) * dh + j];
    }

    for (int t = seq_len - 1; t >= 0; --t) {
        if (j < dh) {
            float h_prev = 0.f, dp_i = 0.f, dp_f = 0.f, dp_z = 0.f, dp_o = 0.f;
            if (valid) {
                const float* tape_t = tape_pair + (size_t)t * TAPE_VALUES * dh + j;
                float c_prev, n_prev;
                if (t > 0) {
                    const float* prev = tape_t - TAPE_VALUES * dh;
                    // Same expression as the forward pass, so the same value.
                    h_prev = prev[TAPE_O * dh] * prev[TAPE_C * dh] / prev[TAPE_N * dh];
                    c_prev = prev[TAPE_C * dh];
                    n_prev = prev[TAPE_N * dh];
                } else {
                    h_prev = init[init_at];
                    c_prev = init[plane + init_at];
                    n_prev = init[2 * plane + init_at];
                }
                const float c = tape_t[TAPE_C * dh], n = tape_t[TAPE_N * dh];
                const float ig = tape_t[TAPE_I * dh], fg = tape_t[TAPE_F * dh];
                const float z = tape_t[TAPE_Z * dh], o = tape_t[TAPE_O * dh];
                const float grad_h = grad_pair[(size_t)t * dh + j] + dh_rec;
                const float inv_n = 1.f / n;
                const float c_over_n = c * inv_n;
                const float dc_t = dc + grad_h * o * inv_n;
                const float dn_t = dn - grad_h * o * c_over_n * inv_n;
                const float d_forget = dc_t * c_prev + dn_t * n_prev;
                dp_i = (dc_t * z + dn_t) * ig;
                dp_f = d_forget * fg * tape_t[TAPE_SIG_NEG_F * dh];
                dp_z = dc_t * ig * (1.f - z * z);
                dp_o = grad_h * c_over_n * o * (1.f - o);
                dc = dc_t * fg;
                dn = dn_t * fg;
                // f₁ = exp(m₀ + logσ(f̃₁) − m₁) with m₁ held constant.
                if (t == 0) dm0 = d_forget * fg;
            }
            float* dp_row = dp_s + row * gates;
            dp_row[j] = dp_i;
            dp_row[dh + j] = dp_f;
            dp_row[2 * dh + j] = dp_z;
            dp_row[3 * dh + j] = dp_o;
            h_s[row * dh + j] = h_prev;
        }
        __syncthreads();
        const float* dp_row = dp_s + row * gates;
        const float* h_row = h_s + row * dh;
        const float dp = dp_row[j];
        if (valid) {
            dx_j[(size_t)t * x_step] = dp;
            if (DHT > 0) {
#pragma unroll
                for (int k = 0; k < (DHT > 0 ? DHT : 1); ++k) acc[k] += h_row[k] * dp;
            } else {
                for (int k = 0; k < dh; ++k) dr_col[k * gates] += h_row[k] * dp;
            }
            bias_acc += dp;
        }
        if (j < dh) {
            // Gradient reaching h_{t-1} of unit j through the recurrent weights.
            float s = 0.f;
            const float* w_row = w + j * w_stride;
            for (int g = 0; g < gates; ++g) s += w_row[g] * dp_row[g];
            dh_rec = s;
        }
        __syncthreads();
    }
    if (!valid) return;
    if (DHT > 0) {
#pragma unroll
        for (int k = 0; k < (DHT > 0 ? DHT : 1); ++k) dr_col[k * gates] = acc[k];
    }
    dr_col[dh * gates] = bias_acc;
    if (j < dh) {
        float* dinit_b = dinit + (size_t)b * 4 * hidden + head * dh + j;
        dinit_b[0] = dh_rec;
        dinit_b[hidden] = dc;
        dinit_b[2 * hidden] = dn;
        dinit_b[3 * hidden] = dm0;
    }
}

#define SLSTM_BACKWARD(NAME, DHT)                                                               \
    extern "C" __global__ void NAME(const float* __restrict__ grad_out,                         \
                                    const float* __restrict__ r_aug,                            \
                                    const float* __restrict__ init,                             \
                                    const float* __restrict__ tape, float* __restrict__ grads,  \
                                    int batch, int seq_len, int heads, int dh,                  \
                                    int weights_in_shared) {                                    \
        slstm_scan_backward<DHT>(grad_out, r_aug, init, tape, grads, batch, seq_len, heads, dh, \
                                 weights_in_shared);                                            \
    }

SLSTM_BACKWARD(slstm_scan_backward_f32_dh8, 8)
SLSTM_BACKWARD(slstm_scan_backward_f32_dh16, 16)
SLSTM_BACKWARD(slstm_scan_backward_f32_dh32, 32)
SLSTM_BACKWARD(slstm_scan_backward_f32_dh64, 64)
SLSTM_BACKWARD(slstm_scan_backward_f32_any, 0)
