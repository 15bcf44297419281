// Fused softmax + cross-entropy over the vocabulary, with ignore-index.
// One 256-wide workgroup per row (rows folded over the x and y grid
// dimensions); each invocation keeps an online (max, Σ exp) over its strided
// columns, merged by a tree reduction. A row is ignored when its target is
// the ignore index or >= vocab: its loss and gradient are 0.
//
// Parameters: p0 = rows, p1 = vocab, p2 = ignore_index, p3 = grad_scale.

var<workgroup> rm: array<f32, 256>;
var<workgroup> rs: array<f32, 256>;

fn merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    if (m == -3.4028235e38) { return vec2<f32>(m, 0.0); }
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// (max, Σ exp(x - max)) of the row at `base` over `cols` columns, for the whole workgroup.
fn row_stats(t: u32, base: u32, cols: u32) -> vec2<f32> {
    var st = vec2<f32>(-3.4028235e38, 0.0);
    for (var j = t; j < cols; j = j + 256u) {
        let v = ld_logits(base + j);
        if (v > st.x) {
            st = vec2<f32>(v, st.y * exp(st.x - v) + 1.0);
        } else {
            st.y = st.y + exp(v - st.x);
        }
    }
    rm[t] = st.x;
    rs[t] = st.y;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) {
            let r = merge(vec2<f32>(rm[t], rs[t]), vec2<f32>(rm[t + s], rs[t + s]));
            rm[t] = r.x;
            rs[t] = r.y;
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(rm[0], rs[0]);
    workgroupBarrier();
    return r;
}

//!kernel cross_entropy(logits: in, targets: idx, losses: out)
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let vocab = pu(1u);
    var tg = 0u;
    var live = false;
    if (row < pu(0u)) {
        tg = ldu_targets(row);
        live = tg != pu(2u) && tg < vocab;
    }
    var cols = 0u;
    if (live) { cols = vocab; }
    let base = row * vocab;
    let st = row_stats(t, base, cols);
    if (row < pu(0u) && t == 0u) {
        var loss = 0.0;
        if (live) { loss = st.x + log(st.y) - ld_logits(base + tg); }
        st_losses(row, loss);
    }
}

//!kernel cross_entropy_backward(logits: in, targets: idx, dlogits: out)
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let vocab = pu(1u);
    var tg = 0u;
    var live = false;
    var cols = 0u;
    if (row < pu(0u)) {
        tg = ldu_targets(row);
        live = tg != pu(2u) && tg < vocab;
        cols = vocab;
    }
    var scols = 0u;
    if (live) { scols = vocab; }
    let base = row * vocab;
    let st = row_stats(t, base, scols);
    let scale = pf(3u);
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
