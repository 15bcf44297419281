// Fused softmax + cross-entropy over the vocabulary, with ignore-index.
// One 256-wide workgroup per row (rows folded over the x and y grid
// dimensions); each invocation keeps an online (max, Σ exp) over its strided
// columns, merged by a tree reduction. A row is ignored when its target is
// the ignore index or >= vocab: its loss and gradient are 0.
//
// Parameters: `CrossEntropyParams` (src/backend/wgpu/core_ops.rs). The
// online statistics and their merge (`lse_push`, `wg_lse_merge`) are in
// shaders/common.wgsl.

struct CrossEntropyParams {
    rows: u32,
    vocab: u32,
    ignore_index: u32,
    grad_scale: f32,
}

const NONE: u32 = 0xffffffffu;

// The target of `row`, or NONE when the row is past the end or ignored (its
// target is the ignore index or >= vocab).
fn live_target(row: u32) -> u32 {
    if (row >= P.rows) { return NONE; }
    let tg = ldu_targets(row);
    if (tg == P.ignore_index || tg >= P.vocab) { return NONE; }
    return tg;
}

// (max, Σ exp(x - max)) of the row at `base` over `cols` columns, for the whole workgroup.
fn row_stats(t: u32, base: u32, cols: u32) -> vec2<f32> {
    var st = vec2<f32>(NEG, 0.0);
    for (var j = t; j < cols; j = j + 256u) { st = lse_push(st, ld_logits(base + j)); }
    return wg_lse_merge(t, st);
}

//!kernel cross_entropy(logits: in, targets: idx, losses: out) : CrossEntropyParams
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let vocab = P.vocab;
    let tg = live_target(row);
    let live = tg != NONE;
    var cols = 0u;
    if (live) { cols = vocab; }
    let base = row * vocab;
    let st = row_stats(t, base, cols);
    if (row < P.rows && t == 0u) {
        var loss = 0.0;
        if (live) { loss = st.x + log(st.y) - ld_logits(base + tg); }
        st_losses(row, loss);
    }
}

//!kernel cross_entropy_backward(logits: in, targets: idx, dlogits: out) : CrossEntropyParams
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let vocab = P.vocab;
    let tg = live_target(row);
    let live = tg != NONE;
    var cols = 0u;
    if (row < P.rows) { cols = vocab; }
    var scols = 0u;
    if (live) { scols = vocab; }
    let base = row * vocab;
    let st = row_stats(t, base, scols);
    let scale = P.grad_scale;
    let inv = 1.0 / st.y;
    for (var j = t; j < cols; j = j + 256u) {
        var d = 0.0;
        if (live) {
            var hot = 0.0;
            if (j == tg) { hot = 1.0; }
            d = scale * (exp(ld_logits(base + j) - st.x) * inv - hot);
        }
        st_dlogits(base + j, d);
    }
}
