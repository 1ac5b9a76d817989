// The MoE block's combine: out[t] = sum over j < TOP_K of weight[r] * rows[r], r = slot_row[t * TOP_K + j],
// summed in float32 in slot order (deterministic, no atomics) and rounded once to bf16.
//
// A thread owns 8 columns (16 bytes) of one token: it reads its token's TOP_K rows at those columns
// and writes 16 bytes. A row index outside [0, num_rows) (slot_row is untrusted) is never read:
// it makes the token's output NaN, so a bad routing shows instead of summing garbage.
#pragma once
#include "common.cuh"
#include "ptx/grid_dependency.cuh"

namespace mxfp8_moe {

// Mirrored by mxfp8_moe/combine.py.
struct CombineParams {
    const u16* rows;      // (num_rows, H) bfloat16, expert-ordered
    const float* weight;  // (num_rows,) routing weight of each row
    const i32* slot_row;  // (T * TOP_K,) the row of each (token, slot)
    u16* out;             // (T, H) bfloat16
    i32 num_tokens;
    i32 num_rows;
};

// Two floats -> two bfloat16 in one word, lo in the low half.
__device__ __forceinline__ u32 bf16x2(float lo, float hi) {
    return static_cast<u32>(float_to_bf16(lo)) | (static_cast<u32>(float_to_bf16(hi)) << 16);
}

template <int H, int TOP_K>
__device__ __forceinline__ void combine_rows(const CombineParams& p) {
    static_assert(H % 8 == 0, "16-byte column chunks");
    constexpr int kChunks = H / 8;
    ptx::wait_for_prior_grids();  // launched to overlap the down GEMM's end, whose rows it reads
    ptx::allow_next_grid();
    const i64 item = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (item >= static_cast<i64>(p.num_tokens) * kChunks) return;
    const int token = static_cast<int>(item / kChunks), chunk = static_cast<int>(item % kChunks);
    float sum[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < TOP_K; ++j) {
        const int row = p.slot_row[token * TOP_K + j];
        if (static_cast<u32>(row) >= static_cast<u32>(p.num_rows)) {
#pragma unroll
            for (int i = 0; i < 8; ++i) sum[i] = __int_as_float(0x7FC00000);
            continue;
        }
        const float w = p.weight[row];
        const u32x4 v = reinterpret_cast<const u32x4*>(p.rows + static_cast<i64>(row) * H)[chunk];
        const u32 pairs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            sum[2 * i] += w * __int_as_float(static_cast<int>(pairs[i] << 16));
            sum[2 * i + 1] += w * __int_as_float(static_cast<int>(pairs[i] & 0xFFFF0000u));
        }
    }
    const u32x4 packed = {bf16x2(sum[0], sum[1]), bf16x2(sum[2], sum[3]), bf16x2(sum[4], sum[5]), bf16x2(sum[6], sum[7])};
    reinterpret_cast<u32x4*>(p.out + static_cast<i64>(token) * H)[chunk] = packed;
}

}  // namespace mxfp8_moe
