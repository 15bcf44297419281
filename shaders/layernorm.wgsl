// LayerNorm over the last dimension, statistics in f32.
//
// Forward and the dx part of the backward pass: one 256-wide workgroup per
// row (rows folded over the x and y grid dimensions), strided loops over the
// columns and tree reductions in workgroup memory. dgamma/dbeta are column
// sums over rows, done deterministically in two passes: `ln_colpart` sums
// chunks of CHUNK rows per column into F32 partials, `ln_colsum` adds the
// partials of each column in chunk order to dgamma/dbeta.
//
// Parameters: typed structs mirrored in src/backend/wgpu/core_ops.rs; rows
// and n (columns) of x, eps (the forward's; the dx kernel ignores it), chunk
// rows of a partial. `wg_sum` is in shaders/common.wgsl.

struct LayerNormParams {
    rows: u32,
    n: u32,
    eps: f32,
}

struct LnColPartParams {
    rows: u32,
    n: u32,
    chunk: u32,
}

struct LnColSumParams {
    chunks: u32,
    n: u32,
}

var<workgroup> red: array<f32, 256>;
var<workgroup> red2: array<f32, 256>;

// Sums two values over the workgroup at once (every invocation gets the result).
fn wg_sum2(t: u32, a: f32, b: f32) -> vec2<f32> {
    red[t] = a;
    red2[t] = b;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) {
            red[t] = red[t] + red[t + s];
            red2[t] = red2[t] + red2[t + s];
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(red[0], red2[0]);
    workgroupBarrier();
    return r;
}

//!kernel layernorm(x: in, gamma: in, beta: in, y: out, mean: out, rstd: out) : LayerNormParams
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let valid = row < P.rows;
    let n = P.n;
    var cols = 0u;
    if (valid) { cols = n; }
    let base = row * n;
    var s = 0.0;
    for (var j = t; j < cols; j = j + 256u) { s = s + ld_x(base + j); }
    let mu = wg_sum(t, s) / f32(n);
    var q = 0.0;
    for (var j = t; j < cols; j = j + 256u) {
        let d = ld_x(base + j) - mu;
        q = q + d * d;
    }
    let rs = 1.0 / sqrt(wg_sum(t, q) / f32(n) + P.eps);
    for (var j = t; j < cols; j = j + 256u) {
        st_y(base + j, (ld_x(base + j) - mu) * rs * ld_gamma(j) + ld_beta(j));
    }
    if (valid && t == 0u) {
        st_mean(row, mu);
        st_rstd(row, rs);
    }
}

//!kernel layernorm_dx(dy: in, x: in, gamma: in, mean: in, rstd: in, dx: out) : LayerNormParams
// dx = rstd·(g - mean(g) - xhat·mean(g·xhat)), g = dy·gamma.
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let t = l.x;
    let row = wg_index(w, nw);
    let valid = row < P.rows;
    let n = P.n;
    var cols = 0u;
    var m = 0.0;
    var rs = 0.0;
    if (valid) {
        cols = n;
        m = ld_mean(row);
        rs = ld_rstd(row);
    }
    let base = row * n;
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = t; j < cols; j = j + 256u) {
        let xhat = (ld_x(base + j) - m) * rs;
        let gj = ld_dy(base + j) * ld_gamma(j);
        sg = sg + gj;
        sgx = sgx + gj * xhat;
    }
    let sums = wg_sum2(t, sg, sgx) / f32(n);
    for (var j = t; j < cols; j = j + 256u) {
        let xhat = (ld_x(base + j) - m) * rs;
        st_dx(base + j, rs * (ld_dy(base + j) * ld_gamma(j) - sums.x - xhat * sums.y));
    }
}

//!kernel ln_colpart(dy: in, x: in, mean: in, rstd: in, part: out) : LnColPartParams
// part[c, j] = Σ_{r in chunk c} dy·xhat, part[chunks + c, j] = Σ dy.
// Grid: (columns folded, chunks) — one invocation per (chunk, column).
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let j = g.x;
    let c = g.y;
    let rows = P.rows;
    let n = P.n;
    let chunk = P.chunk;
    if (j >= n) { return; }
    let nchunks = (rows + chunk - 1u) / chunk;
    let r1 = min(rows, (c + 1u) * chunk);
    var a = 0.0;
    var b = 0.0;
    for (var r = c * chunk; r < r1; r = r + 1u) {
        let d = ld_dy(r * n + j);
        let xhat = (ld_x(r * n + j) - ld_mean(r)) * ld_rstd(r);
        a = a + d * xhat;
        b = b + d;
    }
    st_part(c * n + j, a);
    st_part((nchunks + c) * n + j, b);
}

//!kernel ln_colsum(part: in, dgamma: inout, dbeta: inout) : LnColSumParams
// dgamma[j] += Σ_c part[c, j], dbeta[j] += Σ_c part[chunks + c, j].
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let j = lin(g, nw);
    let chunks = P.chunks;
    let n = P.n;
    if (j >= n) { return; }
    var a = 0.0;
    var b = 0.0;
    for (var c = 0u; c < chunks; c = c + 1u) {
        a = a + ld_part(c * n + j);
        b = b + ld_part((chunks + c) * n + j);
    }
    st_dgamma(j, ld_dgamma(j) + a);
    st_dbeta(j, ld_dbeta(j) + b);
}
