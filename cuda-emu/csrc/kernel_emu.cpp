// kernel_emu.cpp: the kernel-execution engine of the CUDA emulator: a launch's blocks one at a
// time, each block's threads as fibers on the calling OS thread. Semantics in kernel_emu.h.
//
// How it runs a block: the scheduler (`run_block`, on the caller's stack) resumes fibers until
// every thread has exited. A fiber (`fiber_main`) starts the block's next unstarted thread and
// runs it until it exits (then starts the next one) or waits at a barrier (then switches back
// to the scheduler, and becomes that thread's until it exits). The last thread to arrive at a
// barrier marks the waiters ready and goes on; the scheduler resumes ready threads in the order
// they were released. Nothing ready and nothing left to start: the block is done, or deadlocked.

#include "kernel_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <deque>
#include <mutex>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>

namespace ftemu {

Dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

constexpr size_t kStackSize = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;

// Where a thread of the running block is.
enum State : unsigned char { kUnstarted, kRunning, kReady, kAtSync, kAtShuffle, kExited };
static_assert(sizeof(State) == 1, "state[] is reset with memset");

// Clang lowers __builtin_setjmp on x86 only (among the targets that matter): elsewhere the
// switches are swapcontext's.
#if defined(__clang__) && !defined(__x86_64__) && !defined(FTEMU_UCONTEXT_SWITCH)
#define FTEMU_UCONTEXT_SWITCH
#endif

struct Fiber {
    ucontext_t ctx; // how it starts (and where it was suspended, with FTEMU_UCONTEXT_SWITCH)
    void* jb[5];    // where it was suspended (__builtin_setjmp's buffer)
    char* stack;
    bool fresh; // it must start anew (new, or abandoned by an aborted launch)
};

struct Warp {
    int size;    // lanes that exist (32 but in a last, partial warp)
    int arrived; // lanes at the current shuffle barrier
    int phase;   // which slot buffer the current barrier's values go to
    uint64_t slot[2][32];
};

struct Engine {
    std::mutex mutex;
    void* sched_jb[5]; // the scheduler's context (on the launching thread's own stack)
    ucontext_t sched_uc; // the same, with FTEMU_UCONTEXT_SWITCH
    std::vector<Fiber*> fibers;
    std::vector<Fiber*> idle; // fibers with no thread, parked in fiber_main's loop

    // The launch.
    const Kernel* kernel;
    void** args;
    Dim3 coords[kMaxThreads]; // threadIdx of each linear thread id
    std::string error;        // set by a fiber that aborts the launch

