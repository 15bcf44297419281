// y = x · Wᵀ with a quantized weight W [n, k] (layouts and the exact
// dequantization rule: src/quant/format.rs), x [m, k] in f32/f16/bf16,
// f32 accumulation, y rounded once to x's dtype. Glue: src/backend/cuda/qmatmul.rs.
//
// Summation order (the same in both kernels, so a row's bits never depend on
// m: batch invariance). k is cut into units of four inputs (p = 4u .. 4u+3;
// every format's k is a multiple of 4). Thread t of the QM_THREADS = 128 of a
// block owns the units u ≡ t (mod 128) and accumulates, for each output it
// holds, in increasing u and within a unit increasing p:
//     acc = fmaf(x[i][p], w[j][p], acc)
// (fmaf written out: contraction by the compiler could differ between the
// two kernels). The 128 partials of an output are then added in one fixed
// order: a butterfly within each warp (warp_sum: every lane ends with the
// same bits, a + b = b + a), then (warp0 + warp1) + (warp2 + warp3).
//
// w[j][p] is dequantized in registers exactly by the rule: one f32 multiply
// scale · (small integer), or an f16 value widened. dp4a / mma (int8) and
// mma.sp (2:4) are not used: they need x quantized to integers or rounded to
// f16/bf16 for the tensor cores, and then the product is no longer
// Σ x·(scale·q) in f32 as defined; the kernels below are FFMA loops over
// weights dequantized in the inner loop, with the memory traffic of the
// packed format (what decode is bound by).
//
// qmv: one row, QM_CH = 4 output channels per block (decode, m < 4);
// qmm: QMM_ROWS = 8 rows × 4 channels per block, each dequantized weight unit
// used for the 8 rows (prefill). Rows past m read row m − 1 and are not
// stored; channels past n read channel n − 1 and are not stored.
// Grid: x = ⌈n / 4⌉ channel tiles, y = rows (qmv) or 8-row tiles (qmm) from
// row0 (the host splits m past 65535 tiles into launches).

#define QM_THREADS 128
#define QM_CH 4
#define QMM_ROWS 8

#define QF_INT8 0
#define QF_INT4 1
#define QF_S24 2
#define QF_S24_I8 3

// Byte b of w as a signed integer (two's complement), in f32.
__device__ __forceinline__ float q_sbyte(u32 w, u32 b) { return (float)(((int)(w << (24 - 8 * b))) >> 24); }

// w[j][4u .. 4u+3] by the dequantization rule.
template <int F>
__device__ __forceinline__ void q_deq(const u32* q, const float* scale, const u32* aux, u32 j, u32 u, u32 k, u32 group,
                                      u32 asym, float w[4]) {
    if (F == QF_INT8) {
        u32 v = q[(size_t)j * (k / 4) + u];
        float s = scale[j];
#pragma unroll
        for (int e = 0; e < 4; e++) w[e] = s * q_sbyte(v, e);
    } else if (F == QF_INT4) {
        // Nibbles 4(u%2) .. 4(u%2)+3 of word u/2.
        u32 v = q[(size_t)j * (k / 8) + u / 2] >> (16 * (u & 1));
        u32 g = 4 * u / group;
        float s = scale[(size_t)j * (k / group) + g];
        int z = 8;
        if (asym) z = (int)((aux[(size_t)j * ((k / group + 7) / 8) + g / 8] >> (4 * (g % 8))) & 15u);
#pragma unroll
        for (int e = 0; e < 4; e++) w[e] = s * (float)((int)((v >> (4 * e)) & 15u) - z);
    } else {
        // Group u keeps positions a < b: nibble u%8 of word u/8 of the row's metadata.
        u32 pos = (aux[(size_t)j * ((k + 31) / 32) + u / 8] >> (4 * (u % 8))) & 15u;
        u32 a = pos & 3u, b = pos >> 2;
        float lo, hi;
        if (F == QF_S24) {
            u32 v = q[(size_t)j * (k / 4) + u];
            f16 l, h;
            l.bits = (u16)(v & 0xffffu);
            h.bits = (u16)(v >> 16);
            lo = to_f32(l);
            hi = to_f32(h);
        } else {
            u32 v = q[(size_t)j * (k / 8) + u / 2];
            float s = scale[j];
            u32 sh = 2 * (u & 1);
            lo = s * q_sbyte(v, sh);
            hi = s * q_sbyte(v, sh + 1);
        }
#pragma unroll
        for (u32 e = 0; e < 4; e++) w[e] = e == a ? lo : (e == b ? hi : 0.0f);
    }
}

template <typename T, int F, int R>
__device__ void qmatmul_body(const T* x, const u32* q, const float* scale, const u32* aux, T* y, u32 m, u32 n, u32 k,
                             u32 group, u32 asym, u32 row0) {
    __shared__ float red[QM_THREADS / 32][R * QM_CH];
    u32 j0 = blockIdx.x * QM_CH;
    u32 i0 = row0 + blockIdx.y * R;
    u32 t = threadIdx.x;
    float acc[R][QM_CH];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int c = 0; c < QM_CH; c++) acc[r][c] = 0.0f;
    u32 nu = k / 4;
    for (u32 u = t; u < nu; u += QM_THREADS) {
        float w[QM_CH][4];
#pragma unroll
        for (int c = 0; c < QM_CH; c++) q_deq<F>(q, scale, aux, min(j0 + c, n - 1), u, k, group, asym, w[c]);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const T* xr = x + (size_t)min(i0 + r, m - 1) * k + 4 * u;
            float xv[4];
#pragma unroll
            for (int e = 0; e < 4; e++) xv[e] = ld(xr, e);
#pragma unroll
            for (int e = 0; e < 4; e++)
#pragma unroll
                for (int c = 0; c < QM_CH; c++) acc[r][c] = fmaf(xv[e], w[c][e], acc[r][c]);
        }
    }
    u32 lane = t & 31, wid = t >> 5;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int c = 0; c < QM_CH; c++) {
            float v = warp_sum(acc[r][c]);
            if (lane == 0) red[wid][r * QM_CH + c] = v;
        }
    __syncthreads();
    if (t < R * QM_CH) {
        u32 i = i0 + t / QM_CH, j = j0 + t % QM_CH;
        if (i < m && j < n) st(y, (size_t)i * n + j, (red[0][t] + red[1][t]) + (red[2][t] + red[3][t]));
    }
}

#define QMATMUL(FN, F, S, T) \
    extern "C" __global__ void __launch_bounds__(QM_THREADS) qmv_##FN##_##S(const T* x, const u32* q, const float* scale, const u32* aux, T* y, u32 m, u32 n, u32 k, u32 group, u32 asym, u32 row0) { \
        qmatmul_body<T, F, 1>(x, q, scale, aux, y, m, n, k, group, asym, row0); } \
    extern "C" __global__ void __launch_bounds__(QM_THREADS) qmm_##FN##_##S(const T* x, const u32* q, const float* scale, const u32* aux, T* y, u32 m, u32 n, u32 k, u32 group, u32 asym, u32 row0) { \
        qmatmul_body<T, F, QMM_ROWS>(x, q, scale, aux, y, m, n, k, group, asym, row0); }
#define QMATMUL_FORMATS(S, T) \
    QMATMUL(int8, QF_INT8, S, T) QMATMUL(int4, QF_INT4, S, T) QMATMUL(s24, QF_S24, S, T) QMATMUL(s24i8, QF_S24_I8, S, T)
FOR_FLOATS(QMATMUL_FORMATS)
