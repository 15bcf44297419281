// Inference ops over a paged KV cache (semantics in `crate::attention::cached`,
// `crate::ops::cache` and `crate::ops::rope::rope_rows`).
//
// Every kernel takes the row table `rows`, U32 [R, 2] = (base, len) per query
// row: the row's keys are its sequence's tokens 0 .. len and its query sits
// at position len - 1. The kernels that touch the cache also take the page
// tables `pages`, U32 [P]: token s of the row lives in cache row
// pages[base + s / page]·page + s % page. `row_of` clamps len to what the
// table holds from base (page·(P - base), 0 when base >= P) and `phys_row`
// a table index to P - 1 and a page id to the last physical page, as the CPU
// reference does, so no kernel reads outside the cache whatever the tables.
// Keys are always walked in logical order (chunks, splits and blocks are
// ranges of positions s); only the address of a key goes through the table,
// so a result does not depend on where the pages lie.
//
// Loops stay far below llvmpipe's (lavapipe's) 65 535 iterations per
// invocation: the attention kernel handles one chunk of a row's keys per
// workgroup (flash-decoding: chunks of a long row run in parallel and
// `cached_attn_combine` merges their partial softmaxes), the pooled indexer
// one span of keys per workgroup.

const NONE: u32 = 0xffffffffu;
// NEG (shaders/common.wgsl) is the finite "minus infinity" of the softmaxes.

// Parameter structs, mirrored in src/backend/wgpu/cached.rs.
struct RopeRowsParams {
    pairs: u32,
    half: u32,
    heads: u32,
    positions: u32,
}

struct CacheWriteParams {
    rows: u32,
    width: u32,
    slots: u32,
    page: u32,
    np: u32,
}

struct CachedAttnParams {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    slots: u32,
    mode: u32,
    n: u32,
    block: u32,
    chunk: u32,
    nch: u32,
    r0: u32,
    nrow: u32,
    page: u32,
    np: u32,
}

struct CachedPoolParams {
    rows: u32,
    heads: u32,
    dim: u32,
    block: u32,
    cols: u32,
    slots: u32,
    span: u32,
    nspan: u32,
    page: u32,
    np: u32,
}

struct CachedSelectParams {
    rows: u32,
    cols: u32,
    k: u32,
    block: u32,
}

// The paging of a call: cache rows per page, entries of the page tables (P)
// and the last physical page id.
struct Pg {
    page: u32,
    np: u32,
    last: u32,
}

// Built once per invocation, so the key loops divide only by `page`.
fn paging(page: u32, np: u32, slots: u32) -> Pg {
    return Pg(page, np, slots / page - 1u);
}

// (base, len) of row r, len clamped to page·(P - base) (0 when base >= P).
// len / page >= P - base implies (P - base)·page <= len: no overflow.
fn row_of(r: u32, pg: Pg) -> vec2<u32> {
    let base = ldu_rows(2u * r);
    let len = ldu_rows(2u * r + 1u);
    if (base >= pg.np) { return vec2<u32>(base, 0u); }
    let cap = pg.np - base;
    if (len / pg.page >= cap) { return vec2<u32>(base, cap * pg.page); }
    return vec2<u32>(base, len);
}

// The table entry of key s of a row whose table starts at base (clamped to P - 1).
fn page_entry(pg: Pg, base: u32, s: u32) -> u32 {
    return min(base + s / pg.page, pg.np - 1u);
}

// The cache row of key s on page `id` (clamped to the last physical page).
// Kernels that bind `pages` define key_row(pg, base, s) =
// phys_row(pg, ldu_pages(page_entry(pg, base, s)), s).
fn phys_row(pg: Pg, id: u32, s: u32) -> u32 {
    return min(id, pg.last) * pg.page + s % pg.page;
}

//!kernel rope_rows(x: in, cos: in, sin: in, rows: idx, y: out) : RopeRowsParams
// Half-split rotary embedding of x [R, heads, head_dim], row r at position
// len_r - 1 (0 for an empty row, clamped to the table), as `rope`.
// `RopeRowsParams`: pairs (numel / 2), half, heads, table positions.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let p = lin(g, nw);
    if (p >= P.pairs) { return; }
    let half = P.half;
    let v = p / half;
    let i = p % half;
    let len = ldu_rows(2u * (v / P.heads) + 1u);
    let pos = min(max(len, 1u) - 1u, P.positions - 1u);
    let c = ld_cos(pos * half + i);
    let sn = ld_sin(pos * half + i);
    let base = v * 2u * half;
    let a = ld_x(base + i);
    let b = ld_x(base + i + half);
    st_y(base + i, a * c - b * sn);
    st_y(base + i + half, a * sn + b * c);
}

