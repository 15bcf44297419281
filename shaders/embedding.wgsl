// Embedding lookup and its deterministic scatter-add gradient (no atomics).
//
// Backward, in two kernels: `emb_links` finds for every token i the next
// token with the same id (links[i], NONE when there is none) and whether i is
// the first token with its id (links[n + i] = 1), scanning the ids in
// 256-wide tiles through workgroup memory. `embedding_backward` then runs one
// invocation per (token, column): only first occurrences work, each walking
// its chain of equal ids in increasing token order and adding into the one
// dtable element it owns, so the sum order is that of the CPU reference.

const NONE: u32 = 0xffffffffu;

// `embedding` and `embedding_backward` (src/backend/wgpu/core_ops.rs): total =
// n·dim elements, dim, vocab, n tokens. `emb_links` takes `CountParams` (n).
struct EmbeddingParams {
    total: u32,
    dim: u32,
    vocab: u32,
    n: u32,
}

//!kernel embedding(ids: idx, table: in, out: out) : EmbeddingParams
// Out-of-range ids give a zero row.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.total) { return; }
    let dim = P.dim;
    let id = ldu_ids(i / dim);
    var v = 0.0;
    if (id < P.vocab) { v = ld_table(id * dim + i % dim); }
    st_out(i, v);
}

//!kernel emb_links(ids: idx, links: idxout) : CountParams
// One invocation per token; grid (ceil(n/256), 1, 1) folded by lin.
var<workgroup> tile: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_id) l: vec3<u32>) {
    let i = lin(g, nw);
    let n = P.n;
    let valid = i < n;
    var id = NONE;
    if (valid) { id = ldu_ids(i); }
    var next = NONE;
    var first = 1u;
    let ntiles = (n + 255u) / 256u;
    for (var t = 0u; t < ntiles; t = t + 1u) {
        let k0 = t * 256u;
        var v = NONE;
        if (k0 + l.x < n) { v = ldu_ids(k0 + l.x); }
        tile[l.x] = v;
        workgroupBarrier();
        let cnt = min(256u, n - k0);
        for (var q = 0u; q < cnt; q = q + 1u) {
            let k = k0 + q;
            if (tile[q] == id) {
                if (k < i) { first = 0u; }
                if (k > i && next == NONE) { next = k; }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        stu_links(i, next);
        stu_links(n + i, first);
    }
}

//!kernel embedding_backward(ids: idx, links: idx, dout: in, dtable: inout) : EmbeddingParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let e = lin(g, nw);
    if (e >= P.total) { return; }
    let dim = P.dim;
    let n = P.n;
    let i = e / dim;
    let j = e % dim;
    let id = ldu_ids(i);
    if (id >= P.vocab || ldu_links(n + i) == 0u) { return; }
    let o = id * dim + j;
    var acc = ld_dtable(o);
    var k = i;
    loop {
        acc = acc + ld_dout(k * dim + j);
        k = ldu_links(k);
        if (k == NONE) { break; }
    }
    st_dtable(o, acc);
}
