// common.cuh: the prelude of every kernel source (nvrtc.rs prepends it; NVRTC gets no include
// path, so nothing here or in the sources may #include a header: the NVRTC wheel from PyPI
// ships without the CUDA headers).
//
// Conventions of every kernel:
// * sizes and indices are 64-bit (`i64`): a tensor may hold more than 2^31 elements;
// * loops are grid-stride, so any grid size covers any tensor (the host caps grids);
// * storage is `float` or bf16 (`bf16`, an `unsigned short` holding the top half of an f32),
//   arithmetic is f32 (f64 where the CPU backend computes in f64), and loads and stores
//   convert through `ld` / `st` with round-to-nearest-even;
// * kernels with a storage type are written once as `<name>_impl<T>` and instantiated as
//   `extern "C"` `<name>_f32` and `<name>_bf16` (FT_TYPED); the Rust side's kernel list
//   (kernels/spec.rs) names each with its parameter count, which the compile test checks
//   against the PTX;
// * arithmetic is never contracted (the module is compiled with --fmad=false) and the
//   transcendental functions the CPU backend writes out itself (Cephes' exp, the normal CDF,
//   SplitMix64) are ported operation for operation, so elementwise results are bit-identical to
//   the CPU backend's; reductions run over warp and block trees in an order fixed by the launch
//   shape, so results are deterministic: in f32, except the norms' row statistics, which
//   accumulate and normalize in f64 as the CPU does (an RMSNorm gradient of a short row, or a
//   LayerNorm of values far from zero, cancels too much for f32).

typedef unsigned short bf16;
typedef long long i64;
typedef unsigned long long u64;

// The most axes a strided view may have after merging (shapes, strides in kernel parameters).
#define FT_MAX_DIMS 8

#define FT_GRID_LOOP(i, n)                                                                     \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                         \
         i += (i64)gridDim.x * blockDim.x)

// Instantiates `NAME_f32` and `NAME_bf16` from `NAME_impl<T>`. PARAMS is a macro of the storage
// type giving the parameter list; ARGS is the argument list of the call.
#define FT_TYPED(NAME, PARAMS, ARGS)                                                           \
    extern "C" __global__ void NAME##_f32 PARAMS(float) { NAME##_impl<float> ARGS; }          \
    extern "C" __global__ void NAME##_bf16 PARAMS(bf16) { NAME##_impl<bf16> ARGS; }

// ---------------------------------------------------------------------------------------------
// bf16 storage

