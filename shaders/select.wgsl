// Top-k selection over causal score rows (the semantics of
// `attention::select::select_row`): per row the k best candidate columns
// (score descending, NaN as -inf, ties to the smaller index), sorted
// ascending, padded with NONE.
// - Token mode (block 0): row t of [batch, seq, seq] scores, candidates 0..=t.
// - Block mode (block > 0): row t of [batch, seq, nkb] per-query block
//   scores, candidates 0..=r with r = t / block (query t's own block); the
//   own block r and the sink block 0 are always kept (the sink when k >= 2
//   and r > 0) and the rest of the budget goes to blocks 1..r-1. What a row
//   selects depends on that row's scores alone.
//
// One 256-wide workgroup per row. Scores map to order-preserving u32 keys;
// a 32-step binary search (counting with a workgroup atomic) finds the
// threshold key T with count(key >= T) >= kk > count(key > T); then one
// ordered pass over the candidates, 256 at a time with a workgroup prefix
// sum, writes the keys > T and the first kk - count(> T) keys == T by index.
//
// Parameters `SelectParams`: nrows = batch·rows, rows (= seq), k, block
// (0: token mode), cols.

struct SelectParams {
    nrows: u32,
    rows: u32,
    k: u32,
    block: u32,
    cols: u32,
}

const NONE: u32 = 0xffffffffu;
const WG: u32 = 256u;

var<workgroup> cnt: atomic<u32>;
var<workgroup> pre: array<u32, 256>;

// Larger key = better score; NaN ranks as -inf and -0 as +0.
fn okey(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) { return 0x007fffffu; }
    if ((u & 0x7fffffffu) == 0u) { return 0x80000000u; }
    if ((u & 0x80000000u) != 0u) { return ~u; }
    return u | 0x80000000u;
}

//!kernel select_topk(scores: in, idx: idxout) : SelectParams
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * nw.x;
    if (row >= P.nrows) { return; }
    let cols = P.cols;
    let t = row % P.rows;
    let blocks = P.block > 0u;
    var r = t;
    if (blocks) { r = t / P.block; }
    let k = P.k;
    let base = row * cols;
    let obase = row * k;
    // Candidates [c0, c1), the budget kk left for them, forced entries.
    var c0 = 0u;
    var c1 = r + 1u;
    var nforced = 0u;
    var f0 = 0u;
    if (blocks) {
        c0 = 1u;
        c1 = max(r, 1u);
        nforced = 1u;
        if (r != 0u && k >= 2u) {
            f0 = 1u;
            nforced = 2u;
        }
    }
    let ncand = c1 - c0;
    let kk = k - nforced;

    // Binary search for T = max{T : count(key >= T) >= kk} (T = 0 when kk > ncand).
    var lo = 0u;
    var hi = 0xffffffffu;
    for (var it = 0u; it < 33u; it = it + 1u) {
        let mid = lo + ((hi - lo) >> 1u) + ((hi - lo) & 1u);
        if (lid == 0u) { atomicStore(&cnt, 0u); }
        workgroupBarrier();
        var c = 0u;
        for (var col = c0 + lid; col < c1; col = col + WG) {
            if (okey(ld_scores(base + col)) >= mid) { c = c + 1u; }
        }
        atomicAdd(&cnt, c);
        workgroupBarrier();
        let total = atomicLoad(&cnt);
        workgroupBarrier();
        if (lo < hi) {
            if (total >= kk) { lo = mid; } else { hi = mid - 1u; }
        }
    }
    let thr = lo;
    if (lid == 0u) { atomicStore(&cnt, 0u); }
    workgroupBarrier();
    var c = 0u;
    for (var col = c0 + lid; col < c1; col = col + WG) {
        if (okey(ld_scores(base + col)) > thr) { c = c + 1u; }
    }
    atomicAdd(&cnt, c);
    workgroupBarrier();
    let ngt = atomicLoad(&cnt);
    var need = 0u;
    if (kk > ngt) { need = kk - ngt; }
    let nsel = min(kk, ncand);

    // Ordered pass: position of a selected column = #selected columns before it.
    var run_gt = 0u;
    var run_tie = 0u;
    for (var cb = c0; cb < c1; cb = cb + WG) {
        let col = cb + lid;
        var gt = 0u;
        var tie = 0u;
        if (col < c1) {
            let key = okey(ld_scores(base + col));
            gt = select(0u, 1u, key > thr);
            tie = select(0u, 1u, key == thr);
        }
        let val = (tie << 16u) | gt;
        pre[lid] = val;
        workgroupBarrier();
        for (var off = 1u; off < WG; off = off << 1u) {
            var v = pre[lid];
            if (lid >= off) { v = v + pre[lid - off]; }
            workgroupBarrier();
            pre[lid] = v;
            workgroupBarrier();
        }
        let excl = pre[lid] - val;
        let all = pre[WG - 1u];
        workgroupBarrier();
        let gt_before = run_gt + (excl & 0xffffu);
        let tie_before = run_tie + (excl >> 16u);
        if (gt == 1u || (tie == 1u && tie_before < need)) {
            stu_idx(obase + f0 + gt_before + min(tie_before, need), col);
        }
        run_gt = run_gt + (all & 0xffffu);
        run_tie = run_tie + (all >> 16u);
    }
    if (lid == 0u) {
        if (f0 == 1u) { stu_idx(obase, 0u); }
        if (blocks) { stu_idx(obase + f0 + nsel, r); }
    }
    for (var p = nforced + nsel + lid; p < k; p = p + WG) {
        stu_idx(obase + p, NONE);
    }
}

