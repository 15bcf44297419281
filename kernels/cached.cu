// Inference over a paged KV cache (forward only). Semantics:
// src/attention/cached.rs. A step runs R query rows; the row table
// rows: u32 [R, 2] = (base, len) says that row r's keys are its sequence's
// tokens 0 .. len and that its query sits at position len-1; the sequence's
// page table starts at entry base of pages: u32 [P]. Key s lives in cache row
//   key_row(s) = min(pages[min(base + s/page, P-1)], slots/page - 1)·page + s % page
// (Paging::key_row). Every kernel clamps a row first: len <= page·(P - base),
// 0 when base >= P; so no read leaves the table or the cache, whatever they
// hold. Keys are walked in logical order (splits and tiles are ranges of
// positions) and only their addresses go through the table, so the result
// does not depend on where the pages lie. Layouts: q, o [R, H, d]; caches
// k, v [slots, KV, d]; the indexer's q_i [R, H_I, D], w [R, H_I], cached
// k_i [slots, D].
//
//   rope_rows:   y = rope(x) at position min(len-1, max_pos-1) of its row
//   cache_write: cache[key_row(len-1)] = src[r] (skipped when len = 0)
//   indexer:     pooled[r, b] = max_{s in b, s < len} Σ_j w[r,j]·ReLU(q_i[r,j]·k_i[key_row(s)]), -inf if none
//   select:      the k best key blocks among 0..=t/block (t = len-1): own block,
//                sink block 0, then the best others; ascending, NONE-padded
//   attention:   o = Σ_s softmax_s(scale·q·k_s)·v_s over keys 0..len (dense)
//                or over the row's own valid blocks idx[r] (blocks); o = 0 without keys

// A step's paging: the page tables, rows per page, table entries, physical pages.
struct Paging {
    const u32* pages;
    u32 page, P, nphys;
};

__device__ __forceinline__ Paging make_paging(const u32* pages, u32 page, u32 P, u32 slots) {
    Paging pg;
    pg.pages = pages;
    pg.page = page;
    pg.P = P;
    pg.nphys = slots / page;
    return pg;
}

// Row r's (base, len), len clamped to what its page table can hold.
__device__ __forceinline__ void row_of(const u32* rows, size_t r, const Paging& pg, u32& base, u32& len) {
    base = rows[2 * r];
    u32 l = rows[2 * r + 1];
    len = base < pg.P ? (u32)min((u64)l, (u64)pg.page * (pg.P - base)) : 0u;
}

// Cache row of key s of a row whose page table starts at base (base < P).
__device__ __forceinline__ size_t key_row(const Paging& pg, u32 base, u32 s) {
    u32 e = (u32)min((u64)base + s / pg.page, (u64)pg.P - 1);
    u32 ph = min(pg.pages[e], pg.nphys - 1);
    return (size_t)ph * pg.page + s % pg.page;
}

// ---- rope_rows: one thread per (row, head, pair), half-split convention
// (as rope.cu): y[i] = x[i]·c - x[i+d/2]·s, y[i+d/2] = x[i]·s + x[i+d/2]·c.
template <typename T>
__device__ void rope_rows(const T* x, const float* cosv, const float* sinv, const u32* rows, T* y, u32 pairs,
                          u32 heads, u32 half, u32 max_pos) {
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        size_t vec = p / half;
        u32 i = (u32)(p % half);
        u32 len = rows[2 * (vec / heads) + 1];
        u32 pos = min(len > 0 ? len - 1 : 0u, max_pos - 1);
        float c = cosv[(size_t)pos * half + i], s = sinv[(size_t)pos * half + i];
        size_t base = vec * 2 * half;
        float a = ld(x, base + i), b = ld(x, base + i + half);
        st(y, base + i, a * c - b * s);
        st(y, base + i + half, a * s + b * c);
    }
}

// ---- cache_write: one thread per element, the bits copied as they are.
template <typename T>
__device__ void cache_write(const T* src, const u32* rows, const u32* pages, T* cache, u32 n_rows, u32 width,
                            u32 slots, u32 page, u32 P) {
    Paging pg = make_paging(pages, page, P, slots);
    size_t total = (size_t)n_rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / width;
        u32 base, len;
        row_of(rows, r, pg, base, len);
        if (len == 0) continue;
        cache[key_row(pg, base, len - 1) * width + i % width] = src[i];
    }
}

