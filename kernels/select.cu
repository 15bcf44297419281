// Top-k selection over causal score rows, on the device. scores: [batch, rows,
// cols] f32; idx: [batch, rows, k] u32. Row r is query t = r % rows.
// - block == 0 (tokens): cols = seq, candidates are the keys 0..=t.
// - block > 0 (blocks): cols = nkb, candidates are the key blocks 0..=t/block;
//   query t's own block t/block is kept first, then the sink block 0 (k >= 2 and
//   t/block > 0), then the best of blocks 1..t/block-1; k = 1 keeps only the own
//   block. Per query, from query t's own row only (attention::select::select_row).
// Order: score descending, ties to the smaller index, NaN as -inf (and -0 as
// +0). Output rows ascending, padded with NONE.
//
// One block (256 threads) per row. Each candidate c gets a 64-bit key
// (order(score) << 32 | ~c): larger is better and keys are distinct, so the
// kk-th largest key K* is exact: rows of at most 256 candidates (block mode)
// rank every key against the others in shared memory; longer rows use an
// 8-pass, 8-bit radix select with a shared histogram, streaming the row from
// global memory (no row-length limit). The kept set is {c : key(c) >= K*}; a block-wide scan in index
// order writes it ascending.

#define SEL_THREADS 256

__device__ __forceinline__ u64 sel_key(float v, u32 c) {
    u32 bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) bits = 0xff800000u;  // NaN -> -inf
    if ((bits & 0x7fffffffu) == 0u) bits = 0u;                    // -0 -> +0
    u32 ord = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((u64)ord << 32) | (u64)(~c);
}

extern "C" __global__ void __launch_bounds__(SEL_THREADS)
select_topk(const float* scores, u32* idx, u32 rows, u32 cols, u32 k, u32 block) {
    __shared__ u32 hist[256];
    __shared__ u64 prefix_sh;
    __shared__ u64 keys_sh[SEL_THREADS];
    __shared__ u32 wcount[SEL_THREADS / 32];
    u32 row = blockIdx.x, t = row % rows;
    bool blocks = block > 0;
    u32 r = blocks ? t / block : t;  // the last candidate: t's own block, or t itself
    const float* sc = scores + (size_t)row * cols;
    u32* out = idx + (size_t)row * k;
    u32 tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;

    // Forced entries (block mode) and the candidate range [c0, c1).
    u32 keep_local = 0, keep_sink = 0, c0 = 0, c1 = r + 1;
    if (blocks) {
        keep_local = k >= 1;
        keep_sink = r > 0 && k >= 2;
        c0 = 1;
        c1 = r > 1 ? r : 1;
    }
    u32 budget = k - keep_local - keep_sink;
    u32 ncand = c1 - c0;
    u32 kk = min(budget, ncand);

    // The kk-th largest key among the candidates: by rank when they fit the
    // block (every thread counts the keys larger than its own), else by radix
    // select.
    u64 prefix = 0, mask = 0;
    if (kk > 0 && kk < ncand && ncand <= SEL_THREADS) {
        u32 c = c0 + tid;
        u64 key = c < c1 ? sel_key(sc[c], c) : 0;
        keys_sh[tid] = key;
        __syncthreads();
        u32 rank = 0;
        for (u32 i = 0; i < ncand; i++) rank += keys_sh[i] > key;
        if (c < c1 && rank == kk - 1) prefix_sh = key;  // keys are distinct: exactly one thread
        __syncthreads();
        prefix = prefix_sh;
    } else if (kk > 0 && kk < ncand) {
        u32 remaining = kk;
        for (int pass = 0; pass < 8; pass++) {
            int shift = 56 - 8 * pass;
            hist[tid] = 0;
            __syncthreads();
            for (u32 c = c0 + tid; c < c1; c += SEL_THREADS) {
                u64 key = sel_key(sc[c], c);
                if ((key & mask) == prefix) atomicAdd(&hist[(u32)(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                u32 bin = 255;
                for (int b = 255; b >= 0; b--) {
                    if (remaining <= hist[b]) { bin = (u32)b; break; }
                    remaining -= hist[b];
                }
                prefix_sh = prefix | ((u64)bin << shift);
            }
            __syncthreads();
            prefix = prefix_sh;
            mask |= (u64)255 << shift;
            __syncthreads();
        }
    }
    // kk == ncand: keep every candidate (threshold 0); kk == 0: keep none.
    u64 thresh = kk == 0 ? ~(u64)0 : (kk < ncand ? prefix : 0);
    bool none = kk == 0;

    // Write: sink, then kept candidates ascending, then the local block, then NONE.
    u32 pos = 0;
    if (blocks && keep_sink) {
        if (tid == 0) out[0] = 0;
        pos = 1;
    }
    if (blocks && keep_local && r == 0) {
        if (tid == 0) out[0] = 0;
        pos = 1;
    }
    if (!none) {
        for (u32 base = c0; base < c1; base += SEL_THREADS) {
            u32 c = base + tid;
            bool keep = c < c1 && sel_key(sc[c], c) >= thresh;
            u32 ball = __ballot_sync(0xffffffffu, keep);
            if (lane == 0) wcount[wid] = __popc(ball);
            __syncthreads();
            u32 before = 0, total = 0;
            for (u32 w = 0; w < SEL_THREADS / 32; w++) {
                if (w < wid) before += wcount[w];
                total += wcount[w];
            }
            if (keep) out[pos + before + __popc(ball & ((1u << lane) - 1u))] = c;
            pos += total;
            __syncthreads();
        }
    }
    if (blocks && keep_local && r > 0) {
        if (tid == 0) out[pos] = r;
        pos += 1;
    }
    for (u32 j = pos + tid; j < k; j += SEL_THREADS) out[j] = NONE_IDX;
}
