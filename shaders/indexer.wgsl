// The lightning indexer: I(t, s) = Σ_j w[t, j]·ReLU(q_i[t, j]·k_i[s]) for s <= t,
// its per-query block max-pooling, and its backward pass.
//
// Parameters: `IndexerParams` (src/backend/wgpu/attention.rs) for every
// kernel of this file: batch, seq, heads H_I, dim d_I, block, nkb =
// ceil(seq / block), the first query row q0 and query rows qrows = Q of the
// tile the training kernels (scores, backward) cover (0 and seq for the
// whole sequence); the split backward kernels also chunk (keys or queries
// per chunk), nch chunks, the first row r0 and nrow = R rows of this launch
// (0 for the other kernels).
// Layouts: qi [batch, seq, H_I, d_I], ki [batch, seq, d_I], w [batch, seq, H_I],
// scores / dscores [batch, Q, seq] (F32, row r is query q0 + r; causality uses
// the absolute position q0 + r); pooled block scores [batch, seq,
// nkb] (F32), pooled[b, t, kb] = max of I(t, s) over the keys s <= t of key
// block kb, -inf when kb > t / block (NaN scores are skipped). A query's
// pooled row depends on that query and the keys s <= t only.
//
// The backward kernels run one invocation per (chunk c, row r0 + rl), a row
// being a (batch, query, head) or (batch, key) in the layout order of its
// output, and loop over the chunk's keys or queries only (llvmpipe stops every
// loop after 65 535 iterations). With nch = 1 they write the final result,
// otherwise partials at (c·R + rl) that `shaders/split.wgsl` sums in chunk order.
// Their rows are absolute (a launch covers rows of the tile's queries only);
// dk_i is the contribution of the tile's queries.
//
// `_hw` kernels (the hardware-GPU variant, at the end of the file) compute
// the same outputs with cooperative tiles in workgroup memory: 64–256
// invocations per workgroup, each tile's q_i/k_i rows loaded once.

struct IndexerParams {
    batch: u32,
    seq: u32,
    heads: u32,
    dim: u32,
    block: u32,
    nkb: u32,
    q0: u32,
    qrows: u32,
    chunk: u32,
    nch: u32,
    r0: u32,
    nrow: u32,
}

// Width of the private accumulator chunks of the backward kernels (any d_I
// works), and the same in vec4 units.
const CH: u32 = 64u;
const CH4: u32 = 16u;

// The running maximum starts at the lowest finite f32 (no infinity arithmetic,
// which fast-math shader compilers do not honour); a maximum still at this
// value (no key, or only NaN scores) is written as -inf.
const LOWEST: f32 = -3.4028235e38;

fn pooled_value(best: f32) -> f32 {
    if (best == LOWEST) { return neg_inf(); }
    return best;
}

fn qi_off(b: u32, t: u32, j: u32) -> u32 {
    return ((b * P.seq + t) * P.heads + j) * P.dim;
}

fn ki_off(b: u32, s: u32) -> u32 {
    return (b * P.seq + s) * P.dim;
}

// Loops run 4 lanes at a time: llvmpipe (lavapipe) caps the loop iterations
// of one invocation at 65 535.
fn logit(qo: u32, ko: u32) -> f32 {
    let d = P.dim;
    var x = 0.0;
    for (var e = 0u; e < d; e = e + 4u) {
        x = x + dot(ld4_qi(qo, e, d), ld4_ki(ko, e, d));
    }
    return x;
}

// I(t, s) of batch b (causality is the caller's business).
fn score(b: u32, t: u32, s: u32) -> f32 {
    let nh = P.heads;
    let ko = ki_off(b, s);
    var acc = 0.0;
    for (var j = 0u; j < nh; j = j + 1u) {
        acc = acc + ld_w((b * P.seq + t) * nh + j) * max(logit(qi_off(b, t, j), ko), 0.0);
    }
    return acc;
}

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

//!kernel indexer_scores(qi: in, ki: in, w: in, scores: out) : IndexerParams
// One invocation per score element of the tile; -inf above the diagonal.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = P.seq;
    let nq = P.qrows;
    if (i >= P.batch * nq * seq) { return; }
    let s = i % seq;
    let r = i / seq;
    let t = P.q0 + r % nq;
    let b = r / nq;
    if (s > t) {
        st_scores(i, neg_inf());
    } else {
        st_scores(i, score(b, t, s));
    }
}

//!kernel indexer_block_scores(qi: in, ki: in, w: in, pooled: out) : IndexerParams
// One invocation per output (batch, query t, key block kb): the max of I(t, s)
// over the keys s of block kb with s <= t, in key order.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = P.seq;
    let blk = P.block;
    let nb = P.nkb;
    if (i >= P.batch * seq * nb) { return; }
    let kb = i % nb;
    let bt = i / nb;
    let t = bt % seq;
    let b = bt / seq;
    var best = LOWEST;
    let s1 = min(kb * blk + blk, t + 1u);
    for (var s = kb * blk; s < s1; s = s + 1u) {
        let x = score(b, t, s);
        if (x > best) { best = x; }
    }
    st_pooled(i, pooled_value(best));
}