// ---- cached indexer: grid (ceil(cols/nbt), min(R, 65535)), CI_THREADS threads;
// a block scores the keys of nbt key blocks of one row (nbt = CI_THREADS/block
// when block <= CI_THREADS/2, one thread per key, then a max per key block;
// else nbt = 1 and the threads stride over the block's keys, then a block max).
// q_i and w are staged in shared memory as f32 (dynamic: H·D + H + CI_THREADS
// floats). The score sums in the order of indexer.cu's index_score, so a
// cached query pools the same floats as in the full-window pass.
#define CI_THREADS 256

__device__ __forceinline__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : NEG_INF;
    return warp_max(v);
}

template <typename K>
__device__ __forceinline__ float cached_index_score(const float* qs, const K* ks, const float* ws, u32 H, u32 D) {
    float acc = 0.0f;
    for (u32 j = 0; j < H; j++) {
        float l = 0.0f;
        for (u32 e = 0; e < D; e++) l += qs[(size_t)j * D + e] * ld(ks, e);
        acc += ws[j] * fmaxf(l, 0.0f);
    }
    return acc;
}

template <typename T>
__device__ void cached_indexer_block_scores(const T* qi, const T* w, const T* ki, const u32* rows, const u32* pages,
                                            float* pooled, u32 R, u32 H, u32 D, u32 block, u32 cols, u32 slots,
                                            u32 page, u32 P, u32 nbt) {
    extern __shared__ float ci_smem[];
    __shared__ float red[32];
    float* qs = ci_smem;
    float* ws = qs + H * D;
    float* sc = ws + H;
    Paging pg = make_paging(pages, page, P, slots);
    u32 tid = threadIdx.x, kb0 = blockIdx.x * nbt, kb1 = min(kb0 + nbt, cols);
    for (u32 r = blockIdx.y; r < R; r += gridDim.y) {
        u32 base, len;
        row_of(rows, r, pg, base, len);
        len = (u32)min((u64)len, (u64)cols * block);
        __syncthreads();  // the previous row is done with qs, ws, sc
        for (u32 x = tid; x < H * D; x += blockDim.x) qs[x] = ld(qi, (size_t)r * H * D + x);
        for (u32 x = tid; x < H; x += blockDim.x) ws[x] = ld(w, (size_t)r * H + x);
        __syncthreads();
        u64 s0 = (u64)kb0 * block;
        u32 klen = s0 < len ? (u32)min((u64)len - s0, (u64)(kb1 - kb0) * block) : 0u;
        if (nbt == 1) {
            float mx = NEG_INF;
            for (u32 i = tid; i < klen; i += blockDim.x)  // fmaxf drops NaN
                mx = fmaxf(mx, cached_index_score(qs, ki + key_row(pg, base, (u32)s0 + i) * D, ws, H, D));
            mx = block_max(mx, red);
            if (tid == 0) pooled[(size_t)r * cols + kb0] = mx;
        } else {
            sc[tid] = tid < klen ? cached_index_score(qs, ki + key_row(pg, base, (u32)s0 + tid) * D, ws, H, D) : NEG_INF;
            __syncthreads();
            if (tid < kb1 - kb0) {
                float mx = NEG_INF;
                for (u32 j = 0; j < block; j++) mx = fmaxf(mx, sc[tid * block + j]);
                pooled[(size_t)r * cols + kb0 + tid] = mx;
            }
        }
    }
}

// ---- cached select: one block (CS_THREADS) per row; the radix select of
// select.cu (see there) on row r's pooled scores with its own last block
// t/block = min((len-1)/block, cols-1) (len 0 counts as position 0).
#define CS_THREADS 256

__device__ __forceinline__ u64 cs_key(float v, u32 c) {
    u32 bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) bits = 0xff800000u;  // NaN -> -inf
    if ((bits & 0x7fffffffu) == 0u) bits = 0u;                    // -0 -> +0
    u32 ord = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((u64)ord << 32) | (u64)(~c);
}

