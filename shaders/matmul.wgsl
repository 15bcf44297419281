// Batched C = alpha·op(A)·op(B) + beta·C, row-major, f32 accumulation.
//
// Tiling: one 8×8 workgroup computes a 64×64 tile of C; invocation (tx, ty)
// owns the 8×8 block at rows 8·ty.., columns 8·tx.., kept in 16 vec4
// accumulators (constant indices only, so they stay in registers). K advances
// in slices of 16: the 64×16 slice of op(A) and the 16×64 slice of op(B) are
// loaded cooperatively (4 vec4 slots of each per invocation, zero-padded
// outside the matrices, slot order chosen per transpose so neighbouring
// invocations read neighbouring addresses) into workgroup memory stored
// k-major as vec4, so each k step reads 2 vec4 of A and 2 of B for 64 FMAs.
// Grid: (ceil(n/64), ceil(m/64), batch chunk ≤ 65535); z0 offsets the batch.
//
// Parameters: `MatmulParams` (mirrored in src/backend/wgpu/core_ops.rs);
// batch strides are in elements, sb = 0 broadcasts B.

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    trans_a: u32,
    trans_b: u32,
    sa: u32,
    sb: u32,
    sc: u32,
    alpha: f32,
    beta: f32,
    z0: u32,
}

const TM: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<vec4<f32>, 256>; // [kk][mm / 4]
var<workgroup> Bs: array<vec4<f32>, 256>; // [kk][nn / 4]

// op(A)[i, p] of the matrix at a0, 0 outside.
fn lda(a0: u32, i: u32, p: u32) -> f32 {
    let m = P.m;
    let k = P.k;
    if (i >= m || p >= k) { return 0.0; }
    if (P.trans_a == 1u) { return ld_a(a0 + p * m + i); }
    return ld_a(a0 + i * k + p);
}

// op(B)[p, j] of the matrix at b0, 0 outside.
fn ldb(b0: u32, p: u32, j: u32) -> f32 {
    let n = P.n;
    let k = P.k;
    if (j >= n || p >= k) { return 0.0; }
    if (P.trans_b == 1u) { return ld_b(b0 + j * k + p); }
    return ld_b(b0 + p * n + j);
}

//#if f16
// The f16 tiles of `mm_hw` when A and B are f16 and the device has
// SHADER_F16: half the workgroup memory, products in f16 (exact inputs, one
// f16 rounding per product), accumulated in f32 (DESIGN §3).
var<workgroup> AsH: array<vec4<f16>, 256>;
var<workgroup> BsH: array<vec4<f16>, 256>;

fn ldah(a0: u32, i: u32, p: u32) -> f16 {
    let m = P.m;
    let k = P.k;
    if (i >= m || p >= k) { return 0.0h; }
    if (P.trans_a == 1u) { return ldh_a(a0 + p * m + i); }
    return ldh_a(a0 + i * k + p);
}

fn ldbh(b0: u32, p: u32, j: u32) -> f16 {
    let n = P.n;
    let k = P.k;
    if (j >= n || p >= k) { return 0.0h; }
    if (P.trans_b == 1u) { return ldh_b(b0 + j * k + p); }
    return ldh_b(b0 + p * n + j);
}
//#endif

// Stores C[i, j0..j0+8] (C's matrix at c0) = alpha·(lo, hi) (+ beta·C), within bounds.
fn store8(c0: u32, i: u32, j0: u32, lo: vec4<f32>, hi: vec4<f32>, accumulate: bool) {
    let m = P.m;
    let n = P.n;
    if (i >= m) { return; }
    let base = c0 + i * n;
    for (var c = 0u; c < 8u; c = c + 1u) {
        let j = j0 + c;
        if (j < n) {
            var v: f32;
            if (c < 4u) { v = lo[c]; } else { v = hi[c - 4u]; }
            v = P.alpha * v;
            if (accumulate) { v = v + P.beta * ld_c(base + j); }
            st_c(base + j, v);
        }
    }
}