//!kernel cache_write(src: in, rows: idx, pages: idx, cache: inout) : CacheWriteParams
// cache[key_row(len - 1)] = src[r], element by element (any row width; half
// caches go through f32 staging); rows with (clamped) len 0 are skipped.
// `CacheWriteParams`: rows R, width, slots, page, np = P.
fn key_row(pg: Pg, base: u32, s: u32) -> u32 {
    return phys_row(pg, ldu_pages(page_entry(pg, base, s)), s);
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    let width = P.width;
    if (i >= P.rows * width) { return; }
    let r = i / width;
    let pg = paging(P.page, P.np, P.slots);
    let rw = row_of(r, pg);
    if (rw.y == 0u) { return; }
    st_cache(key_row(pg, rw.x, rw.y - 1u) * width + i % width, ld_src(i));
}

//!kernel cache_write_words(src: idx, rows: idx, pages: idx, cache: idxout) : CacheWriteParams
// The same copy on raw 32-bit words (f32 rows, or half rows of an even
// width, whose rows start on word boundaries): no conversion, no staging.
// `CacheWriteParams` with width = words per row.
fn key_row(pg: Pg, base: u32, s: u32) -> u32 {
    return phys_row(pg, ldu_pages(page_entry(pg, base, s)), s);
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    let width = P.width;
    if (i >= P.rows * width) { return; }
    let r = i / width;
    let pg = paging(P.page, P.np, P.slots);
    let rw = row_of(r, pg);
    if (rw.y == 0u) { return; }
    stu_cache(key_row(pg, rw.x, rw.y - 1u) * width + i % width, ldu_src(i));
}

//!kernel cached_attn(q: in, k: in, v: in, rows: idx, pages: idx, idx: idx, o: out, ml: out) : CachedAttnParams
// One 64-wide workgroup per (chunk c, row, head) of this launch: the row's
// key slots [c·chunk, (c+1)·chunk) (dense: slot = key position, len slots;
// blocks: slot i is position i % block of the row's block idx[r, i / block],
// n·block slots, NONE / future blocks / keys >= len skipped). Slots are
// logical positions; each key's cache row comes from the page table (stored
// in `wkey` for the p·v pass), so a block straddling pages is read page by
// page. Scores x_j = scale·q·k_j go to workgroup memory, then m = max_j x_j,
// p_j = exp(x_j - m), l = Σ p_j and acc = Σ p_j v_j (in vec4 columns, the
// keys split over 64 / (head_dim / 4) groups of invocations). nch = 1:
// o = acc / l (0 when l = 0), a division like the combine's, so a row of one
// chunk gets the same bits whether or not the launch is split (exp(0) = 1).
// Otherwise o is the partial buffer [nch, n, heads, head_dim] of acc and ml
// [nch, n, heads, 2] of (m, l) for `cached_attn_combine`; a chunk past the
// row's slots writes nothing (the combine stops at the row's last chunk).
// `CachedAttnParams`: rows R, n_heads, n_kv_heads, head_dim, scale, slots,
// mode (0 dense, 2 blocks), n, block, chunk, nch, r0, nrow rows of this
// launch, page, np = P.
const WA: u32 = 64u;
const CH: u32 = 1024u;
var<workgroup> ws: array<f32, CH>;
var<workgroup> wkey: array<u32, CH>;
var<workgroup> wq: array<vec4<f32>, 64>;
var<workgroup> wred: array<f32, 64>;
var<workgroup> wacc: array<vec4<f32>, 64>;
var<workgroup> wrow: vec2<u32>;

fn wa_reduce(lid: u32, x: f32, is_max: bool) -> f32 {
    wred[lid] = x;
    workgroupBarrier();
    for (var s = WA / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let a = wred[lid];
            let b = wred[lid + s];
            wred[lid] = select(a + b, max(a, b), is_max);
        }
        workgroupBarrier();
    }
    let r = wred[0];
    workgroupBarrier();
    return r;
}

fn key_row(pg: Pg, base: u32, s: u32) -> u32 {
    return phys_row(pg, ldu_pages(page_entry(pg, base, s)), s);
}

