// layout.cu: data movement and broadcast reductions. Slice, Split, Concat, Pad, LocalSlice and
// the collectives' (de)interleaving are all "rows" copies (copy_rows); Transpose and Expand
// read the input through strides (gather, or transpose_tiled when the innermost axes swap);
// SumTo and the norms' parameter gradients reduce through row-chunk partials that sum_partials
// adds in a fixed order.

// dst[o * dst_ld + dst_off + j] = src[o * src_ld + src_off + j] for o < outer, j < len.
// Block (x over j, y over o), both grid-strided: no division per element.
template <typename T>
__device__ __forceinline__ void copy_rows_impl(T* dst, const T* src, i64 outer, i64 len,
                                               i64 src_ld, i64 src_off, i64 dst_ld,
                                               i64 dst_off) {
    for (i64 o = (i64)blockIdx.y * blockDim.y + threadIdx.y; o < outer;
         o += (i64)gridDim.y * blockDim.y) {
        const T* s = src + o * src_ld + src_off;
        T* d = dst + o * dst_ld + dst_off;
        for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < len;
             j += (i64)gridDim.x * blockDim.x) {
            d[j] = s[j];
        }
    }
}
#define COPY_ROWS_PARAMS(T)                                                                    \
    (T * dst, const T* src, i64 outer, i64 len, i64 src_ld, i64 src_off, i64 dst_ld,          \
     i64 dst_off)
FT_TYPED(copy_rows, COPY_ROWS_PARAMS, (dst, src, outer, len, src_ld, src_off, dst_ld, dst_off))

// out[i] = src[offset of i]: the output's axes (merged) with the input's stride along each
// (0 along broadcast axes: Expand; permuted: Transpose).
struct Gather {
    int rank;
    int pad;
    i64 size[FT_MAX_DIMS];
    i64 stride[FT_MAX_DIMS];
};

template <typename T>
__device__ __forceinline__ void gather_impl(T* out, const T* src, Gather g, i64 n) {
    FT_GRID_LOOP(i, n) { out[i] = src[ft_offset(i, g.rank, g.size, g.stride)]; }
}
#define GATHER_PARAMS(T) (T * out, const T* src, Gather g, i64 n)
FT_TYPED(gather, GATHER_PARAMS, (out, src, g, n))

// A transpose whose output's last axis (b, contiguous in the output) is not the input's
// contiguous axis (a): 32x32 tiles through shared memory, so that reads run along a and writes
// along b. The other axes ("other", merged) are looped over by blockIdx.z.
struct Tile {
    int rank_o;
    int pad;
    i64 size_o[FT_MAX_DIMS];
    i64 src_o[FT_MAX_DIMS];
    i64 dst_o[FT_MAX_DIMS];
    i64 n_other;
    i64 na;
    i64 nb;
    i64 sa_dst; // the output's stride along a
    i64 sb_src; // the input's stride along b
};

template <typename T>
__device__ __forceinline__ void transpose_tiled_impl(T* out, const T* src, Tile t) {
    __shared__ T tile[32][33];
    int tx = threadIdx.x;
    int ty = threadIdx.y;
    i64 tiles_a = (t.na + 31) / 32;
    i64 tiles_b = (t.nb + 31) / 32;
    for (i64 z = blockIdx.z; z < t.n_other; z += gridDim.z) {
        i64 s0 = ft_offset(z, t.rank_o, t.size_o, t.src_o);
        i64 d0 = ft_offset(z, t.rank_o, t.size_o, t.dst_o);
        for (i64 ta = blockIdx.y; ta < tiles_a; ta += gridDim.y) {
            for (i64 tb = blockIdx.x; tb < tiles_b; tb += gridDim.x) {
                i64 a0 = ta * 32;
                i64 b0 = tb * 32;
                for (int k = ty; k < 32; k += 8) {
                    i64 a = a0 + tx;
                    i64 b = b0 + k;
                    if (a < t.na && b < t.nb) {
                        tile[k][tx] = src[s0 + b * t.sb_src + a];
                    }
                }
                __syncthreads();
                for (int k = ty; k < 32; k += 8) {
                    i64 a = a0 + k;
                    i64 b = b0 + tx;
                    if (a < t.na && b < t.nb) {
                        out[d0 + a * t.sa_dst + b] = tile[tx][k];
                    }
                }
                __syncthreads();
            }
        }
    }
}
#define TRANSPOSE_TILED_PARAMS(T) (T * out, const T* src, Tile t)
FT_TYPED(transpose_tiled, TRANSPOSE_TILED_PARAMS, (out, src, t))