extern "C" __global__ void __launch_bounds__(CS_THREADS)
cached_select(const float* scores, const u32* rows, u32* idx, u32 n_rows, u32 cols, u32 k, u32 block) {
    __shared__ u32 hist[256];
    __shared__ u64 prefix_sh;
    __shared__ u32 wcount[CS_THREADS / 32];
    u32 tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    for (u32 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        u32 len = rows[2 * row + 1];
        u32 r = min((len > 0 ? len - 1 : 0u) / block, cols - 1);
        const float* sc = scores + (size_t)row * cols;
        u32* out = idx + (size_t)row * k;
        u32 keep_local = k >= 1, keep_sink = r > 0 && k >= 2, c0 = 1, c1 = r > 1 ? r : 1;
        u32 budget = k - keep_local - keep_sink, ncand = c1 - c0, kk = min(budget, ncand);
        u64 prefix = 0, mask = 0;
        if (kk > 0 && kk < ncand) {
            u32 remaining = kk;
            for (int pass = 0; pass < 8; pass++) {
                int shift = 56 - 8 * pass;
                hist[tid] = 0;
                __syncthreads();
                for (u32 c = c0 + tid; c < c1; c += CS_THREADS) {
                    u64 key = cs_key(sc[c], c);
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
        u64 thresh = kk == 0 ? ~(u64)0 : (kk < ncand ? prefix : 0);
        // Sink, kept candidates ascending, the local block, NONE.
        u32 pos = 0;
        if (keep_sink || (keep_local && r == 0)) {
            if (tid == 0) out[0] = 0;
            pos = 1;
        }
        if (kk > 0) {
            for (u32 cb = c0; cb < c1; cb += CS_THREADS) {
                u32 c = cb + tid;
                bool keep = c < c1 && cs_key(sc[c], c) >= thresh;
                u32 ball = __ballot_sync(0xffffffffu, keep);
                if (lane == 0) wcount[wid] = __popc(ball);
                __syncthreads();
                u32 before = 0, total = 0;
                for (u32 w = 0; w < CS_THREADS / 32; w++) {
                    if (w < wid) before += wcount[w];
                    total += wcount[w];
                }
                if (keep) out[pos + before + __popc(ball & ((1u << lane) - 1u))] = c;
                pos += total;
                __syncthreads();
            }
        }
        if (keep_local && r > 0) {
            if (tid == 0) out[pos] = r;
            pos += 1;
        }
        for (u32 j = pos + tid; j < k; j += CS_THREADS) out[j] = NONE_IDX;
        __syncthreads();
    }
}

// ---- cached attention, flash-decoding. Grid (nsplit, KV·nhc, min(R, 65535)),
// CA_WARPS warps. A block takes one row r, kv head g, a chunk of hpc query
// heads of g's group (hpc = min(group, CA_WARPS), nhc = ceil(group/hpc)
// chunks) and the split sp of the row's keys: dense, the keys
// [len·sp/ns, len·(sp+1)/ns) with ns = min(nsplit, ceil(len/CA_SPLIT_KEYS))
// (splits sp >= ns are empty), so a row's splits depend on its own length
// and nsplit only; blocks, the entries [n·sp/nsplit, n·(sp+1)/nsplit) of
// idx[r] (each a key block clipped to len, NONE and blocks past the row's
// own skipped). Keys go through shared memory in tiles of tk logical
// positions of K and V (as f32: 2·tk·d floats of dynamic shared memory),
// warp w loading keys w, w + CA_WARPS, ... of the tile, each from its own
// cache row (a tile, or a key block, may straddle pages), once for all hpc
// heads: the GQA sharing. Warp w serves head
// slot w / wph (wph = CA_WARPS / hpc warps per head) and the keys j ≡ w mod wph
// of each tile, with the online softmax of attn_fwd (lanes split d, DPL dims
// each); the wph partial states of a head are merged in shared memory. With
// nsplit = 1 the block writes o; else it writes its unnormalised state
// (acc = Σ e^{x-m}·v, m, l = Σ e^{x-m}) to part_acc [R, H, nsplit, d] and
// part_ml [R, H, nsplit, 2], and cached_attn_merge combines the splits:
//   M = max_j m_j, L = Σ_j l_j·e^{m_j-M}, o = Σ_j acc_j·e^{m_j-M} / L.
#define CA_WARPS 4
// Fewest keys per dense split (MIN_SPLIT_KEYS of cached.rs).
#define CA_SPLIT_KEYS 64
// Rows per prefill tile of cached_attn_run, and the fewest rows a tile needs
// to count as a run.
#define RUN_ROWS 32
#define RUN_MIN 8

// Whether the rows of tile `tile` (rows RUN_ROWS·tile ..) are one prefill run:
// at least RUN_MIN rows, one base, len growing by one from >= 1, all within
// what the page table holds (no row clamped). A pure function of the tables,
// so every kernel agrees on it.
__device__ __forceinline__ bool tile_is_run(const u32* rows, u32 R, const Paging& pg, u32 tile) {
    u32 r0 = tile * RUN_ROWS, nr = min((u32)RUN_ROWS, R - r0);
    u32 base0 = rows[2 * r0], len0 = rows[2 * r0 + 1];
    bool run = nr >= RUN_MIN && len0 >= 1 && base0 < pg.P && (u64)len0 + nr - 1 <= (u64)pg.page * (pg.P - base0);
    for (u32 i = 1; i < nr && run; i++) run = rows[2 * (r0 + i)] == base0 && rows[2 * (r0 + i) + 1] == len0 + i;
    return run;
}

template <typename T, int DPL>
__device__ void cached_attn(const T* q, const T* k, const T* v, const u32* rows, const u32* pages, const u32* idx, T* o,
                            float* part_acc, float* part_ml, u32 R, u32 H, u32 KV, u32 d, u32 slots, u32 page, u32 P,
                            float scale, u32 mode, u32 n, u32 block, u32 nsplit, u32 hpc, u32 tk, u32 skip_runs) {
    extern __shared__ float ca_smem[];
    __shared__ float mst[CA_WARPS], lst[CA_WARPS];
    float* ksh = ca_smem;
    float* vsh = ca_smem + (size_t)tk * d;
    u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    u32 group = H / KV, nhc = (group + hpc - 1) / hpc, wph = CA_WARPS / hpc;
    u32 sp = blockIdx.x, g = blockIdx.y / nhc, hc = blockIdx.y % nhc;
    u32 hs = warp / wph, kp = warp % wph, hg = hc * hpc + hs;
    bool active = hs < hpc && hg < group;
    u32 h = g * group + (active ? hg : 0);
    Paging pg = make_paging(pages, page, P, slots);
    for (u32 r = blockIdx.z; r < R; r += gridDim.z) {
        if (skip_runs && tile_is_run(rows, R, pg, r / RUN_ROWS)) continue;  // cached_attn_run's rows
        u32 base, len;
        row_of(rows, r, pg, base, len);
        float qr[DPL], acc[DPL];
        float m = NEG_INF, l = 0.0f;
        const T* qrow = q + ((size_t)r * H + h) * d;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            u32 e = lane + 32 * i;
            qr[i] = active && e < d ? ld(qrow, e) : 0.0f;
            acc[i] = 0.0f;
        }
        u32 e0 = 0, e1 = 1, lo = 0, hi = 0;
        if (mode == 0) {
            u32 ns = (u32)min((u64)nsplit, max((u64)1, ((u64)len + CA_SPLIT_KEYS - 1) / CA_SPLIT_KEYS));
            if (sp < ns) {
                lo = (u32)((u64)len * sp / ns);
                hi = (u32)((u64)len * (sp + 1) / ns);
            }
        } else {
            e0 = (u32)((u64)n * sp / nsplit);
            e1 = (u32)((u64)n * (sp + 1) / nsplit);
        }
        for (u32 ei = e0; ei < e1; ei++) {
            if (mode != 0) {  // uniform across the block: the same entry for every thread
                u32 kb = idx[(size_t)r * n + ei];
                if (len == 0 || kb == NONE_IDX || kb > (len - 1) / block) continue;
                lo = kb * block;
                hi = (u32)min((u64)lo + block, (u64)len);
            }
            for (u32 t0 = lo; t0 < hi; t0 += tk) {
                u32 cnt = min(tk, hi - t0);
                __syncthreads();  // the previous tile is consumed
                for (u32 j = warp; j < cnt; j += CA_WARPS) {
                    size_t kr = (key_row(pg, base, t0 + j) * KV + g) * d;
                    for (u32 e = lane; e < d; e += 32) {
                        ksh[j * d + e] = ld(k, kr + e);
                        vsh[j * d + e] = ld(v, kr + e);
                    }
                }
                __syncthreads();
                if (active) {
                    for (u32 j = kp; j < cnt; j += wph) {
                        float x = 0.0f;
#pragma unroll
                        for (int i = 0; i < DPL; i++) {
                            u32 e = lane + 32 * i;
                            if (e < d) x += qr[i] * ksh[j * d + e];
                        }
                        x = scale * warp_sum(x);
                        float mn = fmaxf(m, x);
                        float corr = expf(m - mn), p = expf(x - mn);
                        l = l * corr + p;
#pragma unroll
                        for (int i = 0; i < DPL; i++) {
                            u32 e = lane + 32 * i;
                            acc[i] = acc[i] * corr + (e < d ? p * vsh[j * d + e] : 0.0f);
                        }
                        m = mn;
                    }
                }
            }
        }
        if (wph > 1) {  // merge the wph partial states of each head (tile memory reused: CA_WARPS·d <= 2·tk·d)
            __syncthreads();
            if (lane == 0) { mst[warp] = m; lst[warp] = l; }
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                u32 e = lane + 32 * i;
                if (e < d) ca_smem[warp * d + e] = acc[i];
            }
            __syncthreads();
            if (active && kp == 0) {
                float mm = NEG_INF;
                for (u32 j = 0; j < wph; j++) mm = fmaxf(mm, mst[warp + j]);
                float ll = 0.0f;
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
                if (mm != NEG_INF) {
                    for (u32 j = 0; j < wph; j++) {
                        if (mst[warp + j] == NEG_INF) continue;
                        float c = expf(mst[warp + j] - mm);
                        ll += lst[warp + j] * c;
#pragma unroll
                        for (int i = 0; i < DPL; i++) {
                            u32 e = lane + 32 * i;
                            if (e < d) acc[i] += c * ca_smem[(warp + j) * d + e];
                        }
                    }
                }
                m = mm;
                l = ll;
            }
        }
        if (active && kp == 0) {
            size_t rh = (size_t)r * H + h;
            if (nsplit == 1) {
                float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    u32 e = lane + 32 * i;
                    if (e < d) st(o, rh * d + e, acc[i] * inv);
                }
            } else {
                size_t pi = rh * nsplit + sp;
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    u32 e = lane + 32 * i;
                    if (e < d) part_acc[pi * d + e] = acc[i];
                }
                if (lane == 0) {
                    part_ml[2 * pi] = m;
                    part_ml[2 * pi + 1] = l;
                }
            }
        }
        __syncthreads();  // the merge area is read before the next row's tiles
    }
}