    // The block.
    int n;          // threads
    int next;       // the next thread to start
    int exited;     // threads that have returned
    int at_sync;    // threads waiting at __syncthreads()
    int cur;        // the running thread
    Fiber* cur_fiber;
    State state[kMaxThreads];
    Fiber* fiber_of[kMaxThreads];
    Warp warps[kMaxWarps];
    int ready[kMaxThreads]; // a FIFO ring of released threads (each is in it at most once)
    int ready_head, ready_count;
};

Engine E;

std::deque<Kernel>& registry() {
    static std::deque<Kernel> kernels; // a deque: pointers stay valid as it grows
    return kernels;
}

// Makes thread t the running one.
void enter(int t) {
    E.cur = t;
    threadIdx = E.coords[t];
}

void make_ready(int t) {
    E.state[t] = kReady;
    E.ready[(E.ready_head + E.ready_count++) % kMaxThreads] = t;
}

// Context switches. A fiber starts through ucontext (makecontext, setcontext); after that, switches
// are __builtin_setjmp / __builtin_longjmp: a function that calls __builtin_setjmp saves every
// callee-saved register in its frame and restores them when it returns, so the buffer only
// holds the frame, stack pointer and resume address. Unlike swapcontext, no system call (the
// signal mask) a switch: a block of 256 threads in softmax (24 waits each) runs 6-7 times
// faster. The switching functions must be opaque to the optimizer (noipa): with
// interprocedural register allocation, GCC would keep a caller's values in call-clobbered
// registers it knows the callee leaves alone, across a switch.
#if defined(__clang__)
#define FTEMU_OPAQUE __attribute__((noinline))
#else
#define FTEMU_OPAQUE __attribute__((noipa))
#endif

void fiber_main();

void make_fiber_context(Fiber* f) {
    f->fresh = false;
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack;
    f->ctx.uc_stack.ss_size = kStackSize;
    f->ctx.uc_link = nullptr; // fiber_main never returns
    makecontext(&f->ctx, fiber_main, 0);
}

#ifndef FTEMU_UCONTEXT_SWITCH

FTEMU_OPAQUE void jump(void** jb) { __builtin_longjmp(jb, 1); }

// From the scheduler: runs fiber f until it suspends.
FTEMU_OPAQUE void resume(Fiber* f) {
    E.cur_fiber = f;
    if (__builtin_setjmp(E.sched_jb) == 0) {
        if (f->fresh) {
            make_fiber_context(f);
            setcontext(&f->ctx);
        }
        jump(f->jb);
    }
}

// From the running fiber: back to the scheduler until resumed.
FTEMU_OPAQUE void suspend() {
    if (__builtin_setjmp(E.cur_fiber->jb) == 0) {
        jump(E.sched_jb);
    }
}

#else

FTEMU_OPAQUE void resume(Fiber* f) {
    E.cur_fiber = f;
    if (f->fresh) {
        make_fiber_context(f);
    }
    swapcontext(&E.sched_uc, &f->ctx);
}

FTEMU_OPAQUE void suspend() { swapcontext(&E.cur_fiber->ctx, &E.sched_uc); }

#endif

// Suspends the running thread, waiting in state s, until the scheduler resumes it.
void wait_as(State s) {
    int t = E.cur;
    E.state[t] = s;
    suspend();
    enter(t);
}

std::string where() {
    char buf[160];
    snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u) of grid (%u,%u,%u) x block (%u,%u,%u)",
             E.kernel->name, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, gridDim.z,
             blockDim.x, blockDim.y, blockDim.z);
    return buf;
}

// Aborts the launch from the running thread: back to the scheduler, never resumed.
[[noreturn]] void fail(const std::string& message) {
    E.error = message;
    suspend();
    abort(); // unreachable: an aborted fiber is made afresh before it is used again
}

void fiber_main() {
    Fiber* self = E.cur_fiber;
    for (;;) {
        while (E.next < E.n) {
            int t = E.next++;
            E.fiber_of[t] = self;
            E.state[t] = kRunning;
            enter(t);
            E.kernel->call(E.kernel->fn, E.args);
            E.state[t] = kExited;
            E.exited++;
        }
        E.idle.push_back(self);
        suspend();
    }
}

Fiber* take_idle_fiber() {
    Fiber* f;
    if (!E.idle.empty()) {
        f = E.idle.back();
        E.idle.pop_back();
    } else {
        void* p = mmap(nullptr, kStackSize, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
        if (p == MAP_FAILED) {
            return nullptr;
        }
        mprotect(p, 4096, PROT_NONE); // a guard page: an overflow faults instead of corrupting
        f = new Fiber();
        f->stack = static_cast<char*>(p);
        f->fresh = true;
        E.fibers.push_back(f);
    }
    return f;
}

// Runs the current block (blockIdx set); false with E.error set when it fails.
bool run_block() {
    int n = E.n;
    E.next = 0;
    E.exited = 0;
    E.at_sync = 0;
    E.ready_head = 0;
    E.ready_count = 0;
    memset(E.state, kUnstarted, n); // none left over from an aborted launch
    for (int w = 0; w * 32 < n; ++w) {
        E.warps[w].size = n - w * 32 < 32 ? n - w * 32 : 32;
        E.warps[w].arrived = 0;
        E.warps[w].phase = 0;
    }
    for (;;) {
        Fiber* f;
        if (E.ready_count > 0) {
            int t = E.ready[E.ready_head];
            E.ready_head = (E.ready_head + 1) % kMaxThreads;
            E.ready_count--;
            E.state[t] = kRunning;
            f = E.fiber_of[t];
        } else if (E.next < n) {
            f = take_idle_fiber();
            if (f == nullptr) {
                E.error = where() + ": cannot map a fiber stack";
                return false;
            }
        } else {
            break;
        }
        resume(f);
        if (!E.error.empty()) {
            return false;
        }
    }
    if (E.exited == n) {
        return true;
    }
    int at_shuffle = 0;
    for (int t = 0; t < n; ++t) {
        at_shuffle += E.state[t] == kAtShuffle;
    }
    char buf[200];
    snprintf(buf, sizeof buf,
             ": deadlock: %d of %d threads wait at __syncthreads(), %d at a warp shuffle, %d have "
             "exited (a barrier or shuffle not reached by every thread of the block or warp)",
             E.at_sync, n, at_shuffle, E.exited);
    E.error = where() + buf;
    return false;
}

// After a failed block: every fiber that holds a thread is abandoned (its stack is just
// reused: kernels hold no resources), so all are made afresh and idle.
void reset_fibers() {
    E.idle.clear();
    for (Fiber* f : E.fibers) {
        f->fresh = true;
        E.idle.push_back(f);
    }
}

} // namespace