__device__ __forceinline__ float bf16_to_f32(bf16 h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN. The same rounding as the `half`
// crate's `bf16::from_f32`, which uploads use.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, i64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, i64 i, float v) { p[i] = f32_to_bf16(v); }

// Whether v is a NaN or an infinity (a bit test: no header's isfinite needed).
__device__ __forceinline__ bool ft_non_finite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

__device__ __forceinline__ i64 ft_min(i64 a, i64 b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------
// The CPU backend's math (runtime/cpu/src/math.rs), operation for operation.

// Cephes' expf: 2^n * p(r). Saturates at e^88, 0 below -87, keeps NaN.
__device__ __forceinline__ float ft_exp(float x) {
    const float LO = -87.0f;
    const float HI = 88.0f;
    const float C1 = 0.6933594f;
    const float C2 = -2.1219444e-4f;
    const float ROUND = 12582912.0f;
    // Rust's clamp: NaN stays NaN (fminf/fmaxf would not keep it).
    float xc = x < LO ? LO : (x > HI ? HI : x);
    float t = xc * 1.44269504088896340735992468100189214f + ROUND;
    float n = t - ROUND;
    float r = xc - n * C1 - n * C2;
    float p = ((((1.9875691e-4f * r + 1.3981999e-3f) * r + 8.333452e-3f) * r + 4.1665796e-2f) * r
               + 0.16666665f)
                  * r
              + 0.5f;
    p = p * r * r + r + 1.0f;
    unsigned int n_int = __float_as_uint(t) - __float_as_uint(ROUND);
    float scale = __uint_as_float((n_int + 127u) << 23);
    return x < LO ? 0.0f : p * scale;
}

// Cephes' exp in f64: 2^n * (1 + 2P/(Q - P)). 0 below -708, saturates above 709, keeps NaN.
__device__ __forceinline__ double ft_exp64(double x) {
    const double LO = -708.0;
    const double HI = 709.0;
    const double C1 = 6.93145751953125e-1;
    const double C2 = 1.4286068203094172321e-6;
    const double ROUND = 6755399441055744.0;
    double xc = x < LO ? LO : (x > HI ? HI : x);
    double t = xc * 1.44269504088896340735992468100189214 + ROUND;
    double n = t - ROUND;
    double r = xc - n * C1 - n * C2;
    double rr = r * r;
    double p = r * ((1.2617719307481059088e-4 * rr + 3.029944077074419613e-2) * rr + 1.0);
    double q = ((3.0019850513866445504e-6 * rr + 2.5244834034968410419e-3) * rr
                + 2.2726554820815502877e-1)
                   * rr
               + 2.0;
    double e = 1.0 + 2.0 * (p / (q - p));
    u64 n_int = (u64)__double_as_longlong(t) - (u64)__double_as_longlong(ROUND);
    double scale = __longlong_as_double((i64)((n_int + 1023ull) << 52));
    return x < LO ? 0.0 : e * scale;
}

// The standard normal CDF to 2e-7 relative (Numerical Recipes' erfc fit), in f64.
__device__ __forceinline__ double ft_normal_cdf(double x) {
    double z = fabs(x) * 0.707106781186547524400844362104849039;
    double t = 1.0 / (1.0 + 0.5 * z);
    double poly =
        -1.26551223
        + t * (1.00002368
               + t * (0.37409196
                      + t * (0.09678418
                             + t * (-0.18628806
                                    + t * (0.27886807
                                           + t * (-1.13520398
                                                  + t * (1.48851587
                                                         + t * (-0.82215223
                                                                + t * 0.17087277))))))));
    double half_erfc = 0.5 * t * ft_exp64(-z * z + poly);
    return x < 0.0 ? half_erfc : 1.0 - half_erfc;
}

// Exact GeLU, x * Phi(x), in f64.
__device__ __forceinline__ float ft_gelu(float x) {
    double xd = (double)x;
    return (float)(xd * ft_normal_cdf(xd));
}

// Phi(x) + x * phi(x), in f64.
__device__ __forceinline__ double ft_gelu_grad(float x) {
    double xd = (double)x;
    double pdf = ft_exp64(-0.5 * xd * xd) * 0.3989422804014327;
    return ft_normal_cdf(xd) + xd * pdf;
}

// (sigma(z), sigma(-z)), each to full relative accuracy.
__device__ __forceinline__ void ft_sigmoid_pair(float z, float* pos, float* neg) {
    float e = ft_exp(-fabsf(z));
    float a = 1.0f / (1.0f + e);
    float b = e * a;
    if (z >= 0.0f) {
        *pos = a;
        *neg = b;
    } else {
        *pos = b;
        *neg = a;
    }
}

#define FT_SQRT_2_OVER_PI 0.7978846f
#define FT_GELU_TANH_C 0.044715f

// GPT-2's GeLU as x * sigma(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
__device__ __forceinline__ float ft_gelu_tanh(float x) {
    float u2 = 2.0f * FT_SQRT_2_OVER_PI * (x + FT_GELU_TANH_C * x * x * x);
    float s, s_neg;
    ft_sigmoid_pair(u2, &s, &s_neg);
    return x * s;
}

__device__ __forceinline__ float ft_gelu_tanh_grad(float x) {
    float u2 = 2.0f * FT_SQRT_2_OVER_PI * (x + FT_GELU_TANH_C * x * x * x);
    float s, s_neg;
    ft_sigmoid_pair(u2, &s, &s_neg);
    return s + 2.0f * x * s * s_neg * FT_SQRT_2_OVER_PI * (1.0f + 3.0f * FT_GELU_TANH_C * x * x);
}

__device__ __forceinline__ float ft_silu(float x) {
    float s, s_neg;
    ft_sigmoid_pair(x, &s, &s_neg);
    return x * s;
}

__device__ __forceinline__ float ft_silu_grad(float x) {
    float s, s_neg;
    ft_sigmoid_pair(x, &s, &s_neg);
    return s * (1.0f + x * s_neg);
}

// SplitMix64's first output for seed i: the dropout mask's counter hash.
__device__ __forceinline__ u64 ft_splitmix64(u64 i) {
    u64 z = i + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// ---------------------------------------------------------------------------------------------
// Reductions. Butterfly (xor) shuffles leave the same total in every lane (each step adds the
// same two values in either order), so the result is deterministic for a given block size.
// Block reductions need blockDim.x a multiple of 32 and blockDim.y == 1, and must be reached by
// every thread of the block.

__device__ __forceinline__ float ft_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

__device__ __forceinline__ float ft_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

__device__ __forceinline__ double ft_warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// The block's total in f64 (the norms' statistics, as the CPU accumulates them), in every
// thread.
__device__ __forceinline__ double ft_block_sum_d(double v) {
    __shared__ double partial_d[32];
    v = ft_warp_sum_d(v);
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) {
        partial_d[warp] = v;
    }
    __syncthreads();
    v = lane < warps ? partial_d[lane] : 0.0;
    return ft_warp_sum_d(v);
}

// The block's total, in every thread.
__device__ __forceinline__ float ft_block_sum(float v) {
    __shared__ float partial[32];
    v = ft_warp_sum(v);
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = (blockDim.x + 31) >> 5;
    __syncthreads(); // an earlier call's readers are done with `partial`
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    return ft_warp_sum(v);
}

// The block's maximum (fmaxf: a NaN loses against a number, as f32::max), in every thread.
__device__ __forceinline__ float ft_block_max(float v) {
    __shared__ float partial[32];
    v = ft_warp_max(v);
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = lane < warps ? partial[lane] : -__int_as_float(0x7f800000);
    return ft_warp_max(v);
}

// ---------------------------------------------------------------------------------------------
// Strided views

// The offset of flat index `idx` of a row-major index space of `rank` axes of `size`, in a
// tensor read with `stride` per axis.
__device__ __forceinline__ i64 ft_offset(i64 idx, int rank, const i64* size, const i64* stride) {
    if (rank == 1) {
        return idx * stride[0];
    }
    i64 off = 0;
#pragma unroll
    for (int d = FT_MAX_DIMS - 1; d >= 0; --d) {
        if (d < rank) {
            i64 s = size[d];
            i64 q = idx / s;
            off += (idx - q * s) * stride[d];
            idx = q;
        }
    }
    return off;
}
