// Test-only CPU emulation of the CUDA kernels (see emulation.rs): every thread of a block is an
// OS thread, __syncthreads() is a barrier, shared memory is a per-block buffer filled with NaN
// (so that a read of shared memory no thread wrote shows up in the results). Blocks run one
// after another. The kernels need nothing else: no warp intrinsics, no atomics.
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace emulation {
struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
}  // namespace emulation

// Per thread: tests may run several launches at once, each on its own threads.
static thread_local emulation::Dim3 threadIdx, blockIdx, blockDim, gridDim;
static thread_local float* emulated_shared = nullptr;
static thread_local std::barrier<>* emulated_barrier = nullptr;

static inline void __syncthreads() { emulated_barrier->arrive_and_wait(); }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::isfinite;
using std::isnan;
using std::min;

#define XLSTM_CUDA_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define smem emulated_shared

#include "mlstm.cu"
#include "slstm.cu"

namespace {
using Call = void (*)(void** args);

struct Entry {
    const char* name;
    Call call;
};

float* f(void** args, int i) { return static_cast<float*>(args[i]); }
int n(void** args, int i) { return *static_cast<int*>(args[i]); }

#define SLSTM_BACKWARD_ENTRY(NAME)                                                             \
    {#NAME, [](void** a) {                                                                   \
         NAME(f(a, 0), f(a, 1), f(a, 2), f(a, 3), f(a, 4), n(a, 5), n(a, 6), n(a, 7), n(a, 8), \
              n(a, 9));                                                                      \
     }}

const Entry ENTRIES[] = {
    {"mlstm_chunk_states_f32",
     [](void** a) {
         mlstm_chunk_states_f32(f(a, 0), f(a, 1), f(a, 2), f(a, 3), f(a, 4), n(a, 5), n(a, 6),
                                n(a, 7), n(a, 8));
     }},
    {"mlstm_chunk_rows_f32",
     [](void** a) {
         mlstm_chunk_rows_f32(f(a, 0), f(a, 1), f(a, 2), f(a, 3), f(a, 4), n(a, 5), n(a, 6),
                              n(a, 7), n(a, 8));
     }},
    {"mlstm_chunk_state_grads_f32",
     [](void** a) {
         mlstm_chunk_state_grads_f32(f(a, 0), f(a, 1), f(a, 2), f(a, 3), f(a, 4), f(a, 5),
                                     f(a, 6), n(a, 7), n(a, 8), n(a, 9), n(a, 10), n(a, 11));
     }},
    {"mlstm_chunk_grads_f32",
     [](void** a) {
         mlstm_chunk_grads_f32(f(a, 0), f(a, 1), f(a, 2), f(a, 3), f(a, 4), f(a, 5), f(a, 6),
                               f(a, 7), n(a, 8), n(a, 9), n(a, 10), n(a, 11));
     }},
    {"mlstm_step_f32",
     [](void** a) { mlstm_step_f32(f(a, 0), f(a, 1), f(a, 2), f(a, 3), n(a, 4)); }},
    {"slstm_scan_forward_f32",
     [](void** a) {
         slstm_scan_forward_f32(f(a, 0), f(a, 1), f(a, 2), f(a, 3), f(a, 4), n(a, 5), n(a, 6),
                                n(a, 7), n(a, 8), n(a, 9));
     }},
    SLSTM_BACKWARD_ENTRY(slstm_scan_backward_f32_dh8),
    SLSTM_BACKWARD_ENTRY(slstm_scan_backward_f32_dh16),
    SLSTM_BACKWARD_ENTRY(slstm_scan_backward_f32_dh32),
    SLSTM_BACKWARD_ENTRY(slstm_scan_backward_f32_dh64),
    SLSTM_BACKWARD_ENTRY(slstm_scan_backward_f32_any),
};
}  // namespace

// Runs kernel `name` on a grid of gx × gy blocks of bx × by threads. `args` holds, in the
// kernel's parameter order, the pointer itself for pointer parameters and a pointer to an
// int for int parameters. Returns 0, or 1 for an unknown kernel.
extern "C" int xlstm_emulated_launch(const char* name, unsigned gx, unsigned gy, unsigned bx,
                                     unsigned by, std::size_t shared_floats, void** args) {
    const Entry* entry = nullptr;
    for (const Entry& candidate : ENTRIES) {
        if (std::strcmp(candidate.name, name) == 0) entry = &candidate;
    }
    if (!entry) return 1;
    const unsigned threads = bx * by;
    for (unsigned y = 0; y < gy; ++y) {
        for (unsigned x = 0; x < gx; ++x) {
            std::vector<float> shared(shared_floats + 1, std::numeric_limits<float>::quiet_NaN());
            std::barrier<> barrier(threads);
            std::vector<std::thread> workers;
            workers.reserve(threads);
            for (unsigned ty = 0; ty < by; ++ty) {
                for (unsigned tx = 0; tx < bx; ++tx) {
                    workers.emplace_back([&, tx, ty] {
                        threadIdx = {tx, ty, 0};
                        blockIdx = {x, y, 0};
                        blockDim = {bx, by, 1};
                        gridDim = {gx, gy, 1};
                        emulated_shared = shared.data();
                        emulated_barrier = &barrier;
                        entry->call(args);
                        // A thread that has finished no longer holds the others at a barrier.
                        barrier.arrive_and_drop();
                    });
                }
            }
            for (std::thread& worker : workers) worker.join();
        }
    }
    return 0;
}
