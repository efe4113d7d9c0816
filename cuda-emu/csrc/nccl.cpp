// nccl.cpp: the NCCL calls cudarc's `Comm` makes for ferrotron's one-rank-per-process groups,
// on the CPU, built as `libnccl.so` (see build.rs), so that `ferrotron launch ... --backend cuda`
// runs its ranks as processes on the emulated device with their collectives between processes.
//
// A communicator is a directory entry in /dev/shm (or the temporary directory): the unique id
// carries its name. Its control block (`<name>.ctl`, mmap'd by every member) holds a reusable
// barrier; each collective has every member write its send buffer to `<name>.<rank>`, meet at
// the barrier, read every member's buffer and compute its own result (reductions in rank order,
// so every member gets the same bits), and meet again before the files are reused. Device
// pointers are host pointers (driver.cpp); a collective first runs the work queued on its stream
// (the stand-in driver's streams are lazy), then completes before it returns. A member that does not arrive within FTEMU_NCCL_TIMEOUT seconds
// (default 120) fails the collective with ncclSystemError; ncclCommAbort makes the peers' waits
// fail at once.

#include "bf16.h"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <random>
#include <sched.h>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <vector>

typedef int ncclResult_t;

// The stand-in driver (driver.cpp): runs a stream's queued work.
extern "C" int ftemu_stream_run(void* stream);

namespace {

enum : int {
    kSuccess = 0,
    kSystemError = 2,
    kInternalError = 3,
    kInvalidArgument = 4,
    kRemoteError = 6,
};
enum : int { kSum = 0, kProd = 1, kMax = 2, kMin = 3 };
enum : int { kInt32 = 2, kFloat32 = 7, kFloat64 = 8, kBfloat16 = 9 };

struct Control {
    std::atomic<unsigned> arrived;
    std::atomic<unsigned> generation;
    std::atomic<int> members; // joined and not yet destroyed
    std::atomic<int> aborted;
};
static_assert(std::atomic<unsigned>::is_always_lock_free, "process-shared atomics");

thread_local std::string last_error;

std::string directory() {
    struct stat st;
    if (stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode)) return "/dev/shm";
    const char* tmp = getenv("TMPDIR");
    return tmp && *tmp ? tmp : "/tmp";
}

double timeout_seconds() {
    const char* t = getenv("FTEMU_NCCL_TIMEOUT");
    double s = t ? atof(t) : 0.0;
    return s > 0.0 ? s : 120.0;
}

size_t element_size(int type) {
    switch (type) {
    case kInt32: return 4;
    case kFloat32: return 4;
    case kFloat64: return 8;
    case kBfloat16: return 2;
    default: return 0;
    }
}

double load(const void* p, int type, size_t i) {
    switch (type) {
    case kInt32: return static_cast<const int32_t*>(p)[i];
    case kFloat32: return static_cast<const float*>(p)[i];
    case kFloat64: return static_cast<const double*>(p)[i];
    default: return ftemu::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    }
}

void store(void* p, int type, size_t i, double v) {
    switch (type) {
    case kInt32: static_cast<int32_t*>(p)[i] = int32_t(v); return;
    case kFloat32: static_cast<float*>(p)[i] = float(v); return;
    case kFloat64: static_cast<double*>(p)[i] = v; return;
    default: static_cast<uint16_t*>(p)[i] = ftemu::f32_to_bf16(float(v)); return;
    }
}

// One step of a reduction in the operands' own precision (f32 for f32 and bf16, as NCCL).
double combine(int op, int type, double acc, double v) {
    double r;
    switch (op) {
    case kSum: r = acc + v; break;
    case kProd: r = acc * v; break;
    case kMax: r = v > acc ? v : acc; break;
    default: r = v < acc ? v : acc; break;
    }
    return type == kFloat64 ? r : double(float(r));
}

} // namespace

struct ncclComm {
    int rank;
    int size;
    std::string name; // path prefix of the communicator's files
    Control* control;
};
typedef ncclComm* ncclComm_t;

struct ncclUniqueId {
    char internal[128];
};