// q·k over the row of k at ko (q in `wq`, nc vec4 columns).
fn qk(ko: u32, nc: u32, d: u32) -> f32 {
    var dotp = 0.0;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        dotp = dotp + dot(wq[cc], ld4_k(ko, 4u * cc, d));
    }
    return dotp;
}

// The key position of slot i of row r (length len), or NONE.
fn slot_key(r: u32, len: u32, i: u32) -> u32 {
    if (P.mode == 0u) {
        if (i < len) { return i; }
        return NONE;
    }
    let blk = P.block;
    let kb = ldu_idx(r * P.n + i / blk);
    if (kb == NONE || len == 0u || kb > (len - 1u) / blk) { return NONE; }
    let j = kb * blk + i % blk;
    if (j >= len) { return NONE; }
    return j;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = wg_index(wid, nw);
    let nh = P.n_heads;
    let nrow = P.nrow;
    let nch = P.nch;
    if (w >= nch * nrow * nh) { return; }
    let c = w / (nrow * nh);
    let rh = w % (nrow * nh);
    let rl = rh / nh;
    let h = rh % nh;
    let r = P.r0 + rl;
    let d = P.head_dim;
    let nc = (d + 3u) / 4u;
    let kw = P.n_kv_heads * d;
    let g = h / (nh / P.n_kv_heads);
    let chunk = P.chunk;
    let pg = paging(P.page, P.np, P.slots);
    if (lid == 0u) { wrow = row_of(r, pg); }
    let rw = workgroupUniformLoad(&wrow);
    let base = rw.x;
    let len = rw.y;
    var nsl = len;
    if (P.mode != 0u) { nsl = P.n * P.block; }
    let s0 = c * chunk;
    if (s0 >= nsl && c > 0u) { return; }
    let cnt = min(nsl, s0 + chunk) - min(s0, nsl);
    let qo = (r * nh + h) * d;
    for (var cc = lid; cc < nc; cc = cc + WA) { wq[cc] = ld4_q(qo, 4u * cc, d); }
    workgroupBarrier();
    var mx = NEG;
    // Dense: slot s0 + j is key position s0 + j (all < len); its table entry
    // (from base) and page offset advance by (64 / page, 64 % page) per
    // step, so this loop never divides. One loop per pattern, each with no
    // trip when the other pattern runs.
    let dense = P.mode == 0u;
    let nd = select(0u, cnt, dense);
    let step_e = WA / pg.page;
    let step_o = WA % pg.page;
    var pe = (s0 + lid) / pg.page;
    var po = (s0 + lid) % pg.page;
    for (var j = lid; j < nd; j = j + WA) {
        let kr = min(ldu_pages(min(base + pe, pg.np - 1u)), pg.last) * pg.page + po;
        let x = P.scale * qk(kr * kw + g * d, nc, d);
        mx = max(mx, x);
        ws[j] = x;
        wkey[j] = kr;
        po = po + step_o;
        pe = pe + step_e;
        if (po >= pg.page) {
            po = po - pg.page;
            pe = pe + 1u;
        }
    }
    let nb = select(cnt, 0u, dense);
    for (var j = lid; j < nb; j = j + WA) {
        let key = slot_key(r, len, s0 + j);
        var x = NEG;
        var kr = NONE;
        if (key != NONE) {
            kr = key_row(pg, base, key);
            x = P.scale * qk(kr * kw + g * d, nc, d);
            mx = max(mx, x);
        }
        ws[j] = x;
        wkey[j] = kr;
    }
    let m = wa_reduce(lid, mx, true);
    var ls = 0.0;
    for (var j = lid; j < cnt; j = j + WA) {
        var p = 0.0;
        if (wkey[j] != NONE) { p = exp(ws[j] - m); }
        ws[j] = p;
        ls = ls + p;
    }
    let l = wa_reduce(lid, ls, false);
    let last = nch == 1u;
    var oo = qo;
    if (!last) {
        let pr = (c * nrow + rl) * nh + h;
        oo = pr * d;
        if (lid == 0u) {
            st_ml(2u * pr, m);
            st_ml(2u * pr + 1u, l);
        }
    }
    // p·v: invocation (grp, cc) sums keys grp, grp + ng, ... of the chunk on
    // the four output elements 4·cc .. 4·cc + 3; then group 0 adds the groups.
    let ng = WA / nc;
    let cc = lid % nc;
    let grp = lid / nc;
    var acc = vec4<f32>(0.0);
    if (grp < ng) {
        for (var j = grp; j < cnt; j = j + ng) {
            let kr = wkey[j];
            if (kr != NONE) { acc = acc + ws[j] * ld4_v(kr * kw + g * d, 4u * cc, d); }
        }
    }
    wacc[lid] = acc;
    workgroupBarrier();
    if (grp == 0u) {
        for (var i = 1u; i < ng; i = i + 1u) { acc = acc + wacc[i * nc + cc]; }
        for (var e = 0u; e < 4u; e = e + 1u) {
            if (4u * cc + e < d) {
                var y = acc[e];
                if (last) { y = select(0.0, y / l, l > 0.0); }
                st_o(oo + 4u * cc + e, y);
            }
        }
    }
}

