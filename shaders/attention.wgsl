// Flash-style causal attention (dense, token and block patterns), its
// backward pass, and the indexer's KL loss against the main attention.
//
// Parameters: typed structs (mirrored in src/backend/wgpu/attention.rs). Every
// struct starts with the attention spec: batch, seq, n_heads, n_kv_heads,
// head_dim, scale, mode (0 dense, 1 tokens, 2 blocks), kn (k for tokens, n
// for blocks), block, nkb = ceil(seq / block). `AttnParams` (attn_fwd,
// attn_bwd_stats, attn_bwd_dq, attn_bwd_dkdv) adds chunk (slots, key units
// or queries per chunk), nch chunks, first row r0 and nrow rows of this
// launch; `AttnTiledParams` (attn_fwd_tiled) adds to those tq queries per
// tile, tiles tile0 .. tile0 + ntile, unit keys per unit; `AttnKlParams`
// (indexer_kl) adds q0, the first query row, qrows, the rows of its tile, and
// the row sample: only queries t with t % every == phase are computed.
// Layouts: q, o [batch, seq, n_heads, head_dim]; k, v [batch, seq, n_kv_heads,
// head_dim]; lse [batch, n_heads, seq]; idx [batch, seq, k] (tokens: key
// positions) or [batch, seq, n] (blocks: key-block ids), one row per query.
// Every kernel takes the pattern as `idx` (a dummy one-word tensor for the
// dense pattern, never read).
//
// The keys of query t are enumerated as "slots": dense t + 1 slots (key =
// slot), tokens k slots (key = idx entry), blocks n·block slots (key = start
// of the block listed in query t's own row + offset); `slot_key` returns NONE
// for a slot to skip (padding, a future key, a block beyond the sequence).
// What query t computes depends on its own row and the keys s <= t only.
//
// No infinity arithmetic (fast-math shader compilers, e.g. Metal's default,
// do not honour infinities): running maxima start at the finite sentinel
// MINF, masked probabilities are selected to 0, "has keys" is tested as
// l > 0, and the -inf lse of a query without keys is written explicitly.
//
// Split kernels: llvmpipe (lavapipe) stops every loop after 65 535 iterations
// (counted across the loops of a batch of invocations), so no invocation may
// loop over a whole sequence. Each of these kernels runs one invocation per
// (chunk c, row r0 + rl): a row is a (batch, query, head) or (batch, key, kv
// head) in the layout order of its output (so row r starts at r·head_dim), and
// the chunk is a range of its slots (keys), key units or queries. With nch = 1 the
// invocation writes the final result; otherwise it writes partials at
// (c·R + rl) that `shaders/split.wgsl` combines in chunk order.
//
// `AttnParams` and `AttnTiledParams` are declared once, in shaders/common.wgsl.

struct AttnKlParams {
    batch: u32,
    seq: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    mode: u32,
    kn: u32,
    block: u32,
    nkb: u32,
    q0: u32,
    qrows: u32,
    every: u32,
    phase: u32,
}

const NONE: u32 = 0xffffffffu;
// Largest head_dim in vec4 units (the op validates head_dim <= 256). Loops
// over the head dim run 4 lanes at a time: llvmpipe (lavapipe) caps the loop
// iterations of one invocation at 65 535, so they must stay short.
const HD4: u32 = 64u;

// Below every real score; exp(MINF - x) is 0 for any real score x.
const MINF: f32 = -1.0e30;
// Identity of the max reductions.
const LOWEST: f32 = -3.4028235e38;

fn n_slots(t: u32) -> u32 {
    let mode = P.mode;
    if (mode == 0u) { return t + 1u; }
    if (mode == 1u) { return P.kn; }
    return P.kn * P.block;
}

fn slot_key(b: u32, t: u32, i: u32) -> u32 {
    let mode = P.mode;
    if (mode == 0u) { return i; }
    if (mode == 1u) {
        let j = ldu_idx((b * P.seq + t) * P.kn + i);
        if (j == NONE || j > t) { return NONE; }
        return j;
    }
    let blk = P.block;
    let kb = ldu_idx((b * P.seq + t) * P.kn + i / blk);
    if (kb == NONE || kb > t / blk) { return NONE; }
    let j = kb * blk + i % blk;
    if (j > t) { return NONE; }
    return j;
}

// Does query t (>= s) attend to key s: does t's own row list s (tokens) or
// s's block (blocks)?
fn attends(b: u32, t: u32, s: u32) -> bool {
    let mode = P.mode;
    if (mode == 0u) { return true; }
    let n = P.kn;
    let row = (b * P.seq + t) * n;
    var want = s;
    if (mode == 2u) { want = s / P.block; }
    for (var i = 0u; i < n; i = i + 1u) {
        if (ldu_idx(row + i) == want) { return true; }
    }
    return false;
}

fn q_off(b: u32, t: u32, h: u32) -> u32 {
    return ((b * P.seq + t) * P.n_heads + h) * P.head_dim;
}

fn k_off(b: u32, s: u32, g: u32) -> u32 {
    return ((b * P.seq + s) * P.n_kv_heads + g) * P.head_dim;
}

// Workgroup size of the 256-wide kernels (wg_reduce: shaders/common.wgsl).
const WG: u32 = 256u;

//!kernel attn_fwd(q: in, k: in, v: in, idx: idx, o: out, lse: out) : AttnParams
// One invocation per (chunk, batch, query, head): online softmax over the
// chunk's slots [c·chunk, (c+1)·chunk). nch = 1: o and lse are final. Otherwise o
// is the partial buffer [nch, R, head_dim] of unnormalised outputs and lse the
// buffer [nch, R, 2] of (running max m, sum of exp l) per chunk.

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = P.seq;
    let nh = P.n_heads;
    let nch = P.nch;
    let nrow = P.nrow;
    if (i >= nch * nrow) { return; }
    let d = P.head_dim;
    let nc = (d + 3u) / 4u;
    let sc = P.scale;
    let c = i / nrow;
    let rl = i % nrow;
    let r = P.r0 + rl;
    let h = r % nh;
    let bt = r / nh;
    let t = bt % seq;
    let b = bt / seq;
    let g = h / (nh / P.n_kv_heads);
    let qo = r * d;
    var qv: array<vec4<f32>, HD4>;
    var acc: array<vec4<f32>, HD4>;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        qv[cc] = ld4_q(qo, 4u * cc, d);
        acc[cc] = vec4<f32>(0.0);
    }
    var m = MINF;
    var l = 0.0;
    let s0 = c * P.chunk;
    let s1 = min(n_slots(t), s0 + P.chunk);
    for (var si = s0; si < s1; si = si + 1u) {
        let s = slot_key(b, t, si);
        if (s == NONE) { continue; }
        let ko = k_off(b, s, g);
        var x = 0.0;
        for (var cc = 0u; cc < nc; cc = cc + 1u) {
            x = x + dot(qv[cc], ld4_k(ko, 4u * cc, d));
        }
        x = sc * x;
        var corr = 1.0;
        if (x > m) {
            corr = exp(m - x);
            m = x;
        }
        let p = exp(x - m);
        l = l * corr + p;
        for (var cc = 0u; cc < nc; cc = cc + 1u) {
            acc[cc] = acc[cc] * corr + p * ld4_v(ko, 4u * cc, d);
        }
    }
    let oo = (c * nrow + rl) * d;
    var inv = 1.0;
    if (nch == 1u) {
        let li = (b * nh + h) * seq + t;
        if (l > 0.0) {
            inv = 1.0 / l;
            st_lse(li, m + log(l));
        } else {
            inv = 0.0;
            st_lse(li, neg_inf());
        }
    } else {
        st_lse(2u * (c * nrow + rl), m);
        st_lse(2u * (c * nrow + rl) + 1u, l);
    }
    for (var e = 0u; e < d; e = e + 1u) {
        st_o(oo + e, acc[e / 4u][e % 4u] * inv);
    }
}

