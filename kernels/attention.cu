// Causal attention over a sparsity pattern: forward and backward, with GQA.
// Layouts (row-major): q, o, dq, dO: [batch, seq, H, d]; k, v, dk, dv:
// [batch, seq, KV, d]; lse, D: [batch, H, seq] f32. Query head h reads kv head
// h / (H/KV). Patterns (mode): 0 dense (every s <= t); 1 tokens, idx [batch,
// seq, kk] key positions; 2 blocks, idx [batch, seq, kk] key block ids per
// query: query t attends to the keys s <= t of the blocks in its own row.
// NONE, out-of-range and future entries are skipped; entries are distinct.
//
//   forward:  p(s) = softmax_s(scale·q·k_s) over K(t); o = Σ p(s)·v_s; lse = ln Σ exp(scale·q·k_s)
//             (o = 0, lse = -inf when K(t) is empty)
//   backward: D_t = dO_t·o_t, p = exp(scale·q·k - lse), ds = p·(dO·v - D),
//             dq_t = Σ_s scale·ds·k_s, dk_s = Σ_t scale·ds·q_t, dv_s = Σ_t p·dO_t
//
// Straightforward flash-style kernels: one warp per query row (forward, dq)
// or per key row (dk, dv), online softmax, no n×n matrix. Lane l owns the
// dims l, l+32, ... (DPL = dims per lane, 1..8, so d <= 256); a dot product
// is a per-lane partial plus a warp reduction. The key-centric backward needs
// each key's queries: dense and blocks derive them from idx (blocks: every
// t >= s whose row lists the block of s), tokens use a CSR
// inverse index built on the device (count, scan, fill, rank-sort: the lists
// are in increasing t, so sums have a fixed order and runs are deterministic).

#define WARPS 4

struct Attn {
    u32 batch, seq, H, KV, d;
    float scale;
    u32 mode, kk, block;
};

template <typename T, int DPL> __device__ __forceinline__ void load_row(const T* p, u32 d, float* r) {
    u32 lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        u32 e = lane + 32 * i;
        r[i] = e < d ? ld(p, e) : 0.0f;
    }
}

template <typename T, int DPL> __device__ __forceinline__ float dot_row(const float* r, const T* p, u32 d) {
    u32 lane = threadIdx.x & 31;
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        u32 e = lane + 32 * i;
        if (e < d) acc += r[i] * ld(p, e);
    }
    return warp_sum(acc);
}

template <typename T, int DPL> __device__ __forceinline__ void store_row(T* p, u32 d, const float* r, float mul) {
    u32 lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        u32 e = lane + 32 * i;
        if (e < d) st(p, e, r[i] * mul);
    }
}

__device__ __forceinline__ size_t q_off(const Attn& a, u32 b, u32 t, u32 h) { return (((size_t)b * a.seq + t) * a.H + h) * a.d; }
__device__ __forceinline__ size_t k_off(const Attn& a, u32 b, u32 s, u32 g) { return (((size_t)b * a.seq + s) * a.KV + g) * a.d; }

// Calls f(s) for every key s of query t's pattern (warp-uniform).
template <typename F> __device__ __forceinline__ void for_keys(const Attn& a, const u32* idx, u32 b, u32 t, F f) {
    if (a.mode == 0) {
        for (u32 s = 0; s <= t; s++) f(s);
    } else if (a.mode == 1) {
        const u32* row = idx + ((size_t)b * a.seq + t) * a.kk;
        for (u32 j = 0; j < a.kk; j++) {
            u32 s = row[j];
            if (s <= t) f(s);
        }
    } else {
        u32 qb = t / a.block;
        const u32* row = idx + ((size_t)b * a.seq + t) * a.kk;
        for (u32 j = 0; j < a.kk; j++) {
            u32 kb = row[j];
            if (kb == NONE_IDX || kb > qb) continue;
            u32 s0 = kb * a.block, s1 = min(s0 + a.block, t + 1);
            for (u32 s = s0; s < s1; s++) f(s);
        }
    }
}

