#include <algorithm>
#include <random>
// The cached inference kernels (kernels/cached.cu) against naive f64
// references: rope_rows, cache_write, the cached indexer (both pooling paths),
// cached select, and flash-decoding attention (dense and blocks, every GQA
// head chunking, one and many splits, several tiles per range, ragged rows,
// a row with no key, rows clamped to the cache, NONE / future / out-of-range
// block entries), f32 and bf16.
static int fails = 0;
static void check(const char* what, bool ok, double err) {
    printf("  %-58s %s (err %.2e)\n", what, ok ? "ok" : "FAIL", err);
    fails += !ok;
}
static double relerr(const std::vector<float>& g, const std::vector<double>& w) {
    double n = 0, d = 0;
    for (size_t i = 0; i < g.size(); i++) {
        if (std::isinf(w[i])) { if (g[i] != w[i]) return 1e9; continue; }
        if (!std::isfinite(g[i])) return 1e9;
        n += (g[i] - w[i]) * (g[i] - w[i]);
        d += w[i] * w[i];
    }
    return d > 0 ? sqrt(n / d) : sqrt(n);
}
static float bf(float x) { u32 b; memcpy(&b, &x, 4); b &= 0xffff0000u; memcpy(&x, &b, 4); return x; }
static std::vector<bf16> to_bf(const std::vector<float>& v) {
    std::vector<bf16> o(v.size());
    for (size_t i = 0; i < v.size(); i++) { u32 b; memcpy(&b, &v[i], 4); o[i].bits = (u16)(b >> 16); }
    return o;
}
static std::vector<float> from_bf(const std::vector<bf16>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); i++) { u32 b = (u32)v[i].bits << 16; memcpy(&o[i], &b, 4); }
    return o;
}
// (base, len) clamped to the cache, as every kernel does.
static void clamp_row(const std::vector<u32>& tab, size_t r, u32 slots, u32& base, u32& len) {
    base = std::min(tab[2 * r], slots);
    len = std::min(tab[2 * r + 1], slots - base);
}

static void test_rope_and_write(std::mt19937& rng) {
    std::normal_distribution<float> nd;
    u32 R = 5, heads = 3, d = 8, half = 4, max_pos = 6, slots = 20, width = heads * d;
    std::vector<u32> tab = {0, 1, 10, 3, 10, 4, 15, 9 /* past max_pos and the cache */, 4, 0 /* no key */};
    std::vector<float> x(R * heads * d), cs(max_pos * half), sn(max_pos * half), y(x.size(), NAN);
    for (auto& e : x) e = nd(rng);
    for (u32 p = 0; p < max_pos; p++) for (u32 i = 0; i < half; i++) { double a = p * pow(100.0, -(double)i / half); cs[p * half + i] = (float)cos(a); sn[p * half + i] = (float)sin(a); }
    u32 pairs = R * heads * half;
    launch(rope_rows_f32, dim3(2), dim3(32), 0, (const float*)x.data(), (const float*)cs.data(), (const float*)sn.data(), (const u32*)tab.data(), y.data(), pairs, heads, half, max_pos);
    std::vector<double> want(x.size());
    for (u32 r = 0; r < R; r++) {
        u32 len = tab[2 * r + 1], pos = std::min(len > 0 ? len - 1 : 0u, max_pos - 1);
        for (u32 h = 0; h < heads; h++) for (u32 i = 0; i < half; i++) {
            size_t b = (r * heads + h) * d; double c = cs[pos * half + i], s = sn[pos * half + i], a = x[b + i], bb = x[b + i + half];
            want[b + i] = a * c - bb * s; want[b + i + half] = a * s + bb * c;
        }
    }
    double e = relerr(y, want);
    check("rope_rows f32 (ragged positions, clamped to the table)", e < 1e-6, e);

    std::vector<float> src(R * width), cache(slots * width);
    for (auto& v : src) v = bf(nd(rng));
    for (auto& v : cache) v = bf(nd(rng));
    auto cb = to_bf(cache);
    std::vector<double> wc(cache.begin(), cache.end());
    for (u32 r = 0; r < R; r++) {
        u64 len = tab[2 * r + 1], dst = tab[2 * r] + len - 1;
        if (len == 0 || dst >= slots) continue;
        for (u32 c = 0; c < width; c++) wc[dst * width + c] = src[r * width + c];
    }
    auto sb = to_bf(src);
    launch(cache_write_bf16, dim3(1), dim3(64), 0, (const bf16*)sb.data(), (const u32*)tab.data(), cb.data(), R, width, slots);
    e = relerr(from_bf(cb), wc);
    check("cache_write bf16 (bits copied, targets outside skipped)", e == 0.0, e);
}