fn mm(l: vec3<u32>, w: vec3<u32>, accumulate: bool) {
    let m = P.m;
    let n = P.n;
    let k = P.k;
    let ta = P.trans_a == 1u;
    let tb = P.trans_b == 1u;
    let z = w.z + P.z0;
    let a0 = z * P.sa;
    let b0 = z * P.sb;
    let c0 = z * P.sc;
    let row0 = w.y * TM;
    let col0 = w.x * TM;
    let tid = l.y * 8u + l.x;

    var acc: array<vec4<f32>, 16>; // row r: acc[2r] = columns 0..3, acc[2r+1] = columns 4..7
    for (var q = 0u; q < 16u; q = q + 1u) { acc[q] = vec4<f32>(0.0); }

    let ntiles = (k + TK - 1u) / TK;
    for (var t = 0u; t < ntiles; t = t + 1u) {
        let k0 = t * TK;
        // 256 vec4 slots per slice, 4 per invocation; the slot order keeps
        // neighbouring invocations on neighbouring addresses.
        for (var q = 0u; q < 4u; q = q + 1u) {
            let sl = tid + 64u * q;
            var kk: u32;
            var mv: u32;
            if (ta) { kk = sl / 16u; mv = sl % 16u; } else { kk = sl % 16u; mv = sl / 16u; }
            let i = row0 + mv * 4u;
            As[kk * 16u + mv] = vec4<f32>(lda(a0, i, k0 + kk), lda(a0, i + 1u, k0 + kk),
                                          lda(a0, i + 2u, k0 + kk), lda(a0, i + 3u, k0 + kk));
            var kb: u32;
            var nv: u32;
            if (tb) { kb = sl % 16u; nv = sl / 16u; } else { kb = sl / 16u; nv = sl % 16u; }
            let j = col0 + nv * 4u;
            Bs[kb * 16u + nv] = vec4<f32>(ldb(b0, k0 + kb, j), ldb(b0, k0 + kb, j + 1u),
                                          ldb(b0, k0 + kb, j + 2u), ldb(b0, k0 + kb, j + 3u));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            let a_lo = As[kk * 16u + l.y * 2u];
            let a_hi = As[kk * 16u + l.y * 2u + 1u];
            let b_lo = Bs[kk * 16u + l.x * 2u];
            let b_hi = Bs[kk * 16u + l.x * 2u + 1u];
            acc[0] = acc[0] + a_lo.x * b_lo;
            acc[1] = acc[1] + a_lo.x * b_hi;
            acc[2] = acc[2] + a_lo.y * b_lo;
            acc[3] = acc[3] + a_lo.y * b_hi;
            acc[4] = acc[4] + a_lo.z * b_lo;
            acc[5] = acc[5] + a_lo.z * b_hi;
            acc[6] = acc[6] + a_lo.w * b_lo;
            acc[7] = acc[7] + a_lo.w * b_hi;
            acc[8] = acc[8] + a_hi.x * b_lo;
            acc[9] = acc[9] + a_hi.x * b_hi;
            acc[10] = acc[10] + a_hi.y * b_lo;
            acc[11] = acc[11] + a_hi.y * b_hi;
            acc[12] = acc[12] + a_hi.z * b_lo;
            acc[13] = acc[13] + a_hi.z * b_hi;
            acc[14] = acc[14] + a_hi.w * b_lo;
            acc[15] = acc[15] + a_hi.w * b_hi;
        }
        workgroupBarrier();
    }

    let i0 = row0 + l.y * 8u;
    let j0 = col0 + l.x * 8u;
    store8(c0, i0, j0, acc[0], acc[1], accumulate);
    store8(c0, i0 + 1u, j0, acc[2], acc[3], accumulate);
    store8(c0, i0 + 2u, j0, acc[4], acc[5], accumulate);
    store8(c0, i0 + 3u, j0, acc[6], acc[7], accumulate);
    store8(c0, i0 + 4u, j0, acc[8], acc[9], accumulate);
    store8(c0, i0 + 5u, j0, acc[10], acc[11], accumulate);
    store8(c0, i0 + 6u, j0, acc[12], acc[13], accumulate);
    store8(c0, i0 + 7u, j0, acc[14], acc[15], accumulate);
}