template <typename T, int DPL>
__device__ void attn_fwd(Attn a, const T* q, const T* k, const T* v, const u32* idx, T* o, float* lse) {
    u32 row = blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= a.batch * a.H * a.seq) return;
    u32 t = row % a.seq, bh = row / a.seq, h = bh % a.H, b = bh / a.H, g = h / (a.H / a.KV);
    float qr[DPL], acc[DPL];
    load_row<T, DPL>(q + q_off(a, b, t, h), a.d, qr);
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for_keys(a, idx, b, t, [&](u32 s) {
        size_t ko = k_off(a, b, s, g);
        float x = a.scale * dot_row<T, DPL>(qr, k + ko, a.d);
        float mn = fmaxf(m, x);
        float corr = expf(m - mn), p = expf(x - mn);
        l = l * corr + p;
        u32 lane = threadIdx.x & 31;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            u32 e = lane + 32 * i;
            acc[i] = acc[i] * corr + (e < a.d ? p * ld(v + ko, e) : 0.0f);
        }
        m = mn;
    });
    store_row<T, DPL>(o + q_off(a, b, t, h), a.d, acc, l > 0.0f ? 1.0f / l : 0.0f);
    if ((threadIdx.x & 31) == 0) lse[row] = l > 0.0f ? m + logf(l) : NEG_INF;
}

// D[row] = dO·o for every query row.
template <typename T, int DPL> __device__ void attn_bwd_pre(Attn a, const T* o, const T* d_o, float* D) {
    u32 row = blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= a.batch * a.H * a.seq) return;
    u32 t = row % a.seq, bh = row / a.seq, h = bh % a.H, b = bh / a.H;
    float r[DPL];
    load_row<T, DPL>(o + q_off(a, b, t, h), a.d, r);
    float x = dot_row<T, DPL>(r, d_o + q_off(a, b, t, h), a.d);
    if ((threadIdx.x & 31) == 0) D[row] = x;
}

template <typename T, int DPL>
__device__ void attn_bwd_dq(Attn a, const T* q, const T* k, const T* v, const float* lse, const float* D, const T* d_o,
                            const u32* idx, T* dq) {
    u32 row = blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= a.batch * a.H * a.seq) return;
    u32 t = row % a.seq, bh = row / a.seq, h = bh % a.H, b = bh / a.H, g = h / (a.H / a.KV);
    float qr[DPL], dor[DPL], acc[DPL];
    load_row<T, DPL>(q + q_off(a, b, t, h), a.d, qr);
    load_row<T, DPL>(d_o + q_off(a, b, t, h), a.d, dor);
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
    float l = lse[row], Dt = D[row];
    if (l != NEG_INF) {
        for_keys(a, idx, b, t, [&](u32 s) {
            size_t ko = k_off(a, b, s, g);
            float p = expf(a.scale * dot_row<T, DPL>(qr, k + ko, a.d) - l);
            float ds = p * (dot_row<T, DPL>(dor, v + ko, a.d) - Dt);
            u32 lane = threadIdx.x & 31;
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                u32 e = lane + 32 * i;
                if (e < a.d) acc[i] += a.scale * ds * ld(k + ko, e);
            }
        });
    }
    store_row<T, DPL>(dq + q_off(a, b, t, h), a.d, acc, 1.0f);
}

// One warp per key row (b, g, s): dk, dv over every (query head of group g,
// query t) whose pattern holds s. off/list: the tokens CSR (unused otherwise).
template <typename T, int DPL>
__device__ void attn_bwd_dkdv(Attn a, const T* q, const T* k, const T* v, const float* lse, const float* D, const T* d_o,
                              const u32* idx, const u32* off, const u32* list, T* dk, T* dv) {
    u32 row = blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= a.batch * a.KV * a.seq) return;
    u32 s = row % a.seq, bg = row / a.seq, g = bg % a.KV, b = bg / a.KV, grp = a.H / a.KV;
    u32 lane = threadIdx.x & 31;
    float kr[DPL], vr[DPL], dka[DPL], dva[DPL];
    size_t ko = k_off(a, b, s, g);
    load_row<T, DPL>(k + ko, a.d, kr);
    load_row<T, DPL>(v + ko, a.d, vr);
#pragma unroll
    for (int i = 0; i < DPL; i++) dka[i] = dva[i] = 0.0f;
    auto visit = [&](u32 t) {
        for (u32 h = g * grp; h < (g + 1) * grp; h++) {
            size_t qrow = ((size_t)b * a.H + h) * a.seq + t;
            float l = lse[qrow];
            if (l == NEG_INF) continue;
            size_t qo = q_off(a, b, t, h);
            float p = expf(a.scale * dot_row<T, DPL>(kr, q + qo, a.d) - l);
            float ds = p * (dot_row<T, DPL>(vr, d_o + qo, a.d) - D[qrow]);
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                u32 e = lane + 32 * i;
                if (e < a.d) {
                    dva[i] += p * ld(d_o + qo, e);
                    dka[i] += a.scale * ds * ld(q + qo, e);
                }
            }
        }
    };
    if (a.mode == 0) {
        for (u32 t = s; t < a.seq; t++) visit(t);
    } else if (a.mode == 1) {
        size_t kr0 = (size_t)b * a.seq + s;
        for (u32 p = off[kr0]; p < off[kr0 + 1]; p++) visit(list[p]);
    } else {
        // The queries t >= s whose own row lists the block of s (t/block >= s/block holds).
        u32 kb = s / a.block;
        for (u32 t = s; t < a.seq; t++) {
            const u32* irow = idx + ((size_t)b * a.seq + t) * a.kk;
            int found = 0;
            for (u32 j = lane; j < a.kk; j += 32) found |= irow[j] == kb;
            if (__any_sync(0xffffffffu, found)) visit(t);
        }
    }
    store_row<T, DPL>(dk + ko, a.d, dka, 1.0f);
    store_row<T, DPL>(dv + ko, a.d, dva, 1.0f);
}

