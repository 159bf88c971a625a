// cuda_emu.h -- runs the engine's own CUDA kernels (kernels/*.cu) on the CPU, compiled by
// g++ -std=c++20, so that `cargo test` checks every kernel against the CPU backend on machines
// without a GPU. build.rs includes this header at global scope, then each kernels/<family>.cu
// inside `namespace CUDA_EMU_NS::k_<family>` (same-named inline helpers of different families,
// or of the two execution modes, would otherwise be merged by the linker), then one
// `EMU_EXPORT(kernel)` per kernel, which defines the extern "C" launcher the Rust FFI calls.
//
// Two execution modes, one object file each:
//  * threads (default): one OS thread per CUDA thread of a block; `__syncthreads` is a
//    std::barrier, warp shuffles exchange through per-warp slots between two warp barriers.
//    The pool walks the grid one block at a time, because `__shared__` is a function-local
//    `static` (one copy per process): a per-kernel mutex serialises concurrent launches. This
//    mode has real concurrency inside a block, so it catches missing `__syncthreads` and
//    shared-memory races; run every reduction kernel in it.
//  * fibers (-DCUDA_EMU_FIBERS): a block's threads are fibers on one OS thread (own stack switch),
//    switched at barriers; `__shared__` is `static thread_local`, so blocks run in parallel on
//    a few worker threads. Much faster, but the fibers interleave only at barriers, which hides
//    missing barriers: it is the speed mode, not the race detector.
// Both: a thread that returns early leaves the block's barriers (as an exited GPU thread does);
// warp ops need every live lane of the warp (no partial masks); no grid sync, cooperative
// groups, textures or inline PTX; at most 1024 threads per block.
#pragma once
#define CUDA_EMU_H 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <pthread.h>
#include <thread>
#include <tuple>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#ifdef CUDA_EMU_FIBERS
#define __shared__ static thread_local
#define CUDA_EMU_NS cuda_emu_fibers
#else
#define __shared__ static
#define CUDA_EMU_NS cuda_emu_threads
#endif
#define __constant__ static const

// glibc declares __expf/__logf but libm exports no such symbols: calling them would fail to
// link and defining them fails to compile, so the fast intrinsics are macros over the exact ones.
#define __expf(x) ::expf(x)
#define __logf(x) ::logf(x)
#define __fdividef(a, b) ((a) / (b))