//!kernel cached_attn_combine(part: in, ml: in, rows: idx, o: inout) : CachedAttnParams
// The log-sum-exp merge of `cached_attn`'s chunks, in chunk order: one
// invocation per (row, head, element) of the launch; chunks with l = 0 (no
// key) are skipped and a row without any key gets o = 0. The parameters of
// `cached_attn`.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let nh = P.n_heads;
    let d = P.head_dim;
    let nrow = P.nrow;
    if (i >= nrow * nh * d) { return; }
    let rh = i / d;
    let e = i % d;
    let h = rh % nh;
    let r = P.r0 + rh / nh;
    let chunk = P.chunk;
    var nsl = row_of(r, paging(P.page, P.np, P.slots)).y;
    if (P.mode != 0u) { nsl = P.n * P.block; }
    let used = min(max((nsl + chunk - 1u) / chunk, 1u), P.nch);
    var m = NEG;
    for (var c = 0u; c < used; c = c + 1u) {
        let pr = c * nrow * nh + rh;
        if (ld_ml(2u * pr + 1u) > 0.0) { m = max(m, ld_ml(2u * pr)); }
    }
    var l = 0.0;
    var acc = 0.0;
    for (var c = 0u; c < used; c = c + 1u) {
        let pr = c * nrow * nh + rh;
        let lc = ld_ml(2u * pr + 1u);
        if (lc > 0.0) {
            let f = exp(ld_ml(2u * pr) - m);
            l = l + lc * f;
            acc = acc + ld_part(pr * d + e) * f;
        }
    }
    var out = 0.0;
    if (l > 0.0) { out = acc / l; }
    st_o((r * nh + h) * d + e, out);
}

//!kernel cached_pool(qi: in, w: in, ki: in, rows: idx, pages: idx, pooled: out) : CachedPoolParams
// pooled[r, b] = max_{s in b, s < len} Σ_j w[r,j]·ReLU(q_i[r,j]·k_i[key_row(s)])
// (-inf for a block without keys; NaN scores never win). One 64-wide
// workgroup per (row, span of `span` keys, a whole number of blocks): invocations
// score keys lid, lid + 64, ... of the span and fold them into the block's
// maximum with a workgroup atomicMax on order-preserving keys (exact, so
// independent of the order). `CachedPoolParams`: rows R, heads, dim,
// block, cols, slots, span, nspan spans per row, page, np = P.
var<workgroup> pm: array<atomic<u32>, 256>;

// Larger key = larger score (callers skip NaN); 0 means "no key".
fn okey(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    if ((u & 0x80000000u) != 0u) { return ~u; }
    return u | 0x80000000u;
}