//!kernel attn_fwd_tiled(q: in, k: in, v: in, idx: idx, o: out, lse: out) : AttnTiledParams
// The dense and block patterns, tiled: one 8-wide workgroup per (chunk c,
// batch, query tile, head) of tq <= 64 consecutive queries, invocation i
// running queries i, i + 8, .., i + 56 of the tile (eight online softmaxes
// sharing every K/V read: software adapters are bound by memory reads, not
// arithmetic). Keys go in "units" of `unit` keys: 16-key groups (dense) or the
// key blocks (blocks). Chunk c covers units [c·chunk, (c+1)·chunk): chunks are
// fixed ranges of key positions, so how a query's keys split into chunks
// never depends on other queries. The tile walks the union of its queries'
// units, 32 at a time: each invocation marks which of its queries' own rows
// list each unit (blocks; every causal unit for dense), the workgroup ORs
// the marks, and every marked unit goes through workgroup memory KT keys at
// a time (each K/V tile loaded once, cooperatively, read by every query;
// scores and p·v straight-line vec4 code over the KT keys). A query that
// does not list a unit leaves its state untouched (selects, not arithmetic
// with zeros), and keys after a query are masked per query, so each query's
// result is exactly what it would be alone. Workgroups cover the tiles tile0 ..
// tile0 + ntile (in (batch, tile, head) order, the tiles meeting the rows r0 ..
// r0 + nrow); a query writes only if its row is in the launch, in the layout
// of `attn_fwd`. head_dim <= 128. The per-query code is written out for each
// of the eight queries (0 .. 7).
const KT: u32 = 16u;
const TD4: u32 = 32u;
// Units per union window.
const UW: u32 = 32u;
var<workgroup> tk: array<vec4<f32>, 512>;
var<workgroup> tv: array<vec4<f32>, 512>;
var<workgroup> tkey: array<u32, 16>;
var<workgroup> wany: atomic<u32>;
var<workgroup> wunion: u32;

// Scores of keys kk0 .. kk0 + 3 that query t sees (a key index NONE is past
// every query).
fn kvalid4(kk0: u32, t: u32) -> vec4<bool> {
    let j = vec4<u32>(tkey[kk0], tkey[kk0 + 1u], tkey[kk0 + 2u], tkey[kk0 + 3u]);
    return j <= vec4<u32>(t);
}

fn hmax(x: vec4<f32>) -> f32 {
    return max(max(x.x, x.y), max(x.z, x.w));
}

