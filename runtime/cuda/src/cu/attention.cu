// attention.cu: fused scaled dot-product attention, forward and backward (FlashAttention-2's
// algorithm, one warp per output row), never holding the [batch, queries, keys] scores.
//
// Every kernel gives one warp a task: an output row and a group of up to FT_ATT_GROUP of its
// columns (lane `l` owns columns l, l + 32, ... of the group, FT_ATT_COLS of them, in
// registers). The warp walks the row's partners (keys for a query row, the queries that see it
// for a key row) in tiles of 32, one per lane: the warp computes each partner's dot products
// together (lanes along the row, a butterfly sum) and hands it to the partner's lane, the lanes
// compute the tile's weights, and the weights are broadcast by shuffle, in order, into the
// column accumulators. Every sum runs in an order fixed by the shapes, with no atomics, so
// results are deterministic and do not depend on the grid; a row wider than FT_ATT_GROUP is
// split over several warps that each recompute the row's weights.
//
// Layout: batch entry b is head h = b % heads of outer entry b / heads, and row i of its
// width-w operand (q, k, v, out, dout and the gradients) sits at ((outer * rows + i) * heads +
// h) * w: heads = 1 is heads first ([..., rows, w], entry b's rows one after the other),
// heads > 1 sequence first ([..., rows, heads, w], rows heads * w apart). The row statistics
// (lse, D) are [batch, queries] either way.
//
// Dropout: element (b, i, j) of the probabilities [..., heads, queries, keys] is kept iff
// splitmix64(first + offset(flat index)) >= threshold, exactly elementwise.cu's DROPOUT on that
// tensor (the host's dropout_plan gives `first` and the strides), so fused and unfused runs drop
// the same elements.

// The same layout as elementwise.cu's (each source is its own NVRTC program).
struct DropShape {
    int rank;
    int pad;
    i64 size[FT_MAX_DIMS];
    i64 stride[FT_MAX_DIMS];
};

// The sizes and attributes of one attention (`AttnShape` in kernels/structs.rs).
struct AttnShape {
    i64 batch;
    i64 queries;
    i64 keys;
    i64 d;
    i64 dv;
    i64 heads; // interleaved with the sequence (sequence first), else 1
    double factor;
    u64 first;
    u64 threshold;
    float scale; // 1/(1 - p) with dropout, else 1
    int causal;
    int dropout;
    int pad;
    DropShape drop;
};

// Warps per block (kernels/attention.rs's WARPS) and columns per lane (its GROUP / 32).
#define FT_ATT_WARPS 4
#define FT_ATT_COLS 8
#define FT_ATT_GROUP (32 * FT_ATT_COLS)

#define FT_ATT_FULL 0xffffffffu

// The keys query `i` sees: 0 .. visible (causal: i + 1 + keys - queries).
__device__ __forceinline__ i64 ft_att_visible(const AttnShape& a, i64 i) {
    return a.causal ? i + 1 + a.keys - a.queries : a.keys;
}

// The first query that sees key `j` (every later one does too).
__device__ __forceinline__ i64 ft_att_first_query(const AttnShape& a, i64 j) {
    if (!a.causal) {
        return 0;
    }
    i64 f = j - (a.keys - a.queries);
    return f > 0 ? f : 0;
}

// Where batch entry b's row 0 of a `width`-wide operand of `rows` rows per entry sits; its rows
// are a.heads * width apart.
__device__ __forceinline__ i64 ft_att_base(const AttnShape& a, i64 b, i64 rows, i64 width) {
    const i64 outer = b / a.heads;
    const i64 h = b - outer * a.heads;
    return (outer * rows * a.heads + h) * width;
}

// Whether the dropout keeps probability (b, i, j).
__device__ __forceinline__ bool ft_att_keep(const AttnShape& a, i64 b, i64 i, i64 j) {
    if (!a.dropout) {
        return true;
    }
    i64 flat = (b * a.queries + i) * a.keys + j;
    u64 at = a.first + (u64)ft_offset(flat, a.drop.rank, a.drop.size, a.drop.stride);
    return ft_splitmix64(at) >= a.threshold;
}

// The dot products of a tile's `n` rows (row r at rows + r * stride) with `y` (len long): lane r
// gets row r's. Each is computed by the whole warp, lanes along the row (coalesced loads), and
// summed by a butterfly, so every lane holds the same total in an order fixed by `len`.
template <typename T>
__device__ __forceinline__ float ft_att_dots(const T* rows, i64 stride, int n, const T* y,
                                             i64 len) {
    const int lane = threadIdx.x & 31;
    float mine = 0.0f;
    for (int r = 0; r < n; ++r) {
        const T* x = rows + r * stride;
        float s = 0.0f;
        for (i64 t = lane; t < len; t += 32) {
            s += ld(x, t) * ld(y, t);
        }
        s = ft_warp_sum(s);
        if (lane == r) {
            mine = s;
        }
    }
    return mine;
}

