// optim.cu: the optimizer's element updates on f32 master weights: AdamW (train.rs's update,
// in f64 exactly as written there, so the GPU's weights are bit-identical to the CPU trainer's)
// and an in-place scale for gradient clipping.

// The step's constants, computed on the host as train.rs computes them.
struct AdamW {
    double lr;
    double beta1;
    double one_minus_beta1;
    double beta2;
    double one_minus_beta2;
    double bc1; // 1 - beta1^t
    double bc2; // 1 - beta2^t
    double eps;
    double decay;      // weight decay (0 for vectors: the caller decides)
    double grad_scale; // the clipping factor (1: none)
};

// w, m, v: f32; g: the gradient in its storage type (the `_f32` / `_bf16` suffix).
template <typename G>
__device__ __forceinline__ void adamw_impl(float* w, float* m, float* v, const G* g, i64 n,
                                           AdamW a) {
    FT_GRID_LOOP(i, n) {
        double gk = (double)ld(g, i) * a.grad_scale;
        double mk = a.beta1 * (double)m[i] + a.one_minus_beta1 * gk;
        double vk = a.beta2 * (double)v[i] + a.one_minus_beta2 * gk * gk;
        m[i] = (float)mk;
        v[i] = (float)vk;
        double update = (mk / a.bc1) / (sqrt(vk / a.bc2) + a.eps);
        double wk = (double)w[i];
        w[i] = (float)(wk - a.lr * (update + a.decay * wk));
    }
}
#define ADAMW_PARAMS(G) (float* w, float* m, float* v, const G* g, i64 n, AdamW a)
FT_TYPED(adamw, ADAMW_PARAMS, (w, m, v, g, n, a))

// x *= factor in place, the product in f64 (as the CPU's Scale).
template <typename T> __device__ __forceinline__ void scale_inplace_impl(T* x, i64 n, double f) {
    FT_GRID_LOOP(i, n) { st(x, i, (float)((double)ld(x, i) * f)); }
}
#define SCALE_INPLACE_PARAMS(T) (T * x, i64 n, double f)
FT_TYPED(scale_inplace, SCALE_INPLACE_PARAMS, (x, n, f))