//!kernel indexer_block_scores_tiled(qi: in, ki: in, w: in, pooled: out) : IndexerParams
// The same result as `indexer_block_scores`, tiled: one 8-wide workgroup per
// (key block, query block, batch) = workgroup id (x, y, z), writing the
// pooled scores of the query block's queries for that key block. Invocation
// i takes the block's keys i, i + 8, .., i + 56 (then the same + 64, ..),
// their k_i rows held in private vec4s (d_I <= 64). The query block's q_i
// rows (all heads, padded to a stride of ks = 8 or 16 vec4s) and w go through
// workgroup memory up to 64 queries at a time, loaded once, cooperatively;
// every q_i vec4 read from there serves the invocation's eight keys, each
// logit one straight-line sum of ks vec4 dots (llvmpipe is bound by memory
// reads). Per query, each invocation takes the max over its keys s <= t (NaN
// skipped) into `pm`; the eight partials are then merged in invocation order
// and, past the first 64 keys, with the value already written. A query's
// result depends on its own scores only. Needs H_I <= 16 (the launch checks).
// The per-key code is written out for each of the eight keys.
const TWG: u32 = 8u;
const TKEYS: u32 = 64u;
const QTV: u32 = 832u;
const PQ: u32 = 64u;
var<workgroup> qt: array<vec4<f32>, 832>;
var<workgroup> wt: array<f32, 256>;
var<workgroup> pm: array<f32, 512>;

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let seq = P.seq;
    let nh = P.heads;
    let d = P.dim;
    let blk = P.block;
    let nb = P.nkb;
    let kb = wg.x;
    let qb = wg.y;
    let b = wg.z;
    let t0 = qb * blk;
    let rows = min(t0 + blk, seq) - t0;
    if (kb > qb) {
        for (var r = lid; r < rows; r = r + TWG) {
            st_pooled((b * seq + t0 + r) * nb + kb, neg_inf());
        }
        return;
    }
    let d4 = (d + 3u) / 4u;
    var ks = 16u;
    if (d4 <= 8u) {
        ks = 8u;
    }
    let rs = nh * ks;
    let qc = min(min(QTV / rs, 256u / nh), PQ);
    let s0 = kb * blk;
    let cols = min(s0 + blk, seq) - s0;
    var kv0: array<vec4<f32>, 16>;
    var kv1: array<vec4<f32>, 16>;
    var kv2: array<vec4<f32>, 16>;
    var kv3: array<vec4<f32>, 16>;
    var kv4: array<vec4<f32>, 16>;
    var kv5: array<vec4<f32>, 16>;
    var kv6: array<vec4<f32>, 16>;
    var kv7: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < cols; k0 = k0 + TKEYS) {
        let sk0 = s0 + k0 + lid + 0u;
        let ko0 = ki_off(b, min(sk0, seq - 1u));
        kv0[0u] = ld4_ki(ko0, 0u, d);
        kv0[1u] = ld4_ki(ko0, 4u, d);
        kv0[2u] = ld4_ki(ko0, 8u, d);
        kv0[3u] = ld4_ki(ko0, 12u, d);
        kv0[4u] = ld4_ki(ko0, 16u, d);
        kv0[5u] = ld4_ki(ko0, 20u, d);
        kv0[6u] = ld4_ki(ko0, 24u, d);
        kv0[7u] = ld4_ki(ko0, 28u, d);
        kv0[8u] = ld4_ki(ko0, 32u, d);
        kv0[9u] = ld4_ki(ko0, 36u, d);
        kv0[10u] = ld4_ki(ko0, 40u, d);
        kv0[11u] = ld4_ki(ko0, 44u, d);
        kv0[12u] = ld4_ki(ko0, 48u, d);
        kv0[13u] = ld4_ki(ko0, 52u, d);
        kv0[14u] = ld4_ki(ko0, 56u, d);
        kv0[15u] = ld4_ki(ko0, 60u, d);
        let sk1 = s0 + k0 + lid + 8u;
        let ko1 = ki_off(b, min(sk1, seq - 1u));
        kv1[0u] = ld4_ki(ko1, 0u, d);
        kv1[1u] = ld4_ki(ko1, 4u, d);
        kv1[2u] = ld4_ki(ko1, 8u, d);
        kv1[3u] = ld4_ki(ko1, 12u, d);
        kv1[4u] = ld4_ki(ko1, 16u, d);
        kv1[5u] = ld4_ki(ko1, 20u, d);
        kv1[6u] = ld4_ki(ko1, 24u, d);
        kv1[7u] = ld4_ki(ko1, 28u, d);
        kv1[8u] = ld4_ki(ko1, 32u, d);
        kv1[9u] = ld4_ki(ko1, 36u, d);
        kv1[10u] = ld4_ki(ko1, 40u, d);
        kv1[11u] = ld4_ki(ko1, 44u, d);
        kv1[12u] = ld4_ki(ko1, 48u, d);
        kv1[13u] = ld4_ki(ko1, 52u, d);
        kv1[14u] = ld4_ki(ko1, 56u, d);
        kv1[15u] = ld4_ki(ko1, 60u, d);
        let sk2 = s0 + k0 + lid + 16u;
        let ko2 = ki_off(b, min(sk2, seq - 1u));
        kv2[0u] = ld4_ki(ko2, 0u, d);
        kv2[1u] = ld4_ki(ko2, 4u, d);
        kv2[2u] = ld4_ki(ko2, 8u, d);
        kv2[3u] = ld4_ki(ko2, 12u, d);
        kv2[4u] = ld4_ki(ko2, 16u, d);
        kv2[5u] = ld4_ki(ko2, 20u, d);
        kv2[6u] = ld4_ki(ko2, 24u, d);
        kv2[7u] = ld4_ki(ko2, 28u, d);
        kv2[8u] = ld4_ki(ko2, 32u, d);
        kv2[9u] = ld4_ki(ko2, 36u, d);
        kv2[10u] = ld4_ki(ko2, 40u, d);
        kv2[11u] = ld4_ki(ko2, 44u, d);
        kv2[12u] = ld4_ki(ko2, 48u, d);
        kv2[13u] = ld4_ki(ko2, 52u, d);
        kv2[14u] = ld4_ki(ko2, 56u, d);
        kv2[15u] = ld4_ki(ko2, 60u, d);
        let sk3 = s0 + k0 + lid + 24u;
        let ko3 = ki_off(b, min(sk3, seq - 1u));
        kv3[0u] = ld4_ki(ko3, 0u, d);
        kv3[1u] = ld4_ki(ko3, 4u, d);
        kv3[2u] = ld4_ki(ko3, 8u, d);
        kv3[3u] = ld4_ki(ko3, 12u, d);
        kv3[4u] = ld4_ki(ko3, 16u, d);
        kv3[5u] = ld4_ki(ko3, 20u, d);
        kv3[6u] = ld4_ki(ko3, 24u, d);
        kv3[7u] = ld4_ki(ko3, 28u, d);
        kv3[8u] = ld4_ki(ko3, 32u, d);
        kv3[9u] = ld4_ki(ko3, 36u, d);
        kv3[10u] = ld4_ki(ko3, 40u, d);
        kv3[11u] = ld4_ki(ko3, 44u, d);
        kv3[12u] = ld4_ki(ko3, 48u, d);
        kv3[13u] = ld4_ki(ko3, 52u, d);
        kv3[14u] = ld4_ki(ko3, 56u, d);
        kv3[15u] = ld4_ki(ko3, 60u, d);
        let sk4 = s0 + k0 + lid + 32u;
        let ko4 = ki_off(b, min(sk4, seq - 1u));
        kv4[0u] = ld4_ki(ko4, 0u, d);
        kv4[1u] = ld4_ki(ko4, 4u, d);
        kv4[2u] = ld4_ki(ko4, 8u, d);
        kv4[3u] = ld4_ki(ko4, 12u, d);
        kv4[4u] = ld4_ki(ko4, 16u, d);
        kv4[5u] = ld4_ki(ko4, 20u, d);
        kv4[6u] = ld4_ki(ko4, 24u, d);
        kv4[7u] = ld4_ki(ko4, 28u, d);
        kv4[8u] = ld4_ki(ko4, 32u, d);
        kv4[9u] = ld4_ki(ko4, 36u, d);
        kv4[10u] = ld4_ki(ko4, 40u, d);
        kv4[11u] = ld4_ki(ko4, 44u, d);
        kv4[12u] = ld4_ki(ko4, 48u, d);
        kv4[13u] = ld4_ki(ko4, 52u, d);
        kv4[14u] = ld4_ki(ko4, 56u, d);
        kv4[15u] = ld4_ki(ko4, 60u, d);
        let sk5 = s0 + k0 + lid + 40u;
        let ko5 = ki_off(b, min(sk5, seq - 1u));
        kv5[0u] = ld4_ki(ko5, 0u, d);
        kv5[1u] = ld4_ki(ko5, 4u, d);
        kv5[2u] = ld4_ki(ko5, 8u, d);
        kv5[3u] = ld4_ki(ko5, 12u, d);
        kv5[4u] = ld4_ki(ko5, 16u, d);
        kv5[5u] = ld4_ki(ko5, 20u, d);
        kv5[6u] = ld4_ki(ko5, 24u, d);
        kv5[7u] = ld4_ki(ko5, 28u, d);
        kv5[8u] = ld4_ki(ko5, 32u, d);
        kv5[9u] = ld4_ki(ko5, 36u, d);
        kv5[10u] = ld4_ki(ko5, 40u, d);
        kv5[11u] = ld4_ki(ko5, 44u, d);
        kv5[12u] = ld4_ki(ko5, 48u, d);
        kv5[13u] = ld4_ki(ko5, 52u, d);
        kv5[14u] = ld4_ki(ko5, 56u, d);
        kv5[15u] = ld4_ki(ko5, 60u, d);
        let sk6 = s0 + k0 + lid + 48u;
        let ko6 = ki_off(b, min(sk6, seq - 1u));
        kv6[0u] = ld4_ki(ko6, 0u, d);
        kv6[1u] = ld4_ki(ko6, 4u, d);
        kv6[2u] = ld4_ki(ko6, 8u, d);
        kv6[3u] = ld4_ki(ko6, 12u, d);
        kv6[4u] = ld4_ki(ko6, 16u, d);
        kv6[5u] = ld4_ki(ko6, 20u, d);
        kv6[6u] = ld4_ki(ko6, 24u, d);
        kv6[7u] = ld4_ki(ko6, 28u, d);
        kv6[8u] = ld4_ki(ko6, 32u, d);
        kv6[9u] = ld4_ki(ko6, 36u, d);
        kv6[10u] = ld4_ki(ko6, 40u, d);
        kv6[11u] = ld4_ki(ko6, 44u, d);
        kv6[12u] = ld4_ki(ko6, 48u, d);
        kv6[13u] = ld4_ki(ko6, 52u, d);
        kv6[14u] = ld4_ki(ko6, 56u, d);
        kv6[15u] = ld4_ki(ko6, 60u, d);
        let sk7 = s0 + k0 + lid + 56u;
        let ko7 = ki_off(b, min(sk7, seq - 1u));
        kv7[0u] = ld4_ki(ko7, 0u, d);
        kv7[1u] = ld4_ki(ko7, 4u, d);
        kv7[2u] = ld4_ki(ko7, 8u, d);
        kv7[3u] = ld4_ki(ko7, 12u, d);
        kv7[4u] = ld4_ki(ko7, 16u, d);
        kv7[5u] = ld4_ki(ko7, 20u, d);
        kv7[6u] = ld4_ki(ko7, 24u, d);
        kv7[7u] = ld4_ki(ko7, 28u, d);
        kv7[8u] = ld4_ki(ko7, 32u, d);
        kv7[9u] = ld4_ki(ko7, 36u, d);
        kv7[10u] = ld4_ki(ko7, 40u, d);
        kv7[11u] = ld4_ki(ko7, 44u, d);
        kv7[12u] = ld4_ki(ko7, 48u, d);
        kv7[13u] = ld4_ki(ko7, 52u, d);
        kv7[14u] = ld4_ki(ko7, 56u, d);
        kv7[15u] = ld4_ki(ko7, 60u, d);
        for (var c0 = 0u; c0 < rows; c0 = c0 + qc) {
            let qw = min(qc, rows - c0);
            workgroupBarrier();
            for (var i = lid; i < qw * rs; i = i + TWG) {
                let r = i / rs;
                let j = (i % rs) / ks;
                let e = i % ks;
                qt[i] = ld4_qi(qi_off(b, t0 + c0 + r, j), 4u * e, d);
            }
            for (var i = lid; i < qw * nh; i = i + TWG) {
                wt[i] = ld_w((b * seq + t0 + c0) * nh + i);
            }
            workgroupBarrier();
            for (var r = 0u; r < qw; r = r + 1u) {
                let t = t0 + c0 + r;
                var x0 = 0.0;
                var x1 = 0.0;
                var x2 = 0.0;
                var x3 = 0.0;
                var x4 = 0.0;
                var x5 = 0.0;
                var x6 = 0.0;
                var x7 = 0.0;
                for (var j = 0u; j < nh; j = j + 1u) {
                    let o = (r * nh + j) * ks;
                    let wj = wt[r * nh + j];
                    let q0 = qt[o + 0u];
                    let q1 = qt[o + 1u];
                    let q2 = qt[o + 2u];
                    let q3 = qt[o + 3u];
                    let q4 = qt[o + 4u];
                    let q5 = qt[o + 5u];
                    let q6 = qt[o + 6u];
                    let q7 = qt[o + 7u];
                    var l0 = dot(kv0[0u], q0) + dot(kv0[1u], q1) + dot(kv0[2u], q2) + dot(kv0[3u], q3) + dot(kv0[4u], q4) + dot(kv0[5u], q5) + dot(kv0[6u], q6) + dot(kv0[7u], q7);
                    var l1 = dot(kv1[0u], q0) + dot(kv1[1u], q1) + dot(kv1[2u], q2) + dot(kv1[3u], q3) + dot(kv1[4u], q4) + dot(kv1[5u], q5) + dot(kv1[6u], q6) + dot(kv1[7u], q7);
                    var l2 = dot(kv2[0u], q0) + dot(kv2[1u], q1) + dot(kv2[2u], q2) + dot(kv2[3u], q3) + dot(kv2[4u], q4) + dot(kv2[5u], q5) + dot(kv2[6u], q6) + dot(kv2[7u], q7);
                    var l3 = dot(kv3[0u], q0) + dot(kv3[1u], q1) + dot(kv3[2u], q2) + dot(kv3[3u], q3) + dot(kv3[4u], q4) + dot(kv3[5u], q5) + dot(kv3[6u], q6) + dot(kv3[7u], q7);
                    var l4 = dot(kv4[0u], q0) + dot(kv4[1u], q1) + dot(kv4[2u], q2) + dot(kv4[3u], q3) + dot(kv4[4u], q4) + dot(kv4[5u], q5) + dot(kv4[6u], q6) + dot(kv4[7u], q7);
                    var l5 = dot(kv5[0u], q0) + dot(kv5[1u], q1) + dot(kv5[2u], q2) + dot(kv5[3u], q3) + dot(kv5[4u], q4) + dot(kv5[5u], q5) + dot(kv5[6u], q6) + dot(kv5[7u], q7);
                    var l6 = dot(kv6[0u], q0) + dot(kv6[1u], q1) + dot(kv6[2u], q2) + dot(kv6[3u], q3) + dot(kv6[4u], q4) + dot(kv6[5u], q5) + dot(kv6[6u], q6) + dot(kv6[7u], q7);
                    var l7 = dot(kv7[0u], q0) + dot(kv7[1u], q1) + dot(kv7[2u], q2) + dot(kv7[3u], q3) + dot(kv7[4u], q4) + dot(kv7[5u], q5) + dot(kv7[6u], q6) + dot(kv7[7u], q7);
                    if (ks == 16u) {
                        let q8 = qt[o + 8u];
                        let q9 = qt[o + 9u];
                        let q10 = qt[o + 10u];
                        let q11 = qt[o + 11u];
                        let q12 = qt[o + 12u];
                        let q13 = qt[o + 13u];
                        let q14 = qt[o + 14u];
                        let q15 = qt[o + 15u];
                        l0 = l0 + (dot(kv0[8u], q8) + dot(kv0[9u], q9) + dot(kv0[10u], q10) + dot(kv0[11u], q11) + dot(kv0[12u], q12) + dot(kv0[13u], q13) + dot(kv0[14u], q14) + dot(kv0[15u], q15));
                        l1 = l1 + (dot(kv1[8u], q8) + dot(kv1[9u], q9) + dot(kv1[10u], q10) + dot(kv1[11u], q11) + dot(kv1[12u], q12) + dot(kv1[13u], q13) + dot(kv1[14u], q14) + dot(kv1[15u], q15));
                        l2 = l2 + (dot(kv2[8u], q8) + dot(kv2[9u], q9) + dot(kv2[10u], q10) + dot(kv2[11u], q11) + dot(kv2[12u], q12) + dot(kv2[13u], q13) + dot(kv2[14u], q14) + dot(kv2[15u], q15));
                        l3 = l3 + (dot(kv3[8u], q8) + dot(kv3[9u], q9) + dot(kv3[10u], q10) + dot(kv3[11u], q11) + dot(kv3[12u], q12) + dot(kv3[13u], q13) + dot(kv3[14u], q14) + dot(kv3[15u], q15));
                        l4 = l4 + (dot(kv4[8u], q8) + dot(kv4[9u], q9) + dot(kv4[10u], q10) + dot(kv4[11u], q11) + dot(kv4[12u], q12) + dot(kv4[13u], q13) + dot(kv4[14u], q14) + dot(kv4[15u], q15));
                        l5 = l5 + (dot(kv5[8u], q8) + dot(kv5[9u], q9) + dot(kv5[10u], q10) + dot(kv5[11u], q11) + dot(kv5[12u], q12) + dot(kv5[13u], q13) + dot(kv5[14u], q14) + dot(kv5[15u], q15));
                        l6 = l6 + (dot(kv6[8u], q8) + dot(kv6[9u], q9) + dot(kv6[10u], q10) + dot(kv6[11u], q11) + dot(kv6[12u], q12) + dot(kv6[13u], q13) + dot(kv6[14u], q14) + dot(kv6[15u], q15));
                        l7 = l7 + (dot(kv7[8u], q8) + dot(kv7[9u], q9) + dot(kv7[10u], q10) + dot(kv7[11u], q11) + dot(kv7[12u], q12) + dot(kv7[13u], q13) + dot(kv7[14u], q14) + dot(kv7[15u], q15));
                    }
                    x0 = x0 + wj * max(l0, 0.0);
                    x1 = x1 + wj * max(l1, 0.0);
                    x2 = x2 + wj * max(l2, 0.0);
                    x3 = x3 + wj * max(l3, 0.0);
                    x4 = x4 + wj * max(l4, 0.0);
                    x5 = x5 + wj * max(l5, 0.0);
                    x6 = x6 + wj * max(l6, 0.0);
                    x7 = x7 + wj * max(l7, 0.0);
                }
                var m = LOWEST;
                if (sk0 < s0 + cols && sk0 <= t && x0 > m) {
                    m = x0;
                }
                if (sk1 < s0 + cols && sk1 <= t && x1 > m) {
                    m = x1;
                }
                if (sk2 < s0 + cols && sk2 <= t && x2 > m) {
                    m = x2;
                }
                if (sk3 < s0 + cols && sk3 <= t && x3 > m) {
                    m = x3;
                }
                if (sk4 < s0 + cols && sk4 <= t && x4 > m) {
                    m = x4;
                }
                if (sk5 < s0 + cols && sk5 <= t && x5 > m) {
                    m = x5;
                }
                if (sk6 < s0 + cols && sk6 <= t && x6 > m) {
                    m = x6;
                }
                if (sk7 < s0 + cols && sk7 <= t && x7 > m) {
                    m = x7;
                }
                pm[r * TWG + lid] = m;
            }
            workgroupBarrier();
            // Query c0 + r's maximum: its eight partials in invocation order,
            // then the keys of the earlier 64-key groups (already written).
            for (var r = lid; r < qw; r = r + TWG) {
                var m = pm[r * TWG];
                for (var i = 1u; i < TWG; i = i + 1u) {
                    let x = pm[r * TWG + i];
                    if (x > m) { m = x; }
                }
                let o = (b * seq + t0 + c0 + r) * nb + kb;
                if (k0 > 0u) {
                    let prev = ld_pooled(o);
                    if (prev > m) { m = prev; }
                }
                if (k0 + TKEYS >= cols) {
                    m = pooled_value(m);
                }
                st_pooled(o, m);
            }
        }
    }
}

