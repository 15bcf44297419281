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
