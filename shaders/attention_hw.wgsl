// Hardware-GPU variants of the attention kernels (chosen on non-CPU adapters,
// or forced with DYNSPARSE_WGPU_KERNELS=hw; see src/backend/wgpu/mod.rs).
// Same math and the same per-query order of operations as the software
// variants in attention.wgsl, laid out for SIMD hardware: one query (or key)
// per invocation in 64-wide workgroups, so a query's state is one q row and
// one accumulator row (2·head_dim floats) instead of eight of each, and K/V
// tiles shared through workgroup memory by all 64 queries. The backward
// (FlashAttention-2's, P recomputed from the saved lse): dq per query tile
// (`attn_bwd_dq_tiled_hw`, the forward's layout) and dk/dv per key tile
// (`attn_bwd_dkdv_tiled_hw`, one key per invocation, queries staged).
//
// Parameters: `AttnTiledParams` (shaders/common.wgsl; Rust side in
// src/backend/wgpu/attention.rs). The first
// ten fields are the attention spec (mode 0 dense, 1 tokens, 2 blocks; kn =
// k or n, block, nkb = ceil(seq / block)); chunk/nch split the key loop into
// fixed unit ranges (lavapipe's loop budget), r0/nrow the rows of this
// launch; tq queries per tile, tiles tile0 .. tile0 + ntile, unit keys per
// unit (16 for dense, the block for blocks).

// `attn_bwd_dkdv_tiled_hw`: the attention spec as above; chunk/nch split the
// query loop (queries per chunk), r0/nrow the (batch, key, kv head) rows of
// this launch; tkeys keys per tile, tiles tile0 .. tile0 + ntile.
struct AttnBwdKvParams {
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
    chunk: u32,
    nch: u32,
    r0: u32,
    nrow: u32,
    tkeys: u32,
    tile0: u32,
    ntile: u32,
}

const NONE: u32 = 0xffffffffu;
// Below every real score; exp(MINF - x) is 0 for any real score x.
const MINF: f32 = -1.0e30;
// Keys per workgroup-memory tile, head_dim / 4 at most, units per union window.
const KT: u32 = 16u;
const TD4: u32 = 32u;
const UW: u32 = 32u;
// Invocations (queries) per workgroup.
const WGS: u32 = 64u;

fn k_off(b: u32, s: u32, g: u32) -> u32 {
    return ((b * P.seq + s) * P.n_kv_heads + g) * P.head_dim;
}

//!kernel attn_fwd_tiled_hw(q: in, k: in, v: in, idx: idx, o: out, lse: out) : AttnTiledParams
// The dense and block patterns: one 64-wide workgroup per (chunk c, batch,
// tile of tq <= 64 queries, head), invocation i running query t0 + i. The
// tile walks the union of its queries' units in windows of 32 (bit j of an
// invocation's mask: its query lists unit j; the workgroup ORs the masks),
// each marked unit through workgroup memory KT keys at a time. Per query and
// key tile: s = scale·q·k over the tile's keys it sees (keys after it or in
// units it does not list are skipped, never computed with), m' = max(m, s),
// l' = l·e^(m−m') + Σ e^(s−m'), acc' = acc·e^(m−m') + Σ e^(s−m')·v — the
// software variant's order, so each query's result is what it would be alone.
//
// With f16 q/k/v on a SHADER_F16 device, q and the K/V tiles are held in f16
// (half the workgroup memory and private q) and each q·k product is an f16
// multiply, summed in f32; scores, exponentials and the accumulator stay f32.
// With subgroups, the tile's unit masks are OR-ed per subgroup first (one
// atomic per subgroup instead of one per invocation).
//#if f16
alias QV = vec4<f16>;
var<workgroup> tk: array<vec4<f16>, 512>;
var<workgroup> tv: array<vec4<f16>, 512>;
fn ldq4(o: u32, e: u32, d: u32) -> QV { return ld4h_q(o, e, d); }
fn ldk4(o: u32, e: u32, d: u32) -> QV { return ld4h_k(o, e, d); }
fn ldv4(o: u32, e: u32, d: u32) -> QV { return ld4h_v(o, e, d); }
// q·k over four elements: f16 products, f32 sum.
fn qk(q: QV, i: u32) -> f32 { return dot(vec4<f32>(q * tk[i]), vec4<f32>(1.0)); }
fn vt(i: u32) -> vec4<f32> { return vec4<f32>(tv[i]); }
//#else
alias QV = vec4<f32>;
var<workgroup> tk: array<vec4<f32>, 512>;
var<workgroup> tv: array<vec4<f32>, 512>;
fn ldq4(o: u32, e: u32, d: u32) -> QV { return ld4_q(o, e, d); }
fn ldk4(o: u32, e: u32, d: u32) -> QV { return ld4_k(o, e, d); }
fn ldv4(o: u32, e: u32, d: u32) -> QV { return ld4_v(o, e, d); }
fn qk(q: QV, i: u32) -> f32 { return dot(q, tk[i]); }
fn vt(i: u32) -> vec4<f32> { return tv[i]; }
//#endif
var<workgroup> tkey: array<u32, 16>;
var<workgroup> wany: atomic<u32>;
var<workgroup> wunion: u32;