static void test_indexer(std::mt19937& rng, u32 block) {
    std::normal_distribution<float> nd;
    u32 H = 3, D = 12, slots = 700, cols = (600 + block - 1) / block;
    // Rows: decode at a long length, prefill-like, clamped past the cache, empty, short.
    std::vector<u32> tab = {0, 600, 0, 37, 650, 200 /* clamped to 50 */, 100, 0, 300, 1};
    u32 R = tab.size() / 2;
    std::vector<float> qi(R * H * D), w(R * H), ki(slots * D), pooled(R * cols, 7.0f);
    for (auto& e : qi) e = nd(rng);
    for (auto& e : w) e = nd(rng);
    for (auto& e : ki) e = nd(rng);
    u32 nbt = block <= 128 ? 256 / block : 1;
    size_t smem = (H * D + H + 256) * 4;
    launch(cached_indexer_block_scores_f32, dim3((cols + nbt - 1) / nbt, 2), dim3(256), smem, (const float*)qi.data(), (const float*)w.data(), (const float*)ki.data(), (const u32*)tab.data(), pooled.data(), R, H, D, block, cols, slots, nbt);
    std::vector<double> want(R * cols, -INFINITY);
    for (u32 r = 0; r < R; r++) {
        u32 base, len;
        clamp_row(tab, r, slots, base, len);
        len = std::min(len, cols * block);
        for (u32 s = 0; s < len; s++) {
            double acc = 0;
            for (u32 j = 0; j < H; j++) { double l = 0; for (u32 e = 0; e < D; e++) l += (double)qi[(r * H + j) * D + e] * ki[(base + s) * D + e]; acc += w[r * H + j] * std::max(l, 0.0); }
            want[r * cols + s / block] = std::max(want[r * cols + s / block], acc);
        }
    }
    double e = relerr(pooled, want);
    char what[128];
    snprintf(what, sizeof what, "cached indexer f32, block %u (%s)", block, nbt > 1 ? "thread per key" : "strided");
    check(what, e < 1e-5, e);
}

static std::vector<u32> ref_select(const float* row, u32 r, u32 k) {
    auto key = [](float s) { return std::isnan(s) ? -INFINITY : s; };
    std::vector<u32> kept;
    for (u32 f : {r, 0u}) if (kept.size() < k && std::find(kept.begin(), kept.end(), f) == kept.end()) kept.push_back(f);
    std::vector<std::pair<float, u32>> c;
    for (u32 s = 1; s < std::max(r, 1u); s++) c.push_back({row[s], s});
    std::stable_sort(c.begin(), c.end(), [&](auto a, auto b) { return key(a.first) > key(b.first) || (key(a.first) == key(b.first) && a.second < b.second); });
    for (size_t i = 0; i < c.size() && kept.size() < k; i++) kept.push_back(c[i].second);
    std::sort(kept.begin(), kept.end());
    kept.resize(k, 0xffffffffu);
    return kept;
}

static void test_select(std::mt19937& rng) {
    u32 block = 8, cols = 40;
    std::vector<u32> tab;
    for (u32 len : {0u, 1u, 8u, 9u, 17u, 100u, 320u, 400u /* past cols */, 33u, 250u}) tab.insert(tab.end(), {0u, len});
    u32 R = tab.size() / 2;
    std::vector<float> sc(R * cols);
    for (auto& x : sc) x = (float)(rng() % 5);
    sc[5 * cols + 3] = NAN; sc[5 * cols + 4] = -0.0f; sc[6 * cols + 2] = -INFINITY;
    int bad = 0;
    for (u32 k : {1u, 2u, 3u, 5u, 45u}) {
        std::vector<u32> idx(R * k, 7);
        launch(cached_select, dim3(4), dim3(256), 0, (const float*)sc.data(), (const u32*)tab.data(), idx.data(), R, cols, k, block);
        for (u32 row = 0; row < R; row++) {
            u32 len = tab[2 * row + 1], r = std::min((len > 0 ? len - 1 : 0) / block, cols - 1);
            auto want = ref_select(&sc[row * cols], r, k);
            for (u32 j = 0; j < k; j++) bad += idx[row * k + j] != want[j];
        }
    }
    check("cached_select (own block per row, ties, NaN, -0, k > blocks)", bad == 0, bad);
}