// A score as Scale computes it from the dot product.
__device__ __forceinline__ float ft_att_scaled(float dot, const AttnShape& a) {
    return (float)((double)dot * a.factor);
}

// Column groups of a row `width` wide (at least one: a task also writes the row's statistics).
__device__ __forceinline__ i64 ft_att_groups(i64 width) {
    i64 g = (width + FT_ATT_GROUP - 1) / FT_ATT_GROUP;
    return g > 0 ? g : 1;
}

// dS = P (dP - D), the softmax's VJP of one probability, the difference in f64 (as softmax_grad:
// a peaked row cancels).
__device__ __forceinline__ float ft_att_ds(float p, float dp, double d_row) {
    return (float)((double)p * ((double)dp - d_row));
}

// The forward: per (query row, column group), an online softmax over the visible keys. The
// running maximum `m` and sum `l` of exp(s - m) are the warp's; the accumulators hold
// sum_j exp(s_j - m) keep_j / (1 - p) v_j, rescaled when `m` grows. out = acc / l;
// lse = m + log(l) (-inf, and out 0, for a row that sees no key).
template <typename T>
__device__ __forceinline__ void attn_fwd_impl(T* out, float* lse, const T* q, const T* k,
                                              const T* v, AttnShape a) {
    const float NEG_INF = -__int_as_float(0x7f800000);
    const int lane = threadIdx.x & 31;
    const i64 groups = ft_att_groups(a.dv);
    const i64 tasks = a.batch * a.queries * groups;
    for (i64 task = (i64)blockIdx.x * FT_ATT_WARPS + (threadIdx.x >> 5); task < tasks;
         task += (i64)gridDim.x * FT_ATT_WARPS) {
        const i64 row = task / groups;
        const i64 c0 = (task - row * groups) * FT_ATT_GROUP;
        const i64 b = row / a.queries;
        const i64 i = row - b * a.queries;
        const i64 ks = a.heads * a.d;  // between rows of q, k
        const i64 vs = a.heads * a.dv; // between rows of v, out
        const T* qr = q + ft_att_base(a, b, a.queries, a.d) + i * ks;
        const T* kb = k + ft_att_base(a, b, a.keys, a.d);
        const T* vb = v + ft_att_base(a, b, a.keys, a.dv);
        const i64 visible = ft_att_visible(a, i);
        float m = NEG_INF;
        float l = 0.0f;
        float acc[FT_ATT_COLS];
#pragma unroll
        for (int c = 0; c < FT_ATT_COLS; ++c) {
            acc[c] = 0.0f;
        }
        for (i64 j0 = 0; j0 < visible; j0 += 32) {
            const int n = (int)ft_min(32, visible - j0);
            const i64 j = j0 + lane;
            const float dot = ft_att_dots(kb + j0 * ks, ks, n, qr, a.d);
            const float s = lane < n ? ft_att_scaled(dot, a) : NEG_INF;
            const float m_new = fmaxf(m, ft_warp_max(s));
            // exp(-inf) is 0: the first tile rescales nothing.
            const float alpha = ft_exp(m - m_new);
            const float p = lane < n ? ft_exp(s - m_new) : 0.0f;
            l = l * alpha + ft_warp_sum(p);
            const float z = lane < n && ft_att_keep(a, b, i, j) ? p * a.scale : 0.0f;
#pragma unroll
            for (int c = 0; c < FT_ATT_COLS; ++c) {
                acc[c] = acc[c] * alpha;
            }
            for (int jj = 0; jj < n; ++jj) {
                const float zj = __shfl_sync(FT_ATT_FULL, z, jj);
                const T* vr = vb + (j0 + jj) * vs;
#pragma unroll
                for (int c = 0; c < FT_ATT_COLS; ++c) {
                    const i64 col = c0 + c * 32 + lane;
                    if (col < a.dv) {
                        acc[c] = acc[c] + zj * ld(vr, col);
                    }
                }
            }
            m = m_new;
        }
        // l >= 1 when a key is visible (the maximum's own term is exp(0)).
        const float inv = visible > 0 ? 1.0f / l : 0.0f;
        T* o = out + ft_att_base(a, b, a.queries, a.dv) + i * vs;
#pragma unroll
        for (int c = 0; c < FT_ATT_COLS; ++c) {
            const i64 col = c0 + c * 32 + lane;
            if (col < a.dv) {
                st(o, col, acc[c] * inv);
            }
        }
        if (c0 == 0 && lane == 0) {
            lse[row] = visible > 0 ? (float)((double)m + log((double)l)) : NEG_INF;
        }
    }
}
#define ATTN_FWD_PARAMS(T) (T * out, float* lse, const T* q, const T* k, const T* v, AttnShape a)
FT_TYPED(attn_fwd, ATTN_FWD_PARAMS, (out, lse, q, k, v, a))