fn kvalid4(kk0: u32, t: u32) -> vec4<bool> {
    let j = vec4<u32>(tkey[kk0], tkey[kk0 + 1u], tkey[kk0 + 2u], tkey[kk0 + 3u]);
    return j <= vec4<u32>(t);
}

fn hmax(x: vec4<f32>) -> f32 {
    return max(max(x.x, x.y), max(x.z, x.w));
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_index) lid: u32,
//#if subgroups
        @builtin(subgroup_invocation_id) sgi: u32,
//#endif
) {
    let w = wid.x + wid.y * nw.x;
    let seq = P.seq;
    let nh = P.n_heads;
    let nch = P.nch;
    let r0 = P.r0;
    let nrow = P.nrow;
    let tq = P.tq;
    let unit = P.unit;
    let dense = P.mode == 0u;
    let inside = w < nch * P.ntile;
    let c = w / P.ntile;
    let tile = P.tile0 + w % P.ntile;
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
    let ti = t0 + lid;
    let rr = (b * seq + ti) * nh + h;
    let valid = inside && lid < tq && ti < seq;
    let mine = valid && rr >= r0 && rr < r0 + nrow;
    var q: array<QV, TD4>;
    var acc: array<vec4<f32>, TD4>;
    var m = MINF;
    var l = 0.0;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        q[cc] = QV(0.0);
        if (mine) { q[cc] = ldq4(rr * d, 4u * cc, d); }
        acc[cc] = vec4<f32>(0.0);
    }
    let u0 = c * P.chunk;
    var u1 = min(tl / unit + 1u, u0 + P.chunk);
    if (!inside) { u1 = u0; }
    if (lid == 0u) { atomicStore(&wany, 0u); }
    workgroupBarrier();
    for (var w0 = u0; w0 < u1; w0 = w0 + UW) {
        let wn = min(UW, u1 - w0);
        var mk = 0u;
        if (dense) {
            mk = select((1u << wn) - 1u, 0xffffffffu, wn == 32u);
        } else if (valid) {
            let row = (b * seq + ti) * n;
            for (var e = 0u; e < n; e = e + 1u) {
                let kb = ldu_idx(row + e);
                if (kb != NONE && kb <= ti / blk && kb >= w0 && kb - w0 < wn) {
                    mk = mk | (1u << (kb - w0));
                }
            }
        }
//#if subgroups
        let smk = subgroupOr(mk);
        if (sgi == 0u) { atomicOr(&wany, smk); }
//#else
        atomicOr(&wany, mk);
//#endif
        workgroupBarrier();
        if (lid == 0u) {
            wunion = atomicLoad(&wany);
            atomicStore(&wany, 0u);
        }
        let um = workgroupUniformLoad(&wunion);
        for (var j = 0u; j < wn; j = j + 1u) {
            if (((um >> j) & 1u) == 0u) { continue; }
            let listed = mine && ((mk >> j) & 1u) != 0u;
            let ub = (w0 + j) * unit;
            let ue = min(ub + unit, tl + 1u);
            for (var st = ub; st < ue; st = st + KT) {
                if (lid < KT) { tkey[lid] = select(NONE, st + lid, st + lid < ue); }
                for (var e = lid; e < KT * nc; e = e + WGS) {
                    let kk = e / nc;
                    let cc = e % nc;
                    var kx = QV(0.0);
                    var vx = QV(0.0);
                    if (st + kk < ue) {
                        let ko = k_off(b, st + kk, g);
                        kx = ldk4(ko, 4u * cc, d);
                        vx = ldv4(ko, 4u * cc, d);
                    }
                    tk[kk * TD4 + cc] = kx;
                    tv[kk * TD4 + cc] = vx;
                }
                workgroupBarrier();
                if (listed && st <= ti) {
                    var x0 = vec4<f32>(0.0);
                    var x1 = vec4<f32>(0.0);
                    var x2 = vec4<f32>(0.0);
                    var x3 = vec4<f32>(0.0);
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        let qc = q[cc];
                        x0 = x0 + vec4<f32>(qk(qc, cc), qk(qc, TD4 + cc), qk(qc, 2u * TD4 + cc), qk(qc, 3u * TD4 + cc));
                        x1 = x1 + vec4<f32>(qk(qc, 4u * TD4 + cc), qk(qc, 5u * TD4 + cc), qk(qc, 6u * TD4 + cc), qk(qc, 7u * TD4 + cc));
                        x2 = x2 + vec4<f32>(qk(qc, 8u * TD4 + cc), qk(qc, 9u * TD4 + cc), qk(qc, 10u * TD4 + cc), qk(qc, 11u * TD4 + cc));
                        x3 = x3 + vec4<f32>(qk(qc, 12u * TD4 + cc), qk(qc, 13u * TD4 + cc), qk(qc, 14u * TD4 + cc), qk(qc, 15u * TD4 + cc));
                    }
                    let ok0 = kvalid4(0u, ti);
                    let ok1 = kvalid4(4u, ti);
                    let ok2 = kvalid4(8u, ti);
                    let ok3 = kvalid4(12u, ti);
                    let y0 = select(vec4<f32>(MINF), sc * x0, ok0);
                    let y1 = select(vec4<f32>(MINF), sc * x1, ok1);
                    let y2 = select(vec4<f32>(MINF), sc * x2, ok2);
                    let y3 = select(vec4<f32>(MINF), sc * x3, ok3);
                    let mn = max(m, max(max(hmax(y0), hmax(y1)), max(hmax(y2), hmax(y3))));
                    let cf = exp(m - mn);
                    let p0 = select(vec4<f32>(0.0), exp(y0 - vec4<f32>(mn)), ok0);
                    let p1 = select(vec4<f32>(0.0), exp(y1 - vec4<f32>(mn)), ok1);
                    let p2 = select(vec4<f32>(0.0), exp(y2 - vec4<f32>(mn)), ok2);
                    let p3 = select(vec4<f32>(0.0), exp(y3 - vec4<f32>(mn)), ok3);
                    l = l * cf + dot(p0 + p1 + p2 + p3, vec4<f32>(1.0));
                    m = mn;
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        acc[cc] = acc[cc] * cf + p0.x * vt(cc) + p0.y * vt(TD4 + cc) + p0.z * vt(2u * TD4 + cc) + p0.w * vt(3u * TD4 + cc)
                            + p1.x * vt(4u * TD4 + cc) + p1.y * vt(5u * TD4 + cc) + p1.z * vt(6u * TD4 + cc) + p1.w * vt(7u * TD4 + cc)
                            + p2.x * vt(8u * TD4 + cc) + p2.y * vt(9u * TD4 + cc) + p2.z * vt(10u * TD4 + cc) + p2.w * vt(11u * TD4 + cc)
                            + p3.x * vt(12u * TD4 + cc) + p3.y * vt(13u * TD4 + cc) + p3.z * vt(14u * TD4 + cc) + p3.w * vt(15u * TD4 + cc);
                    }
                }
                workgroupBarrier();
            }
        }
        workgroupBarrier();
    }
    if (!mine) { return; }
    // Final (nch = 1: normalised o, lse; -inf for a keyless query) or the
    // chunk's partials (unnormalised o, then (m, l)) in `attn_fwd`'s layout.
    let rl = rr - r0;
    var oo = rr * d;
    var inv = 1.0;
    if (nch == 1u) {
        let li = (b * nh + h) * seq + ti;
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

//!kernel attn_bwd_dq_tiled_hw(q: in, k: in, v: in, d_o: in, stats: in, idx: idx, dq: out) : AttnTiledParams
// FlashAttention-2's dq pass for the dense and block patterns, laid out like
// `attn_fwd_tiled_hw`: one 64-wide workgroup per (chunk c, batch, tile of
// tq <= 64 queries, head), invocation i running query t0 + i with its q, dO
// and dq rows in private memory, K/V tiles of KT keys staged in workgroup
// memory once for the tile, over the union of the tile's units. P is
// recomputed from the saved lse instead of stored: for a key s the query
// sees (s <= t, in a unit its own row lists), p = exp(scale·q·k_s − lse),
// ds = scale·p·(dO·v_s − delta) and dq += ds·k_s, with (lse, delta) from
// `attn_bwd_stats`. Written to dq (nch = 1) or the partials [nch, nrow,
// head_dim] of `attn_bwd_dq`'s layout, summed by `sum_chunks`.
// The token pattern (mode 1) runs the same tiles over units of KT keys: a
// query marks the units holding its listed tokens, and per unit of the
// window a KT-bit word of which keys it lists (`km`, private), so a staged
// key counts for the query only if the query lists it.
//
// With f16 q, k, v and dO on a SHADER_F16 device (as in the forward): q, dO
// and the K/V tiles are held in f16 (half the workgroup memory and private
// rows), each q·k and dO·v element product is an f16 multiply summed in f32;
// p, ds and the dq accumulator stay f32 (k widened exactly for ds·k).
//#if f16
alias QV = vec4<f16>;
var<workgroup> tk: array<vec4<f16>, 512>;
var<workgroup> tv: array<vec4<f16>, 512>;
fn ldq4(o: u32, e: u32, d: u32) -> QV { return ld4h_q(o, e, d); }
fn ldo4(o: u32, e: u32, d: u32) -> QV { return ld4h_d_o(o, e, d); }
fn ldk4(o: u32, e: u32, d: u32) -> QV { return ld4h_k(o, e, d); }
fn ldv4(o: u32, e: u32, d: u32) -> QV { return ld4h_v(o, e, d); }
fn qk(q: QV, i: u32) -> f32 { return dot(vec4<f32>(q * tk[i]), vec4<f32>(1.0)); }
fn ov(o: QV, i: u32) -> f32 { return dot(vec4<f32>(o * tv[i]), vec4<f32>(1.0)); }
fn kt(i: u32) -> vec4<f32> { return vec4<f32>(tk[i]); }
//#else
alias QV = vec4<f32>;
var<workgroup> tk: array<vec4<f32>, 512>;
var<workgroup> tv: array<vec4<f32>, 512>;
fn ldq4(o: u32, e: u32, d: u32) -> QV { return ld4_q(o, e, d); }
fn ldo4(o: u32, e: u32, d: u32) -> QV { return ld4_d_o(o, e, d); }
fn ldk4(o: u32, e: u32, d: u32) -> QV { return ld4_k(o, e, d); }
fn ldv4(o: u32, e: u32, d: u32) -> QV { return ld4_v(o, e, d); }
fn qk(q: QV, i: u32) -> f32 { return dot(q, tk[i]); }
fn ov(o: QV, i: u32) -> f32 { return dot(o, tv[i]); }
fn kt(i: u32) -> vec4<f32> { return tk[i]; }
//#endif
var<workgroup> tkey: array<u32, 16>;
var<workgroup> wany: atomic<u32>;
var<workgroup> wunion: u32;

fn kvalid4(kk0: u32, t: u32) -> vec4<bool> {
    let j = vec4<u32>(tkey[kk0], tkey[kk0 + 1u], tkey[kk0 + 2u], tkey[kk0 + 3u]);
    return j <= vec4<u32>(t);
}

// kvalid4, and bit kk of `bits` set for each key kk0 + i of the tile.
fn kvalid4b(kk0: u32, t: u32, bits: u32) -> vec4<bool> {
    let on = ((vec4<u32>(bits) >> vec4<u32>(kk0, kk0 + 1u, kk0 + 2u, kk0 + 3u)) & vec4<u32>(1u)) != vec4<u32>(0u);
    return kvalid4(kk0, t) & on;
}

// p·(dO·v − delta)·scale for four keys; masked keys get p = exp(MINF) = 0
// (no exponent of an unmasked-but-invalid score is ever taken).
fn dscore4(x: vec4<f32>, dp: vec4<f32>, ok: vec4<bool>, sc: f32, lse: f32, dsum: f32) -> vec4<f32> {
    let p = exp(select(vec4<f32>(MINF), sc * x - vec4<f32>(lse), ok));
    return sc * p * (dp - vec4<f32>(dsum));
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nw.x;
    let seq = P.seq;
    let nh = P.n_heads;
    let nch = P.nch;
    let r0 = P.r0;
    let nrow = P.nrow;
    let tq = P.tq;
    let unit = P.unit;
    let dense = P.mode == 0u;
    let tokens = P.mode == 1u;
    let inside = w < nch * P.ntile;
    let c = w / P.ntile;
    let tile = P.tile0 + w % P.ntile;
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
    let ti = t0 + lid;
    let rr = (b * seq + ti) * nh + h;
    let valid = inside && lid < tq && ti < seq;
    let mine = valid && rr >= r0 && rr < r0 + nrow;
    var q: array<QV, TD4>;
    var dov: array<QV, TD4>;
    var acc: array<vec4<f32>, TD4>;
    var km: array<u32, UW>;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        q[cc] = QV(0.0);
        dov[cc] = QV(0.0);
        if (mine) {
            q[cc] = ldq4(rr * d, 4u * cc, d);
            dov[cc] = ldo4(rr * d, 4u * cc, d);
        }
        acc[cc] = vec4<f32>(0.0);
    }
    var lse = 0.0;
    var dsum = 0.0;
    if (mine) {
        let li = (b * nh + h) * seq + ti;
        lse = ld_stats(2u * li);
        dsum = ld_stats(2u * li + 1u);
    }
    let u0 = c * P.chunk;
    var u1 = min(tl / unit + 1u, u0 + P.chunk);
    if (!inside) { u1 = u0; }
    if (lid == 0u) { atomicStore(&wany, 0u); }
    workgroupBarrier();
    for (var w0 = u0; w0 < u1; w0 = w0 + UW) {
        let wn = min(UW, u1 - w0);
        var mk = 0u;
        if (dense) {
            mk = select((1u << wn) - 1u, 0xffffffffu, wn == 32u);
        } else if (tokens) {
            for (var j = 0u; j < wn; j = j + 1u) { km[j] = 0u; }
            if (valid) {
                let row = (b * seq + ti) * n;
                for (var e = 0u; e < n; e = e + 1u) {
                    let s = ldu_idx(row + e);
                    let u = s / unit;
                    if (s != NONE && s <= ti && u >= w0 && u - w0 < wn) {
                        mk = mk | (1u << (u - w0));
                        km[u - w0] = km[u - w0] | (1u << (s - u * unit));
                    }
                }
            }
        } else if (valid) {
            let row = (b * seq + ti) * n;
            for (var e = 0u; e < n; e = e + 1u) {
                let kb = ldu_idx(row + e);
                if (kb != NONE && kb <= ti / blk && kb >= w0 && kb - w0 < wn) {
                    mk = mk | (1u << (kb - w0));
                }
            }
        }
        atomicOr(&wany, mk);
        workgroupBarrier();
        if (lid == 0u) {
            wunion = atomicLoad(&wany);
            atomicStore(&wany, 0u);
        }
        let um = workgroupUniformLoad(&wunion);
        for (var j = 0u; j < wn; j = j + 1u) {
            if (((um >> j) & 1u) == 0u) { continue; }
            let listed = mine && ((mk >> j) & 1u) != 0u;
            // Which keys of the unit the query lists (unit == KT for tokens: one tile).
            let bits = select(0xffffffffu, km[j], tokens);
            let ub = (w0 + j) * unit;
            let ue = min(ub + unit, tl + 1u);
            for (var st = ub; st < ue; st = st + KT) {
                if (lid < KT) { tkey[lid] = select(NONE, st + lid, st + lid < ue); }
                for (var e = lid; e < KT * nc; e = e + WGS) {
                    let kk = e / nc;
                    let cc = e % nc;
                    var kx = QV(0.0);
                    var vx = QV(0.0);
                    if (st + kk < ue) {
                        let ko = k_off(b, st + kk, g);
                        kx = ldk4(ko, 4u * cc, d);
                        vx = ldv4(ko, 4u * cc, d);
                    }
                    tk[kk * TD4 + cc] = kx;
                    tv[kk * TD4 + cc] = vx;
                }
                workgroupBarrier();
                if (listed && st <= ti) {
                    var x0 = vec4<f32>(0.0);
                    var x1 = vec4<f32>(0.0);
                    var x2 = vec4<f32>(0.0);
                    var x3 = vec4<f32>(0.0);
                    var y0 = vec4<f32>(0.0);
                    var y1 = vec4<f32>(0.0);
                    var y2 = vec4<f32>(0.0);
                    var y3 = vec4<f32>(0.0);
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        let qc = q[cc];
                        let oc = dov[cc];
                        x0 = x0 + vec4<f32>(qk(qc, cc), qk(qc, TD4 + cc), qk(qc, 2u * TD4 + cc), qk(qc, 3u * TD4 + cc));
                        x1 = x1 + vec4<f32>(qk(qc, 4u * TD4 + cc), qk(qc, 5u * TD4 + cc), qk(qc, 6u * TD4 + cc), qk(qc, 7u * TD4 + cc));
                        x2 = x2 + vec4<f32>(qk(qc, 8u * TD4 + cc), qk(qc, 9u * TD4 + cc), qk(qc, 10u * TD4 + cc), qk(qc, 11u * TD4 + cc));
                        x3 = x3 + vec4<f32>(qk(qc, 12u * TD4 + cc), qk(qc, 13u * TD4 + cc), qk(qc, 14u * TD4 + cc), qk(qc, 15u * TD4 + cc));
                        y0 = y0 + vec4<f32>(ov(oc, cc), ov(oc, TD4 + cc), ov(oc, 2u * TD4 + cc), ov(oc, 3u * TD4 + cc));
                        y1 = y1 + vec4<f32>(ov(oc, 4u * TD4 + cc), ov(oc, 5u * TD4 + cc), ov(oc, 6u * TD4 + cc), ov(oc, 7u * TD4 + cc));
                        y2 = y2 + vec4<f32>(ov(oc, 8u * TD4 + cc), ov(oc, 9u * TD4 + cc), ov(oc, 10u * TD4 + cc), ov(oc, 11u * TD4 + cc));
                        y3 = y3 + vec4<f32>(ov(oc, 12u * TD4 + cc), ov(oc, 13u * TD4 + cc), ov(oc, 14u * TD4 + cc), ov(oc, 15u * TD4 + cc));
                    }
                    let s0 = dscore4(x0, y0, kvalid4b(0u, ti, bits), sc, lse, dsum);
                    let s1 = dscore4(x1, y1, kvalid4b(4u, ti, bits), sc, lse, dsum);
                    let s2 = dscore4(x2, y2, kvalid4b(8u, ti, bits), sc, lse, dsum);
                    let s3 = dscore4(x3, y3, kvalid4b(12u, ti, bits), sc, lse, dsum);
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        acc[cc] = acc[cc] + s0.x * kt(cc) + s0.y * kt(TD4 + cc) + s0.z * kt(2u * TD4 + cc) + s0.w * kt(3u * TD4 + cc)
                            + s1.x * kt(4u * TD4 + cc) + s1.y * kt(5u * TD4 + cc) + s1.z * kt(6u * TD4 + cc) + s1.w * kt(7u * TD4 + cc)
                            + s2.x * kt(8u * TD4 + cc) + s2.y * kt(9u * TD4 + cc) + s2.z * kt(10u * TD4 + cc) + s2.w * kt(11u * TD4 + cc)
                            + s3.x * kt(12u * TD4 + cc) + s3.y * kt(13u * TD4 + cc) + s3.z * kt(14u * TD4 + cc) + s3.w * kt(15u * TD4 + cc);
                    }
                }
                workgroupBarrier();
            }
        }
        workgroupBarrier();
    }
    if (!mine) { return; }
    var oo = rr * d;
    if (nch > 1u) { oo = (c * nrow + rr - r0) * d; }
    for (var e = 0u; e < d; e = e + 1u) {
        st_dq(oo + e, acc[e / 4u][e % 4u]);
    }
}

