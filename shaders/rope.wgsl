// Rotary embedding, half-split convention; x is [batch, seq, heads, head_dim].
// One invocation per (vector, i < head_dim/2) pair; cos/sin are F32 tables
// [max_pos, head_dim/2]. The inverse rotation (backward) negates sin.
//
// Parameters: p0 = pairs (numel/2), p1 = half, p2 = heads, p3 = seq,
// p4 = pos_offset, p5 = inverse.

//!kernel rope(x: in, cos: in, sin: in, y: out)
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let p = lin(g, nw);
    if (p >= pu(0u)) { return; }
    let half = pu(1u);
    let v = p / half;
    let i = p % half;
    let pos = pu(4u) + (v / pu(2u)) % pu(3u);
    let c = ld_cos(pos * half + i);
    var sn = ld_sin(pos * half + i);
    if (pu(5u) == 1u) { sn = -sn; }
    let base = v * 2u * half;
    let a = ld_x(base + i);
    let b = ld_x(base + i + half);
    st_y(base + i, a * c - b * sn);
    st_y(base + i + half, a * sn + b * c);
}