// The hardware-GPU variant: one 16×16 workgroup (256 invocations) per 64×64
// tile of C, invocation (tx, ty) owning the 4×4 block at rows 4·ty..,
// columns 4·tx.. in four vec4 accumulators; the same K slices of 16 through
// the same workgroup tiles, one vec4 slot of each per invocation. Each
// element is still t = t + a·b over p in order, so results match the
// software variant's and no row depends on another. With f16 A and B on a
// SHADER_F16 device the tiles hold f16 and each product a·b is an f16
// multiply (widened to f32 for the sum), so f16 results differ from the
// software variant's by one f16 rounding per product.
fn mm_hw(l: vec3<u32>, w: vec3<u32>, accumulate: bool) {
    let k = P.k;
    let ta = P.trans_a == 1u;
    let tb = P.trans_b == 1u;
    let z = w.z + P.z0;
    let a0 = z * P.sa;
    let b0 = z * P.sb;
    let c0 = z * P.sc;
    let row0 = w.y * TM;
    let col0 = w.x * TM;
    let sl = l.y * 16u + l.x;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let ntiles = (k + TK - 1u) / TK;
    for (var t = 0u; t < ntiles; t = t + 1u) {
        let k0 = t * TK;
        var kk: u32;
        var mv: u32;
        if (ta) { kk = sl / 16u; mv = sl % 16u; } else { kk = sl % 16u; mv = sl / 16u; }
        let i = row0 + mv * 4u;
        var kb: u32;
        var nv: u32;
        if (tb) { kb = sl % 16u; nv = sl / 16u; } else { kb = sl / 16u; nv = sl % 16u; }
        let j = col0 + nv * 4u;
//#if f16
        AsH[kk * 16u + mv] = vec4<f16>(ldah(a0, i, k0 + kk), ldah(a0, i + 1u, k0 + kk),
                                       ldah(a0, i + 2u, k0 + kk), ldah(a0, i + 3u, k0 + kk));
        BsH[kb * 16u + nv] = vec4<f16>(ldbh(b0, k0 + kb, j), ldbh(b0, k0 + kb, j + 1u),
                                       ldbh(b0, k0 + kb, j + 2u), ldbh(b0, k0 + kb, j + 3u));
//#else
        As[kk * 16u + mv] = vec4<f32>(lda(a0, i, k0 + kk), lda(a0, i + 1u, k0 + kk),
                                      lda(a0, i + 2u, k0 + kk), lda(a0, i + 3u, k0 + kk));
        Bs[kb * 16u + nv] = vec4<f32>(ldb(b0, k0 + kb, j), ldb(b0, k0 + kb, j + 1u),
                                      ldb(b0, k0 + kb, j + 2u), ldb(b0, k0 + kb, j + 3u));
//#endif
        workgroupBarrier();
        for (var q = 0u; q < TK; q = q + 1u) {
//#if f16
            let a = AsH[q * 16u + l.y];
            let bv = BsH[q * 16u + l.x];
            acc0 = acc0 + vec4<f32>(a.x * bv);
            acc1 = acc1 + vec4<f32>(a.y * bv);
            acc2 = acc2 + vec4<f32>(a.z * bv);
            acc3 = acc3 + vec4<f32>(a.w * bv);
//#else
            let a = As[q * 16u + l.y];
            let bv = Bs[q * 16u + l.x];
            acc0 = acc0 + a.x * bv;
            acc1 = acc1 + a.y * bv;
            acc2 = acc2 + a.z * bv;
            acc3 = acc3 + a.w * bv;
//#endif
        }
        workgroupBarrier();
    }
    let i0 = row0 + l.y * 4u;
    let j0 = col0 + l.x * 4u;
    store4(c0, i0, j0, acc0, accumulate);
    store4(c0, i0 + 1u, j0, acc1, accumulate);
    store4(c0, i0 + 2u, j0, acc2, accumulate);
    store4(c0, i0 + 3u, j0, acc3, accumulate);
}

// Stores C[i, j0..j0+4] = alpha·v (+ beta·C), within bounds.
fn store4(c0: u32, i: u32, j0: u32, v: vec4<f32>, accumulate: bool) {
    if (i >= P.m) { return; }
    let base = c0 + i * P.n;
    for (var c = 0u; c < 4u; c = c + 1u) {
        let j = j0 + c;
        if (j < P.n) {
            var x = P.alpha * v[c];
            if (accumulate) { x = x + P.beta * ld_c(base + j); }
            st_c(base + j, x);
        }
    }
}

//!kernel matmul(a: in, b: in, c: out) : MatmulParams
// beta == 0: C is write-only (NaN in it never leaks).
@compute @workgroup_size(8, 8)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>) {
    mm(l, w, false);
}

//!kernel matmul_acc(a: in, b: in, c: inout) : MatmulParams
@compute @workgroup_size(8, 8)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>) {
    mm(l, w, true);
}

//!kernel matmul_hw(a: in, b: in, c: out) : MatmulParams
@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>) {
    mm_hw(l, w, false);
}

//!kernel matmul_acc_hw(a: in, b: in, c: inout) : MatmulParams
@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>) {
    mm_hw(l, w, true);
}