static std::function<void(const void*, const void*, const void*, void*)> run_pending;
template <typename T>
static void run_attn(bool use_bf16, u32 H, u32 KV, u32 d, u32 mode, u32 nsplit, u32 tk, bool prefill = false) {
    std::mt19937 rng(H * 131 + KV * 17 + d + mode * 7 + nsplit + tk + prefill);
    std::normal_distribution<float> nd;
    u32 slots = 3 * 96, block = 8, n = 5;
    // Ragged decode rows, a prefill run of one sequence, an empty row, a row clamped to the cache.
    std::vector<u32> tab = {0, 90, 96, 17, 192, 1, 192, 0, 250, 100 /* clamped to 38 */};
    for (u32 len = 40; len < 44; len++) tab.insert(tab.end(), {96, len});
    if (prefill) {
        // Tiles of 32 rows: 0 a run (sequence at 0, lengths 5..36); 1 a run's
        // tail, then decode rows and another run's head (not a run); 2 that
        // run's tail of 11 rows (a run); 3 a run past the cache (not a run).
        tab.clear();
        for (u32 len = 5; len < 45; len++) tab.insert(tab.end(), {0, len});
        tab.insert(tab.end(), {96, 30, 192, 0, 96, 70});
        for (u32 len = 1; len < 33; len++) tab.insert(tab.end(), {192, len});
        for (u32 len = 1; len < 11; len++) tab.insert(tab.end(), {200, len});
        for (u32 len = 80; len < 110; len++) tab.insert(tab.end(), {200, len});
    }
    u32 R = tab.size() / 2;
    u32 skip = prefill ? 1 : 0;
    u32 tiles = (R + 31) / 32;
    if (prefill) {
        size_t rs = ((32 + 64) * (32 * (d <= 32 ? 1 : d <= 64 ? 2 : 4) + 1) + 4 * 8 * 32) * 4;
        run_pending = [=](const void* qp, const void* kp, const void* vp, void* op) {
            auto f = d <= 32 ? cached_attn_run_f32_d1 : d <= 64 ? cached_attn_run_f32_d2 : cached_attn_run_f32_d4;
            auto fb = d <= 32 ? cached_attn_run_bf16_d1 : d <= 64 ? cached_attn_run_bf16_d2 : cached_attn_run_bf16_d4;
            if (sizeof(T) == 2) launch(fb, dim3(tiles, H), dim3(128), rs, (const bf16*)qp, (const bf16*)kp, (const bf16*)vp, (const u32*)tab.data(), (bf16*)op, R, H, KV, d, slots, 1.0f / sqrtf((float)d));
            else launch(f, dim3(tiles, H), dim3(128), rs, (const float*)qp, (const float*)kp, (const float*)vp, (const u32*)tab.data(), (float*)op, R, H, KV, d, slots, 1.0f / sqrtf((float)d));
        };
    }
    std::vector<float> q(R * H * d), k(slots * KV * d), v(slots * KV * d);
    for (auto* x : {&q, &k, &v}) for (auto& e : *x) e = use_bf16 ? bf(nd(rng)) : nd(rng);
    std::vector<u32> idx(R * n);
    for (u32 r = 0; r < R; r++) {
        std::vector<u32> perm(15);
        for (u32 i = 0; i < perm.size(); i++) perm[i] = i;
        std::shuffle(perm.begin(), perm.end(), rng);
        for (u32 j = 0; j < n; j++) idx[r * n + j] = perm[j] >= 13 ? 0xffffffffu : perm[j];  // future blocks and NONE too
    }
    float scale = 1.0f / sqrtf((float)d);
    u32 group = H / KV, hpc = std::min(group, 4u), nhc = (group + hpc - 1) / hpc;
    std::vector<float> pacc(R * H * nsplit * d, NAN), pml(R * H * nsplit * 2, NAN);
    std::vector<T> qt(q.size()), kt(k.size()), vt(v.size()), ot(R * H * d);
    if constexpr (sizeof(T) == 2) { qt = to_bf(q); kt = to_bf(k); vt = to_bf(v); for (auto& e : ot) e.bits = 0x7fc0; }
    else { qt = q; kt = k; vt = v; std::fill(ot.begin(), ot.end(), NAN); }
    u32 dp = d <= 32 ? 1 : d <= 64 ? 2 : d <= 128 ? 4 : 8;
    auto pick = [&](auto f1, auto f2, auto f4, auto f8) { return dp == 1 ? f1 : dp == 2 ? f2 : dp == 4 ? f4 : f8; };
    size_t smem = 2 * tk * d * 4;
    float* pa = nsplit > 1 ? pacc.data() : nullptr;
    float* pm = nsplit > 1 ? pml.data() : nullptr;
    const u32* ip = mode ? idx.data() : nullptr;
    if constexpr (sizeof(T) == 2) {
        auto f = pick(cached_attn_bf16_d1, cached_attn_bf16_d2, cached_attn_bf16_d4, cached_attn_bf16_d8);
        launch(f, dim3(nsplit, KV * nhc, 3), dim3(128), smem, (const bf16*)qt.data(), (const bf16*)kt.data(), (const bf16*)vt.data(), (const u32*)tab.data(), ip, ot.data(), pa, pm, R, H, KV, d, slots, scale, mode, n, block, nsplit, hpc, tk, skip);
        if (nsplit > 1) launch(pick(cached_attn_merge_bf16_d1, cached_attn_merge_bf16_d2, cached_attn_merge_bf16_d4, cached_attn_merge_bf16_d8), dim3((R * H + 3) / 4), dim3(128), 0, (const float*)pa, (const float*)pm, ot.data(), R * H, d, nsplit, (const u32*)tab.data(), R, H, slots, skip);
    } else {
        auto f = pick(cached_attn_f32_d1, cached_attn_f32_d2, cached_attn_f32_d4, cached_attn_f32_d8);
        launch(f, dim3(nsplit, KV * nhc, 3), dim3(128), smem, (const float*)qt.data(), (const float*)kt.data(), (const float*)vt.data(), (const u32*)tab.data(), ip, ot.data(), pa, pm, R, H, KV, d, slots, scale, mode, n, block, nsplit, hpc, tk, skip);
        if (nsplit > 1) launch(pick(cached_attn_merge_f32_d1, cached_attn_merge_f32_d2, cached_attn_merge_f32_d4, cached_attn_merge_f32_d8), dim3((R * H + 3) / 4), dim3(128), 0, (const float*)pa, (const float*)pm, ot.data(), R * H, d, nsplit, (const u32*)tab.data(), R, H, slots, skip);
    }
    if (prefill) { run_pending(qt.data(), kt.data(), vt.data(), ot.data()); run_pending = nullptr; }
    std::vector<float> o;
    if constexpr (sizeof(T) == 2) o = from_bf(ot); else o = ot;
    std::vector<double> want(R * H * d, 0.0);
    for (u32 r = 0; r < R; r++) {
        u32 base, len;
        clamp_row(tab, r, slots, base, len);
        std::vector<u32> keys;
        if (mode == 0) for (u32 s = 0; s < len; s++) keys.push_back(s);
        else for (u32 j = 0; j < n; j++) {
            u32 kb = idx[r * n + j];
            if (len == 0 || kb == 0xffffffffu || kb > (len - 1) / block) continue;
            for (u32 s = kb * block; s < std::min(kb * block + block, len); s++) keys.push_back(s);
        }
        for (u32 h = 0; h < H; h++) {
            u32 g = h / group;
            std::vector<double> sc;
            double m = -INFINITY;
            for (u32 s : keys) { double x = 0; for (u32 e = 0; e < d; e++) x += (double)q[(r * H + h) * d + e] * k[((base + s) * KV + g) * d + e]; sc.push_back(x * scale); m = std::max(m, sc.back()); }
            double l = 0;
            for (double x : sc) l += exp(x - m);
            for (size_t i = 0; i < keys.size(); i++)
                for (u32 e = 0; e < d; e++) want[(r * H + h) * d + e] += exp(sc[i] - m) / l * v[((base + keys[i]) * KV + g) * d + e];
        }
    }
    double e = relerr(o, want);
    char what[160];
    snprintf(what, sizeof what, "attention %s %s%s H %u KV %u d %u nsplit %u tk %u", use_bf16 ? "bf16" : "f32", mode ? "blocks" : "dense", prefill ? " +runs" : "", H, KV, d, nsplit, tk);
    check(what, e < (use_bf16 ? 1e-2 : 1e-5), e);
}

