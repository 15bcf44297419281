// y = x · Wᵀ with a quantized weight W [n, k] (layouts and the exact
// dequantization rule: src/quant/format.rs), x [m, k] in any float dtype,
// f32 accumulation, y rounded once to x's dtype (by pack_half for f16/bf16).
//
// The k loop is cut into units of four inputs (p = 4u .. 4u+3; every format's
// k is a multiple of 4). Invocation t of the QT = 64 of a workgroup owns the
// units u ≡ t (mod 64) and sums, for each output it holds, in increasing u
// and, within a unit, increasing p:  acc = fma(x[i][p], w[j][p], acc).  The 64
// partials of an output are then added in one fixed order, t = 0, 1, …, 63.
// That order depends on k only, never on m or on which rows or
// channels share a workgroup, and one kernel (qmm) serves every m, a decode
// row included: the same pipeline, so the same instructions per element on
// every driver, and a row computed alone has the bits of the same row in any
// batch. (Two pipelines, a GEMV and a GEMM, could be compiled differently:
// WGSL's `fma` and plain `a * b + c` may each be fused or not, per driver.)
//
// w[j][p] is dequantized in the loop exactly as the rule says: one f32 multiply
// scale · (small integer), or the f16 value widened (unpack2x16float). Integer
// dot products (dot4I8Packed) would change that rounding (x is float and the
// rule multiplies scale·q in f32 before the product with x), so they are not
// used: the result would no longer be the defined one.
//
// Parameters (`QmmParams`, mirrored in src/backend/wgpu/qmatmul.rs): m, n, k,
// format (0 int8, 1 int4 symmetric, 2 int4 asymmetric, 3 2:4 with f16
// values, 4 2:4 with int8 values), group = int4 group size, row0 (the first
// row of this launch).
// Arguments: `scale` is f32 (a one-element dummy for 2:4 f16); `aux` is the
// zero points (int4 asym) or the 2:4 positions, `q` itself when unused.
// Grid: x, y fold the channel tiles (4 channels each, tile = w.x + w.y·nw.x);
// z is the 8-row tile relative to row0.

struct QmmParams {
    m: u32,
    n: u32,
    k: u32,
    format: u32,
    group: u32,
    row0: u32,
}

const QT: u32 = 64u;
const QMM_ROWS: u32 = 8u;

// Partials of every invocation, QT × (rows per workgroup) vec4 (4 channels).
var<workgroup> red: array<vec4<f32>, 512>;

// Byte b of w as a signed integer (two's complement), in f32.
fn sbyte(w: u32, b: u32) -> f32 {
    return f32(bitcast<i32>(w << (24u - 8u * b)) >> 24u);
}

fn nib(w: u32, e: u32) -> u32 {
    return (w >> (4u * e)) & 15u;
}

// w[j][4u .. 4u+3], dequantized by the rule.
fn deq(j: u32, u: u32) -> vec4<f32> {
    let k = P.k;
    let fmt = P.format;
    if (fmt == 0u) {
        let w = ldu_q(j * (k / 4u) + u);
        let s = ld_scale(j);
        return vec4<f32>(s * sbyte(w, 0u), s * sbyte(w, 1u), s * sbyte(w, 2u), s * sbyte(w, 3u));
    }
    if (fmt <= 2u) {
        let g = P.group;
        // Nibbles 4(u%2) .. 4(u%2)+3 of word u/2.
        let w = ldu_q(j * (k / 8u) + u / 2u) >> (16u * (u & 1u));
        let gi = (4u * u) / g;
        let s = ld_scale(j * (k / g) + gi);
        var z = 8i;
        if (fmt == 2u) {
            let zw = (k / g + 7u) / 8u;
            z = i32(nib(ldu_aux(j * zw + gi / 8u), gi % 8u));
        }
        return vec4<f32>(s * f32(i32(nib(w, 0u)) - z), s * f32(i32(nib(w, 1u)) - z),
                         s * f32(i32(nib(w, 2u)) - z), s * f32(i32(nib(w, 3u)) - z));
    }
    // 2:4: group u keeps positions a < b (nibble u%8 of word u/8 of the row's metadata).
    let pos = nib(ldu_aux(j * ((k + 31u) / 32u) + u / 8u), u % 8u);
    var lo: f32;
    var hi: f32;
    if (fmt == 3u) {
        let h = unpack2x16float(ldu_q(j * (k / 4u) + u));
        lo = h.x;
        hi = h.y;
    } else {
        let w = ldu_q(j * (k / 8u) + u / 2u);
        let s = ld_scale(j);
        let b = 2u * (u & 1u);
        lo = s * sbyte(w, b);
        hi = s * sbyte(w, b + 1u);
    }
    var r = vec4<f32>(0.0);
    r[pos & 3u] = lo;
    r[pos >> 2u] = hi;
    return r;
}

// x[i][4u .. 4u+3].
fn xunit(i: u32, u: u32) -> vec4<f32> {
    let o = i * P.k + 4u * u;
    return vec4<f32>(ld_x(o), ld_x(o + 1u), ld_x(o + 2u), ld_x(o + 3u));
}

