// selftest.cpp: a standalone test of the emulator's engine (kernel_emu.cpp) and shim
// (cuda_shim.h): small kernels written CUDA-style, launched as cuLaunchKernel would (by name,
// with an array of pointers to the arguments), plus two of ferrotron's real kernels
// (`unary_f32` from elementwise.cu, `softmax_f32` from norm.cu), whose translation units are
// linked in. build.rs builds it (as `engine-selftest`, with every kernel source linked in) and
// `tests/engine.rs` runs it.
//
// Prints one line per check and exits non-zero when one fails.

#include "cuda_shim.h"

#include <chrono>
#include <stdio.h>
#include <string>
#include <thread>
#include <vector>

// --- Kernels

extern "C" __global__ void st_copy(float* out, const float* in, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = in[i];
    }
}

__device__ __forceinline__ float st_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// As common.cuh's ft_block_sum.
__device__ __forceinline__ float st_block_sum(float v) {
    __shared__ float partial[32];
    v = st_warp_sum(v);
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    return st_warp_sum(v);
}

// partial[block] = the block's grid-stride share of sum(x), twice over (the second call reuses
// the shared array); every[thread] = what each thread got (all the same within a block).
extern "C" __global__ void st_block_sum_k(float* partial, float* every, const float* x,
                                          long long n) {
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        acc += x[i];
    }
    float s = st_block_sum(acc);
    float s2 = st_block_sum(2.0f * acc);
    every[blockIdx.x * blockDim.x + threadIdx.x] = s2 - 2.0f * s;
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s;
    }
}

// Block (32, 8): row ty is one warp; out[ty] = sum over lanes of lane * (ty + 1), in f64 and
// as an int through shuffles of other types and directions.
extern "C" __global__ void st_warp_rows(double* out, int* out_int) {
    double v = (double)(threadIdx.x * (threadIdx.y + 1));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    int iv = (int)threadIdx.x;
    for (int o = 16; o > 0; o >>= 1) {
        iv += __shfl_down_sync(0xffffffffu, iv, o);
    }
    if (threadIdx.x == 0) {
        out[threadIdx.y] = v;
        out_int[threadIdx.y] = __shfl_sync(0xffffffffu, iv, 0);
    } else {
        (void)__shfl_sync(0xffffffffu, iv, 0);
    }
}

// A barrier half the block never reaches (those threads exit): a deadlock.
extern "C" __global__ void st_divergent_sync(int* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Half a warp at __syncthreads(), the other half at a shuffle: a deadlock.
extern "C" __global__ void st_mixed_wait(float* out) {
    float v = 1.0f;
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[threadIdx.x] = v;
}

// A shuffle reading past the end of a partial warp (block of 48: lanes 32..47 read 48..63).
extern "C" __global__ void st_partial_warp(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 16);
}

FTEMU_KERNEL(st_copy)
FTEMU_KERNEL(st_block_sum_k)
FTEMU_KERNEL(st_warp_rows)
FTEMU_KERNEL(st_divergent_sync)
FTEMU_KERNEL(st_mixed_wait)
FTEMU_KERNEL(st_partial_warp)

// --- The harness

static int failures = 0;

static void check(bool ok, const std::string& what) {
    printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
    failures += !ok;
}

static const ftemu::Kernel* kernel(const char* name) {
    const ftemu::Kernel* k = ftemu::find_kernel(name);
    if (k == nullptr) {
        printf("FAIL: kernel %s is not registered\n", name);
        exit(1);
    }
    return k;
}

static void test_copy() {
    long long n = 1000;
    std::vector<float> in(n), out(n, -1.0f);
    for (long long i = 0; i < n; ++i) {
        in[i] = (float)i * 0.5f;
    }
    float* po = out.data();
    const float* pi = in.data();
    void* args[] = {&po, &pi, &n};
    const char* err = ftemu::launch(kernel("st_copy"), 3, 1, 1, 128, 1, 1, args);
    check(err == nullptr && out == in, "grid-stride copy, grid (3,1,1) x (128,1,1)");
}

static bool block_sum_once(unsigned blocks, unsigned threads, long long n) {
    std::vector<float> x(n), partial(blocks, -1.0f), every(blocks * threads, -1.0f);
    for (long long i = 0; i < n; ++i) {
        x[i] = (float)(i % 7);
    }
    float* pp = partial.data();
    float* pe = every.data();
    const float* px = x.data();
    void* args[] = {&pp, &pe, &px, &n};
    if (ftemu::launch(kernel("st_block_sum_k"), blocks, 1, 1, threads, 1, 1, args) != nullptr) {
        return false;
    }
    bool ok = true;
    for (unsigned b = 0; b < blocks; ++b) {
        double want = 0.0;
        for (long long i = b * threads; i < n; i += (long long)blocks * threads) {
            for (long long j = i; j < i + threads && j < n; ++j) {
                want += x[j];
            }
        }
        ok = ok && partial[b] == (float)want;
    }
    for (float e : every) {
        ok = ok && e == 0.0f;
    }
    return ok;
}