// Tiled kernels for the dense and the blocks pattern, d <= 128. A 32-query
// tile works against 32-key tiles staged once in shared memory (as f32) for
// all 32 queries; warp w owns rows 8w..8w+7 of its own tile, lane l takes
// column l of the other tile for dot products and dims l, l+32, ... for
// accumulation.
//
// Blocks: query t attends to the keys s <= t of the key blocks in ITS OWN idx
// row. A query tile visits the union of its queries' key tiles (a bitmask over
// key tiles in shared memory, built from the 32 rows) in ascending order, and
// per key tile every query gets a 32-bit mask of its own keys (tile_qmask).
// A query whose mask is empty for a key tile skips that tile entirely, so what
// query t computes (the tiles it reduces over, their order, every operation)
// depends on its own key set only, never on what its neighbours selected: the
// selection stays per query and causal. Dense is the same loop with the causal
// masks s <= t and every key tile up to the diagonal.
#define TQ 32
#define TK 32

// Carves the dynamic shared memory: n_rows row tiles of [32][DPL·32+1] floats,
// then n_p tiles of [WARPS][8][32] floats, then u32 words: 32 query masks and
// the key-tile bitmask of the union (ceil(ceil(seq/32)/32) words).
template <int DPL> struct TiledSmem {
    typedef float Row[DPL * 32 + 1];
    typedef float PTile[8][32];
    static __device__ __forceinline__ Row* rows(float* base, int i) { return (Row*)(base + i * 32 * (DPL * 32 + 1)); }
    static __device__ __forceinline__ PTile* ps(float* base, int n_rows, int i) {
        return (PTile*)(base + n_rows * 32 * (DPL * 32 + 1) + i * WARPS * 8 * 32);
    }
    static __device__ __forceinline__ u32* words(float* base, int n_rows, int n_p) {
        return (u32*)(base + n_rows * 32 * (DPL * 32 + 1) + n_p * WARPS * 8 * 32);
    }
};

// Bits lo..hi-1 of a word (lo < hi <= 32).
__device__ __forceinline__ u32 bit_range(u32 lo, u32 hi) {
    return (hi >= 32 ? 0xffffffffu : (1u << hi) - 1u) & ~((1u << lo) - 1u);
}

// The keys k0..k0+31 that query t attends to, as bits, from the entries
// part, part+nparts, ... of its idx row (blocks) or s <= t (dense).
__device__ __forceinline__ u32 tile_qmask(const Attn& a, const u32* idx, u32 b, u32 t, u32 k0, u32 part, u32 nparts) {
    if (t >= a.seq || t < k0) return 0u;
    u32 kend = min(k0 + TK, t + 1);
    if (a.mode == 0) return part == 0 ? bit_range(0, kend - k0) : 0u;
    const u32* row = idx + ((size_t)b * a.seq + t) * a.kk;
    u32 qb = t / a.block, m = 0u;
    for (u32 j = part; j < a.kk; j += nparts) {
        u32 kb = row[j];
        if (kb == NONE_IDX || kb > qb) continue;
        u32 lo = max(kb * a.block, k0), hi = min(kb * a.block + a.block, kend);
        if (lo < hi) m |= bit_range(lo - k0, hi - k0);
    }
    return m;
}

// The masks of queries t0..t0+31 against key tile k0 into qm[32]: four
// threads per query split its row (block of 128 threads). The caller syncs.
__device__ __forceinline__ u32 tile_qmasks(const Attn& a, const u32* idx, u32 b, u32 t0, u32 k0, u32* qm) {
    u32 tid = threadIdx.x;
    u32 m = tile_qmask(a, idx, b, t0 + (tid >> 2), k0, tid & 3, 4);
    m |= __shfl_xor_sync(0xffffffffu, m, 1);
    m |= __shfl_xor_sync(0xffffffffu, m, 2);
    if ((tid & 3) == 0) qm[tid >> 2] = m;
    return m;
}

