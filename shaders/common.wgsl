// Helpers shared by every shader family. Each `//!helper NAME` section is
// linked into a kernel's module when the kernel uses NAME and does not
// define it itself (src/backend/wgpu/kernel.rs), so a module carries only
// the helpers (and the workgroup memory) it needs.

//!helper neg_inf
// -inf, built from its bits: written to outputs only, never computed with
// (fast-math shader compilers need not honour infinities).
fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

//!helper NEG
// The lowest finite f32: the identity of max reductions without infinities.
const NEG: f32 = -3.4028235e38;

//!helper wg_index
// The workgroup's linear index in a grid folded into two dimensions.
fn wg_index(w: vec3<u32>, nw: vec3<u32>) -> u32 {
    return w.x + w.y * nw.x;
}

//!helper wg_sum
// Sum of `v` over a 256-invocation workgroup, in a fixed tree order (every
// invocation gets the result; call in uniform control flow).
var<workgroup> red_sum: array<f32, 256>;
fn wg_sum(t: u32, v: f32) -> f32 {
    red_sum[t] = v;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (t < w) { red_sum[t] = red_sum[t] + red_sum[t + w]; }
        workgroupBarrier();
    }
    let r = red_sum[0];
    workgroupBarrier();
    return r;
}

//!helper wg_reduce
// Sum (is_max false) or max (is_max true) of `v` over a 256-invocation
// workgroup, in a fixed tree order; call in uniform control flow.
var<workgroup> red: array<f32, 256>;
fn wg_reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (lid < w) {
            let a = red[lid];
            let o = red[lid + w];
            red[lid] = select(a + o, max(a, o), is_max);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
