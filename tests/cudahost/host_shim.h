// Host shim: compile the unmodified CUDA kernel sources of iirp/kernels/cuda
// with a host C++ compiler (g++ or clang++, C++17) and run them on the CPU.
// Test-only (tests/cudahost/build.py includes it before a .cu file); never
// shipped with the package and never seen by NVRTC.
//
// What it provides:
//   * the CUDA keywords the kernels use: __global__, __device__, __host__,
//     __forceinline__, __launch_bounds__(...), __shared__ (__restrict__ is
//     already a GCC/Clang keyword);
//   * threadIdx, blockIdx, blockDim, gridDim (read-only, 1-D launches: y = z = 0,
//     extents 1) and __syncthreads();
//   * the float functions from <math.h> (floorf, fminf, fmaxf...; all exact, so
//     they round as the device's do);
//   * IIRP_HOST_SHIM, which selects the exact host fp16 conversions in
//     sampling.cuh in place of its inline PTX.
//
// Execution model (iirp_host::launch): blocks run one after another, in
// blockIdx order. Each thread of a block is a fiber (ucontext) with its own
// stack and guard page. The scheduler resumes every live fiber in threadIdx
// order until it reaches its next __syncthreads() or returns; only when every
// thread of the block has arrived at that barrier are any of them resumed. So
// a barrier has CUDA's semantics: all writes made before it (to shared or
// global memory) are visible to every thread after it. Because blocks never
// overlap, a __shared__ variable (a static here) is exactly one per running
// block, shared by its threads and not by the threads of other blocks.
// Stricter than a GPU, a launch fails with a message when the threads of a block
// stop at different __syncthreads() call sites, or some return while others
// wait at a barrier (both undefined behaviour in CUDA).
//
// Known differences from a GPU, none of which the iirp kernels depend on:
// __shared__ memory is zero-initialised once and keeps its values between
// blocks (on a GPU it is undefined at block start); there are no warps, so
// warp-synchronous code without __syncthreads (shuffles, votes) is not
// supported; atomics, textures and cooperative groups are not provided.
// Floating-point arithmetic is the host's IEEE float32/float64 with SSE (no
// x87 excess precision) when compiled with -ffp-contract=off -fno-fast-math,
// which is what the device does under --fmad=false, IEEE division and no ftz.

#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "host_shim.h is for a host C++ compiler, not for NVRTC or nvcc"
#endif

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <mutex>
#include <new>
#include <vector>

#define IIRP_HOST_SHIM 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// One static per variable: blocks run one at a time, so this is one per block.
#define __shared__ static

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
};

