// norm.cu: LayerNorm and RMSNorm over the last axis, forward and backward, and softmax and its
// gradient (optionally scaled: the fused ScaledSoftmax and ScaledSoftmaxGrad).
//
// One block per row (grid-stride over rows); the norms' statistics accumulate in f64 and the
// norms normalize in f64 (as the CPU backend: f32 cancels too much for a short RMSNorm row's
// gradient or values far from zero), softmax reduces in f32; the row is read again for each
// pass (it stays in L1/L2). The backward's parameter gradients (sums over every
// row) go through row-chunk partials (`norm_param_partial`) and a fixed-order sum
// (`sum_partials` in layout.cu), so they are deterministic without atomics.

// The row's mean (0 unless `centered`) and 1/sqrt(var + eps), accumulated and computed in f64
// as the CPU does.
template <typename T>
__device__ __forceinline__ void ft_row_stats(const T* xr, i64 n, double eps, int centered,
                                             double* mean_out, double* inv_out) {
    double mean = 0.0;
    if (centered) {
        double s = 0.0;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            s += (double)ld(xr, j);
        }
        mean = ft_block_sum_d(s) / (double)n;
    }
    double s2 = 0.0;
    for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
        double d = (double)ld(xr, j) - mean;
        s2 += d * d;
    }
    double var = ft_block_sum_d(s2) / (double)n;
    *mean_out = mean;
    *inv_out = 1.0 / sqrt(var + eps);
}

// `centered`: LayerNorm (mean subtracted); else RMSNorm. Absent weight or bias: the flag is 0
// and the pointer is a dummy that is never read. Normalized in f64, as the CPU.
template <typename T>
__device__ __forceinline__ void norm_fwd_impl(T* out, const T* x, const T* w, const T* b, i64 rows,
                                              i64 n, double eps, int centered, int has_w,
                                              int has_b) {
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * n;
        T* o = out + row * n;
        double mean, inv;
        ft_row_stats(xr, n, eps, centered, &mean, &inv);
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            double v = ((double)ld(xr, j) - mean) * inv;
            if (has_w) {
                v = v * (double)ld(w, j);
            }
            if (has_b) {
                v = v + (double)ld(b, j);
            }
            st(o, j, (float)v);
        }
    }
}
#define NORM_FWD_PARAMS(T)                                                                     \
    (T * out, const T* x, const T* w, const T* b, i64 rows, i64 n, double eps, int centered,  \
     int has_w, int has_b)
FT_TYPED(norm_fwd, NORM_FWD_PARAMS, (out, x, w, b, rows, n, eps, centered, has_w, has_b))

// dx = inv * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w (mean(g) only when
// centered), in f64 as the CPU; each row's (mean, inv) goes to `stats` for the parameter
// gradients.
template <typename T>
__device__ __forceinline__ void norm_bwd_impl(T* dx, double* stats, const T* x, const T* w,
                                              const T* dy, i64 rows, i64 n, double eps,
                                              int centered, int has_w) {
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * n;
        const T* dyr = dy + row * n;
        T* o = dx + row * n;
        double mean, inv;
        ft_row_stats(xr, n, eps, centered, &mean, &inv);
        double sg = 0.0;
        double sgx = 0.0;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            double g = has_w ? (double)ld(dyr, j) * (double)ld(w, j) : (double)ld(dyr, j);
            double xh = ((double)ld(xr, j) - mean) * inv;
            sg += g;
            sgx += g * xh;
        }
        double mean_g = centered ? ft_block_sum_d(sg) / (double)n : 0.0;
        double mean_gx = ft_block_sum_d(sgx) / (double)n;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            double g = has_w ? (double)ld(dyr, j) * (double)ld(w, j) : (double)ld(dyr, j);
            double xh = ((double)ld(xr, j) - mean) * inv;
            st(o, j, (float)(inv * (g - mean_g - xh * mean_gx)));
        }
        if (threadIdx.x == 0) {
            stats[2 * row] = mean;
            stats[2 * row + 1] = inv;
        }
    }
}
#define NORM_BWD_PARAMS(T)                                                                     \
    (T * dx, double* stats, const T* x, const T* w, const T* dy, i64 rows, i64 n, double eps, \
     int centered, int has_w)
FT_TYPED(norm_bwd, NORM_BWD_PARAMS, (dx, stats, x, w, dy, rows, n, eps, centered, has_w))