namespace {

ncclResult_t fail(int code, const std::string& why) {
    last_error = why;
    fprintf(stderr, "ferrotron NCCL stand-in: %s\n", why.c_str());
    return code;
}

// Every member arrives before any leaves.
ncclResult_t barrier(ncclComm* c) {
    Control* k = c->control;
    unsigned gen = k->generation.load();
    if (k->arrived.fetch_add(1) + 1 == unsigned(c->size)) {
        k->arrived.store(0);
        k->generation.fetch_add(1);
        return kSuccess;
    }
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::duration<double>(timeout_seconds());
    for (unsigned spin = 0; k->generation.load() == gen; ++spin) {
        if (k->aborted.load()) return fail(kRemoteError, "a peer aborted the communicator");
        if (spin > 1000) {
            std::this_thread::sleep_for(std::chrono::microseconds(50));
            if (std::chrono::steady_clock::now() > deadline)
                return fail(kSystemError, "a peer did not arrive at a collective in time");
        } else {
            sched_yield();
        }
    }
    return kSuccess;
}

std::string data_file(const ncclComm* c, int rank) {
    return c->name + "." + std::to_string(rank);
}

ncclResult_t publish(ncclComm* c, const void* buf, size_t bytes) {
    std::string path = data_file(c, c->rank);
    int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0) return fail(kSystemError, path + ": " + strerror(errno));
    const char* p = static_cast<const char*>(buf);
    size_t done = 0;
    while (done < bytes) {
        ssize_t w = write(fd, p + done, bytes - done);
        if (w <= 0) {
            close(fd);
            return fail(kSystemError, path + ": " + strerror(errno));
        }
        done += size_t(w);
    }
    close(fd);
    return kSuccess;
}

ncclResult_t fetch(const ncclComm* c, int rank, std::vector<char>& out, size_t bytes) {
    std::string path = data_file(c, rank);
    int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) return fail(kSystemError, path + ": " + strerror(errno));
    out.resize(bytes);
    size_t done = 0;
    while (done < bytes) {
        ssize_t r = pread(fd, out.data() + done, bytes - done, off_t(done));
        if (r <= 0) {
            close(fd);
            return fail(kInternalError, path + ": a peer sent a shorter buffer");
        }
        done += size_t(r);
    }
    close(fd);
    return kSuccess;
}