//!kernel indexer_block_scores_tiled_hw(qi: in, ki: in, w: in, pooled: out) : IndexerParams
// The hardware-GPU variant of `indexer_block_scores_tiled` (same inputs,
// outputs and per-query maxima): a 64-wide workgroup per (key block, query
// block, batch), invocation i holding key i (then i + 64, ..) of the block
// in private vec4s, so one k_i row per invocation instead of eight; q_i rows
// and w through workgroup memory 8 queries at a time (64 partial maxima per
// query in `pm`), merged in invocation order. Max is exact, so the result
// is bit-identical to the software variant's. With subgroups, each
// subgroup first takes the maximum of its invocations' partials
// (subgroupMax) and only its first invocation writes it, at the subgroup's
// index: a query's maximum then merges num_subgroups partials instead of 64
// (max is exact and order-free, so still bit-identical).
const TWG: u32 = 64u;
const TKEYS: u32 = 64u;
const QTV: u32 = 832u;
const PQ: u32 = 8u;
var<workgroup> qt: array<vec4<f32>, 832>;
var<workgroup> wt: array<f32, 256>;
var<workgroup> pm: array<f32, 512>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32,
//#if subgroups
        @builtin(subgroup_invocation_id) sgi: u32, @builtin(subgroup_id) sgid: u32, @builtin(num_subgroups) nsg: u32,
