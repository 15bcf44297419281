// Whole-tensor reductions in two passes: a first kernel of G ≤ 256 workgroups
// (256 invocations each, grid-stride over the tensor) writes one partial per
// workgroup, a second single-workgroup kernel combines the G partials.
// Tree reductions in workgroup memory keep the order fixed (deterministic).
//
// Parameters: p0 = n (first pass) or G (second pass).

var<workgroup> red: array<f32, 256>;
var<workgroup> redu: array<u32, 256>;

fn wg_sum(t: u32, v: f32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) { red[t] = red[t] + red[t + s]; }
        workgroupBarrier();
    }
    return red[0];
}

fn wg_min(t: u32, v: u32) -> u32 {
    redu[t] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) { redu[t] = min(redu[t], redu[t + s]); }
        workgroupBarrier();
    }
    return redu[0];
}

//!kernel sum_squares_part(x: in, part: out)
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let n = pu(0u);
    let stride = nw.x * 256u;
    var s = 0.0;
    for (var i = w.x * 256u + l.x; i < n; i = i + stride) {
        let v = ld_x(i);
        s = s + v * v;
    }
    let r = wg_sum(l.x, s);
    if (l.x == 0u) { st_part(w.x, r); }
}

//!kernel sum_squares_final(part: in, out: out)
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>) {
    var s = 0.0;
    if (l.x < pu(0u)) { s = ld_part(l.x); }
    let r = wg_sum(l.x, s);
    if (l.x == 0u) { st_out(0u, r); }
}

//!kernel all_finite_part(x: in, part: idxout)
// Inf and NaN are detected from the exponent bits.
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let n = pu(0u);
    let stride = nw.x * 256u;
    var ok = 1u;
    for (var i = w.x * 256u + l.x; i < n; i = i + stride) {
        if ((bitcast<u32>(ld_x(i)) & 0x7f800000u) == 0x7f800000u) { ok = 0u; }
    }
    let r = wg_min(l.x, ok);
    if (l.x == 0u) { stu_part(w.x, r); }
}

//!kernel all_finite_final(part: idx, out: idxout)
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) l: vec3<u32>) {
    var ok = 1u;
    if (l.x < pu(0u)) { ok = ldu_part(l.x); }
    let r = wg_min(l.x, ok);
    if (l.x == 0u) { stu_out(0u, r); }
}
