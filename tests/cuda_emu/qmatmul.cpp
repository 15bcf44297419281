#include <random>
// The quantized matmul kernels (kernels/qmatmul.cu) against a reference
// written from the layout table of src/quant/format.rs: every format (int8,
// int4 g32/g64/g128 symmetric and asymmetric, 2:4 f16 and 2:4 int8) × f32,
// f16, bf16 activations × a decode row and a ragged batch of 9 rows over 6
// channels (k up to 640, so a thread loops over several units; asymmetric
// zero points over several words).
// Batch invariance: every row of the qmm (8-row tiles) product must have the
// bits of the same row computed alone by qmv.
static std::mt19937 rng(12);
static int fails = 0;
typedef void (*QFn32)(const float*, const u32*, const float*, const u32*, float*, u32, u32, u32, u32, u32, u32);
typedef void (*QFn16)(const f16*, const u32*, const float*, const u32*, f16*, u32, u32, u32, u32, u32, u32);
typedef void (*QFnB16)(const bf16*, const u32*, const float*, const u32*, bf16*, u32, u32, u32, u32, u32, u32);
enum Fmt { INT8, INT4, S24, S24I8 };
static const char* fmt_name[] = {"int8", "int4", "2:4", "2:4-int8"};

static float bits_f(u32 b) { float f; memcpy(&f, &b, 4); return f; }
static u32 f_bits(float f) { u32 b; memcpy(&b, &f, 4); return b; }
// Round to nearest even, as from_f32<bf16> and half::bf16 do (no NaN here).
static u16 f2bf(float f) { u32 x = f_bits(f); return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16); }
static float bf2f(u16 b) { return bits_f((u32)b << 16); }
template <class T> struct Act;
template <> struct Act<float> { static float rnd(float v) { return v; } static float get(float v) { return v; } static float put(float v) { return v; } static const char* name() { return "f32"; } };
template <> struct Act<f16> { static float rnd(float v) { return emu_h2f(emu_f2h(v)); } static float get(f16 v) { return emu_h2f(v.bits); } static f16 put(float v) { f16 h; h.bits = emu_f2h(v); return h; } static const char* name() { return "f16"; } };
template <> struct Act<bf16> { static float rnd(float v) { return bf2f(f2bf(v)); } static float get(bf16 v) { return bf2f(v.bits); } static bf16 put(float v) { bf16 h; h.bits = f2bf(v); return h; } static const char* name() { return "bf16"; } };

struct QM {
    Fmt f; u32 n, k, group; bool asym;
    std::vector<u32> q, zero, meta;
    std::vector<float> scale;
    u32 qw() const { return (f == INT8 || f == S24) ? k / 4 : k / 8; }
    u32 sw() const { return f == INT4 ? k / group : (f == S24 ? 0 : 1); }
    u32 zw() const { return f == INT4 && asym ? (k / group + 7) / 8 : 0; }
    u32 mw() const { return f >= S24 ? (k + 31) / 32 : 0; }
};

static u32 nibble(const u32* w, u32 i) { return (w[i / 8] >> (4 * (i % 8))) & 15u; }
static int sbyte(const u32* w, u32 i) { return (int)(int8_t)(uint8_t)(w[i / 4] >> (8 * (i % 4))); }

// Random parts with the layout's invariants (2:4 positions increasing, f16 values finite).
static QM make(Fmt f, u32 n, u32 k, u32 group, bool asym) {
    QM m{f, n, k, group, asym, {}, {}, {}, {}};
    std::uniform_int_distribution<u32> word;
    std::uniform_real_distribution<float> sc(0.002f, 0.05f);
    std::normal_distribution<float> nd;
    m.q.resize(n * m.qw());
    for (auto& w : m.q) w = word(rng);
    if (f == S24)
        for (auto& w : m.q) w = (u32)emu_f2h(0.1f * nd(rng)) | ((u32)emu_f2h(0.1f * nd(rng)) << 16);
    m.scale.resize(n * m.sw());
    for (auto& s : m.scale) s = sc(rng);
    m.zero.resize(n * m.zw());
    for (auto& w : m.zero) w = word(rng);
    m.meta.assign(n * m.mw(), 0);
    static const u32 pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
    for (u32 j = 0; j < (f >= S24 ? n : 0); j++)
        for (u32 g = 0; g < k / 4; g++) {
            const u32* pr = pairs[word(rng) % 6];
            m.meta[j * m.mw() + g / 8] |= (pr[0] | (pr[1] << 2)) << (4 * (g % 8));
        }
    return m;
}

// The dequantization rule of src/quant/format.rs, element by element.
static std::vector<float> dequant(const QM& m) {
    std::vector<float> w(m.n * m.k, 0.0f);
    for (u32 j = 0; j < m.n; j++) {
        const u32* q = &m.q[j * m.qw()];
        for (u32 p = 0; p < m.k; p++) {
            float& o = w[j * m.k + p];
            if (m.f == INT8) o = m.scale[j] * (float)sbyte(q, p);
            else if (m.f == INT4) {
                u32 g = p / m.group;
                int z = m.asym ? (int)nibble(&m.zero[j * m.zw()], g) : 8;
                o = m.scale[j * m.sw() + g] * (float)((int)nibble(q, p) - z);
            }
        }
        if (m.f >= S24)
            for (u32 g = 0; g < m.k / 4; g++) {
                u32 pos = nibble(&m.meta[j * m.mw()], g);
                float lo, hi;
                if (m.f == S24) { lo = emu_h2f((u16)(q[g] & 0xffff)); hi = emu_h2f((u16)(q[g] >> 16)); }
                else { lo = m.scale[j] * (float)sbyte(q, 2 * g); hi = m.scale[j] * (float)sbyte(q, 2 * g + 1); }
                w[j * m.k + 4 * g + (pos & 3)] = lo;
                w[j * m.k + 4 * g + (pos >> 2)] = hi;
            }
    }
    return w;
}

