// Rotary embedding, half-split convention. x, y: [batch, seq, heads, d];
// cos, sin: [max_pos, d/2] f32; position of token (b, t) is pos_offset + t.
//   y[i] = x[i]·c - x[i+d/2]·s',  y[i+d/2] = x[i]·s' + x[i+d/2]·c,  s' = sign·s
// (sign = -1 for the backward pass, a rotation by -angle). One thread per pair.

template <typename T>
__device__ void rope(const T* x, const float* cosv, const float* sinv, T* y, u32 pairs, u32 seq, u32 heads, u32 half,
                     u32 pos_offset, float sign) {
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        size_t vec = p / half;
        u32 i = (u32)(p % half);
        u32 pos = pos_offset + (u32)((vec / heads) % seq);
        float c = cosv[(size_t)pos * half + i], s = sign * sinv[(size_t)pos * half + i];
        size_t base = vec * 2 * half;
        float a = ld(x, base + i), b = ld(x, base + i + half);
        st(y, base + i, a * c - b * s);
        st(y, base + i + half, a * s + b * c);
    }
}

#define ROPE(S, T) \
    extern "C" __global__ void rope_##S(const T* x, const float* cosv, const float* sinv, T* y, u32 pairs, u32 seq, u32 heads, u32 half, u32 pos_offset, float sign) { \
        rope<T>(x, cosv, sinv, y, pairs, seq, heads, half, pos_offset, sign); }
FOR_FLOATS(ROPE)