//#endif
) {
    let seq = P.seq;
    let nh = P.heads;
    let d = P.dim;
    let blk = P.block;
    let nb = P.nkb;
    let kb = wg.x;
    let qb = wg.y;
    let b = wg.z;
    let t0 = qb * blk;
    let rows = min(t0 + blk, seq) - t0;
    if (kb > qb) {
        for (var r = lid; r < rows; r = r + TWG) {
            st_pooled((b * seq + t0 + r) * nb + kb, neg_inf());
        }
        return;
    }
    let d4 = (d + 3u) / 4u;
    var ks = 16u;
    if (d4 <= 8u) {
        ks = 8u;
    }
    let rs = nh * ks;
    let qc = min(min(QTV / rs, 256u / nh), PQ);
    let s0 = kb * blk;
    let cols = min(s0 + blk, seq) - s0;
    var kv0: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < cols; k0 = k0 + TKEYS) {
        let sk0 = s0 + k0 + lid + 0u;
        let ko0 = ki_off(b, min(sk0, seq - 1u));
        kv0[0u] = ld4_ki(ko0, 0u, d);
        kv0[1u] = ld4_ki(ko0, 4u, d);
        kv0[2u] = ld4_ki(ko0, 8u, d);
        kv0[3u] = ld4_ki(ko0, 12u, d);
        kv0[4u] = ld4_ki(ko0, 16u, d);
        kv0[5u] = ld4_ki(ko0, 20u, d);
        kv0[6u] = ld4_ki(ko0, 24u, d);
        kv0[7u] = ld4_ki(ko0, 28u, d);
        kv0[8u] = ld4_ki(ko0, 32u, d);
        kv0[9u] = ld4_ki(ko0, 36u, d);
        kv0[10u] = ld4_ki(ko0, 40u, d);
        kv0[11u] = ld4_ki(ko0, 44u, d);
        kv0[12u] = ld4_ki(ko0, 48u, d);
        kv0[13u] = ld4_ki(ko0, 52u, d);
        kv0[14u] = ld4_ki(ko0, 56u, d);
        kv0[15u] = ld4_ki(ko0, 60u, d);
        for (var c0 = 0u; c0 < rows; c0 = c0 + qc) {
            let qw = min(qc, rows - c0);
            workgroupBarrier();
            for (var i = lid; i < qw * rs; i = i + TWG) {
                let r = i / rs;
                let j = (i % rs) / ks;
                let e = i % ks;
                qt[i] = ld4_qi(qi_off(b, t0 + c0 + r, j), 4u * e, d);
            }
            for (var i = lid; i < qw * nh; i = i + TWG) {
                wt[i] = ld_w((b * seq + t0 + c0) * nh + i);
            }
            workgroupBarrier();
            for (var r = 0u; r < qw; r = r + 1u) {
                let t = t0 + c0 + r;
                var x0 = 0.0;
                for (var j = 0u; j < nh; j = j + 1u) {
                    let o = (r * nh + j) * ks;
                    let wj = wt[r * nh + j];
                    let q0 = qt[o + 0u];
                    let q1 = qt[o + 1u];
                    let q2 = qt[o + 2u];
                    let q3 = qt[o + 3u];
                    let q4 = qt[o + 4u];
                    let q5 = qt[o + 5u];
                    let q6 = qt[o + 6u];
                    let q7 = qt[o + 7u];
                    var l0 = dot(kv0[0u], q0) + dot(kv0[1u], q1) + dot(kv0[2u], q2) + dot(kv0[3u], q3) + dot(kv0[4u], q4) + dot(kv0[5u], q5) + dot(kv0[6u], q6) + dot(kv0[7u], q7);
                    if (ks == 16u) {
                        let q8 = qt[o + 8u];
                        let q9 = qt[o + 9u];
                        let q10 = qt[o + 10u];
                        let q11 = qt[o + 11u];
                        let q12 = qt[o + 12u];
                        let q13 = qt[o + 13u];
                        let q14 = qt[o + 14u];
                        let q15 = qt[o + 15u];
                        l0 = l0 + (dot(kv0[8u], q8) + dot(kv0[9u], q9) + dot(kv0[10u], q10) + dot(kv0[11u], q11) + dot(kv0[12u], q12) + dot(kv0[13u], q13) + dot(kv0[14u], q14) + dot(kv0[15u], q15));
                    }
                    x0 = x0 + wj * max(l0, 0.0);
                }
                var m = LOWEST;
                if (sk0 < s0 + cols && sk0 <= t && x0 > m) {
                    m = x0;
                }
//#if subgroups
                let sm = subgroupMax(m);
                if (sgi == 0u) { pm[r * TWG + sgid] = sm; }
//#else
                pm[r * TWG + lid] = m;
//#endif
            }
            workgroupBarrier();
            // Query c0 + r's maximum: its 64 partials in invocation order,
            // then the keys of the earlier 64-key groups (already written).
//#if subgroups
            let parts = nsg;
//#else
            let parts = TWG;
//#endif
            for (var r = lid; r < qw; r = r + TWG) {
                var m = pm[r * TWG];
                for (var i = 1u; i < parts; i = i + 1u) {
                    let x = pm[r * TWG + i];
                    if (x > m) { m = x; }
                }
                let o = (b * seq + t0 + c0 + r) * nb + kb;
                if (k0 > 0u) {
                    let prev = ld_pooled(o);
                    if (prev > m) { m = prev; }
                }
                if (k0 + TKEYS >= cols) {
                    m = pooled_value(m);
                }
                st_pooled(o, m);
            }
        }
    }
}

