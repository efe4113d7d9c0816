// driver_selftest.cpp: the stand-in driver's stream schedules, through its C API (linked
// against libcuda.so as cudarc would call it). Under FTEMU_SCHEDULE=lazy a reader on one stream
// that does not wait for a writer on another reads the writer's buffer before it is written
// (NaN: fresh memory is filled with 0xFF bytes); under `peers` a buffer freed on the writer's
// stream after the writer's event is gone before a reader queued later on another stream runs
// (NaN again); with the proper waits both read the written values. Built by build.rs as
// `driver-selftest`, run by tests/engine.rs under both schedules. Exits non-zero on a failure.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct Handle* CUstream;
typedef struct Handle* CUevent;
typedef struct Handle* CUmodule;
typedef const void* CUfunction;

extern "C" {
CUresult cuInit(unsigned);
CUresult cuStreamCreate(CUstream*, unsigned);
CUresult cuStreamSynchronize(CUstream);
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned);
CUresult cuEventCreate(CUevent*, unsigned);
CUresult cuEventRecord(CUevent, CUstream);
CUresult cuMemAllocAsync(CUdeviceptr*, size_t, CUstream);
CUresult cuMemFreeAsync(CUdeviceptr, CUstream);
CUresult cuMemcpyDtoHAsync_v2(void*, CUdeviceptr, size_t, CUstream);
CUresult cuModuleLoadData(CUmodule*, const void*);
CUresult cuModuleGetFunction(CUfunction*, CUmodule, const char*);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, CUstream, void**, void**);
}

static int failures = 0;

static void check(bool ok, const char* what) {
    printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) ++failures;
}

int main() {
    cuInit(0);
    CUstream a, b;
    cuStreamCreate(&a, 0);
    cuStreamCreate(&b, 0);
    CUmodule m;
    cuModuleLoadData(&m, "image");
    CUfunction fill, unary;
    check(cuModuleGetFunction(&fill, m, "fill_f32") == 0 &&
              cuModuleGetFunction(&unary, m, "unary_f32") == 0,
          "kernels are found by name");
    const long long n = 300;
    auto run = [&](bool wait, bool free_early) {
        CUdeviceptr x, y;
        cuMemAllocAsync(&x, n * 4, a);
        cuMemAllocAsync(&y, n * 4, b);
        float v = 2.5f;
        void* fill_args[] = {&x, (void*)&n, &v};
        cuLaunchKernel(fill, 2, 1, 1, 256, 1, 1, 0, a, fill_args, nullptr);
        if (wait) {
            CUevent written;
            cuEventCreate(&written, 0);
            cuEventRecord(written, a);
            cuStreamWaitEvent(b, written, 0);
        }
        if (free_early) cuMemFreeAsync(x, a);
        int op = 0; // Scale
        double factor = 2.0;
        void* unary_args[] = {&y, &x, (void*)&n, &op, &factor};
        cuLaunchKernel(unary, 2, 1, 1, 256, 1, 1, 0, b, unary_args, nullptr);
        float out[300];
        cuMemcpyDtoHAsync_v2(out, y, sizeof out, b);
        cuStreamSynchronize(a);
        return out[0] == 5.0f && out[n - 1] == 5.0f ? 1 : std::isnan(out[0]) ? 0 : -1;
    };
    const char* schedule = getenv("FTEMU_SCHEDULE");
    bool peers = schedule && strcmp(schedule, "peers") == 0;
    printf("schedule: %s\n", peers ? "peers" : "lazy");
    check(run(true, false) == 1, "a reader that waits on the writer's event reads its values");
    if (peers) {
        check(run(true, true) == 0,
              "a buffer freed on the writer's stream after its event, before a later reader on "
              "another stream ran: NaN");
    } else {
        check(run(false, false) == 0,
              "a reader that does not wait reads the unwritten buffer (NaN)");
    }
    if (failures) {
        printf("%d failed\n", failures);
        return 1;
    }
    printf("all passed\n");
    return 0;
}
