// MXFP4 weights widened to bytes: e2m1 codes (the lowest nibble the lowest k) into the 8-bit
// containers of the block-scaled MMA or into e4m3, four codes to one 32-bit register.
//
// e2m1 code: sign, 2 exponent bits (bias 1), 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
#pragma once
#include "common.cuh"

namespace mxfp8_moe {

// Byte i of the result = bytes selected by nibble i of `selector` from the eight bytes {hi, lo}.
__device__ __forceinline__ u32 byte_permute(u32 lo, u32 hi, u32 selector) {
    u32 result;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(result) : "r"(lo), "r"(hi), "r"(selector));
    return result;
}

// Code i (nibble i of `packed`) into byte i, in bits 0-3.
__device__ __forceinline__ u32 e2m1_spread(u32 packed) {
    const u32 even = packed & 0x0F0Fu;         // codes 0 and 2 in bytes 0 and 1
    const u32 odd = (packed >> 4) & 0x0F0Fu;   // codes 1 and 3
    return byte_permute(even, odd, 0x5140u);   // even.0, odd.0, even.1, odd.1
}

// The block-scaled MMA's 8-bit containers for e2m1 (kind::mxf8f6f4): each code in bits 2-5 of its
// byte, the other bits 0 (PTX ISA, mma: "resides in central 4 bits of the 8-bit container").
__device__ __forceinline__ u32 e2m1_containers(u32 packed) { return e2m1_spread(packed) << 2; }

// Codes 4 HALF .. 4 HALF + 3 of the eight in `packed` as e4m3 bytes (every e2m1 value is exact in
// e4m3): a table lookup of each magnitude (codes 0-7 -> 0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48,
// 0x4C) by prmt, then the sign bits by prmt in sign-replicating mode (bit 3 of a selector nibble),
// which fills a byte with the top bit of the byte it selects: in `packed` byte j's top bit is the
// sign of code 2j + 1, in packed << 4 that of code 2j.
template <int HALF>
__device__ __forceinline__ u32 e2m1_to_e4m3(u32 packed) {
    static_assert(HALF == 0 || HALF == 1, "a 32-bit word holds two halves of four codes");
    const u32 magnitudes = byte_permute(0x3C383000u, 0x4C484440u, (HALF ? packed >> 16 : packed) & 0x7777u);
    const u32 signs = byte_permute(packed << 4, packed, HALF ? 0xFBEAu : 0xD9C8u);
    return magnitudes | (signs & 0x80808080u);
}

// e4m3 bytes from containers (the inverse of e2m1_containers followed by e2m1_to_e4m3): what the
// emulated block-scaled MMA reads its e2m1 operand as.
__device__ __forceinline__ u32 e2m1_containers_to_e4m3(u32 containers) {
    const u32 codes = (containers >> 2) & 0x0F0F0F0Fu;
    const u32 pairs = codes | (codes >> 4);  // byte 0: codes 0 and 1, byte 2: codes 2 and 3
    return e2m1_to_e4m3<0>((pairs & 0xFFu) | ((pairs >> 8) & 0xFF00u));
}

}  // namespace mxfp8_moe