// The final (nch = 1) or partial output of one query of the tile.
fn tiled_store(c: u32, rl: u32, r: u32, li: u32, m: f32, l: f32, acc: array<vec4<f32>, TD4>) {
    let d = P.head_dim;
    let nch = P.nch;
    let nrow = P.nrow;
    var oo = r * d;
    var inv = 1.0;
    if (nch == 1u) {
        if (l > 0.0) {
            inv = 1.0 / l;
            st_lse(li, m + log(l));
        } else {
            inv = 0.0;
            st_lse(li, neg_inf());
        }
    } else {
        oo = (c * nrow + rl) * d;
        st_lse(2u * (c * nrow + rl), m);
        st_lse(2u * (c * nrow + rl) + 1u, l);
    }
    for (var e = 0u; e < d; e = e + 1u) {
        st_o(oo + e, acc[e / 4u][e % 4u] * inv);
    }
}

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nw.x;
    let seq = P.seq;
    let nh = P.n_heads;
    let nch = P.nch;
    let r0 = P.r0;
    let nrow = P.nrow;
    let tq = P.tq;
    let ntile = P.ntile;
    let unit = P.unit;
    let dense = P.mode == 0u;
    let inside = w < nch * ntile;
    let c = w / ntile;
    let tile = P.tile0 + w % ntile;
    let h = tile % nh;
    let qt = tile / nh;
    let ntq = (seq + tq - 1u) / tq;
    let b = qt / ntq;
    let t0 = (qt % ntq) * tq;
    let tl = min(t0 + tq, seq) - 1u;
    let d = P.head_dim;
    let nc = (d + 3u) / 4u;
    let sc = P.scale;
    let g = h / (nh / P.n_kv_heads);
    let n = P.kn;
    let blk = P.block;
    let ti0 = t0 + lid + 0u;
    let rr0 = (b * seq + ti0) * nh + h;
    let mine0 = inside && lid + 0u < tq && ti0 < seq && rr0 >= r0 && rr0 < r0 + nrow;
    var q0: array<vec4<f32>, TD4>;
    var acc0: array<vec4<f32>, TD4>;
    var m0 = MINF;
    var l0 = 0.0;
    let ti1 = t0 + lid + 8u;
    let rr1 = (b * seq + ti1) * nh + h;
    let mine1 = inside && lid + 8u < tq && ti1 < seq && rr1 >= r0 && rr1 < r0 + nrow;
    var q1: array<vec4<f32>, TD4>;
    var acc1: array<vec4<f32>, TD4>;
    var m1 = MINF;
    var l1 = 0.0;
    let ti2 = t0 + lid + 16u;
    let rr2 = (b * seq + ti2) * nh + h;
    let mine2 = inside && lid + 16u < tq && ti2 < seq && rr2 >= r0 && rr2 < r0 + nrow;
    var q2: array<vec4<f32>, TD4>;
    var acc2: array<vec4<f32>, TD4>;
    var m2 = MINF;
    var l2 = 0.0;
    let ti3 = t0 + lid + 24u;
    let rr3 = (b * seq + ti3) * nh + h;
    let mine3 = inside && lid + 24u < tq && ti3 < seq && rr3 >= r0 && rr3 < r0 + nrow;
    var q3: array<vec4<f32>, TD4>;
    var acc3: array<vec4<f32>, TD4>;
    var m3 = MINF;
    var l3 = 0.0;
    let ti4 = t0 + lid + 32u;
    let rr4 = (b * seq + ti4) * nh + h;
    let mine4 = inside && lid + 32u < tq && ti4 < seq && rr4 >= r0 && rr4 < r0 + nrow;
    var q4: array<vec4<f32>, TD4>;
    var acc4: array<vec4<f32>, TD4>;
    var m4 = MINF;
    var l4 = 0.0;
    let ti5 = t0 + lid + 40u;
    let rr5 = (b * seq + ti5) * nh + h;
    let mine5 = inside && lid + 40u < tq && ti5 < seq && rr5 >= r0 && rr5 < r0 + nrow;
    var q5: array<vec4<f32>, TD4>;
    var acc5: array<vec4<f32>, TD4>;
    var m5 = MINF;
    var l5 = 0.0;
    let ti6 = t0 + lid + 48u;
    let rr6 = (b * seq + ti6) * nh + h;
    let mine6 = inside && lid + 48u < tq && ti6 < seq && rr6 >= r0 && rr6 < r0 + nrow;
    var q6: array<vec4<f32>, TD4>;
    var acc6: array<vec4<f32>, TD4>;
    var m6 = MINF;
    var l6 = 0.0;
    let ti7 = t0 + lid + 56u;
    let rr7 = (b * seq + ti7) * nh + h;
    let mine7 = inside && lid + 56u < tq && ti7 < seq && rr7 >= r0 && rr7 < r0 + nrow;
    var q7: array<vec4<f32>, TD4>;
    var acc7: array<vec4<f32>, TD4>;
    var m7 = MINF;
    var l7 = 0.0;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        q0[cc] = vec4<f32>(0.0);
        if (mine0) { q0[cc] = ld4_q(rr0 * d, 4u * cc, d); }
        acc0[cc] = vec4<f32>(0.0);
        q1[cc] = vec4<f32>(0.0);
        if (mine1) { q1[cc] = ld4_q(rr1 * d, 4u * cc, d); }
        acc1[cc] = vec4<f32>(0.0);
        q2[cc] = vec4<f32>(0.0);
        if (mine2) { q2[cc] = ld4_q(rr2 * d, 4u * cc, d); }
        acc2[cc] = vec4<f32>(0.0);
        q3[cc] = vec4<f32>(0.0);
        if (mine3) { q3[cc] = ld4_q(rr3 * d, 4u * cc, d); }
        acc3[cc] = vec4<f32>(0.0);
        q4[cc] = vec4<f32>(0.0);
        if (mine4) { q4[cc] = ld4_q(rr4 * d, 4u * cc, d); }
        acc4[cc] = vec4<f32>(0.0);
        q5[cc] = vec4<f32>(0.0);
        if (mine5) { q5[cc] = ld4_q(rr5 * d, 4u * cc, d); }
        acc5[cc] = vec4<f32>(0.0);
        q6[cc] = vec4<f32>(0.0);
        if (mine6) { q6[cc] = ld4_q(rr6 * d, 4u * cc, d); }
        acc6[cc] = vec4<f32>(0.0);
        q7[cc] = vec4<f32>(0.0);
        if (mine7) { q7[cc] = ld4_q(rr7 * d, 4u * cc, d); }
        acc7[cc] = vec4<f32>(0.0);
    }
    // Units [u0, u1) of this chunk that hold a key <= tl.
    let u0 = c * P.chunk;
    var u1 = min(tl / unit + 1u, u0 + P.chunk);
    if (!inside) { u1 = u0; }
    // Per unit of the window: bit i = query lid + 8i lists the unit.
    var wmark: array<u32, UW>;
    if (lid == 0u) { atomicStore(&wany, 0u); }
    workgroupBarrier();
    for (var w0 = u0; w0 < u1; w0 = w0 + UW) {
        let wn = min(UW, u1 - w0);
        for (var j = 0u; j < UW; j = j + 1u) {
            var marks = 0u;
            if (dense && j < wn) { marks = 0xffu; }
            wmark[j] = marks;
        }
        if (!dense) {
            for (var i = 0u; i < 8u; i = i + 1u) {
                let ti = t0 + lid + 8u * i;
                if (!inside || lid + 8u * i >= tq || ti >= seq) { continue; }
                let row = (b * seq + ti) * n;
                for (var e = 0u; e < n; e = e + 1u) {
                    let kb = ldu_idx(row + e);
                    if (kb != NONE && kb <= ti / blk && kb >= w0 && kb - w0 < wn) {
                        wmark[kb - w0] = wmark[kb - w0] | (1u << i);
                    }
                }
            }
        }
        var my = 0u;
        for (var j = 0u; j < wn; j = j + 1u) {
            if (wmark[j] != 0u) { my = my | (1u << j); }
        }
        atomicOr(&wany, my);
        workgroupBarrier();
        if (lid == 0u) {
            wunion = atomicLoad(&wany);
            atomicStore(&wany, 0u);
        }
        let um = workgroupUniformLoad(&wunion);
        for (var j = 0u; j < wn; j = j + 1u) {
            if (((um >> j) & 1u) == 0u) { continue; }
            let marks = wmark[j];
            let in0 = mine0 && ((marks >> 0u) & 1u) != 0u;
            let in1 = mine1 && ((marks >> 1u) & 1u) != 0u;
            let in2 = mine2 && ((marks >> 2u) & 1u) != 0u;
            let in3 = mine3 && ((marks >> 3u) & 1u) != 0u;
            let in4 = mine4 && ((marks >> 4u) & 1u) != 0u;
            let in5 = mine5 && ((marks >> 5u) & 1u) != 0u;
            let in6 = mine6 && ((marks >> 6u) & 1u) != 0u;
            let in7 = mine7 && ((marks >> 7u) & 1u) != 0u;
            let ub = (w0 + j) * unit;
            let ue = min(ub + unit, tl + 1u);
            for (var st = ub; st < ue; st = st + KT) {
                for (var kk = lid; kk < KT; kk = kk + 8u) {
                    var key = NONE;
                    if (st + kk < ue) { key = st + kk; }
                    tkey[kk] = key;
                }
                for (var e = lid; e < KT * nc; e = e + 8u) {
                    let kk = e / nc;
                    let cc = e % nc;
                    var kx = vec4<f32>(0.0);
                    var vx = vec4<f32>(0.0);
                    if (st + kk < ue) {
                        let ko = k_off(b, st + kk, g);
                        kx = ld4_k(ko, 4u * cc, d);
                        vx = ld4_v(ko, 4u * cc, d);
                    }
                    tk[kk * TD4 + cc] = kx;
                    tv[kk * TD4 + cc] = vx;
                }
                workgroupBarrier();
                let use0 = in0 && st <= ti0;
                let use1 = in1 && st <= ti1;
                let use2 = in2 && st <= ti2;
                let use3 = in3 && st <= ti3;
                let use4 = in4 && st <= ti4;
                let use5 = in5 && st <= ti5;
                let use6 = in6 && st <= ti6;
                let use7 = in7 && st <= ti7;
                if (use0 || use1 || use2 || use3 || use4 || use5 || use6 || use7) {
                    // The tile's 16 scores of each query as four vec4s (straight-line
                    // code, no indexed private arrays), then one pass over the head dim.
                    var x0_0 = vec4<f32>(0.0);
                    var x0_1 = vec4<f32>(0.0);
                    var x0_2 = vec4<f32>(0.0);
                    var x0_3 = vec4<f32>(0.0);
                    var x1_0 = vec4<f32>(0.0);
                    var x1_1 = vec4<f32>(0.0);
                    var x1_2 = vec4<f32>(0.0);
                    var x1_3 = vec4<f32>(0.0);
                    var x2_0 = vec4<f32>(0.0);
                    var x2_1 = vec4<f32>(0.0);
                    var x2_2 = vec4<f32>(0.0);
                    var x2_3 = vec4<f32>(0.0);
                    var x3_0 = vec4<f32>(0.0);
                    var x3_1 = vec4<f32>(0.0);
                    var x3_2 = vec4<f32>(0.0);
                    var x3_3 = vec4<f32>(0.0);
                    var x4_0 = vec4<f32>(0.0);
                    var x4_1 = vec4<f32>(0.0);
                    var x4_2 = vec4<f32>(0.0);
                    var x4_3 = vec4<f32>(0.0);
                    var x5_0 = vec4<f32>(0.0);
                    var x5_1 = vec4<f32>(0.0);
                    var x5_2 = vec4<f32>(0.0);
                    var x5_3 = vec4<f32>(0.0);
                    var x6_0 = vec4<f32>(0.0);
                    var x6_1 = vec4<f32>(0.0);
                    var x6_2 = vec4<f32>(0.0);
                    var x6_3 = vec4<f32>(0.0);
                    var x7_0 = vec4<f32>(0.0);
                    var x7_1 = vec4<f32>(0.0);
                    var x7_2 = vec4<f32>(0.0);
                    var x7_3 = vec4<f32>(0.0);
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        let k0 = tk[0u * TD4 + cc];
                        let k1 = tk[1u * TD4 + cc];
                        let k2 = tk[2u * TD4 + cc];
                        let k3 = tk[3u * TD4 + cc];
                        let k4 = tk[4u * TD4 + cc];
                        let k5 = tk[5u * TD4 + cc];
                        let k6 = tk[6u * TD4 + cc];
                        let k7 = tk[7u * TD4 + cc];
                        let k8 = tk[8u * TD4 + cc];
                        let k9 = tk[9u * TD4 + cc];
                        let k10 = tk[10u * TD4 + cc];
                        let k11 = tk[11u * TD4 + cc];
                        let k12 = tk[12u * TD4 + cc];
                        let k13 = tk[13u * TD4 + cc];
                        let k14 = tk[14u * TD4 + cc];
                        let k15 = tk[15u * TD4 + cc];
                        let qc0 = q0[cc];
                        x0_0 = x0_0 + vec4<f32>(dot(qc0, k0), dot(qc0, k1), dot(qc0, k2), dot(qc0, k3));
                        x0_1 = x0_1 + vec4<f32>(dot(qc0, k4), dot(qc0, k5), dot(qc0, k6), dot(qc0, k7));
                        x0_2 = x0_2 + vec4<f32>(dot(qc0, k8), dot(qc0, k9), dot(qc0, k10), dot(qc0, k11));
                        x0_3 = x0_3 + vec4<f32>(dot(qc0, k12), dot(qc0, k13), dot(qc0, k14), dot(qc0, k15));
                        let qc1 = q1[cc];
                        x1_0 = x1_0 + vec4<f32>(dot(qc1, k0), dot(qc1, k1), dot(qc1, k2), dot(qc1, k3));
                        x1_1 = x1_1 + vec4<f32>(dot(qc1, k4), dot(qc1, k5), dot(qc1, k6), dot(qc1, k7));
                        x1_2 = x1_2 + vec4<f32>(dot(qc1, k8), dot(qc1, k9), dot(qc1, k10), dot(qc1, k11));
                        x1_3 = x1_3 + vec4<f32>(dot(qc1, k12), dot(qc1, k13), dot(qc1, k14), dot(qc1, k15));
                        let qc2 = q2[cc];
                        x2_0 = x2_0 + vec4<f32>(dot(qc2, k0), dot(qc2, k1), dot(qc2, k2), dot(qc2, k3));
                        x2_1 = x2_1 + vec4<f32>(dot(qc2, k4), dot(qc2, k5), dot(qc2, k6), dot(qc2, k7));
                        x2_2 = x2_2 + vec4<f32>(dot(qc2, k8), dot(qc2, k9), dot(qc2, k10), dot(qc2, k11));
                        x2_3 = x2_3 + vec4<f32>(dot(qc2, k12), dot(qc2, k13), dot(qc2, k14), dot(qc2, k15));
                        let qc3 = q3[cc];
                        x3_0 = x3_0 + vec4<f32>(dot(qc3, k0), dot(qc3, k1), dot(qc3, k2), dot(qc3, k3));
                        x3_1 = x3_1 + vec4<f32>(dot(qc3, k4), dot(qc3, k5), dot(qc3, k6), dot(qc3, k7));
                        x3_2 = x3_2 + vec4<f32>(dot(qc3, k8), dot(qc3, k9), dot(qc3, k10), dot(qc3, k11));
                        x3_3 = x3_3 + vec4<f32>(dot(qc3, k12), dot(qc3, k13), dot(qc3, k14), dot(qc3, k15));
                        let qc4 = q4[cc];
                        x4_0 = x4_0 + vec4<f32>(dot(qc4, k0), dot(qc4, k1), dot(qc4, k2), dot(qc4, k3));
                        x4_1 = x4_1 + vec4<f32>(dot(qc4, k4), dot(qc4, k5), dot(qc4, k6), dot(qc4, k7));
                        x4_2 = x4_2 + vec4<f32>(dot(qc4, k8), dot(qc4, k9), dot(qc4, k10), dot(qc4, k11));
                        x4_3 = x4_3 + vec4<f32>(dot(qc4, k12), dot(qc4, k13), dot(qc4, k14), dot(qc4, k15));
                        let qc5 = q5[cc];
                        x5_0 = x5_0 + vec4<f32>(dot(qc5, k0), dot(qc5, k1), dot(qc5, k2), dot(qc5, k3));
                        x5_1 = x5_1 + vec4<f32>(dot(qc5, k4), dot(qc5, k5), dot(qc5, k6), dot(qc5, k7));
                        x5_2 = x5_2 + vec4<f32>(dot(qc5, k8), dot(qc5, k9), dot(qc5, k10), dot(qc5, k11));
                        x5_3 = x5_3 + vec4<f32>(dot(qc5, k12), dot(qc5, k13), dot(qc5, k14), dot(qc5, k15));
                        let qc6 = q6[cc];
                        x6_0 = x6_0 + vec4<f32>(dot(qc6, k0), dot(qc6, k1), dot(qc6, k2), dot(qc6, k3));
                        x6_1 = x6_1 + vec4<f32>(dot(qc6, k4), dot(qc6, k5), dot(qc6, k6), dot(qc6, k7));
                        x6_2 = x6_2 + vec4<f32>(dot(qc6, k8), dot(qc6, k9), dot(qc6, k10), dot(qc6, k11));
                        x6_3 = x6_3 + vec4<f32>(dot(qc6, k12), dot(qc6, k13), dot(qc6, k14), dot(qc6, k15));
                        let qc7 = q7[cc];
                        x7_0 = x7_0 + vec4<f32>(dot(qc7, k0), dot(qc7, k1), dot(qc7, k2), dot(qc7, k3));
                        x7_1 = x7_1 + vec4<f32>(dot(qc7, k4), dot(qc7, k5), dot(qc7, k6), dot(qc7, k7));
                        x7_2 = x7_2 + vec4<f32>(dot(qc7, k8), dot(qc7, k9), dot(qc7, k10), dot(qc7, k11));
                        x7_3 = x7_3 + vec4<f32>(dot(qc7, k12), dot(qc7, k13), dot(qc7, k14), dot(qc7, k15));
                    }
                    // Per query: keys it does not see (after it, or the whole
                    // tile when !use) score MINF and get p = 0 by selection; the
                    // state (m, l, acc) changes only when use is set.
                    let ok0_0 = kvalid4(0u, ti0) & vec4<bool>(use0);
                    let y0_0 = select(vec4<f32>(MINF), sc * x0_0, ok0_0);
                    let ok0_1 = kvalid4(4u, ti0) & vec4<bool>(use0);
                    let y0_1 = select(vec4<f32>(MINF), sc * x0_1, ok0_1);
                    let ok0_2 = kvalid4(8u, ti0) & vec4<bool>(use0);
                    let y0_2 = select(vec4<f32>(MINF), sc * x0_2, ok0_2);
                    let ok0_3 = kvalid4(12u, ti0) & vec4<bool>(use0);
                    let y0_3 = select(vec4<f32>(MINF), sc * x0_3, ok0_3);
                    let mn0 = max(m0, max(max(hmax(y0_0), hmax(y0_1)), max(hmax(y0_2), hmax(y0_3))));
                    let c0 = exp(m0 - mn0);
                    let p0_0 = select(vec4<f32>(0.0), exp(y0_0 - vec4<f32>(mn0)), ok0_0);
                    let p0_1 = select(vec4<f32>(0.0), exp(y0_1 - vec4<f32>(mn0)), ok0_1);
                    let p0_2 = select(vec4<f32>(0.0), exp(y0_2 - vec4<f32>(mn0)), ok0_2);
                    let p0_3 = select(vec4<f32>(0.0), exp(y0_3 - vec4<f32>(mn0)), ok0_3);
                    l0 = select(l0, l0 * c0 + dot(p0_0 + p0_1 + p0_2 + p0_3, vec4<f32>(1.0)), use0);
                    m0 = mn0;
                    let ok1_0 = kvalid4(0u, ti1) & vec4<bool>(use1);
                    let y1_0 = select(vec4<f32>(MINF), sc * x1_0, ok1_0);
                    let ok1_1 = kvalid4(4u, ti1) & vec4<bool>(use1);
                    let y1_1 = select(vec4<f32>(MINF), sc * x1_1, ok1_1);
                    let ok1_2 = kvalid4(8u, ti1) & vec4<bool>(use1);
                    let y1_2 = select(vec4<f32>(MINF), sc * x1_2, ok1_2);
                    let ok1_3 = kvalid4(12u, ti1) & vec4<bool>(use1);
                    let y1_3 = select(vec4<f32>(MINF), sc * x1_3, ok1_3);
                    let mn1 = max(m1, max(max(hmax(y1_0), hmax(y1_1)), max(hmax(y1_2), hmax(y1_3))));
                    let c1 = exp(m1 - mn1);
                    let p1_0 = select(vec4<f32>(0.0), exp(y1_0 - vec4<f32>(mn1)), ok1_0);
                    let p1_1 = select(vec4<f32>(0.0), exp(y1_1 - vec4<f32>(mn1)), ok1_1);
                    let p1_2 = select(vec4<f32>(0.0), exp(y1_2 - vec4<f32>(mn1)), ok1_2);
                    let p1_3 = select(vec4<f32>(0.0), exp(y1_3 - vec4<f32>(mn1)), ok1_3);
                    l1 = select(l1, l1 * c1 + dot(p1_0 + p1_1 + p1_2 + p1_3, vec4<f32>(1.0)), use1);
                    m1 = mn1;
                    let ok2_0 = kvalid4(0u, ti2) & vec4<bool>(use2);
                    let y2_0 = select(vec4<f32>(MINF), sc * x2_0, ok2_0);
                    let ok2_1 = kvalid4(4u, ti2) & vec4<bool>(use2);
                    let y2_1 = select(vec4<f32>(MINF), sc * x2_1, ok2_1);
                    let ok2_2 = kvalid4(8u, ti2) & vec4<bool>(use2);
                    let y2_2 = select(vec4<f32>(MINF), sc * x2_2, ok2_2);
                    let ok2_3 = kvalid4(12u, ti2) & vec4<bool>(use2);
                    let y2_3 = select(vec4<f32>(MINF), sc * x2_3, ok2_3);
                    let mn2 = max(m2, max(max(hmax(y2_0), hmax(y2_1)), max(hmax(y2_2), hmax(y2_3))));
                    let c2 = exp(m2 - mn2);
                    let p2_0 = select(vec4<f32>(0.0), exp(y2_0 - vec4<f32>(mn2)), ok2_0);
                    let p2_1 = select(vec4<f32>(0.0), exp(y2_1 - vec4<f32>(mn2)), ok2_1);
                    let p2_2 = select(vec4<f32>(0.0), exp(y2_2 - vec4<f32>(mn2)), ok2_2);
                    let p2_3 = select(vec4<f32>(0.0), exp(y2_3 - vec4<f32>(mn2)), ok2_3);
                    l2 = select(l2, l2 * c2 + dot(p2_0 + p2_1 + p2_2 + p2_3, vec4<f32>(1.0)), use2);
                    m2 = mn2;
                    let ok3_0 = kvalid4(0u, ti3) & vec4<bool>(use3);
                    let y3_0 = select(vec4<f32>(MINF), sc * x3_0, ok3_0);
                    let ok3_1 = kvalid4(4u, ti3) & vec4<bool>(use3);
                    let y3_1 = select(vec4<f32>(MINF), sc * x3_1, ok3_1);
                    let ok3_2 = kvalid4(8u, ti3) & vec4<bool>(use3);
                    let y3_2 = select(vec4<f32>(MINF), sc * x3_2, ok3_2);
                    let ok3_3 = kvalid4(12u, ti3) & vec4<bool>(use3);
                    let y3_3 = select(vec4<f32>(MINF), sc * x3_3, ok3_3);
                    let mn3 = max(m3, max(max(hmax(y3_0), hmax(y3_1)), max(hmax(y3_2), hmax(y3_3))));
                    let c3 = exp(m3 - mn3);
                    let p3_0 = select(vec4<f32>(0.0), exp(y3_0 - vec4<f32>(mn3)), ok3_0);
                    let p3_1 = select(vec4<f32>(0.0), exp(y3_1 - vec4<f32>(mn3)), ok3_1);
                    let p3_2 = select(vec4<f32>(0.0), exp(y3_2 - vec4<f32>(mn3)), ok3_2);
                    let p3_3 = select(vec4<f32>(0.0), exp(y3_3 - vec4<f32>(mn3)), ok3_3);
                    l3 = select(l3, l3 * c3 + dot(p3_0 + p3_1 + p3_2 + p3_3, vec4<f32>(1.0)), use3);
                    m3 = mn3;
                    let ok4_0 = kvalid4(0u, ti4) & vec4<bool>(use4);
                    let y4_0 = select(vec4<f32>(MINF), sc * x4_0, ok4_0);
                    let ok4_1 = kvalid4(4u, ti4) & vec4<bool>(use4);
                    let y4_1 = select(vec4<f32>(MINF), sc * x4_1, ok4_1);
                    let ok4_2 = kvalid4(8u, ti4) & vec4<bool>(use4);
                    let y4_2 = select(vec4<f32>(MINF), sc * x4_2, ok4_2);
                    let ok4_3 = kvalid4(12u, ti4) & vec4<bool>(use4);
                    let y4_3 = select(vec4<f32>(MINF), sc * x4_3, ok4_3);
                    let mn4 = max(m4, max(max(hmax(y4_0), hmax(y4_1)), max(hmax(y4_2), hmax(y4_3))));
                    let c4 = exp(m4 - mn4);
                    let p4_0 = select(vec4<f32>(0.0), exp(y4_0 - vec4<f32>(mn4)), ok4_0);
                    let p4_1 = select(vec4<f32>(0.0), exp(y4_1 - vec4<f32>(mn4)), ok4_1);
                    let p4_2 = select(vec4<f32>(0.0), exp(y4_2 - vec4<f32>(mn4)), ok4_2);
                    let p4_3 = select(vec4<f32>(0.0), exp(y4_3 - vec4<f32>(mn4)), ok4_3);
                    l4 = select(l4, l4 * c4 + dot(p4_0 + p4_1 + p4_2 + p4_3, vec4<f32>(1.0)), use4);
                    m4 = mn4;
                    let ok5_0 = kvalid4(0u, ti5) & vec4<bool>(use5);
                    let y5_0 = select(vec4<f32>(MINF), sc * x5_0, ok5_0);
                    let ok5_1 = kvalid4(4u, ti5) & vec4<bool>(use5);
                    let y5_1 = select(vec4<f32>(MINF), sc * x5_1, ok5_1);
                    let ok5_2 = kvalid4(8u, ti5) & vec4<bool>(use5);
                    let y5_2 = select(vec4<f32>(MINF), sc * x5_2, ok5_2);
                    let ok5_3 = kvalid4(12u, ti5) & vec4<bool>(use5);
                    let y5_3 = select(vec4<f32>(MINF), sc * x5_3, ok5_3);
                    let mn5 = max(m5, max(max(hmax(y5_0), hmax(y5_1)), max(hmax(y5_2), hmax(y5_3))));
                    let c5 = exp(m5 - mn5);
                    let p5_0 = select(vec4<f32>(0.0), exp(y5_0 - vec4<f32>(mn5)), ok5_0);
                    let p5_1 = select(vec4<f32>(0.0), exp(y5_1 - vec4<f32>(mn5)), ok5_1);
                    let p5_2 = select(vec4<f32>(0.0), exp(y5_2 - vec4<f32>(mn5)), ok5_2);
                    let p5_3 = select(vec4<f32>(0.0), exp(y5_3 - vec4<f32>(mn5)), ok5_3);
                    l5 = select(l5, l5 * c5 + dot(p5_0 + p5_1 + p5_2 + p5_3, vec4<f32>(1.0)), use5);
                    m5 = mn5;
                    let ok6_0 = kvalid4(0u, ti6) & vec4<bool>(use6);
                    let y6_0 = select(vec4<f32>(MINF), sc * x6_0, ok6_0);
                    let ok6_1 = kvalid4(4u, ti6) & vec4<bool>(use6);
                    let y6_1 = select(vec4<f32>(MINF), sc * x6_1, ok6_1);
                    let ok6_2 = kvalid4(8u, ti6) & vec4<bool>(use6);
                    let y6_2 = select(vec4<f32>(MINF), sc * x6_2, ok6_2);
                    let ok6_3 = kvalid4(12u, ti6) & vec4<bool>(use6);
                    let y6_3 = select(vec4<f32>(MINF), sc * x6_3, ok6_3);
                    let mn6 = max(m6, max(max(hmax(y6_0), hmax(y6_1)), max(hmax(y6_2), hmax(y6_3))));
                    let c6 = exp(m6 - mn6);
                    let p6_0 = select(vec4<f32>(0.0), exp(y6_0 - vec4<f32>(mn6)), ok6_0);
                    let p6_1 = select(vec4<f32>(0.0), exp(y6_1 - vec4<f32>(mn6)), ok6_1);
                    let p6_2 = select(vec4<f32>(0.0), exp(y6_2 - vec4<f32>(mn6)), ok6_2);
                    let p6_3 = select(vec4<f32>(0.0), exp(y6_3 - vec4<f32>(mn6)), ok6_3);
                    l6 = select(l6, l6 * c6 + dot(p6_0 + p6_1 + p6_2 + p6_3, vec4<f32>(1.0)), use6);
                    m6 = mn6;
                    let ok7_0 = kvalid4(0u, ti7) & vec4<bool>(use7);
                    let y7_0 = select(vec4<f32>(MINF), sc * x7_0, ok7_0);
                    let ok7_1 = kvalid4(4u, ti7) & vec4<bool>(use7);
                    let y7_1 = select(vec4<f32>(MINF), sc * x7_1, ok7_1);
                    let ok7_2 = kvalid4(8u, ti7) & vec4<bool>(use7);
                    let y7_2 = select(vec4<f32>(MINF), sc * x7_2, ok7_2);
                    let ok7_3 = kvalid4(12u, ti7) & vec4<bool>(use7);
                    let y7_3 = select(vec4<f32>(MINF), sc * x7_3, ok7_3);
                    let mn7 = max(m7, max(max(hmax(y7_0), hmax(y7_1)), max(hmax(y7_2), hmax(y7_3))));
                    let c7 = exp(m7 - mn7);
                    let p7_0 = select(vec4<f32>(0.0), exp(y7_0 - vec4<f32>(mn7)), ok7_0);
                    let p7_1 = select(vec4<f32>(0.0), exp(y7_1 - vec4<f32>(mn7)), ok7_1);
                    let p7_2 = select(vec4<f32>(0.0), exp(y7_2 - vec4<f32>(mn7)), ok7_2);
                    let p7_3 = select(vec4<f32>(0.0), exp(y7_3 - vec4<f32>(mn7)), ok7_3);
                    l7 = select(l7, l7 * c7 + dot(p7_0 + p7_1 + p7_2 + p7_3, vec4<f32>(1.0)), use7);
                    m7 = mn7;
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        let v0 = tv[0u * TD4 + cc];
                        let v1 = tv[1u * TD4 + cc];
                        let v2 = tv[2u * TD4 + cc];
                        let v3 = tv[3u * TD4 + cc];
                        let v4 = tv[4u * TD4 + cc];
                        let v5 = tv[5u * TD4 + cc];
                        let v6 = tv[6u * TD4 + cc];
                        let v7 = tv[7u * TD4 + cc];
                        let v8 = tv[8u * TD4 + cc];
                        let v9 = tv[9u * TD4 + cc];
                        let v10 = tv[10u * TD4 + cc];
                        let v11 = tv[11u * TD4 + cc];
                        let v12 = tv[12u * TD4 + cc];
                        let v13 = tv[13u * TD4 + cc];
                        let v14 = tv[14u * TD4 + cc];
                        let v15 = tv[15u * TD4 + cc];
                        acc0[cc] = select(acc0[cc], acc0[cc] * c0 + p0_0.x * v0 + p0_0.y * v1 + p0_0.z * v2 + p0_0.w * v3 + p0_1.x * v4 + p0_1.y * v5 + p0_1.z * v6 + p0_1.w * v7 + p0_2.x * v8 + p0_2.y * v9 + p0_2.z * v10 + p0_2.w * v11 + p0_3.x * v12 + p0_3.y * v13 + p0_3.z * v14 + p0_3.w * v15, use0);
                        acc1[cc] = select(acc1[cc], acc1[cc] * c1 + p1_0.x * v0 + p1_0.y * v1 + p1_0.z * v2 + p1_0.w * v3 + p1_1.x * v4 + p1_1.y * v5 + p1_1.z * v6 + p1_1.w * v7 + p1_2.x * v8 + p1_2.y * v9 + p1_2.z * v10 + p1_2.w * v11 + p1_3.x * v12 + p1_3.y * v13 + p1_3.z * v14 + p1_3.w * v15, use1);
                        acc2[cc] = select(acc2[cc], acc2[cc] * c2 + p2_0.x * v0 + p2_0.y * v1 + p2_0.z * v2 + p2_0.w * v3 + p2_1.x * v4 + p2_1.y * v5 + p2_1.z * v6 + p2_1.w * v7 + p2_2.x * v8 + p2_2.y * v9 + p2_2.z * v10 + p2_2.w * v11 + p2_3.x * v12 + p2_3.y * v13 + p2_3.z * v14 + p2_3.w * v15, use2);
                        acc3[cc] = select(acc3[cc], acc3[cc] * c3 + p3_0.x * v0 + p3_0.y * v1 + p3_0.z * v2 + p3_0.w * v3 + p3_1.x * v4 + p3_1.y * v5 + p3_1.z * v6 + p3_1.w * v7 + p3_2.x * v8 + p3_2.y * v9 + p3_2.z * v10 + p3_2.w * v11 + p3_3.x * v12 + p3_3.y * v13 + p3_3.z * v14 + p3_3.w * v15, use3);
                        acc4[cc] = select(acc4[cc], acc4[cc] * c4 + p4_0.x * v0 + p4_0.y * v1 + p4_0.z * v2 + p4_0.w * v3 + p4_1.x * v4 + p4_1.y * v5 + p4_1.z * v6 + p4_1.w * v7 + p4_2.x * v8 + p4_2.y * v9 + p4_2.z * v10 + p4_2.w * v11 + p4_3.x * v12 + p4_3.y * v13 + p4_3.z * v14 + p4_3.w * v15, use4);
                        acc5[cc] = select(acc5[cc], acc5[cc] * c5 + p5_0.x * v0 + p5_0.y * v1 + p5_0.z * v2 + p5_0.w * v3 + p5_1.x * v4 + p5_1.y * v5 + p5_1.z * v6 + p5_1.w * v7 + p5_2.x * v8 + p5_2.y * v9 + p5_2.z * v10 + p5_2.w * v11 + p5_3.x * v12 + p5_3.y * v13 + p5_3.z * v14 + p5_3.w * v15, use5);
                        acc6[cc] = select(acc6[cc], acc6[cc] * c6 + p6_0.x * v0 + p6_0.y * v1 + p6_0.z * v2 + p6_0.w * v3 + p6_1.x * v4 + p6_1.y * v5 + p6_1.z * v6 + p6_1.w * v7 + p6_2.x * v8 + p6_2.y * v9 + p6_2.z * v10 + p6_2.w * v11 + p6_3.x * v12 + p6_3.y * v13 + p6_3.z * v14 + p6_3.w * v15, use6);
                        acc7[cc] = select(acc7[cc], acc7[cc] * c7 + p7_0.x * v0 + p7_0.y * v1 + p7_0.z * v2 + p7_0.w * v3 + p7_1.x * v4 + p7_1.y * v5 + p7_1.z * v6 + p7_1.w * v7 + p7_2.x * v8 + p7_2.y * v9 + p7_2.z * v10 + p7_2.w * v11 + p7_3.x * v12 + p7_3.y * v13 + p7_3.z * v14 + p7_3.w * v15, use7);
                    }
                }
                workgroupBarrier();
            }
        }
        workgroupBarrier();
    }
    if (mine0) { tiled_store(c, rr0 - r0, rr0, (b * nh + h) * seq + ti0, m0, l0, acc0); }
    if (mine1) { tiled_store(c, rr1 - r0, rr1, (b * nh + h) * seq + ti1, m1, l1, acc1); }
    if (mine2) { tiled_store(c, rr2 - r0, rr2, (b * nh + h) * seq + ti2, m2, l2, acc2); }
    if (mine3) { tiled_store(c, rr3 - r0, rr3, (b * nh + h) * seq + ti3, m3, l3, acc3); }
    if (mine4) { tiled_store(c, rr4 - r0, rr4, (b * nh + h) * seq + ti4, m4, l4, acc4); }
    if (mine5) { tiled_store(c, rr5 - r0, rr5, (b * nh + h) * seq + ti5, m5, l5, acc5); }
    if (mine6) { tiled_store(c, rr6 - r0, rr6, (b * nh + h) * seq + ti6, m6, l6, acc6); }
    if (mine7) { tiled_store(c, rr7 - r0, rr7, (b * nh + h) * seq + ti7, m7, l7, acc7); }
}

