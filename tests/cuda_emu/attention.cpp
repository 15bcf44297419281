#include <algorithm>
#include <random>
// Naive reference, double precision.
// Inputs representable in bf16 and f16 alike (8 significant bits, small range).
// Dynamic shared memory of the tiled kernels (see TiledSmem in attention.cu).
static size_t tsm(int rows, int nps, int dpl, u32 seq) { return (size_t)(rows * 32 * (dpl * 32 + 1) + nps * 4 * 8 * 32 + 32 + ((seq + 31) / 32 + 31) / 32) * 4; }
static float from_f32_round(float x) { return std::round(x * 64.0f) / 64.0f; }
struct P { u32 batch, seq, H, KV, d, mode, kk, block; };
static std::vector<u32> keys_of(const P& p, const std::vector<u32>& idx, u32 b, u32 t) {
    std::vector<u32> ks;
    if (p.mode == 0) for (u32 s = 0; s <= t; s++) ks.push_back(s);
    else if (p.mode == 1) { for (u32 j = 0; j < p.kk; j++) { u32 s = idx[(b * p.seq + t) * p.kk + j]; if (s <= t) ks.push_back(s); } }
    else { u32 qb = t / p.block;  // query t's own row of key blocks
        for (u32 j = 0; j < p.kk; j++) { u32 kb = idx[(b * p.seq + t) * p.kk + j]; if (kb == 0xffffffffu || kb > qb) continue;
            for (u32 s = kb * p.block; s < std::min((kb + 1) * p.block, t + 1); s++) ks.push_back(s); } }
    return ks;
}
static double relerr(const std::vector<float>& g, const std::vector<double>& w) {
    double n = 0, d = 0; for (size_t i = 0; i < g.size(); i++) { if (!std::isfinite(g[i]) && std::isfinite(w[i])) return 1e9; if (std::isfinite(w[i])) { n += (g[i] - w[i]) * (g[i] - w[i]); d += w[i] * w[i]; } else if (g[i] != w[i]) return 1e9; }
    return d > 0 ? sqrt(n / d) : sqrt(n);
}
// Per query row (b, t): kk distinct entries drawn from the key blocks 0..nkb and
// NONE, so rows hold future blocks (skipped) and some queries have no key.
static std::vector<u32> random_block_rows(const P& p, u32 nkb, std::mt19937& rng) {
    std::vector<u32> idx(p.batch * p.seq * p.kk);
    for (u32 r = 0; r < p.batch * p.seq; r++) { std::vector<u32> perm(nkb + 1); for (u32 i = 0; i < perm.size(); i++) perm[i] = i; std::shuffle(perm.begin(), perm.end(), rng);
        for (u32 j = 0; j < p.kk && j < perm.size(); j++) idx[r * p.kk + j] = perm[j] >= nkb ? 0xffffffffu : perm[j];
        for (u32 j = perm.size(); j < p.kk; j++) idx[r * p.kk + j] = 0xffffffffu; }
    return idx;
}
int main() {
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    int fails = 0;
    for (int cfg = 0; cfg < 6; cfg++) {
        P p{2, 37, 4, 2, cfg % 2 ? 40u : 16u, (u32)(cfg / 2), 0, 1};
        u32 nqb = 1;
        std::vector<u32> idx;
        (void)nqb;
        if (p.mode == 1) { p.kk = 9; idx.resize(p.batch * p.seq * p.kk);
            for (u32 r = 0; r < p.batch * p.seq; r++) { std::vector<u32> perm(p.seq + 3); for (u32 i = 0; i < perm.size(); i++) perm[i] = i; std::shuffle(perm.begin(), perm.end(), rng);
                for (u32 j = 0; j < p.kk; j++) idx[r * p.kk + j] = perm[j] >= p.seq ? 0xffffffffu : perm[j]; } }
        if (p.mode == 2) { p.block = 8; p.kk = 3; nqb = (p.seq + 7) / 8; idx = random_block_rows(p, nqb, rng); }
        size_t nq = (size_t)p.batch * p.seq * p.H * p.d, nk = (size_t)p.batch * p.seq * p.KV * p.d;
        std::vector<float> q(nq), k(nk), v(nk), dO(nq);
        for (auto* x : {&q, &k, &v, &dO}) for (auto& e : *x) e = nd(rng);
        float scale = 1.0f / sqrtf((float)p.d);
        Attn a{p.batch, p.seq, p.H, p.KV, p.d, scale, p.mode, p.kk, p.block};
        std::vector<float> o(nq, NAN), lse(p.batch * p.H * p.seq, NAN), dq(nq, NAN), dk(nk, NAN), dv(nk, NAN), D(p.batch * p.H * p.seq);
        u32 rows = p.batch * p.H * p.seq, dpl = p.d <= 32 ? 1 : 2;
        auto fwd = dpl == 1 ? attn_fwd_f32_d1 : attn_fwd_f32_d2;
        const u32* ip = idx.empty() ? nullptr : idx.data();
        launch(fwd, dim3((rows + 3) / 4), dim3(128), 0, a, (const float*)q.data(), (const float*)k.data(), (const float*)v.data(), ip, o.data(), lse.data());
        launch(dpl == 1 ? attn_bwd_pre_f32_d1 : attn_bwd_pre_f32_d2, dim3((rows + 3) / 4), dim3(128), 0, a, (const float*)o.data(), (const float*)dO.data(), D.data());
        launch(dpl == 1 ? attn_bwd_dq_f32_d1 : attn_bwd_dq_f32_d2, dim3((rows + 3) / 4), dim3(128), 0, a, (const float*)q.data(), (const float*)k.data(), (const float*)v.data(), (const float*)lse.data(), (const float*)D.data(), (const float*)dO.data(), ip, dq.data());
        u32 keys = p.batch * p.seq;
        std::vector<u32> cnt(keys, 5), off(keys + 1), cur(keys), list(keys * std::max(p.kk, 1u)), sorted(keys * std::max(p.kk, 1u));
        if (p.mode == 1) {
            u32 ent = keys * p.kk;
            launch(csr_zero, dim3(1), dim3(256), 0, cnt.data(), keys);
            launch(csr_count, dim3(2), dim3(256), 0, (const u32*)idx.data(), cnt.data(), p.batch, p.seq, p.kk);
            launch(csr_scan, dim3(1), dim3(1024), 0, (const u32*)cnt.data(), off.data(), cur.data(), keys);
            launch(csr_fill, dim3(2), dim3(256), 0, (const u32*)idx.data(), cur.data(), list.data(), p.batch, p.seq, p.kk);
            launch(csr_sort, dim3((keys + 3) / 4), dim3(128), 0, (const u32*)off.data(), (const u32*)list.data(), sorted.data(), keys);
            (void)ent;
        }
        u32 krows = p.batch * p.KV * p.seq;
        launch(dpl == 1 ? attn_bwd_dkdv_f32_d1 : attn_bwd_dkdv_f32_d2, dim3((krows + 3) / 4), dim3(128), 0, a, (const float*)q.data(), (const float*)k.data(), (const float*)v.data(), (const float*)lse.data(), (const float*)D.data(), (const float*)dO.data(), ip, (const u32*)off.data(), (const u32*)sorted.data(), dk.data(), dv.data());
        // reference
        std::vector<double> ro(nq, 0), rl(rows), rdq(nq, 0), rdk(nk, 0), rdv(nk, 0);
        u32 grp = p.H / p.KV;
        for (u32 b = 0; b < p.batch; b++) for (u32 h = 0; h < p.H; h++) for (u32 t = 0; t < p.seq; t++) {
            auto ks = keys_of(p, idx, b, t); u32 g = h / grp; size_t qo = ((size_t)(b * p.seq + t) * p.H + h) * p.d;
            std::vector<double> sc; double m = -INFINITY;
            for (u32 s : ks) { double x = 0; size_t ko = ((size_t)(b * p.seq + s) * p.KV + g) * p.d; for (u32 e = 0; e < p.d; e++) x += (double)q[qo + e] * k[ko + e]; x *= scale; sc.push_back(x); m = std::max(m, x); }
            double l = 0; for (double x : sc) l += exp(x - m);
            size_t row = (b * p.H + h) * p.seq + t;
            rl[row] = ks.empty() ? -INFINITY : m + log(l);
            std::vector<double> P(ks.size()); double Dt = 0;
            for (size_t i = 0; i < ks.size(); i++) { P[i] = exp(sc[i] - m) / l; size_t ko = ((size_t)(b * p.seq + ks[i]) * p.KV + g) * p.d; for (u32 e = 0; e < p.d; e++) ro[qo + e] += P[i] * v[ko + e]; }
            for (u32 e = 0; e < p.d; e++) Dt += ro[qo + e] * dO[qo + e];
            for (size_t i = 0; i < ks.size(); i++) { size_t ko = ((size_t)(b * p.seq + ks[i]) * p.KV + g) * p.d; double dp = 0; for (u32 e = 0; e < p.d; e++) dp += (double)dO[qo + e] * v[ko + e];
                double ds = P[i] * (dp - Dt);
                for (u32 e = 0; e < p.d; e++) { rdv[ko + e] += P[i] * dO[qo + e]; rdq[qo + e] += scale * ds * k[ko + e]; rdk[ko + e] += scale * ds * q[qo + e]; } }
        }
        double e1 = relerr(o, ro), e2 = relerr(lse, rl), e3 = relerr(dq, rdq), e4 = relerr(dk, rdk), e5 = relerr(dv, rdv);
        bool ok = e1 < 1e-5 && e2 < 1e-5 && e3 < 1e-5 && e4 < 1e-5 && e5 < 1e-5;
        fails += !ok;
        printf("attention mode %u d %u: o %.2e lse %.2e dq %.2e dk %.2e dv %.2e %s\n", p.mode, p.d, e1, e2, e3, e4, e5, ok ? "ok" : "FAIL");
        // indexer_kl with the same pattern: scores random.
        std::vector<float> sc(p.batch * p.seq * p.seq), loss(p.batch * p.seq, NAN), dsc(sc.size(), NAN);
        for (auto& x : sc) x = nd(rng);
        launch(dpl == 1 ? indexer_kl_f32_d1 : indexer_kl_f32_d2, dim3((keys + 3) / 4), dim3(128), 0, a, (const float*)q.data(), (const float*)k.data(), (const float*)lse.data(), (const float*)sc.data(), ip, loss.data(), dsc.data(), 0u, p.seq, 1u, 0u);
        std::vector<double> rloss(keys, 0), rds(sc.size(), 0);
        for (u32 b = 0; b < p.batch; b++) for (u32 t = 0; t < p.seq; t++) {
            auto ks = keys_of(p, idx, b, t); if (ks.empty()) continue; size_t row = b * p.seq + t;
            double m = -INFINITY; for (u32 s : ks) m = std::max(m, (double)sc[row * p.seq + s]);
            double z = 0; for (u32 s : ks) z += exp(sc[row * p.seq + s] - m);
            for (u32 s : ks) { double pp = 0;
                for (u32 h = 0; h < p.H; h++) { double l = rl[(b * p.H + h) * p.seq + t]; size_t qo = ((size_t)(b * p.seq + t) * p.H + h) * p.d, ko = ((size_t)(b * p.seq + s) * p.KV + h / grp) * p.d; double x = 0; for (u32 e = 0; e < p.d; e++) x += (double)q[qo + e] * k[ko + e]; pp += exp(scale * x - l) / p.H; }
                double lr = sc[row * p.seq + s] - m - log(z); if (pp > 0) rloss[row] += pp * (log(pp) - lr); rds[row * p.seq + s] = exp(lr) - pp; }
        }
        double e6 = relerr(loss, rloss), e7 = relerr(dsc, rds);
        bool ok2 = e6 < 1e-4 && e7 < 1e-5; fails += !ok2;
        printf("indexer_kl mode %u: loss %.2e dscores %.2e %s\n", p.mode, e6, e7, ok2 ? "ok" : "FAIL");
        // The same over two tiles of query rows: [batch, nq, seq] scores and dscores, loss rows of the tile;
        // then the tiles again with the row sample every 3, phase 1 (rows t % 3 != 1: loss 0, dscores 0).
        for (u32 every : {1u, 3u}) {
            u32 phase = every == 1 ? 0u : 1u;
            std::vector<double> sloss = rloss, sds2 = rds;
            for (u32 b = 0; b < p.batch; b++) for (u32 t = 0; t < p.seq; t++) if (t % every != phase) {
                size_t row = b * p.seq + t; sloss[row] = 0; std::fill_n(sds2.begin() + row * p.seq, p.seq, 0.0); }
            std::vector<float> tloss(keys, NAN), tds(sc.size(), NAN);
            u32 cut = p.seq / 3;
            for (u32 q0 : {0u, cut}) {
                u32 nq = q0 == 0 ? cut : p.seq - cut;
                std::vector<float> ssc(p.batch * nq * p.seq), sds(ssc.size(), NAN);
                for (u32 b = 0; b < p.batch; b++) std::copy_n(sc.begin() + ((size_t)b * p.seq + q0) * p.seq, nq * p.seq, ssc.begin() + (size_t)b * nq * p.seq);
                launch(dpl == 1 ? indexer_kl_f32_d1 : indexer_kl_f32_d2, dim3((p.batch * nq + 3) / 4), dim3(128), 0, a, (const float*)q.data(), (const float*)k.data(), (const float*)lse.data(), (const float*)ssc.data(), ip, tloss.data(), sds.data(), q0, nq, every, phase);
                for (u32 b = 0; b < p.batch; b++) std::copy_n(sds.begin() + (size_t)b * nq * p.seq, nq * p.seq, tds.begin() + ((size_t)b * p.seq + q0) * p.seq);
            }
            double e8 = relerr(tloss, sloss), e9 = relerr(tds, sds2);
            bool ok3 = e8 < 1e-4 && e9 < 1e-5; fails += !ok3;
            printf("indexer_kl tiled mode %u every %u: loss %.2e dscores %.2e %s\n", p.mode, every, e8, e9, ok3 ? "ok" : "FAIL");
        }
    }
    // The tiled forward (dense, and blocks with block % 32 == 0; d <= 64) against the same reference.
    // Blocks of any size: the tile visits the union of its queries' key tiles
    // with a per-query key mask (block 8, 16, 48 straddle the 32-key tiles).
    for (int cfg = 0; cfg < 9; cfg++) {
        P p{2, 75, 4, 2, cfg % 3 == 0 ? 16u : (cfg % 3 == 1 ? 40u : (cfg < 3 ? 64u : 128u)), cfg < 3 ? 0u : 2u, 0, 1};
        if (cfg == 1) p.d = 96;
        if (cfg == 8) p.d = 64;
        std::vector<u32> idx;
        if (p.mode == 2) { const u32 blocks[] = {32, 64, 32, 8, 16, 48}; p.block = blocks[cfg - 3]; p.kk = cfg == 6 ? 4 : 2; u32 nqb = (p.seq + p.block - 1) / p.block;
            idx = random_block_rows(p, nqb, rng); }
        size_t nq = (size_t)p.batch * p.seq * p.H * p.d, nk = (size_t)p.batch * p.seq * p.KV * p.d;
        std::vector<float> q(nq), k(nk), v(nk), dO(nq);
        for (auto* x : {&q, &k, &v, &dO}) for (auto& e : *x) e = nd(rng);
        float scale = 1.0f / sqrtf((float)p.d);
        Attn a{p.batch, p.seq, p.H, p.KV, p.d, scale, p.mode, p.kk, p.block};
        u32 rows = p.batch * p.H * p.seq;
        std::vector<float> o(nq, NAN), lse(rows, NAN), D(rows, NAN), dq(nq, NAN), dk(nk, NAN), dv(nk, NAN);
        int dp = p.d <= 32 ? 1 : (p.d <= 64 ? 2 : 4);
        const u32* ip = idx.empty() ? nullptr : idx.data();
        dim3 qgrid((p.seq + 31) / 32, p.H, p.batch), kgrid((p.seq + 31) / 32, p.KV, p.batch);
        launch(dp == 1 ? attn_fwd_tiled_f32_d1 : dp == 2 ? attn_fwd_tiled_f32_d2 : attn_fwd_tiled_f32_d4, qgrid, dim3(128), tsm(3, 1, dp, p.seq), a, (const float*)q.data(), (const float*)k.data(), (const float*)v.data(), ip, o.data(), lse.data());
        launch(dp == 1 ? attn_bwd_pre_f32_d1 : dp == 2 ? attn_bwd_pre_f32_d2 : attn_bwd_pre_f32_d4, dim3((rows + 3) / 4), dim3(128), 0, a, (const float*)o.data(), (const float*)dO.data(), D.data());
        launch(dp == 1 ? attn_bwd_dq_tiled_f32_d1 : dp == 2 ? attn_bwd_dq_tiled_f32_d2 : attn_bwd_dq_tiled_f32_d4, qgrid, dim3(128), tsm(4, 1, dp, p.seq), a, (const float*)q.data(), (const float*)k.data(), (const float*)v.data(), (const float*)lse.data(), (const float*)D.data(), (const float*)dO.data(), ip, dq.data());
        launch(dp == 1 ? attn_bwd_dkdv_tiled_f32_d1 : dp == 2 ? attn_bwd_dkdv_tiled_f32_d2 : attn_bwd_dkdv_tiled_f32_d4, kgrid, dim3(128), tsm(4, 2, dp, p.seq), a, (const float*)q.data(), (const float*)k.data(), (const float*)v.data(), (const float*)lse.data(), (const float*)D.data(), (const float*)dO.data(), ip, dk.data(), dv.data());
        std::vector<double> ro(nq, 0), rl(rows), rdq(nq, 0), rdk(nk, 0), rdv(nk, 0);
        u32 grp = p.H / p.KV;
        for (u32 b = 0; b < p.batch; b++) for (u32 h = 0; h < p.H; h++) for (u32 t = 0; t < p.seq; t++) {
            auto ks = keys_of(p, idx, b, t); u32 g = h / grp; size_t qo = ((size_t)(b * p.seq + t) * p.H + h) * p.d;
            std::vector<double> sc; double m = -INFINITY;
            for (u32 s : ks) { double x = 0; size_t ko = ((size_t)(b * p.seq + s) * p.KV + g) * p.d; for (u32 e = 0; e < p.d; e++) x += (double)q[qo + e] * k[ko + e]; x *= scale; sc.push_back(x); m = std::max(m, x); }
            double l = 0; for (double x : sc) l += exp(x - m);
            rl[(b * p.H + h) * p.seq + t] = ks.empty() ? -INFINITY : m + log(l);
            std::vector<double> P(ks.size()); double Dt = 0;
            for (size_t i = 0; i < ks.size(); i++) { P[i] = exp(sc[i] - m) / l; size_t ko = ((size_t)(b * p.seq + ks[i]) * p.KV + g) * p.d; for (u32 e = 0; e < p.d; e++) ro[qo + e] += P[i] * v[ko + e]; }
            for (u32 e = 0; e < p.d; e++) Dt += ro[qo + e] * dO[qo + e];
            for (size_t i = 0; i < ks.size(); i++) { size_t ko = ((size_t)(b * p.seq + ks[i]) * p.KV + g) * p.d; double dp = 0; for (u32 e = 0; e < p.d; e++) dp += (double)dO[qo + e] * v[ko + e];
                double ds = P[i] * (dp - Dt);
                for (u32 e = 0; e < p.d; e++) { rdv[ko + e] += P[i] * dO[qo + e]; rdq[qo + e] += scale * ds * k[ko + e]; rdk[ko + e] += scale * ds * q[qo + e]; } }
        }
        double e3 = relerr(dq, rdq), e4 = relerr(dk, rdk), e5 = relerr(dv, rdv);
        bool okb = e3 < 1e-5 && e4 < 1e-5 && e5 < 1e-5; fails += !okb;
        printf("tiled backward mode %u block %u d %u: dq %.2e dk %.2e dv %.2e %s\n", p.mode, p.block, p.d, e3, e4, e5, okb ? "ok" : "FAIL");
        double e1 = relerr(o, ro), e2 = relerr(lse, rl);
        bool ok = e1 < 1e-5 && e2 < 1e-5; fails += !ok;
        printf("tiled forward mode %u block %u d %u: o %.2e lse %.2e %s\n", p.mode, p.block, p.d, e1, e2, ok ? "ok" : "FAIL");
    }
    // Half-precision storage: the bf16 and f16 variants of the tiled forward
    // against the f32 kernel on the same (rounded) inputs.
    {
        u32 B = 1, S = 40, H = 2, d = 48;
        size_t n = (size_t)B * S * H * d;
        std::vector<float> q(n), k(n), v(n);
        for (auto* x : {&q, &k, &v}) for (auto& e : *x) e = from_f32_round(nd(rng));
        Attn a{B, S, H, H, d, 1.0f / sqrtf((float)d), 0, 0, 1};
        std::vector<float> o(n), lse(B * H * S), lse2(B * H * S), lse3(B * H * S);
        launch(attn_fwd_tiled_f32_d2, dim3(2, H, B), dim3(128), tsm(3, 1, 2, S), a, (const float*)q.data(), (const float*)k.data(), (const float*)v.data(), (const u32*)nullptr, o.data(), lse.data());
        std::vector<bf16> qb(n), kb(n), vb(n), ob(n);
        std::vector<f16> qh(n), kh(n), vh(n), oh(n);
        for (size_t i = 0; i < n; i++) { qb[i] = from_f32<bf16>(q[i]); kb[i] = from_f32<bf16>(k[i]); vb[i] = from_f32<bf16>(v[i]); qh[i] = from_f32<f16>(q[i]); kh[i] = from_f32<f16>(k[i]); vh[i] = from_f32<f16>(v[i]); }
        launch(attn_fwd_tiled_bf16_d2, dim3(2, H, B), dim3(128), tsm(3, 1, 2, S), a, (const bf16*)qb.data(), (const bf16*)kb.data(), (const bf16*)vb.data(), (const u32*)nullptr, ob.data(), lse2.data());
        launch(attn_fwd_tiled_f16_d2, dim3(2, H, B), dim3(128), tsm(3, 1, 2, S), a, (const f16*)qh.data(), (const f16*)kh.data(), (const f16*)vh.data(), (const u32*)nullptr, oh.data(), lse3.data());
        std::vector<float> gb(n), gh(n);
        for (size_t i = 0; i < n; i++) { gb[i] = to_f32(ob[i]); gh[i] = to_f32(oh[i]); }
        std::vector<double> want(o.begin(), o.end());
        double eb = relerr(gb, want), eh = relerr(gh, want), el = relerr(lse2, std::vector<double>(lse.begin(), lse.end()));
        bool ok = eb < 1e-2 && eh < 2e-3 && el < 1e-6; fails += !ok;
        printf("tiled forward bf16 %.2e f16 %.2e (lse %.2e) %s\n", eb, eh, el, ok ? "ok" : "FAIL");
    }
    return fails != 0;
}