// The shared shape of every collective: publish, meet, read all, compute, meet.
template <typename F>
ncclResult_t collective(ncclComm* c, void* stream, const void* send, size_t send_bytes,
                        F compute) {
    if (!c) return fail(kInvalidArgument, "no communicator");
    if (ftemu_stream_run(stream) != 0) return fail(kSystemError, "the stream's work failed");
    if (c->control->aborted.load()) return fail(kRemoteError, "the communicator was aborted");
    ncclResult_t r = publish(c, send, send_bytes);
    if (r == kSuccess) r = barrier(c);
    if (r != kSuccess) return r;
    std::vector<std::vector<char>> all(size_t(c->size));
    for (int i = 0; i < c->size; ++i) {
        r = fetch(c, i, all[size_t(i)], send_bytes);
        if (r != kSuccess) return r;
    }
    compute(all);
    return barrier(c);
}

} // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* v) {
    if (!v) return kInvalidArgument;
    *v = 22800;
    return kSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return kInvalidArgument;
    std::random_device rd;
    memset(id->internal, 0, sizeof id->internal);
    snprintf(id->internal, sizeof id->internal, "%s/ftemu-nccl-%d-%08x%08x", directory().c_str(),
             int(getpid()), rd(), rd());
    return kSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* out, int size, ncclUniqueId id, int rank) {
    if (!out || size < 1 || rank < 0 || rank >= size) return kInvalidArgument;
    std::string name(id.internal, strnlen(id.internal, sizeof id.internal));
    if (name.find("ftemu-nccl-") == std::string::npos)
        return fail(kInvalidArgument, "not a unique id of this stand-in");
    std::string ctl = name + ".ctl";
    int fd = open(ctl.c_str(), O_CREAT | O_RDWR, 0600);
    if (fd < 0) return fail(kSystemError, ctl + ": " + strerror(errno));
    if (ftruncate(fd, sizeof(Control)) != 0) {
        close(fd);
        return fail(kSystemError, ctl + ": " + strerror(errno));
    }
    void* m = mmap(nullptr, sizeof(Control), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return fail(kSystemError, ctl + ": " + strerror(errno));
    auto* c = new ncclComm{rank, size, name, static_cast<Control*>(m)};
    c->control->members.fetch_add(1);
    ncclResult_t r = barrier(c); // every member has joined
    if (r != kSuccess) {
        munmap(m, sizeof(Control));
        delete c;
        return r;
    }
    *out = c;
    return kSuccess;
}

static ncclResult_t release(ncclComm_t c) {
    if (!c) return kInvalidArgument;
    unlink(data_file(c, c->rank).c_str());
    if (c->control->members.fetch_sub(1) == 1) unlink((c->name + ".ctl").c_str());
    munmap(c->control, sizeof(Control));
    delete c;
    return kSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t c) { return release(c); }
ncclResult_t ncclCommFinalize(ncclComm_t c) { return c ? kSuccess : kInvalidArgument; }
ncclResult_t ncclCommAbort(ncclComm_t c) {
    if (!c) return kInvalidArgument;
    c->control->aborted.store(1);
    return release(c);
}

ncclResult_t ncclCommCount(const ncclComm_t c, int* n) {
    if (!c || !n) return kInvalidArgument;
    *n = c->size;
    return kSuccess;
}
ncclResult_t ncclCommUserRank(const ncclComm_t c, int* r) {
    if (!c || !r) return kInvalidArgument;
    *r = c->rank;
    return kSuccess;
}
ncclResult_t ncclCommCuDevice(const ncclComm_t c, int* d) {
    if (!c || !d) return kInvalidArgument;
    *d = 0;
    return kSuccess;
}

ncclResult_t ncclGroupStart() { return kSuccess; }
ncclResult_t ncclGroupEnd() { return kSuccess; }

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int type, int op,
                           ncclComm_t c, void* stream) {
    size_t es = element_size(type);
    if (!es || op < kSum || op > kMin) return fail(kInvalidArgument, "unsupported type or op");
    return collective(c, stream, send, count * es, [&](const std::vector<std::vector<char>>& all) {
        for (size_t i = 0; i < count; ++i) {
            double acc = load(all[0].data(), type, i);
            for (size_t r = 1; r < all.size(); ++r)
                acc = combine(op, type, acc, load(all[r].data(), type, i));
            store(recv, type, i, acc);
        }
    });
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, int type, ncclComm_t c,
                           void* stream) {
    size_t es = element_size(type);
    if (!es) return fail(kInvalidArgument, "unsupported type");
    size_t bytes = count * es;
    return collective(c, stream, send, bytes, [&](const std::vector<std::vector<char>>& all) {
        for (size_t r = 0; r < all.size(); ++r)
            memcpy(static_cast<char*>(recv) + r * bytes, all[r].data(), bytes);
    });
}

ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t count, int type, int op,
                               ncclComm_t c, void* stream) {
    size_t es = element_size(type);
    if (!es || op < kSum || op > kMin) return fail(kInvalidArgument, "unsupported type or op");
    if (!c) return fail(kInvalidArgument, "no communicator");
    size_t first = size_t(c->rank) * count;
    return collective(c, stream, send, count * es * size_t(c->size),
                      [&](const std::vector<std::vector<char>>& all) {
                          for (size_t i = 0; i < count; ++i) {
                              double acc = load(all[0].data(), type, first + i);
                              for (size_t r = 1; r < all.size(); ++r)
                                  acc = combine(op, type, acc,
                                                load(all[r].data(), type, first + i));
                              store(recv, type, i, acc);
                          }
                      });
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int type, int root,
                           ncclComm_t c, void* stream) {
    size_t es = element_size(type);
    if (!es || !c || root < 0 || root >= c->size) return fail(kInvalidArgument, "bad broadcast");
    size_t bytes = count * es;
    return collective(c, stream, send, bytes, [&](const std::vector<std::vector<char>>& all) {
        memcpy(recv, all[size_t(root)].data(), bytes);
    });
}

const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case kSuccess: return "no error";
    case kSystemError: return "unhandled system error";
    case kInternalError: return "internal error";
    case kInvalidArgument: return "invalid argument";
    case kRemoteError: return "remote process exited or there was a network error";
    default: return "unknown result code";
    }
}

const char* ncclGetLastError(ncclComm_t) { return last_error.c_str(); }

} // extern "C"