// The key tiles (bit kt of words[kt/32]) that any query of the tile t0..t0+31
// attends to. Ends with a block sync.
__device__ __forceinline__ void tile_union(const Attn& a, const u32* idx, u32 b, u32 t0, u32* words) {
    u32 tid = threadIdx.x, last = min(t0 + TQ, a.seq) - 1, nw = last / TK / 32 + 1;
    for (u32 x = tid; x < nw; x += WARPS * 32) {
        // Dense: every key tile up to the diagonal.
        u32 lo = x * 32, hi = min(lo + 32, last / TK + 1);
        words[x] = a.mode == 0 && lo < hi ? bit_range(0, hi - lo) : 0u;
    }
    __syncthreads();
    if (a.mode != 0) {
        for (u32 x = tid; x < TQ * a.kk; x += WARPS * 32) {
            u32 t = t0 + x / a.kk;
            if (t >= a.seq) continue;
            u32 kb = idx[((size_t)b * a.seq + t) * a.kk + x % a.kk];
            if (kb == NONE_IDX || kb > t / a.block) continue;
            u32 s1 = min(kb * a.block + a.block, t + 1) - 1;
            for (u32 kt = kb * a.block / TK; kt <= s1 / TK; kt++) atomicOr(&words[kt >> 5], 1u << (kt & 31));
        }
    }
    __syncthreads();
}

// Walks the set bits of words[0..nw) ascending, yielding key tile starts k0.
// Uniform across the block: every thread reads the same shared words.
struct KeyTiles {
    const u32* words;
    u32 nw, wi, word;
    __device__ __forceinline__ KeyTiles(const u32* w, u32 n) : words(w), nw(n), wi(0), word(w[0]) {}
    __device__ __forceinline__ bool next(u32& k0) {
        while (word == 0u) {
            if (++wi >= nw) return false;
            word = words[wi];
        }
        k0 = (wi * 32 + (u32)(__ffs(word) - 1)) * TK;
        word &= word - 1u;
        return true;
    }
};