// D_i = dout_i . out_i (= sum_j P_ij dP_ij), per query row, in f64: one warp a row.
template <typename T>
__device__ __forceinline__ void attn_row_dot_impl(double* d_rows, const T* out, const T* dout,
                                                  AttnShape a) {
    const int lane = threadIdx.x & 31;
    const i64 rows = a.batch * a.queries;
    for (i64 row = (i64)blockIdx.x * FT_ATT_WARPS + (threadIdx.x >> 5); row < rows;
         row += (i64)gridDim.x * FT_ATT_WARPS) {
        const i64 b = row / a.queries;
        const i64 i = row - b * a.queries;
        const i64 at = ft_att_base(a, b, a.queries, a.dv) + i * a.heads * a.dv;
        const T* o = out + at;
        const T* g = dout + at;
        double s = 0.0;
        for (i64 c = lane; c < a.dv; c += 32) {
            s += (double)ld(o, c) * (double)ld(g, c);
        }
        s = ft_warp_sum_d(s);
        if (lane == 0) {
            d_rows[row] = s;
        }
    }
}
#define ATTN_ROW_DOT_PARAMS(T) (double* d_rows, const T* out, const T* dout, AttnShape a)
FT_TYPED(attn_row_dot, ATTN_ROW_DOT_PARAMS, (d_rows, out, dout, a))

// dq_i = factor sum_j dS_ij k_j over the keys query i sees, per (query row, column group of d).
// P_ij = exp(s_ij - lse_i); dP_ij = (dout_i . v_j) keep_ij / (1 - p); dS = P (dP - D_i).
template <typename T>
__device__ __forceinline__ void attn_bwd_dq_impl(T* dq, const T* q, const T* k, const T* v,
                                                 const T* dout, const float* lse,
                                                 const double* d_rows, AttnShape a) {
    const int lane = threadIdx.x & 31;
    const i64 groups = ft_att_groups(a.d);
    const i64 tasks = a.batch * a.queries * groups;
    for (i64 task = (i64)blockIdx.x * FT_ATT_WARPS + (threadIdx.x >> 5); task < tasks;
         task += (i64)gridDim.x * FT_ATT_WARPS) {
        const i64 row = task / groups;
        const i64 c0 = (task - row * groups) * FT_ATT_GROUP;
        const i64 b = row / a.queries;
        const i64 i = row - b * a.queries;
        const i64 ks = a.heads * a.d;  // between rows of q, k, dq
        const i64 vs = a.heads * a.dv; // between rows of v, dout
        const T* qr = q + ft_att_base(a, b, a.queries, a.d) + i * ks;
        const T* gr = dout + ft_att_base(a, b, a.queries, a.dv) + i * vs;
        const T* kb = k + ft_att_base(a, b, a.keys, a.d);
        const T* vb = v + ft_att_base(a, b, a.keys, a.dv);
        const i64 visible = ft_att_visible(a, i);
        const float lse_i = visible > 0 ? lse[row] : 0.0f;
        const double d_i = visible > 0 ? d_rows[row] : 0.0;
        float acc[FT_ATT_COLS];
#pragma unroll
        for (int c = 0; c < FT_ATT_COLS; ++c) {
            acc[c] = 0.0f;
        }
        for (i64 j0 = 0; j0 < visible; j0 += 32) {
            const int n = (int)ft_min(32, visible - j0);
            const i64 j = j0 + lane;
            const float dot = ft_att_dots(kb + j0 * ks, ks, n, qr, a.d);
            const float dz = ft_att_dots(vb + j0 * vs, vs, n, gr, a.dv);
            float ds = 0.0f;
            if (lane < n) {
                const float p = ft_exp(ft_att_scaled(dot, a) - lse_i);
                const float dp = ft_att_keep(a, b, i, j) ? dz * a.scale : 0.0f;
                ds = ft_att_ds(p, dp, d_i);
            }
            for (int jj = 0; jj < n; ++jj) {
                const float dsj = __shfl_sync(FT_ATT_FULL, ds, jj);
                const T* kr = kb + (j0 + jj) * ks;
#pragma unroll
                for (int c = 0; c < FT_ATT_COLS; ++c) {
                    const i64 col = c0 + c * 32 + lane;
                    if (col < a.d) {
                        acc[c] = acc[c] + dsj * ld(kr, col);
                    }
                }
            }
        }
        T* o = dq + ft_att_base(a, b, a.queries, a.d) + i * ks;
#pragma unroll
        for (int c = 0; c < FT_ATT_COLS; ++c) {
            const i64 col = c0 + c * 32 + lane;
            if (col < a.d) {
                st(o, col, (float)((double)acc[c] * a.factor));
            }
        }
    }
}
#define ATTN_BWD_DQ_PARAMS(T)                                                                  \
    (T * dq, const T* q, const T* k, const T* v, const T* dout, const float* lse,             \
     const double* d_rows, AttnShape a)