//!kernel indexer_bwd_q(qi: in, ki: in, w: in, dscores: in, dqi: inout, dw: inout) : IndexerParams
// One invocation per (chunk, batch, query, head j): dw[t, j] = Σ_s dI·ReLU(L) and
// dq_i[t, j] = Σ_s dI·w[t, j]·[L > 0]·k_i[s] over the chunk's keys s <= t, with
// L = q_i[t, j]·k_i[s], accumulated CH dims at a time.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = P.seq;
    let nh = P.heads;
    let di = P.dim;
    let nch = P.nch;
    let nrow = P.nrow;
    if (i >= nch * nrow) { return; }
    let c = i / nrow;
    let rl = i % nrow;
    let r = P.r0 + rl;
    let bt = r / nh;
    let t = bt % seq;
    let b = bt / seq;
    let dro = (b * P.qrows + t - P.q0) * seq;
    let qo = r * di;
    let wj = ld_w(r);
    let s0 = c * P.chunk;
    let s1 = min(t + 1u, s0 + P.chunk);
    // One chunk: the result at its own row; else the chunk's partial.
    let orow = select(c * nrow + rl, r, nch == 1u);
    let oo = orow * di;
    var dwacc = 0.0;
    var acc: array<vec4<f32>, CH4>;
    for (var c0 = 0u; c0 < di; c0 = c0 + CH) {
        let cw = min(CH, di - c0);
        let nc = (cw + 3u) / 4u;
        for (var cc = 0u; cc < nc; cc = cc + 1u) {
            acc[cc] = vec4<f32>(0.0);
        }
        for (var s = s0; s < s1; s = s + 1u) {
            let dval = ld_dscores(dro + s);
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
    st_dw(orow, dwacc);
}

//!kernel indexer_bwd_k(qi: in, ki: in, w: in, dscores: in, dki: out) : IndexerParams
// One invocation per (chunk, batch, key s): dk_i[s] = Σ_t Σ_j dI·w[t, j]·[L > 0]·q_i[t, j]
// over the chunk's queries t >= s of the tile (chunk c: queries q0 + c·chunk ..).
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = P.seq;
    let nh = P.heads;
    let di = P.dim;
    let q0 = P.q0;
    let nq = P.qrows;
    let nch = P.nch;
    let nrow = P.nrow;
    if (i >= nch * nrow) { return; }
    let c = i / nrow;
    let rl = i % nrow;
    let r = P.r0 + rl;
    let s = r % seq;
    let b = r / seq;
    let ko = ki_off(b, s);
    let t0 = max(s, q0 + c * P.chunk);
    let t1 = min(q0 + nq, q0 + (c + 1u) * P.chunk);
    let oo = (c * nrow + rl) * di;
    var acc: array<vec4<f32>, CH4>;
    for (var c0 = 0u; c0 < di; c0 = c0 + CH) {
        let cw = min(CH, di - c0);
        let nc = (cw + 3u) / 4u;
        for (var cc = 0u; cc < nc; cc = cc + 1u) {
            acc[cc] = vec4<f32>(0.0);
        }
        for (var t = t0; t < t1; t = t + 1u) {
            let dval = ld_dscores((b * nq + t - q0) * seq + s);
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

//!kernel indexer_scores_hw(qi: in, ki: in, w: in, scores: out) : IndexerParams
// The hardware-GPU variant of `indexer_scores` (same outputs): a 256-wide
// workgroup per (key tile, query tile, batch) = workgroup id (x, y, z), a
// tile being 16 keys × 16 queries of the spec's query rows q0 .. q0 + Q,
// invocation i computing I(t, s) of query i / 16 and key i % 16 of the tile.
// The tile's k_i rows and w are loaded into workgroup memory once, its q_i
// rows one head at a time, each element by one invocation; each logit is
// then a d_I / 4-long sum of vec4 dots from workgroup memory, summed over the
// heads in head order as the software variant does (its result in f32 is the
// same sum). Key tiles wholly after the tile's last query only write -inf.
// Needs d_I <= 64 and H_I <= 16 (the launch checks and falls back).
// With f16 q_i, k_i and w on a SHADER_F16 device the tiles hold f16 (half the
// workgroup memory) and each q·k product is an f16 multiply, summed in f32 (as
// `matmul_hw` and `attn_fwd_tiled_hw`); ReLU, w and the head sum stay f32.
//#if f16
var<workgroup> sq: array<vec4<f16>, 256>;
var<workgroup> sk: array<vec4<f16>, 256>;
fn ldq4(o: u32, e: u32, d: u32) -> vec4<f16> { return ld4h_qi(o, e, d); }
fn ldk4(o: u32, e: u32, d: u32) -> vec4<f16> { return ld4h_ki(o, e, d); }
fn qk4(i: u32, j: u32) -> f32 { return dot(vec4<f32>(sq[i] * sk[j]), vec4<f32>(1.0)); }
//#else
var<workgroup> sq: array<vec4<f32>, 256>;
var<workgroup> sk: array<vec4<f32>, 256>;
fn ldq4(o: u32, e: u32, d: u32) -> vec4<f32> { return ld4_qi(o, e, d); }
fn ldk4(o: u32, e: u32, d: u32) -> vec4<f32> { return ld4_ki(o, e, d); }
fn qk4(i: u32, j: u32) -> f32 { return dot(sq[i], sk[j]); }
//#endif
var<workgroup> swt: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let seq = P.seq;
    let nh = P.heads;
    let d = P.dim;
    let q0 = P.q0;
    let nq = P.qrows;
    let b = wg.z;
    let ti = lid / 16u;
    let si = lid % 16u;
    let tr = wg.y * 16u + ti;
    let t = q0 + tr;
    let s = wg.x * 16u + si;
    let valid = tr < nq && s < seq;
    let o = (b * nq + tr) * seq + s;
    let tlast = q0 + min(wg.y * 16u + 15u, nq - 1u);
    if (wg.x * 16u > tlast) {
        if (valid) { st_scores(o, neg_inf()); }
        return;
    }
    let d4 = (d + 3u) / 4u;
    let tq = min(t, q0 + nq - 1u);
    // Key si's vec4 ti, query ti's weight of head si.
    sk[si * 16u + ti] = ldk4(ki_off(b, min(wg.x * 16u + si, seq - 1u)), 4u * ti, d);
    if (si < nh) {
        swt[lid] = ld_w((b * seq + tq) * nh + si);
    }
    var acc = 0.0;
    for (var j = 0u; j < nh; j = j + 1u) {
        workgroupBarrier();
        sq[lid] = ldq4(qi_off(b, tq, j), 4u * si, d);
        workgroupBarrier();
        var x = 0.0;
        for (var e = 0u; e < d4; e = e + 1u) {
            x = x + qk4(ti * 16u + e, si * 16u + e);
        }
        acc = acc + swt[ti * 16u + j] * max(x, 0.0);
    }
    if (valid) {
        if (s > t) {
            st_scores(o, neg_inf());
        } else {
            st_scores(o, acc);
        }
    }
}

//!kernel indexer_bwd_q_hw(qi: in, ki: in, w: in, dscores: in, dqi: inout, dw: inout) : IndexerParams
// The hardware-GPU variant of `indexer_bwd_q` (same rows, chunks, partials
// and outputs): a 64-wide workgroup per (chunk c, tile of 32 rows of the
// launch's rows r0 .. r0 + R), the rows of one launch lying in one batch
// entry (the launcher's business). The tile's q_i rows are staged in
// workgroup memory once; the chunk's keys s <= (the tile's last query) are
// streamed through it 16 k_i rows at a time. Per key tile, invocation i
// first computes the logits L = q_i[t, j]·k_i[s] of row i % 32 with keys
// (i / 32)·8 .. + 8, adding dI·ReLU(L) to its dw partial and writing the
// coefficient dI·w[t, j]·[L > 0] (0 for s > t) to workgroup memory; then
// accumulates dq_i of row i / 2, vec4s (i % 2)·8 .. + 8, as Σ coef·k_i[s] in
// key order (the software variant's order). A row's dw is the sum of its
// two invocations' partials. Needs d_I <= 64 (the launch checks).
const BQR: u32 = 32u;
const BQK: u32 = 16u;
var<workgroup> bq: array<vec4<f32>, 512>;
var<workgroup> bk: array<vec4<f32>, 256>;
var<workgroup> bcf: array<f32, 512>;
var<workgroup> bdw: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let seq = P.seq;
    let nh = P.heads;
    let d = P.dim;
    let nrow = P.nrow;
    let nch = P.nch;
    let ntile = (nrow + BQR - 1u) / BQR;
    let gi = wg_index(wid, nw);
    if (gi >= nch * ntile) { return; }
    let c = gi / ntile;
    let rl0 = (gi % ntile) * BQR;
    let nr = min(BQR, nrow - rl0);
    let rf = P.r0 + rl0;
    let b = rf / nh / seq;
    let tmax = ((rf + nr - 1u) / nh) % seq;
    let s0 = c * P.chunk;
    let s1 = min(tmax + 1u, s0 + P.chunk);
    let d4 = (d + 3u) / 4u;
    for (var i = lid; i < BQR * 16u; i = i + 64u) {
        bq[i] = ld4_qi((rf + min(i / 16u, nr - 1u)) * d, 4u * (i % 16u), d);
    }
    // Phase 1: row pr, keys kh·8 .. + 8 of each tile.
    let pr = lid % BQR;
    let kh = lid / BQR;
    let prow = rf + min(pr, nr - 1u);
    let pt = (prow / nh) % seq;
    let wj = ld_w(prow);
    let dro = (b * P.qrows + pt - P.q0) * seq;
    // Phase 2: row qr, vec4s dh·8 .. + 8.
    let qr = lid / 2u;
    let dh = lid % 2u;
    var dwacc = 0.0;
    var acc: array<vec4<f32>, 8>;
    for (var k0 = s0; k0 < s1; k0 = k0 + BQK) {
        workgroupBarrier();
        for (var i = lid; i < BQK * 16u; i = i + 64u) {
            bk[i] = ld4_ki(ki_off(b, min(k0 + i / 16u, seq - 1u)), 4u * (i % 16u), d);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 8u; kk = kk + 1u) {
            let key = kh * 8u + kk;
            let s = k0 + key;
            var cf = 0.0;
            if (pr < nr && s < s1 && s <= pt) {
                var l = 0.0;
                for (var e = 0u; e < d4; e = e + 1u) {
                    l = l + dot(bq[pr * 16u + e], bk[key * 16u + e]);
                }
                let dval = ld_dscores(dro + s);
                dwacc = dwacc + dval * max(l, 0.0);
                if (l > 0.0) {
                    cf = dval * wj;
                }
            }
            bcf[pr * BQK + key] = cf;
        }
        workgroupBarrier();
        let kn = min(BQK, s1 - k0);
        for (var key = 0u; key < kn; key = key + 1u) {
            let cv = bcf[qr * BQK + key];
            let ko = key * 16u + dh * 8u;
            acc[0] = acc[0] + cv * bk[ko];
            acc[1] = acc[1] + cv * bk[ko + 1u];
            acc[2] = acc[2] + cv * bk[ko + 2u];
            acc[3] = acc[3] + cv * bk[ko + 3u];
            acc[4] = acc[4] + cv * bk[ko + 4u];
            acc[5] = acc[5] + cv * bk[ko + 5u];
            acc[6] = acc[6] + cv * bk[ko + 6u];
            acc[7] = acc[7] + cv * bk[ko + 7u];
        }
    }
    workgroupBarrier();
    bdw[lid] = dwacc;
    workgroupBarrier();
    if (qr < nr) {
        let rl = rl0 + qr;
        // One chunk: the result at its own row; else the chunk's partial.
        let orow = select(c * nrow + rl, P.r0 + rl, nch == 1u);
        for (var cc = 0u; cc < 8u; cc = cc + 1u) {
            let e0 = (dh * 8u + cc) * 4u;
            for (var l = 0u; l < 4u; l = l + 1u) {
                if (e0 + l < d) { st_dqi(orow * d + e0 + l, acc[cc][l]); }
            }
        }
        if (dh == 0u) {
            st_dw(orow, bdw[qr] + bdw[qr + BQR]);
        }
    }
}

//!kernel indexer_bwd_k_hw(qi: in, ki: in, w: in, dscores: in, dki: out) : IndexerParams
// The hardware-GPU variant of `indexer_bwd_k` (same rows, chunks, partials
// and outputs): a 64-wide workgroup per (chunk c, tile of 32 keys of the
// launch's rows r0 .. r0 + R), the rows of one launch lying in one batch
// entry (the launcher's business). The tile's k_i rows are staged in
// workgroup memory once; the chunk's (query t >= the tile's first key, head
// j) rows, in (t, j) order, are streamed through it 16 q_i rows at a time.
// Per step, invocation i computes the coefficients dI·w[t, j]·[L > 0] (0
// for t < s) of key i % 32 with rows (i / 32)·8 .. + 8 into workgroup
// memory, then accumulates dk_i of key i / 2, vec4s (i % 2)·8 .. + 8, as
// Σ coef·q_i[t, j] in (t, j) order (the software variant's order). Needs
// d_I <= 64 (the launch checks).
const BKK: u32 = 32u;
const BKR: u32 = 16u;
var<workgroup> ck: array<vec4<f32>, 512>;
var<workgroup> cq: array<vec4<f32>, 256>;
var<workgroup> ccf: array<f32, 512>;
var<workgroup> cw: array<f32, 16>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let seq = P.seq;
    let nh = P.heads;
    let d = P.dim;
    let q0 = P.q0;
    let nq = P.qrows;
    let nrow = P.nrow;
    let nch = P.nch;
    let ntile = (nrow + BKK - 1u) / BKK;
    let gi = wg_index(wid, nw);
    if (gi >= nch * ntile) { return; }
    let c = gi / ntile;
    let rl0 = (gi % ntile) * BKK;
    let nr = min(BKK, nrow - rl0);
    let rf = P.r0 + rl0;
    let b = rf / seq;
    let sf = rf % seq;
    let t0 = max(sf, q0 + c * P.chunk);
    let t1 = min(q0 + nq, q0 + (c + 1u) * P.chunk);
    var ntot = 0u;
    if (t1 > t0) { ntot = (t1 - t0) * nh; }
    let d4 = (d + 3u) / 4u;
    for (var i = lid; i < BKK * 16u; i = i + 64u) {
        ck[i] = ld4_ki(ki_off(b, sf + min(i / 16u, nr - 1u)), 4u * (i % 16u), d);
    }
    // Phase 1: key pk, rows ph·8 .. + 8 of each step.
    let pk = lid % BKK;
    let ph = lid / BKK;
    let s = sf + pk;
    // Phase 2: key qk, vec4s dh·8 .. + 8.
    let qk = lid / 2u;
    let dh = lid % 2u;
    var acc: array<vec4<f32>, 8>;
    for (var f0 = 0u; f0 < ntot; f0 = f0 + BKR) {
        workgroupBarrier();
        for (var i = lid; i < BKR * 16u; i = i + 64u) {
            let f = min(f0 + i / 16u, ntot - 1u);
            cq[i] = ld4_qi(qi_off(b, t0 + f / nh, f % nh), 4u * (i % 16u), d);
        }
        if (lid < BKR) {
            let f = min(f0 + lid, ntot - 1u);
            cw[lid] = ld_w((b * seq + t0 + f / nh) * nh + f % nh);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 8u; kk = kk + 1u) {
            let rr = ph * 8u + kk;
            let f = f0 + rr;
            let t = t0 + f / nh;
            var cf = 0.0;
            if (pk < nr && f < ntot && t >= s) {
                var l = 0.0;
                for (var e = 0u; e < d4; e = e + 1u) {
                    l = l + dot(cq[rr * 16u + e], ck[pk * 16u + e]);
                }
                if (l > 0.0) {
                    cf = ld_dscores((b * nq + t - q0) * seq + s) * cw[rr];
                }
            }
            ccf[pk * BKR + rr] = cf;
        }
        workgroupBarrier();
        let rn = min(BKR, ntot - f0);
        for (var rr = 0u; rr < rn; rr = rr + 1u) {
            let cv = ccf[qk * BKR + rr];
            let qo = rr * 16u + dh * 8u;
            acc[0] = acc[0] + cv * cq[qo];
            acc[1] = acc[1] + cv * cq[qo + 1u];
            acc[2] = acc[2] + cv * cq[qo + 2u];
            acc[3] = acc[3] + cv * cq[qo + 3u];
            acc[4] = acc[4] + cv * cq[qo + 4u];
            acc[5] = acc[5] + cv * cq[qo + 5u];
            acc[6] = acc[6] + cv * cq[qo + 6u];
            acc[7] = acc[7] + cv * cq[qo + 7u];
        }
    }
    if (qk < nr) {
        let rl = rl0 + qk;
        // One chunk: the result at its own row; else the chunk's partial.
        let orow = select(c * nrow + rl, P.r0 + rl, nch == 1u);
        for (var cc = 0u; cc < 8u; cc = cc + 1u) {
            let e0 = (dh * 8u + cc) * 4u;
            for (var l = 0u; l < 4u; l = l + 1u) {
                if (e0 + l < d) { st_dki(orow * d + e0 + l, acc[cc][l]); }
            }
        }
    }
}