namespace CUDA_EMU_NS {

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {
[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s\n", what);
    std::abort();
}

#ifndef CUDA_EMU_FIBERS
// One block's synchronisation state (threads mode).
struct Block {
    unsigned nthreads = 0, nwarps = 0;
    std::optional<std::barrier<>> bar;
    std::unique_ptr<std::optional<std::barrier<>>[]> wbar;
    std::vector<uint64_t> slot;        // one shuffle slot per lane
    std::vector<max_align_t> dyn;      // dynamic shared memory
    void arm() {
        bar.emplace(nthreads);
        for (unsigned w = 0; w < nwarps; ++w) wbar[w].emplace(std::min(32u, nthreads - 32 * w));
    }
    void sync_block(unsigned) { bar->arrive_and_wait(); }
    void sync_warp(unsigned t) { wbar[t >> 5]->arrive_and_wait(); }
};
#else
// Fiber contexts. On x86-64 a switch saves the callee-saved registers on the current stack and
// swaps stack pointers (a dozen instructions); glibc's swapcontext also saves and restores the
// signal mask with a system call on every switch, which made it 90% of a kernel's run time.
// Elsewhere, ucontext.
#if defined(__x86_64__)
struct FiberCtx { void* sp = nullptr; };
__attribute__((naked, noinline)) static void fiber_switch_sp(void** /*save*/, void* /*to*/) {
    asm volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
inline void fiber_switch(FiberCtx& from, FiberCtx& to) { fiber_switch_sp(&from.sp, to.sp); }
// A fresh stack whose first switch "returns" into entry() with the ABI's call alignment.
inline void fiber_make(FiberCtx& c, char* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + bytes)) & ~(uintptr_t)15;
    void** ret = (void**)(top - 16);          // 16-aligned: after `ret`, rsp = 8 mod 16
    *ret = (void*)entry;
    void** sp = ret - 6;                       // r15 r14 r13 r12 rbx rbp, popped as zeros
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    c.sp = sp;
}
#else
struct FiberCtx { ucontext_t uc; };
inline void fiber_switch(FiberCtx& from, FiberCtx& to) { swapcontext(&from.uc, &to.uc); }
inline void fiber_make(FiberCtx& c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif
// A counting barrier for fibers: waiting = yielding to the scheduler until the generation moves.
struct FiberBarrier { unsigned expected = 0, arrived = 0; uint64_t gen = 0; };
struct Block {
    unsigned nthreads = 0, nwarps = 0, current = 0, live = 0;
    FiberBarrier bar;
    std::vector<FiberBarrier> wbar;
    std::vector<uint64_t> slot;
    std::vector<max_align_t> dyn;
    std::vector<FiberCtx> ctx;
    FiberCtx scheduler;
    std::vector<unsigned char> finished;
    std::unique_ptr<char[]> stacks;
    size_t stack_bytes = 0;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    // What each fiber waits for (barrier, generation); the scheduler resumes a fiber only once
    // that generation has passed, so a blocked fiber costs no context switch.
    std::vector<const FiberBarrier*> wait_on;
    std::vector<uint64_t> wait_gen;
    void wait(FiberBarrier& b) {
        const uint64_t g = b.gen;
        if (++b.arrived == b.expected) { b.arrived = 0; ++b.gen; return; }
        while (b.gen == g) {
            wait_on[current] = &b;
            wait_gen[current] = g;
            fiber_switch(ctx[current], scheduler);
        }
    }
    bool runnable(unsigned t) const {
        return !finished[t] && (wait_on[t] == nullptr || wait_on[t]->gen != wait_gen[t]);
    }
    static void leave(FiberBarrier& b) {
        --b.expected;
        if (b.arrived > 0 && b.arrived == b.expected) { b.arrived = 0; ++b.gen; }
    }
    void sync_block(unsigned) { wait(bar); }
    void sync_warp(unsigned t) { wait(wbar[t >> 5]); }
};
#endif

inline thread_local Block* cur_block = nullptr;
inline thread_local unsigned cur_thread = 0;   // linear thread index in the block

inline unsigned lanes_in_warp(unsigned t) { return std::min(32u, cur_block->nthreads - (t & ~31u)); }
inline void require_full_mask(unsigned mask) {
    const unsigned n = lanes_in_warp(cur_thread);
    const unsigned need = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
    if ((mask & need) != need) fail("warp operation with a partial mask (unsupported on the CPU)");
}
// Every lane publishes v, all meet, each reads lane `src`, all meet again (slots reusable).
template <class T> inline T exchange(T v, int src, bool ok) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
    uint64_t* s = cur_block->slot.data() + (cur_thread & ~31u);
    std::memcpy(&s[cur_thread & 31u], &v, sizeof(T));
    cur_block->sync_warp(cur_thread);
    T r = v;
    if (ok && src >= 0 && (unsigned)src < lanes_in_warp(cur_thread)) std::memcpy(&r, &s[src], sizeof(T));
    cur_block->sync_warp(cur_thread);
    return r;
}
}  // namespace emu

inline void __syncthreads() { emu::cur_block->sync_block(emu::cur_thread); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::require_full_mask(mask);
    emu::cur_block->sync_warp(emu::cur_thread);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    emu::require_full_mask(mask);
    const int lane = (int)(emu::cur_thread & 31u), src = lane ^ lane_mask;
    return emu::exchange(v, src, src / width == lane / width);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    emu::require_full_mask(mask);
    const int lane = (int)(emu::cur_thread & 31u), src = lane + (int)delta;
    return emu::exchange(v, src, src / width == lane / width);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    emu::require_full_mask(mask);
    const int lane = (int)(emu::cur_thread & 31u), src = lane - (int)delta;
    return emu::exchange(v, src, src >= 0 && src / width == lane / width);
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    emu::require_full_mask(mask);
    const int lane = (int)(emu::cur_thread & 31u);
    return emu::exchange(v, lane - lane % width + src_lane % width, true);
}

// Atomics: std::atomic_ref gives real atomicity in threads mode (float fetch_add is C++20).
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
template <class T> inline T __ldg(const T* p) { return *p; }