FT_TYPED(attn_bwd_dq, ATTN_BWD_DQ_PARAMS, (dq, q, k, v, dout, lse, d_rows, a))

// dk_j = factor sum_i dS_ij q_i and dv_j = sum_i Z_ij dout_i (Z = P keep / (1 - p)) over the
// queries that see key j, per (key row, column group of max(d, dv)).
template <typename T>
__device__ __forceinline__ void attn_bwd_dkv_impl(T* dk, T* dv, const T* q, const T* k,
                                                  const T* v, const T* dout, const float* lse,
                                                  const double* d_rows, AttnShape a) {
    const int lane = threadIdx.x & 31;
    const i64 groups = ft_att_groups(a.d > a.dv ? a.d : a.dv);
    const i64 tasks = a.batch * a.keys * groups;
    for (i64 task = (i64)blockIdx.x * FT_ATT_WARPS + (threadIdx.x >> 5); task < tasks;
         task += (i64)gridDim.x * FT_ATT_WARPS) {
        const i64 krow = task / groups;
        const i64 c0 = (task - krow * groups) * FT_ATT_GROUP;
        const i64 b = krow / a.keys;
        const i64 j = krow - b * a.keys;
        const i64 ks = a.heads * a.d;  // between rows of q, k, dk
        const i64 vs = a.heads * a.dv; // between rows of v, dout, dv
        const i64 k_at = ft_att_base(a, b, a.keys, a.d) + j * ks;
        const i64 v_at = ft_att_base(a, b, a.keys, a.dv) + j * vs;
        const T* kr = k + k_at;
        const T* vr = v + v_at;
        const T* qb = q + ft_att_base(a, b, a.queries, a.d);
        const T* gb = dout + ft_att_base(a, b, a.queries, a.dv);
        const i64 row0 = b * a.queries; // the batch entry's first query row (lse, D)
        float acc_k[FT_ATT_COLS];
        float acc_v[FT_ATT_COLS];
#pragma unroll
        for (int c = 0; c < FT_ATT_COLS; ++c) {
            acc_k[c] = 0.0f;
            acc_v[c] = 0.0f;
        }
        for (i64 i0 = ft_att_first_query(a, j); i0 < a.queries; i0 += 32) {
            const int n = (int)ft_min(32, a.queries - i0);
            const i64 i = i0 + lane;
            const float dot = ft_att_dots(qb + i0 * ks, ks, n, kr, a.d);
            const float dz = ft_att_dots(gb + i0 * vs, vs, n, vr, a.dv);
            float ds = 0.0f;
            float z = 0.0f;
            if (lane < n) {
                const i64 row = row0 + i;
                const float p = ft_exp(ft_att_scaled(dot, a) - lse[row]);
                const bool keep = ft_att_keep(a, b, i, j);
                z = keep ? p * a.scale : 0.0f;
                ds = ft_att_ds(p, keep ? dz * a.scale : 0.0f, d_rows[row]);
            }
            for (int ii = 0; ii < n; ++ii) {
                const float dsi = __shfl_sync(FT_ATT_FULL, ds, ii);
                const float zi = __shfl_sync(FT_ATT_FULL, z, ii);
                const T* qr = qb + (i0 + ii) * ks;
                const T* gr = gb + (i0 + ii) * vs;
#pragma unroll
                for (int c = 0; c < FT_ATT_COLS; ++c) {
                    const i64 col = c0 + c * 32 + lane;
                    if (col < a.d) {
                        acc_k[c] = acc_k[c] + dsi * ld(qr, col);
                    }
                    if (col < a.dv) {
                        acc_v[c] = acc_v[c] + zi * ld(gr, col);
                    }
                }
            }
        }
#pragma unroll
        for (int c = 0; c < FT_ATT_COLS; ++c) {
            const i64 col = c0 + c * 32 + lane;
            if (col < a.d) {
                st(dk + k_at, col, (float)((double)acc_k[c] * a.factor));
            }
            if (col < a.dv) {
                st(dv + v_at, col, acc_v[c]);
            }
        }
    }
}
#define ATTN_BWD_DKV_PARAMS(T)                                                                 \
    (T * dk, T* dv, const T* q, const T* k, const T* v, const T* dout, const float* lse,      \
     const double* d_rows, AttnShape a)
FT_TYPED(attn_bwd_dkv, ATTN_BWD_DKV_PARAMS, (dk, dv, q, k, v, dout, lse, d_rows, a))
