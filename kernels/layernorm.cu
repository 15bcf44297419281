// LayerNorm over the last dimension. x, y, dy, dx: [rows, n]; gamma, beta,
// dgamma, dbeta: [n]; mean, rstd: [rows] f32.
//   forward:  mu = Σx/n, var = Σ(x-mu)²/n, rstd = 1/√(var+eps), y = (x-mu)·rstd·γ + β
//   backward: g = dy·γ, x̂ = (x-mu)·rstd,
//             dx = rstd·(g - mean(g) - x̂·mean(g·x̂)),
//             dγ += Σ_r dy·x̂, dβ += Σ_r dy (accumulate)
// One warp per row for the row passes; a (32, 8) block per 32 columns for
// the parameter gradients (fixed summation order: deterministic).

template <typename T>
__device__ void layernorm_fwd(const T* x, const T* gamma, const T* beta, T* y, float* mean, float* rstd, u32 rows,
                              u32 n, float eps) {
    u32 row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * n;
    float s = 0.0f;
    for (u32 j = lane; j < n; j += 32) s += ld(xr, j);
    float mu = warp_sum(s) / (float)n;
    float v = 0.0f;
    for (u32 j = lane; j < n; j += 32) {
        float d = ld(xr, j) - mu;
        v += d * d;
    }
    float rs = 1.0f / sqrtf(warp_sum(v) / (float)n + eps);
    T* yr = y + (size_t)row * n;
    for (u32 j = lane; j < n; j += 32) st(yr, j, (ld(xr, j) - mu) * rs * ld(gamma, j) + ld(beta, j));
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

template <typename T>
__device__ void layernorm_bwd_dx(const T* dy, const T* x, const T* gamma, const float* mean, const float* rstd, T* dx,
                                 u32 rows, u32 n) {
    u32 row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * n;
    const T* dyr = dy + (size_t)row * n;
    float m = mean[row], rs = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (u32 j = lane; j < n; j += 32) {
        float xh = (ld(xr, j) - m) * rs;
        float g = ld(dyr, j) * ld(gamma, j);
        sg += g;
        sgx += g * xh;
    }
    float mg = warp_sum(sg) / (float)n, mgx = warp_sum(sgx) / (float)n;
    T* dxr = dx + (size_t)row * n;
    for (u32 j = lane; j < n; j += 32) {
        float xh = (ld(xr, j) - m) * rs;
        st(dxr, j, rs * (ld(dyr, j) * ld(gamma, j) - mg - xh * mgx));
    }
}

template <typename T>
__device__ void layernorm_bwd_params(const T* dy, const T* x, const float* mean, const float* rstd, T* dgamma, T* dbeta,
                                     u32 rows, u32 n) {
    __shared__ float pg[8][33], pb[8][33];
    u32 j = blockIdx.x * 32 + threadIdx.x;
    float ag = 0.0f, ab = 0.0f;
    if (j < n) {
        for (u32 r = threadIdx.y; r < rows; r += 8) {
            size_t i = (size_t)r * n + j;
            float d = ld(dy, i);
            ag += d * ((ld(x, i) - mean[r]) * rstd[r]);
            ab += d;
        }
    }
    pg[threadIdx.y][threadIdx.x] = ag;
    pb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        float sg = 0.0f, sb = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            sg += pg[k][threadIdx.x];
            sb += pb[k][threadIdx.x];
        }
        st(dgamma, j, ld(dgamma, j) + sg);
        st(dbeta, j, ld(dbeta, j) + sb);
    }
}

#define LAYERNORM(S, T) \
    extern "C" __global__ void layernorm_fwd_##S(const T* x, const T* gamma, const T* beta, T* y, float* mean, float* rstd, u32 rows, u32 n, float eps) { \
        layernorm_fwd<T>(x, gamma, beta, y, mean, rstd, rows, n, eps); } \
    extern "C" __global__ void layernorm_bwd_dx_##S(const T* dy, const T* x, const T* gamma, const float* mean, const float* rstd, T* dx, u32 rows, u32 n) { \
        layernorm_bwd_dx<T>(dy, x, gamma, mean, rstd, dx, rows, n); } \
    extern "C" __global__ void layernorm_bwd_params_##S(const T* dy, const T* x, const float* mean, const float* rstd, T* dgamma, T* dbeta, u32 rows, u32 n) { \
        layernorm_bwd_params<T>(dy, x, mean, rstd, dgamma, dbeta, rows, n); }
FOR_FLOATS(LAYERNORM)
