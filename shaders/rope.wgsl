// Rotary embedding, half-split convention; x is [batch, seq, heads, head_dim].
// One invocation per (vector, i < head_dim/2) pair; cos/sin are F32 tables
// [max_pos, head_dim/2]. The inverse rotation (backward) negates sin.
//
// Parameters: `RopeParams` (src/backend/wgpu/core_ops.rs): pairs = numel / 2,
// half = head_dim / 2, heads, seq, pos_offset, inverse (1: negate sin).

struct RopeParams {
    pairs: u32,
    half: u32,
    heads: u32,
    seq: u32,
    pos_offset: u32,
    inverse: u32,
}

//!kernel rope(x: in, cos: in, sin: in, y: out) : RopeParams
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let p = lin(g, nw);
    if (p >= P.pairs) { return; }
    let half = P.half;
    let v = p / half;
    let i = p % half;
    let pos = P.pos_offset + (v / P.heads) % P.seq;
    let c = ld_cos(pos * half + i);
    var sn = ld_sin(pos * half + i);
    if (P.inverse == 1u) { sn = -sn; }
    let base = v * 2u * half;
    let a = ld_x(base + i);
    let b = ld_x(base + i + half);
    st_y(base + i, a * c - b * sn);
    st_y(base + i + half, a * sn + b * c);
}
