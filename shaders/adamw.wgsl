// AdamW on f32 master weights and moments, one invocation per element.
// `adamw_copy` also writes the updated weight into a copy of any float dtype.
//
// Parameters: `AdamWParams` (mirrored in src/backend/wgpu/core_ops.rs); bc1
// and bc2 are the bias corrections, grad_scale multiplies the gradient.

struct AdamWParams {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
    grad_scale: f32,
}

// Updates element i of p, m, v and returns the new weight.
fn step(i: u32) -> f32 {
    let b1 = P.beta1;
    let b2 = P.beta2;
    let g = ld_grads(i) * P.grad_scale;
    let m = b1 * ld_m(i) + (1.0 - b1) * g;
    let v = b2 * ld_v(i) + (1.0 - b2) * g * g;
    let p = ld_params(i);
    let update = (m * P.bc1) / (sqrt(v * P.bc2) + P.eps) + P.weight_decay * p;
    let np = p - P.lr * update;
    st_m(i, m);
    st_v(i, v);
    st_params(i, np);
    return np;
}

//!kernel adamw(params: inout, grads: in, m: inout, v: inout) : AdamWParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    _ = step(i);
}

//!kernel adamw_copy(params: inout, grads: in, m: inout, v: inout, copy: out) : AdamWParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= P.n) { return; }
    st_copy(i, step(i));
}
