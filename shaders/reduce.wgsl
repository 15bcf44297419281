// Whole-tensor reductions in two passes: a first kernel of G ≤ 256 workgroups
// (256 invocations each, grid-stride over the tensor) writes one partial per
// workgroup, a second single-workgroup kernel combines the G partials.
// Tree reductions in workgroup memory keep the order fixed (deterministic).
//
// Parameters: `CountParams` (shaders/common.wgsl), n = the element count
// (first pass) or G (second pass); the column sums take their own structs
// (src/backend/wgpu/core_ops.rs). `wg_sum` and `wg_min_u32` are in
// shaders/common.wgsl.

struct SumRowsPartParams {
    n: u32,
    rows: u32,
    chunk: u32,
}

struct SumRowsFinalParams {
    n: u32,
    chunks: u32,
    beta: f32,
}

//!kernel sum_squares_part(x: in, part: out) : CountParams
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let n = P.n;
    let stride = nw.x * 256u;
    var s = 0.0;
    for (var i = w.x * 256u + l.x; i < n; i = i + stride) {
        let v = ld_x(i);
        s = s + v * v;
    }
    let r = wg_sum(l.x, s);
    if (l.x == 0u) { st_part(w.x, r); }
}

//!kernel sum_squares_final(part: in, out: out) : CountParams
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>) {
    var s = 0.0;
    if (l.x < P.n) { s = ld_part(l.x); }
    let r = wg_sum(l.x, s);
    if (l.x == 0u) { st_out(0u, r); }
}

//!kernel all_finite_part(x: in, part: idxout) : CountParams
// Inf and NaN are detected from the exponent bits.
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let n = P.n;
    let stride = nw.x * 256u;
    var ok = 1u;
    for (var i = w.x * 256u + l.x; i < n; i = i + stride) {
        if ((bitcast<u32>(ld_x(i)) & 0x7f800000u) == 0x7f800000u) { ok = 0u; }
    }
    let r = wg_min_u32(l.x, ok);
    if (l.x == 0u) { stu_part(w.x, r); }
}

//!kernel all_finite_final(part: idx, out: idxout) : CountParams
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>) {
    var ok = 1u;
    if (l.x < P.n) { ok = ldu_part(l.x); }
    let r = wg_min_u32(l.x, ok);
    if (l.x == 0u) { stu_out(0u, r); }
}

// Column sums of a [rows, n] matrix, split over the rows so no invocation
// loops over all of them (a long single dispatch trips the Windows TDR and
// the macOS watchdog): `sum_rows_part` sums each chunk of `chunk` rows per
// column, Kahan-compensated, into f32 partials; `sum_rows_final` adds the
// partials of each column in chunk order (deterministic) and beta·out.

//!kernel sum_rows_part(x: in, part: out) : SumRowsPartParams
// Grid (ceil(n/256), chunks):
// part[c·n + j] = Σ_{r ∈ [c·chunk, min((c+1)·chunk, rows))} x[r, j].
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>) {
    let n = P.n;
    let j = g.x;
    if (j >= n) { return; }
    let r0 = w.y * P.chunk;
    let r1 = min(r0 + P.chunk, P.rows);
    var s = 0.0;
    var c = 0.0;
    for (var r = r0; r < r1; r = r + 1u) {
        let y = ld_x(r * n + j) - c;
        let t = s + y;
        c = (t - s) - y;
        s = t;
    }
    st_part(w.y * n + j, s);
}

//!kernel sum_rows_final(part: in, out: inout) : SumRowsFinalParams
// out[j] = Σ_c part[c·n + j] + beta·out[j].
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let j = lin(g, nw);
    let n = P.n;
    if (j >= n) { return; }
    var s = 0.0;
    var c = 0.0;
    for (var k = 0u; k < P.chunks; k = k + 1u) {
        let y = ld_part(k * n + j) - c;
        let t = s + y;
        c = (t - s) - y;
        s = t;
    }
    if (P.beta != 0.0) { s = s + P.beta * ld_out(j); }
    st_out(j, s);
}