// One warp per (row, head): combines the nsplit partial states (see above);
// with skip_runs, rows of prefill runs are cached_attn_run's and left alone.
template <typename T, int DPL>
__device__ void cached_attn_merge(const float* part_acc, const float* part_ml, T* o, u32 rh_total, u32 d, u32 nsplit,
                                  const u32* rows, u32 R, u32 H, u32 page, u32 P, u32 skip_runs) {
    size_t rh = (size_t)blockIdx.x * CA_WARPS + (threadIdx.x >> 5);
    if (rh >= rh_total) return;
    Paging pg = make_paging(nullptr, page, P, page);  // tile_is_run reads the row table only
    if (skip_runs && tile_is_run(rows, R, pg, (u32)(rh / H) / RUN_ROWS)) return;
    u32 lane = threadIdx.x & 31;
    const float* ml = part_ml + rh * nsplit * 2;
    float mm = NEG_INF;
    for (u32 j = 0; j < nsplit; j++) mm = fmaxf(mm, ml[2 * j]);
    float acc[DPL], ll = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
    if (mm != NEG_INF) {
        for (u32 j = 0; j < nsplit; j++) {
            if (ml[2 * j] == NEG_INF) continue;
            float c = expf(ml[2 * j] - mm);
            ll += ml[2 * j + 1] * c;
            const float* pa = part_acc + (rh * nsplit + j) * d;
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                u32 e = lane + 32 * i;
                if (e < d) acc[i] += c * pa[e];
            }
        }
    }
    float inv = ll > 0.0f ? 1.0f / ll : 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        u32 e = lane + 32 * i;
        if (e < d) st(o, rh * d + e, acc[i] * inv);
    }
}