// bf16 storage: the bit pattern of the top half of an f32 (matches half::bf16 in Rust).
struct __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;   // trivial, so `static` shared arrays need no guard
};
inline __nv_bfloat16 __float2bfloat16(float f) {   // round to nearest even, NaN kept quiet
    unsigned u = __float_as_uint(f);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) { h.bits = (uint16_t)((u >> 16) | 0x40u); return h; }
    u += 0x7fffu + ((u >> 16) & 1u);
    h.bits = (uint16_t)(u >> 16);
    return h;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.bits << 16); }
typedef __nv_bfloat16 nv_bfloat16;

#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::CUDA_EMU_NS::emu::cur_block->dyn.data())

namespace emu {
inline size_t stack_size(size_t dflt) {
    if (const char* s = std::getenv("CUDA_EMU_STACK_KB")) return (size_t)std::atoi(s) * 1024;
    return dflt;
}
inline bool bad_shape(dim3 grid, dim3 block) {
    const unsigned long long nt = (unsigned long long)block.x * block.y * block.z;
    return nt == 0 || nt > 1024 || (unsigned long long)grid.x * grid.y * grid.z == 0;
}
inline uint3 unflatten(unsigned i, dim3 d) { return uint3{i % d.x, (i / d.x) % d.y, i / (d.x * d.y)}; }

#ifndef CUDA_EMU_FIBERS
template <class F> struct Run {
    F* body; dim3 grid, block; Block blk;
    struct Rearm { Block* b; void operator()() noexcept { b->arm(); } };
    std::optional<std::barrier<Rearm>> block_done;
};
template <class R> void* thread_main(void* p) {
    auto* a = static_cast<std::pair<R*, unsigned>*>(p);
    R& r = *a->first;
    const unsigned t = a->second;
    cur_block = &r.blk; cur_thread = t;
    threadIdx = unflatten(t, r.block);
    blockDim = r.block; gridDim = r.grid;
    const unsigned nb = r.grid.x * r.grid.y * r.grid.z;
    for (unsigned b = 0; b < nb; ++b) {
        blockIdx = unflatten(b, r.grid);
        (*r.body)();
        (void)r.blk.bar->arrive_and_drop();          // done with this block's barriers
        (void)r.blk.wbar[t >> 5]->arrive_and_drop();
        r.block_done->arrive_and_wait();              // completion re-arms them for the next
    }
    cur_block = nullptr;
    return nullptr;
}
// Runs body() as every thread of every block; returns 0, or 1 for an impossible shape.
template <class F> int run_grid(std::mutex& m, F& body, dim3 grid, dim3 block, size_t dyn) {
    if (bad_shape(grid, block)) return 1;
    std::lock_guard<std::mutex> lock(m);
    using R = Run<F>;
    R r{&body, grid, block, {}, std::nullopt};
    const unsigned nt = block.x * block.y * block.z;
    r.blk.nthreads = nt;
    r.blk.nwarps = (nt + 31) / 32;
    r.blk.wbar.reset(new std::optional<std::barrier<>>[r.blk.nwarps]);
    r.blk.slot.assign(r.blk.nwarps * 32, 0);
    r.blk.dyn.assign((dyn + sizeof(max_align_t) - 1) / sizeof(max_align_t) + 1, max_align_t{});
    r.blk.arm();
    r.block_done.emplace(nt, typename R::Rearm{&r.blk});
    std::vector<std::pair<R*, unsigned>> ids(nt);
    std::vector<pthread_t> th(nt);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, stack_size(256 * 1024));
    for (unsigned t = 0; t < nt; ++t) {
        ids[t] = {&r, t};
        if (pthread_create(&th[t], &attr, &thread_main<R>, &ids[t]) != 0) fail("pthread_create failed");
    }
    pthread_attr_destroy(&attr);
    for (unsigned t = 0; t < nt; ++t) pthread_join(th[t], nullptr);
    return 0;
}
#else
inline void fiber_entry() {
    Block& b = *cur_block;
    b.body(b.body_arg);
    b.finished[b.current] = 1;
    --b.live;
    Block::leave(b.bar);
    Block::leave(b.wbar[b.current >> 5]);
    fiber_switch(b.ctx[b.current], b.scheduler);   // never resumed
    fail("a finished fiber was resumed");
}
template <class F> int run_grid(std::mutex&, F& body, dim3 grid, dim3 block, size_t dyn) {
    if (bad_shape(grid, block)) return 1;
    const unsigned nt = block.x * block.y * block.z, nb = grid.x * grid.y * grid.z;
    std::atomic<unsigned> next{0};
    auto worker = [&] {
        Block b;
        b.nthreads = nt; b.nwarps = (nt + 31) / 32;
        b.wbar.resize(b.nwarps);
        b.slot.assign(b.nwarps * 32, 0);
        b.dyn.assign((dyn + sizeof(max_align_t) - 1) / sizeof(max_align_t) + 1, max_align_t{});
        b.ctx.resize(nt); b.finished.resize(nt);
        b.wait_on.resize(nt); b.wait_gen.resize(nt);
        b.stack_bytes = stack_size(64 * 1024);
        b.stacks.reset(new char[b.stack_bytes * nt]);
        b.body = [](void* p) { (*static_cast<F*>(p))(); };
        b.body_arg = &body;
        cur_block = &b; blockDim = block; gridDim = grid;
        for (unsigned bi; (bi = next.fetch_add(1)) < nb;) {
            blockIdx = unflatten(bi, grid);
            b.bar = FiberBarrier{nt, 0, 0};
            for (unsigned w = 0; w < b.nwarps; ++w) b.wbar[w] = FiberBarrier{std::min(32u, nt - 32 * w), 0, 0};
            for (unsigned t = 0; t < nt; ++t) {
                fiber_make(b.ctx[t], b.stacks.get() + (size_t)t * b.stack_bytes, b.stack_bytes, &fiber_entry);
                b.finished[t] = 0;
                b.wait_on[t] = nullptr;
            }
            b.live = nt;
            while (b.live) {   // round robin: each runnable fiber runs to its next barrier or exit
                bool progressed = false;
                for (unsigned t = 0; t < nt; ++t)
                    if (b.runnable(t)) {
                        b.wait_on[t] = nullptr;
                        b.current = t; cur_thread = t; threadIdx = unflatten(t, block);
                        fiber_switch(b.scheduler, b.ctx[t]);
                        progressed = true;
                    }
                if (!progressed) fail("deadlock: threads wait at different barriers (a __syncthreads or warp op under divergent control flow)");
            }
        }
        cur_block = nullptr;
    };
    unsigned workers = std::max(1u, std::thread::hardware_concurrency());
    if (const char* s = std::getenv("CUDA_EMU_WORKERS")) workers = (unsigned)std::max(1, std::atoi(s));
    workers = std::min(workers, nb);
    std::vector<std::thread> pool;
    for (unsigned w = 1; w < workers; ++w) pool.emplace_back(worker);
    {
        Block* saved = cur_block;   // the calling thread works too
        worker();
        cur_block = saved;
    }
    for (auto& th : pool) th.join();
    return 0;
}
#endif