//!kernel select_topk_rows(scores: in, idx: idxout) : SelectParams
// The same selection, one invocation per row, for short rows (the launch
// checks k <= SK and cols·(k + 2) within the loop budget): block mode has
// ceil(seq / block) columns per query, too few to fill a workgroup. The kk
// best candidates are kept in a private list ordered by (key descending,
// index ascending), inserting columns in index order (an equal key never
// passes an earlier one); its last entry (T, iT) is the threshold, and one
// ordered pass writes the columns with key > T or key == T and index <= iT.
const SK: u32 = 64u;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let row = lin(gid, nw);
    if (row >= P.nrows) { return; }
    let cols = P.cols;
    let t = row % P.rows;
    let blocks = P.block > 0u;
    var r = t;
    if (blocks) { r = t / P.block; }
    let k = P.k;
    let base = row * cols;
    let obase = row * k;
    var c0 = 0u;
    var c1 = r + 1u;
    var nforced = 0u;
    var f0 = 0u;
    if (blocks) {
        c0 = 1u;
        c1 = max(r, 1u);
        nforced = 1u;
        if (r != 0u && k >= 2u) {
            f0 = 1u;
            nforced = 2u;
        }
    }
    let want = min(k - nforced, c1 - c0);
    var lk: array<u32, SK>;
    var li: array<u32, SK>;
    var cnt = 0u;
    if (want > 0u) {
        for (var col = c0; col < c1; col = col + 1u) {
            let key = okey(ld_scores(base + col));
            if (cnt == want && key <= lk[want - 1u]) { continue; }
            var p = cnt;
            if (cnt == want) { p = want - 1u; } else { cnt = cnt + 1u; }
            loop {
                if (p == 0u || lk[p - 1u] >= key) { break; }
                lk[p] = lk[p - 1u];
                li[p] = li[p - 1u];
                p = p - 1u;
            }
            lk[p] = key;
            li[p] = col;
        }
    }
    var o = 0u;
    if (f0 == 1u) {
        stu_idx(obase, 0u);
        o = 1u;
    }
    if (cnt > 0u) {
        let tk = lk[cnt - 1u];
        let ti = li[cnt - 1u];
        for (var col = c0; col < c1; col = col + 1u) {
            let key = okey(ld_scores(base + col));
            if (key > tk || (key == tk && col <= ti)) {
                stu_idx(obase + o, col);
                o = o + 1u;
            }
        }
    }
    if (blocks) {
        stu_idx(obase + o, r);
        o = o + 1u;
    }
    for (; o < k; o = o + 1u) {
        stu_idx(obase + o, NONE);
    }
}
