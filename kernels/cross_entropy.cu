// Fused softmax + cross-entropy. logits, dlogits: [rows, vocab]; targets:
// [rows] u32; losses: [rows] f32. A row is ignored (loss 0, gradient 0) when
// its target equals ignore_index or is >= vocab.
//   loss  = max + ln Σ exp(x - max) - x[target]
//   dx[j] = grad_scale·(exp(x[j] - max)/Σ - [j = target])
// One block per row; each thread keeps an online (max, sum), merged per block.

__device__ __forceinline__ bool ce_ignored(u32 tg, u32 vocab, u32 ignore_index) { return tg == ignore_index || tg >= vocab; }

template <typename T> __device__ void row_lse(const T* xr, u32 vocab, float& m, float& s) {
    __shared__ float shm[32], shs[32];
    m = NEG_INF;
    s = 0.0f;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) lse_merge(m, s, ld(xr, j), 1.0f);
    block_lse(m, s, shm, shs);
}

template <typename T>
__device__ void ce_fwd(const T* logits, const u32* targets, float* losses, u32 vocab, u32 ignore_index) {
    u32 row = blockIdx.x;
    u32 tg = targets[row];
    if (ce_ignored(tg, vocab, ignore_index)) {
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    const T* xr = logits + (size_t)row * vocab;
    float m, s;
    row_lse(xr, vocab, m, s);
    if (threadIdx.x == 0) losses[row] = m + logf(s) - ld(xr, tg);
}

template <typename T>
__device__ void ce_bwd(const T* logits, const u32* targets, T* dlogits, u32 vocab, u32 ignore_index, float grad_scale) {
    u32 row = blockIdx.x;
    u32 tg = targets[row];
    T* dr = dlogits + (size_t)row * vocab;
    if (ce_ignored(tg, vocab, ignore_index)) {
        for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) st(dr, j, 0.0f);
        return;
    }
    const T* xr = logits + (size_t)row * vocab;
    float m, s;
    row_lse(xr, vocab, m, s);
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) {
        float p = expf(ld(xr, j) - m) / s;
        st(dr, j, grad_scale * (p - (j == tg ? 1.0f : 0.0f)));
    }
}

#define CROSS_ENTROPY(S, T) \
    extern "C" __global__ void ce_fwd_##S(const T* logits, const u32* targets, float* losses, u32 vocab, u32 ignore_index) { ce_fwd<T>(logits, targets, losses, vocab, ignore_index); } \
    extern "C" __global__ void ce_bwd_##S(const T* logits, const u32* targets, T* dlogits, u32 vocab, u32 ignore_index, float grad_scale) { ce_bwd<T>(logits, targets, dlogits, vocab, ignore_index, grad_scale); }
FOR_FLOATS(CROSS_ENTROPY)
