// Fallback GEMM, used when cuBLAS cannot be loaded, and for every
// row-invariant product (matmul_rows; see CudaBackend::matmul in ops.rs):
//   C[z] = alpha·op(A[z])·op(B[z or 0]) + beta·C[z]   (C not read when beta == 0)
// Row-major; A is [m, k] ([k, m] when ta), B is [k, n] ([n, k] when tb);
// sa, sb, sc are the element strides between batch entries (sb = 0: B shared).
// 16×16 shared-memory tiles, f32 accumulation. grid (ceil(n/16), ceil(m/16), batch).
// Row invariance: thread (i, j) alone sums A[i, p]·B[p, j] for p = 0, 1, ..,
// k-1 in that order (zeros past k), so C[i, j] depends on row i of A, column j
// of B and k, never on m or the other rows. Keep it so (no split-K, no
// m-dependent tiling).

template <typename T>
__device__ void gemm_tiled(const T* A, const T* B, T* C, u32 m, u32 n, u32 k, u32 ta, u32 tb, float alpha, float beta,
                           u32 sa, u32 sb, u32 sc) {
    __shared__ float As[16][17], Bs[16][17];
    u32 z = blockIdx.z, tx = threadIdx.x, ty = threadIdx.y;
    u32 i = blockIdx.y * 16 + ty, j = blockIdx.x * 16 + tx;
    const T* a = A + (size_t)z * sa;
    const T* b = B + (size_t)z * sb;
    float acc = 0.0f;
    for (u32 p0 = 0; p0 < k; p0 += 16) {
        u32 pa = p0 + tx, pb = p0 + ty;
        As[ty][tx] = (i < m && pa < k) ? ld(a, ta ? (size_t)pa * m + i : (size_t)i * k + pa) : 0.0f;
        Bs[ty][tx] = (j < n && pb < k) ? ld(b, tb ? (size_t)j * k + pb : (size_t)pb * n + j) : 0.0f;
        __syncthreads();
#pragma unroll
        for (int p = 0; p < 16; p++) acc += As[ty][p] * Bs[p][tx];
        __syncthreads();
    }
    if (i < m && j < n) {
        T* c = C + (size_t)z * sc + (size_t)i * n + j;
        st(c, 0, beta == 0.0f ? alpha * acc : alpha * acc + beta * ld(c, 0));
    }
}

#define GEMM(S, T) \
    extern "C" __global__ void gemm_tiled_##S(const T* A, const T* B, T* C, u32 m, u32 n, u32 k, u32 ta, u32 tb, float alpha, float beta, u32 sa, u32 sb, u32 sc) { \
        gemm_tiled<T>(A, B, C, m, n, k, ta, tb, alpha, beta, sa, sb, sc); }
FOR_FLOATS(GEMM)
