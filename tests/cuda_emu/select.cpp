#include <algorithm>
#include <random>
static std::vector<u32> ref_row(const float* row, u32 r, u32 k, bool blocks) {
    auto key = [](float s) { return std::isnan(s) ? -INFINITY : s; };
    auto better = [&](std::pair<float, u32> a, std::pair<float, u32> b) {
        float sa = key(a.first), sb = key(b.first);
        return sa > sb || (sa == sb && a.second < b.second);
    };
    std::vector<u32> kept;
    u32 first = 0;
    if (blocks) {
        for (u32 f : {r, 0u}) if (kept.size() < k && std::find(kept.begin(), kept.end(), f) == kept.end()) kept.push_back(f);
        first = 1;
    }
    u32 upto = blocks ? r : r + 1;
    std::vector<std::pair<float, u32>> c;
    for (u32 s = first; s < std::max(upto, first); s++) c.push_back({row[s], s});
    std::stable_sort(c.begin(), c.end(), better);
    for (size_t i = 0; i < c.size() && kept.size() < k; i++) kept.push_back(c[i].second);
    std::sort(kept.begin(), kept.end());
    kept.resize(k, 0xffffffffu);
    return kept;
}
int main() {
    std::mt19937 rng(1);
    int bad = 0;
    // Token mode: [batch, seq, seq], row t sees 0..=t. Block mode: [batch, seq,
    // nkb], row t sees the key blocks 0..=t/block (select_row(row, t/block, k, true)).
    // 300 rows (token mode): rows past 256 candidates take the radix select.
    for (u32 rows : {1u, 5u, 40u, 100u, 300u}) for (u32 k : {1u, 2u, 3u, 7u, 140u}) for (u32 block : {0u, 3u, 16u}) {
        if (rows == 300 && (block != 0 || (k != 7 && k != 140))) continue;
        u32 batch = rows > 40 ? 1 : 2, cols = block ? (rows + block - 1) / block : rows;
        std::vector<float> sc(batch * rows * cols);
        for (auto& x : sc) x = (float)(rng() % 7) - 3.0f;
        if (rows > 5 && cols > 2) { sc[3 * cols + 1] = NAN; sc[4 * cols + 0] = -0.0f; sc[4 * cols + 2] = 0.0f; sc[6 * cols + 1] = -INFINITY; sc[6 * cols + 2] = NAN; }
        std::vector<u32> idx(batch * rows * k, 7);
        launch(select_topk, dim3(batch * rows), dim3(256), 0, (const float*)sc.data(), idx.data(), rows, cols, k, block);
        for (u32 row = 0; row < batch * rows; row++) {
            u32 t = row % rows;
            auto want = ref_row(&sc[row * cols], block ? t / block : t, k, block > 0);
            for (u32 j = 0; j < k; j++) if (idx[row * k + j] != want[j]) { if (bad++ < 5) printf("rows %u k %u block %u row %u slot %u: got %u want %u\n", rows, k, block, row, j, idx[row*k+j], want[j]); }
        }
    }
    printf("select: %s (%d mismatches)\n", bad ? "FAIL" : "ok", bad);
    return bad != 0;
}