fn unkey(k: u32) -> f32 {
    if ((k & 0x80000000u) != 0u) { return bitcast<f32>(k & 0x7fffffffu); }
    return bitcast<f32>(~k);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let wi = wg_index(wid, nw);
    let nsp = P.nspan;
    if (wi >= P.rows * nsp) { return; }
    let r = wi / nsp;
    let hi = P.heads;
    let di = P.dim;
    let d4 = (di + 3u) / 4u;
    let blk = P.block;
    let cols = P.cols;
    let span = P.span;
    let nbs = span / blk;
    for (var i = lid; i < nbs; i = i + 64u) { atomicStore(&pm[i], 0u); }
    workgroupBarrier();
    let pg = paging(P.page, P.np, P.slots);
    let rw = row_of(r, pg);
    let len = min(rw.y, cols * blk);
    let k0 = (wi % nsp) * span;
    let k1 = min(k0 + span, len);
    // Table entry and page offset of key s, advanced without dividing (see cached_attn).
    let step_e = 64u / pg.page;
    let step_o = 64u % pg.page;
    var pe = (k0 + lid) / pg.page;
    var po = (k0 + lid) % pg.page;
    for (var s = k0 + lid; s < k1; s = s + 64u) {
        let ko = (min(ldu_pages(min(rw.x + pe, pg.np - 1u)), pg.last) * pg.page + po) * di;
        po = po + step_o;
        pe = pe + step_e;
        if (po >= pg.page) {
            po = po - pg.page;
            pe = pe + 1u;
        }
        var x = 0.0;
        for (var j = 0u; j < hi; j = j + 1u) {
            let qo = (r * hi + j) * di;
            var lg = 0.0;
            for (var cc = 0u; cc < d4; cc = cc + 1u) {
                lg = lg + dot(ld4_qi(qo, 4u * cc, di), ld4_ki(ko, 4u * cc, di));
            }
            x = x + ld_w(r * hi + j) * max(lg, 0.0);
        }
        if ((bitcast<u32>(x) & 0x7fffffffu) <= 0x7f800000u) {
            atomicMax(&pm[(s - k0) / blk], okey(x));
        }
    }
    workgroupBarrier();
    let b0 = k0 / blk;
    for (var i = lid; i < nbs; i = i + 64u) {
        if (b0 + i < cols) {
            let key = atomicLoad(&pm[i]);
            var y = neg_inf();
            if (key != 0u) { y = unkey(key); }
            st_pooled(r * cols + b0 + i, y);
        }
    }
}

//!kernel cached_select(scores: in, rows: idx, idx: idxout) : CachedSelectParams
// `select_topk` in block mode with the row's own block t / block (t = len - 1,
// clamped to the columns) as its local block: the own block, the sink block 0
// and the best others among 1 .. t/block - 1 (score descending, NaN as -inf,
// ties to the smaller index), ascending, padded with NONE. The algorithm of
// `shaders/select.wgsl`: one 256-wide workgroup per row, a 33-step binary
// search for the threshold key, then an ordered prefix-sum pass.
// `CachedSelectParams`: rows R, cols, k, block.
const WG: u32 = 256u;
var<workgroup> cnt: atomic<u32>;
var<workgroup> pre: array<u32, 256>;
var<workgroup> wlast: u32;

