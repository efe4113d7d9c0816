// elementwise.cu: one output element per input element. Scale and the activations (Unary),
// their gradients (ActGrad), the fused bias + activation and its gradient (BiasAct,
// BiasActGrad), the broadcasting binary ops (Add, Sub, Mul, Div), Fill, the dtype casts, the
// dropout masks and the fused bias + dropout + residual add (BiasDropoutAdd). Every formula is
// the CPU backend's (cpu/kernels.rs, cpu/math.rs).

// Unary ops, chosen by `op` (the switch is outside the loop: one loop per op).
#define FT_UNARY_SCALE 0
#define FT_UNARY_GELU 1
#define FT_UNARY_GELU_TANH 2
#define FT_UNARY_SILU 3
#define FT_UNARY_RELU 4

template <typename T>
__device__ __forceinline__ void unary_impl(T* out, const T* x, i64 n, int op, double factor) {
    switch (op) {
    case FT_UNARY_SCALE:
        // (v as f64 * factor) as f32, as the CPU scales.
        FT_GRID_LOOP(i, n) { st(out, i, (float)((double)ld(x, i) * factor)); }
        break;
    case FT_UNARY_GELU:
        FT_GRID_LOOP(i, n) { st(out, i, ft_gelu(ld(x, i))); }
        break;
    case FT_UNARY_GELU_TANH:
        FT_GRID_LOOP(i, n) { st(out, i, ft_gelu_tanh(ld(x, i))); }
        break;
    case FT_UNARY_SILU:
        FT_GRID_LOOP(i, n) { st(out, i, ft_silu(ld(x, i))); }
        break;
    default:
        // f32::max(v, 0): a NaN gives 0, as fmaxf.
        FT_GRID_LOOP(i, n) { st(out, i, fmaxf(ld(x, i), 0.0f)); }
        break;
    }
}
#define UNARY_PARAMS(T) (T * out, const T* x, i64 n, int op, double factor)
FT_TYPED(unary, UNARY_PARAMS, (out, x, n, op, factor))

// dy * act'(x); `act` in the order of the IR's Activation enum.
#define FT_ACT_GELU 0
#define FT_ACT_GELU_TANH 1
#define FT_ACT_SILU 2

template <typename T>
__device__ __forceinline__ void act_grad_impl(T* out, const T* x, const T* dy, i64 n, int act) {
    switch (act) {
    case FT_ACT_GELU:
        FT_GRID_LOOP(i, n) { st(out, i, (float)((double)ld(dy, i) * ft_gelu_grad(ld(x, i)))); }
        break;
    case FT_ACT_GELU_TANH:
        FT_GRID_LOOP(i, n) { st(out, i, ld(dy, i) * ft_gelu_tanh_grad(ld(x, i))); }
        break;
    case FT_ACT_SILU:
        FT_GRID_LOOP(i, n) { st(out, i, ld(dy, i) * ft_silu_grad(ld(x, i))); }
        break;
    default:
        // ReLU: g where x > 0, else g * 0 (a NaN or infinite g stays NaN, as on the CPU).
        FT_GRID_LOOP(i, n) {
            float g = ld(dy, i);
            st(out, i, ld(x, i) > 0.0f ? g : g * 0.0f);
        }
        break;
    }
}
#define ACT_GRAD_PARAMS(T) (T * out, const T* x, const T* dy, i64 n, int act)
FT_TYPED(act_grad, ACT_GRAD_PARAMS, (out, x, dy, n, act))

// act(x + bias), element i reading bias[i % nb] (a vector along the last axis): Megatron's fused
// bias-GeLU. The sum is the f32 sum Add computes (not rounded to bf16 in bf16 storage); each
// activation is exactly `unary`'s. `act` in the order of the IR's Activation enum.
template <typename T>
__device__ __forceinline__ void bias_act_impl(T* out, const T* x, const T* bias, i64 n, i64 nb,
                                              int act) {
    switch (act) {
    case FT_ACT_GELU:
        FT_GRID_LOOP(i, n) { st(out, i, ft_gelu(ld(x, i) + ld(bias, i % nb))); }
        break;
    case FT_ACT_GELU_TANH:
        FT_GRID_LOOP(i, n) { st(out, i, ft_gelu_tanh(ld(x, i) + ld(bias, i % nb))); }
        break;
    case FT_ACT_SILU:
        FT_GRID_LOOP(i, n) { st(out, i, ft_silu(ld(x, i) + ld(bias, i % nb))); }
        break;
    default:
        // ReLU: f32::max(v, 0), as `unary`.
        FT_GRID_LOOP(i, n) { st(out, i, fmaxf(ld(x, i) + ld(bias, i % nb), 0.0f)); }
        break;
    }
}
#define BIAS_ACT_PARAMS(T) (T * out, const T* x, const T* bias, i64 n, i64 nb, int act)
FT_TYPED(bias_act, BIAS_ACT_PARAMS, (out, x, bias, n, nb, act))

