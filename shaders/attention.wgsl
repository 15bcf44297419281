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