template <typename T, int DPL>
__device__ void attn_fwd_tiled(Attn a, const T* q, const T* k, const T* v, const u32* idx, T* o, float* lse) {
    extern __shared__ float smem_tiled[];
    typedef TiledSmem<DPL> S;
    typename S::Row* Qs = S::rows(smem_tiled, 0);
    typename S::Row* Ks = S::rows(smem_tiled, 1);
    typename S::Row* Vs = S::rows(smem_tiled, 2);
    typename S::PTile* Ps = S::ps(smem_tiled, 3, 0);
    u32* qm = S::words(smem_tiled, 3, 1);
    u32* kts = qm + TQ;
    // Heavy (late) query tiles start first.
    u32 qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (a.H / a.KV);
    u32 tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    u32 t0 = qt * TQ, d = a.d;
    for (u32 x = tid; x < TQ * d; x += WARPS * 32) {
        u32 r = x / d, e = x % d, t = t0 + r;
        Qs[r][e] = t < a.seq ? ld(q + q_off(a, b, t, h), e) : 0.0f;
    }
    float m[8], l[8], acc[8][DPL];
#pragma unroll
    for (int r = 0; r < 8; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[r][i] = 0.0f;
    }
    tile_union(a, idx, b, t0, kts);
    KeyTiles tiles(kts, (min(t0 + TQ, a.seq) - 1) / TK / 32 + 1);
    for (u32 k0; tiles.next(k0);) {
        __syncthreads();
        for (u32 x = tid; x < TK * d; x += WARPS * 32) {
            u32 j = x / d, e = x % d, s = k0 + j;
            bool in = s < a.seq;
            size_t ko = k_off(a, b, in ? s : 0, g);
            Ks[j][e] = in ? ld(k + ko, e) : 0.0f;
            Vs[j][e] = in ? ld(v + ko, e) : 0.0f;
        }
        tile_qmasks(a, idx, b, t0, k0, qm);
        __syncthreads();
        u32 live = 0;
#pragma unroll
        for (int r = 0; r < 8; r++) {
            u32 mask = qm[w * 8 + r];
            if (mask == 0u) continue;  // warp-uniform: no key of this tile for query r
            live |= 1u << r;
            float x = 0.0f;
            for (u32 e = 0; e < d; e++) x += Qs[w * 8 + r][e] * Ks[lane][e];
            x = (mask >> lane) & 1u ? a.scale * x : NEG_INF;
            float mn = fmaxf(m[r], warp_max(x));
            float p = 0.0f, corr = 1.0f;
            if (mn != NEG_INF) {
                corr = expf(m[r] - mn);
                p = expf(x - mn);
                m[r] = mn;
            }
            l[r] = l[r] * corr + warp_sum(p);
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[r][i] *= corr;
            Ps[w][r][lane] = p;
        }
        __syncwarp();
        for (u32 j = 0; j < TK; j++) {
            float vj[DPL];
#pragma unroll
            for (int i = 0; i < DPL; i++) vj[i] = lane + 32 * i < d ? Vs[j][lane + 32 * i] : 0.0f;
#pragma unroll
            for (int r = 0; r < 8; r++) {
                if (!((live >> r) & 1u)) continue;
                float p = Ps[w][r][j];
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[r][i] += p * vj[i];
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
        u32 t = t0 + w * 8 + r;
        if (t >= a.seq) continue;
        store_row<T, DPL>(o + q_off(a, b, t, h), d, acc[r], l[r] > 0.0f ? 1.0f / l[r] : 0.0f);
        if (lane == 0) lse[((size_t)b * a.H + h) * a.seq + t] = l[r] > 0.0f ? m[r] + logf(l[r]) : NEG_INF;
    }
}

#define ATTN_TILED_DPL(S, T, N) \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_fwd_tiled_##S##_d##N(Attn a, const T* q, const T* k, const T* v, const u32* idx, T* o, float* lse) { \
        attn_fwd_tiled<T, N>(a, q, k, v, idx, o, lse); }
#define ATTN_TILED(S, T) ATTN_TILED_DPL(S, T, 1) ATTN_TILED_DPL(S, T, 2) ATTN_TILED_DPL(S, T, 4)
FOR_FLOATS(ATTN_TILED)

// Tiled backward (same conditions as the tiled forward). dq: one block per
// (b, h, 32-query tile) over the union of its key tiles, per-query masks as in
// the forward. dk/dv: one block per (b, kv head g, 32-key tile) over the query
// tiles (and the heads of group g) with a query that attends to a key of the
// tile (found from the same per-query masks; sums over queries t >= s whose
// own row lists the block of s).
template <typename T, int DPL>
__device__ void attn_bwd_dq_tiled(Attn a, const T* q, const T* k, const T* v, const float* lse, const float* D,
                                  const T* d_o, const u32* idx, T* dq) {
    extern __shared__ float smem_tiled[];
    typedef TiledSmem<DPL> S;
    typename S::Row *Qs = S::rows(smem_tiled, 0), *dOs = S::rows(smem_tiled, 1);
    typename S::Row *Ks = S::rows(smem_tiled, 2), *Vs = S::rows(smem_tiled, 3);
    typename S::PTile* Ps = S::ps(smem_tiled, 4, 0);
    u32* qm = S::words(smem_tiled, 4, 1);
    u32* kts = qm + TQ;
    u32 qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (a.H / a.KV);
    u32 tid = threadIdx.x, lane = tid & 31, w = tid >> 5, d = a.d, t0 = qt * TQ;
    for (u32 x = tid; x < TQ * d; x += WARPS * 32) {
        u32 r = x / d, e = x % d, t = t0 + r;
        bool in = t < a.seq;
        size_t qo = q_off(a, b, in ? t : 0, h);
        Qs[r][e] = in ? ld(q + qo, e) : 0.0f;
        dOs[r][e] = in ? ld(d_o + qo, e) : 0.0f;
    }
    float L[8], Dr[8], acc[8][DPL];
#pragma unroll
    for (int r = 0; r < 8; r++) {
        u32 t = t0 + w * 8 + r;
        size_t row = ((size_t)b * a.H + h) * a.seq + t;
        L[r] = t < a.seq ? lse[row] : NEG_INF;
        Dr[r] = t < a.seq ? D[row] : 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[r][i] = 0.0f;
    }
    tile_union(a, idx, b, t0, kts);
    KeyTiles tiles(kts, (min(t0 + TQ, a.seq) - 1) / TK / 32 + 1);
    for (u32 k0; tiles.next(k0);) {
        __syncthreads();
        for (u32 x = tid; x < TK * d; x += WARPS * 32) {
            u32 j = x / d, e = x % d, s = k0 + j;
            bool in = s < a.seq;
            size_t ko = k_off(a, b, in ? s : 0, g);
            Ks[j][e] = in ? ld(k + ko, e) : 0.0f;
            Vs[j][e] = in ? ld(v + ko, e) : 0.0f;
        }
        tile_qmasks(a, idx, b, t0, k0, qm);
        __syncthreads();
        u32 live = 0;
#pragma unroll
        for (int r = 0; r < 8; r++) {
            u32 mask = qm[w * 8 + r];
            if (mask == 0u || L[r] == NEG_INF) continue;  // warp-uniform
            live |= 1u << r;
            float x = 0.0f, dp = 0.0f;
            for (u32 e = 0; e < d; e++) {
                x += Qs[w * 8 + r][e] * Ks[lane][e];
                dp += dOs[w * 8 + r][e] * Vs[lane][e];
            }
            float p = (mask >> lane) & 1u ? expf(a.scale * x - L[r]) : 0.0f;
            Ps[w][r][lane] = p * (dp - Dr[r]);
        }
        __syncwarp();
        for (u32 j = 0; j < TK; j++) {
            float kj[DPL];
#pragma unroll
            for (int i = 0; i < DPL; i++) kj[i] = Ks[j][lane + 32 * i < d ? lane + 32 * i : 0];
#pragma unroll
            for (int r = 0; r < 8; r++) {
                if (!((live >> r) & 1u)) continue;
                float ds = Ps[w][r][j];
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[r][i] += a.scale * ds * kj[i];
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
        u32 t = t0 + w * 8 + r;
        if (t < a.seq) store_row<T, DPL>(dq + q_off(a, b, t, h), d, acc[r], 1.0f);
    }
}

template <typename T, int DPL>
__device__ void attn_bwd_dkdv_tiled(Attn a, const T* q, const T* k, const T* v, const float* lse, const float* D,
                                    const T* d_o, const u32* idx, T* dk, T* dv) {
    extern __shared__ float smem_tiled[];
    typedef TiledSmem<DPL> S;
    typename S::Row *Ks = S::rows(smem_tiled, 0), *Vs = S::rows(smem_tiled, 1);
    typename S::Row *Qs = S::rows(smem_tiled, 2), *dOs = S::rows(smem_tiled, 3);
    typename S::PTile *Ps = S::ps(smem_tiled, 4, 0), *Ds = S::ps(smem_tiled, 4, 1);
    u32* qm = S::words(smem_tiled, 4, 2);
    u32 kt = blockIdx.x, g = blockIdx.y, b = blockIdx.z, grp = a.H / a.KV;
    u32 tid = threadIdx.x, lane = tid & 31, w = tid >> 5, d = a.d, k0 = kt * TK;
    for (u32 x = tid; x < TK * d; x += WARPS * 32) {
        u32 j = x / d, e = x % d, s = k0 + j;
        bool in = s < a.seq;
        size_t ko = k_off(a, b, in ? s : 0, g);
        Ks[j][e] = in ? ld(k + ko, e) : 0.0f;
        Vs[j][e] = in ? ld(v + ko, e) : 0.0f;
    }
    float dka[8][DPL], dva[8][DPL];
#pragma unroll
    for (int r = 0; r < 8; r++)
#pragma unroll
        for (int i = 0; i < DPL; i++) dka[r][i] = dva[r][i] = 0.0f;
    for (u32 t0 = k0 - k0 % TQ; t0 < a.seq; t0 += TQ) {
        __syncthreads();  // the previous query tile's masks are read
        u32 m = tile_qmasks(a, idx, b, t0, k0, qm);
        if (!__syncthreads_or(m != 0u)) continue;  // no query of this tile attends to the key tile
        u32 mask = qm[lane];  // the keys query t0 + lane attends to
        for (u32 h = g * grp; h < (g + 1) * grp; h++) {
            __syncthreads();
            for (u32 x = tid; x < TQ * d; x += WARPS * 32) {
                u32 r = x / d, e = x % d, t = t0 + r;
                bool in = t < a.seq;
                size_t qo = q_off(a, b, in ? t : 0, h);
                Qs[r][e] = in ? ld(q + qo, e) : 0.0f;
                dOs[r][e] = in ? ld(d_o + qo, e) : 0.0f;
            }
            __syncthreads();
            u32 t = t0 + lane;
            size_t row = ((size_t)b * a.H + h) * a.seq + t;
            float Lt = t < a.seq ? lse[row] : NEG_INF, Dt = t < a.seq ? D[row] : 0.0f;
#pragma unroll
            for (int r = 0; r < 8; r++) {
                float x = 0.0f, dp = 0.0f;
                for (u32 e = 0; e < d; e++) {
                    x += Ks[w * 8 + r][e] * Qs[lane][e];
                    dp += Vs[w * 8 + r][e] * dOs[lane][e];
                }
                bool valid = ((mask >> (w * 8 + r)) & 1u) && Lt != NEG_INF;
                float p = valid ? expf(a.scale * x - Lt) : 0.0f;
                Ps[w][r][lane] = p;
                Ds[w][r][lane] = p * (dp - Dt);
            }
            __syncwarp();
            for (u32 j = 0; j < TQ; j++) {
                float qj[DPL], oj[DPL];
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    u32 e = lane + 32 * i < d ? lane + 32 * i : 0;
                    qj[i] = Qs[j][e];
                    oj[i] = dOs[j][e];
                }
#pragma unroll
                for (int r = 0; r < 8; r++) {
                    float p = Ps[w][r][j], ds = Ds[w][r][j];
#pragma unroll
                    for (int i = 0; i < DPL; i++) {
                        dva[r][i] += p * oj[i];
                        dka[r][i] += a.scale * ds * qj[i];
                    }
                }
            }
            __syncwarp();
        }
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
        u32 s = k0 + w * 8 + r;
        if (s >= a.seq) continue;
        size_t ko = k_off(a, b, s, g);
        store_row<T, DPL>(dk + ko, d, dka[r], 1.0f);
        store_row<T, DPL>(dv + ko, d, dva[r], 1.0f);
    }
}

#define ATTN_BWD_TILED_DPL(S, T, N) \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_bwd_dq_tiled_##S##_d##N(Attn a, const T* q, const T* k, const T* v, const float* lse, const float* D, const T* d_o, const u32* idx, T* dq) { \
        attn_bwd_dq_tiled<T, N>(a, q, k, v, lse, D, d_o, idx, dq); } \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_bwd_dkdv_tiled_##S##_d##N(Attn a, const T* q, const T* k, const T* v, const float* lse, const float* D, const T* d_o, const u32* idx, T* dk, T* dv) { \
        attn_bwd_dkdv_tiled<T, N>(a, q, k, v, lse, D, d_o, idx, dk, dv); }