//!kernel attn_bwd_stats(d_o: in, o: in, lse: in, idx: idx, stats: out) : AttnParams
// One invocation per (batch, query, head) row of o: stats[2·li] = lse[li] and
// stats[2·li + 1] = delta = dO·O, li = (batch·n_heads + head)·seq + query
// (lse and delta share one buffer so that the gradient kernels bind at most
// eight storage buffers, WebGPU's default limit). `idx` is bound like in every
// kernel of this file, and not read.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let r = lin(gid, nw);
    let seq = P.seq;
    let nh = P.n_heads;
    if (r >= P.batch * seq * nh) { return; }
    let d = P.head_dim;
    let nc = (d + 3u) / 4u;
    let h = r % nh;
    let bt = r / nh;
    let t = bt % seq;
    let b = bt / seq;
    let qo = r * d;
    var dsum = 0.0;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        dsum = dsum + dot(ld4_d_o(qo, 4u * cc, d), ld4_o(qo, 4u * cc, d));
    }
    let li = (b * nh + h) * seq + t;
    st_stats(2u * li, ld_lse(li));
    st_stats(2u * li + 1u, dsum);
}

//!kernel attn_bwd_dq(q: in, k: in, v: in, d_o: in, stats: in, idx: idx, dq: out) : AttnParams
// One invocation per (chunk, batch, query, head): dq = scale · Σ_s p (dO·v_s -
// delta) k_s over the chunk's slots, p = exp(scale·q·k_s - lse), with (lse,
// delta) from `attn_bwd_stats`; written to dq (nch = 1) or to the partial
// buffer [nch, R, head_dim]. A query without keys has no slot to visit.

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = P.seq;
    let nh = P.n_heads;
    let nch = P.nch;
    let nrow = P.nrow;
    if (i >= nch * nrow) { return; }
    let d = P.head_dim;
    let nc = (d + 3u) / 4u;
    let sc = P.scale;
    let c = i / nrow;
    let rl = i % nrow;
    let r = P.r0 + rl;
    let h = r % nh;
    let bt = r / nh;
    let t = bt % seq;
    let b = bt / seq;
    let g = h / (nh / P.n_kv_heads);
    let qo = r * d;
    let li = (b * nh + h) * seq + t;
    var qv: array<vec4<f32>, HD4>;
    var dov: array<vec4<f32>, HD4>;
    var acc: array<vec4<f32>, HD4>;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        qv[cc] = ld4_q(qo, 4u * cc, d);
        dov[cc] = ld4_d_o(qo, 4u * cc, d);
        acc[cc] = vec4<f32>(0.0);
    }
    let lse = ld_stats(2u * li);
    let dsum = ld_stats(2u * li + 1u);
    let s0 = c * P.chunk;
    let s1 = min(n_slots(t), s0 + P.chunk);
    for (var si = s0; si < s1; si = si + 1u) {
        let s = slot_key(b, t, si);
        if (s == NONE) { continue; }
        let ko = k_off(b, s, g);
        var x = 0.0;
        var dp = 0.0;
        for (var cc = 0u; cc < nc; cc = cc + 1u) {
            x = x + dot(qv[cc], ld4_k(ko, 4u * cc, d));
            dp = dp + dot(dov[cc], ld4_v(ko, 4u * cc, d));
        }
        let p = exp(sc * x - lse);
        let ds = sc * p * (dp - dsum);
        for (var cc = 0u; cc < nc; cc = cc + 1u) {
            acc[cc] = acc[cc] + ds * ld4_k(ko, 4u * cc, d);
        }
    }
    let oo = (c * nrow + rl) * d;
    for (var e = 0u; e < d; e = e + 1u) {
        st_dq(oo + e, acc[e / 4u][e % 4u]);
    }
}