namespace iirp_host {

//! Bytes of stack per CUDA thread (fiber), and of the guard page below each stack.
constexpr size_t kStackBytes = 256 * 1024;
//! The largest block a launch accepts (CUDA's limit).
constexpr unsigned kMaxBlock = 1024;

enum class FiberState { ready, at_barrier, done };

struct Fiber {
    ucontext_t context;
    FiberState state;
    const char* barrier_file;
    int barrier_line;
};

// The launch in progress. One launch at a time per process (launch() holds `lock`).
struct Scheduler {
    std::mutex lock;
    ucontext_t main_context;
    std::vector<Fiber> fibers;
    char* stacks = nullptr;
    size_t slot_bytes = 0;
    unsigned capacity = 0;
    unsigned current = 0;
    bool in_kernel = false;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    uint3 thread_idx = {0, 0, 0};
    uint3 block_idx = {0, 0, 0};
    dim3 block_dim = {1, 1, 1};
    dim3 grid_dim = {1, 1, 1};
};

inline Scheduler& scheduler()
{
    static Scheduler s;
    return s;
}

// Compiler-level memory fence: no load or store is moved across a fiber switch.
#define IIRP_HOST_MEMORY_FENCE() asm volatile("" ::: "memory")

// Hands the CPU to the next ready fiber of this pass (in threadIdx order) or,
// when there is none, back to the scheduler; returns when this fiber is resumed.
inline void park(Scheduler& s, Fiber& self)
{
    IIRP_HOST_MEMORY_FENCE();
    for (unsigned u = s.current + 1; u < s.block_dim.x; ++u) {
        if (s.fibers[u].state == FiberState::ready) {
            s.current = u;
            s.thread_idx = {u, 0, 0};
            swapcontext(&self.context, &s.fibers[u].context);
            IIRP_HOST_MEMORY_FENCE();
            return;
        }
    }
    swapcontext(&self.context, &s.main_context);
    IIRP_HOST_MEMORY_FENCE();
}

// Body of __syncthreads(): park the current fiber at this call site; it is
// resumed once every thread of the block is parked here.
__attribute__((noinline)) inline void syncthreads(const char* file, int line)
{
    Scheduler& s = scheduler();
    if (!s.in_kernel) {
        fprintf(stderr, "iirp host shim: __syncthreads() called outside a kernel launch (%s:%d)\n", file, line);
        abort();
    }
    Fiber& self = s.fibers[s.current];
    self.state = FiberState::at_barrier;
    self.barrier_file = file;
    self.barrier_line = line;
    park(s, self);
}

// A fiber is CUDA thread s.current of every block of one launch in turn: it
// runs the kernel body, parks as done, and runs it again when the scheduler
// resumes it for the next block.
inline void fiber_main()
{
    Scheduler& s = scheduler();
    for (;;) {
        IIRP_HOST_MEMORY_FENCE();
        s.body(s.body_arg);
        Fiber& self = s.fibers[s.current];
        self.state = FiberState::done;
        park(s, self);
    }
}

// Writes a message into err (when given) and returns -1.
inline int fail(char* err, size_t err_bytes, const char* message)
{
    if (err != nullptr && err_bytes > 0) {
        snprintf(err, err_bytes, "%s", message);
    }
    return -1;
}

// Stacks for `block` fibers, each kStackBytes above a PROT_NONE guard page; kept between launches.
inline bool reserve_stacks(Scheduler& s, unsigned block)
{
    if (block <= s.capacity) {
        return true;
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t slot = kStackBytes + page;
    void* memory = mmap(nullptr, slot * block, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                        -1, 0);
    if (memory == MAP_FAILED) {
        return false;
    }
    for (unsigned t = 0; t < block; ++t) {
        if (mprotect((char*)memory + t * slot, page, PROT_NONE) != 0) {
            munmap(memory, slot * block);
            return false;
        }
    }
    if (s.stacks != nullptr) {
        munmap(s.stacks, s.slot_bytes * s.capacity);
    }
    s.stacks = (char*)memory;
    s.slot_bytes = slot;
    s.capacity = block;
    s.fibers.resize(block);
    return true;
}

// (Re)starts fiber t at fiber_main on its own stack; false when getcontext fails.
__attribute__((noinline)) inline bool make_fiber(Scheduler& s, unsigned t)
{
    Fiber& f = s.fibers[t];
    if (getcontext(&f.context) != 0) {
        return false;
    }
    f.context.uc_stack.ss_sp = s.stacks + t * s.slot_bytes + (s.slot_bytes - kStackBytes);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;  // fiber_main never returns
    makecontext(&f.context, fiber_main, 0);
    return true;
}

// Runs block `b` to completion on the fibers; 0, or -1 with a message in err.
inline int run_block(Scheduler& s, unsigned b, char* err, size_t err_bytes)
{
    const unsigned block = s.block_dim.x;
    s.block_idx = {b, 0, 0};
    for (unsigned t = 0; t < block; ++t) {
        s.fibers[t].state = FiberState::ready;
    }
    for (unsigned barrier = 1;; ++barrier) {
        // one pass: every thread runs, in threadIdx order, to its next barrier or its end
        s.current = 0;
        s.thread_idx = {0, 0, 0};
        IIRP_HOST_MEMORY_FENCE();
        swapcontext(&s.main_context, &s.fibers[0].context);
        IIRP_HOST_MEMORY_FENCE();
        unsigned done = 0;
        const Fiber* first = nullptr;
        for (unsigned t = 0; t < block; ++t) {
            const Fiber& f = s.fibers[t];
            if (f.state == FiberState::done) {
                ++done;
            } else if (first == nullptr) {
                first = &f;
            } else if (f.barrier_line != first->barrier_line || strcmp(f.barrier_file, first->barrier_file) != 0) {
                char message[512];
                snprintf(message, sizeof message,
                         "block %u: threads wait at different __syncthreads() (%s:%d and %s:%d, thread %u)", b,
                         first->barrier_file, first->barrier_line, f.barrier_file, f.barrier_line, t);
                return fail(err, err_bytes, message);
            }
        }
        if (done == block) {
            return 0;
        }
        if (done > 0) {
            char message[512];
            snprintf(message, sizeof message,
                     "block %u: %u of %u threads returned while the others wait at __syncthreads() #%u (%s:%d)", b,
                     done, block, barrier, first->barrier_file, first->barrier_line);
            return fail(err, err_bytes, message);
        }
        for (unsigned t = 0; t < block; ++t) {
            s.fibers[t].state = FiberState::ready;
        }
    }
}

template <typename F>
void call_body(void* body)
{
    (*static_cast<F*>(body))();
}

// Runs `kernel` (a callable that calls the __global__ function with its
// arguments) on a 1-D grid of `grid` blocks of `block` threads, as
// kernel<<<grid, block>>>(...) would, and returns when it has finished.
// Returns 0, or -1 with a NUL-terminated message in err[0 .. err_bytes).
template <typename F>
int launch(unsigned grid, unsigned block, char* err, size_t err_bytes, F kernel)
{
    Scheduler& s = scheduler();
    std::lock_guard<std::mutex> guard(s.lock);
    if (grid == 0 || block == 0 || block > kMaxBlock) {
        char message[128];
        snprintf(message, sizeof message, "invalid launch configuration: grid %u, block %u (1..%u threads)", grid,
                 block, kMaxBlock);
        return fail(err, err_bytes, message);
    }
    if (!reserve_stacks(s, block)) {
        return fail(err, err_bytes, "could not map the fiber stacks");
    }
    for (unsigned t = 0; t < block; ++t) {
        if (!make_fiber(s, t)) {
            return fail(err, err_bytes, "getcontext() failed");
        }
    }
    s.body = &call_body<F>;
    s.body_arg = &kernel;
    s.grid_dim = {grid, 1, 1};
    s.block_dim = {block, 1, 1};
    s.in_kernel = true;
    int status = 0;
    for (unsigned b = 0; b < grid && status == 0; ++b) {
        status = run_block(s, b, err, err_bytes);
    }
    s.in_kernel = false;
    return status;
}

// ---------------------------------------------------------------------------
// fp16 conversions, the host replacements of sampling.cuh's inline PTX
// (selected there by IIRP_HOST_SHIM). Integer-only, so they do not depend on
// the host's float16 support or rounding mode.

// PTX cvt.f32.f16: IEEE binary16 bits -> float32, exact (every half is a float).
// NaN gives the canonical float NaN 0x7fffffff, as CUDA's own host fallback
// (cuda_fp16.hpp __internal_half2float) does; numerically a NaN either way.
inline float half_to_float(unsigned short h)
{
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    const unsigned int exponent = (h >> 10) & 0x1fu;
    unsigned int mantissa = h & 0x3ffu;
    unsigned int bits;
    if (exponent == 0x1fu) {
        bits = mantissa != 0 ? 0x7fffffffu : (sign | 0x7f800000u);  // NaN, +-inf
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
    } else if (mantissa == 0) {
        bits = sign;  // +-0
    } else {  // subnormal m * 2^-24: normalise to 1.f * 2^(e - 127)
        unsigned int e = 113;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            --e;
        }
        bits = sign | (e << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// PTX cvt.rn.f16.f32: float32 -> IEEE binary16 bits, round to nearest, ties to
// even, with gradual underflow (subnormals kept, no flush to zero) and overflow to
// +-inf from 65520 (the tie between 65504 and 2^16) up. NaN gives the canonical
// half NaN 0x7fff, as cuda_fp16.hpp's host fallback (__internal_float2half) does.
inline unsigned short float_to_half(float f)
{
    unsigned int x;
    memcpy(&x, &f, sizeof x);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int u = x & 0x7fffffffu;
    if (u > 0x7f800000u) {
        return 0x7fffu;  // NaN
    }
    if (u >= 0x477ff000u) {
        return (unsigned short)(sign | 0x7c00u);  // >= 65520 and inf -> inf
    }
    if (u >= 0x38800000u) {  // normal half, |f| >= 2^-14: rebias 127 -> 15, keep 10 of 23 mantissa bits
        const unsigned int v = u - 0x38000000u;
        const unsigned int rest = v & 0x1fffu;
        unsigned int q = v >> 13;
        q += (rest > 0x1000u || (rest == 0x1000u && (q & 1u) != 0)) ? 1u : 0u;  // a carry moves into the exponent
        return (unsigned short)(sign | q);
    }
    if (u <= 0x33000000u) {
        return (unsigned short)sign;  // |f| <= 2^-25 (the tie with 2^-24 goes to even, 0)
    }
    // subnormal half: |f| = m * 2^(e - 150) with the 24-bit significand m; count units of 2^-24
    const unsigned int e = u >> 23;  // 102..112
    const unsigned int m = (u & 0x7fffffu) | 0x800000u;
    const unsigned int shift = 126u - e;  // 14..24
    const unsigned int rest = m & ((1u << shift) - 1u);
    const unsigned int half_unit = 1u << (shift - 1);
    unsigned int q = m >> shift;
    q += (rest > half_unit || (rest == half_unit && (q & 1u) != 0)) ? 1u : 0u;  // 0x400 is the smallest normal
    return (unsigned short)(sign | q);
}

}  // namespace iirp_host

#define threadIdx (static_cast<const ::uint3&>(::iirp_host::scheduler().thread_idx))
#define blockIdx (static_cast<const ::uint3&>(::iirp_host::scheduler().block_idx))
#define blockDim (static_cast<const ::dim3&>(::iirp_host::scheduler().block_dim))
#define gridDim (static_cast<const ::dim3&>(::iirp_host::scheduler().grid_dim))
#define __syncthreads() ::iirp_host::syncthreads(__FILE__, __LINE__)
