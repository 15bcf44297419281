// Decode attention over the paged KV cache, hardware-GPU variant
// (KernelVariant::Hardware; the software one is `cached_attn` in
// shaders/cached.wgsl, whose conventions, parameters and partial-result
// layout these kernels share: `cached_attn_combine` merges their chunks).
//
// Flash-decoding: one 128-invocation workgroup per (key chunk, row, head),
// chunks of at most HCH = 256 key slots (the backend plans 256, so a long
// row spreads over many workgroups). Scores: teams of TEAM = 8 invocations
// take one key each, every invocation a strided share of the head's vec4
// columns (consecutive invocations read consecutive words of the key row),
// the team's partial dot products added by `team_sum`. Softmax max and sum:
// `wg_max` / `wg_add` over the workgroup. p·v: invocation (group, column)
// sums every ng-th key of the chunk on four output elements, the groups
// added in a fixed order through workgroup memory.
//
// Two kernels differ only in those reductions: `cached_attn_hw` through
// workgroup memory (fixed trees), `cached_attn_hw_sg` through subgroup
// operations (shuffles within a team, subgroupMax/subgroupAdd and the
// subgroups' results in subgroup order), used where the device has SUBGROUP
// with subgroups of at least 8 invocations. Each result depends on the
// row's own data only (never on the other rows of the launch), so a decode
// row alone has the bits it gets in any batch, per kernel.
//
// The paging helpers below are those of shaders/cached.wgsl (row_of clamps
// len to the row's table, phys_row the page id to the pool).

const NONE: u32 = 0xffffffffu;

// Mirrored in src/backend/wgpu/cached.rs (as for `cached_attn`).
struct CachedAttnParams {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    slots: u32,
    mode: u32,
    n: u32,
    block: u32,
    chunk: u32,
    nch: u32,
    r0: u32,
    nrow: u32,
    page: u32,
    np: u32,
}

struct Pg {
    page: u32,
    np: u32,
    last: u32,
}

fn paging(page: u32, np: u32, slots: u32) -> Pg {
    return Pg(page, np, slots / page - 1u);
}

fn row_of(r: u32, pg: Pg) -> vec2<u32> {
    let base = ldu_rows(2u * r);
    let len = ldu_rows(2u * r + 1u);
    if (base >= pg.np) { return vec2<u32>(base, 0u); }
    let cap = pg.np - base;
    if (len / pg.page >= cap) { return vec2<u32>(base, cap * pg.page); }
    return vec2<u32>(base, len);
}

fn key_row(pg: Pg, base: u32, s: u32) -> u32 {
    let id = ldu_pages(min(base + s / pg.page, pg.np - 1u));
    return min(id, pg.last) * pg.page + s % pg.page;
}

// The key position of slot i of row r (length len), or NONE.
fn slot_key(r: u32, len: u32, i: u32) -> u32 {
    if (P.mode == 0u) {
        if (i < len) { return i; }
        return NONE;
    }
    let blk = P.block;
    let kb = ldu_idx(r * P.n + i / blk);
    if (kb == NONE || len == 0u || kb > (len - 1u) / blk) { return NONE; }
    let j = kb * blk + i % blk;
    if (j >= len) { return NONE; }
    return j;
}