//!kernel attn_bwd_dkdv_tiled_hw(q: in, k: in, v: in, d_o: in, stats: in, idx: idx, dk: out, dv: out) : AttnBwdKvParams
// FlashAttention-2's dk/dv pass, every pattern: one 64-wide workgroup per
// (query chunk c, batch, tile of P.tkeys <= 64 keys, kv head g), invocation i
// owning key s = s0 + i (its k, v rows and dk, dv accumulators in private
// memory). The chunk's queries t >= s0 come QT at a time: first one
// invocation per query builds from that query's own pattern row the mask of
// the tile's keys it attends (dense: all; tokens: the listed keys; blocks:
// the keys of the listed blocks; never a decision pooled across queries,
// DESIGN §4), and a tile no query of which attends any key is skipped; then
// per head h of the group the QT rows of q and dO (and their lse, delta) are
// staged in workgroup memory and each key s visits the staged queries t >= s
// whose mask holds it: p = exp(scale·q·k − lse), dv += p·dO,
// dk += scale·p·(dO·v − delta)·q. Fixed order (query tiles, heads, queries),
// no atomics on floats; written to dk/dv (nch = 1) or the partials [nch,
// nrow, head_dim] of `attn_bwd_dkdv`'s layout.
//
// With f16 q, k, v and dO on a SHADER_F16 device: the staged q and dO rows
// and the key's k and v rows are f16 (half the workgroup memory and private
// rows), each q·k and dO·v element product an f16 multiply summed in f32; p,
// ds and the dk/dv accumulators stay f32 (q and dO widened exactly).
//#if f16
alias QV = vec4<f16>;
var<workgroup> sq: array<vec4<f16>, 512>;
var<workgroup> sdo: array<vec4<f16>, 512>;
fn ldq4(o: u32, e: u32, d: u32) -> QV { return ld4h_q(o, e, d); }
fn ldo4(o: u32, e: u32, d: u32) -> QV { return ld4h_d_o(o, e, d); }
fn ldk4(o: u32, e: u32, d: u32) -> QV { return ld4h_k(o, e, d); }
fn ldv4(o: u32, e: u32, d: u32) -> QV { return ld4h_v(o, e, d); }
fn hdot(a: QV, b: QV) -> f32 { return dot(vec4<f32>(a * b), vec4<f32>(1.0)); }
fn wide(a: QV) -> vec4<f32> { return vec4<f32>(a); }
//#else
alias QV = vec4<f32>;
var<workgroup> sq: array<vec4<f32>, 512>;
var<workgroup> sdo: array<vec4<f32>, 512>;
fn ldq4(o: u32, e: u32, d: u32) -> QV { return ld4_q(o, e, d); }
fn ldo4(o: u32, e: u32, d: u32) -> QV { return ld4_d_o(o, e, d); }
fn ldk4(o: u32, e: u32, d: u32) -> QV { return ld4_k(o, e, d); }
fn ldv4(o: u32, e: u32, d: u32) -> QV { return ld4_v(o, e, d); }
fn hdot(a: QV, b: QV) -> f32 { return dot(a, b); }
fn wide(a: QV) -> vec4<f32> { return a; }
//#endif
var<workgroup> sstat: array<vec2<f32>, 16>;
var<workgroup> smask: array<vec2<u32>, 16>;
var<workgroup> wany: atomic<u32>;
var<workgroup> wunion: u32;
// Queries per staged tile (KT rows of TD4 vec4 each).
const QT: u32 = 16u;