// dy * act'(x + bias): `act_grad`'s formulas at the recomputed pre-activation (an f32 sum, as
// `bias_act`).
template <typename T>
__device__ __forceinline__ void bias_act_grad_impl(T* out, const T* x, const T* bias, const T* dy,
                                                   i64 n, i64 nb, int act) {
    switch (act) {
    case FT_ACT_GELU:
        FT_GRID_LOOP(i, n) {
            float v = ld(x, i) + ld(bias, i % nb);
            st(out, i, (float)((double)ld(dy, i) * ft_gelu_grad(v)));
        }
        break;
    case FT_ACT_GELU_TANH:
        FT_GRID_LOOP(i, n) {
            float v = ld(x, i) + ld(bias, i % nb);
            st(out, i, ld(dy, i) * ft_gelu_tanh_grad(v));
        }
        break;
    case FT_ACT_SILU:
        FT_GRID_LOOP(i, n) {
            float v = ld(x, i) + ld(bias, i % nb);
            st(out, i, ld(dy, i) * ft_silu_grad(v));
        }
        break;
    default:
        // ReLU: g where x + bias > 0, else g * 0 (as `act_grad`).
        FT_GRID_LOOP(i, n) {
            float g = ld(dy, i);
            st(out, i, ld(x, i) + ld(bias, i % nb) > 0.0f ? g : g * 0.0f);
        }
        break;
    }
}
#define BIAS_ACT_GRAD_PARAMS(T)                                                                \
    (T * out, const T* x, const T* bias, const T* dy, i64 n, i64 nb, int act)
FT_TYPED(bias_act_grad, BIAS_ACT_GRAD_PARAMS, (out, x, bias, dy, n, nb, act))

#define FT_BIN_ADD 0
#define FT_BIN_SUB 1
#define FT_BIN_MUL 2

__device__ __forceinline__ float ft_binary(int op, float a, float b) {
    switch (op) {
    case FT_BIN_ADD:
        return a + b;
    case FT_BIN_SUB:
        return a - b;
    case FT_BIN_MUL:
        return a * b;
    default:
        return a / b;
    }
}

// a ⊕ b where each operand is either the output's shape (na == n) or its elements repeated
// (na divides n: a bias, a scalar, any operand whose shape is a suffix of the output's).
template <typename T>
__device__ __forceinline__ void binary_impl(T* out, const T* a, const T* b, i64 n, i64 na, i64 nb,
                                            int op) {
    FT_GRID_LOOP(i, n) {
        i64 ia = na == n ? i : i % na;
        i64 ib = nb == n ? i : i % nb;
        st(out, i, ft_binary(op, ld(a, ia), ld(b, ib)));
    }
}
#define BINARY_PARAMS(T) (T * out, const T* a, const T* b, i64 n, i64 na, i64 nb, int op)
FT_TYPED(binary, BINARY_PARAMS, (out, a, b, n, na, nb, op))

// The general broadcast: both operands read through strides (0 along repeated axes) over the
// output's axes (merged where both operands stay contiguous).
struct Strided2 {
    int rank;
    int pad;
    i64 size[FT_MAX_DIMS];
    i64 sa[FT_MAX_DIMS];
    i64 sb[FT_MAX_DIMS];
};

