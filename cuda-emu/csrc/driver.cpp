// driver.cpp: the part of the CUDA driver API that cudarc calls for ferrotron's CUDA backend,
// on the CPU, built as `libcuda.so` (see build.rs). Eight emulated devices ("ferrotron CPU
// emulator", compute capability 9.0, 4 SMs each, so that `ferrotron launch` can give each
// process its own ordinal) that share one memory: device memory is host memory.
//
// Streams are asynchronous, as a GPU's: work queued on a stream (kernel launches, copies into
// device memory, memsets, frees, cuBLAS GEMMs through `ftemu_stream_enqueue`) runs in stream
// order, at a time FTEMU_SCHEDULE chooses:
// * `lazy` (the default): only when something needs it: a synchronization of the stream, of an
//   event recorded on it or of the context; a copy back to the host; a stream that waits on one
//   of its events reaching that wait; an NCCL call on it. A reader on one stream that does not
//   wait for a writer on another runs first and reads the unwritten buffer (NaN, below);
// * `peers`: queuing work on a stream first runs everything queued on every other stream, so a
//   buffer freed (or overwritten) on one stream is gone before a reader queued later on another
//   stream runs, unless that reader waited for it properly;
// * `eager`: every operation runs when it is queued.
// The tests run under `lazy` and `peers`: between them, a missing wait either way shows.
//
// What else it checks that a GPU would not report as clearly:
// * fresh allocations are filled with 0xFF bytes (a NaN in f32 and bf16), and freed ones too
//   (kept from reuse for a while), so a kernel that leaves an output element unwritten, or a
//   read of a freed buffer, shows up as NaN in the results;
// * every copy and memset must lie inside one live allocation (CUDA_ERROR_INVALID_VALUE);
// * cuModuleGetFunction finds kernels by name among those compiled from the sources; the
//   module image NVRTC produced is not executed (it only has to exist);
// * a kernel launch that deadlocks (a barrier not every thread reaches) fails with
//   CUDA_ERROR_LAUNCH_FAILED, sticky as on a GPU (every later synchronization fails too), and
//   cuGetErrorString's text for it names the kernel.

#include "kernel_emu.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct Handle* CUcontext;
typedef struct Handle* CUstream;
typedef struct Handle* CUevent;
typedef struct Handle* CUmodule;
typedef const ftemu::Kernel* CUfunction;
typedef struct Handle* CUmemoryPool;

struct Handle {
    int kind;
};

namespace {

// A stream: the operations queued on it and not yet run, and how many were queued and run.
struct Stream : Handle {
    std::deque<std::function<void()>> queue;
    uint64_t queued = 0;
    uint64_t done = 0;
};

// An event: the stream it was last recorded on and how much of that stream it marks.
struct Event : Handle {
    Stream* stream = nullptr;
    uint64_t mark = 0;
};

} // namespace