// ---- prefill runs (dense, d <= 128): grid (ceil(R/RUN_ROWS), H), CA_WARPS
// warps. A tile of RUN_ROWS rows that is one run (tile_is_run: one sequence,
// consecutive positions) shares every K/V tile load among its rows, as
// attn_fwd_tiled does for a full window: row i of the tile sees the keys
// s < len0 + i. Warp w loads keys w, w + CA_WARPS, ... of each 32-key tile
// (logical positions, each from its own cache row) and owns rows 8w..8w+7;
// for the scores lane l takes key l of the tile, for P·V lane l owns dims
// l, l+32, ... Tiles that are
// not runs are left to cached_attn (skip_runs). Dynamic shared memory:
// 3·32·(32·DPL+1) + CA_WARPS·8·32 floats.
template <typename T, int DPL>
__device__ void cached_attn_run(const T* q, const T* k, const T* v, const u32* rows, const u32* pages, T* o, u32 R,
                                u32 H, u32 KV, u32 d, u32 slots, u32 page, u32 P, float scale) {
    extern __shared__ float run_smem[];
    typedef float Row[DPL * 32 + 1];
    Row* Qs = (Row*)run_smem;
    Row* Ks = Qs + RUN_ROWS;
    Row* Vs = Ks + 32;
    float* Ps = run_smem + (RUN_ROWS + 64) * (DPL * 32 + 1);  // [CA_WARPS][8][32]
    u32 tile = blockIdx.x, h = blockIdx.y, g = h / (H / KV);
    Paging pg = make_paging(pages, page, P, slots);
    if (!tile_is_run(rows, R, pg, tile)) return;  // uniform: the same table for every thread
    u32 tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    u32 r0 = tile * RUN_ROWS, nr = min((u32)RUN_ROWS, R - r0);
    u32 base = rows[2 * r0], len0 = rows[2 * r0 + 1], kend = len0 + nr - 1;
    for (u32 x = tid; x < RUN_ROWS * d; x += CA_WARPS * 32) {
        u32 i = x / d, e = x % d;
        Qs[i][e] = i < nr ? ld(q, ((size_t)(r0 + i) * H + h) * d + e) : 0.0f;
    }
    float m[8], l[8], acc[8][DPL];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        m[i] = NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < DPL; j++) acc[i][j] = 0.0f;
    }
    for (u32 k0 = 0; k0 < kend; k0 += 32) {
        __syncthreads();
        for (u32 j = w; j < 32; j += CA_WARPS) {
            u32 s = k0 + j;
            bool in = s < kend;
            size_t kr = in ? (key_row(pg, base, s) * KV + g) * d : 0;
            for (u32 e = lane; e < d; e += 32) {
                Ks[j][e] = in ? ld(k, kr + e) : 0.0f;
                Vs[j][e] = in ? ld(v, kr + e) : 0.0f;
            }
        }
        __syncthreads();
        u32 s = k0 + lane;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u32 row = w * 8 + i;
            float x = 0.0f;
            for (u32 e = 0; e < d; e++) x += Qs[row][e] * Ks[lane][e];
            x = (row < nr && s < len0 + row) ? scale * x : NEG_INF;
            float mn = fmaxf(m[i], warp_max(x));
            float p = 0.0f, corr = 1.0f;
            if (mn != NEG_INF) {
                corr = expf(m[i] - mn);
                p = expf(x - mn);
                m[i] = mn;
            }
            l[i] = l[i] * corr + warp_sum(p);
#pragma unroll
            for (int j = 0; j < DPL; j++) acc[i][j] *= corr;
            Ps[(w * 8 + i) * 32 + lane] = p;
        }
        __syncwarp();
        for (u32 j = 0; j < 32; j++) {
            float vj[DPL];
#pragma unroll
            for (int c = 0; c < DPL; c++) vj[c] = lane + 32 * c < d ? Vs[j][lane + 32 * c] : 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float p = Ps[(w * 8 + i) * 32 + j];
#pragma unroll
                for (int c = 0; c < DPL; c++) acc[i][c] += p * vj[c];
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        u32 row = w * 8 + i;
        if (row >= nr) continue;
        float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
        for (int c = 0; c < DPL; c++) {
            u32 e = lane + 32 * c;
            if (e < d) st(o, ((size_t)(r0 + row) * H + h) * d + e, acc[i][c] * inv);
        }
    }
}