int main() {
    std::mt19937 rng(11);
    test_rope_and_write(rng);
    test_indexer(rng, 8);
    test_indexer(rng, 100);
    test_indexer(rng, 160);
    test_select(rng);
    for (u32 mode = 0; mode < 2; mode++) {
        run_attn<float>(false, 4, 2, 16, mode, 1, 32);   // group 2: 2 warps per head
        run_attn<float>(false, 4, 2, 16, mode, 7, 4);    // splits and several tiles per range
        run_attn<float>(false, 2, 2, 40, mode, 3, 16);   // MHA: 4 warps per head, d 40
        run_attn<float>(false, 6, 2, 16, mode, 64, 8);   // group 3: an idle warp; more splits than keys
        run_attn<float>(false, 5, 1, 72, mode, 2, 32);   // group 5: two head chunks, d 72
        run_attn<float>(false, 8, 1, 200, mode, 4, 16);  // group 8, d 200 (8 dims per lane)
        run_attn<bf16>(true, 4, 2, 40, mode, 5, 8);
    }
    run_attn<float>(false, 4, 2, 16, 0, 1, 32, true);   // prefill runs + the rest by flash-decoding
    run_attn<float>(false, 4, 2, 40, 0, 3, 16, true);
    run_attn<float>(false, 3, 1, 100, 0, 2, 32, true);
    run_attn<bf16>(true, 4, 2, 40, 0, 5, 8, true);
    printf("cached: %s (%d failure(s))\n", fails ? "FAIL" : "ok", fails);
    return fails != 0;
}
