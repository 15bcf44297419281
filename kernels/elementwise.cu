// Element-wise ops (fill, add, axpby, scale, bias add) and column sums.
// Layout: flat arrays of n elements; bias ops see x as [rows, n] row-major.
// Grid-stride loops; every value is computed in f32 and rounded once.

#define GRID_STRIDE(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// x[i] = value
template <typename T> __device__ void fill(T* x, u32 n, float value) {
    GRID_STRIDE(i, n) st(x, i, value);
}

// out[i] = a[i] + b[i]
template <typename T> __device__ void add(const T* a, const T* b, T* out, u32 n) {
    GRID_STRIDE(i, n) st(out, i, ld(a, i) + ld(b, i));
}

// x[i] = s·x[i]
template <typename T> __device__ void scale(T* x, u32 n, float s) {
    GRID_STRIDE(i, n) st(x, i, ld(x, i) * s);
}

// x[r, j] += bias[j]; x is [rows, n] (numel = rows·n)
template <typename T> __device__ void bias_add(T* x, const T* bias, u32 numel, u32 n) {
    GRID_STRIDE(i, numel) st(x, i, ld(x, i) + ld(bias, i % n));
}

// y = alpha·x + beta·y (y not read when beta == 0); x and y may differ in dtype
template <typename X, typename Y> __device__ void axpby(const X* x, Y* y, u32 n, float alpha, float beta) {
    if (beta == 0.0f) {
        GRID_STRIDE(i, n) st(y, i, alpha * ld(x, i));
    } else {
        GRID_STRIDE(i, n) st(y, i, alpha * ld(x, i) + beta * ld(y, i));
    }
}

// out[j] = Σ_r x[r, j] + beta·out[j] (out not read when beta == 0).
// Block (32, 8): threadIdx.x picks a column, threadIdx.y strides the rows,
// shared memory reduces the 8 partial sums in a fixed order.
template <typename T> __device__ void sum_rows(const T* x, T* out, u32 rows, u32 n, float beta) {
    __shared__ float part[8][33];
    u32 j = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (j < n) {
        for (u32 r = threadIdx.y; r < rows; r += 8) acc += ld(x, (size_t)r * n + j);
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) s += part[k][threadIdx.x];
        st(out, j, beta == 0.0f ? s : s + beta * ld(out, j));
    }
}

#define ELEMENTWISE(S, T) \
    extern "C" __global__ void fill_##S(T* x, u32 n, float value) { fill<T>(x, n, value); } \
    extern "C" __global__ void add_##S(const T* a, const T* b, T* out, u32 n) { add<T>(a, b, out, n); } \
    extern "C" __global__ void scale_##S(T* x, u32 n, float s) { scale<T>(x, n, s); } \
    extern "C" __global__ void bias_add_##S(T* x, const T* bias, u32 numel, u32 n) { bias_add<T>(x, bias, numel, n); } \
    extern "C" __global__ void sum_rows_##S(const T* x, T* out, u32 rows, u32 n, float beta) { sum_rows<T>(x, out, rows, n, beta); }
FOR_FLOATS(ELEMENTWISE)

#define AXPBY(SX, X, SY, Y) \
    extern "C" __global__ void axpby_##SX##_##SY(const X* x, Y* y, u32 n, float alpha, float beta) { axpby<X, Y>(x, y, n, alpha, beta); }
FOR_FLOAT_PAIRS(AXPBY)