// Larger key = better score; NaN ranks as -inf and -0 as +0.
fn skey(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) { return 0x007fffffu; }
    if ((u & 0x7fffffffu) == 0u) { return 0x80000000u; }
    if ((u & 0x80000000u) != 0u) { return ~u; }
    return u | 0x80000000u;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wg_index(wg, nw);
    if (row >= P.rows) { return; }
    let cols = P.cols;
    let k = P.k;
    if (lid == 0u) {
        let len = ldu_rows(2u * row + 1u);
        wlast = min((max(len, 1u) - 1u) / P.block, cols - 1u);
    }
    let r = workgroupUniformLoad(&wlast);
    let base = row * cols;
    let obase = row * k;
    // Candidates [c0, c1) = 1 .. r - 1, the budget kk left for them after
    // the forced own block r and sink block 0 (when r != 0 and k >= 2).
    let c0 = 1u;
    let c1 = max(r, 1u);
    var nforced = 1u;
    var f0 = 0u;
    if (r != 0u && k >= 2u) {
        f0 = 1u;
        nforced = 2u;
    }
    let ncand = c1 - c0;
    let kk = k - nforced;

    // Binary search for T = max{T : count(key >= T) >= kk} (T = 0 when kk > ncand).
    var lo = 0u;
    var hi = 0xffffffffu;
    for (var it = 0u; it < 33u; it = it + 1u) {
        let mid = lo + ((hi - lo) >> 1u) + ((hi - lo) & 1u);
        if (lid == 0u) { atomicStore(&cnt, 0u); }
        workgroupBarrier();
        var c = 0u;
        for (var col = c0 + lid; col < c1; col = col + WG) {
            if (skey(ld_scores(base + col)) >= mid) { c = c + 1u; }
        }
        atomicAdd(&cnt, c);
        workgroupBarrier();
        let total = atomicLoad(&cnt);
        workgroupBarrier();
        if (lo < hi) {
            if (total >= kk) { lo = mid; } else { hi = mid - 1u; }
        }
    }
    let thr = lo;
    if (lid == 0u) { atomicStore(&cnt, 0u); }
    workgroupBarrier();
    var c = 0u;
    for (var col = c0 + lid; col < c1; col = col + WG) {
        if (skey(ld_scores(base + col)) > thr) { c = c + 1u; }
    }
    atomicAdd(&cnt, c);
    workgroupBarrier();
    let ngt = atomicLoad(&cnt);
    var need = 0u;
    if (kk > ngt) { need = kk - ngt; }
    let nsel = min(kk, ncand);

    // Ordered pass: position of a selected column = #selected columns before it.
    var run_gt = 0u;
    var run_tie = 0u;
    for (var cb = c0; cb < c1; cb = cb + WG) {
        let col = cb + lid;
        var gt = 0u;
        var tie = 0u;
        if (col < c1) {
            let key = skey(ld_scores(base + col));
            gt = select(0u, 1u, key > thr);
            tie = select(0u, 1u, key == thr);
        }
        let val = (tie << 16u) | gt;
        pre[lid] = val;
        workgroupBarrier();
        for (var off = 1u; off < WG; off = off << 1u) {
            var v = pre[lid];
            if (lid >= off) { v = v + pre[lid - off]; }
            workgroupBarrier();
            pre[lid] = v;
            workgroupBarrier();
        }
        let excl = pre[lid] - val;
        let all = pre[WG - 1u];
        workgroupBarrier();
        let gt_before = run_gt + (excl & 0xffffu);
        let tie_before = run_tie + (excl >> 16u);
        if (gt == 1u || (tie == 1u && tie_before < need)) {
            stu_idx(obase + f0 + gt_before + min(tie_before, need), col);
        }
        run_gt = run_gt + (all & 0xffffu);
        run_tie = run_tie + (all >> 16u);
    }
    if (lid == 0u) {
        if (f0 == 1u) { stu_idx(obase, 0u); }
        stu_idx(obase + f0 + nsel, r);
    }
    for (var p = nforced + nsel + lid; p < k; p = p + WG) {
        stu_idx(obase + p, NONE);
    }
}

// ---------------------------------------------------------------- hardware variants
// `cached_pool_hw` / `cached_select_hw` (KernelVariant::Hardware): the decode
// step's block selection laid out for SIMD hardware, same results.

//!kernel cached_pool_hw(qi: in, w: in, ki: in, rows: idx, pages: idx, pooled: out) : CachedPoolParams
// `cached_pool` on 256-wide workgroups, one per (row, span) as there: the
// row's index queries q_i [heads, dim] and weights w are staged once in
// workgroup memory (heads · ceil(dim / 4) <= 256 vec4 and heads <= 64: the
// launcher checks, else `cached_pool`), invocation lid scoring keys
// k0 + lid, k0 + lid + 256, … of the span with the same expression in the
// same order as `cached_pool` (per head the vec4 dot products by increasing
// column, the heads by increasing j). A block's maximum goes through an
// atomicMax on order-preserving keys (exact, so independent of the order);
// with subgroups, where a subgroup's keys of one pass lie in one block (the
// usual case: blocks of 16 and more keys), one subgroupMax and one atomic per
// subgroup instead of one per key.
const PWG: u32 = 256u;
var<workgroup> pmx: array<atomic<u32>, 256>;
var<workgroup> pq: array<vec4<f32>, 256>;
var<workgroup> pw: array<f32, 64>;

// Larger key = larger score (callers skip NaN); 0 means "no key".
fn okey(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    if ((u & 0x80000000u) != 0u) { return ~u; }
    return u | 0x80000000u;
}

