// m16n8k32 e4m3 x e4m3 -> f32 tensor-core MMAs.
//
// Fragments (g = lane / 4, t = lane % 4): A (16x32, row-major) a0 = row g, k 4t..4t+3; a1 = row g+8;
// a2 = row g, k 16+4t..; a3 = row g+8, k 16+4t... B (8 columns x 32, K-contiguous) b0 = column g,
// k 4t..; b1 = column g, k 16+4t... C/D: c0, c1 = row g, columns 2t, 2t+1; c2, c3 = row g+8.
#pragma once
#include "../e2m1.cuh"

namespace mxfp8_moe::ptx {

// Plain FP8 MMA (sm_89+; emulated through FP16 on sm_90). d = a * b + c.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2], const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// Block-scaled MXFP8 MMA (sm_120a / sm_121a only; instantiate it only when compiling for those): d = (a x 2^(sfa-127)) * (b x 2^(sfb-127)) + c,
// one UE8M0 scale per row of A and per column of B over this MMA's K = 32.
// Row m's scale is byte BYTE_A of the sfa register of lane 4*(m%8) + 2*LANE_A + m/8; column n's is
// byte BYTE_B of the sfb register of lane 4*n + LANE_B. The selectors are immediates: register
// selectors make ptxas serialize the MMA.
template <int BYTE_A, int LANE_A, int BYTE_B, int LANE_B>
__device__ __forceinline__ void mma_e4m3_block_scaled(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2],
                                                      const float (&c)[4], u32 sfa, u32 sfb) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.kind::mxf8f6f4.block_scale.scale_vec::1X.f32.e4m3.e4m3.f32.ue8m0 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13}, "
        "%14, {%16, %17}, %15, {%18, %19};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(sfa), "r"(sfb),
          "n"(BYTE_A), "n"(LANE_A), "n"(BYTE_B), "n"(LANE_B));
}
// The same instruction's semantics, spelled out for GPUs that lack it (sm_89, sm_90a), so that the
// sm_120a kernel's scale plumbing (which lane holds which row's scale, which byte) runs and is
// tested on them: the unscaled product, then each row's and column's decoded scale fetched from the
// lane and byte the selectors name, exactly as the PTX ISA defines them.
template <int BYTE_A, int LANE_A, int BYTE_B, int LANE_B>
__device__ __forceinline__ void mma_e4m3_block_scaled_emulated(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2],
                                                               const float (&c)[4], u32 sfa, u32 sfb) {
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float product[4];
    mma_e4m3(product, a, b, zero);
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // Rows g and g+8 of this lane's accumulators; columns 2t and 2t+1.
    const u32 row_lo = __shfl_sync(0xFFFFFFFFu, sfa, 4 * g + 2 * LANE_A);
    const u32 row_hi = __shfl_sync(0xFFFFFFFFu, sfa, 4 * g + 2 * LANE_A + 1);
    const u32 col_0 = __shfl_sync(0xFFFFFFFFu, sfb, 4 * (2 * t) + LANE_B);
    const u32 col_1 = __shfl_sync(0xFFFFFFFFu, sfb, 4 * (2 * t + 1) + LANE_B);
    const float scale_lo = ue8m0_to_float(byte_of(row_lo, BYTE_A));
    const float scale_hi = ue8m0_to_float(byte_of(row_hi, BYTE_A));
    const float scale_0 = ue8m0_to_float(byte_of(col_0, BYTE_B));
    const float scale_1 = ue8m0_to_float(byte_of(col_1, BYTE_B));
    d[0] = c[0] + product[0] * (scale_lo * scale_0);
    d[1] = c[1] + product[1] * (scale_lo * scale_1);
    d[2] = c[2] + product[2] * (scale_hi * scale_0);
    d[3] = c[3] + product[3] * (scale_hi * scale_1);
}

// MXFP4 weights x MXFP8 tokens (sm_120a / sm_121a only): A holds e2m1 codes in 8-bit containers
// (e2m1_containers), B e4m3; fragments, scales and selectors as for mma_e4m3_block_scaled.
template <int BYTE_A, int LANE_A, int BYTE_B, int LANE_B>
__device__ __forceinline__ void mma_e2m1_e4m3_block_scaled(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2],
                                                           const float (&c)[4], u32 sfa, u32 sfb) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.kind::mxf8f6f4.block_scale.scale_vec::1X.f32.e2m1.e4m3.f32.ue8m0 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13}, "
        "%14, {%16, %17}, %15, {%18, %19};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(sfa), "r"(sfb),
          "n"(BYTE_A), "n"(LANE_A), "n"(BYTE_B), "n"(LANE_B));
}

// Its semantics for GPUs that lack it: each container's e2m1 value, exactly, as e4m3, then the
// block-scaled e4m3 MMA's emulation.
template <int BYTE_A, int LANE_A, int BYTE_B, int LANE_B>
__device__ __forceinline__ void mma_e2m1_e4m3_block_scaled_emulated(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2],
                                                                    const float (&c)[4], u32 sfa, u32 sfb) {
    const u32 widened[4] = {e2m1_containers_to_e4m3(a[0]), e2m1_containers_to_e4m3(a[1]),
                            e2m1_containers_to_e4m3(a[2]), e2m1_containers_to_e4m3(a[3])};
    mma_e4m3_block_scaled_emulated<BYTE_A, LANE_A, BYTE_B, LANE_B>(d, widened, b, c, sfa, sfb);
}
}  // namespace mxfp8_moe::ptx