#define ATTN_BWD_TILED(S, T) ATTN_BWD_TILED_DPL(S, T, 1) ATTN_BWD_TILED_DPL(S, T, 2) ATTN_BWD_TILED_DPL(S, T, 4)
FOR_FLOATS(ATTN_BWD_TILED)

// ---- tokens CSR: for each key (b, s), the queries t that list it, ascending.

extern "C" __global__ void csr_zero(u32* x, u32 n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) x[i] = 0u;
}

// One thread per idx entry (b, t, j): count[b·seq + s] += 1 for valid s <= t.
extern "C" __global__ void csr_count(const u32* idx, u32* count, u32 batch, u32 seq, u32 kk) {
    size_t n = (size_t)batch * seq * kk;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        u32 t = (u32)((i / kk) % seq);
        size_t b = i / ((size_t)kk * seq);
        u32 s = idx[i];
        if (s <= t) atomicAdd(&count[b * seq + s], 1u);
    }
}

// Exclusive scan of count[0..n) into off[0..n] and cursor[0..n); one block of 1024.
extern "C" __global__ void csr_scan(const u32* count, u32* off, u32* cursor, u32 n) {
    __shared__ u32 wsum[32];
    __shared__ u32 carry;
    u32 lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (u32 base = 0; base < n; base += blockDim.x) {
        u32 i = base + threadIdx.x;
        u32 x = i < n ? count[i] : 0u, inc = x;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            u32 y = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= (u32)o) inc += y;
        }
        if (lane == 31) wsum[wid] = inc;
        __syncthreads();
        if (wid == 0) {
            u32 w = wsum[lane], wi = w;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                u32 y = __shfl_up_sync(0xffffffffu, wi, o);
                if (lane >= (u32)o) wi += y;
            }
            wsum[lane] = wi - w;
        }
        __syncthreads();
        u32 excl = carry + wsum[wid] + inc - x;
        if (i < n) {
            off[i] = excl;
            cursor[i] = excl;
        }
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) carry = excl + x;
        __syncthreads();
    }
    if (threadIdx.x == 0) off[n] = carry;
}

