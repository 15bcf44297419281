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

//!helper lse_merge
// Merges online softmax statistics (m, s), s = Σ exp(x - m); m == NEG means
// no element yet.
fn lse_merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    if (m == NEG) { return vec2<f32>(m, 0.0); }
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

//!helper lse_push
// Adds element `v` to the online softmax statistics (m, s) of `st`; start
// from vec2(NEG, 0.0).
fn lse_push(st: vec2<f32>, v: f32) -> vec2<f32> {
    if (v > st.x) {
        return vec2<f32>(v, st.y * exp(st.x - v) + 1.0);
    }
    return vec2<f32>(st.x, st.y + exp(v - st.x));
}

//!helper wg_lse_merge
// `lse_merge` of every invocation's (m, s) over a 256-invocation workgroup,
// in a fixed tree order (every invocation gets the result; call in uniform
// control flow).
var<workgroup> red_m: array<f32, 256>;
var<workgroup> red_s: array<f32, 256>;
fn wg_lse_merge(t: u32, v: vec2<f32>) -> vec2<f32> {
    red_m[t] = v.x;
    red_s[t] = v.y;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (t < w) {
            let r = lse_merge(vec2<f32>(red_m[t], red_s[t]), vec2<f32>(red_m[t + w], red_s[t + w]));
            red_m[t] = r.x;
            red_s[t] = r.y;
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(red_m[0], red_s[0]);
    workgroupBarrier();
    return r;
}

//!helper wg_min_u32
// Minimum of `v` over a 256-invocation workgroup (every invocation gets the
// result; call in uniform control flow).
var<workgroup> red_u: array<u32, 256>;
fn wg_min_u32(t: u32, v: u32) -> u32 {
    red_u[t] = v;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (t < w) { red_u[t] = min(red_u[t], red_u[t + w]); }
        workgroupBarrier();
    }
    let r = red_u[0];
    workgroupBarrier();
    return r;
}

// Parameter structs shared by several shader files (mirrored by the Rust
// structs of the same names, see src/backend/wgpu/core_ops.rs and
// attention.rs); linked like any helper where a kernel header names one.

//!helper CountParams
// Kernels that take only an element count (or a count of partials).
struct CountParams {
    n: u32,
}

//!helper BiasParams
// `bias_add` / `bias_gelu`: n = rows·cols elements, a bias of `cols`.
struct BiasParams {
    n: u32,
    cols: u32,
}

//!helper AttnParams
// The attention kernels of attention.wgsl and their combination in
// split.wgsl: the attention spec (mode 0 dense, 1 tokens, 2 blocks; kn = k
// or n; nkb = ceil(seq / block)), the loop split (chunk, nch) and the
// launch's rows (r0, nrow).
struct AttnParams {
    batch: u32,
    seq: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    mode: u32,
    kn: u32,
    block: u32,
    nkb: u32,
    chunk: u32,
    nch: u32,
    r0: u32,
    nrow: u32,
}

//!helper AttnTiledParams
// [`AttnParams`] plus the query tiles of the tiled kernels: tq queries per
// tile, tiles tile0 .. tile0 + ntile, unit keys per unit.
struct AttnTiledParams {
    batch: u32,
    seq: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    mode: u32,
    kn: u32,
    block: u32,
    nkb: u32,
    chunk: u32,
    nch: u32,
    r0: u32,
    nrow: u32,
    tq: u32,
    tile0: u32,
    ntile: u32,
    unit: u32,
}