const WH: u32 = 128u;
const TEAM: u32 = 8u;
const HCH: u32 = 256u;
var<workgroup> hs: array<f32, HCH>;
var<workgroup> hkey: array<u32, HCH>;
//#if f16
// f16 q, k and v on a SHADER_F16 device: q staged in f16 (half the
// workgroup memory), each q·k element product an f16 multiply summed in f32;
// the scores, softmax and p·v accumulation stay f32 (v widened exactly).
var<workgroup> hq: array<vec4<f16>, 64>;
fn ldq4(o: u32, e: u32, d: u32) -> vec4<f16> { return ld4h_q(o, e, d); }
fn qk4(cc: u32, ko: u32, d: u32) -> f32 { return dot(vec4<f32>(hq[cc] * ld4h_k(ko, 4u * cc, d)), vec4<f32>(1.0)); }
fn ldv4(o: u32, e: u32, d: u32) -> vec4<f32> { return vec4<f32>(ld4h_v(o, e, d)); }
//#else
var<workgroup> hq: array<vec4<f32>, 64>;
fn ldq4(o: u32, e: u32, d: u32) -> vec4<f32> { return ld4_q(o, e, d); }
fn qk4(cc: u32, ko: u32, d: u32) -> f32 { return dot(hq[cc], ld4_k(ko, 4u * cc, d)); }
fn ldv4(o: u32, e: u32, d: u32) -> vec4<f32> { return ld4_v(o, e, d); }
//#endif
var<workgroup> hacc: array<vec4<f32>, WH>;
var<workgroup> hrow: vec2<u32>;

// The kernel body; `lid` is a one-to-one numbering of the workgroup's
// invocations in which every aligned run of TEAM shares `team_sum`.
fn attn_hw(w: u32, lid: u32) {
    let nh = P.n_heads;
    let nrow = P.nrow;
    let nch = P.nch;
    if (w >= nch * nrow * nh) { return; }
    let c = w / (nrow * nh);
    let rh = w % (nrow * nh);
    let rl = rh / nh;
    let h = rh % nh;
    let r = P.r0 + rl;
    let d = P.head_dim;
    let nc = (d + 3u) / 4u;
    let kw = P.n_kv_heads * d;
    let g = h / (nh / P.n_kv_heads);
    let pg = paging(P.page, P.np, P.slots);
    if (lid == 0u) { hrow = row_of(r, pg); }
    let rw = workgroupUniformLoad(&hrow);
    let base = rw.x;
    let len = rw.y;
    var nsl = len;
    if (P.mode != 0u) { nsl = P.n * P.block; }
    let s0 = c * P.chunk;
    if (s0 >= nsl && c > 0u) { return; }
    let cnt = min(nsl, s0 + P.chunk) - min(s0, nsl);
    let qo = (r * nh + h) * d;
    for (var cc = lid; cc < nc; cc = cc + WH) { hq[cc] = ldq4(qo, 4u * cc, d); }
    workgroupBarrier();
    // Scores, WH / TEAM keys per pass (a uniform trip count: team_sum may
    // synchronise the workgroup).
    let tm = lid / TEAM;
    let e = lid % TEAM;
    var mx = NEG;
    for (var j0 = 0u; j0 < cnt; j0 = j0 + WH / TEAM) {
        let j = j0 + tm;
        var kr = NONE;
        var part = 0.0;
        if (j < cnt) {
            let key = slot_key(r, len, s0 + j);
            if (key != NONE) {
                kr = key_row(pg, base, key);
                let ko = kr * kw + g * d;
                for (var cc = e; cc < nc; cc = cc + TEAM) { part = part + qk4(cc, ko, d); }
            }
        }
        let x = P.scale * team_sum(lid, part);
        if (e == 0u && j < cnt) {
            var xs = NEG;
            if (kr != NONE) {
                xs = x;
                mx = max(mx, x);
            }
            hs[j] = xs;
            hkey[j] = kr;
        }
    }
    let m = wg_max(lid, mx);
    var ls = 0.0;
    for (var j = lid; j < cnt; j = j + WH) {
        var p = 0.0;
        if (hkey[j] != NONE) { p = exp(hs[j] - m); }
        hs[j] = p;
        ls = ls + p;
    }
    let l = wg_add(lid, ls);
    let last = nch == 1u;
    var oo = qo;
    if (!last) {
        let pr = (c * nrow + rl) * nh + h;
        oo = pr * d;
        if (lid == 0u) {
            st_ml(2u * pr, m);
            st_ml(2u * pr + 1u, l);
        }
    }
    let ng = WH / nc;
    let cc = lid % nc;
    let grp = lid / nc;
    var acc = vec4<f32>(0.0);
    if (grp < ng) {
        for (var j = grp; j < cnt; j = j + ng) {
            let kr = hkey[j];
            if (kr != NONE) { acc = acc + hs[j] * ldv4(kr * kw + g * d, 4u * cc, d); }
        }
    }
    hacc[lid] = acc;
    workgroupBarrier();
    if (grp == 0u) {
        for (var i = 1u; i < ng; i = i + 1u) { acc = acc + hacc[i * nc + cc]; }
        for (var ei = 0u; ei < 4u; ei = ei + 1u) {
            if (4u * cc + ei < d) {
                var y = acc[ei];
                if (last) { y = select(0.0, y / l, l > 0.0); }
                st_o(oo + 4u * cc + ei, y);
            }
        }
    }
}

