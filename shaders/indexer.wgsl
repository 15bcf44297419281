// The lightning indexer: I(t, s) = Σ_j w[t, j]·ReLU(q_i[t, j]·k_i[s]) for s <= t,
// its block max-pooling, and its backward pass.
//
// Parameters shared by every kernel of this file:
//   p0 batch, p1 seq, p2 heads H_I, p3 dim d_I, p4 block, p5 ceil(seq / block);
//   the split backward kernels also p6 chunk (keys or queries per chunk),
//   p7 chunks nch, p8 first row r0 and p9 rows R of this launch.
// Layouts: qi [batch, seq, H_I, d_I], ki [batch, seq, d_I], w [batch, seq, H_I],
// scores / dscores [batch, seq, seq] (F32).
//
// The backward kernels run one invocation per (chunk c, row r0 + rl), a row
// being a (batch, query, head) or (batch, key) in the layout order of its
// output, and loop over the chunk's keys or queries only (llvmpipe stops every
// loop after 65 535 iterations). With nch = 1 they write the final result,
// otherwise partials at (c·R + rl) that `shaders/split.wgsl` sums in chunk order.

// Width of the private accumulator chunks of the backward kernels (any d_I
// works), and the same in vec4 units.
const CH: u32 = 64u;
const CH4: u32 = 16u;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn qi_off(b: u32, t: u32, j: u32) -> u32 {
    return ((b * pu(1u) + t) * pu(2u) + j) * pu(3u);
}

fn ki_off(b: u32, s: u32) -> u32 {
    return (b * pu(1u) + s) * pu(3u);
}


// Loops run 4 lanes at a time: llvmpipe (lavapipe) caps the loop iterations
// of one invocation at 65 535.
fn logit(qo: u32, ko: u32) -> f32 {
    let d = pu(3u);
    var x = 0.0;
    for (var e = 0u; e < d; e = e + 4u) {
        x = x + dot(ld4_qi(qo, e, d), ld4_ki(ko, e, d));
    }
    return x;
}

// I(t, s) of batch b (causality is the caller's business).
fn score(b: u32, t: u32, s: u32) -> f32 {
    let nh = pu(2u);
    let ko = ki_off(b, s);
    var acc = 0.0;
    for (var j = 0u; j < nh; j = j + 1u) {
        acc = acc + ld_w((b * pu(1u) + t) * nh + j) * max(logit(qi_off(b, t, j), ko), 0.0);
    }
    return acc;
}

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

//!kernel indexer_scores(qi: in, ki: in, w: in, scores: out)
// One invocation per score element; -inf above the diagonal.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = pu(1u);
    if (i >= pu(0u) * seq * seq) { return; }
    let s = i % seq;
    let r = i / seq;
    let t = r % seq;
    let b = r / seq;
    if (s > t) {
        st_scores(i, neg_inf());
    } else {
        st_scores(i, score(b, t, s));
    }
}

