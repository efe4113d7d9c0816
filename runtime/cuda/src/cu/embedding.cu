// embedding.cu: the table lookup and its gradient, the index check they (and the
// cross-entropy's targets) run first, and the rotary position embedding.

// The first element (lowest index) of `v` that is not an integer in 0..bound, as the CPU's
// `index::integer` decides, min-ed into *first_bad (which starts at u64::MAX). With
// `skip_first`, elements at positions i % seq == 0 are not read (the shifted cross-entropy
// never reads the first target of a sequence).
extern "C" __global__ void check_indices(u64* first_bad, const float* v, i64 n, double bound,
                                         i64 seq, int skip_first) {
    FT_GRID_LOOP(i, n) {
        if (skip_first && i % seq == 0) {
            continue;
        }
        double d = (double)v[i];
        bool ok = d == trunc(d) && d >= 0.0 && d < bound;
        if (!ok) {
            atomicMin(first_bad, (u64)i);
        }
    }
}

// out[k, :] = table[ids[k] - offset, :] when this rank holds that row, else 0. Ids are checked
// integers. Block (x over the width, y over ids).
template <typename T>
__device__ __forceinline__ void embedding_impl(T* out, const T* table, const float* ids,
                                               i64 n_ids, i64 width, i64 offset, i64 rows) {
    for (i64 k = (i64)blockIdx.y * blockDim.y + threadIdx.y; k < n_ids;
         k += (i64)gridDim.y * blockDim.y) {
        i64 r = (i64)ids[k] - offset;
        bool mine = r >= 0 && r < rows;
        for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < width;
             j += (i64)gridDim.x * blockDim.x) {
            out[k * width + j] = mine ? table[r * width + j] : (T)0;
        }
    }
}
#define EMBEDDING_PARAMS(T)                                                                    \
    (T * out, const T* table, const float* ids, i64 n_ids, i64 width, i64 offset, i64 rows)
FT_TYPED(embedding, EMBEDDING_PARAMS, (out, table, ids, n_ids, width, offset, rows))

// The positions k of the ids this rank holds, grouped by local row r = ids[k] - offset and in
// ascending order within a row: row r's are order[start[r] .. start[r + 1]]. A counting sort on
// one thread (no atomics, so the gradient below adds in a fixed order); `cursor` is scratch of
// `rows` elements, `start` has `rows + 1`.
extern "C" __global__ void embedding_grad_order(i64* start, i64* cursor, i64* order,
                                                const float* ids, i64 n_ids, i64 offset,
                                                i64 rows) {
    if (blockIdx.x != 0 || threadIdx.x != 0) {
        return;
    }
    for (i64 r = 0; r <= rows; ++r) {
        start[r] = 0;
    }
    for (i64 k = 0; k < n_ids; ++k) {
        i64 r = (i64)ids[k] - offset;
        if (r >= 0 && r < rows) {
            start[r + 1] += 1;
        }
    }
    for (i64 r = 0; r < rows; ++r) {
        start[r + 1] += start[r];
        cursor[r] = start[r];
    }
    for (i64 k = 0; k < n_ids; ++k) {
        i64 r = (i64)ids[k] - offset;
        if (r >= 0 && r < rows) {
            order[cursor[r]++] = k;
        }
    }
}

// acc[r, :] = the sum of dy[k, :] over the positions k of row r (embedding_grad_order), in f64
// and in ascending k, as the CPU adds them: deterministic, and bit-identical to the CPU in f32.
// Every element is written (0 for a row no id hits). Block (x over the width, y over rows).
template <typename T>
__device__ __forceinline__ void embedding_grad_impl(float* acc, const T* dy, const i64* start,
                                                    const i64* order, i64 width, i64 rows) {
    for (i64 r = (i64)blockIdx.y * blockDim.y + threadIdx.y; r < rows;
         r += (i64)gridDim.y * blockDim.y) {
        for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < width;
             j += (i64)gridDim.x * blockDim.x) {
            double sum = 0.0;
            for (i64 i = start[r]; i < start[r + 1]; ++i) {
                sum += (double)ld(dy, order[i] * width + j);
            }
            acc[r * width + j] = (float)sum;
        }
    }
}
#define EMBEDDING_GRAD_PARAMS(T)                                                               \
    (float* acc, const T* dy, const i64* start, const i64* order, i64 width, i64 rows)
FT_TYPED(embedding_grad, EMBEDDING_GRAD_PARAMS, (acc, dy, start, order, width, rows))

// The angle per position of pair k: base^(-2k / head_dim), rescaled as Llama 3.1 does when
// factor > 0 (the CPU's index::rotary_frequency, in f64).
__device__ __forceinline__ double rotary_frequency(i64 k, i64 head_dim, double base,
                                                   double factor, double low, double high,
                                                   double context) {
    double freq = pow(base, -2.0 * (double)k / (double)head_dim);
    if (factor <= 0.0) {
        return freq;
    }
    double wavelength = 2.0 * 3.14159265358979323846 / freq;
    if (wavelength < context / high) {
        return freq;
    }
    if (wavelength > context / low) {
        return freq / factor;
    }
    double smooth = (context / wavelength - low) / (high - low);
    return (1.0 - smooth) * freq / factor + smooth * freq;
}

// The rotation of each (position, pair): cs[2 * (pos * half + k)] = cos, [.. + 1] = sin of
// sign * (first_pos + pos) * rotary_frequency(k), computed in f64 as the CPU does. `scaling`:
// factor, low_freq_factor, high_freq_factor, original context (factor 0: none).
extern "C" __global__ void rotary_table(float* cs, i64 seq, i64 half, i64 first_pos,
                                        i64 head_dim, double base, double sign, double factor,
                                        double low, double high, double context) {
    FT_GRID_LOOP(i, seq * half) {
        i64 pos = i / half;
        i64 k = i - pos * half;
        double p = (double)(first_pos + pos);
        double theta =
            sign * p * rotary_frequency(k, head_dim, base, factor, low, high, context);
        double s;
        double c;
        sincos(theta, &s, &c);
        cs[2 * i] = (float)c;
        cs[2 * i + 1] = (float)s;
    }
}

// x: [slabs = rows * heads, 2 * half], row r at position r % seq. Pairs (k, k + half) rotate:
// o1 = x1 c - x2 s, o2 = x2 c + x1 s. Block (x over pairs, y over slabs).
template <typename T>
__device__ __forceinline__ void rotary_impl(T* out, const T* x, const float* cs, i64 slabs,
                                            i64 heads, i64 seq, i64 half) {
    for (i64 sl = (i64)blockIdx.y * blockDim.y + threadIdx.y; sl < slabs;
         sl += (i64)gridDim.y * blockDim.y) {
        i64 pos = (sl / heads) % seq;
        const T* xs = x + sl * 2 * half;
        T* os = out + sl * 2 * half;
        const float* c = cs + pos * half * 2;
        for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < half;
             k += (i64)gridDim.x * blockDim.x) {
            float x1 = ld(xs, k);
            float x2 = ld(xs, k + half);
            float co = c[2 * k];
            float si = c[2 * k + 1];
            st(os, k, x1 * co - x2 * si);
            st(os, k + half, x2 * co + x1 * si);
        }
    }
}
#define ROTARY_PARAMS(T)                                                                       \
    (T * out, const T* x, const float* cs, i64 slabs, i64 heads, i64 seq, i64 half)
FT_TYPED(rotary, ROTARY_PARAMS, (out, x, cs, slabs, heads, seq, half))