namespace {

enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_HANDLE = 400,
    NOT_READY = 600,
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

// Queues and runs stream work (recursive: running a wait runs another stream's work).
std::recursive_mutex queues_lock;
Stream null_stream; // CUstream 0
std::vector<Stream*> all_streams{&null_stream}; // never freed: a wait may still name one
std::string sticky_error;                        // the first failed launch, under queues_lock
thread_local std::string last_launch_error;

enum Schedule { kLazy, kPeers, kEager };

Schedule schedule() {
    static const Schedule s = [] {
        const char* v = getenv("FTEMU_SCHEDULE");
        if (v && strcmp(v, "peers") == 0) return kPeers;
        if (v && strcmp(v, "eager") == 0) return kEager;
        if (v && *v && strcmp(v, "lazy") != 0)
            fprintf(stderr, "ferrotron CUDA emulator: FTEMU_SCHEDULE=%s: using lazy\n", v);
        return kLazy;
    }();
    return s;
}

Stream* stream_of(CUstream s) { return s ? static_cast<Stream*>(s) : &null_stream; }

// Runs `s`'s queued work up to `mark` operations in all. Under queues_lock.
void run_until(Stream* s, uint64_t mark) {
    while (s->done < mark && !s->queue.empty()) {
        std::function<void()> op = std::move(s->queue.front());
        s->queue.pop_front();
        ++s->done;
        op();
    }
}

void run_all(Stream* s) { run_until(s, s->queued); }

// Queues `op` on `s` as the schedule says. Under queues_lock.
void enqueue(Stream* s, std::function<void()> op) {
    switch (schedule()) {
    case kPeers:
        for (Stream* other : all_streams) {
            if (other != s) run_all(other);
        }
        break;
    case kEager:
        run_all(s);
        ++s->queued;
        ++s->done;
        op();
        return;
    case kLazy:
        break;
    }
    ++s->queued;
    s->queue.push_back(std::move(op));
}

CUresult sticky() { return sticky_error.empty() ? 0 : 719; }

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

// Freed blocks wait here, poisoned, before going back to the C allocator (which would reuse
// them at once): a read after the free reads NaN, not whatever was allocated there next.
std::deque<std::pair<void*, size_t>> quarantine;
size_t quarantined = 0;
constexpr size_t kQuarantineBytes = size_t(256) << 20;

CUresult release(CUdeviceptr ptr) {
    size_t bytes;
    std::lock_guard<std::mutex> g(allocations_lock);
    auto it = allocations.find((uintptr_t)ptr);
    if (it == allocations.end()) return INVALID_VALUE;
    bytes = it->second;
    allocations.erase(it);
    memset((void*)(uintptr_t)ptr, 0xFF, bytes);
    quarantine.emplace_back((void*)(uintptr_t)ptr, bytes);
    quarantined += bytes;
    while (quarantined > kQuarantineBytes && !quarantine.empty()) {
        free(quarantine.front().first);
        quarantined -= quarantine.front().second;
        quarantine.pop_front();
    }
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

// A device's default memory pool (cuMemAllocAsync's): only its release threshold is kept, for
// the runtime to set and a test to read back; memory is host memory either way.
struct Pool {
    Handle handle{5};
    unsigned long long release_threshold = 0;
};
Pool pools[kDevices];
constexpr int kReleaseThreshold = 4; // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD

Pool* pool_of(CUmemoryPool p) {
    for (Pool& pool : pools) {
        if (&pool.handle == p) return &pool;
    }
    return nullptr;
}

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

CUresult cuCtxSynchronize() {
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    for (Stream* st : all_streams) run_all(st);
    return sticky();
}

// Streams and events.
CUresult cuStreamCreate(CUstream* s, unsigned) {
    if (!s) return INVALID_VALUE;
    auto* st = new Stream();
    st->kind = 2;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    all_streams.push_back(st);
    *s = st;
    return SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) {
    return cuStreamCreate(s, flags);
}
CUresult cuStreamDestroy_v2(CUstream s) {
    if (!s || s->kind != 2) return INVALID_HANDLE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    run_all(stream_of(s)); // its work still completes; the object stays (waits may name it)
    return SUCCESS;
}
CUresult cuStreamSynchronize(CUstream s) {
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    run_all(stream_of(s));
    return sticky();
}
CUresult cuStreamQuery(CUstream s) { return cuStreamSynchronize(s); }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
    if (!e || e->kind != 3) return INVALID_HANDLE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    Event* ev = static_cast<Event*>(e);
    Stream* other = ev->stream;
    uint64_t mark = ev->mark;
    if (other) enqueue(stream_of(s), [other, mark] { run_until(other, mark); });
    return SUCCESS;
}

CUresult cuEventCreate(CUevent* e, unsigned) {
    if (!e) return INVALID_VALUE;
    auto* ev = new Event();
    ev->kind = 3;
    *e = ev;
    return SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
    if (!e || e->kind != 3) return INVALID_HANDLE;
    delete static_cast<Event*>(e);
    return SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream s) {
    if (!e || e->kind != 3) return INVALID_HANDLE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    Event* ev = static_cast<Event*>(e);
    ev->stream = stream_of(s);
    ev->mark = ev->stream->queued;
    return SUCCESS;
}
CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(CUevent e) {
    if (!e || e->kind != 3) return INVALID_HANDLE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    Event* ev = static_cast<Event*>(e);
    if (ev->stream) run_until(ev->stream, ev->mark);
    return sticky();
}
// A query only reports: it never runs the stream's queued work, so a watchdog thread polling
// an event does not execute a rank's kernels on its own thread.
CUresult cuEventQuery(CUevent e) {
    if (!e || e->kind != 3) return INVALID_HANDLE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    Event* ev = static_cast<Event*>(e);
    if (ev->stream && ev->stream->done < ev->mark) return NOT_READY;
    return sticky();
}
CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
    if (!ms) return INVALID_VALUE;
    *ms = 0.0f;
    return SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    return cuEventElapsedTime(ms, a, b);
}