fn unkey(k: u32) -> f32 {
    if ((k & 0x80000000u) != 0u) { return bitcast<f32>(k & 0x7fffffffu); }
    return bitcast<f32>(~k);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
//#if subgroups
        @builtin(subgroup_invocation_id) sgi: u32,
//#endif
) {
    let wi = wg_index(wid, nw);
    let nsp = P.nspan;
    if (wi >= P.rows * nsp) { return; }
    let r = wi / nsp;
    let hi = P.heads;
    let di = P.dim;
    let d4 = (di + 3u) / 4u;
    let blk = P.block;
    let cols = P.cols;
    let span = P.span;
    let nbs = span / blk;
    for (var i = lid; i < nbs; i = i + PWG) { atomicStore(&pmx[i], 0u); }
    for (var i = lid; i < hi * d4; i = i + PWG) {
        let j = i / d4;
        pq[i] = ld4_qi((r * hi + j) * di, 4u * (i % d4), di);
    }
    if (lid < hi) { pw[lid] = ld_w(r * hi + lid); }
    workgroupBarrier();
    let pg = paging(P.page, P.np, P.slots);
    let rw = row_of(r, pg);
    let len = min(rw.y, cols * blk);
    let k0 = (wi % nsp) * span;
    let k1 = min(k0 + span, len);
    // A uniform trip count (the subgroup operations need every invocation).
    for (var s0 = k0; s0 < k1; s0 = s0 + PWG) {
        let s = s0 + lid;
        let on = s < k1;
        var key = 0u;
        var bi = 0u;
        if (on) {
            let ko = phys_row(pg, ldu_pages(page_entry(pg, rw.x, s)), s) * di;
            var x = 0.0;
            for (var j = 0u; j < hi; j = j + 1u) {
                var lg = 0.0;
                for (var cc = 0u; cc < d4; cc = cc + 1u) {
                    lg = lg + dot(pq[j * d4 + cc], ld4_ki(ko, 4u * cc, di));
                }
                x = x + pw[j] * max(lg, 0.0);
            }
            if ((bitcast<u32>(x) & 0x7fffffffu) <= 0x7f800000u) { key = okey(x); }
            bi = (s - k0) / blk;
        }
//#if subgroups
        let lo = subgroupMin(select(0xffffffffu, bi, on));
        let hb = subgroupMax(select(0u, bi, on));
        if (lo == hb) {
            let m = subgroupMax(key);
            if (sgi == 0u && m != 0u) { atomicMax(&pmx[lo], m); }
        } else if (key != 0u) {
            atomicMax(&pmx[bi], key);
        }
//#else
        if (key != 0u) { atomicMax(&pmx[bi], key); }
//#endif
    }
    workgroupBarrier();
    let b0 = k0 / blk;
    for (var i = lid; i < nbs; i = i + PWG) {
        if (b0 + i < cols) {
            let key = atomicLoad(&pmx[i]);
            var y = neg_inf();
            if (key != 0u) { y = unkey(key); }
            st_pooled(r * cols + b0 + i, y);
        }
    }
}

//!kernel cached_select_hw(scores: in, rows: idx, idx: idxout) : CachedSelectParams
// `cached_select`'s algorithm and result (exact integer logic: the same
// blocks in the same order) with subgroup reductions where the device has
// them: the binary search's counts by subgroupAdd and one workgroup atomic
// per subgroup (instead of one per invocation), and the ordered pass's
// prefix sums by subgroupExclusiveAdd plus the subgroups' totals in
// subgroup order (one barrier pair instead of eight). Invocations are
// numbered subgroup by subgroup (id · size + lane, as `cached_attn_hw_sg`;
// the backend enables subgroups only with sizes of 8 to 128, which tile the
// 256) so the prefix order is the column order. Without subgroups, the
// workgroup-memory paths of `cached_select`.
const SWG: u32 = 256u;
var<workgroup> cnt: atomic<u32>;
var<workgroup> pre: array<u32, 256>;
var<workgroup> sgt: array<u32, 32>;
var<workgroup> wlast: u32;
// (subgroup lane, subgroup id, subgroups in the workgroup).
var<private> sg: vec3<u32>;

// Larger key = better score; NaN ranks as -inf and -0 as +0.
fn skey(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) { return 0x007fffffu; }
    if ((u & 0x7fffffffu) == 0u) { return 0x80000000u; }
    if ((u & 0x80000000u) != 0u) { return ~u; }
    return u | 0x80000000u;
}

// Adds this invocation's count c to `cnt` (call from uniform control flow).
fn add_count(c: u32) {
//#if subgroups
    let s = subgroupAdd(c);
    if (sg.x == 0u) { atomicAdd(&cnt, s); }
//#else
    atomicAdd(&cnt, c);
//#endif
}

