// Helpers shared by the xLSTM CUDA kernels. Every function mirrors its CPU counterpart
// (src/xlstm/kernels/*/fused_cpu.rs, simd.rs) expression for expression, so that the CUDA
// kernels agree with the CPU oracle to rounding.
#pragma once

// The dynamic shared memory of a launch; each kernel carves it up from its sizes. (The CPU
// emulation used in tests, emulation.cpp, provides its own.)
#ifndef XLSTM_CUDA_EMULATION
extern __shared__ float smem[];
#endif

// logσ(x), finite for every finite x.
__device__ __forceinline__ float log_sigmoid(float x) {
    return fminf(x, 0.f) - log1pf(expf(-fabsf(x)));
}

// σ(−x) = d logσ(x) / dx.
__device__ __forceinline__ float sigmoid_neg(float x) {
    float e = expf(-fabsf(x));
    return x >= 0.f ? e / (1.f + e) : 1.f / (1.f + e);
}

__device__ __forceinline__ float sigmoid(float x) {
    float e = expf(-fabsf(x));
    return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// max that keeps a NaN (like torch), where fmaxf would drop it.
__device__ __forceinline__ float max_or_nan(float a, float b) {
    return (isnan(a) || isnan(b)) ? a + b : fmaxf(a, b);
}

// min(v, 1) that keeps a NaN.
__device__ __forceinline__ float at_most_one(float v) {
    return v > 1.f ? 1.f : v;
}

// The block's threads as one flat range (kernels index work items by it).
__device__ __forceinline__ int flat_thread() {
    return threadIdx.y * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int flat_threads() {
    return blockDim.x * blockDim.y;
}
