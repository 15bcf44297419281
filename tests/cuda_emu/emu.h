// A small CPU emulation of the CUDA execution model, to test the kernels of
// kernels/*.cu on a machine without a GPU (scripts/emulate-cuda-kernels.sh).
// Each block runs as blockDim OS threads, one block after another; __shared__
// becomes `static` (one block is live at a time), __syncthreads a std::barrier,
// warp shuffles/ballots go through a per-warp buffer and barrier, and f16
// conversions use _Float16. Slow, and blind to races the real hardware could
// expose, but it runs the real kernel source against naive f64 references.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() {} dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
static char* emu_dyn_smem;
static std::barrier<>* emu_block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> emu_warp_bars;
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

template <class... A> void launch(void (*f)(A...), dim3 grid, dim3 block, size_t smem, A... args) {
    unsigned n = block.x * block.y * block.z;
    std::vector<char> dyn(smem + 16);
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                std::barrier<> bar(n);
                emu_block_bar = &bar;
                emu_warp_bars.clear();
                for (unsigned w = 0; w < (n + 31) / 32; w++) emu_warp_bars.emplace_back(new std::barrier<>(std::min(32u, n - 32 * w)));
                emu_dyn_smem = dyn.data();
                std::vector<std::thread> ths;
                for (unsigned t = 0; t < n; t++) {
                    ths.emplace_back([&, t] {
                        blockIdx = dim3(bx, by, bz); gridDim = grid; blockDim = block;
                        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                        f(args...);
                        emu_warp_bars[t / 32]->arrive_and_drop();
                        bar.arrive_and_drop();
                    });
                }
                for (auto& th : ths) th.join();
            }
}
