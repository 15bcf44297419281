// GELU, tanh form: gelu(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
// Parameters: `CountParams` (bias_gelu: `BiasParams`, n = rows·cols, a bias of
// cols), both in shaders/common.wgsl. One invocation per element.

const S: f32 = 0.7978846;

// tanh of a clamped argument: |u| > 15 already rounds to ±1 in f32, and some
// drivers compute tanh through exp(2u), which overflows to NaN for large u.
fn tanh_c(u: f32) -> f32 {
    return tanh(clamp(u, -15.0, 15.0));
}

fn gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + tanh_c(S * (x + 0.044715 * x * x * x)));
}

fn gelu_grad(x: f32) -> f32 {
    let u = S * (x + 0.044715 * x * x * x);
    let t = tanh_c(u);
    let du = S * (1.0 + 3.0 * 0.044715 * x * x);
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
}

//!kernel gelu(x: in, y: out) : CountParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_y(i, gelu(ld_x(i)));
}

//!kernel gelu_backward(x: in, dy: in, dx: out) : CountParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_dx(i, ld_dy(i) * gelu_grad(ld_x(i)));
}

//!kernel bias_gelu(x: in, bias: in, y: out) : BiasParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_y(i, gelu(ld_x(i) + ld_bias(i % P.cols)));
}
