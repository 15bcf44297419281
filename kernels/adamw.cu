// AdamW on f32 master weights, with an optional low-precision copy-out.
// p, g, m, v: [n] f32; copy: [n] in its own float dtype (unused when has_copy = 0).
//   g' = grad_scale·g
//   m  = β1·m + (1-β1)·g'          v = β2·v + (1-β2)·g'²
//   p -= lr·((m·bc1)/(√(v·bc2) + eps) + wd·p)      copy = p
// bc1 = 1/(1-β1^t), bc2 = 1/(1-β2^t) come from the host.

template <typename C>
__device__ void adamw(float* p, const float* g, float* m, float* v, C* copy, u32 has_copy, u32 n, float lr, float b1,
                      float b2, float eps, float wd, float bc1, float bc2, float grad_scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        float pi = p[i];
        float update = (mi * bc1) / (sqrtf(vi * bc2) + eps) + wd * pi;
        pi -= lr * update;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (has_copy) st(copy, i, pi);
    }
}

#define ADAMW(S, T) \
    extern "C" __global__ void adamw_##S(float* p, const float* g, float* m, float* v, T* copy, u32 has_copy, u32 n, float lr, float b1, float b2, float eps, float wd, float bc1, float bc2, float grad_scale) { \
        adamw<T>(p, g, m, v, copy, has_copy, n, lr, b1, b2, eps, wd, bc1, bc2, grad_scale); }
FOR_FLOATS(ADAMW)
