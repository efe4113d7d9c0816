// kernel_emu.h: the kernel-execution engine of the CUDA emulator (the fake libcuda.so whose
// cuLaunchKernel runs ferrotron's kernels, compiled natively as C++ behind cuda_shim.h, on the
// CPU, so that the CUDA backend is tested end to end without a GPU).
//
// Semantics:
// * launches are serialized by one global mutex; a launch runs its blocks one at a time (x
//   fastest, then y, then z) on the calling OS thread, so a `static` (what `__shared__` becomes)
//   is exactly one block's shared memory;
// * the threads of a block run as fibers (256 KiB stacks made once and reused; started with
//   ucontext, switched with __builtin_setjmp/__builtin_longjmp, no system call a switch),
//   switched round-robin only where a thread waits: a thread that never waits runs to its end
//   on the fiber that started it, which then starts the next thread (grid-stride kernels whose
//   threads mostly exit at once cost one function call per thread);
// * `__syncthreads()` (sync_block) releases when every thread of the block has reached a block
//   barrier. CUDA's contract is that every thread of the block reaches it: a thread that has
//   exited never does, so a barrier in divergent code (`if (threadIdx.x < 16) __syncthreads();`)
//   is reported as a deadlock rather than released;
// * a warp is 32 consecutive linear thread ids (linear id = x + y*bx + z*bx*by); a shuffle
//   (shuffle) publishes the lane's value, waits until every lane of its warp has published
//   (a warp barrier), then reads the source lane's value. Slots are double-buffered by barrier
//   generation, so a fast lane's next shuffle never overwrites a value a slower lane has yet to
//   read (the next barrier waits for that lane). The mask is ignored: all lanes of the warp
//   (as many as exist in a last, partial warp) take part; reading a lane that does not exist
//   aborts the launch;
// * when no thread can run and not all have exited (a barrier some thread never reaches, a
//   shuffle whose warp has lanes exited or waiting at __syncthreads()), the launch is aborted
//   with a message naming the kernel, the block and how many threads wait where; the engine is
//   reset and stays usable.
#pragma once

#include <stdint.h>

namespace ftemu {

// CUDA's uint3 / dim3.
struct Dim3 {
    unsigned int x, y, z;
};

// The built-in variables, set by the engine for the running thread (one set for the process:
// launches are serialized and the threads of a block are fibers on one OS thread).
extern Dim3 threadIdx, blockIdx, blockDim, gridDim;

// A kernel registered by name: `call(fn, args)` calls `fn` with the arguments `args` points at
// (cuLaunchKernel's kernelParams: one pointer per parameter, to its value); `sizes` are the
// parameters' byte sizes (so a queued launch can keep a copy of its arguments).
struct Kernel {
    const char* name;
    void* fn;
    void (*call)(void* fn, void** args);
    const unsigned* sizes;
    unsigned params;
};

// Registers a kernel (from static initializers: see FTEMU_KERNEL in cuda_shim.h). The first
// registration of a name wins.
void register_kernel(const char* name, void* fn, void (*call)(void*, void**),
                     const unsigned* sizes, unsigned params);

// The kernel registered as `name`, or nullptr. The pointer stays valid for the process.
const Kernel* find_kernel(const char* name);

// Runs `k` over a grid (gx, gy, gz) of blocks (bx, by, bz) with cuLaunchKernel's `args`.
// Returns nullptr on success, else an error message (valid until the next launch on this OS
// thread): bad dimensions (each at least 1, at most 1024 threads a block), a deadlock, a bad
// shuffle.
const char* launch(const Kernel* k, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                   unsigned by, unsigned bz, void** args);

// --- Called by the kernels (through cuda_shim.h), only while a launch runs them.

// __syncthreads().
void sync_block();

// The running thread's lane (its linear id within the block, mod 32).
int lane_id();

// A shuffle: publishes `v`, waits for the warp, returns the value lane `src` published, or `v`
// when src < 0 (a lane whose source is out of range, as CUDA returns its own value).
uint64_t shuffle(uint64_t v, int src);

} // namespace ftemu