// The four channels' weights of one unit, transposed: wt[e] = (w_c[e] for c = 0..3).
struct Unit { e0: vec4<f32>, e1: vec4<f32>, e2: vec4<f32>, e3: vec4<f32> }

fn unit_w(j0: u32, u: u32) -> Unit {
    let n = P.n;
    let w0 = deq(j0, u);
    let w1 = deq(min(j0 + 1u, n - 1u), u);
    let w2 = deq(min(j0 + 2u, n - 1u), u);
    let w3 = deq(min(j0 + 3u, n - 1u), u);
    return Unit(vec4<f32>(w0.x, w1.x, w2.x, w3.x), vec4<f32>(w0.y, w1.y, w2.y, w3.y),
                vec4<f32>(w0.z, w1.z, w2.z, w3.z), vec4<f32>(w0.w, w1.w, w2.w, w3.w));
}

// acc (4 channels) += x · w over the unit's inputs, in increasing p.
fn fma_unit(acc: vec4<f32>, x: vec4<f32>, w: Unit) -> vec4<f32> {
    var a = fma(vec4<f32>(x.x), w.e0, acc);
    a = fma(vec4<f32>(x.y), w.e1, a);
    a = fma(vec4<f32>(x.z), w.e2, a);
    return fma(vec4<f32>(x.w), w.e3, a);
}

// Stores the outputs of the workgroup: invocation t < 4·rows owns channel
// j0 + t % 4 of row i0 + t / 4 and adds that output's QT partials
// red[t'·rows + r] in the fixed order t' = 0, 1, …, 63 (one barrier; a tree
// would need six, each costly where barriers are emulated, as on lavapipe).
// Call from uniform control flow.
fn reduce_store(t: u32, i0: u32, rows: u32, j0: u32) {
    workgroupBarrier();
    let m = P.m;
    let n = P.n;
    let r = t / 4u;
    let c = t % 4u;
    let i = i0 + r;
    let j = j0 + c;
    if (r < rows && i < m && j < n) {
        var sum = red[r][c];
        for (var s = 1u; s < QT; s = s + 1u) {
            sum = sum + red[s * rows + r][c];
        }
        st_y(i * n + j, sum);
    }
}

// ---------------------------------------------------------------- hardware variant
// `qmm_hw` / `qmm_hw_sg` (KernelVariant::Hardware): the tile of `qmm` (four
// channels, up to eight rows) on QH = 256 invocations, for GPUs whose SIMD
// lanes a 64-wide workgroup leaves idle. Invocation t owns the units
// u ≡ t (mod 256) and accumulates exactly as `qmm` does (fma in increasing u
// and p); the 256 partials of an output are then added by a fixed tree in
// workgroup memory (`qmm_hw`) or by `subgroupAdd` and a sum of the subgroups'
// results in subgroup order (`qmm_hw_sg`, where the adapter has SUBGROUP).
// Either order depends on k and the adapter only, never on m or on the
// rows sharing a workgroup, and one pipeline serves every m, a decode row
// included: a row alone has the bits of the same row in any batch, per
// variant (the variants differ from each other and from `qmm` in the last
// bits, all within the reference tolerance).
//
// With f16 x on a SHADER_F16 device the hardware variants multiply in f16:
// the unit's dequantized weights (the rule's f32 values) are rounded to f16
// once per unit, each x·w is an f16 product, and the products are added in
// f32 in the same order (one extra rounding of w and one per product: f16
// results differ from the f32-product ones by a few f16 ulps; a product past
// 65 504 overflows, as in `matmul_hw`). Only `xunit_h` / `fma_unit_h` differ;
// `qmm` never calls them, so its arithmetic is the same with or without f16.
const QH: u32 = 256u;

//#if f16
alias XH = vec4<f16>;
struct UnitH { e0: vec4<f16>, e1: vec4<f16>, e2: vec4<f16>, e3: vec4<f16> }

fn xunit_h(i: u32, u: u32) -> XH {
    let o = i * P.k + 4u * u;
    return XH(ldh_x(o), ldh_x(o + 1u), ldh_x(o + 2u), ldh_x(o + 3u));
}

fn unit_h(j0: u32, u: u32) -> UnitH {
    let w = unit_w(j0, u);
    return UnitH(vec4<f16>(w.e0), vec4<f16>(w.e1), vec4<f16>(w.e2), vec4<f16>(w.e3));
}

// acc += x·w over the unit's inputs: f16 products, f32 sums in increasing p.
fn fma_unit_h(acc: vec4<f32>, x: XH, w: UnitH) -> vec4<f32> {
    var a = acc + vec4<f32>(x.x * w.e0);
    a = a + vec4<f32>(x.y * w.e1);
    a = a + vec4<f32>(x.z * w.e2);
    return a + vec4<f32>(x.w * w.e3);
}
//#else
fn xunit_h(i: u32, u: u32) -> vec4<f32> { return xunit(i, u); }
fn unit_h(j0: u32, u: u32) -> Unit { return unit_w(j0, u); }
fn fma_unit_h(acc: vec4<f32>, x: vec4<f32>, w: Unit) -> vec4<f32> { return fma_unit(acc, x, w); }
//#endif