// Bits lo .. hi - 1 (0 <= lo, hi <= 64) of a 64-bit mask as two words.
fn range_bits(lo: u32, hi: u32) -> vec2<u32> {
    var r = vec2<u32>(0u);
    for (var wd = 0u; wd < 2u; wd = wd + 1u) {
        let a = min(max(lo, 32u * wd), 32u * wd + 32u) - 32u * wd;
        let z = min(max(hi, 32u * wd), 32u * wd + 32u) - 32u * wd;
        let ones_z = select((1u << z) - 1u, 0xffffffffu, z >= 32u);
        let ones_a = select((1u << a) - 1u, 0xffffffffu, a >= 32u);
        r[wd] = ones_z & ~ones_a;
    }
    return r;
}

// The keys s0 .. s0 + nk - 1 that query t attends, from t's own row.
fn key_mask(b: u32, t: u32, s0: u32, nk: u32) -> vec2<u32> {
    let mode = P.mode;
    if (mode == 0u) { return range_bits(0u, min(nk, t + 1u - min(t + 1u, s0))); }
    let n = P.kn;
    let row = (b * P.seq + t) * n;
    var m = vec2<u32>(0u);
    for (var e = 0u; e < n; e = e + 1u) {
        let j = ldu_idx(row + e);
        if (j == NONE) { continue; }
        if (mode == 1u) {
            if (j <= t && j >= s0 && j - s0 < nk) { m = m | range_bits(j - s0, j - s0 + 1u); }
        } else if (j <= t / P.block) {
            let lo = max(j * P.block, s0);
            let hi = min(min(j * P.block + P.block, t + 1u), s0 + nk);
            if (lo < hi) { m = m | range_bits(lo - s0, hi - s0); }
        }
    }
    return m;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nw.x;
    let seq = P.seq;
    let nh = P.n_heads;
    let nkv = P.n_kv_heads;
    let nch = P.nch;
    let r0 = P.r0;
    let nrow = P.nrow;
    let tkn = P.tkeys;
    let inside = w < nch * P.ntile;
    let c = w / P.ntile;
    let tile = P.tile0 + w % P.ntile;
    let g = tile % nkv;
    let kt = tile / nkv;
    let nkt = (seq + tkn - 1u) / tkn;
    let b = kt / nkt;
    let s0 = (kt % nkt) * tkn;
    let nk = min(s0 + tkn, seq) - s0;
    let d = P.head_dim;
    let nc = (d + 3u) / 4u;
    let sc = P.scale;
    let grp = nh / nkv;
    let si = s0 + lid;
    let rr = (b * seq + si) * nkv + g;
    let mine = inside && lid < nk && rr >= r0 && rr < r0 + nrow;
    var kr: array<QV, TD4>;
    var vr: array<QV, TD4>;
    var dk: array<vec4<f32>, TD4>;
    var dv: array<vec4<f32>, TD4>;
    for (var cc = 0u; cc < nc; cc = cc + 1u) {
        kr[cc] = QV(0.0);
        vr[cc] = QV(0.0);
        if (mine) {
            kr[cc] = ldk4(rr * d, 4u * cc, d);
            vr[cc] = ldv4(rr * d, 4u * cc, d);
        }
        dk[cc] = vec4<f32>(0.0);
        dv[cc] = vec4<f32>(0.0);
    }
    let qa = max(s0, c * P.chunk);
    var qb = min(seq, (c + 1u) * P.chunk);
    if (!inside) { qb = qa; }
    if (lid == 0u) { atomicStore(&wany, 0u); }
    workgroupBarrier();
    for (var tt = qa; tt < qb; tt = tt + QT) {
        let nq = min(QT, qb - tt);
        if (lid < QT) {
            var m = vec2<u32>(0u);
            if (lid < nq) { m = key_mask(b, tt + lid, s0, nk); }
            smask[lid] = m;
            if ((m.x | m.y) != 0u) { atomicOr(&wany, 1u); }
        }
        workgroupBarrier();
        if (lid == 0u) {
            wunion = atomicLoad(&wany);
            atomicStore(&wany, 0u);
        }
        if (workgroupUniformLoad(&wunion) == 0u) { continue; }
        for (var h = g * grp; h < (g + 1u) * grp; h = h + 1u) {
            for (var e = lid; e < QT * nc; e = e + WGS) {
                let j = e / nc;
                let cc = e % nc;
                var qx = QV(0.0);
                var ox = QV(0.0);
                if (j < nq) {
                    let qo = ((b * seq + tt + j) * nh + h) * d;
                    qx = ldq4(qo, 4u * cc, d);
                    ox = ldo4(qo, 4u * cc, d);
                }
                sq[j * TD4 + cc] = qx;
                sdo[j * TD4 + cc] = ox;
            }
            if (lid < QT) {
                var stv = vec2<f32>(0.0);
                if (lid < nq) {
                    let li = (b * nh + h) * seq + tt + lid;
                    stv = vec2<f32>(ld_stats(2u * li), ld_stats(2u * li + 1u));
                }
                sstat[lid] = stv;
            }
            workgroupBarrier();
            if (mine) {
                for (var j = 0u; j < nq; j = j + 1u) {
                    let mw = smask[j];
                    let word = select(mw.x, mw.y, lid >= 32u);
                    if (((word >> (lid & 31u)) & 1u) == 0u) { continue; }
                    var x = 0.0;
                    var dp = 0.0;
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        x = x + hdot(sq[j * TD4 + cc], kr[cc]);
                        dp = dp + hdot(sdo[j * TD4 + cc], vr[cc]);
                    }
                    let stv = sstat[j];
                    let p = exp(sc * x - stv.x);
                    let ds = sc * p * (dp - stv.y);
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        dv[cc] = dv[cc] + p * wide(sdo[j * TD4 + cc]);
                        dk[cc] = dk[cc] + ds * wide(sq[j * TD4 + cc]);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (!mine) { return; }
    var oo = rr * d;
    if (nch > 1u) { oo = (c * nrow + rr - r0) * d; }
    for (var e = 0u; e < d; e = e + 1u) {
        st_dk(oo + e, dk[e / 4u][e % 4u]);
        st_dv(oo + e, dv[e / 4u][e % 4u]);
    }
}