//!kernel cached_attn_hw(q: in, k: in, v: in, rows: idx, pages: idx, idx: idx, o: out, ml: out) : CachedAttnParams
// Reductions through workgroup memory.
var<workgroup> hred: array<f32, WH>;

// The sum of the team's TEAM values, in lane order (valid in lane 0 of the team).
fn team_sum(lid: u32, x: f32) -> f32 {
    hred[lid] = x;
    workgroupBarrier();
    let b = lid - lid % TEAM;
    var s = hred[b];
    for (var i = 1u; i < TEAM; i = i + 1u) { s = s + hred[b + i]; }
    workgroupBarrier();
    return s;
}

fn wg_red(lid: u32, x: f32, is_max: bool) -> f32 {
    hred[lid] = x;
    workgroupBarrier();
    for (var s = WH / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let a = hred[lid];
            let b = hred[lid + s];
            hred[lid] = select(a + b, max(a, b), is_max);
        }
        workgroupBarrier();
    }
    let r = hred[0];
    workgroupBarrier();
    return r;
}

fn wg_max(lid: u32, x: f32) -> f32 {
    return wg_red(lid, x, true);
}

fn wg_add(lid: u32, x: f32) -> f32 {
    return wg_red(lid, x, false);
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    attn_hw(wg_index(wid, nw), lid);
}

//!kernel cached_attn_hw_sg(q: in, k: in, v: in, rows: idx, pages: idx, idx: idx, o: out, ml: out) : CachedAttnParams
// Reductions through subgroup operations. Invocations are numbered
// subgroup by subgroup (id · size + lane; the backend takes this kernel only
// with subgroups of at least 8, which tile the 128 invocations), so a team
// lies inside one subgroup and sums by three shuffles.
var<workgroup> hsg: array<f32, 16>;
// (subgroup lane, subgroup id, subgroups in the workgroup).
var<private> sg: vec3<u32>;

fn team_sum(lid: u32, x: f32) -> f32 {
    var s = x + subgroupShuffleXor(x, 4u);
    s = s + subgroupShuffleXor(s, 2u);
    return s + subgroupShuffleXor(s, 1u);
}

// The subgroups' results v, combined in subgroup order by `is_max`.
fn sg_combine(v: f32, is_max: bool) -> f32 {
    if (sg.x == 0u) { hsg[sg.y] = v; }
    workgroupBarrier();
    var r = hsg[0];
    for (var i = 1u; i < sg.z; i = i + 1u) { r = select(r + hsg[i], max(r, hsg[i]), is_max); }
    workgroupBarrier();
    return r;
}

fn wg_max(lid: u32, x: f32) -> f32 {
    return sg_combine(subgroupMax(x), true);
}

fn wg_add(lid: u32, x: f32) -> f32 {
    return sg_combine(subgroupAdd(x), false);
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(subgroup_invocation_id) si: u32, @builtin(subgroup_size) ss: u32,
        @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) ns: u32) {
    sg = vec3<u32>(si, sid, ns);
    attn_hw(wg_index(wid, nw), sid * ss + si);
}