//!kernel attn_bwd_dkdv(q: in, k: in, v: in, d_o: in, stats: in, idx: idx, dk: out, dv: out) : AttnParams
// One invocation per (chunk, batch, key s, kv head): loops over the chunk's
// queries t in [c·chunk, (c+1)·chunk), t >= s, whose own pattern row contains s
// (tokens) or s's block (blocks), and over the query heads of the group, so
// dk and dv are summed in a fixed order without atomics; written to dk/dv
// (nch = 1) or the partial buffers [nch, R, head_dim]. A query attending s
// has a key, so its lse is finite.

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = P.seq;
    let nh = P.n_heads;
    let nkv = P.n_kv_heads;
    let nch = P.nch;
    let nrow = P.nrow;
    if (i >= nch * nrow) { return; }
    let d = P.head_dim;
    let nc = (d + 3u) / 4u;
    let sc = P.scale;
    let grp = nh / nkv;
    let c = i / nrow;
    let rl = i % nrow;
    let r = P.r0 + rl;
    let g = r % nkv;
    let bs = r / nkv;
    let s = bs % seq;
    let b = bs / seq;
    let ko = r * d;
    var dk: array<vec4<f32>, HD4>;
    var dv: array<vec4<f32>, HD4>;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        dk[cc] = vec4<f32>(0.0);
        dv[cc] = vec4<f32>(0.0);
    }
    let thi = min(seq, (c + 1u) * P.chunk);
    for (var t = max(s, c * P.chunk); t < thi; t = t + 1u) {
        if (!attends(b, t, s)) { continue; }
        for (var h = g * grp; h < (g + 1u) * grp; h = h + 1u) {
            let li = (b * nh + h) * seq + t;
            let lse = ld_stats(2u * li);
            let qo = q_off(b, t, h);
            var x = 0.0;
            var dp = 0.0;
            for (var cc = 0u; cc < nc; cc = cc + 1u) {
                x = x + dot(ld4_q(qo, 4u * cc, d), ld4_k(ko, 4u * cc, d));
                dp = dp + dot(ld4_d_o(qo, 4u * cc, d), ld4_v(ko, 4u * cc, d));
            }
            let p = exp(sc * x - lse);
            let ds = sc * p * (dp - ld_stats(2u * li + 1u));
            for (var cc = 0u; cc < nc; cc = cc + 1u) {
                dv[cc] = dv[cc] + p * ld4_d_o(qo, 4u * cc, d);
                dk[cc] = dk[cc] + ds * ld4_q(qo, 4u * cc, d);
            }
        }
    }
    let oo = (c * nrow + rl) * d;
    for (var e = 0u; e < d; e = e + 1u) {
        st_dk(oo + e, dk[e / 4u][e % 4u]);
        st_dv(oo + e, dv[e / 4u][e % 4u]);
    }
}