#define CACHED_OPS(S, T) \
    extern "C" __global__ void rope_rows_##S(const T* x, const float* cosv, const float* sinv, const u32* rows, T* y, u32 pairs, u32 heads, u32 half, u32 max_pos) { \
        rope_rows<T>(x, cosv, sinv, rows, y, pairs, heads, half, max_pos); } \
    extern "C" __global__ void cache_write_##S(const T* src, const u32* rows, const u32* pages, T* cache, u32 n_rows, u32 width, u32 slots, u32 page, u32 P) { \
        cache_write<T>(src, rows, pages, cache, n_rows, width, slots, page, P); } \
    extern "C" __global__ void __launch_bounds__(CI_THREADS) cached_indexer_block_scores_##S(const T* qi, const T* w, const T* ki, const u32* rows, const u32* pages, float* pooled, u32 R, u32 H, u32 D, u32 block, u32 cols, u32 slots, u32 page, u32 P, u32 nbt) { \
        cached_indexer_block_scores<T>(qi, w, ki, rows, pages, pooled, R, H, D, block, cols, slots, page, P, nbt); }
FOR_FLOATS(CACHED_OPS)

#define CACHED_ATTN_DPL(S, T, N) \
    extern "C" __global__ void __launch_bounds__(CA_WARPS * 32) cached_attn_##S##_d##N(const T* q, const T* k, const T* v, const u32* rows, const u32* pages, const u32* idx, T* o, float* part_acc, float* part_ml, u32 R, u32 H, u32 KV, u32 d, u32 slots, u32 page, u32 P, float scale, u32 mode, u32 n, u32 block, u32 nsplit, u32 hpc, u32 tk, u32 skip_runs) { \
        cached_attn<T, N>(q, k, v, rows, pages, idx, o, part_acc, part_ml, R, H, KV, d, slots, page, P, scale, mode, n, block, nsplit, hpc, tk, skip_runs); } \
    extern "C" __global__ void __launch_bounds__(CA_WARPS * 32) cached_attn_merge_##S##_d##N(const float* part_acc, const float* part_ml, T* o, u32 rh_total, u32 d, u32 nsplit, const u32* rows, u32 R, u32 H, u32 page, u32 P, u32 skip_runs) { \
        cached_attn_merge<T, N>(part_acc, part_ml, o, rh_total, d, nsplit, rows, R, H, page, P, skip_runs); }
#define CACHED_ATTN(S, T) CACHED_ATTN_DPL(S, T, 1) CACHED_ATTN_DPL(S, T, 2) CACHED_ATTN_DPL(S, T, 4) CACHED_ATTN_DPL(S, T, 8)
FOR_FLOATS(CACHED_ATTN)

#define CACHED_RUN_DPL(S, T, N) \
    extern "C" __global__ void __launch_bounds__(CA_WARPS * 32) cached_attn_run_##S##_d##N(const T* q, const T* k, const T* v, const u32* rows, const u32* pages, T* o, u32 R, u32 H, u32 KV, u32 d, u32 slots, u32 page, u32 P, float scale) { \
        cached_attn_run<T, N>(q, k, v, rows, pages, o, R, H, KV, d, slots, page, P, scale); }
#define CACHED_RUN(S, T) CACHED_RUN_DPL(S, T, 1) CACHED_RUN_DPL(S, T, 2) CACHED_RUN_DPL(S, T, 4)
FOR_FLOATS(CACHED_RUN)
