// The DSA indexer. q_i: [batch, seq, H, D]; k_i: [batch, seq, D]; w: [batch, seq, H].
//   I(t, s) = Σ_j w[t,j]·ReLU(q_i[t,j]·k_i[s])   for s <= t, -inf above the diagonal
// scores: [batch, seq, seq] f32; pooled: [batch, seq, nkb] f32 (nkb = ceil(seq/block)),
// per query t the max of I(t, s) over the keys s <= t of each key block, -inf
// for the key blocks after t's own.
// Backward (dscores [batch, seq, seq] f32, entries above the diagonal ignored),
// with L = q_i[t,j]·k_i[s]:
//   dw[t,j] = Σ_s dI·ReLU(L),  dq_i[t,j] = Σ_s dI·w[t,j]·[L>0]·k_i[s],
//   dk_i[s] = Σ_{t>=s, j} dI·w[t,j]·[L>0]·q_i[t,j]
// The training kernels (scores, backward) cover a tile of query rows
// q0 .. q0 + nq: scores and dscores are then [batch, nq, seq] (row r is query
// q0 + r; causality uses the absolute position), dq_i and dw are written at
// the tile's rows only and dk_i is the tile's contribution (t in the tile).
// Token scores: 16×16 tiles, the key tile staged in shared memory. Backward:
// one warp per (b, t, j) for dq_i/dw and one per (b, s) for dk_i, lanes
// splitting D (DPL dims per lane, D <= 256): deterministic, no atomics.

template <typename T, typename K>
__device__ __forceinline__ float index_score(const T* qt, const K* ks, const T* wt, u32 H, u32 D) {
    float acc = 0.0f;
    for (u32 j = 0; j < H; j++) {
        float l = 0.0f;
        for (u32 e = 0; e < D; e++) l += ld(qt, (size_t)j * D + e) * ld(ks, e);
        acc += ld(wt, j) * fmaxf(l, 0.0f);
    }
    return acc;
}

// grid (ceil(seq/16), ceil(nq/16), batch), block (16, 16), dynamic smem 16·(D+1) floats.
template <typename T>
__device__ void indexer_scores(const T* qi, const T* ki, const T* w, float* scores, u32 seq, u32 H, u32 D, u32 q0,
                               u32 nq) {
    extern __shared__ float ksh[];
    u32 b = blockIdx.z, s0 = blockIdx.x * 16, r = blockIdx.y * 16 + threadIdx.y, t = q0 + r, s = s0 + threadIdx.x;
    u32 tid = threadIdx.y * 16 + threadIdx.x;
    for (u32 x = tid; x < 16 * D; x += 256) {
        u32 r = x / D, e = x % D;
        ksh[r * (D + 1) + e] = s0 + r < seq ? ld(ki, ((size_t)b * seq + s0 + r) * D + e) : 0.0f;
    }
    __syncthreads();
    if (r >= nq || s >= seq) return;
    float v = NEG_INF;
    if (s <= t) {
        size_t bt = (size_t)b * seq + t;
        v = index_score(qi + bt * H * D, ksh + threadIdx.x * (D + 1), w + bt * H, H, D);
    }
    scores[((size_t)b * nq + r) * seq + s] = v;
}

// Per-query block pooling: pooled[b, t, kb] = max_{s in key block kb, s <= t} I(t, s),
// -inf when kb > t/block (no causal key). grid (nkb, ceil(seq/16), batch), block
// (16, 16), dynamic smem 16·(D+1) floats. Thread (x, y) is query t = 16·qt + y;
// the key block is streamed through shared memory 16 keys at a time and thread x
// takes key x of each chunk; the 16 lanes of a query then max-reduce (exact and
// order-free, so the result depends on query t's own keys s <= t only).
template <typename T>
__device__ void indexer_block_scores(const T* qi, const T* ki, const T* w, float* pooled, u32 seq, u32 H, u32 D,
                                     u32 block) {
    extern __shared__ float ksh[];
    u32 nkb = (seq + block - 1) / block;
    u32 kb = blockIdx.x, b = blockIdx.z, t0 = blockIdx.y * 16, t = t0 + threadIdx.y;
    u32 tid = threadIdx.y * 16 + threadIdx.x;
    u32 kbeg = kb * block, kend = min(min(kbeg + block, seq), t0 + 16);  // the tile's last query bounds the keys
    float mx = NEG_INF;
    for (u32 c0 = kbeg; c0 < kend; c0 += 16) {
        __syncthreads();
        for (u32 x = tid; x < 16 * D; x += 256) {
            u32 r = x / D, e = x % D;
            ksh[r * (D + 1) + e] = c0 + r < kend ? ld(ki, ((size_t)b * seq + c0 + r) * D + e) : 0.0f;
        }
        __syncthreads();
        u32 s = c0 + threadIdx.x;
        if (t < seq && s < kend && s <= t) {
            size_t bt = (size_t)b * seq + t;
            // fmaxf drops NaN, like the reference's `!v.is_nan() && v > max`.
            mx = fmaxf(mx, index_score(qi + bt * H * D, ksh + threadIdx.x * (D + 1), w + bt * H, H, D));
        }
    }
    // The 16 lanes of query y are lanes 16·(y%2)..+15 of one warp.
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (t < seq && threadIdx.x == 0) pooled[((size_t)b * seq + t) * nkb + kb] = mx;
}

