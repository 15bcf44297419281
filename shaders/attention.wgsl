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
// The dense and block patterns, tiled: one 32-wide workgroup per (chunk c,
// batch, query tile, head) of p14 TQ <= 64 consecutive queries, invocation i
// running queries i and i + 32 of the tile (two online softmaxes sharing every
// K/V read). For blocks TQ divides the block, so the tile shares its query
// block's key blocks. The tile's slots [c·p10, (c+1)·p10) go through
// workgroup memory KT keys at a time: each K/V tile is loaded once,
// cooperatively, and read by every query. Workgroups cover the tiles p15 ..
// p15 + p16 (in (batch, tile, head) order, the tiles meeting the rows r0 ..
// r0 + R); a query writes only if its row is in the launch, in the layout of
// `attn_fwd`. head_dim <= 128.
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

@compute @workgroup_size(32)
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
    let ta = t0 + lid;
    let tb = ta + 32u;
    let ra = (b * seq + ta) * nh + h;
    let rb = (b * seq + tb) * nh + h;
    let mine_a = inside && lid < tq && ta < seq && ra >= r0 && ra < r0 + nrow;
    let mine_b = inside && lid + 32u < tq && tb < seq && rb >= r0 && rb < r0 + nrow;
    let d = pu(4u);
    let nc = (d + 3u) / 4u;
    let sc = pf(5u);
    let g = h / (nh / pu(3u));
    var qa: array<vec4<f32>, TD4>;
    var qb: array<vec4<f32>, TD4>;
    var acca: array<vec4<f32>, TD4>;
    var accb: array<vec4<f32>, TD4>;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        qa[cc] = vec4<f32>(0.0);
        qb[cc] = vec4<f32>(0.0);
        if (mine_a) { qa[cc] = ld4_q(ra * d, 4u * cc, d); }
        if (mine_b) { qb[cc] = ld4_q(rb * d, 4u * cc, d); }
        acca[cc] = vec4<f32>(0.0);
        accb[cc] = vec4<f32>(0.0);
    }
    var ma = neg_inf();
    var la = 0.0;
    var mb = neg_inf();
    var lb = 0.0;
    var ns = pu(7u) * pu(8u);
    if (pu(6u) == 0u) { ns = tl + 1u; }
    let s0 = c * pu(10u);
    var s1 = min(ns, s0 + pu(10u));
    if (!inside) { s1 = s0; }
    for (var st = s0; st < s1; st = st + KT) {
        if (lid < KT) { tkey[lid] = tile_key(b, t0, tl, st + lid, s1); }
        for (var e = lid; e < KT * nc; e = e + 32u) {
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
        let use_a = mine_a && jmin <= ta;
        let use_b = mine_b && jmin <= tb;
        if (use_a || use_b) {
            // The tile's 16 scores of each query as four vec4s (straight-line
            // code, no indexed private arrays), then one pass over the head dim.
            var x0 = vec4<f32>(0.0);
            var x1 = vec4<f32>(0.0);
            var x2 = vec4<f32>(0.0);
            var x3 = vec4<f32>(0.0);
            var y0 = vec4<f32>(0.0);
            var y1 = vec4<f32>(0.0);
            var y2 = vec4<f32>(0.0);
            var y3 = vec4<f32>(0.0);
            for (var cc = 0u; cc < nc; cc = cc + 1u) {
                let ac = qa[cc];
                let bc = qb[cc];
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
                x0 = x0 + vec4<f32>(dot(ac, k0), dot(ac, k1), dot(ac, k2), dot(ac, k3));
                x1 = x1 + vec4<f32>(dot(ac, k4), dot(ac, k5), dot(ac, k6), dot(ac, k7));
                x2 = x2 + vec4<f32>(dot(ac, k8), dot(ac, k9), dot(ac, k10), dot(ac, k11));
                x3 = x3 + vec4<f32>(dot(ac, k12), dot(ac, k13), dot(ac, k14), dot(ac, k15));
                y0 = y0 + vec4<f32>(dot(bc, k0), dot(bc, k1), dot(bc, k2), dot(bc, k3));
                y1 = y1 + vec4<f32>(dot(bc, k4), dot(bc, k5), dot(bc, k6), dot(bc, k7));
                y2 = y2 + vec4<f32>(dot(bc, k8), dot(bc, k9), dot(bc, k10), dot(bc, k11));
                y3 = y3 + vec4<f32>(dot(bc, k12), dot(bc, k13), dot(bc, k14), dot(bc, k15));
            }
            var ua = ta;
            if (!use_a) { ua = 0u; }
            var ub = tb;
            if (!use_b) { ub = 0u; }
            x0 = kmask4(sc * x0, 0u, ua);
            x1 = kmask4(sc * x1, 4u, ua);
            x2 = kmask4(sc * x2, 8u, ua);
            x3 = kmask4(sc * x3, 12u, ua);
            y0 = kmask4(sc * y0, 0u, ub);
            y1 = kmask4(sc * y1, 4u, ub);
            y2 = kmask4(sc * y2, 8u, ub);
            y3 = kmask4(sc * y3, 12u, ub);
            if (!use_a) { x0 = vec4<f32>(neg_inf()); x1 = x0; x2 = x0; x3 = x0; }
            if (!use_b) { y0 = vec4<f32>(neg_inf()); y1 = y0; y2 = y0; y3 = y0; }
            // New maxima; a query with no key yet keeps m = -inf and gets p = 0
            // (exponents taken against 0 then, never -inf - -inf).
            let mna = max(ma, max(max(hmax(x0), hmax(x1)), max(hmax(x2), hmax(x3))));
            let mnb = max(mb, max(max(hmax(y0), hmax(y1)), max(hmax(y2), hmax(y3))));
            let ea = select(mna, 0.0, mna == neg_inf());
            let eb = select(mnb, 0.0, mnb == neg_inf());
            let ca = exp(ma - ea);
            let cb = exp(mb - eb);
            let pa0 = exp(x0 - vec4<f32>(ea));
            let pa1 = exp(x1 - vec4<f32>(ea));
            let pa2 = exp(x2 - vec4<f32>(ea));
            let pa3 = exp(x3 - vec4<f32>(ea));
            let pb0 = exp(y0 - vec4<f32>(eb));
            let pb1 = exp(y1 - vec4<f32>(eb));
            let pb2 = exp(y2 - vec4<f32>(eb));
            let pb3 = exp(y3 - vec4<f32>(eb));
            la = la * ca + dot(pa0 + pa1 + pa2 + pa3, vec4<f32>(1.0));
            lb = lb * cb + dot(pb0 + pb1 + pb2 + pb3, vec4<f32>(1.0));
            ma = mna;
            mb = mnb;
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
                acca[cc] = acca[cc] * ca + pa0.x * v0 + pa0.y * v1 + pa0.z * v2 + pa0.w * v3 + pa1.x * v4 + pa1.y * v5 + pa1.z * v6 + pa1.w * v7 + pa2.x * v8 + pa2.y * v9 + pa2.z * v10 + pa2.w * v11 + pa3.x * v12 + pa3.y * v13 + pa3.z * v14 + pa3.w * v15;
                accb[cc] = accb[cc] * cb + pb0.x * v0 + pb0.y * v1 + pb0.z * v2 + pb0.w * v3 + pb1.x * v4 + pb1.y * v5 + pb1.z * v6 + pb1.w * v7 + pb2.x * v8 + pb2.y * v9 + pb2.z * v10 + pb2.w * v11 + pb3.x * v12 + pb3.y * v13 + pb3.z * v14 + pb3.w * v15;
            }
        }
        workgroupBarrier();
    }
    if (mine_a) { tiled_store(c, ra - r0, ra, (b * nh + h) * seq + ta, ma, la, acca); }
    if (mine_b) { tiled_store(c, rb - r0, rb, (b * nh + h) * seq + tb, mb, lb, accb); }
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