extern "C" __global__ void csr_fill(const u32* idx, u32* cursor, u32* list, u32 batch, u32 seq, u32 kk) {
    size_t n = (size_t)batch * seq * kk;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        u32 t = (u32)((i / kk) % seq);
        size_t b = i / ((size_t)kk * seq);
        u32 s = idx[i];
        if (s <= t) list[atomicAdd(&cursor[b * seq + s], 1u)] = t;
    }
}

// One warp per key: sorted[off + rank(t)] = t, rank = number of smaller t in
// the key's list (the t are distinct), so the result does not depend on the
// order csr_fill wrote them in.
extern "C" __global__ void csr_sort(const u32* off, const u32* list, u32* sorted, u32 n) {
    u32 key = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (key >= n) return;
    u32 lo = off[key], hi = off[key + 1];
    for (u32 p = lo + lane; p < hi; p += 32) {
        u32 t = list[p], rank = 0;
        for (u32 r = lo; r < hi; r++) rank += list[r] < t;
        sorted[lo + rank] = t;
    }
}

// ---- indexer KL loss (main attention detached) over the tile of query rows
// q0 .. q0 + nq. scores, dscores: [batch, nq, seq] f32 (row r is query q0 + r);
// loss: [batch, seq] f32, written at the tile's rows. Rows t with t % every != phase
// (outside the row sample) get loss 0 and a zero dscores row. One warp per query row (b, t):
//   p(s) = (1/H)·Σ_h exp(scale·q_h·k_s - lse_h), r = softmax_{K(t)} I(t, ·),
//   loss = Σ_{s∈K(t)} p·(ln p - ln r), dscores = r - p on K(t), 0 elsewhere.
template <typename T, int DPL>
__device__ void indexer_kl(Attn a, const T* q, const T* k, const float* lse, const float* scores, const u32* idx,
                           float* loss, float* dscores, u32 q0, u32 nq, u32 every, u32 phase) {
    u32 row = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= a.batch * nq) return;
    u32 t = q0 + row % nq, b = row / nq;
    size_t lrow = (size_t)b * a.seq + t;
    const float* sc = scores + (size_t)row * a.seq;
    float* ds = dscores + (size_t)row * a.seq;
    for (u32 j = lane; j < a.seq; j += 32) ds[j] = 0.0f;
    __syncwarp();
    if (t % every != phase) {  // a row outside the sample: zero loss and gradient
        if (lane == 0) loss[lrow] = 0.0f;
        return;
    }
    float m = NEG_INF, z = 0.0f;
    u32 nkeys = 0;
    for_keys(a, idx, b, t, [&](u32 s) {
        lse_merge(m, z, sc[s], 1.0f);
        nkeys++;
    });
    if (nkeys == 0) {
        if (lane == 0) loss[lrow] = 0.0f;
        return;
    }
    float logz = m + logf(z);
    float total = 0.0f;
    u32 grp = a.H / a.KV;
    for_keys(a, idx, b, t, [&](u32 s) {
        float p = 0.0f;
        for (u32 h = 0; h < a.H; h++) {
            float l = lse[((size_t)b * a.H + h) * a.seq + t];
            if (l == NEG_INF) continue;
            float qr[DPL];
            load_row<T, DPL>(q + q_off(a, b, t, h), a.d, qr);
            float x = dot_row<T, DPL>(qr, k + k_off(a, b, s, h / grp), a.d);
            p += expf(a.scale * x - l) / (float)a.H;
        }
        float log_r = sc[s] - logz;
        if (p > 0.0f) total += p * (logf(p) - log_r);
        if (lane == 0) ds[s] = expf(log_r) - p;
    });
    if (lane == 0) loss[lrow] = total;
}