// One warp per (b, tile query, j); `row` is its absolute (b, t, j) row.
template <typename T, int DPL>
__device__ void indexer_bwd_q(const T* qi, const T* ki, const T* w, const float* dscores, T* dqi, T* dw, u32 batch,
                              u32 seq, u32 H, u32 D, u32 q0, u32 nq) {
    u32 tr = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (tr >= batch * nq * H) return;
    u32 j = tr % H, rt = (tr / H) % nq, b = tr / (H * nq), t = q0 + rt;
    u32 bt = b * seq + t, row = bt * H + j;
    float qr[DPL], acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        u32 e = lane + 32 * i;
        qr[i] = e < D ? ld(qi, (size_t)row * D + e) : 0.0f;
        acc[i] = 0.0f;
    }
    float wj = ld(w, (size_t)row), adw = 0.0f;
    const float* dsr = dscores + ((size_t)b * nq + rt) * seq;
    for (u32 s = 0; s <= t; s++) {
        const T* kr = ki + ((size_t)b * seq + s) * D;
        float l = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            u32 e = lane + 32 * i;
            if (e < D) l += qr[i] * ld(kr, e);
        }
        l = warp_sum(l);
        float dI = dsr[s];
        adw += dI * fmaxf(l, 0.0f);
        if (l > 0.0f) {
            float gcoef = dI * wj;
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                u32 e = lane + 32 * i;
                if (e < D) acc[i] += gcoef * ld(kr, e);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        u32 e = lane + 32 * i;
        if (e < D) st(dqi, (size_t)row * D + e, acc[i]);
    }
    if (lane == 0) st(dw, (size_t)row, adw);
}

template <typename T, int DPL>
__device__ void indexer_bwd_k(const T* qi, const T* ki, const T* w, const float* dscores, T* dki, u32 batch, u32 seq,
                              u32 H, u32 D, u32 q0, u32 nq) {
    u32 row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= batch * seq) return;
    u32 s = row % seq, b = row / seq;
    float kr[DPL], acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        u32 e = lane + 32 * i;
        kr[i] = e < D ? ld(ki, (size_t)row * D + e) : 0.0f;
        acc[i] = 0.0f;
    }
    for (u32 t = max(s, q0); t < q0 + nq; t++) {
        size_t bt = (size_t)b * seq + t;
        float dI = dscores[((size_t)b * nq + t - q0) * seq + s];
        for (u32 j = 0; j < H; j++) {
            const T* qr = qi + (bt * H + j) * D;
            float l = 0.0f;
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                u32 e = lane + 32 * i;
                if (e < D) l += kr[i] * ld(qr, e);
            }
            l = warp_sum(l);
            if (l > 0.0f) {
                float gcoef = dI * ld(w, bt * H + j);
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    u32 e = lane + 32 * i;
                    if (e < D) acc[i] += gcoef * ld(qr, e);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        u32 e = lane + 32 * i;
        if (e < D) st(dki, (size_t)row * D + e, acc[i]);
    }
}

#define INDEXER_DPL(S, T, N) \
    extern "C" __global__ void __launch_bounds__(128) indexer_bwd_q_##S##_d##N(const T* qi, const T* ki, const T* w, const float* ds, T* dqi, T* dw, u32 batch, u32 seq, u32 H, u32 D, u32 q0, u32 nq) { \
        indexer_bwd_q<T, N>(qi, ki, w, ds, dqi, dw, batch, seq, H, D, q0, nq); } \
    extern "C" __global__ void __launch_bounds__(128) indexer_bwd_k_##S##_d##N(const T* qi, const T* ki, const T* w, const float* ds, T* dki, u32 batch, u32 seq, u32 H, u32 D, u32 q0, u32 nq) { \
        indexer_bwd_k<T, N>(qi, ki, w, ds, dki, batch, seq, H, D, q0, nq); }
#define INDEXER(S, T) \
    extern "C" __global__ void indexer_scores_##S(const T* qi, const T* ki, const T* w, float* scores, u32 seq, u32 H, u32 D, u32 q0, u32 nq) { \
        indexer_scores<T>(qi, ki, w, scores, seq, H, D, q0, nq); } \
    extern "C" __global__ void indexer_block_scores_##S(const T* qi, const T* ki, const T* w, float* pooled, u32 seq, u32 H, u32 D, u32 block) { \
        indexer_block_scores<T>(qi, ki, w, pooled, seq, H, D, block); } \
    INDEXER_DPL(S, T, 1) INDEXER_DPL(S, T, 2) INDEXER_DPL(S, T, 4) INDEXER_DPL(S, T, 8)
FOR_FLOATS(INDEXER)