// SumTo: x's axes split into kept ones (the output's, merged) and reduced ones (merged); the
// output element o sums x[koff(o) + roff(r)] over r < red_n. The reduction indices are cut into
// chunks of `chunk`; with one chunk the sums go straight to `out`, else chunk c's partial sums
// to part[c * out_n + o] (then sum_partials).
struct SumToShape {
    int rank_k;
    int rank_r;
    int inner_reduced; // x's last axis is reduced: lanes run along it
    int pad;
    i64 size_k[FT_MAX_DIMS];
    i64 stride_k[FT_MAX_DIMS];
    i64 size_r[FT_MAX_DIMS];
    i64 stride_r[FT_MAX_DIMS];
    i64 out_n;
    i64 red_n;
    i64 chunk;
};

template <typename T>
__device__ __forceinline__ void sum_to_partial_impl(float* part, T* out, const T* x,
                                                    SumToShape s) {
    __shared__ float sh[8][33];
    int tx = threadIdx.x;
    int ty = threadIdx.y;
    i64 chunks = (s.red_n + s.chunk - 1) / s.chunk;
    if (!s.inner_reduced) {
        // 32 consecutive outputs per block (coalesced along x's kept last axis), 8 lanes over
        // the chunk's reduction indices, combined in shared memory.
        for (i64 o0 = (i64)blockIdx.x * 32; o0 < s.out_n; o0 += (i64)gridDim.x * 32) {
            for (i64 c = blockIdx.y; c < chunks; c += gridDim.y) {
                i64 o = o0 + tx;
                float acc = 0.0f;
                if (o < s.out_n) {
                    i64 ko = ft_offset(o, s.rank_k, s.size_k, s.stride_k);
                    i64 end = ft_min(s.red_n, (c + 1) * s.chunk);
                    for (i64 r = c * s.chunk + ty; r < end; r += 8) {
                        acc += ld(x, ko + ft_offset(r, s.rank_r, s.size_r, s.stride_r));
                    }
                }
                sh[ty][tx] = acc;
                __syncthreads();
                if (ty == 0 && o < s.out_n) {
                    float total = 0.0f;
#pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        total += sh[k][tx];
                    }
                    if (chunks == 1) {
                        st(out, o, total);
                    } else {
                        part[c * s.out_n + o] = total;
                    }
                }
                __syncthreads();
            }
        }
    } else {
        // One warp per output (8 per block), its lanes along x's reduced last axis.
        for (i64 o0 = (i64)blockIdx.x * 8; o0 < s.out_n; o0 += (i64)gridDim.x * 8) {
            for (i64 c = blockIdx.y; c < chunks; c += gridDim.y) {
                i64 o = o0 + ty;
                float acc = 0.0f;
                if (o < s.out_n) {
                    i64 ko = ft_offset(o, s.rank_k, s.size_k, s.stride_k);
                    i64 end = ft_min(s.red_n, (c + 1) * s.chunk);
                    for (i64 r = c * s.chunk + tx; r < end; r += 32) {
                        acc += ld(x, ko + ft_offset(r, s.rank_r, s.size_r, s.stride_r));
                    }
                }
                acc = ft_warp_sum(acc);
                if (tx == 0 && o < s.out_n) {
                    if (chunks == 1) {
                        st(out, o, acc);
                    } else {
                        part[c * s.out_n + o] = acc;
                    }
                }
            }
        }
    }
}
#define SUM_TO_PARTIAL_PARAMS(T) (float* part, T* out, const T* x, SumToShape s)
FT_TYPED(sum_to_partial, SUM_TO_PARTIAL_PARAMS, (part, out, x, s))

// out[i] = sum over c < chunks of part[c * n + i], in order of c.
template <typename T>
__device__ __forceinline__ void sum_partials_impl(T* out, const float* part, i64 chunks, i64 n) {
    FT_GRID_LOOP(i, n) {
        float s = 0.0f;
        for (i64 c = 0; c < chunks; ++c) {
            s += part[c * n + i];
        }
        st(out, i, s);
    }
}
#define SUM_PARTIALS_PARAMS(T) (T * out, const float* part, i64 chunks, i64 n)
FT_TYPED(sum_partials, SUM_PARTIALS_PARAMS, (out, part, chunks, n))