//!kernel indexer_block_scores(qi: in, ki: in, w: in, pooled: out)
// One 256-wide workgroup per (key block, query block, batch) = workgroup id
// (x, y, z): the max of I over the causal pairs of the two blocks, -inf when
// there are none (NaN scores are skipped).
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let seq = pu(1u);
    let blk = pu(4u);
    let nb = pu(5u);
    let kb = wg.x;
    let qb = wg.y;
    let b = wg.z;
    var best = neg_inf();
    if (kb <= qb) {
        let t0 = qb * blk;
        let s0 = kb * blk;
        let rows = min(t0 + blk, seq) - t0;
        let cols = min(s0 + blk, seq) - s0;
        for (var p = lid; p < rows * cols; p = p + WG) {
            let t = t0 + p / cols;
            let s = s0 + p % cols;
            if (s <= t) {
                let x = score(b, t, s);
                if (x > best) { best = x; }
            }
        }
    }
    red[lid] = best;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w >> 1u) {
        if (lid < w) {
            red[lid] = max(red[lid], red[lid + w]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        st_pooled((b * nb + qb) * nb + kb, red[0]);
    }
}

//!kernel indexer_block_scores_tiled(qi: in, ki: in, w: in, pooled: out)
// The same result as `indexer_block_scores`, tiled: one 64-wide workgroup per
// (key block, query block, batch) = workgroup id (x, y, z). Invocation i takes
// the block's keys i, i + 64, .., one at a time, its k_i row held in sixteen
// private vec4s (d_I <= 64). The query block's q_i rows (all heads, padded to
// a stride of ks = 8 or 16 vec4s) and w go through workgroup memory a few
// queries at a time, loaded once, cooperatively, and read by every key at the
// same address; each logit is one straight-line sum of ks vec4 dots. Keys
// after the query are masked and NaN scores skipped; the max over the
// workgroup is a fixed tree. Needs H_I <= 16 (the launch checks).
const TWG: u32 = 64u;

// ld4_ki, zero from the row's end on (the rows are padded to ks vec4s).
fn ld4z_ki(o: u32, e: u32, d: u32) -> vec4<f32> {
    if (e < d) {
        return ld4_ki(o, e, d);
    }
    return vec4<f32>(0.0);
}

const QTV: u32 = 960u;
var<workgroup> qt: array<vec4<f32>, 960>;
var<workgroup> wt: array<f32, 256>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let seq = pu(1u);
    let nh = pu(2u);
    let d = pu(3u);
    let blk = pu(4u);
    let nb = pu(5u);
    let kb = wg.x;
    let qb = wg.y;
    let b = wg.z;
    if (kb > qb) {
        if (lid == 0u) {
            st_pooled((b * nb + qb) * nb + kb, neg_inf());
        }
        return;
    }
    let d4 = (d + 3u) / 4u;
    var ks = 16u;
    if (d4 <= 8u) {
        ks = 8u;
    }
    let rs = nh * ks;
    let qc = min(QTV / rs, 256u / nh);
    let t0 = qb * blk;
    let s0 = kb * blk;
    let rows = min(t0 + blk, seq) - t0;
    let cols = min(s0 + blk, seq) - s0;
    var best = neg_inf();
    var kv: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < cols; k0 = k0 + TWG) {
        let s = s0 + k0 + lid;
        let mine = k0 + lid < cols;
        let ko = ki_off(b, min(s, seq - 1u));
        kv[0u] = ld4z_ki(ko, 0u, d);
        kv[1u] = ld4z_ki(ko, 4u, d);
        kv[2u] = ld4z_ki(ko, 8u, d);
        kv[3u] = ld4z_ki(ko, 12u, d);
        kv[4u] = ld4z_ki(ko, 16u, d);
        kv[5u] = ld4z_ki(ko, 20u, d);
        kv[6u] = ld4z_ki(ko, 24u, d);
        kv[7u] = ld4z_ki(ko, 28u, d);
        kv[8u] = ld4z_ki(ko, 32u, d);
        kv[9u] = ld4z_ki(ko, 36u, d);
        kv[10u] = ld4z_ki(ko, 40u, d);
        kv[11u] = ld4z_ki(ko, 44u, d);
        kv[12u] = ld4z_ki(ko, 48u, d);
        kv[13u] = ld4z_ki(ko, 52u, d);
        kv[14u] = ld4z_ki(ko, 56u, d);
        kv[15u] = ld4z_ki(ko, 60u, d);
        for (var c0 = 0u; c0 < rows; c0 = c0 + qc) {
            let qw = min(qc, rows - c0);
            workgroupBarrier();
            for (var i = lid; i < qw * rs; i = i + TWG) {
                let r = i / rs;
                let j = (i % rs) / ks;
                let e = i % ks;
                qt[i] = vec4<f32>(0.0);
                if (4u * e < d) {
                    qt[i] = ld4_qi(qi_off(b, t0 + c0 + r, j), 4u * e, d);
                }
            }
            for (var i = lid; i < qw * nh; i = i + TWG) {
                wt[i] = ld_w((b * seq + t0 + c0) * nh + i);
            }
            workgroupBarrier();
            for (var r = 0u; r < qw; r = r + 1u) {
                var x = 0.0;
                for (var j = 0u; j < nh; j = j + 1u) {
                    let o = (r * nh + j) * ks;
                    var l = dot(kv[0u], qt[o + 0u]) + dot(kv[1u], qt[o + 1u]) + dot(kv[2u], qt[o + 2u]) + dot(kv[3u], qt[o + 3u]) + dot(kv[4u], qt[o + 4u]) + dot(kv[5u], qt[o + 5u]) + dot(kv[6u], qt[o + 6u]) + dot(kv[7u], qt[o + 7u]);
                    if (ks == 16u) {
                        l = l + dot(kv[8u], qt[o + 8u]) + dot(kv[9u], qt[o + 9u]) + dot(kv[10u], qt[o + 10u]) + dot(kv[11u], qt[o + 11u]) + dot(kv[12u], qt[o + 12u]) + dot(kv[13u], qt[o + 13u]) + dot(kv[14u], qt[o + 14u]) + dot(kv[15u], qt[o + 15u]);
                    }
                    x = x + wt[r * nh + j] * max(l, 0.0);
                }
                if (mine && s <= t0 + c0 + r && x > best) {
                    best = x;
                }
            }
        }
    }
    workgroupBarrier();
    wt[lid] = best;
    workgroupBarrier();
    for (var h = TWG / 2u; h > 0u; h = h >> 1u) {
        if (lid < h) {
            wt[lid] = max(wt[lid], wt[lid + h]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        st_pooled((b * nb + qb) * nb + kb, wt[0]);
    }
}

//!kernel indexer_bwd_q(qi: in, ki: in, w: in, dscores: in, dqi: out, dw: out)
// One invocation per (chunk, batch, query, head j): dw[t, j] = Σ_s dI·ReLU(L) and
// dq_i[t, j] = Σ_s dI·w[t, j]·[L > 0]·k_i[s] over the chunk's keys s <= t, with
// L = q_i[t, j]·k_i[s], accumulated CH dims at a time.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = pu(1u);
    let nh = pu(2u);
    let di = pu(3u);
    let nch = pu(7u);
    let nrow = pu(9u);
    if (i >= nch * nrow) { return; }
    let c = i / nrow;
    let rl = i % nrow;
    let r = pu(8u) + rl;
    let bt = r / nh;
    let t = bt % seq;
    let b = bt / seq;
    let qo = r * di;
    let wj = ld_w(r);
    let s0 = c * pu(6u);
    let s1 = min(t + 1u, s0 + pu(6u));
    let oo = (c * nrow + rl) * di;
    var dwacc = 0.0;
    var acc: array<vec4<f32>, CH4>;
    for (var c0 = 0u; c0 < di; c0 = c0 + CH) {
        let cw = min(CH, di - c0);
        let nc = (cw + 3u) / 4u;
        for (var cc = 0u; cc < nc; cc = cc + 1u) {
            acc[cc] = vec4<f32>(0.0);
        }
        for (var s = s0; s < s1; s = s + 1u) {
            let dval = ld_dscores(bt * seq + s);
            let ko = ki_off(b, s);
            let l = logit(qo, ko);
            if (c0 == 0u) {
                dwacc = dwacc + dval * max(l, 0.0);
            }
            if (l > 0.0) {
                let coef = dval * wj;
                for (var cc = 0u; cc < nc; cc = cc + 1u) {
                    acc[cc] = acc[cc] + coef * ld4_ki(ko, c0 + 4u * cc, di);
                }
            }
        }
        for (var e = 0u; e < cw; e = e + 1u) {
            st_dqi(oo + c0 + e, acc[e / 4u][e % 4u]);
        }
    }
    st_dw(c * nrow + rl, dwacc);
}

