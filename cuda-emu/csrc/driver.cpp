// driver.cpp: the part of the CUDA driver API that cudarc calls for ferrotron's CUDA backend,
// on the CPU, built as `libcuda.so` (see build.rs). Eight emulated devices ("ferrotron CPU
// emulator", compute capability 9.0, 4 SMs each, so that `ferrotron launch` can give each
// process its own ordinal) that share one memory: device memory is host memory; every operation is
// carried out when it is called, in the calling thread, so streams and events order nothing and
// are only handles (queued work is always finished: synchronizing returns at once).
//
// What it checks that a GPU would not report as clearly:
// * fresh allocations are filled with 0xFF bytes (a NaN in f32 and bf16), and freed ones too
//   before they are released, so a kernel that leaves an output element unwritten, or a read of
//   a freed buffer, shows up as NaN in the results;
// * every copy and memset must lie inside one live allocation (CUDA_ERROR_INVALID_VALUE);
// * cuModuleGetFunction finds kernels by name among those compiled from the sources; the
//   module image NVRTC produced is not executed (it only has to exist);
// * a kernel launch that deadlocks (a barrier not every thread reaches) fails the launch with
//   CUDA_ERROR_LAUNCH_FAILED, and cuGetErrorString's text for it names the kernel.

#include "kernel_emu.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct Handle* CUcontext;
typedef struct Handle* CUstream;
typedef struct Handle* CUevent;
typedef struct Handle* CUmodule;
typedef const ftemu::Kernel* CUfunction;

struct Handle {
    int kind;
};

namespace {

enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

constexpr int kSmCount = 4;
constexpr int kDevices = 8;
constexpr size_t kTotalMemory = size_t(16) << 30;

Handle the_context{1};
thread_local CUcontext current = nullptr;

std::mutex allocations_lock;
std::map<uintptr_t, size_t> allocations; // start -> bytes

thread_local std::string last_launch_error;

CUresult allocate(CUdeviceptr* out, size_t bytes) {
    if (!out) return INVALID_VALUE;
    // At least one byte, so every allocation has its own address; 256-byte aligned as cudaMalloc.
    size_t size = bytes == 0 ? 1 : bytes;
    void* p = aligned_alloc(256, (size + 255) / 256 * 256);
    if (!p) return OUT_OF_MEMORY;
    memset(p, 0xFF, size);
    {
        std::lock_guard<std::mutex> g(allocations_lock);
        allocations[(uintptr_t)p] = bytes;
    }
    *out = (CUdeviceptr)(uintptr_t)p;
    return SUCCESS;
}

CUresult release(CUdeviceptr ptr) {
    size_t bytes;
    {
        std::lock_guard<std::mutex> g(allocations_lock);
        auto it = allocations.find((uintptr_t)ptr);
        if (it == allocations.end()) return INVALID_VALUE;
        bytes = it->second;
        allocations.erase(it);
    }
    memset((void*)(uintptr_t)ptr, 0xFF, bytes);
    free((void*)(uintptr_t)ptr);
    return SUCCESS;
}

// Whether [p, p + n) lies inside one live allocation.
bool inside(CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> g(allocations_lock);
    auto it = allocations.upper_bound((uintptr_t)p);
    if (it == allocations.begin()) return false;
    --it;
    return (uintptr_t)p >= it->first && (uintptr_t)p + n <= it->first + it->second;
}

Handle* new_handle(int kind) { return new Handle{kind}; }

} // namespace

extern "C" {

CUresult cuInit(unsigned) { return SUCCESS; }

CUresult cuDriverGetVersion(int* v) {
    if (!v) return INVALID_VALUE;
    *v = 13000;
    return SUCCESS;
}

CUresult cuDeviceGetCount(int* n) {
    if (!n) return INVALID_VALUE;
    *n = kDevices;
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!d) return INVALID_VALUE;
    if (ordinal < 0 || ordinal >= kDevices) return INVALID_DEVICE;
    *d = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (d < 0 || d >= kDevices) return INVALID_DEVICE;
    if (!name || len <= 0) return INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", "ferrotron CPU emulator");
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice d) {
    if (d < 0 || d >= kDevices) return INVALID_DEVICE;
    if (!value) return INVALID_VALUE;
    switch (attribute) {
    case 1: *value = 1024; break;     // max threads per block
    case 2: case 3: *value = 1024; break; // max block dim x, y
    case 4: *value = 64; break;       // max block dim z
    case 5: *value = 0x7fffffff; break; // max grid dim x
    case 6: case 7: *value = 65535; break;
    case 8: *value = 48 * 1024; break; // shared memory per block
    case 10: *value = 32; break;      // warp size
    case 16: *value = kSmCount; break; // multiprocessors
    case 75: *value = 9; break;       // compute capability major
    case 76: *value = 0; break;       // minor
    case 115: *value = 1; break;      // memory pools supported (cuMemAllocAsync)
    default: *value = 0; break;
    }
    return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (d < 0 || d >= kDevices) return INVALID_DEVICE;
    if (!bytes) return INVALID_VALUE;
    *bytes = kTotalMemory;
    return SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    if (free_bytes) *free_bytes = kTotalMemory;
    if (total) *total = kTotalMemory;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    if (d < 0 || d >= kDevices) return INVALID_DEVICE;
    if (!ctx) return INVALID_VALUE;
    *ctx = &the_context;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    return d >= 0 && d < kDevices ? SUCCESS : INVALID_DEVICE;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    current = ctx;
    return SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext* ctx) {
    if (!ctx) return INVALID_VALUE;
    *ctx = current;
    return SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return INVALID_VALUE;
    *d = 0;
    return SUCCESS;
}