//!kernel indexer_kl(q: in, k: in, lse: in, scores: in, idx: idx, loss: inout, dscores: out) : AttnKlParams
// One 256-wide workgroup per (batch, query) row of the tile of queries
// q0 .. q0 + Q (Q = qrows): scores and dscores are [batch, Q, seq], loss
// [batch, seq] is written at the tile's rows only. Zeroes the dscores row (and
// stops there, loss 0, for a row outside the sample), then over the key set K(t): p = mean over heads of the attention probabilities,
// r = softmax of the indexer scores; loss = Σ p (ln p - ln r), dscores = r - p.
// K(t) is query t's own pattern row (blocks: the keys s <= t of its listed
// blocks); a query with keys has a finite lse in every head.
// With subgroups (of at least 8 invocations: at most 32 per workgroup), the
// three reductions take each subgroup's subgroupMax/subgroupAdd and combine
// the subgroups' results in subgroup order (two barriers per reduction
// instead of ten); the sums' order differs from the tree's, so results may differ in
// the last bits (both orders are fixed: each is deterministic).
// The layout (a 256-wide workgroup per query row, keys spread over the
// invocations) is already the hardware-GPU shape, so there is no separate
// `_hw` variant: the per-key work (nh dots of head_dim) reads the row's q
// from global memory, every invocation the same addresses (broadcast reads
// a GPU's cache serves).
//#if subgroups
var<workgroup> kl_sg: array<f32, 32>;
// (subgroup id, subgroups in the workgroup, lane).
var<private> kl_sgv: vec3<u32>;
fn kl_reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    let x = select(subgroupAdd(v), subgroupMax(v), is_max);
    if (kl_sgv.z == 0u) { kl_sg[kl_sgv.x] = x; }
    workgroupBarrier();
    var r = kl_sg[0];
    for (var i = 1u; i < kl_sgv.y; i = i + 1u) { r = select(r + kl_sg[i], max(r, kl_sg[i]), is_max); }
    workgroupBarrier();
    return r;
}
//#else
fn kl_reduce(lid: u32, v: f32, is_max: bool) -> f32 { return wg_reduce(lid, v, is_max); }
//#endif
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
//#if subgroups
        @builtin(subgroup_id) sgid: u32, @builtin(num_subgroups) nsg: u32, @builtin(subgroup_invocation_id) sgi: u32,
