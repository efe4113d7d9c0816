// cross_entropy.cu: the cross-entropy's per-row statistics and the logits' gradient, for logits
// [rows, vocab] whose first `nr` columns are this rank's real classes (global class
// `class_offset + j`; padded classes and other ranks' classes are excluded). The rows may be a
// window of larger logits: local row r is full row `first + r` (first = 0 for whole logits), and
// targets, sequence positions and the mean's count are the full rows' (the targets buffer holds
// every full row's). With `shift`, full row r predicts the target at r + 1 and the last row of
// each sequence (r % seq == seq - 1) predicts nothing. Targets are f32 integers, checked
// beforehand (check_indices). One block per row for the statistics (one kernel each), a 2-D grid
// for the gradient (into a new buffer, or over the logits).

// The global target of full row `row`, or -1 when the row predicts nothing.
__device__ __forceinline__ i64 ft_target(const float* targets, i64 row, i64 seq, int shift) {
    if (!shift) {
        return (i64)targets[row];
    }
    if (row % seq + 1 == seq) {
        return -1;
    }
    return (i64)targets[row + 1];
}

// max[row] = the max over the row's real local classes (-inf when it has none).
template <typename T>
__device__ __forceinline__ void ce_row_max_impl(float* max, const T* logits, i64 rows, i64 vocab,
                                                i64 nr) {
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* l = logits + row * vocab;
        float m = -__int_as_float(0x7f800000);
        for (i64 j = threadIdx.x; j < nr; j += blockDim.x) {
            m = fmaxf(m, ld(l, j));
        }
        m = ft_block_max(m);
        if (threadIdx.x == 0) {
            max[row] = m;
        }
    }
}
#define CE_ROW_MAX_PARAMS(T) (float* max, const T* logits, i64 rows, i64 vocab, i64 nr)
FT_TYPED(ce_row_max, CE_ROW_MAX_PARAMS, (max, logits, rows, vocab, nr))

// sums[row] = sum over the real local classes of exp(logit - max[row]); sums[rows + row] = the
// logit of the row's target when this rank holds that class, else 0 (also for rows predicting
// nothing): one [2, rows] buffer, which the group reduces at once.
template <typename T>
__device__ __forceinline__ void ce_row_sums_impl(float* sums, const T* logits, const float* max,
                                                 const float* targets, i64 rows, i64 first,
                                                 i64 seq, i64 vocab, i64 nr, i64 class_offset,
                                                 int shift) {
    float* sum = sums;
    float* tl = sums + rows;
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* l = logits + row * vocab;
        float m = max[row];
        float s = 0.0f;
        for (i64 j = threadIdx.x; j < nr; j += blockDim.x) {
            s += ft_exp(ld(l, j) - m);
        }
        s = ft_block_sum(s);
        if (threadIdx.x == 0) {
            sum[row] = s;
            i64 t = ft_target(targets, first + row, seq, shift);
            i64 j = t - class_offset;
            tl[row] = t >= 0 && j >= 0 && j < nr ? ld(l, j) : 0.0f;
        }
    }
}
#define CE_ROW_SUMS_PARAMS(T)                                                                 \
    (float* sums, const T* logits, const float* max, const float* targets, i64 rows,          \
     i64 first, i64 seq, i64 vocab, i64 nr, i64 class_offset, int shift)
FT_TYPED(ce_row_sums, CE_ROW_SUMS_PARAMS,
         (sums, logits, max, targets, rows, first, seq, vocab, nr, class_offset, shift))

// The logits' gradient: (softmax - onehot(target)) * dloss / denom over the real local classes,
// 0 for padded classes and for rows predicting nothing. `dloss` is a device scalar (the
// backward's seed stays on the device); denom = the full rows' predicting rows * token parts.
template <typename T>
__device__ __forceinline__ void ce_grad_impl(T* out, const T* logits, const float* max,
                                             const float* sum, const float* targets,
                                             const float* dloss, i64 rows, i64 first, i64 seq,
                                             i64 vocab, i64 nr, i64 class_offset, int shift,
                                             double denom) {
    float scale = (float)((double)dloss[0] / denom);
    for (i64 row = (i64)blockIdx.y * blockDim.y + threadIdx.y; row < rows;
         row += (i64)gridDim.y * blockDim.y) {
        const T* l = logits + row * vocab;
        T* o = out + row * vocab;
        i64 t = ft_target(targets, first + row, seq, shift);
        i64 tj = t - class_offset; // the target's local column when in 0..nr
        float m = max[row];
        float inv = 1.0f / sum[row];
        for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < vocab;
             j += (i64)gridDim.x * blockDim.x) {
            float g = 0.0f;
            if (t >= 0 && j < nr) {
                float p = ft_exp(ld(l, j) - m) * inv;
                g = j == tj ? scale * (p - 1.0f) : scale * p;
            }
            st(o, j, g);
        }
    }
}
#define CE_GRAD_PARAMS(T)                                                                      \
    (T * out, const T* logits, const float* max, const float* sum, const float* targets,       \
     const float* dloss, i64 rows, i64 first, i64 seq, i64 vocab, i64 nr, i64 class_offset,    \
     int shift, double denom)
FT_TYPED(ce_grad, CE_GRAD_PARAMS,
         (out, logits, max, sum, targets, dloss, rows, first, seq, vocab, nr, class_offset, shift,
          denom))

// ce_grad written over the logits' own buffer (the caller reads the logits no more): the same
// arithmetic, ce_grad_impl with out == logits, so the values are ce_grad's to the bit. Each
// element is read, then written, by the one thread that owns it (the target column's gradient
// comes from its own element too), so no thread reads an element another has written; and
// ce_grad_impl's pointers are not __restrict__, so the compiler keeps each read before the
// write to the same address.
template <typename T>
__device__ __forceinline__ void ce_grad_inplace_impl(T* x, const float* max, const float* sum,
                                                     const float* targets, const float* dloss,
                                                     i64 rows, i64 first, i64 seq, i64 vocab,
                                                     i64 nr, i64 class_offset, int shift,
                                                     double denom) {
    ce_grad_impl<T>(x, x, max, sum, targets, dloss, rows, first, seq, vocab, nr, class_offset,
                    shift, denom);
}
#define CE_GRAD_INPLACE_PARAMS(T)                                                              \
    (T * x, const float* max, const float* sum, const float* targets, const float* dloss,      \
     i64 rows, i64 first, i64 seq, i64 vocab, i64 nr, i64 class_offset, int shift,             \
     double denom)
FT_TYPED(ce_grad_inplace, CE_GRAD_INPLACE_PARAMS,
         (x, max, sum, targets, dloss, rows, first, seq, vocab, nr, class_offset, shift, denom))

// The loss from the group-reduced statistics, on the device (no host round trip inside a step):
// the sum over the rows that predict something of ln(sum) + max - target logit, divided by
// denom (the full rows' predicting rows * token parts, so that a window's loss is its share of
// the whole loss). One block: each thread sums its rows in f64, then the
// block's sums are added in a fixed order, so the result is the same on every run.
extern "C" __global__ void ce_loss(float* out, const float* max, const float* sums, i64 rows,
                                   i64 first, i64 seq, int shift, double denom) {
    const float* sum = sums;
    const float* tl = sums + rows;
    double acc = 0.0;
    for (i64 row = threadIdx.x; row < rows; row += blockDim.x) {
        if (!shift || (first + row) % seq + 1 != seq) {
            acc += log((double)sum[row]) + (double)max[row] - (double)tl[row];
        }
    }
    acc = ft_block_sum_d(acc);
    if (threadIdx.x == 0) {
        out[0] = (float)(acc / denom);
    }
}
