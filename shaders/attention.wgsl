// Flash-style causal attention (dense, token and block patterns), its
// backward pass, and the indexer's KL loss against the main attention.
//
// Parameters shared by every kernel of this file:
//   p0 batch, p1 seq, p2 n_heads, p3 n_kv_heads, p4 head_dim, p5 scale (f32),
//   p6 pattern (0 dense, 1 tokens, 2 blocks), p7 k (tokens) or n (blocks),
//   p8 block, p9 ceil(seq / block); the split kernels (attn_fwd, attn_bwd_dq,
//   attn_bwd_dkdv) also p10 chunk (slots or queries per chunk), p11 chunks
//   nch, p12 first row r0 and p13 rows R of this launch.
// Layouts: q, o [batch, seq, n_heads, head_dim]; k, v [batch, seq, n_kv_heads,
// head_dim]; lse [batch, n_heads, seq]; idx [batch, seq, k] (tokens) or
// [batch, nqb, n] (blocks). Every kernel takes the pattern as `idx` (a dummy
// one-word tensor for the dense pattern, never read).
//
// The keys of query t are enumerated as "slots": dense t + 1 slots (key =
// slot), tokens k slots (key = idx entry), blocks n·block slots (key = block
// start + offset); `slot_key` returns NONE for a slot to skip (padding, a
// future key, a block beyond the sequence).
//
// Split kernels: llvmpipe (lavapipe) stops every loop after 65 535 iterations
// (counted across the loops of a batch of invocations), so no invocation may
// loop over a whole sequence. Each of these kernels runs one invocation per
// (chunk c, row r0 + rl): a row is a (batch, query, head) or (batch, key, kv
// head) in the layout order of its output (so row r starts at r·head_dim), and
// the chunk is a range of its slots (keys) or queries. With nch = 1 the
// invocation writes the final result; otherwise it writes partials at
// (c·R + rl) that `shaders/split.wgsl` combines in chunk order.

const NONE: u32 = 0xffffffffu;
// Largest head_dim in vec4 units (the op validates head_dim <= 256). Loops
// over the head dim run 4 lanes at a time: llvmpipe (lavapipe) caps the loop
// iterations of one invocation at 65 535, so they must stay short.
const HD4: u32 = 64u;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn n_slots(t: u32) -> u32 {
    let mode = pu(6u);
    if (mode == 0u) { return t + 1u; }
    if (mode == 1u) { return pu(7u); }
    return pu(7u) * pu(8u);
}

fn slot_key(b: u32, t: u32, i: u32) -> u32 {
    let mode = pu(6u);
    if (mode == 0u) { return i; }
    if (mode == 1u) {
        let j = ldu_idx((b * pu(1u) + t) * pu(7u) + i);
        if (j == NONE || j > t) { return NONE; }
        return j;
    }
    let blk = pu(8u);
    let qb = t / blk;
    let kb = ldu_idx((b * pu(9u) + qb) * pu(7u) + i / blk);
    if (kb == NONE || kb > qb) { return NONE; }
    let j = kb * blk + i % blk;
    if (j > t) { return NONE; }
    return j;
}

// Does query t (>= s) attend to key s? For blocks the answer holds for the
// whole query block of t.
fn attends(b: u32, t: u32, s: u32) -> bool {
    let mode = pu(6u);
    if (mode == 0u) { return true; }
    let n = pu(7u);
    var row: u32;
    var want: u32;
    if (mode == 1u) {
        row = (b * pu(1u) + t) * n;
        want = s;
    } else {
        row = (b * pu(9u) + t / pu(8u)) * n;
        want = s / pu(8u);
    }
    for (var i = 0u; i < n; i = i + 1u) {
        if (ldu_idx(row + i) == want) { return true; }
    }
    return false;
}

fn q_off(b: u32, t: u32, h: u32) -> u32 {
    return ((b * pu(1u) + t) * pu(2u) + h) * pu(4u);
}

fn k_off(b: u32, s: u32, g: u32) -> u32 {
    return ((b * pu(1u) + s) * pu(3u) + g) * pu(4u);
}



// Workgroup reductions of the 256-wide kernels (called in uniform control flow).
const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