template <typename T>
__device__ __forceinline__ void binary_strided_impl(T* out, const T* a, const T* b, Strided2 s,
                                                    i64 n, int op) {
    FT_GRID_LOOP(i, n) {
        i64 idx = i;
        i64 oa = 0;
        i64 ob = 0;
#pragma unroll
        for (int d = FT_MAX_DIMS - 1; d >= 0; --d) {
            if (d < s.rank) {
                i64 q = idx / s.size[d];
                i64 r = idx - q * s.size[d];
                oa += r * s.sa[d];
                ob += r * s.sb[d];
                idx = q;
            }
        }
        st(out, i, ft_binary(op, ld(a, oa), ld(b, ob)));
    }
}
#define BINARY_STRIDED_PARAMS(T) (T * out, const T* a, const T* b, Strided2 s, i64 n, int op)
FT_TYPED(binary_strided, BINARY_STRIDED_PARAMS, (out, a, b, s, n, op))

template <typename T> __device__ __forceinline__ void fill_impl(T* out, i64 n, float v) {
    FT_GRID_LOOP(i, n) { st(out, i, v); }
}
#define FILL_PARAMS(T) (T * out, i64 n, float v)
FT_TYPED(fill, FILL_PARAMS, (out, n, v))

extern "C" __global__ void cast_f32_bf16(bf16* out, const float* x, i64 n) {
    FT_GRID_LOOP(i, n) { out[i] = f32_to_bf16(x[i]); }
}

extern "C" __global__ void cast_bf16_f32(float* out, const bf16* x, i64 n) {
    FT_GRID_LOOP(i, n) { out[i] = bf16_to_f32(x[i]); }
}

// Dropout (and DropoutGrad): element i of the local shard sits at flat index
// `first + offset(i)` of the full tensor (`first` = the shard's corner plus the seed's
// counter offset, `stride` the full tensor's strides over the local axes), and is kept iff
// splitmix64(that index) >= threshold, exactly the CPU's test.
struct DropShape {
    int rank;
    int pad;
    i64 size[FT_MAX_DIMS];
    i64 stride[FT_MAX_DIMS];
};

template <typename T>
__device__ __forceinline__ void dropout_impl(T* out, const T* x, DropShape s, i64 n, u64 first,
                                             u64 threshold, float scale) {
    FT_GRID_LOOP(i, n) {
        u64 at = first + (u64)ft_offset(i, s.rank, s.size, s.stride);
        float v = ld(x, i);
        st(out, i, ft_splitmix64(at) >= threshold ? v * scale : 0.0f);
    }
}
#define DROPOUT_PARAMS(T)                                                                      \
    (T * out, const T* x, DropShape s, i64 n, u64 first, u64 threshold, float scale)
FT_TYPED(dropout, DROPOUT_PARAMS, (out, x, s, n, first, threshold, scale))

// `v` as a bf16 store and load give it back (round to nearest even, NaN kept).
__device__ __forceinline__ float ft_round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// residual + dropout(x + bias) in one pass, with `dropout`'s mask (the same DropShape, counter
// and threshold over x's shape) and bias[i % nb] (a vector along the last axis). Each step is
// rounded as the three unfused ops (Add, Dropout, Add) store it, so the result equals theirs to
// the bit: the sum and the dropped value go through bf16 when `mid_bf16` (the unfused sum's
// storage, that of x and bias, is bf16; always so in bf16 storage), the final sum through `st`.
template <typename T>
__device__ __forceinline__ void bias_dropout_add_impl(T* out, const T* x, const T* bias,
                                                      const T* residual, DropShape s, i64 n,
                                                      i64 nb, u64 first, u64 threshold,
                                                      float scale, int mid_bf16) {
    FT_GRID_LOOP(i, n) {
        u64 at = first + (u64)ft_offset(i, s.rank, s.size, s.stride);
        float summed = ld(x, i) + ld(bias, i % nb);
        if (mid_bf16) {
            summed = ft_round_bf16(summed);
        }
        float dropped = ft_splitmix64(at) >= threshold ? summed * scale : 0.0f;
        if (mid_bf16) {
            dropped = ft_round_bf16(dropped);
        }
        st(out, i, ld(residual, i) + dropped);
    }
}
#define BIAS_DROPOUT_ADD_PARAMS(T)                                                             \
    (T * out, const T* x, const T* bias, const T* residual, DropShape s, i64 n, i64 nb,       \
     u64 first, u64 threshold, float scale, int mid_bf16)
FT_TYPED(bias_dropout_add, BIAS_DROPOUT_ADD_PARAMS,
         (out, x, bias, residual, s, n, nb, first, threshold, scale, mid_bf16))
