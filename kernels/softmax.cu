// Row softmax over the last dimension of x: [rows, n]. Causal rows (the
// `[..., t, s]` view) see `visible(r) = min(r % t + 1 + (n - t), n)` columns;
// masked columns are written as 0 and never read.
//   forward:  y = exp(x - max) / Σ exp(x - max)
//   backward: dx = y·(dy - Σ y·dy)
// One warp per row; the forward keeps an online (max, sum) per lane.

__device__ __forceinline__ u32 visible(u32 r, u32 n, u32 t, u32 causal) {
    if (!causal) return n;
    u32 v = r % t + 1 + (n - t);
    return v < n ? v : n;
}

template <typename T> __device__ void softmax_fwd(const T* x, T* y, u32 rows, u32 n, u32 t, u32 causal) {
    u32 row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= rows) return;
    u32 vis = visible(row, n, t, causal);
    const T* xr = x + (size_t)row * n;
    T* yr = y + (size_t)row * n;
    float m = NEG_INF, s = 0.0f;
    for (u32 j = lane; j < vis; j += 32) lse_merge(m, s, ld(xr, j), 1.0f);
    warp_lse(m, s);
    float inv = 1.0f / s;
    for (u32 j = lane; j < n; j += 32) st(yr, j, j < vis ? expf(ld(xr, j) - m) * inv : 0.0f);
}

template <typename T> __device__ void softmax_bwd(const T* y, const T* dy, T* dx, u32 rows, u32 n, u32 t, u32 causal) {
    u32 row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= rows) return;
    u32 vis = visible(row, n, t, causal);
    size_t off = (size_t)row * n;
    float d = 0.0f;
    for (u32 j = lane; j < vis; j += 32) d += ld(y, off + j) * ld(dy, off + j);
    d = warp_sum(d);
    for (u32 j = lane; j < n; j += 32) st(dx, off + j, j < vis ? ld(y, off + j) * (ld(dy, off + j) - d) : 0.0f);
}

#define SOFTMAX(S, T) \
    extern "C" __global__ void softmax_fwd_##S(const T* x, T* y, u32 rows, u32 n, u32 t, u32 causal) { softmax_fwd<T>(x, y, rows, n, t, causal); } \
    extern "C" __global__ void softmax_bwd_##S(const T* y, const T* dy, T* dx, u32 rows, u32 n, u32 t, u32 causal) { softmax_bwd<T>(y, dy, dx, rows, n, t, causal); }
FOR_FLOATS(SOFTMAX)
