// cuda_shim.h: CUDA C's device-side language and built-ins for host C++17, so that the kernel
// sources (runtime/cuda/src/cu/: common.cuh, then one .cu) compile natively and run on the CPU
// under the emulator's engine (kernel_emu.h). A translation unit is
//
//     #include "cuda_shim.h"
//     #include ".../common.cuh"
//     #include ".../X.cu"
//     FTEMU_KERNEL(kernel_a)
//     FTEMU_KERNEL(kernel_b)
//
// compiled with -std=c++17 -ffp-contract=off (NVRTC compiles with --fmad=false) and
// -Wno-unknown-pragmas (`#pragma unroll`).
//
// * `__global__` is nothing: `extern "C" __global__ void f(...)` is an ordinary C function;
// * `__device__` is `static` (with __forceinline__, `static inline`): the prelude's helpers are
//   defined in every translation unit, each its own copy; so not for __device__ member functions;
// * `__shared__` is `static`: the engine runs one block at a time, and a block's threads are
//   fibers on one OS thread, so one static per function is exactly one block's shared memory;
// * threadIdx, blockIdx, blockDim, gridDim are the engine's globals, set for the running thread;
// * atomics are plain read-modify-writes (only one thread of the process runs kernel code at a
//   time); shuffles and __syncthreads() go to the engine (semantics in kernel_emu.h).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <type_traits>
#include <utility>

#include "kernel_emu.h"

#define __global__
#define __host__
#define __device__ static __attribute__((unused))
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)

typedef ftemu::Dim3 uint3;
typedef ftemu::Dim3 dim3;
using ftemu::blockDim;
using ftemu::blockIdx;
using ftemu::gridDim;
using ftemu::threadIdx;
static constexpr int warpSize = 32;

// --- Synchronization

static inline void __syncthreads() { ftemu::sync_block(); }

namespace ftemu {
template <typename T> inline uint64_t to_slot(T v) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "a shuffled value must be trivially copyable and at most 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> inline T from_slot(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}
// The lane `lane` reads from when `src` (within its segment of `width` lanes) is in range,
// else -1 (its own value, as CUDA).
inline int shfl_source(int lane, int src, int width) {
    int base = lane & ~(width - 1);
    return src >= 0 && src < width ? base + src : -1;
}
} // namespace ftemu

// The mask is ignored: every lane of the warp must take part (see kernel_emu.h).
template <typename T>
static inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int width = 32) {
    int lane = ftemu::lane_id();
    int src = ftemu::shfl_source(lane, (lane & (width - 1)) ^ lane_mask, width);
    return ftemu::from_slot<T>(ftemu::shuffle(ftemu::to_slot(v), src));
}
template <typename T>
static inline T __shfl_sync(unsigned /*mask*/, T v, int src_lane, int width = 32) {
    int lane = ftemu::lane_id();
    int src = ftemu::shfl_source(lane, src_lane & (width - 1), width);
    return ftemu::from_slot<T>(ftemu::shuffle(ftemu::to_slot(v), src));
}
template <typename T>
static inline T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta, int width = 32) {
    int lane = ftemu::lane_id();
    int src = ftemu::shfl_source(lane, (lane & (width - 1)) + (int)delta, width);
    return ftemu::from_slot<T>(ftemu::shuffle(ftemu::to_slot(v), src));
}
template <typename T>
static inline T __shfl_up_sync(unsigned /*mask*/, T v, unsigned delta, int width = 32) {
    int lane = ftemu::lane_id();
    int src = ftemu::shfl_source(lane, (lane & (width - 1)) - (int)delta, width);
    return ftemu::from_slot<T>(ftemu::shuffle(ftemu::to_slot(v), src));
}

// --- Atomics (return the old value, as CUDA's)

template <typename T> static inline T ftemu_atomic_add(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
static inline float atomicAdd(float* p, float v) { return ftemu_atomic_add(p, v); }
static inline double atomicAdd(double* p, double v) { return ftemu_atomic_add(p, v); }
static inline int atomicAdd(int* p, int v) { return ftemu_atomic_add(p, v); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return ftemu_atomic_add(p, v); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return ftemu_atomic_add(p, v);
}

template <typename T> static inline T ftemu_atomic_min(T* p, T v) {
    T old = *p;
    *p = v < old ? v : old;
    return old;
}
template <typename T> static inline T ftemu_atomic_max(T* p, T v) {
    T old = *p;
    *p = v > old ? v : old;
    return old;
}
static inline int atomicMin(int* p, int v) { return ftemu_atomic_min(p, v); }
static inline unsigned atomicMin(unsigned* p, unsigned v) { return ftemu_atomic_min(p, v); }
static inline long long atomicMin(long long* p, long long v) { return ftemu_atomic_min(p, v); }
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    return ftemu_atomic_min(p, v);
}
static inline int atomicMax(int* p, int v) { return ftemu_atomic_max(p, v); }
static inline unsigned atomicMax(unsigned* p, unsigned v) { return ftemu_atomic_max(p, v); }
static inline long long atomicMax(long long* p, long long v) { return ftemu_atomic_max(p, v); }
static inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    return ftemu_atomic_max(p, v);
}

// --- Bit casts

template <typename To, typename From> static inline To ftemu_bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
    To r;
    memcpy(&r, &v, sizeof(To));
    return r;
}
static inline float __uint_as_float(unsigned int u) { return ftemu_bit_cast<float>(u); }
static inline float __int_as_float(int i) { return ftemu_bit_cast<float>(i); }
static inline unsigned int __float_as_uint(float f) { return ftemu_bit_cast<unsigned int>(f); }
static inline int __float_as_int(float f) { return ftemu_bit_cast<int>(f); }
static inline long long __double_as_longlong(double d) { return ftemu_bit_cast<long long>(d); }
static inline double __longlong_as_double(long long l) { return ftemu_bit_cast<double>(l); }

// --- Math: the sources use sqrt, fabs, fabsf, fmaxf, trunc, pow and sincos, all in glibc's
// <math.h> (sincos as a GNU extension, which g++ enables by default). Note that pow and sincos
// are glibc's here, CUDA's libdevice on a GPU (within 2 ulp of each other, not bit-identical).

// --- Registration

namespace ftemu {
namespace {
template <typename... P, size_t... I>
void invoke(void (*fn)(P...), void** args, std::index_sequence<I...>) {
    fn(*static_cast<typename std::remove_cv<P>::type*>(args[I])...);
}
template <typename... P> void trampoline(void* fn, void** args) {
    (void)args; // a kernel without parameters
    invoke(reinterpret_cast<void (*)(P...)>(fn), args, std::index_sequence_for<P...>{});
}
// Registers a kernel from a static initializer; the trampoline (per translation unit: the
// parameter types are the unit's own) calls it with cuLaunchKernel's kernelParams.
// Each parameter's byte size (a leading 0, so that a kernel without parameters has an array).
template <typename... P> struct ParamSizes {
    static constexpr unsigned value[] = {0u, unsigned(sizeof(P))...};
};

struct Registrar {
    template <typename... P> Registrar(const char* name, void (*fn)(P...)) {
        register_kernel(name, reinterpret_cast<void*>(fn), &trampoline<P...>,
                        ParamSizes<P...>::value + 1, unsigned(sizeof...(P)));
    }
};
} // namespace
} // namespace ftemu

// Registers the kernel `name` (any parameter list) with the engine, under its own name.
#define FTEMU_KERNEL(name) static ::ftemu::Registrar ftemu_reg_##name(#name, &name);