CUresult cuCtxSynchronize() { return SUCCESS; }

// Streams and events: handles only (work is done when it is queued).
CUresult cuStreamCreate(CUstream* s, unsigned) {
    if (!s) return INVALID_VALUE;
    *s = new_handle(2);
    return SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) {
    return cuStreamCreate(s, flags);
}
CUresult cuStreamDestroy_v2(CUstream s) {
    if (!s || s == &the_context) return INVALID_HANDLE;
    delete s;
    return SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) { return SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return SUCCESS; }
CUresult cuStreamQuery(CUstream) { return SUCCESS; }

CUresult cuEventCreate(CUevent* e, unsigned) {
    if (!e) return INVALID_VALUE;
    *e = new_handle(3);
    return SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
    if (!e) return INVALID_HANDLE;
    delete e;
    return SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream) { return e ? SUCCESS : INVALID_HANDLE; }
CUresult cuEventRecordWithFlags(CUevent e, CUstream, unsigned) {
    return e ? SUCCESS : INVALID_HANDLE;
}
CUresult cuEventSynchronize(CUevent e) { return e ? SUCCESS : INVALID_HANDLE; }
CUresult cuEventQuery(CUevent e) { return e ? SUCCESS : INVALID_HANDLE; }
CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
    if (!ms) return INVALID_VALUE;
    *ms = 0.0f;
    return SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    return cuEventElapsedTime(ms, a, b);
}

// Memory.
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return allocate(p, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return allocate(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p); }

CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    if (!p) return INVALID_VALUE;
    *p = malloc(bytes == 0 ? 1 : bytes);
    return *p ? SUCCESS : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) {
    free(p);
    return SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (n == 0) return SUCCESS;
    if (!inside(dst, n) || !src) return INVALID_VALUE;
    memcpy((void*)(uintptr_t)dst, src, n);
    return SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, n);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (n == 0) return SUCCESS;
    if (!inside(src, n) || !dst) return INVALID_VALUE;
    memcpy(dst, (const void*)(uintptr_t)src, n);
    return SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, n);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (n == 0) return SUCCESS;
    if (!inside(dst, n) || !inside(src, n)) return INVALID_VALUE;
    memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    if (n == 0) return SUCCESS;
    if (!inside(dst, n)) return INVALID_VALUE;
    memset((void*)(uintptr_t)dst, v, n);
    return SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    return cuMemsetD8_v2(dst, v, n);
}

// Modules: the image is NVRTC's real output (checked by the compile test); functions are looked
// up among the natively compiled kernels.
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (!m || !image) return INVALID_VALUE;
    *m = new_handle(4);
    return SUCCESS;
}
CUresult cuModuleUnload(CUmodule m) {
    if (!m) return INVALID_HANDLE;
    delete m;
    return SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    if (!f || !m || !name) return INVALID_VALUE;
    const ftemu::Kernel* k = ftemu::find_kernel(name);
    if (!k) return NOT_FOUND;
    *f = k;
    return SUCCESS;
}
CUresult cuFuncGetAttribute(int* value, int, CUfunction f) {
    if (!value || !f) return INVALID_VALUE;
    *value = 0;
    return SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, int, int) { return f ? SUCCESS : INVALID_HANDLE; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared_bytes, CUstream, void** params,
                        void** extra) {
    if (!f) return INVALID_HANDLE;
    if (extra || shared_bytes != 0) return NOT_SUPPORTED;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 ||
        (unsigned long long)bx * by * bz > 1024)
        return INVALID_VALUE;
    const char* error = ftemu::launch(f, gx, gy, gz, bx, by, bz, params);
    if (error) {
        last_launch_error = error;
        fprintf(stderr, "ferrotron CUDA emulator: %s\n", error);
        return LAUNCH_FAILED;
    }
    return SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return INVALID_VALUE;
    switch (e) {
    case SUCCESS: *s = "CUDA_SUCCESS"; break;
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
    case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
    case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    if (!s) return INVALID_VALUE;
    if (e == LAUNCH_FAILED && !last_launch_error.empty()) {
        *s = last_launch_error.c_str();
        return SUCCESS;
    }
    return cuGetErrorName(e, s);
}

} // extern "C"