// Unpacks a cuLaunchKernel-style argument array (args[i] points at parameter i) and runs the
// kernel over the grid: the Rust side builds exactly what it would pass to the driver.
template <class... A, size_t... I>
int launch_packed(std::mutex& m, void (*k)(A...), const unsigned* dims, size_t dyn, void** args,
                  std::index_sequence<I...>) {
    auto body = [&] { k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...); };
    return run_grid(m, body, dim3(dims[0], dims[1], dims[2]), dim3(dims[3], dims[4], dims[5]), dyn);
}
template <class... A>
int launch(std::mutex& m, void (*k)(A...), const unsigned* dims, size_t dyn, void** args) {
    return launch_packed(m, k, dims, dyn, args, std::index_sequence_for<A...>{});
}
}  // namespace emu
}  // namespace CUDA_EMU_NS
using namespace CUDA_EMU_NS;
using std::max;
using std::min;   // CUDA's min/max also mix int and unsigned; std's do not: keep types equal

// EMU_EXPORT(symbol, kernel): `extern "C" int symbol(const unsigned dims[6], size_t dyn_smem,
// void** args)`; dims = grid.xyz then block.xyz; returns 0, or 1 for an impossible shape.
#define EMU_EXPORT(symbol, kernel)                                                     \
    extern "C" int symbol(const unsigned* dims, size_t dyn_smem, void** args) {        \
        static std::mutex m;                                                           \
        return ::CUDA_EMU_NS::emu::launch(m, &kernel, dims, dyn_smem, args);           \
    }
