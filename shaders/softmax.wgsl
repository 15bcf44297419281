// Row softmax over the last dimension, optionally causal; one 256-wide
// workgroup per row (rows folded over the x and y grid dimensions).
//
// Parameters: p0 = rows, p1 = n (columns), p2 = t (queries per causal block),
// p3 = causal. Row r sees columns j < visible(r) = min(r % t + 1 + n - t, n);
// masked outputs are exactly 0 and masked inputs are never read.
// Forward keeps an online (max, Σ exp) per invocation and merges them.

var<workgroup> rm: array<f32, 256>;
var<workgroup> rs: array<f32, 256>;

fn visible(r: u32) -> u32 {
    let n = pu(1u);
    if (pu(3u) == 1u) {
        let t = pu(2u);
        return min(r % t + 1u + (n - t), n);
    }
    return n;
}

// Merges online softmax statistics (m, s): s is Σ exp(x - m).
fn merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    if (m == -3.4028235e38) { return vec2<f32>(m, 0.0); }
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

fn wg_merge(t: u32, v: vec2<f32>) -> vec2<f32> {
    rm[t] = v.x;
    rs[t] = v.y;
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

fn wg_sum(t: u32, v: f32) -> f32 {
    rs[t] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) { rs[t] = rs[t] + rs[t + s]; }
        workgroupBarrier();
    }
    let r = rs[0];
    workgroupBarrier();
    return r;
}

//!kernel softmax(x: in, y: out)
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let valid = row < pu(0u);
    let n = pu(1u);
    var vis = 0u;
    var cols = 0u;
    if (valid) {
        vis = visible(row);
        cols = n;
    }
    let base = row * n;
    var st = vec2<f32>(-3.4028235e38, 0.0);
    for (var j = t; j < vis; j = j + 256u) {
        let v = ld_x(base + j);
        if (v > st.x) {
            st = vec2<f32>(v, st.y * exp(st.x - v) + 1.0);
        } else {
            st.y = st.y + exp(v - st.x);
        }
    }
    let tot = wg_merge(t, st);
    let inv = 1.0 / tot.y;
    for (var j = t; j < cols; j = j + 256u) {
        var o = 0.0;
        if (j < vis) { o = exp(ld_x(base + j) - tot.x) * inv; }
        st_y(base + j, o);
    }
}

//!kernel softmax_backward(y: in, dy: in, dx: out)
// dx = y·(dy - Σ_j y·dy) over the visible columns, 0 elsewhere.
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let valid = row < pu(0u);
    let n = pu(1u);
    var vis = 0u;
    var cols = 0u;
    if (valid) {
        vis = visible(row);
        cols = n;
    }
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
