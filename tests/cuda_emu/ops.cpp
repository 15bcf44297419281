#include <random>
static std::mt19937 rng(5);
static std::normal_distribution<float> nd;
static std::vector<float> rv(size_t n) { std::vector<float> v(n); for (auto& x : v) x = nd(rng); return v; }
static int fails = 0;
static void check(const char* what, const std::vector<float>& g, const std::vector<double>& w, double tol = 1e-5) {
    double n = 0, d = 0; bool nf = false;
    for (size_t i = 0; i < g.size(); i++) { if (std::isinf(w[i]) && g[i] == w[i]) continue; if (!std::isfinite(g[i])) nf = true; n += (g[i] - w[i]) * (g[i] - w[i]); d += w[i] * w[i]; }
    double e = d > 0 ? sqrt(n / d) : sqrt(n);
    bool ok = !nf && e <= tol; fails += !ok;
    printf("%-28s %.2e %s\n", what, e, ok ? "ok" : "FAIL");
}
#define CF (const float*)
int main() {
    // ---- indexer
    for (u32 D : {8u, 32u, 40u}) {
        u32 B = 2, S = 35, H = 3, blk = 8;
        auto qi = rv(B * S * H * D), ki = rv(B * S * D), w = rv(B * S * H), ds = rv(B * S * S);
        std::vector<double> I(B * S * S);
        for (u32 b = 0; b < B; b++) for (u32 t = 0; t < S; t++) for (u32 s = 0; s < S; s++) {
            if (s > t) { I[(b * S + t) * S + s] = -INFINITY; continue; }
            double acc = 0; for (u32 j = 0; j < H; j++) { double l = 0; for (u32 e = 0; e < D; e++) l += (double)qi[((b * S + t) * H + j) * D + e] * ki[(b * S + s) * D + e]; acc += w[(b * S + t) * H + j] * std::max(l, 0.0); }
            I[(b * S + t) * S + s] = acc; }
        std::vector<float> sc(B * S * S, NAN);
        launch(indexer_scores_f32, dim3((S + 15) / 16, (S + 15) / 16, B), dim3(16, 16), 16 * (D + 1) * 4, CF qi.data(), CF ki.data(), CF w.data(), sc.data(), S, H, D, 0u, S);
        check("indexer_scores", sc, I);
        // Two tiles of query rows, [B, nq, S] each (the second crosses a 16-query tile of the grid).
        {
            std::vector<float> tsc(B * S * S, NAN);
            for (u32 q0 : {0u, 9u}) {
                u32 nq = q0 == 0 ? 9 : S - 9;
                std::vector<float> part(B * nq * S, NAN);
                launch(indexer_scores_f32, dim3((S + 15) / 16, (nq + 15) / 16, B), dim3(16, 16), 16 * (D + 1) * 4, CF qi.data(), CF ki.data(), CF w.data(), part.data(), S, H, D, q0, nq);
                for (u32 b = 0; b < B; b++) std::copy_n(part.begin() + (size_t)b * nq * S, nq * S, tsc.begin() + ((size_t)b * S + q0) * S);
            }
            check("indexer_scores (tiles)", tsc, I);
        }
        // Per-query pooling [B, S, nb], block sizes below, at and above the 16-key chunk.
        for (u32 bl : {blk, 5u, 20u}) {
            u32 nkb = (S + bl - 1) / bl;
            std::vector<float> pooled(B * S * nkb, NAN);
            launch(indexer_block_scores_f32, dim3(nkb, (S + 15) / 16, B), dim3(16, 16), 16 * (D + 1) * 4, CF qi.data(), CF ki.data(), CF w.data(), pooled.data(), S, H, D, bl);
            std::vector<double> rp(B * S * nkb, -INFINITY);
            for (u32 b = 0; b < B; b++) for (u32 t = 0; t < S; t++) for (u32 s = 0; s <= t; s++) { double& pp = rp[(b * S + t) * nkb + s / bl]; pp = std::max(pp, I[(b * S + t) * S + s]); }
            char name[64]; snprintf(name, sizeof name, "block_scores (block %u)", bl);
            check(name, pooled, rp);
        }
        std::vector<float> dqi(qi.size(), NAN), dki(ki.size(), NAN), dw(w.size(), NAN);
        u32 dpl = D <= 32 ? 1 : 2;
        launch(dpl == 1 ? indexer_bwd_q_f32_d1 : indexer_bwd_q_f32_d2, dim3((B * S * H + 3) / 4), dim3(128), 0, CF qi.data(), CF ki.data(), CF w.data(), CF ds.data(), dqi.data(), dw.data(), B, S, H, D, 0u, S);
        launch(dpl == 1 ? indexer_bwd_k_f32_d1 : indexer_bwd_k_f32_d2, dim3((B * S + 3) / 4), dim3(128), 0, CF qi.data(), CF ki.data(), CF w.data(), CF ds.data(), dki.data(), B, S, H, D, 0u, S);
        // Tiled: dq_i, dw rows written by their own tile into one NaN-filled tensor; dk_i summed over the tiles.
        std::vector<float> tdq(qi.size(), NAN), tdw(w.size(), NAN), tdk(ki.size(), 0.0f);
        for (u32 q0 : {0u, 9u}) {
            u32 nq = q0 == 0 ? 9 : S - 9;
            std::vector<float> part(B * nq * S), dk_t(ki.size(), NAN);
            for (u32 b = 0; b < B; b++) std::copy_n(ds.begin() + ((size_t)b * S + q0) * S, nq * S, part.begin() + (size_t)b * nq * S);
            launch(dpl == 1 ? indexer_bwd_q_f32_d1 : indexer_bwd_q_f32_d2, dim3((B * nq * H + 3) / 4), dim3(128), 0, CF qi.data(), CF ki.data(), CF w.data(), CF part.data(), tdq.data(), tdw.data(), B, S, H, D, q0, nq);
            launch(dpl == 1 ? indexer_bwd_k_f32_d1 : indexer_bwd_k_f32_d2, dim3((B * S + 3) / 4), dim3(128), 0, CF qi.data(), CF ki.data(), CF w.data(), CF part.data(), dk_t.data(), B, S, H, D, q0, nq);
            for (size_t i = 0; i < tdk.size(); i++) tdk[i] += dk_t[i];
        }
        std::vector<double> rdq(qi.size(), 0), rdk(ki.size(), 0), rdw(w.size(), 0);
        for (u32 b = 0; b < B; b++) for (u32 t = 0; t < S; t++) for (u32 s = 0; s <= t; s++) for (u32 j = 0; j < H; j++) {
            size_t qo = ((b * S + t) * H + j) * D, ko = (b * S + s) * D; double l = 0; for (u32 e = 0; e < D; e++) l += (double)qi[qo + e] * ki[ko + e];
            double dI = ds[(b * S + t) * S + s], wj = w[(b * S + t) * H + j];
            rdw[(b * S + t) * H + j] += dI * std::max(l, 0.0);
            if (l > 0) for (u32 e = 0; e < D; e++) { rdq[qo + e] += dI * wj * ki[ko + e]; rdk[ko + e] += dI * wj * qi[qo + e]; } }
        check("indexer dq_i", dqi, rdq); check("indexer dk_i", dki, rdk); check("indexer dw", dw, rdw);
        check("indexer dq_i (tiles)", tdq, rdq); check("indexer dk_i (tiles)", tdk, rdk); check("indexer dw (tiles)", tdw, rdw);
    }
    // ---- layernorm
    { u32 R = 13, N = 77; auto x = rv(R * N), g = rv(N), bb = rv(N), dy = rv(R * N), dg0 = rv(N), db0 = rv(N);
      std::vector<float> y(R * N, NAN), mean(R, NAN), rstd(R, NAN), dx(R * N, NAN), dg = dg0, db = db0;
      launch(layernorm_fwd_f32, dim3((R + 7) / 8), dim3(256), 0, CF x.data(), CF g.data(), CF bb.data(), y.data(), mean.data(), rstd.data(), R, N, 1e-5f);
      launch(layernorm_bwd_dx_f32, dim3((R + 7) / 8), dim3(256), 0, CF dy.data(), CF x.data(), CF g.data(), CF mean.data(), CF rstd.data(), dx.data(), R, N);
      launch(layernorm_bwd_params_f32, dim3((N + 31) / 32), dim3(32, 8), 0, CF dy.data(), CF x.data(), CF mean.data(), CF rstd.data(), dg.data(), db.data(), R, N);
      std::vector<double> ry(R * N), rdx(R * N), rdg(dg0.begin(), dg0.end()), rdb(db0.begin(), db0.end());
      for (u32 r = 0; r < R; r++) { double mu = 0, var = 0; for (u32 j = 0; j < N; j++) mu += x[r * N + j]; mu /= N; for (u32 j = 0; j < N; j++) var += (x[r * N + j] - mu) * (x[r * N + j] - mu); var /= N; double rs = 1 / sqrt(var + 1e-5);
        double mg = 0, mgx = 0; for (u32 j = 0; j < N; j++) { double xh = (x[r * N + j] - mu) * rs; ry[r * N + j] = xh * g[j] + bb[j]; double gg = dy[r * N + j] * g[j]; mg += gg; mgx += gg * xh; rdg[j] += dy[r * N + j] * xh; rdb[j] += dy[r * N + j]; }
        mg /= N; mgx /= N; for (u32 j = 0; j < N; j++) { double xh = (x[r * N + j] - mu) * rs; rdx[r * N + j] = rs * (dy[r * N + j] * g[j] - mg - xh * mgx); } }
      check("layernorm y", y, ry); check("layernorm dx", dx, rdx, 1e-4); check("layernorm dgamma", dg, rdg); check("layernorm dbeta", db, rdb); }
    // ---- softmax (causal [2, 13, 40])
    { u32 T = 13, N = 40, R = 2 * T; auto x = rv(R * N), dy = rv(R * N); std::vector<float> y(R * N, NAN), dx(R * N, NAN);
      launch(softmax_fwd_f32, dim3((R + 7) / 8), dim3(256), 0, CF x.data(), y.data(), R, N, T, 1u);
      launch(softmax_bwd_f32, dim3((R + 7) / 8), dim3(256), 0, CF y.data(), CF dy.data(), dx.data(), R, N, T, 1u);
      std::vector<double> ry(R * N, 0), rdx(R * N, 0);
      for (u32 r = 0; r < R; r++) { u32 vis = std::min(r % T + 1 + (N - T), N); double m = -INFINITY, s = 0; for (u32 j = 0; j < vis; j++) m = std::max(m, (double)x[r * N + j]); for (u32 j = 0; j < vis; j++) s += exp(x[r * N + j] - m);
        double dot = 0; for (u32 j = 0; j < vis; j++) { ry[r * N + j] = exp(x[r * N + j] - m) / s; dot += (double)y[r * N + j] * dy[r * N + j]; } for (u32 j = 0; j < vis; j++) rdx[r * N + j] = y[r * N + j] * (dy[r * N + j] - dot); }
      check("softmax y", y, ry); check("softmax dx", dx, rdx); }
    // ---- cross entropy
    { u32 R = 5, V = 300; auto x = rv(R * V); std::vector<u32> tg{3, 9999, 0, 299, 7}; std::vector<float> loss(R, NAN), d(R * V, NAN);
      launch(ce_fwd_f32, dim3(R), dim3(256), 0, CF x.data(), (const u32*)tg.data(), loss.data(), V, 7u);
      launch(ce_bwd_f32, dim3(R), dim3(256), 0, CF x.data(), (const u32*)tg.data(), d.data(), V, 7u, 0.25f);
      std::vector<double> rl(R, 0), rd(R * V, 0);
      for (u32 r = 0; r < R; r++) { if (tg[r] >= V || tg[r] == 7) continue; double m = -INFINITY, s = 0; for (u32 j = 0; j < V; j++) m = std::max(m, (double)x[r * V + j]); for (u32 j = 0; j < V; j++) s += exp(x[r * V + j] - m);
        rl[r] = m + log(s) - x[r * V + tg[r]]; for (u32 j = 0; j < V; j++) rd[r * V + j] = 0.25 * (exp(x[r * V + j] - m) / s - (j == tg[r])); }
      check("cross_entropy loss", loss, rl); check("cross_entropy dlogits", d, rd); }
    // ---- embedding
    { u32 n = 50, V = 11, Dm = 37; std::vector<u32> ids(n); for (auto& i : ids) i = rng() % (V + 2); auto tab = rv(V * Dm), dout = rv(n * Dm), dt0 = rv(V * Dm);
      std::vector<float> out(n * Dm, NAN), dt = dt0;
      launch(embedding_fwd_f32, dim3(8), dim3(256), 0, (const u32*)ids.data(), CF tab.data(), out.data(), n, V, Dm);
      launch(embedding_bwd_f32, dim3(n), dim3(64), 0, (const u32*)ids.data(), CF dout.data(), dt.data(), n, V, Dm);
      std::vector<double> ro(n * Dm, 0), rt(dt0.begin(), dt0.end());
      for (u32 i = 0; i < n; i++) if (ids[i] < V) for (u32 c = 0; c < Dm; c++) { ro[i * Dm + c] = tab[ids[i] * Dm + c]; rt[ids[i] * Dm + c] += dout[i * Dm + c]; }
      check("embedding out", out, ro); check("embedding dtable", dt, rt); }
    // ---- reductions
    { u32 n = 1000; auto x = rv(n); std::vector<double> part(4); std::vector<float> out(1, NAN);
      launch(sum_squares_partial_f32, dim3(4), dim3(256), 0, CF x.data(), n, part.data());
      launch(sum_squares_final, dim3(1), dim3(256), 0, (const double*)part.data(), 4u, out.data());
      double s = 0; for (float v : x) s += (double)v * v; check("sum_squares", out, {s});
      std::vector<u32> ok(1, 7); launch(set_u32, dim3(1), dim3(32), 0, ok.data(), 1u); launch(all_finite_f32, dim3(4), dim3(256), 0, CF x.data(), n, ok.data());
      x[517] = INFINITY; std::vector<u32> ok2(1, 7); launch(set_u32, dim3(1), dim3(32), 0, ok2.data(), 1u); launch(all_finite_f32, dim3(4), dim3(256), 0, CF x.data(), n, ok2.data());
      bool good = ok[0] == 1 && ok2[0] == 0; fails += !good; printf("%-28s %s\n", "all_finite", good ? "ok" : "FAIL"); }
    // ---- sum_rows, bias_gelu, rope, gemm fallback
    { u32 R = 37, N = 19; auto x = rv(R * N), o0 = rv(N); std::vector<float> o = o0;
      launch(sum_rows_f32, dim3(1), dim3(32, 8), 0, CF x.data(), o.data(), R, N, 1.0f);
      std::vector<double> ro(o0.begin(), o0.end()); for (u32 r = 0; r < R; r++) for (u32 j = 0; j < N; j++) ro[j] += x[r * N + j]; check("sum_rows beta=1", o, ro); }
    { u32 B = 2, S = 5, H = 3, Dh = 16, half = 8, off = 4; auto x = rv(B * S * H * Dh); std::vector<float> cs(20 * half), sn(20 * half), y(x.size(), NAN);
      for (u32 p = 0; p < 20; p++) for (u32 i = 0; i < half; i++) { double a = p * pow(10000.0, -2.0 * i / Dh); cs[p * half + i] = cos(a); sn[p * half + i] = sin(a); }
      u32 pairs = B * S * H * half; launch(rope_f32, dim3(2), dim3(256), 0, CF x.data(), CF cs.data(), CF sn.data(), y.data(), pairs, S, H, half, off, -1.0f);
      std::vector<double> ry(x.size()); for (u32 v = 0; v < B * S * H; v++) { u32 pos = off + (v / H) % S; for (u32 i = 0; i < half; i++) { double c = cs[pos * half + i], s = -sn[pos * half + i], a = x[v * Dh + i], b = x[v * Dh + i + half]; ry[v * Dh + i] = a * c - b * s; ry[v * Dh + i + half] = a * s + b * c; } }
      check("rope inverse", y, ry); }
    for (int ta = 0; ta < 2; ta++) for (int tb = 0; tb < 2; tb++) {
      u32 Bt = 2, M = 17, N = 9, K = 33; auto A = rv(Bt * M * K), Bm = rv(K * N), C0 = rv(Bt * M * N); std::vector<float> C = C0;
      launch(gemm_tiled_f32, dim3((N + 15) / 16, (M + 15) / 16, Bt), dim3(16, 16), 0, CF A.data(), CF Bm.data(), C.data(), M, N, K, (u32)ta, (u32)tb, 1.5f, -0.5f, M * K, 0u, M * N);
      std::vector<double> rc(C.size()); for (u32 z = 0; z < Bt; z++) for (u32 i = 0; i < M; i++) for (u32 j = 0; j < N; j++) { double acc = 0; for (u32 p = 0; p < K; p++) acc += (double)A[z * M * K + (ta ? p * M + i : i * K + p)] * Bm[tb ? j * K + p : p * N + j]; rc[z * M * N + i * N + j] = 1.5 * acc - 0.5 * C0[z * M * N + i * N + j]; }
      check("gemm_tiled", C, rc); }
    // Row invariance (matmul_rows runs on gemm_tiled): each row of C computed
    // alone (m = 1) has the bits it gets among 40 rows.
    for (int tb = 0; tb < 2; tb++) {
      u32 M = 40, N = 20, K = 37; auto A = rv(M * K), Bm = rv(K * N), C0 = rv(M * N); std::vector<float> C = C0, C1 = C0;
      launch(gemm_tiled_f32, dim3((N + 15) / 16, (M + 15) / 16, 1), dim3(16, 16), 0, CF A.data(), CF Bm.data(), C.data(), M, N, K, 0u, (u32)tb, 0.75f, 1.0f, M * K, 0u, M * N);
      for (u32 i = 0; i < M; i++) launch(gemm_tiled_f32, dim3((N + 15) / 16, 1, 1), dim3(16, 16), 0, CF(A.data() + i * K), CF Bm.data(), C1.data() + i * N, 1u, N, K, 0u, (u32)tb, 0.75f, 1.0f, K, 0u, N);
      bool same = memcmp(C.data(), C1.data(), C.size() * 4) == 0; fails += !same; printf("%-28s %s\n", "gemm_tiled rows alone", same ? "ok" : "FAIL"); }
    // ---- bf16 / f16 conversions round to nearest even
    { int bad = 0; std::mt19937 r2(9); for (int i = 0; i < 200000; i++) { u32 bits = r2(); float f; memcpy(&f, &bits, 4);
        bf16 h = from_f32<bf16>(f); u32 x = bits; u16 want;
        if ((x & 0x7fffffff) > 0x7f800000) want = (x >> 16) | 0x40; else { u32 lsb = (x >> 16) & 1; want = (u16)((x + 0x7fff + lsb) >> 16); }
        if (h.bits != want) { if (bad++ < 3) printf("bf16 %08x: got %04x want %04x\n", bits, h.bits, want); } }
      fails += bad != 0; printf("%-28s %s\n", "bf16 rounding (RNE)", bad ? "FAIL" : "ok"); }
    printf("%s\n", fails ? "SOME FAILED" : "all ok");
    return fails != 0;
}