fn wg_reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w >> 1u) {
        if (lid < w) {
            let a = red[lid];
            let o = red[lid + w];
            red[lid] = select(a + o, max(a, o), is_max);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

//!kernel attn_fwd(q: in, k: in, v: in, idx: idx, o: out, lse: out)
// One invocation per (chunk, batch, query, head): online softmax over the
// chunk's slots [c·p10, (c+1)·p10). nch = 1: o and lse are final. Otherwise o
// is the partial buffer [nch, R, head_dim] of unnormalised outputs and lse the
// buffer [nch, R, 2] of (running max m, sum of exp l) per chunk.

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = pu(1u);
    let nh = pu(2u);
    let nch = pu(11u);
    let nrow = pu(13u);
    if (i >= nch * nrow) { return; }
    let d = pu(4u);
    let nc = (d + 3u) / 4u;
    let sc = pf(5u);
    let c = i / nrow;
    let rl = i % nrow;
    let r = pu(12u) + rl;
    let h = r % nh;
    let bt = r / nh;
    let t = bt % seq;
    let b = bt / seq;
    let g = h / (nh / pu(3u));
    let qo = r * d;
    var qv: array<vec4<f32>, HD4>;
    var acc: array<vec4<f32>, HD4>;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        qv[cc] = ld4_q(qo, 4u * cc, d);
        acc[cc] = vec4<f32>(0.0);
    }
    var m = neg_inf();
    var l = 0.0;
    let s0 = c * pu(10u);
    let s1 = min(n_slots(t), s0 + pu(10u));
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

//!kernel attn_fwd_tiled(q: in, k: in, v: in, idx: idx, o: out, lse: out)
// The dense and block patterns, tiled: one 8-wide workgroup per (chunk c,
// batch, query tile, head) of p14 TQ <= 64 consecutive queries, invocation i
// running queries i, i + 8, .., i + 56 of the tile (eight online softmaxes
// sharing every K/V read: software adapters are bound by memory reads, not
// arithmetic). For blocks TQ divides the block, so the tile shares its query
// block's key blocks. The tile's slots [c·p10, (c+1)·p10) go through
// workgroup memory KT keys at a time: each K/V tile is loaded once,
// cooperatively, and read by every query; scores and p·v run in
// straight-line vec4 code over the KT keys, one pass over the head dim each.
// Workgroups cover the tiles p15 .. p15 + p16 (in (batch, tile, head) order,
// the tiles meeting the rows r0 .. r0 + R); a query writes only if its row
// is in the launch, in the layout of `attn_fwd`. head_dim <= 128. The
// per-query code is written out for each of the eight queries (0 .. 7).
const KT: u32 = 16u;
const TD4: u32 = 32u;
var<workgroup> tk: array<vec4<f32>, 512>;
var<workgroup> tv: array<vec4<f32>, 512>;
var<workgroup> tkey: array<u32, 16>;

fn tile_key(b: u32, t0: u32, tl: u32, si: u32, s1: u32) -> u32 {
    if (si >= s1) { return NONE; }
    if (pu(6u) == 0u) { return si; }
    let blk = pu(8u);
    let qb = t0 / blk;
    let kb = ldu_idx((b * pu(9u) + qb) * pu(7u) + si / blk);
    if (kb == NONE || kb > qb) { return NONE; }
    let j = kb * blk + si % blk;
    if (j > tl) { return NONE; }
    return j;
}

// Scores of keys kk0 .. kk0 + 3, -inf where query t does not see the key.
fn kmask4(x: vec4<f32>, kk0: u32, t: u32) -> vec4<f32> {
    let j = vec4<u32>(tkey[kk0], tkey[kk0 + 1u], tkey[kk0 + 2u], tkey[kk0 + 3u]);
    return select(vec4<f32>(neg_inf()), x, j <= vec4<u32>(t));
}

fn hmax(x: vec4<f32>) -> f32 {
    return max(max(x.x, x.y), max(x.z, x.w));
}

// The final (nch = 1) or partial output of one query of the tile.
fn tiled_store(c: u32, rl: u32, r: u32, li: u32, m: f32, l: f32, acc: array<vec4<f32>, TD4>) {
    let d = pu(4u);
    let nch = pu(11u);
    let nrow = pu(13u);
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
    let seq = pu(1u);
    let nh = pu(2u);
    let nch = pu(11u);
    let r0 = pu(12u);
    let nrow = pu(13u);
    let tq = pu(14u);
    let ntile = pu(16u);
    let inside = w < nch * ntile;
    let c = w / ntile;
    let tile = pu(15u) + w % ntile;
    let h = tile % nh;
    let qt = tile / nh;
    let ntq = (seq + tq - 1u) / tq;
    let b = qt / ntq;
    let t0 = (qt % ntq) * tq;
    let tl = min(t0 + tq, seq) - 1u;
    let d = pu(4u);
    let nc = (d + 3u) / 4u;
    let sc = pf(5u);
    let g = h / (nh / pu(3u));
    let ti0 = t0 + lid + 0u;
    let rr0 = (b * seq + ti0) * nh + h;
    let mine0 = inside && lid + 0u < tq && ti0 < seq && rr0 >= r0 && rr0 < r0 + nrow;
    var q0: array<vec4<f32>, TD4>;
    var acc0: array<vec4<f32>, TD4>;
    var m0 = neg_inf();
    var l0 = 0.0;
    let ti1 = t0 + lid + 8u;
    let rr1 = (b * seq + ti1) * nh + h;
    let mine1 = inside && lid + 8u < tq && ti1 < seq && rr1 >= r0 && rr1 < r0 + nrow;
    var q1: array<vec4<f32>, TD4>;
    var acc1: array<vec4<f32>, TD4>;
    var m1 = neg_inf();
    var l1 = 0.0;
    let ti2 = t0 + lid + 16u;
    let rr2 = (b * seq + ti2) * nh + h;
    let mine2 = inside && lid + 16u < tq && ti2 < seq && rr2 >= r0 && rr2 < r0 + nrow;
    var q2: array<vec4<f32>, TD4>;
    var acc2: array<vec4<f32>, TD4>;
    var m2 = neg_inf();
    var l2 = 0.0;
    let ti3 = t0 + lid + 24u;
    let rr3 = (b * seq + ti3) * nh + h;
    let mine3 = inside && lid + 24u < tq && ti3 < seq && rr3 >= r0 && rr3 < r0 + nrow;
    var q3: array<vec4<f32>, TD4>;
    var acc3: array<vec4<f32>, TD4>;
    var m3 = neg_inf();
    var l3 = 0.0;
    let ti4 = t0 + lid + 32u;
    let rr4 = (b * seq + ti4) * nh + h;
    let mine4 = inside && lid + 32u < tq && ti4 < seq && rr4 >= r0 && rr4 < r0 + nrow;
    var q4: array<vec4<f32>, TD4>;
    var acc4: array<vec4<f32>, TD4>;
    var m4 = neg_inf();
    var l4 = 0.0;
    let ti5 = t0 + lid + 40u;
    let rr5 = (b * seq + ti5) * nh + h;
    let mine5 = inside && lid + 40u < tq && ti5 < seq && rr5 >= r0 && rr5 < r0 + nrow;
    var q5: array<vec4<f32>, TD4>;
    var acc5: array<vec4<f32>, TD4>;
    var m5 = neg_inf();
    var l5 = 0.0;
    let ti6 = t0 + lid + 48u;
    let rr6 = (b * seq + ti6) * nh + h;
    let mine6 = inside && lid + 48u < tq && ti6 < seq && rr6 >= r0 && rr6 < r0 + nrow;
    var q6: array<vec4<f32>, TD4>;
    var acc6: array<vec4<f32>, TD4>;
    var m6 = neg_inf();
    var l6 = 0.0;
    let ti7 = t0 + lid + 56u;
    let rr7 = (b * seq + ti7) * nh + h;
    let mine7 = inside && lid + 56u < tq && ti7 < seq && rr7 >= r0 && rr7 < r0 + nrow;
    var q7: array<vec4<f32>, TD4>;
    var acc7: array<vec4<f32>, TD4>;
    var m7 = neg_inf();
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
    var ns = pu(7u) * pu(8u);
    if (pu(6u) == 0u) { ns = tl + 1u; }
    let s0 = c * pu(10u);
    var s1 = min(ns, s0 + pu(10u));
    if (!inside) { s1 = s0; }
    for (var st = s0; st < s1; st = st + KT) {
        for (var kk = lid; kk < KT; kk = kk + 8u) { tkey[kk] = tile_key(b, t0, tl, st + kk, s1); }
        for (var e = lid; e < KT * nc; e = e + 8u) {
            let kk = e / nc;
            let cc = e % nc;
            let j = tile_key(b, t0, tl, st + kk, s1);
            var kx = vec4<f32>(0.0);
            var vx = vec4<f32>(0.0);
            if (j != NONE) {
                let ko = k_off(b, j, g);
                kx = ld4_k(ko, 4u * cc, d);
                vx = ld4_v(ko, 4u * cc, d);
            }
            tk[kk * TD4 + cc] = kx;
            tv[kk * TD4 + cc] = vx;
        }
        workgroupBarrier();
        // Skip tiles without a key these queries see (masked blocks, the future).
        let j0 = min(vec4<u32>(tkey[0], tkey[1], tkey[2], tkey[3]), vec4<u32>(tkey[4], tkey[5], tkey[6], tkey[7]));
        let j1 = min(vec4<u32>(tkey[8], tkey[9], tkey[10], tkey[11]), vec4<u32>(tkey[12], tkey[13], tkey[14], tkey[15]));
        let jm = min(j0, j1);
        let jmin = min(min(jm.x, jm.y), min(jm.z, jm.w));
        let use0 = mine0 && jmin <= ti0;
        let use1 = mine1 && jmin <= ti1;
        let use2 = mine2 && jmin <= ti2;
        let use3 = mine3 && jmin <= ti3;
        let use4 = mine4 && jmin <= ti4;
        let use5 = mine5 && jmin <= ti5;
        let use6 = mine6 && jmin <= ti6;
        let use7 = mine7 && jmin <= ti7;
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
            var u0 = ti0;
            if (!use0) { u0 = 0u; }
            x0_0 = kmask4(sc * x0_0, 0u, u0);
            x0_1 = kmask4(sc * x0_1, 4u, u0);
            x0_2 = kmask4(sc * x0_2, 8u, u0);
            x0_3 = kmask4(sc * x0_3, 12u, u0);
            if (!use0) { x0_0 = vec4<f32>(neg_inf()); x0_1 = x0_0; x0_2 = x0_0; x0_3 = x0_0; }
            var u1 = ti1;
            if (!use1) { u1 = 0u; }
            x1_0 = kmask4(sc * x1_0, 0u, u1);
            x1_1 = kmask4(sc * x1_1, 4u, u1);
            x1_2 = kmask4(sc * x1_2, 8u, u1);
            x1_3 = kmask4(sc * x1_3, 12u, u1);
            if (!use1) { x1_0 = vec4<f32>(neg_inf()); x1_1 = x1_0; x1_2 = x1_0; x1_3 = x1_0; }
            var u2 = ti2;
            if (!use2) { u2 = 0u; }
            x2_0 = kmask4(sc * x2_0, 0u, u2);
            x2_1 = kmask4(sc * x2_1, 4u, u2);
            x2_2 = kmask4(sc * x2_2, 8u, u2);
            x2_3 = kmask4(sc * x2_3, 12u, u2);
            if (!use2) { x2_0 = vec4<f32>(neg_inf()); x2_1 = x2_0; x2_2 = x2_0; x2_3 = x2_0; }
            var u3 = ti3;
            if (!use3) { u3 = 0u; }
            x3_0 = kmask4(sc * x3_0, 0u, u3);
            x3_1 = kmask4(sc * x3_1, 4u, u3);
            x3_2 = kmask4(sc * x3_2, 8u, u3);
            x3_3 = kmask4(sc * x3_3, 12u, u3);
            if (!use3) { x3_0 = vec4<f32>(neg_inf()); x3_1 = x3_0; x3_2 = x3_0; x3_3 = x3_0; }
            var u4 = ti4;
            if (!use4) { u4 = 0u; }
            x4_0 = kmask4(sc * x4_0, 0u, u4);
            x4_1 = kmask4(sc * x4_1, 4u, u4);
            x4_2 = kmask4(sc * x4_2, 8u, u4);
            x4_3 = kmask4(sc * x4_3, 12u, u4);
            if (!use4) { x4_0 = vec4<f32>(neg_inf()); x4_1 = x4_0; x4_2 = x4_0; x4_3 = x4_0; }
            var u5 = ti5;
            if (!use5) { u5 = 0u; }
            x5_0 = kmask4(sc * x5_0, 0u, u5);
            x5_1 = kmask4(sc * x5_1, 4u, u5);
            x5_2 = kmask4(sc * x5_2, 8u, u5);
            x5_3 = kmask4(sc * x5_3, 12u, u5);
            if (!use5) { x5_0 = vec4<f32>(neg_inf()); x5_1 = x5_0; x5_2 = x5_0; x5_3 = x5_0; }
            var u6 = ti6;
            if (!use6) { u6 = 0u; }
            x6_0 = kmask4(sc * x6_0, 0u, u6);
            x6_1 = kmask4(sc * x6_1, 4u, u6);
            x6_2 = kmask4(sc * x6_2, 8u, u6);
            x6_3 = kmask4(sc * x6_3, 12u, u6);
            if (!use6) { x6_0 = vec4<f32>(neg_inf()); x6_1 = x6_0; x6_2 = x6_0; x6_3 = x6_0; }
            var u7 = ti7;
            if (!use7) { u7 = 0u; }
            x7_0 = kmask4(sc * x7_0, 0u, u7);
            x7_1 = kmask4(sc * x7_1, 4u, u7);
            x7_2 = kmask4(sc * x7_2, 8u, u7);
            x7_3 = kmask4(sc * x7_3, 12u, u7);
            if (!use7) { x7_0 = vec4<f32>(neg_inf()); x7_1 = x7_0; x7_2 = x7_0; x7_3 = x7_0; }
            // New maxima; a query with no key yet keeps m = -inf and gets p = 0
            // (exponents taken against 0 then, never -inf - -inf).
            let mn0 = max(m0, max(max(hmax(x0_0), hmax(x0_1)), max(hmax(x0_2), hmax(x0_3))));
            let e0 = select(mn0, 0.0, mn0 == neg_inf());
            let c0 = exp(m0 - e0);
            let p0_0 = exp(x0_0 - vec4<f32>(e0));
            let p0_1 = exp(x0_1 - vec4<f32>(e0));
            let p0_2 = exp(x0_2 - vec4<f32>(e0));
            let p0_3 = exp(x0_3 - vec4<f32>(e0));
            l0 = l0 * c0 + dot(p0_0 + p0_1 + p0_2 + p0_3, vec4<f32>(1.0));
            m0 = mn0;
            let mn1 = max(m1, max(max(hmax(x1_0), hmax(x1_1)), max(hmax(x1_2), hmax(x1_3))));
            let e1 = select(mn1, 0.0, mn1 == neg_inf());
            let c1 = exp(m1 - e1);
            let p1_0 = exp(x1_0 - vec4<f32>(e1));
            let p1_1 = exp(x1_1 - vec4<f32>(e1));
            let p1_2 = exp(x1_2 - vec4<f32>(e1));
            let p1_3 = exp(x1_3 - vec4<f32>(e1));
            l1 = l1 * c1 + dot(p1_0 + p1_1 + p1_2 + p1_3, vec4<f32>(1.0));
            m1 = mn1;
            let mn2 = max(m2, max(max(hmax(x2_0), hmax(x2_1)), max(hmax(x2_2), hmax(x2_3))));
            let e2 = select(mn2, 0.0, mn2 == neg_inf());
            let c2 = exp(m2 - e2);
            let p2_0 = exp(x2_0 - vec4<f32>(e2));
            let p2_1 = exp(x2_1 - vec4<f32>(e2));
            let p2_2 = exp(x2_2 - vec4<f32>(e2));
            let p2_3 = exp(x2_3 - vec4<f32>(e2));
            l2 = l2 * c2 + dot(p2_0 + p2_1 + p2_2 + p2_3, vec4<f32>(1.0));
            m2 = mn2;
            let mn3 = max(m3, max(max(hmax(x3_0), hmax(x3_1)), max(hmax(x3_2), hmax(x3_3))));
            let e3 = select(mn3, 0.0, mn3 == neg_inf());
            let c3 = exp(m3 - e3);
            let p3_0 = exp(x3_0 - vec4<f32>(e3));
            let p3_1 = exp(x3_1 - vec4<f32>(e3));
            let p3_2 = exp(x3_2 - vec4<f32>(e3));
            let p3_3 = exp(x3_3 - vec4<f32>(e3));
            l3 = l3 * c3 + dot(p3_0 + p3_1 + p3_2 + p3_3, vec4<f32>(1.0));
            m3 = mn3;
            let mn4 = max(m4, max(max(hmax(x4_0), hmax(x4_1)), max(hmax(x4_2), hmax(x4_3))));
            let e4 = select(mn4, 0.0, mn4 == neg_inf());
            let c4 = exp(m4 - e4);
            let p4_0 = exp(x4_0 - vec4<f32>(e4));
            let p4_1 = exp(x4_1 - vec4<f32>(e4));
            let p4_2 = exp(x4_2 - vec4<f32>(e4));
            let p4_3 = exp(x4_3 - vec4<f32>(e4));
            l4 = l4 * c4 + dot(p4_0 + p4_1 + p4_2 + p4_3, vec4<f32>(1.0));
            m4 = mn4;
            let mn5 = max(m5, max(max(hmax(x5_0), hmax(x5_1)), max(hmax(x5_2), hmax(x5_3))));
            let e5 = select(mn5, 0.0, mn5 == neg_inf());
            let c5 = exp(m5 - e5);
            let p5_0 = exp(x5_0 - vec4<f32>(e5));
            let p5_1 = exp(x5_1 - vec4<f32>(e5));
            let p5_2 = exp(x5_2 - vec4<f32>(e5));
            let p5_3 = exp(x5_3 - vec4<f32>(e5));
            l5 = l5 * c5 + dot(p5_0 + p5_1 + p5_2 + p5_3, vec4<f32>(1.0));
            m5 = mn5;
            let mn6 = max(m6, max(max(hmax(x6_0), hmax(x6_1)), max(hmax(x6_2), hmax(x6_3))));
            let e6 = select(mn6, 0.0, mn6 == neg_inf());
            let c6 = exp(m6 - e6);
            let p6_0 = exp(x6_0 - vec4<f32>(e6));
            let p6_1 = exp(x6_1 - vec4<f32>(e6));
            let p6_2 = exp(x6_2 - vec4<f32>(e6));
            let p6_3 = exp(x6_3 - vec4<f32>(e6));
            l6 = l6 * c6 + dot(p6_0 + p6_1 + p6_2 + p6_3, vec4<f32>(1.0));
            m6 = mn6;
            let mn7 = max(m7, max(max(hmax(x7_0), hmax(x7_1)), max(hmax(x7_2), hmax(x7_3))));
            let e7 = select(mn7, 0.0, mn7 == neg_inf());
            let c7 = exp(m7 - e7);
            let p7_0 = exp(x7_0 - vec4<f32>(e7));
            let p7_1 = exp(x7_1 - vec4<f32>(e7));
            let p7_2 = exp(x7_2 - vec4<f32>(e7));
            let p7_3 = exp(x7_3 - vec4<f32>(e7));
            l7 = l7 * c7 + dot(p7_0 + p7_1 + p7_2 + p7_3, vec4<f32>(1.0));
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
                acc0[cc] = acc0[cc] * c0 + p0_0.x * v0 + p0_0.y * v1 + p0_0.z * v2 + p0_0.w * v3 + p0_1.x * v4 + p0_1.y * v5 + p0_1.z * v6 + p0_1.w * v7 + p0_2.x * v8 + p0_2.y * v9 + p0_2.z * v10 + p0_2.w * v11 + p0_3.x * v12 + p0_3.y * v13 + p0_3.z * v14 + p0_3.w * v15;
                acc1[cc] = acc1[cc] * c1 + p1_0.x * v0 + p1_0.y * v1 + p1_0.z * v2 + p1_0.w * v3 + p1_1.x * v4 + p1_1.y * v5 + p1_1.z * v6 + p1_1.w * v7 + p1_2.x * v8 + p1_2.y * v9 + p1_2.z * v10 + p1_2.w * v11 + p1_3.x * v12 + p1_3.y * v13 + p1_3.z * v14 + p1_3.w * v15;
                acc2[cc] = acc2[cc] * c2 + p2_0.x * v0 + p2_0.y * v1 + p2_0.z * v2 + p2_0.w * v3 + p2_1.x * v4 + p2_1.y * v5 + p2_1.z * v6 + p2_1.w * v7 + p2_2.x * v8 + p2_2.y * v9 + p2_2.z * v10 + p2_2.w * v11 + p2_3.x * v12 + p2_3.y * v13 + p2_3.z * v14 + p2_3.w * v15;
                acc3[cc] = acc3[cc] * c3 + p3_0.x * v0 + p3_0.y * v1 + p3_0.z * v2 + p3_0.w * v3 + p3_1.x * v4 + p3_1.y * v5 + p3_1.z * v6 + p3_1.w * v7 + p3_2.x * v8 + p3_2.y * v9 + p3_2.z * v10 + p3_2.w * v11 + p3_3.x * v12 + p3_3.y * v13 + p3_3.z * v14 + p3_3.w * v15;
                acc4[cc] = acc4[cc] * c4 + p4_0.x * v0 + p4_0.y * v1 + p4_0.z * v2 + p4_0.w * v3 + p4_1.x * v4 + p4_1.y * v5 + p4_1.z * v6 + p4_1.w * v7 + p4_2.x * v8 + p4_2.y * v9 + p4_2.z * v10 + p4_2.w * v11 + p4_3.x * v12 + p4_3.y * v13 + p4_3.z * v14 + p4_3.w * v15;
                acc5[cc] = acc5[cc] * c5 + p5_0.x * v0 + p5_0.y * v1 + p5_0.z * v2 + p5_0.w * v3 + p5_1.x * v4 + p5_1.y * v5 + p5_1.z * v6 + p5_1.w * v7 + p5_2.x * v8 + p5_2.y * v9 + p5_2.z * v10 + p5_2.w * v11 + p5_3.x * v12 + p5_3.y * v13 + p5_3.z * v14 + p5_3.w * v15;
                acc6[cc] = acc6[cc] * c6 + p6_0.x * v0 + p6_0.y * v1 + p6_0.z * v2 + p6_0.w * v3 + p6_1.x * v4 + p6_1.y * v5 + p6_1.z * v6 + p6_1.w * v7 + p6_2.x * v8 + p6_2.y * v9 + p6_2.z * v10 + p6_2.w * v11 + p6_3.x * v12 + p6_3.y * v13 + p6_3.z * v14 + p6_3.w * v15;
                acc7[cc] = acc7[cc] * c7 + p7_0.x * v0 + p7_0.y * v1 + p7_0.z * v2 + p7_0.w * v3 + p7_1.x * v4 + p7_1.y * v5 + p7_1.z * v6 + p7_1.w * v7 + p7_2.x * v8 + p7_2.y * v9 + p7_2.z * v10 + p7_2.w * v11 + p7_3.x * v12 + p7_3.y * v13 + p7_3.z * v14 + p7_3.w * v15;
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

//!kernel attn_bwd_dq(q: in, k: in, v: in, d_o: in, o: in, lse: in, idx: idx, dq: out, delta: out)
// One invocation per (chunk, batch, query, head): dq = scale · Σ_s p (dO·v_s -
// delta) k_s over the chunk's slots, written to dq (nch = 1) or to the partial
// buffer [nch, R, head_dim]; chunk 0 also saves delta = dO·O for the key pass.

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = pu(1u);
    let nh = pu(2u);
    let nch = pu(11u);
    let nrow = pu(13u);
    if (i >= nch * nrow) { return; }
    let d = pu(4u);
    let nc = (d + 3u) / 4u;
    let sc = pf(5u);
    let c = i / nrow;
    let rl = i % nrow;
    let r = pu(12u) + rl;
    let h = r % nh;
    let bt = r / nh;
    let t = bt % seq;
    let b = bt / seq;
    let g = h / (nh / pu(3u));
    let qo = r * d;
    let li = (b * nh + h) * seq + t;
    var qv: array<vec4<f32>, HD4>;
    var dov: array<vec4<f32>, HD4>;
    var acc: array<vec4<f32>, HD4>;
    var dsum = 0.0;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        qv[cc] = ld4_q(qo, 4u * cc, d);
        dov[cc] = ld4_d_o(qo, 4u * cc, d);
        dsum = dsum + dot(dov[cc], ld4_o(qo, 4u * cc, d));
        acc[cc] = vec4<f32>(0.0);
    }
    if (c == 0u) {
        st_delta(li, dsum);
    }
    let lse = ld_lse(li);
    if (lse != neg_inf()) {
        let s0 = c * pu(10u);
        let s1 = min(n_slots(t), s0 + pu(10u));
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
    }
    let oo = (c * nrow + rl) * d;
    for (var e = 0u; e < d; e = e + 1u) {
        st_dq(oo + e, acc[e / 4u][e % 4u]);
    }
}

//!kernel attn_bwd_dkdv(q: in, k: in, v: in, d_o: in, lse: in, delta: in, idx: idx, dk: out, dv: out)
// One invocation per (chunk, batch, key s, kv head): loops over the chunk's
// queries t in [c·p10, (c+1)·p10), t >= s (and the query heads of the group)
// whose pattern contains s, so dk and dv are summed in a fixed order without
// atomics; written to dk/dv (nch = 1) or the partial buffers [nch, R, head_dim].

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = pu(1u);
    let nh = pu(2u);
    let nkv = pu(3u);
    let nch = pu(11u);
    let nrow = pu(13u);
    if (i >= nch * nrow) { return; }
    let d = pu(4u);
    let nc = (d + 3u) / 4u;
    let sc = pf(5u);
    let grp = nh / nkv;
    let c = i / nrow;
    let rl = i % nrow;
    let r = pu(12u) + rl;
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
    let mode = pu(6u);
    let thi = min(seq, (c + 1u) * pu(10u));
    var t = max(s, c * pu(10u));
    loop {
        if (t >= thi) { break; }
        var tend = t + 1u;
        if (mode == 2u) {
            let blk = pu(8u);
            tend = min((t / blk + 1u) * blk, thi);
        }
        if (attends(b, t, s)) {
            for (var tt = t; tt < tend; tt = tt + 1u) {
                for (var h = g * grp; h < (g + 1u) * grp; h = h + 1u) {
                    let li = (b * nh + h) * seq + tt;
                    let lse = ld_lse(li);
                    if (lse == neg_inf()) { continue; }
                    let qo = q_off(b, tt, h);
                    var x = 0.0;
                    var dp = 0.0;
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        x = x + dot(ld4_q(qo, 4u * cc, d), ld4_k(ko, 4u * cc, d));
                        dp = dp + dot(ld4_d_o(qo, 4u * cc, d), ld4_v(ko, 4u * cc, d));
                    }
                    let p = exp(sc * x - lse);
                    let ds = sc * p * (dp - ld_delta(li));
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        dv[cc] = dv[cc] + p * ld4_d_o(qo, 4u * cc, d);
                        dk[cc] = dk[cc] + ds * ld4_q(qo, 4u * cc, d);
                    }
                }
            }
        }
        t = tend;
    }
    let oo = (c * nrow + rl) * d;
    for (var e = 0u; e < d; e = e + 1u) {
        st_dk(oo + e, dk[e / 4u][e % 4u]);
        st_dv(oo + e, dv[e / 4u][e % 4u]);
    }
}

