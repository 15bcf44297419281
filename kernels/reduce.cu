// Whole-tensor reductions over a flat x of n elements.
//   sum_squares: out[0] = Σ x² (f32 out). Two deterministic passes: each of
//     the fixed number of blocks writes one f64 partial, then one block sums
//     the partials in order. Accumulation in f64, like the CPU backend.
//   all_finite:  out[0] = 1 if no element is Inf/NaN (checked on the bits), else 0
//     (u32 out). `set_u32` writes the 1 first, then offenders clear it.

__device__ __forceinline__ double block_sum_f64(double v, double* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T> __device__ void sum_squares_partial(const T* x, u32 n, double* partials) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double v = (double)ld(x, i);
        acc += v * v;
    }
    acc = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void sum_squares_final(const double* partials, u32 count, float* out) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (u32 i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) out[0] = (float)acc;
}

extern "C" __global__ void set_u32(u32* out, u32 value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = value;
}

template <typename T> __device__ void all_finite(const T* x, u32 n, u32* out) {
    int bad = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        bad |= !bits_finite(x[i]);
    if (__syncthreads_or(bad) && threadIdx.x == 0) out[0] = 0u;
}

#define REDUCE(S, T) \
    extern "C" __global__ void sum_squares_partial_##S(const T* x, u32 n, double* partials) { sum_squares_partial<T>(x, n, partials); } \
    extern "C" __global__ void all_finite_##S(const T* x, u32 n, u32* out) { all_finite<T>(x, n, out); }
FOR_FLOATS(REDUCE)
