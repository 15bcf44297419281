// Embedding lookup and its gradient. ids: [n] u32; table, dtable: [vocab, dim];
// out, dout: [n, dim]. Ids >= vocab give zero rows and no gradient.
//   forward:  out[i, :] = table[ids[i], :]
//   backward: dtable[v, :] += Σ_{i: ids[i] = v} dout[i, :], summed in f32 in
//             increasing token order and rounded once, like the CPU backend.
// The backward runs one block per token; only the block of the first
// occurrence of an id sums (all of that id's rows, in order): deterministic,
// no atomics, O(n²) id comparisons (cheap next to the row traffic).

template <typename T> __device__ void embedding_fwd(const u32* ids, const T* table, T* out, u32 n, u32 vocab, u32 dim) {
    size_t total = (size_t)n * dim;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        size_t i = e / dim;
        u32 c = (u32)(e % dim);
        u32 id = ids[i];
        st(out, e, id < vocab ? ld(table, (size_t)id * dim + c) : 0.0f);
    }
}

template <typename T> __device__ void embedding_bwd(const u32* ids, const T* dout, T* dtable, u32 n, u32 vocab, u32 dim) {
    u32 i = blockIdx.x;
    u32 id = ids[i];
    if (id >= vocab) return;
    int seen = 0;
    for (u32 j = threadIdx.x; j < i; j += blockDim.x) seen |= ids[j] == id;
    if (__syncthreads_or(seen)) return;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = 0.0f;
        for (u32 j = i; j < n; j++) {
            if (ids[j] == id) acc += ld(dout, (size_t)j * dim + c);
        }
        size_t o = (size_t)id * dim + c;
        st(dtable, o, ld(dtable, o) + acc);
    }
}

#define EMBEDDING(S, T) \
    extern "C" __global__ void embedding_fwd_##S(const u32* ids, const T* table, T* out, u32 n, u32 vocab, u32 dim) { embedding_fwd<T>(ids, table, out, n, vocab, dim); } \
    extern "C" __global__ void embedding_bwd_##S(const u32* ids, const T* dout, T* dtable, u32 n, u32 vocab, u32 dim) { embedding_bwd<T>(ids, dout, dtable, n, vocab, dim); }
FOR_FLOATS(EMBEDDING)