// Partial sums of dweight = sum(dy * xhat) and dbias = sum(dy) over the rows of chunk `c`
// (rows c*chunk .. (c+1)*chunk), into pw[c*n + j] and pb[c*n + j] (pb only when centered),
// accumulated in f64 within the chunk. Block (32, 8): 32 columns, 8 row lanes, reduced in shared
// memory in a fixed order.
template <typename T>
__device__ __forceinline__ void norm_param_partial_impl(float* pw, float* pb, const T* x,
                                                        const T* dy, const double* stats,
                                                        i64 rows, i64 n, i64 chunk,
                                                        int centered) {
    __shared__ double sw[8][33];
    __shared__ double sb[8][33];
    int tx = threadIdx.x;
    int ty = threadIdx.y;
    i64 chunks = (rows + chunk - 1) / chunk;
    for (i64 c0 = (i64)blockIdx.x * 32; c0 < n; c0 += (i64)gridDim.x * 32) {
        for (i64 c = blockIdx.y; c < chunks; c += gridDim.y) {
            i64 col = c0 + tx;
            double aw = 0.0;
            double ab = 0.0;
            if (col < n) {
                i64 end = ft_min(rows, (c + 1) * chunk);
                for (i64 r = c * chunk + ty; r < end; r += 8) {
                    double d = (double)ld(dy, r * n + col);
                    double xh = ((double)ld(x, r * n + col) - stats[2 * r]) * stats[2 * r + 1];
                    aw += d * xh;
                    ab += d;
                }
            }
            sw[ty][tx] = aw;
            sb[ty][tx] = ab;
            __syncthreads();
            if (ty == 0 && col < n) {
                double tw = 0.0;
                double tb = 0.0;
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    tw += sw[k][tx];
                    tb += sb[k][tx];
                }
                pw[c * n + col] = (float)tw;
                if (centered) {
                    pb[c * n + col] = (float)tb;
                }
            }
            __syncthreads();
        }
    }
}
#define NORM_PARAM_PARTIAL_PARAMS(T)                                                           \
    (float* pw, float* pb, const T* x, const T* dy, const double* stats, i64 rows, i64 n,      \
     i64 chunk, int centered)
FT_TYPED(norm_param_partial, NORM_PARAM_PARTIAL_PARAMS,
         (pw, pb, x, dy, stats, rows, n, chunk, centered))

// Softmax's input j of a row: x, or (`scaled`) x * factor as Scale computes it
// ((float)((double)v * factor)), kept in f32 (not rounded to bf16 in bf16 storage).
template <typename T>
__device__ __forceinline__ float ft_softmax_in(const T* xr, i64 j, int scaled, double factor) {
    float v = ld(xr, j);
    return scaled ? (float)((double)v * factor) : v;
}

// Softmax over rows of `keys`; `causal`: row r (query r % queries) sees keys
// 0 ..= r % queries + keys - queries, the rest are 0. One kernel: max, sum of exponentials,
// normalized store. `scaled` (the fused ScaledSoftmax): of x * factor, every read scaled.
template <typename T>
__device__ __forceinline__ void softmax_impl(T* out, const T* x, i64 rows, i64 keys, i64 queries,
                                             int causal, int scaled, double factor) {
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * keys;
        T* o = out + row * keys;
        i64 visible = causal ? row % queries + (keys - queries) + 1 : keys;
        float m = -__int_as_float(0x7f800000);
        for (i64 j = threadIdx.x; j < visible; j += blockDim.x) {
            m = fmaxf(m, ft_softmax_in(xr, j, scaled, factor));
        }
        m = ft_block_max(m);
        float s = 0.0f;
        for (i64 j = threadIdx.x; j < visible; j += blockDim.x) {
            s += ft_exp(ft_softmax_in(xr, j, scaled, factor) - m);
        }
        float inv = 1.0f / ft_block_sum(s);
        for (i64 j = threadIdx.x; j < keys; j += blockDim.x) {
            st(o, j, j < visible ? ft_exp(ft_softmax_in(xr, j, scaled, factor) - m) * inv : 0.0f);
        }
    }
}
#define SOFTMAX_PARAMS(T)                                                                      \
    (T * out, const T* x, i64 rows, i64 keys, i64 queries, int causal, int scaled, double factor)
FT_TYPED(softmax, SOFTMAX_PARAMS, (out, x, rows, keys, queries, causal, scaled, factor))

// Softmax's VJP from its output: y * (dy - sum(dy * y)) per row, accumulated and computed in f64
// as the CPU does. `scaled` (the fused ScaledSoftmaxGrad): that result, rounded to f32, times
// `factor` as Scale does ((float)((double)r * factor)), not rounded to bf16 in between.
template <typename T>
__device__ __forceinline__ void softmax_grad_impl(T* out, const T* y, const T* dy, i64 rows, i64 n,
                                                  int scaled, double factor) {
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* yr = y + row * n;
        const T* gr = dy + row * n;
        T* o = out + row * n;
        // In f64, as the CPU: for a peaked row (a large scale) `dy - dot` cancels to nothing
        // in f32 (found by the emulated tests: 0 where the CPU has 1.7e-11).
        double s = 0.0;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            s += (double)ld(yr, j) * (double)ld(gr, j);
        }
        double dot = ft_block_sum_d(s);
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            float r = (float)((double)ld(yr, j) * ((double)ld(gr, j) - dot));
            st(o, j, scaled ? (float)((double)r * factor) : r);
        }
    }
}
#define SOFTMAX_GRAD_PARAMS(T)                                                                 \
    (T * out, const T* y, const T* dy, i64 rows, i64 n, int scaled, double factor)
FT_TYPED(softmax_grad, SOFTMAX_GRAD_PARAMS, (out, y, dy, rows, n, scaled, factor))
