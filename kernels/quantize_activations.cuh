// Fused activation quantization: bf16 tokens -> e4m3 data + UE8M0 block scales, written straight
// into the grouped GEMM's padded MN-major a_scale layout, in one pass over the tokens.
//
// Bit-for-bit the recipe of mxfp8_moe/quantize.py for finite inputs (mxfp8_rounding.cuh).
// A warp owns a segment of 1024 elements of one row: each lane loads its 4 x 16-byte chunks up
// front (memory-level parallelism), K blocks reduce their amax over 4 (k_gran 32) or 16 (k_gran 128)
// lanes with shuffles. The kernel writes every word of a_scale, zeros included (the padding rows
// between experts, the unused bytes of a row's last word), so the host allocates it uninitialised
// and the call is one launch. Requires sm_89+ (cvt to e4m3).
#pragma once
#include "mxfp8_rounding.cuh"
#include "ptx/grid_dependency.cuh"

namespace mxfp8_moe {

// Mirrored by mxfp8_moe/activation_quant.py.
struct QuantizeParams {
    const u16* x;         // (x_rows, K) bfloat16, row-major
    const i32* m_indptr;  // (E + 1,) untrusted
    u8* a;                // (cum_m, K) e4m3, row-major
    u8* a_scale;          // storage of the (k_align, m_padded) int32 words, uninitialised
    i32 cum_m;
    i32 num_experts;
    i32 m_padded;
    const i64* source;    // (cum_m,) the x row of each output row (untrusted), or null: row i is x[i]
    i32 x_rows;
};

// Expert e's first token row as the GEMMs read m_indptr: clamped to [0, cum_m], then a running
// max, so that whatever m_indptr holds the experts own disjoint, ordered row ranges (problem.cuh).
// `monotone`: the clamped offsets never decrease (any valid m_indptr; checked once per CTA), so the
// running max is the offset itself and costs one load.
__device__ __forceinline__ int expert_offset(const QuantizeParams& p, int e, bool monotone) {
    if (monotone) return clamp_int(p.m_indptr[e], 0, p.cum_m);
    int offset = 0;
    for (int i = 0; i <= e; ++i) offset = max(offset, clamp_int(p.m_indptr[i], 0, p.cum_m));
    return offset;
}

// Expert e's first a_scale row: its first token row, with each expert before it padded to 4 rows.
__device__ __forceinline__ int scale_row_start(const QuantizeParams& p, int e, bool monotone) {
    return (expert_offset(p, e, monotone) + 3 * e) / 4 * 4;
}

// Whether a token's scales land in a_scale row `scale_row` (the inverse of token_scale_row): the
// row lies inside the rows of the last expert starting at or before it.
__device__ __forceinline__ bool scale_row_owned(const QuantizeParams& p, int scale_row, bool monotone) {
    if (p.num_experts <= 0) return false;
    int lo = 0, hi = p.num_experts - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (scale_row_start(p, mid, monotone) <= scale_row) lo = mid; else hi = mid - 1;
    }
    const int rows = expert_offset(p, lo + 1, monotone) - expert_offset(p, lo, monotone);
    const int start = scale_row_start(p, lo, monotone);
    return start <= scale_row && scale_row < start + rows;
}

// The a_scale row of token `row`, or -1 when no expert owns it (m_indptr read as the GEMMs read it).
__device__ __forceinline__ int token_scale_row(const QuantizeParams& p, int row, bool monotone) {
    int lo = 0, hi = p.num_experts - 1;
    while (lo < hi) {  // last expert whose first row is <= row
        const int mid = (lo + hi + 1) / 2;
        if (expert_offset(p, mid, monotone) <= row) lo = mid; else hi = mid - 1;
    }
    const int begin = expert_offset(p, lo, monotone);
    const int end = expert_offset(p, lo + 1, monotone);
    return (begin <= row && row < end) ? (begin + 3 * lo) / 4 * 4 + row - begin : -1;
}