//!kernel indexer_kl(q: in, k: in, lse: in, scores: in, idx: idx, loss: out, dscores: out)
// One 256-wide workgroup per (batch, query) row: zeroes the dscores row, then
// over the key set K(t): p = mean over heads of the attention probabilities,
// r = softmax of the indexer scores; loss = Σ p (ln p - ln r), dscores = r - p.
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * nw.x;
    let seq = pu(1u);
    if (row >= pu(0u) * seq) { return; }
    let nh = pu(2u);
    let d = pu(4u);
    let sc = pf(5u);
    let grp = nh / pu(3u);
    let b = row / seq;
    let t = row % seq;
    let ro = row * seq;
    for (var s = lid; s < seq; s = s + WG) {
        st_dscores(ro + s, 0.0);
    }
    storageBarrier();
    let ns = n_slots(t);
    var mx = neg_inf();
    for (var si = lid; si < ns; si = si + WG) {
        let s = slot_key(b, t, si);
        if (s == NONE) { continue; }
        mx = max(mx, ld_scores(ro + s));
    }
    let m = wg_reduce(lid, mx, true);
    var z = 0.0;
    for (var si = lid; si < ns; si = si + WG) {
        let s = slot_key(b, t, si);
        if (s == NONE) { continue; }
        z = z + exp(ld_scores(ro + s) - m);
    }
    let lz = log(wg_reduce(lid, z, false));
    var tot = 0.0;
    let inv_h = 1.0 / f32(nh);
    for (var si = lid; si < ns; si = si + WG) {
        let s = slot_key(b, t, si);
        if (s == NONE) { continue; }
        var p = 0.0;
        for (var h = 0u; h < nh; h = h + 1u) {
            let l = ld_lse((b * nh + h) * seq + t);
            if (l == neg_inf()) { continue; }
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
    let total = wg_reduce(lid, tot, false);
    if (lid == 0u) {
        st_loss(row, total);
    }
}