#define ATTN_DPL(S, T, N) \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_fwd_##S##_d##N(Attn a, const T* q, const T* k, const T* v, const u32* idx, T* o, float* lse) { \
        attn_fwd<T, N>(a, q, k, v, idx, o, lse); } \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_bwd_pre_##S##_d##N(Attn a, const T* o, const T* d_o, float* D) { \
        attn_bwd_pre<T, N>(a, o, d_o, D); } \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_bwd_dq_##S##_d##N(Attn a, const T* q, const T* k, const T* v, const float* lse, const float* D, const T* d_o, const u32* idx, T* dq) { \
        attn_bwd_dq<T, N>(a, q, k, v, lse, D, d_o, idx, dq); } \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_bwd_dkdv_##S##_d##N(Attn a, const T* q, const T* k, const T* v, const float* lse, const float* D, const T* d_o, const u32* idx, const u32* off, const u32* list, T* dk, T* dv) { \
        attn_bwd_dkdv<T, N>(a, q, k, v, lse, D, d_o, idx, off, list, dk, dv); } \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) indexer_kl_##S##_d##N(Attn a, const T* q, const T* k, const float* lse, const float* scores, const u32* idx, float* loss, float* dscores, u32 q0, u32 nq, u32 every, u32 phase) { \
        indexer_kl<T, N>(a, q, k, lse, scores, idx, loss, dscores, q0, nq, every, phase); }
#define ATTN(S, T) ATTN_DPL(S, T, 1) ATTN_DPL(S, T, 2) ATTN_DPL(S, T, 4) ATTN_DPL(S, T, 8)
FOR_FLOATS(ATTN)
