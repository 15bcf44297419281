// GELU, tanh form: gelu(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
// gelu'(x) = 0.5·(1 + t) + 0.5·x·(1 - t²)·√(2/π)·(1 + 3·0.044715·x²), t = tanh(u).
// Flat arrays of n elements; bias_gelu sees x as [rows, n_cols].

#define GELU_S 0.7978846f

__device__ __forceinline__ float gelu_f(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_S * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float gelu_grad_f(float x) {
    float u = GELU_S * (x + 0.044715f * x * x * x);
    float t = tanhf(u);
    float du = GELU_S * (1.0f + 3.0f * 0.044715f * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

#define GRID_STRIDE(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

template <typename T> __device__ void gelu(const T* x, T* y, u32 n) {
    GRID_STRIDE(i, n) st(y, i, gelu_f(ld(x, i)));
}
template <typename T> __device__ void gelu_backward(const T* x, const T* dy, T* dx, u32 n) {
    GRID_STRIDE(i, n) st(dx, i, ld(dy, i) * gelu_grad_f(ld(x, i)));
}
// y[r, j] = gelu(x[r, j] + bias[j])
template <typename T> __device__ void bias_gelu(const T* x, const T* bias, T* y, u32 numel, u32 n) {
    GRID_STRIDE(i, numel) st(y, i, gelu_f(ld(x, i) + ld(bias, i % n)));
}

#define GELU(S, T) \
    extern "C" __global__ void gelu_##S(const T* x, T* y, u32 n) { gelu<T>(x, y, n); } \
    extern "C" __global__ void gelu_backward_##S(const T* x, const T* dy, T* dx, u32 n) { gelu_backward<T>(x, dy, dx, n); } \
    extern "C" __global__ void bias_gelu_##S(const T* x, const T* bias, T* y, u32 numel, u32 n) { bias_gelu<T>(x, bias, y, numel, n); }
FOR_FLOATS(GELU)