template <int K, int K_GRAN, int WARPS>
__device__ __forceinline__ void quantize_activations(const QuantizeParams& p) {
    constexpr int kChunks = K / 8;             // 16-byte chunks of 8 bf16 per row
    constexpr int kSegmentChunks = 4 * 32;     // 4 chunks per lane per segment
    constexpr int kSegments = ceil_div(kChunks, kSegmentChunks);
    constexpr int kLanesPerBlock = K_GRAN / 8; // 4 or 16: a block never straddles a 32-chunk step
    constexpr int kBlocks = ceil_div(K, K_GRAN);
    constexpr int kWords = ceil_div(kBlocks, 4);  // a_scale words per row (k_align)
    static_assert(K % 16 == 0, "K must be a multiple of 16");

    // The launch may overlap the previous kernel's end (the GEMM or the routing before it): wait
    // for it before the first global access, then let the next kernel launch the same way.
    ptx::wait_for_prior_grids();
    ptx::allow_next_grid();
    const int lane = threadIdx.x % 32;
    bool ordered = true;  // this thread's share of the clamped offsets never decreases
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x)
        ordered = ordered && clamp_int(p.m_indptr[e], 0, p.cum_m) <= clamp_int(p.m_indptr[e + 1], 0, p.cum_m);
    const bool monotone = __syncthreads_and(ordered);
    // Items: the rows' segments, then the a_scale rows, whose words are zeroed where no token owns
    // the row (a token's row gets all its bytes from its own warps below).
    const i64 total = static_cast<i64>(p.cum_m) * kSegments;
    for (i64 item = static_cast<i64>(blockIdx.x) * WARPS + threadIdx.x / 32; item < total + p.m_padded;
         item += static_cast<i64>(gridDim.x) * WARPS) {
        if (item >= total) {
            const int scale_row = static_cast<int>(item - total);
            if (!scale_row_owned(p, scale_row, monotone)) {
                u32* words = reinterpret_cast<u32*>(p.a_scale);
                for (int w = lane; w < kWords; w += 32) words[static_cast<i64>(w) * p.m_padded + scale_row] = 0u;
            }
            continue;
        }
        const int row = static_cast<int>(item / kSegments);
        const int first_chunk = static_cast<int>(item % kSegments) * kSegmentChunks;
        // A gathered row from outside x reads nothing and quantizes to NaN, so it shows.
        const i64 source = p.source == nullptr ? row : p.source[row];
        const bool inside = 0 <= source && source < p.x_rows;
        const bf16x8* x_row = reinterpret_cast<const bf16x8*>(p.x + (inside ? source : 0) * K);
        const u32 fill = inside ? 0u : 0x7FC07FC0u;
        e4m3x8* a_row = reinterpret_cast<e4m3x8*>(p.a + static_cast<i64>(row) * K);
        const int scale_row = token_scale_row(p, row, monotone);

        bf16x8 chunks[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = first_chunk + i * 32 + lane;
            chunks[i] = c < kChunks && inside ? x_row[c] : bf16x8{{fill, fill, fill, fill}};
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = first_chunk + i * 32 + lane;
            float v[8];
            unpack8(chunks[i], v);
            const int exponent = scale_exponent(block_amax<kLanesPerBlock>(v));
            if (c < kChunks) {
                a_row[c] = quantize8(v, inverse_scale(exponent));
                if (scale_row >= 0 && c % kLanesPerBlock == 0) {
                    const int block = c / kLanesPerBlock;
                    u8* word = p.a_scale + (static_cast<i64>(block / 4) * p.m_padded + scale_row) * 4;
                    word[block % 4] = static_cast<u8>(exponent);
                    // The last block's lane also zeroes the bytes of its word past the last block.
                    if (block == kBlocks - 1)
                        for (int b = block % 4 + 1; b < 4; ++b) word[b] = 0;
                }
            }
        }
    }
}

}  // namespace mxfp8_moe
