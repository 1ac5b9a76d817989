// What every grouped-GEMM kernel receives, and how it turns untrusted m_indptr values into row
// ranges that can never leave the tensors.
#pragma once
#include "common.cuh"

namespace mxfp8_moe {

// Passed by value as one __grid_constant__ parameter; the host mirrors this layout with ctypes
// (GroupedGemmParams in mxfp8_moe/gemm/spec.py). Strides are in elements of the tensor they belong to.
struct GroupedGemmParams {
    const u8* a;           // (cum_m, K) e4m3, row-major
    const u8* b;           // (E, N, K) e4m3, or (E, N, K / 2) e2m1 pairs, row-major
    const i32* a_scale;    // (m_padded, k_align) UE8M0 x4, any strides
    const i32* b_scale;    // (E, N, k_align) UE8M0 x4, any strides
    const i32* m_indptr;   // (E + 1,) CSR offsets, untrusted
    u16* out;              // (cum_m, N_out) bfloat16, row-major
    i64 a_scale_stride_row;
    i64 a_scale_stride_word;
    i64 b_scale_stride_expert;
    i64 b_scale_stride_row;
    i64 b_scale_stride_word;
    i32 cum_m;
    i32 num_experts;
    const float* bias;     // (E, N) float32, row-major; read only by kernels built with a bias
    float alpha;           // clamped SwiGLU: sigmoid(alpha * gate)
    float limit;           // clamped SwiGLU: gate <= limit, |up| <= limit
};

enum WeightFormat { kE4M3 = 0, kE2M1 = 1 };
enum ActivationKind { kSwiGLU = 0, kClampedSwiGLU = 1 };

// The compile-time choices of a kernel beside its shape and tile: the weights' format (MXFP8, or
// MXFP4 with two e2m1 codes per byte), the gated activation, whether a gated GEMM's up and gate
// rows are interleaved (gate even, up odd: gpt-oss) rather than halves ([up; gate]: FlashInfer),
// and whether a per-expert bias is added before the activation.
template <int WEIGHTS = kE4M3, int ACTIVATION = kSwiGLU, bool INTERLEAVED = false, bool BIAS = false>
struct Variant {
    static constexpr int kWeights = WEIGHTS;
    static constexpr int kActivation = ACTIVATION;
    static constexpr bool kInterleaved = INTERLEAVED;
    static constexpr bool kBias = BIAS;
};

// Rows [begin, end) of `a` and `out` belong to the expert; its first a_scale row is scale_row.
// m_indptr is clamped to [0, cum_m] and made non-decreasing (a running max), so whatever the
// caller passed, the experts own disjoint row ranges inside the tensors, and the padded scale row
// (begin + 3e) / 4 * 4 + i stays below m_padded = (cum_m + 3E) / 4 * 4.
struct ExpertRows {
    int begin;
    int end;
    int scale_row;
};

__device__ __forceinline__ int clamped_offset(const GroupedGemmParams& p, int e) {
    return clamp_int(p.m_indptr[e], 0, p.cum_m);
}

// Expert e's first row under the running-max rule: the largest clamped offset among m_indptr[0..e].
// O(e) loads: for kernels that look up one expert per block (the tensor-core scheduler scans).
__device__ __forceinline__ int monotone_offset(const GroupedGemmParams& p, int e) {
    int offset = 0;
    for (int i = 0; i <= e; ++i) offset = max(offset, clamped_offset(p, i));
    return offset;
}

__device__ __forceinline__ ExpertRows expert_rows(int e, int begin, int next) {
    ExpertRows rows;
    rows.begin = begin;
    rows.end = next > begin ? next : begin;
    rows.scale_row = (begin + 3 * e) / 4 * 4;
    return rows;
}

}  // namespace mxfp8_moe