static void test_block_sum() {
    check(block_sum_once(4, 256, 5000), "block sum (shared + __syncthreads + shuffles), 4 x 256");
    check(block_sum_once(3, 1024, 10000), "block sum, 3 x 1024");
    check(block_sum_once(5, 32, 77), "block sum, 5 x 32");
}

static void test_warp_rows() {
    std::vector<double> out(8, -1.0);
    std::vector<int> out_int(8, -1);
    double* po = out.data();
    int* pi = out_int.data();
    void* args[] = {&po, &pi};
    const char* err = ftemu::launch(kernel("st_warp_rows"), 1, 1, 1, 32, 8, 1, args);
    bool ok = err == nullptr;
    for (int y = 0; y < 8; ++y) {
        ok = ok && out[y] == 496.0 * (y + 1) && out_int[y] == 496;
    }
    check(ok, "f64 xor / int down / int broadcast shuffles over a (32,8) block");
}

static void test_errors() {
    std::vector<float> buf(64, 0.0f);
    float* pb = buf.data();
    void* args[] = {&pb};
    const char* err = ftemu::launch(kernel("st_divergent_sync"), 2, 1, 1, 32, 1, 1, args);
    std::string e = err ? err : "";
    printf("      (%s)\n", e.c_str());
    check(e.find("st_divergent_sync") != std::string::npos &&
              e.find("block (0,0,0)") != std::string::npos &&
              e.find("deadlock: 16 of 32 threads wait at __syncthreads(), 0 at a warp shuffle, "
                     "16 have exited") != std::string::npos,
          "__syncthreads() in `if (threadIdx.x < 16)` is reported as a deadlock");
    check(block_sum_once(2, 32, 100) && block_sum_once(4, 256, 5000),
          "then launches with barriers and shuffles succeed (the engine recovered)");

    err = ftemu::launch(kernel("st_mixed_wait"), 1, 1, 1, 64, 1, 1, args);
    e = err ? err : "";
    printf("      (%s)\n", e.c_str());
    check(e.find("deadlock: 16 of 64 threads wait at __syncthreads(), 16 at a warp shuffle") !=
              std::string::npos,
          "half a warp at __syncthreads(), half at a shuffle: a deadlock");

    err = ftemu::launch(kernel("st_partial_warp"), 1, 1, 1, 48, 1, 1, args);
    e = err ? err : "";
    printf("      (%s)\n", e.c_str());
    check(e.find("does not exist") != std::string::npos, "a shuffle past a partial warp fails");
    check(block_sum_once(3, 64, 1000), "then a launch with barriers and shuffles succeeds");

    err = ftemu::launch(kernel("st_copy"), 1, 1, 1, 1024, 2, 1, args);
    e = err ? err : "";
    printf("      (%s)\n", e.c_str());
    check(e.find("bad launch shape") != std::string::npos, "a block of 2048 threads is refused");
}

// Many OS threads launching at once: launches serialize, fibers move between OS threads.
static void test_threads() {
    std::vector<std::thread> threads;
    std::vector<int> ok(4, 1);
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([t, &ok] {
            for (int i = 0; i < 30; ++i) {
                ok[t] &= block_sum_once(2 + t, 64 * (t + 1), 3000 + 17 * i);
            }
        });
    }
    for (std::thread& th : threads) {
        th.join();
    }
    check(ok[0] && ok[1] && ok[2] && ok[3], "4 OS threads launching concurrently");
}

// ferrotron's unary_f32 (elementwise.cu) with op 2 (FT_UNARY_GELU_TANH).
static void test_unary_gelu_tanh() {
    long long n = 700;
    std::vector<float> x(n), out(n, -1.0f);
    for (long long i = 0; i < n; ++i) {
        x[i] = (float)(i - 350) / 70.0f; // -5 .. 5
    }
    float* po = out.data();
    const float* px = x.data();
    int op = 2;
    double factor = 1.0;
    void* args[] = {&po, &px, &n, &op, &factor};
    const char* err = ftemu::launch(kernel("unary_f32"), 2, 1, 1, 256, 1, 1, args);
    bool ok = err == nullptr;
    double worst = 0.0;
    for (long long i = 0; i < n; ++i) {
        double v = x[i];
        double want = 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
        double d = fabs(out[i] - want);
        worst = d > worst ? d : worst;
        ok = ok && d <= 2e-6 * (1.0 + fabs(want));
    }
    char buf[120];
    snprintf(buf, sizeof buf, "unary_f32 GeluTanh, grid (2,1,1) x (256,1,1), n = 700: worst |err| %.2e",
             worst);
    check(ok, buf);
}

