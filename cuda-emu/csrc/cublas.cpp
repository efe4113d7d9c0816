// cublas.cpp: the cuBLAS calls cudarc's CudaBlas makes for ferrotron's MatMul, on the CPU, built
// as `libcublas.so` (see build.rs): handles, streams, and column-major GEMMs (single and strided
// batched) in f32 (`cublasSgemm_v2`) and with bf16 or f32 storage and f32 compute
// (`cublasGemmEx`). Device pointers are host pointers (driver.cpp); each GEMM is queued on the
// handle's stream and runs in stream order. Products accumulate in f32 over k in ascending
// order; bf16 results are rounded to nearest even, as cuBLAS stores them.

#include "bf16.h"

#include <cmath>
#include <cstdint>
#include <cstring>

typedef int cublasStatus_t;

// The stand-in driver's stream queue (driver.cpp).
extern "C" void ftemu_stream_enqueue(void* stream, void (*run)(void*), void* arg);
typedef struct BlasHandle* cublasHandle_t;
struct BlasHandle {
    void* stream;
};

namespace {

enum : int { SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum : int { OP_N = 0, OP_T = 1 };
enum : int { R_32F = 0, R_16BF = 14 };
enum : int { COMPUTE_32F = 68, COMPUTE_32F_PEDANTIC = 69 };

float load(const void* p, int type, int64_t i) {
    if (type == R_32F) return static_cast<const float*>(p)[i];
    return ftemu::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

void store(void* p, int type, int64_t i, float v) {
    if (type == R_32F) {
        static_cast<float*>(p)[i] = v;
    } else {
        static_cast<uint16_t*>(p)[i] = ftemu::f32_to_bf16(v);
    }
}

struct Gemm {
    int ta, tb, m, n, k;
    float alpha, beta;
    const void* a;
    int at, lda;
    int64_t sa;
    const void* b;
    int bt, ldb;
    int64_t sb;
    void* c;
    int ct, ldc;
    int64_t sc;
    int batch;
};

// C = alpha·op(A)·op(B) + beta·C, column-major: op(A) is m × k, op(B) k × n, C m × n.
void run(void* arg) {
    Gemm* g = static_cast<Gemm*>(arg);
    for (int bi = 0; bi < g->batch; ++bi) {
        const int64_t oa = g->sa * bi, ob = g->sb * bi, oc = g->sc * bi;
        for (int j = 0; j < g->n; ++j) {
            for (int i = 0; i < g->m; ++i) {
                float acc = 0.0f;
                for (int p = 0; p < g->k; ++p) {
                    const int64_t ia =
                        g->ta == OP_N ? int64_t(p) * g->lda + i : int64_t(i) * g->lda + p;
                    const int64_t ib =
                        g->tb == OP_N ? int64_t(j) * g->ldb + p : int64_t(p) * g->ldb + j;
                    acc += load(g->a, g->at, oa + ia) * load(g->b, g->bt, ob + ib);
                }
                const int64_t ic = oc + int64_t(j) * g->ldc + i;
                // beta = 0 ignores C (it may hold NaN), as cuBLAS does.
                const float old = g->beta == 0.0f ? 0.0f : g->beta * load(g->c, g->ct, ic);
                store(g->c, g->ct, ic, g->alpha * acc + old);
            }
        }
    }
    delete g;
}

// Checks a GEMM and queues it on the handle's stream (the stand-in driver runs it in stream
// order, like a kernel).
cublasStatus_t gemm(cublasHandle_t h, int ta, int tb, int m, int n, int k, float alpha,
                    const void* a, int at, int lda, int64_t sa, const void* b, int bt, int ldb,
                    int64_t sb, float beta, void* c, int ct, int ldc, int64_t sc, int batch) {
    if (!h) return NOT_INITIALIZED;
    if ((ta != OP_N && ta != OP_T) || (tb != OP_N && tb != OP_T)) return NOT_SUPPORTED;
    if ((at != R_32F && at != R_16BF) || (bt != R_32F && bt != R_16BF) ||
        (ct != R_32F && ct != R_16BF))
        return NOT_SUPPORTED;
    if (m < 0 || n < 0 || k < 0 || batch < 0) return INVALID_VALUE;
    const int rows_a = ta == OP_N ? m : k;
    const int rows_b = tb == OP_N ? k : n;
    if (ldc < (m > 1 ? m : 1) || lda < (rows_a > 1 ? rows_a : 1) || ldb < (rows_b > 1 ? rows_b : 1))
        return INVALID_VALUE;
    ftemu_stream_enqueue(h->stream, &run,
                         new Gemm{ta, tb, m, n, k, alpha, beta, a, at, lda, sa, b, bt, ldb, sb,
                                  c, ct, ldc, sc, batch});
    return SUCCESS;
}

} // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    if (!h) return INVALID_VALUE;
    *h = new BlasHandle{nullptr};
    return SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    if (!h) return NOT_INITIALIZED;
    delete h;
    return SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t h, void* stream) {
    if (!h) return NOT_INITIALIZED;
    h->stream = stream;
    return SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t h, int) { return h ? SUCCESS : NOT_INITIALIZED; }

cublasStatus_t cublasSgemm_v2(cublasHandle_t h, int ta, int tb, int m, int n, int k,
                              const float* alpha, const float* a, int lda, const float* b,
                              int ldb, const float* beta, float* c, int ldc) {
    return gemm(h, ta, tb, m, n, k, *alpha, a, R_32F, lda, 0, b, R_32F, ldb, 0, *beta, c, R_32F,
                ldc, 0, 1);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, int ta, int tb, int m, int n, int k,
                                         const float* alpha, const float* a, int lda,
                                         long long sa, const float* b, int ldb, long long sb,
                                         const float* beta, float* c, int ldc, long long sc,
                                         int batch) {
    return gemm(h, ta, tb, m, n, k, *alpha, a, R_32F, lda, sa, b, R_32F, ldb, sb, *beta, c, R_32F,
                ldc, sc, batch);
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, int ta, int tb, int m, int n, int k,
                            const void* alpha, const void* a, int at, int lda, const void* b,
                            int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                            int compute, int) {
    if (compute != COMPUTE_32F && compute != COMPUTE_32F_PEDANTIC) return NOT_SUPPORTED;
    return gemm(h, ta, tb, m, n, k, *static_cast<const float*>(alpha), a, at, lda, 0, b, bt, ldb,
                0, *static_cast<const float*>(beta), c, ct, ldc, 0, 1);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, int ta, int tb, int m, int n, int k,
                                          const void* alpha, const void* a, int at, int lda,
                                          long long sa, const void* b, int bt, int ldb,
                                          long long sb, const void* beta, void* c, int ct,
                                          int ldc, long long sc, int batch, int compute, int) {
    if (compute != COMPUTE_32F && compute != COMPUTE_32F_PEDANTIC) return NOT_SUPPORTED;
    return gemm(h, ta, tb, m, n, k, *static_cast<const float*>(alpha), a, at, lda, sa, b, bt, ldb,
                sb, *static_cast<const float*>(beta), c, ct, ldc, sc, batch);
}

const char* cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
    case SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

const char* cublasGetStatusName(cublasStatus_t s) { return cublasGetStatusString(s); }

} // extern "C"