void register_kernel(const char* name, void* fn, void (*call)(void*, void**),
                     const unsigned* sizes, unsigned params) {
    if (find_kernel(name) == nullptr) {
        registry().push_back(Kernel{name, fn, call, sizes, params});
    }
}

const Kernel* find_kernel(const char* name) {
    for (const Kernel& k : registry()) {
        if (strcmp(k.name, name) == 0) {
            return &k;
        }
    }
    return nullptr;
}

const char* launch(const Kernel* k, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                   unsigned by, unsigned bz, void** args) {
    static thread_local std::string message;
    char buf[200];
    if (k == nullptr) {
        return "ftemu: launch of a null kernel";
    }
    unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || threads == 0 || threads > kMaxThreads) {
        snprintf(buf, sizeof buf,
                 "ftemu: kernel %s: bad launch shape: grid (%u,%u,%u) x block (%u,%u,%u) (each "
                 "at least 1, at most %d threads a block)",
                 k->name, gx, gy, gz, bx, by, bz, kMaxThreads);
        message = buf;
        return message.c_str();
    }
    std::lock_guard<std::mutex> lock(E.mutex);
    E.kernel = k;
    E.args = args;
    E.n = (int)threads;
    for (unsigned t = 0; t < threads; ++t) {
        E.coords[t] = Dim3{t % bx, t / bx % by, t / (bx * by)};
    }
    gridDim = Dim3{gx, gy, gz};
    blockDim = Dim3{bx, by, bz};
    for (unsigned z = 0; z < gz; ++z) {
        for (unsigned y = 0; y < gy; ++y) {
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = Dim3{x, y, z};
                if (!run_block()) {
                    message = "ftemu: " + E.error;
                    E.error.clear();
                    reset_fibers();
                    return message.c_str();
                }
            }
        }
    }
    return nullptr;
}

void sync_block() {
    if (++E.at_sync < E.n) {
        wait_as(kAtSync);
        return;
    }
    // The last to arrive releases the others and goes on.
    E.at_sync = 0;
    for (int t = 0; t < E.n; ++t) {
        if (E.state[t] == kAtSync) {
            make_ready(t);
        }
    }
}

int lane_id() { return E.cur & 31; }

uint64_t shuffle(uint64_t v, int src) {
    int t = E.cur;
    int w = t >> 5;
    Warp& warp = E.warps[w];
    int b = warp.phase;
    warp.slot[b][t & 31] = v;
    if (++warp.arrived < warp.size) {
        wait_as(kAtShuffle);
    } else {
        // The last lane to arrive releases the others; the next barrier's values go to the
        // other buffer, which every lane has finished reading (it has arrived here since).
        warp.arrived = 0;
        warp.phase = b ^ 1;
        int end = w * 32 + warp.size;
        for (int u = w * 32; u < end; ++u) {
            if (E.state[u] == kAtShuffle) {
                make_ready(u);
            }
        }
    }
    if (src < 0) {
        return v;
    }
    if (src >= warp.size) {
        char buf[120];
        snprintf(buf, sizeof buf, ": thread %d (lane %d of warp %d) shuffles from lane %d, which "
                 "does not exist (a partial warp)", t, t & 31, w, src);
        fail(where() + buf);
    }
    return warp.slot[b][src];
}

} // namespace ftemu
