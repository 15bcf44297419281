// Dtype casts: y[i] = x[i] converted to y's float dtype (round to nearest even).

template <typename X, typename Y> __device__ void cast(const X* x, Y* y, u32 n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        st(y, i, ld(x, i));
}

#define CAST(SX, X, SY, Y) \
    extern "C" __global__ void cast_##SX##_##SY(const X* x, Y* y, u32 n) { cast<X, Y>(x, y, n); }
FOR_FLOAT_PAIRS(CAST)