// (exclusive prefix sum of val over invocations 0 .. me - 1, total): uniform control flow.
fn scan(me: u32, val: u32) -> vec2<u32> {
//#if subgroups
    let ex = subgroupExclusiveAdd(val);
    let tot = subgroupAdd(val);
    if (sg.x == 0u) { sgt[sg.y] = tot; }
    workgroupBarrier();
    var before = 0u;
    var all = 0u;
    for (var i = 0u; i < sg.z; i = i + 1u) {
        let t = sgt[i];
        if (i < sg.y) { before = before + t; }
        all = all + t;
    }
    workgroupBarrier();
    return vec2<u32>(before + ex, all);
//#else
    pre[me] = val;
    workgroupBarrier();
    for (var off = 1u; off < SWG; off = off << 1u) {
        var v = pre[me];
        if (me >= off) { v = v + pre[me - off]; }
        workgroupBarrier();
        pre[me] = v;
        workgroupBarrier();
    }
    let r = vec2<u32>(pre[me] - val, pre[SWG - 1u]);
    workgroupBarrier();
    return r;
//#endif
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) li: u32,
//#if subgroups
        @builtin(subgroup_invocation_id) si: u32, @builtin(subgroup_size) ss: u32,
        @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) ns: u32,
//#endif
) {
//#if subgroups
    sg = vec3<u32>(si, sid, ns);
    let lid = sid * ss + si;
//#else
    let lid = li;
//#endif
    let row = wg_index(wg, nw);
    if (row >= P.rows) { return; }
    let cols = P.cols;
    let k = P.k;
    if (lid == 0u) {
        let len = ldu_rows(2u * row + 1u);
        wlast = min((max(len, 1u) - 1u) / P.block, cols - 1u);
    }
    let r = workgroupUniformLoad(&wlast);
    let base = row * cols;
    let obase = row * k;
    let c0 = 1u;
    let c1 = max(r, 1u);
    var nforced = 1u;
    var f0 = 0u;
    if (r != 0u && k >= 2u) {
        f0 = 1u;
        nforced = 2u;
    }
    let ncand = c1 - c0;
    let kk = k - nforced;

    var lo = 0u;
    var hi = 0xffffffffu;
    for (var it = 0u; it < 33u; it = it + 1u) {
        let mid = lo + ((hi - lo) >> 1u) + ((hi - lo) & 1u);
        if (lid == 0u) { atomicStore(&cnt, 0u); }
        workgroupBarrier();
        var c = 0u;
        for (var col = c0 + lid; col < c1; col = col + SWG) {
            if (skey(ld_scores(base + col)) >= mid) { c = c + 1u; }
        }
        add_count(c);
        workgroupBarrier();
        let total = atomicLoad(&cnt);
        workgroupBarrier();
        if (lo < hi) {
            if (total >= kk) { lo = mid; } else { hi = mid - 1u; }
        }
    }
    let thr = lo;
    if (lid == 0u) { atomicStore(&cnt, 0u); }
    workgroupBarrier();
    var c = 0u;
    for (var col = c0 + lid; col < c1; col = col + SWG) {
        if (skey(ld_scores(base + col)) > thr) { c = c + 1u; }
    }
    add_count(c);
    workgroupBarrier();
    let ngt = atomicLoad(&cnt);
    var need = 0u;
    if (kk > ngt) { need = kk - ngt; }
    let nsel = min(kk, ncand);

    var run_gt = 0u;
    var run_tie = 0u;
    for (var cb = c0; cb < c1; cb = cb + SWG) {
        let col = cb + lid;
        var gt = 0u;
        var tie = 0u;
        if (col < c1) {
            let key = skey(ld_scores(base + col));
            gt = select(0u, 1u, key > thr);
            tie = select(0u, 1u, key == thr);
        }
        let val = (tie << 16u) | gt;
        let sc = scan(lid, val);
        let excl = sc.x;
        let all = sc.y;
        let gt_before = run_gt + (excl & 0xffffu);
        let tie_before = run_tie + (excl >> 16u);
        if (gt == 1u || (tie == 1u && tie_before < need)) {
            stu_idx(obase + f0 + gt_before + min(tie_before, need), col);
        }
        run_gt = run_gt + (all & 0xffffu);
        run_tie = run_tie + (all >> 16u);
    }
    if (lid == 0u) {
        if (f0 == 1u) { stu_idx(obase, 0u); }
        stu_idx(obase + f0 + nsel, r);
    }
    for (var p = nforced + nsel + lid; p < k; p = p + SWG) {
        stu_idx(obase + p, NONE);
    }
}
