// The MXFP8 recipe for bf16 values, shared by every kernel that quantizes activations (the
// activation quantizer, the fused layer's down phase), so that they round alike bit for bit:
// scale = amax / 448 rounded up to a power of two (biased exponent clamped to [1, 254]), data =
// x / scale rounded to nearest even, saturating. Requires sm_89+ (cvt to e4m3).
#pragma once
#include "common.cuh"

namespace mxfp8_moe {

struct alignas(16) bf16x8 {
    u32 pairs[4];
};

struct alignas(8) e4m3x8 {
    u32 quads[2];
};

__device__ __forceinline__ float bf16_lo(u32 pair) { return __int_as_float(static_cast<int>(pair << 16)); }
__device__ __forceinline__ float bf16_hi(u32 pair) { return __int_as_float(static_cast<int>(pair & 0xFFFF0000u)); }

// NaN-propagating max of magnitudes (torch's amax propagates NaN).
__device__ __forceinline__ float max_magnitude(float m, float v) {
    v = fabsf(v);
    return (v > m || v != v) ? v : m;
}

// The largest magnitude of a scale block spread over LANES consecutive lanes, eight values each,
// known to all of them (every lane of the warp calls it).
template <int LANES>
__device__ __forceinline__ float block_amax(const float (&v)[8]) {
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = max_magnitude(amax, v[j]);
#pragma unroll
    for (int offset = 1; offset < LANES; offset *= 2) amax = max_magnitude(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
    return amax;
}

// Biased exponent of ceil_pow2(amax / 448), clamped to [1, 254]. With amax = 1.f * 2^(e - 127),
// amax / 448 = (1.f / 1.75) * 2^(e - 127 - 8), and 1.f / 1.75 lies in [0.57, 1.15): the power of
// two at or above it is 2^(e - 135), or 2^(e - 134) when 1.f > 1.75 (mantissa bits > 0x600000).
__device__ __forceinline__ int scale_exponent(float amax) {
    if (!(amax > 0.0f)) return 1;  // zero or NaN
    const u32 bits = __float_as_uint(amax);
    const int biased = static_cast<int>(bits >> 23) - 8 + ((bits & 0x7FFFFFu) > 0x600000u ? 1 : 0);
    return biased < 1 ? 1 : (biased > 254 ? 254 : biased);
}

// 1 / scale = 2^(127 - exponent), exact for exponent in [1, 254].
__device__ __forceinline__ float inverse_scale(int exponent) {
    return __int_as_float(exponent < 254 ? (254 - exponent) << 23 : 1 << 22);
}

// Two floats -> two e4m3 bytes (lo in the low byte), round to nearest even, saturating.
__device__ __forceinline__ u32 pack_e4m3x2(float lo, float hi) {
    u16 packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// Eight values (one bf16x8 chunk, unpacked) times the inverse scale -> eight e4m3 bytes. |v| *
// inverse <= 448 by the choice of scale; satfinite covers rounding and Inf.
__device__ __forceinline__ e4m3x8 quantize8(const float (&v)[8], float inverse) {
    e4m3x8 out;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const float* q = v + 4 * j;
        out.quads[j] = pack_e4m3x2(q[0] * inverse, q[1] * inverse) | (pack_e4m3x2(q[2] * inverse, q[3] * inverse) << 16);
    }
    return out;
}

__device__ __forceinline__ void unpack8(const bf16x8& chunk, float (&v)[8]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        v[2 * j] = bf16_lo(chunk.pairs[j]);
        v[2 * j + 1] = bf16_hi(chunk.pairs[j]);
    }
}

}  // namespace mxfp8_moe