template <class T, class Fn>
static void run(const char* label, Fn qmv, Fn qmm, const QM& qm, u32 m) {
    u32 n = qm.n, k = qm.k;
    std::normal_distribution<float> nd;
    std::vector<T> x(m * k);
    std::vector<float> xf(m * k);
    for (u32 i = 0; i < m * k; i++) { xf[i] = Act<T>::rnd(nd(rng)); x[i] = Act<T>::put(xf[i]); }
    auto w = dequant(qm);
    std::vector<double> want(m * n);
    for (u32 i = 0; i < m; i++)
        for (u32 j = 0; j < n; j++) {
            double a = 0;
            for (u32 p = 0; p < k; p++) a += (double)xf[i * k + p] * w[j * k + p];
            want[i * n + j] = a;
        }
    const float* sc = qm.scale.empty() ? nullptr : qm.scale.data();
    const u32* aux = !qm.zero.empty() ? qm.zero.data() : (!qm.meta.empty() ? qm.meta.data() : nullptr);
    T nan = Act<T>::put(NAN);
    // The batch: qmv below 4 rows, qmm (8-row tiles) from 4, as the host picks.
    std::vector<T> y(m * n, nan);
    launch(m < 4 ? qmv : qmm, dim3((n + 3) / 4, m < 4 ? m : (m + 7) / 8), dim3(128), 0, (const T*)x.data(), (const u32*)qm.q.data(), sc, aux, y.data(), m, n, k, qm.group, (u32)qm.asym, 0u);
    // Every row alone (qmv), and the batch again from row0 = 3 in one launch (the host's row chunks).
    std::vector<T> alone(m * n, nan), tail(m * n, nan);
    for (u32 i = 0; i < m; i++)
        launch(qmv, dim3((n + 3) / 4, 1), dim3(128), 0, (const T*)(x.data() + i * k), (const u32*)qm.q.data(), sc, aux, alone.data() + i * n, 1u, n, k, qm.group, (u32)qm.asym, 0u);
    if (m >= 4) {
        launch(qmm, dim3((n + 3) / 4, (m - 3 + 7) / 8), dim3(128), 0, (const T*)x.data(), (const u32*)qm.q.data(), sc, aux, tail.data(), m, n, k, qm.group, (u32)qm.asym, 3u);
        std::copy_n(y.begin(), 3 * n, tail.begin());
    }
    double num = 0, den = 0;
    bool finite = true, same = true;
    for (u32 i = 0; i < m * n; i++) {
        float g = Act<T>::get(y[i]);
        finite &= std::isfinite(g);
        num += (g - want[i]) * (g - want[i]);
        den += want[i] * want[i];
        same &= memcmp(&y[i], &alone[i], sizeof(T)) == 0;
        if (m >= 4) same &= memcmp(&y[i], &tail[i], sizeof(T)) == 0;
    }
    double err = sqrt(num / den), tol = sizeof(T) == 4 ? 1e-5 : 1e-2;
    bool ok = finite && err <= tol && same;
    fails += !ok;
    printf("  %-40s %-4s m=%-2u n=%u k=%-3u err %.2e %s%s\n", label, Act<T>::name(), m, n, k, err, ok ? "ok" : "FAIL",
           same ? "" : " (rows alone differ from the batch)");
}

#define FNS(F, S) qmv_##F##_##S, qmm_##F##_##S
template <class T> struct Fns;
template <> struct Fns<float> { static QFn32 get(Fmt f, bool mm) { QFn32 t[4][2] = {{FNS(int8, f32)}, {FNS(int4, f32)}, {FNS(s24, f32)}, {FNS(s24i8, f32)}}; return t[f][mm]; } };
template <> struct Fns<f16> { static QFn16 get(Fmt f, bool mm) { QFn16 t[4][2] = {{FNS(int8, f16)}, {FNS(int4, f16)}, {FNS(s24, f16)}, {FNS(s24i8, f16)}}; return t[f][mm]; } };
template <> struct Fns<bf16> { static QFnB16 get(Fmt f, bool mm) { QFnB16 t[4][2] = {{FNS(int8, bf16)}, {FNS(int4, bf16)}, {FNS(s24, bf16)}, {FNS(s24i8, bf16)}}; return t[f][mm]; } };

template <class T>
static void all_formats() {
    struct Case { Fmt f; u32 group; bool asym; u32 k_small; };
    std::vector<Case> cases = {{INT8, 0, false, 36}, {S24, 0, false, 36}, {S24I8, 0, false, 24}};
    for (u32 g : {32u, 64u, 128u})
        for (bool a : {false, true}) cases.push_back({INT4, g, a, 2 * g});
    for (const Case& c : cases) {
        char label[64];
        if (c.f == INT4) snprintf(label, sizeof label, "int4 g%u%s", c.group, c.asym ? " asym" : "");
        else snprintf(label, sizeof label, "%s", fmt_name[c.f]);
        // A decode row with a short k, then a ragged batch with k = 640 (5 units per thread).
        run<T>(label, Fns<T>::get(c.f, false), Fns<T>::get(c.f, true), make(c.f, 6, c.k_small, c.group, c.asym), 1);
        run<T>(label, Fns<T>::get(c.f, false), Fns<T>::get(c.f, true), make(c.f, 6, 640, c.group, c.asym), 9);
    }
}

int main() {
    all_formats<float>();
    all_formats<f16>();
    all_formats<bf16>();
    printf(fails ? "qmatmul: %d FAILED\n" : "qmatmul: all ok\n", fails);
    return fails != 0;
}