// ferrotron's softmax_f32 (norm.cu): causal and scaled, one block per row.
static bool softmax_once(long long rows, long long keys, unsigned threads, unsigned blocks,
                         double* worst_out) {
    long long queries = rows;
    std::vector<float> x(rows * keys), out(rows * keys, -1.0f);
    for (long long i = 0; i < rows * keys; ++i) {
        x[i] = (float)((i * 37) % 101) / 13.0f - 3.0f;
    }
    float* po = out.data();
    const float* px = x.data();
    int causal = 1;
    int scaled = 1;
    double factor = 0.125;
    void* args[] = {&po, &px, &rows, &keys, &queries, &causal, &scaled, &factor};
    if (ftemu::launch(kernel("softmax_f32"), blocks, 1, 1, threads, 1, 1, args) != nullptr) {
        return false;
    }
    bool ok = true;
    double worst = 0.0;
    for (long long r = 0; r < rows; ++r) {
        long long visible = r % queries + (keys - queries) + 1;
        double m = -INFINITY;
        for (long long j = 0; j < visible; ++j) {
            m = fmax(m, x[r * keys + j] * factor);
        }
        double s = 0.0;
        for (long long j = 0; j < visible; ++j) {
            s += exp(x[r * keys + j] * factor - m);
        }
        for (long long j = 0; j < keys; ++j) {
            double want = j < visible ? exp(x[r * keys + j] * factor - m) / s : 0.0;
            double d = fabs(out[r * keys + j] - want);
            worst = d > worst ? d : worst;
            ok = ok && d <= 1e-6 * (1.0 + want);
        }
    }
    *worst_out = worst;
    return ok;
}

static void test_softmax() {
    double worst = 0.0;
    bool ok = softmax_once(5, 40, 64, 2, &worst);
    char buf[140];
    snprintf(buf, sizeof buf,
             "softmax_f32 causal scaled, 5 rows x 40 keys, grid (2,1,1) x (64,1,1): worst |err| "
             "%.2e", worst);
    check(ok, buf);
    ok = softmax_once(3, 1000, 256, 4, &worst);
    snprintf(buf, sizeof buf,
             "softmax_f32, 3 rows x 1000 keys, grid (4,1,1) x (256,1,1): worst |err| %.2e", worst);
    check(ok, buf);
}

// Not checks: how long typical launches take.
static void timings() {
    using clock = std::chrono::steady_clock;
    long long n = 264 * 256;
    std::vector<float> x(n, 0.5f), out(n);
    float* po = out.data();
    const float* px = x.data();
    int op = 2;
    double factor = 1.0;
    void* args[] = {&po, &px, &n, &op, &factor};
    const ftemu::Kernel* k = kernel("unary_f32");
    auto t0 = clock::now();
    int reps = 200;
    for (int i = 0; i < reps; ++i) {
        ftemu::launch(k, 264, 1, 1, 256, 1, 1, args);
    }
    double us = std::chrono::duration<double, std::micro>(clock::now() - t0).count() / reps;
    printf("time: unary_f32 over 264 x 256 threads, one element each: %.0f us a launch\n", us);

    long long small = 1000;
    void* args_small[] = {&po, &px, &small, &op, &factor};
    t0 = clock::now();
    for (int i = 0; i < reps; ++i) {
        ftemu::launch(k, 264, 1, 1, 256, 1, 1, args_small);
    }
    us = std::chrono::duration<double, std::micro>(clock::now() - t0).count() / reps;
    printf("time: unary_f32 over 264 x 256 threads, n = 1000: %.0f us a launch\n", us);

    double worst;
    t0 = clock::now();
    reps = 20;
    for (int i = 0; i < reps; ++i) {
        softmax_once(64, 1024, 256, 64, &worst);
    }
    us = std::chrono::duration<double, std::micro>(clock::now() - t0).count() / reps;
    printf("time: softmax_f32, 64 rows x 1024 keys, 64 x 256 threads (with the host check): %.0f "
           "us a launch\n", us);
}

int main() {
    test_copy();
    test_block_sum();
    test_warp_rows();
    test_errors();
    test_threads();
    test_unary_gelu_tanh();
    test_softmax();
    timings();
    if (failures == 0) {
        printf("all passed\n");
    } else {
        printf("%d FAILED\n", failures);
    }
    return failures == 0 ? 0 : 1;
}
