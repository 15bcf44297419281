// Ordered combination of the partial results of the split attention and
// indexer kernels (see `shaders/attention.wgsl`, `shaders/indexer.wgsl`): a
// launch covers rows r0 .. r0 + R, and partials are [nch, R, width] (chunk c,
// row rl at (c·R + rl)·width). Chunks are merged in order, so the result is
// deterministic. Outputs are `inout` so that a launch over some rows keeps
// the others (half outputs go through a staging buffer). `AttnParams` is
// declared in shaders/common.wgsl.

struct SumChunksParams {
    nrow: u32,
    nch: u32,
    width: u32,
    r0: u32,
}

//!kernel attn_fwd_combine(part: in, ml: in, o: inout, lse: inout) : AttnParams
// The attention parameters of `shaders/attention.wgsl` (seq, n_heads,
// head_dim, nch, r0, nrow = R). One invocation per (row, element): the log-sum-exp
// merge of the chunks' (m, l, unnormalised output); the element-0 invocation
// also writes lse. Rows are (batch, query, head); o [batch, seq, n_heads,
// head_dim], lse [batch, n_heads, seq], ml [nch, R, 2].
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let seq = P.seq;
    let nh = P.n_heads;
    let d = P.head_dim;
    let nch = P.nch;
    let nrow = P.nrow;
    if (i >= nrow * d) { return; }
    let rl = i / d;
    let e = i % d;
    let r = P.r0 + rl;
    let h = r % nh;
    let bt = r / nh;
    let t = bt % seq;
    let b = bt / seq;
    // Chunks without keys have l = 0 (and a sentinel m); they are skipped by
    // the l > 0 tests, never by comparing with -inf (fast-math compilers do
    // not honour infinities).
    var m = -3.4028235e38;
    for (var c = 0u; c < nch; c = c + 1u) {
        if (ld_ml(2u * (c * nrow + rl) + 1u) > 0.0) {
            m = max(m, ld_ml(2u * (c * nrow + rl)));
        }
    }
    var l = 0.0;
    var acc = 0.0;
    for (var c = 0u; c < nch; c = c + 1u) {
        let lc = ld_ml(2u * (c * nrow + rl) + 1u);
        if (lc > 0.0) {
            let f = exp(ld_ml(2u * (c * nrow + rl)) - m);
            l = l + lc * f;
            acc = acc + ld_part((c * nrow + rl) * d + e) * f;
        }
    }
    var lse = neg_inf();
    var out = 0.0;
    if (l > 0.0) {
        lse = m + log(l);
        out = acc / l;
    }
    st_o(r * d + e, out);
    if (e == 0u) {
        st_lse((b * nh + h) * seq + t, lse);
    }
}

//!kernel sum_chunks(part: in, out: inout) : SumChunksParams
// R = nrow: out[(r0 + rl)·width + e] = Σ_c part[(c·R + rl)·width + e].
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(gid, nw);
    let nrow = P.nrow;
    let nch = P.nch;
    let width = P.width;
    if (i >= nrow * width) { return; }
    var acc = 0.0;
    for (var c = 0u; c < nch; c = c + 1u) {
        acc = acc + ld_part(c * nrow * width + i);
    }
    st_out(P.r0 * width + i, acc);
}