// The partials of invocation t for the rows i0 .. i0 + rows of channels j0 .. j0 + 3.
fn qmm_hw_acc(t: u32, i0: u32, rows: u32, j0: u32) -> array<vec4<f32>, 8> {
    var acc: array<vec4<f32>, 8>;
    for (var r = 0u; r < QMM_ROWS; r = r + 1u) { acc[r] = vec4<f32>(0.0); }
    let nu = P.k / 4u;
    for (var u = t; u < nu; u = u + QH) {
        let wu = unit_h(j0, u);
        for (var r = 0u; r < QMM_ROWS; r = r + 1u) {
            if (r < rows) {
                acc[r] = fma_unit_h(acc[r], xunit_h(i0 + r, u), wu);
            }
        }
    }
    return acc;
}


//!kernel qmm(x: in, q: idx, scale: in, aux: idx, y: out) : QmmParams
// Up to eight rows (tile z after row0) and four channels per workgroup: each
// dequantized weight unit serves every row of the tile. The tile's row count
// only gates which unrolled row slots run, so a decode row (m = 1) does one
// row's work, and its arithmetic is the same instructions as in any batch.
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) l: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let m = P.m;
    let n = P.n;
    let j0 = (w.x + w.y * nw.x) * 4u;
    let i0 = P.row0 + w.z * QMM_ROWS;
    if (j0 >= n || i0 >= m) { return; }
    let rows = min(QMM_ROWS, m - i0);
    let t = l.x;
    let nu = P.k / 4u;
    var acc: array<vec4<f32>, 8>;
    for (var r = 0u; r < QMM_ROWS; r = r + 1u) { acc[r] = vec4<f32>(0.0); }
    for (var u = t; u < nu; u = u + QT) {
        let wu = unit_w(j0, u);
        for (var r = 0u; r < QMM_ROWS; r = r + 1u) {
            if (r < rows) {
                acc[r] = fma_unit(acc[r], xunit(i0 + r, u), wu);
            }
        }
    }
    for (var r = 0u; r < QMM_ROWS; r = r + 1u) { red[t * QMM_ROWS + r] = acc[r]; }
    reduce_store(t, i0, QMM_ROWS, j0);
}

//!kernel qmm_hw(x: in, q: idx, scale: in, aux: idx, y: out) : QmmParams
// Workgroup-memory reduction: per row of the tile, a tree over the 256
// partials (eight halving steps).
var<workgroup> hred: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>) {
    let m = P.m;
    let n = P.n;
    let j0 = (w.x + w.y * nw.x) * 4u;
    let i0 = P.row0 + w.z * QMM_ROWS;
    if (j0 >= n || i0 >= m) { return; }
    let rows = min(QMM_ROWS, m - i0);
    let acc = qmm_hw_acc(t, i0, rows, j0);
    for (var r = 0u; r < rows; r = r + 1u) {
        hred[t] = acc[r];
        workgroupBarrier();
        for (var s = QH / 2u; s > 0u; s = s >> 1u) {
            if (t < s) { hred[t] = hred[t] + hred[t + s]; }
            workgroupBarrier();
        }
        if (t < 4u && j0 + t < n) { st_y((i0 + r) * n + j0 + t, hred[0][t]); }
        workgroupBarrier();
    }
}

//!kernel qmm_hw_sg(x: in, q: idx, scale: in, aux: idx, y: out) : QmmParams
// Subgroup reduction: `subgroupAdd` per row, the subgroups' sums to workgroup
// memory (at most 256 / 8 subgroups: the backend takes this kernel only with
// subgroups of at least 8), added in subgroup order by the storing invocation.
var<workgroup> sgred: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) w: vec3<u32>,
        @builtin(num_workgroups) nw: vec3<u32>, @builtin(subgroup_invocation_id) si: u32,
        @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) ns: u32) {
    let m = P.m;
    let n = P.n;
    let j0 = (w.x + w.y * nw.x) * 4u;
    let i0 = P.row0 + w.z * QMM_ROWS;
    if (j0 >= n || i0 >= m) { return; }
    let rows = min(QMM_ROWS, m - i0);
    let acc = qmm_hw_acc(t, i0, rows, j0);
    for (var r = 0u; r < QMM_ROWS; r = r + 1u) {
        if (r < rows) {
            let v = subgroupAdd(acc[r]);
            if (si == 0u) { sgred[sid * QMM_ROWS + r] = v; }
        }
    }
    workgroupBarrier();
    let r = t / 4u;
    let c = t % 4u;
    if (r < rows && j0 + c < n) {
        var sum = sgred[r][c];
        for (var i = 1u; i < ns; i = i + 1u) { sum = sum + sgred[i * QMM_ROWS + r][c]; }
        st_y((i0 + r) * n + j0 + c, sum);
    }
}
