// A small CPU emulation of the CUDA execution model, to test the kernels of
// kernels/*.cu on a machine without a GPU (scripts/emulate-cuda-kernels.sh).
// Each block runs as blockDim cooperative fibers (ucontext) on one OS thread,
// one block after another; __shared__ becomes `static` (one block is live at a
// time), __syncthreads a barrier at which a fiber yields until every live
// fiber of the block has arrived, warp shuffles/ballots go through a per-warp
// buffer and barrier, and f16 conversions use _Float16. (Fibers replaced one OS
// thread per CUDA thread: the same interleavings at barriers, ~20x faster on 2
// cores.) Blind to races the real hardware could expose, but it runs the real
// kernel source against naive f64 references.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <ucontext.h>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() {} dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
static char* emu_dyn_smem;
// Fibers: on x86-64 a minimal stack switch (callee-saved registers, MXCSR and
// the x87 control word; glibc's swapcontext makes a sigprocmask system call per
// switch, which doubled the run time), elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");
struct EmuFiber { void* sp; dim3 tid; bool done; };
static void* emu_sched_sp;
#else
struct EmuFiber { ucontext_t ctx; dim3 tid; bool done; };
static ucontext_t emu_sched_ctx;
#endif
static EmuFiber* emu_cur;
inline void emu_yield() {
#if defined(__x86_64__)
    emu_switch(&emu_cur->sp, emu_sched_sp);
#else
    swapcontext(&emu_cur->ctx, &emu_sched_ctx);
#endif
}
// A barrier of cooperative fibers: the last to arrive opens the next phase;
// the others yield until it has.
struct EmuBarrier {
    unsigned expected, arrived = 0, gen = 0;
    explicit EmuBarrier(unsigned n) : expected(n) {}
    void arrive_and_wait() {
        unsigned g = gen;
        if (++arrived == expected) { arrived = 0; gen++; return; }
        while (gen == g) emu_yield();
    }
    void arrive_and_drop() {
        expected--;
        if (expected > 0 && arrived == expected) { arrived = 0; gen++; }
    }
};
static EmuBarrier* emu_block_bar;
static std::vector<std::unique_ptr<EmuBarrier>> emu_warp_bars;
static uint64_t emu_wbuf[32][32];
static std::atomic<int> emu_or_flag{0};
inline unsigned emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp() { emu_warp_bars[emu_tid() / 32]->arrive_and_wait(); }
inline int __syncthreads_or(int p) {
    __syncthreads(); if (p) emu_or_flag.store(1); __syncthreads();
    int r = emu_or_flag.load(); __syncthreads(); if (emu_tid() == 0) emu_or_flag.store(0); __syncthreads(); return r;
}
template <class T> inline uint64_t emu_bits(T v) { uint64_t b = 0; memcpy(&b, &v, sizeof(T)); return b; }
template <class T> inline T emu_from(uint64_t b) { T v; memcpy(&v, &b, sizeof(T)); return v; }
template <class T> T emu_shfl(T v, int src_of_lane_mode, int o) {
    unsigned t = emu_tid(), w = t / 32, l = t % 32;
    emu_wbuf[w][l] = emu_bits(v);
    __syncwarp();
    int src = src_of_lane_mode == 0 ? (int)(l ^ o) : ((int)l >= o ? (int)l - o : (int)l);
    T r = emu_from<T>(emu_wbuf[w][src]);
    __syncwarp();
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, 0, o); }
template <class T> T __shfl_up_sync(unsigned, T v, int o) { return emu_shfl(v, 1, o); }
inline unsigned __ballot_sync(unsigned, int p) {
    unsigned t = emu_tid(), w = t / 32, l = t % 32;
    emu_wbuf[w][l] = p ? 1 : 0;
    __syncwarp();
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= (unsigned)emu_wbuf[w][i] << i;
    __syncwarp();
    return r;
}
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __int_as_float(int x) { return emu_from<float>((uint32_t)x); }
inline float __uint_as_float(unsigned x) { return emu_from<float>(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)emu_bits(x); }
template <class T> T min(T a, T b) { return a < b ? a : b; }
template <class T> T max(T a, T b) { return a > b ? a : b; }
inline float emu_h2f(unsigned short b) { _Float16 h; memcpy(&h, &b, 2); return (float)h; }
inline unsigned short emu_f2h(float f) { _Float16 h = (_Float16)f; unsigned short b; memcpy(&b, &h, 2); return b; }

static std::function<void()> emu_body;
static void emu_entry() {
    emu_body();
    emu_cur->done = true;
    emu_warp_bars[emu_tid() / 32]->arrive_and_drop();
    emu_block_bar->arrive_and_drop();
#if defined(__x86_64__)
    emu_switch(&emu_cur->sp, emu_sched_sp);  // never resumed
#endif
}  // (ucontext: returns to the scheduler through uc_link)

template <class... A> void launch(void (*f)(A...), dim3 grid, dim3 block, size_t smem, A... args) {
    unsigned n = block.x * block.y * block.z;
    std::vector<char> dyn(smem + 16);
    const size_t stack = 256 << 10;
    std::vector<EmuFiber> fibers(n);
    std::vector<std::unique_ptr<char, decltype(&free)>> stacks;
    for (unsigned t = 0; t < n; t++) stacks.emplace_back((char*)malloc(stack), &free);
    emu_body = [&] { f(args...); };
    gridDim = grid; blockDim = block;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx = dim3(bx, by, bz);
                EmuBarrier bar(n);
                emu_block_bar = &bar;
                emu_warp_bars.clear();
                for (unsigned w = 0; w < (n + 31) / 32; w++) emu_warp_bars.emplace_back(new EmuBarrier(std::min(32u, n - 32 * w)));
                emu_dyn_smem = dyn.data();
                for (unsigned t = 0; t < n; t++) {
                    EmuFiber& fb = fibers[t];
                    fb.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                    fb.done = false;
#if defined(__x86_64__)
                    // The frame emu_switch pops: control words, six registers, then
                    // `ret` into emu_entry with rsp = 8 mod 16 as after a call.
                    uintptr_t top = ((uintptr_t)stacks[t].get() + stack) & ~(uintptr_t)15;
                    uint64_t* sp = (uint64_t*)top - 2;
                    *sp = (uint64_t)(uintptr_t)&emu_entry;
                    sp -= 6;
                    for (int r = 0; r < 6; r++) sp[r] = 0;
                    sp -= 1;
                    uint32_t ctl[2];
                    asm volatile("stmxcsr %0" : "=m"(ctl[0]));
                    asm volatile("fnstcw %0" : "=m"(ctl[1]));
                    memcpy(sp, ctl, 8);
                    fb.sp = sp;
#else
                    getcontext(&fb.ctx);
                    fb.ctx.uc_stack.ss_sp = stacks[t].get();
                    fb.ctx.uc_stack.ss_size = stack;
                    fb.ctx.uc_link = &emu_sched_ctx;
                    makecontext(&fb.ctx, emu_entry, 0);
#endif
                }
                for (unsigned live = n; live > 0;)
                    for (auto& fb : fibers) {
                        if (fb.done) continue;
                        emu_cur = &fb;
                        threadIdx = fb.tid;
#if defined(__x86_64__)
                        emu_switch(&emu_sched_sp, fb.sp);
#else
                        swapcontext(&emu_sched_ctx, &fb.ctx);
#endif
                        if (fb.done) live--;
                    }
            }
}
