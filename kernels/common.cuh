// Prelude prepended to every kernel family before NVRTC compiles it.
//
// No CUDA headers are needed: NVRTC from the PyPI wheel has no cuda_fp16.h,
// so f16 and bf16 are plain 16-bit storage types converted here. Every value
// is widened to f32 on load and rounded once on store:
// - f16 <-> f32 with the PTX `cvt` instructions (round to nearest even);
// - bf16 -> f32 is a shift; f32 -> bf16 rounds to nearest even with the bit
//   trick of `half::bf16::from_f32` (NaN stays NaN), so both backends agree
//   on every bit.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct f16 { u16 bits; };
struct bf16 { u16 bits; };

#define NONE_IDX 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((u32)v.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    u32 x = __float_as_uint(v);
    bf16 r;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((x >> 16) | 0x0040u);
    } else if ((x & 0x8000u) != 0 && (x & 0x17fffu) != 0) {
        r.bits = (u16)((x >> 16) + 1);
    } else {
        r.bits = (u16)(x >> 16);
    }
    return r;
}

template <typename T> __device__ __forceinline__ float ld(const T* p, size_t i) { return to_f32(p[i]); }
template <typename T> __device__ __forceinline__ void st(T* p, size_t i, float v) { p[i] = from_f32<T>(v); }

// Inf/NaN from the bit pattern (fast-math cannot fold it away).
__device__ __forceinline__ bool bits_finite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool bits_finite(f16 v) { return (v.bits & 0x7c00u) != 0x7c00u; }
__device__ __forceinline__ bool bits_finite(bf16 v) { return (v.bits & 0x7f80u) != 0x7f80u; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Merges two online-softmax states (max m, sum s of exp(x - m)).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == NEG_INF) return;
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}
__device__ __forceinline__ void warp_lse(float& m, float& s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
}

// Sum over a block whose size is a multiple of 32 (at most 1024); every
// thread gets the result. `sh` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}

// Online-softmax state over a block (see block_sum).
__device__ __forceinline__ void block_lse(float& m, float& s, float* shm, float* shs) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    warp_lse(m, s);
    __syncthreads();
    if (lane == 0) { shm[wid] = m; shs[wid] = s; }
    __syncthreads();
    m = lane < nw ? shm[lane] : NEG_INF;
    s = lane < nw ? shs[lane] : 0.0f;
    warp_lse(m, s);
}

// extern "C" instantiation helpers: MACRO(suffix, type) per float dtype, and
// per pair of float dtypes (x, y).
#define FOR_FLOATS(M) M(f32, float) M(f16, f16) M(bf16, bf16)
#define FOR_FLOAT_PAIRS(M) \
    M(f32, float, f32, float) M(f32, float, f16, f16) M(f32, float, bf16, bf16) \
    M(f16, f16, f32, float) M(f16, f16, f16, f16) M(f16, f16, bf16, bf16) \
    M(bf16, bf16, f32, float) M(bf16, bf16, f16, f16) M(bf16, bf16, bf16, bf16)
