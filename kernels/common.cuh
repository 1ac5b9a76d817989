// Basic types and scalar helpers shared by every kernel.
//
// Kernels are compiled by NVRTC with no toolkit headers on the include path, so nothing here may
// include <cstdint>, cuda_bf16.h or cuda_fp8.h: fixed-width types are spelled out, conversions are
// inline PTX or plain bit manipulation.
#pragma once

namespace mxfp8_moe {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

struct alignas(16) u32x4 {  // one 16-byte vector access
    u32 x, y, z, w;
};

struct alignas(8) f32x2 {  // one 8-byte vector access
    float x, y;
};

template <typename T>
__device__ __forceinline__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

__device__ __forceinline__ int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// UE8M0 byte -> float: 2^(e - 127). e = 0 is the subnormal 2^-127, e = 0xFF is NaN (OCP MX).
__device__ __forceinline__ float ue8m0_to_float(u32 e) {
    const u32 bits = e == 0u ? 0x00400000u : (e == 0xFFu ? 0x7FC00000u : e << 23);
    return __int_as_float(static_cast<int>(bits));
}

// Byte `index` (0 = lowest address) of a little-endian word.
__device__ __forceinline__ u32 byte_of(u32 word, int index) { return (word >> (8 * index)) & 0xFFu; }

// float -> bfloat16 bits, round to nearest even (NaN stays NaN).
__device__ __forceinline__ u16 float_to_bf16(float x) {
#if __CUDA_ARCH__ >= 800
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    const u32 bits = __float_as_uint(x);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<u16>((bits >> 16) | 0x40u);
    return static_cast<u16>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
#endif
}

// e2m1 code (sign, 2 exponent bits with bias 1, 1 mantissa bit) -> float: magnitudes 0, 0.5, 1,
// 1.5, 2, 3, 4, 6 for codes 0-7, negative for 8-15. Exponent e > 0 is 2^(e - 1) * (1 + m / 2).
__device__ __forceinline__ float e2m1_to_float(u32 code) {
    const u32 exponent = (code >> 1) & 3u, mantissa = code & 1u;
    const float magnitude = exponent == 0u ? 0.5f * static_cast<float>(mantissa)
                                           : __int_as_float(static_cast<int>(((exponent + 126u) << 23) | (mantissa << 22)));
    return (code & 8u) ? -magnitude : magnitude;
}

// FP8 e4m3 (OCP "fn" flavour: no infinities, S.1111.111 is NaN) -> float, by bit manipulation.
__device__ __forceinline__ float e4m3_to_float(u32 byte) {
    const u32 sign = (byte & 0x80u) << 24;
    const u32 exponent = (byte >> 3) & 0xFu;
    const u32 mantissa = byte & 0x7u;
    float magnitude;
    if (exponent == 0xFu && mantissa == 0x7u) {
        magnitude = __int_as_float(0x7FC00000);
    } else if (exponent == 0u) {
        magnitude = static_cast<float>(mantissa) * 0.001953125f;  // m * 2^-9: subnormals
    } else {
        magnitude = __int_as_float(static_cast<int>(((exponent + 120u) << 23) | (mantissa << 20)));
    }
    return __int_as_float(static_cast<int>(__float_as_uint(magnitude) | sign));
}

}  // namespace mxfp8_moe