// Memory: allocations happen at once; copies into device memory, memsets and frees are queued
// (a copy's host bytes are taken at once, as CUDA stages pageable memory); a copy to the host
// first runs the stream's queued work.
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return allocate(p, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return allocate(p, bytes); }
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice d) {
    if (d < 0 || d >= kDevices) return INVALID_DEVICE;
    if (!pool) return INVALID_VALUE;
    *pool = &pools[d].handle;
    return SUCCESS;
}
CUresult cuMemPoolSetAttribute(CUmemoryPool p, int attr, void* value) {
    Pool* pool = pool_of(p);
    if (!pool || !value || attr != kReleaseThreshold) return INVALID_VALUE;
    pool->release_threshold = *static_cast<unsigned long long*>(value);
    return SUCCESS;
}
CUresult cuMemPoolGetAttribute(CUmemoryPool p, int attr, void* value) {
    Pool* pool = pool_of(p);
    if (!pool || !value || attr != kReleaseThreshold) return INVALID_VALUE;
    *static_cast<unsigned long long*>(value) = pool->release_threshold;
    return SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    cuCtxSynchronize();
    return release(p);
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    if (!inside(p, 0)) return INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    enqueue(stream_of(s), [p] { release(p); });
    return SUCCESS;
}

CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    if (!p) return INVALID_VALUE;
    *p = malloc(bytes == 0 ? 1 : bytes);
    return *p ? SUCCESS : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) {
    free(p);
    return SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    if (n == 0) return SUCCESS;
    if (!inside(dst, n) || !src) return INVALID_VALUE;
    auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                      static_cast<const char*>(src) + n);
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    enqueue(stream_of(s), [dst, staged] {
        memcpy((void*)(uintptr_t)dst, staged->data(), staged->size());
    });
    return SUCCESS;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    CUresult r = cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
    return r == SUCCESS ? cuCtxSynchronize() : r;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    if (n == 0) return SUCCESS;
    if (!inside(src, n) || !dst) return INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    run_all(stream_of(s));
    memcpy(dst, (const void*)(uintptr_t)src, n);
    return sticky();
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    cuCtxSynchronize();
    return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    if (n == 0) return SUCCESS;
    if (!inside(dst, n) || !inside(src, n)) return INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    enqueue(stream_of(s), [dst, src, n] {
        memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    });
    return SUCCESS;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult r = cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
    return r == SUCCESS ? cuCtxSynchronize() : r;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    if (n == 0) return SUCCESS;
    if (!inside(dst, n)) return INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    enqueue(stream_of(s), [dst, v, n] { memset((void*)(uintptr_t)dst, v, n); });
    return SUCCESS;
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    CUresult r = cuMemsetD8Async(dst, v, n, nullptr);
    return r == SUCCESS ? cuCtxSynchronize() : r;
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
                        unsigned by, unsigned bz, unsigned shared_bytes, CUstream s, void** params,
                        void** extra) {
    if (!f) return INVALID_HANDLE;
    if (extra || shared_bytes != 0) return NOT_SUPPORTED;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 ||
        (unsigned long long)bx * by * bz > 1024)
        return INVALID_VALUE;
    if (f->params > 0 && !params) return INVALID_VALUE;
    // The arguments are copied now (kernelParams point at the caller's variables), each at a
    // 16-byte aligned offset.
    std::vector<size_t> offsets;
    size_t total = 0;
    for (unsigned i = 0; i < f->params; ++i) {
        offsets.push_back(total);
        total += (f->sizes[i] + 15) / 16 * 16;
    }
    auto blob = std::make_shared<std::vector<std::max_align_t>>(
        (total + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t) + 1);
    char* base = reinterpret_cast<char*>(blob->data());
    for (unsigned i = 0; i < f->params; ++i) memcpy(base + offsets[i], params[i], f->sizes[i]);
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    if (!sticky_error.empty()) return LAUNCH_FAILED;
    enqueue(stream_of(s), [=] {
        if (!sticky_error.empty()) return; // the context is broken, as on a GPU
        std::vector<void*> args(f->params);
        char* b = reinterpret_cast<char*>(blob->data());
        for (unsigned i = 0; i < f->params; ++i) args[i] = b + offsets[i];
        const char* error = ftemu::launch(f, gx, gy, gz, bx, by, bz, args.data());
        if (error) {
            sticky_error = error;
            fprintf(stderr, "ferrotron CUDA emulator: %s\n", error);
        }
    });
    return sticky();
}

// For the stand-in cuBLAS (cublas.cpp): queues `run(arg)` on stream `s` like a kernel; `run`
// owns `arg`. And for the stand-in NCCL (nccl.cpp): runs `s`'s queued work now.
void ftemu_stream_enqueue(CUstream s, void (*run)(void*), void* arg) {
    std::lock_guard<std::recursive_mutex> g(queues_lock);
    enqueue(stream_of(s), [run, arg] { run(arg); });
}

CUresult ftemu_stream_run(CUstream s) { return cuStreamSynchronize(s); }

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
    {
        std::lock_guard<std::recursive_mutex> g(queues_lock);
        last_launch_error = sticky_error;
    }
    if (e == LAUNCH_FAILED && !last_launch_error.empty()) {
        *s = last_launch_error.c_str();
        return SUCCESS;
    }
    return cuGetErrorName(e, s);
}

} // extern "C"