//#endif
        @builtin(local_invocation_index) lid: u32) {
//#if subgroups
    kl_sgv = vec3<u32>(sgid, nsg, sgi);
//#endif
    let row = wg.x + wg.y * nw.x;
    let seq = P.seq;
    let nq = P.qrows;
    if (row >= P.batch * nq) { return; }
    let nh = P.n_heads;
    let d = P.head_dim;
    let sc = P.scale;
    let grp = nh / P.n_kv_heads;
    let b = row / nq;
    let t = P.q0 + row % nq;
    let ro = row * seq;
    for (var s = lid; s < seq; s = s + WG) {
        st_dscores(ro + s, 0.0);
    }
    // A row outside the sample: zero loss and gradient (uniform per workgroup).
    if (t % P.every != P.phase) {
        if (lid == 0u) { st_loss(b * seq + t, 0.0); }
        return;
    }
    storageBarrier();
    let ns = n_slots(t);
    var mx = LOWEST;
    for (var si = lid; si < ns; si = si + WG) {
        let s = slot_key(b, t, si);
        if (s == NONE) { continue; }
        mx = max(mx, ld_scores(ro + s));
    }
    let m = kl_reduce(lid, mx, true);
    var z = 0.0;
    for (var si = lid; si < ns; si = si + WG) {
        let s = slot_key(b, t, si);
        if (s == NONE) { continue; }
        z = z + exp(ld_scores(ro + s) - m);
    }
    let lz = log(kl_reduce(lid, z, false));
    var tot = 0.0;
    let inv_h = 1.0 / f32(nh);
    for (var si = lid; si < ns; si = si + WG) {
        let s = slot_key(b, t, si);
        if (s == NONE) { continue; }
        var p = 0.0;
        for (var h = 0u; h < nh; h = h + 1u) {
            let l = ld_lse((b * nh + h) * seq + t);
            let qo = q_off(b, t, h);
            let ko = k_off(b, s, h / grp);
            var x = 0.0;
            for (var e = 0u; e < d; e = e + 4u) {
                x = x + dot(ld4_q(qo, e, d), ld4_k(ko, e, d));
            }
            p = p + exp(sc * x - l) * inv_h;
        }
        let log_r = ld_scores(ro + s) - m - lz;
        if (p > 0.0) {
            tot = tot + p * (log(p) - log_r);
        }
        st_dscores(ro + s, exp(log_r) - p);
    }
    let total = kl_reduce(lid, tot, false);
    if (lid == 0u) {
        st_loss(b * seq + t, total);
    }
}
