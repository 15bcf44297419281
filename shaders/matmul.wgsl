// Batched C = alpha·op(A)·op(B) + beta·C, row-major, f32 accumulation.
//
// Tiling: one 16×16 workgroup computes a 64×64 tile of C; invocation (tx, ty)
// owns rows ty + 16·r and columns tx + 16·c (r, c < 4), so stores of a row are
// contiguous across tx. K advances in slices of 16: the 64×16 slice of op(A)
// and the 16×64 slice of op(B) are loaded cooperatively (4 elements each per
// invocation, zero-padded outside the matrix) into workgroup memory, stored
// k-major so the inner loop reads one vec4 of A (broadcast) and one vec4 of B.
// Grid: (ceil(n/64), ceil(m/64), batch chunk); z0 offsets the batch index.
//
// Parameters: p0 = m, p1 = n, p2 = k, p3 = trans_a, p4 = trans_b,
// p5 = A batch stride, p6 = B batch stride (0: broadcast), p7 = C batch stride,
// p8 = alpha, p9 = beta, p10 = z0.

const TM: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // [kk][mm]
var<workgroup> Bs: array<f32, 1024>; // [kk][nn]

fn mm(l: vec3<u32>, w: vec3<u32>, accumulate: bool) {
    let m = pu(0u);
    let n = pu(1u);
    let k = pu(2u);
    let ta = pu(3u) == 1u;
    let tb = pu(4u) == 1u;
    let z = w.z + pu(10u);
    let a0 = z * pu(5u);
    let b0 = z * pu(6u);
    let c0 = z * pu(7u);
    let row0 = w.y * TM;
    let col0 = w.x * TM;
    let tid = l.y * 16u + l.x;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    let ntiles = (k + TK - 1u) / TK;
    for (var t = 0u; t < ntiles; t = t + 1u) {
        let k0 = t * TK;
        for (var q = 0u; q < 4u; q = q + 1u) {
            let idx = tid + 256u * q;
            // A slice: element (row0 + mm, k0 + kk)
            var mm_: u32;
            var kk: u32;
            if (ta) { kk = idx / TM; mm_ = idx % TM; } else { mm_ = idx / TK; kk = idx % TK; }
            let gi = row0 + mm_;
            let gk = k0 + kk;
            var av = 0.0;
            if (gi < m && gk < k) {
                if (ta) { av = ld_a(a0 + gk * m + gi); } else { av = ld_a(a0 + gi * k + gk); }
            }
            As[kk * TM + mm_] = av;
            // B slice: element (k0 + kk, col0 + nn)
            var nn: u32;
            var kb: u32;
            if (tb) { nn = idx / TK; kb = idx % TK; } else { kb = idx / TM; nn = idx % TM; }
            let gj = col0 + nn;
            let gkb = k0 + kb;
            var bv = 0.0;
            if (gj < n && gkb < k) {
                if (tb) { bv = ld_b(b0 + gj * k + gkb); } else { bv = ld_b(b0 + gkb * n + gj); }
            }
            Bs[kb * TM + nn] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            let o = kk * TM;
            let a = vec4<f32>(As[o + l.y], As[o + l.y + 16u], As[o + l.y + 32u], As[o + l.y + 48u]);
            let b = vec4<f32>(Bs[o + l.x], Bs[o + l.x + 16u], Bs[o + l.x + 32u], Bs[o + l.x + 48u]);
            acc0 = acc0 + a.x * b;
            acc1 = acc1 + a.y * b;
            acc2 = acc2 + a.z * b;
            acc3 = acc3 + a.w * b;
        }
        workgroupBarrier();
    }

    let alpha = pf(8u);
    let beta = pf(9u);
    for (var r = 0u; r < 4u; r = r + 1u) {
        let i = row0 + l.y + 16u * r;
        if (i < m) {
            var accr: vec4<f32>;
            switch r {
                case 0u: { accr = acc0; }
                case 1u: { accr = acc1; }
                case 2u: { accr = acc2; }
                default: { accr = acc3; }
            }
            for (var c = 0u; c < 4u; c = c + 1u) {
                let j = col0 + l.x + 16u * c;
                if (j < n) {
                    let ci = c0 + i * n + j;
                    var v = alpha * accr[c];
                    if (accumulate) { v = v + beta * ld_c(ci); }
                    st_c(ci, v);
                }
            }
        }
    }
}

//!kernel matmul(a: in, b: in, c: out)
// beta == 0: C is write-only (NaN in it never leaks).
@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>) {
    mm(l, w, false);
}

//!kernel matmul_acc(a: in, b: in, c: inout)
@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>) {
    mm(l, w, true);
}
