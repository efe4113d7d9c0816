// reduce.cu: what the communicators and the executor's checks need. The elementwise reduction
// of several ranks' buffers (the virtual-rank all-reduce and reduce-scatter), and the search for
// the first non-finite element.

// Up to 16 input buffers, as raw device addresses (the Rust side gets them through cudarc's
// stream-ordered `device_ptr`, so each input's last write is waited for on this stream).
#define FT_MAX_INPUTS 16
struct Inputs {
    u64 p[FT_MAX_INPUTS];
};

// out[i] = in[0][i] ⊕ in[1][i] ⊕ ... ⊕ in[count - 1][i], folded left to right in f32 (the CPU
// communicator's rank order); op 0: sum, else max (fmaxf: a NaN loses, as f32::max). `out` may
// be one of the inputs: each element is read before it is written, by the same thread.
template <typename T>
__device__ __forceinline__ void reduce_n_impl(T* out, Inputs in, int count, int op, i64 n) {
    FT_GRID_LOOP(i, n) {
        float acc = ld((const T*)in.p[0], i);
#pragma unroll
        for (int k = 1; k < FT_MAX_INPUTS; ++k) {
            if (k < count) {
                float v = ld((const T*)in.p[k], i);
                acc = op == 0 ? acc + v : fmaxf(acc, v);
            }
        }
        st(out, i, acc);
    }
}
#define REDUCE_N_PARAMS(T) (T * out, Inputs in, int count, int op, i64 n)
FT_TYPED(reduce_n, REDUCE_N_PARAMS, (out, in, count, op, n))

// *first = the lowest index of a NaN or infinity in x (*first starts at u64::MAX).
template <typename T>
__device__ __forceinline__ void first_non_finite_impl(u64* first, const T* x, i64 n) {
    FT_GRID_LOOP(i, n) {
        if (ft_non_finite(ld(x, i))) {
            atomicMin(first, (u64)i);
        }
    }
}
#define FIRST_NON_FINITE_PARAMS(T) (u64 * first, const T* x, i64 n)
FT_TYPED(first_non_finite, FIRST_NON_FINITE_PARAMS, (first, x, n))

// partial[b] = Σ x[i]² in f64 over block b's grid-stride share of x (the gradient norm's terms,
// accumulated in f64 as the CPU trainer does). The grid size is fixed by the caller, so the
// partials, which the host adds in block order, give the same total on every run.
template <typename T>
__device__ __forceinline__ void sum_squares_impl(double* partial, const T* x, i64 n) {
    double acc = 0.0;
    FT_GRID_LOOP(i, n) {
        double v = (double)ld(x, i);
        acc += v * v;
    }
    acc = ft_block_sum_d(acc);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = acc;
    }
}
#define SUM_SQUARES_PARAMS(T) (double* partial, const T* x, i64 n)
FT_TYPED(sum_squares, SUM_SQUARES_PARAMS, (partial, x, n))
