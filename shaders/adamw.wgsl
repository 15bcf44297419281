// AdamW on f32 master weights and moments, one invocation per element.
// `adamw_copy` also writes the updated weight into a copy of any float dtype.
//
// Parameters: p0 = n, p1 = lr, p2 = beta1, p3 = beta2, p4 = eps,
// p5 = weight_decay, p6 = bc1, p7 = bc2, p8 = grad_scale.

// Updates element i of p, m, v and returns the new weight.
fn step(i: u32) -> f32 {
    let b1 = pf(2u);
    let b2 = pf(3u);
    let g = ld_grads(i) * pf(8u);
    let m = b1 * ld_m(i) + (1.0 - b1) * g;
    let v = b2 * ld_v(i) + (1.0 - b2) * g * g;
    let p = ld_params(i);
    let update = (m * pf(6u)) / (sqrt(v * pf(7u)) + pf(4u)) + pf(5u) * p;
    let np = p - pf(1u) * update;
    st_m(i, m);
    st_v(i, v);
    st_params(i, np);
    return np;
}

//!kernel adamw(params: inout, grads: in, m: inout, v: inout)
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= pu(0u)) { return; }
    _ = step(i);
}

//!kernel adamw_copy(params: inout, grads: in, m: inout, v: inout, copy: out)
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = lin(g, nw);
    if (i >= pu(0u)) { return; }
    st_copy(i, step(i));
}