//!kernel indexer_bwd_k(qi: in, ki: in, w: in, dscores: in, dki: out)
// One invocation per (chunk, batch, key s): dk_i[s] = Σ_t Σ_j dI·w[t, j]·[L > 0]·q_i[t, j]
// over the chunk's queries t >= s.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = pu(1u);
    let nh = pu(2u);
    let di = pu(3u);
    let nch = pu(7u);
    let nrow = pu(9u);
    if (i >= nch * nrow) { return; }
    let c = i / nrow;
    let rl = i % nrow;
    let r = pu(8u) + rl;
    let s = r % seq;
    let b = r / seq;
    let ko = ki_off(b, s);
    let t0 = max(s, c * pu(6u));
    let t1 = min(seq, (c + 1u) * pu(6u));
    let oo = (c * nrow + rl) * di;
    var acc: array<vec4<f32>, CH4>;
    for (var c0 = 0u; c0 < di; c0 = c0 + CH) {
        let cw = min(CH, di - c0);
        let nc = (cw + 3u) / 4u;
        for (var cc = 0u; cc < nc; cc = cc + 1u) {
            acc[cc] = vec4<f32>(0.0);
        }
        for (var t = t0; t < t1; t = t + 1u) {
            let dval = ld_dscores((b * seq + t) * seq + s);
            for (var j = 0u; j < nh; j = j + 1u) {
                let qo = qi_off(b, t, j);
                let l = logit(qo, ko);
                if (l > 0.0) {
                    let coef = dval * ld_w((b * seq + t) * nh + j);
                    for (var cc = 0u; cc < nc; cc = cc + 1u) {
                        acc[cc] = acc[cc] + coef * ld4_qi(qo, c0 + 4u * cc, di);
                    }
                }
            }
        }
        for (var e = 0u; e < cw; e = e + 1u) {
            st_dki(oo + c0 + e, acc[e / 4u][e % 4u]);
        }
    }
}
