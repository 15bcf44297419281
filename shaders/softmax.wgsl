// Row softmax over the last dimension, optionally causal; one 256-wide
// workgroup per row (rows folded over the x and y grid dimensions).
//
// Parameters: `SoftmaxParams` (src/backend/wgpu/core_ops.rs): rows, n
// (columns), t (queries per causal block), causal. Row r sees columns
// j < visible(r) = min(r % t + 1 + n - t, n); masked outputs are exactly 0
// and masked inputs are never read. Forward keeps an online (max, Σ exp) per
// invocation and merges them (`lse_push`, `wg_lse_merge` and `wg_sum` are in
// shaders/common.wgsl).

struct SoftmaxParams {
    rows: u32,
    n: u32,
    t: u32,
    causal: u32,
}

fn visible(r: u32) -> u32 {
    let n = P.n;
    if (P.causal == 1u) {
        let t = P.t;
        return min(r % t + 1u + (n - t), n);
    }
    return n;
}

// (visible columns, columns) of `row`: zero for a row past the end.
fn span(row: u32) -> vec2<u32> {
    if (row < P.rows) { return vec2<u32>(visible(row), P.n); }
    return vec2<u32>(0u, 0u);
}

//!kernel softmax(x: in, y: out) : SoftmaxParams
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let n = P.n;
    let sp = span(row);
    let vis = sp.x;
    let cols = sp.y;
    let base = row * n;
    var st = vec2<f32>(NEG, 0.0);
    for (var j = t; j < vis; j = j + 256u) { st = lse_push(st, ld_x(base + j)); }
    let tot = wg_lse_merge(t, st);
    let inv = 1.0 / tot.y;
    for (var j = t; j < cols; j = j + 256u) {
        var o = 0.0;
        if (j < vis) { o = exp(ld_x(base + j) - tot.x) * inv; }
        st_y(base + j, o);
    }
}

//!kernel softmax_backward(y: in, dy: in, dx: out) : SoftmaxParams
// dx = y·(dy - Σ_j y·dy) over the visible columns, 0 elsewhere.
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let n = P.n;
    let sp = span(row);
    let vis = sp.x;
    let cols = sp.y;
    let base = row * n;
    var d = 0.0;
    for (var j = t; j < vis; j = j + 256u) { d = d + ld_y(base + j) * ld_dy(base + j); }
    let dot = wg_sum(t, d);
    for (var j = t; j < cols; j = j + 256u) {
        var o = 0.0;
        if (j < vis) { o = ld_y(base + j) * (ld_dy(base + j) - dot); }
        st_dx(base + j, o);
    }
}
