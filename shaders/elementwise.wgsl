// Element-wise ops (fill, add, axpby, scale, bias add, cast; column sums are in reduce.wgsl) and
// the half-precision pack/unpack passes every f16/bf16 output goes through.
// Parameters: typed structs mirrored in src/backend/wgpu/core_ops.rs (`CountParams`
// and `BiasParams` are in shaders/common.wgsl); n is the element count.

struct HalfParams {
    n: u32,
    bf16: u32,
}

struct ScalarParams {
    n: u32,
    value: f32,
}

struct AxpbyParams {
    n: u32,
    alpha: f32,
    beta: f32,
}

// bf16 bits of an f32, rounded to nearest even (NaN stays NaN).
fn to_bf16(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) { return 0x7fc0u; }
    return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}

// f16 bits of an f32, rounded to nearest even, overflow to infinity.
fn to_f16(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    let sign = (u >> 16u) & 0x8000u;
    let a = u & 0x7fffffffu;
    if (a > 0x7f800000u) { return sign | 0x7e00u; }
    if (a >= 0x477ff000u) { return sign | 0x7c00u; }
    if (a < 0x38800000u) {
        // subnormal (or zero) f16: value = m * 2^-24
        let v = bitcast<f32>(a) * 16777216.0;
        var m = u32(v);
        let r = v - f32(m);
        if (r > 0.5 || (r == 0.5 && (m & 1u) == 1u)) { m = m + 1u; }
        return sign | m;
    }
    let e = (a >> 23u) - 112u;
    let mant = a & 0x7fffffu;
    var h = (e << 10u) | (mant >> 13u);
    let rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u) == 1u)) { h = h + 1u; }
    return sign | h;
}

fn to_half(x: f32, bf: bool) -> u32 {
    if (bf) { return to_bf16(x); }
    return to_f16(x);
}

//!kernel pack_half(src: in, dst: idxout) : HalfParams
// n elements, bf16 = 1 for bf16 / 0 for f16. One invocation per u32 word.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let w = lin(g, nw);
    let n = P.n;
    if (w >= (n + 1u) / 2u) { return; }
    let bf = P.bf16 == 1u;
    let lo = to_half(ld_src(2u * w), bf);
    var hi = 0u;
    if (2u * w + 1u < n) { hi = to_half(ld_src(2u * w + 1u), bf); }
    stu_dst(w, lo | (hi << 16u));
}

//!kernel unpack_half(src: idx, dst: out) : HalfParams
// n elements, bf16 = 1 for bf16 / 0 for f16. One invocation per u32 word.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let w = lin(g, nw);
    let n = P.n;
    if (w >= (n + 1u) / 2u) { return; }
    let bits = ldu_src(w);
    var lo: f32;
    var hi: f32;
    if (P.bf16 == 1u) {
        lo = bf16_lo(bits);
        hi = bf16_hi(bits);
    } else {
        let v = unpack2x16float(bits);
        lo = v.x;
        hi = v.y;
    }
    st_dst(2u * w, lo);
    if (2u * w + 1u < n) { st_dst(2u * w + 1u, hi); }
}

//!kernel fill(x: out) : ScalarParams
// x = value
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_x(i, P.value);
}

//!kernel add(a: in, b: in, out: out) : CountParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_out(i, ld_a(i) + ld_b(i));
}

//!kernel axpby(x: in, y: inout) : AxpbyParams
// y = alpha*x + beta*y (y is not read when beta == 0).
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    var r = P.alpha * ld_x(i);
    if (P.beta != 0.0) { r = r + P.beta * ld_y(i); }
    st_y(i, r);
}

//!kernel axpy0(x: in, y: out) : AxpbyParams
// y = alpha*x (axpby with beta == 0: y is write-only, so NaNs in it do not leak).
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_y(i, P.alpha * ld_x(i));
}

//!kernel scale(x: inout) : ScalarParams
// x *= value
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_x(i, ld_x(i) * P.value);
}

//!kernel bias_add(x: inout, bias: in) : BiasParams
// n = rows·cols: x[r, j] += bias[j]
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_x(i, ld_x(i) + ld_bias(i % P.cols));
}

//!kernel cast(x: in, y: out) : CountParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_y(i, ld_x(i));
}
