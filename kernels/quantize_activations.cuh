// Fused activation quantization: bf16 tokens -> e4m3 data + UE8M0 block scales, written straight
// into the grouped GEMM's padded MN-major a_scale layout, in one pass over the tokens.
//
// Bit-for-bit the recipe of mxfp8_moe/quantize.py for finite inputs: scale = amax / 448 rounded up
// to a power of two (biased exponent clamped to [1, 254]), data = x / scale rounded to nearest even.
// A warp owns a segment of 1024 elements of one row: each lane loads its 4 x 16-byte chunks up
// front (memory-level parallelism), K blocks reduce their amax over 4 (k_gran 32) or 16 (k_gran 128)
// lanes with shuffles. The kernel writes every word of a_scale, zeros included (the padding rows
// between experts, the unused bytes of a row's last word), so the host allocates it uninitialised
// and the call is one launch. Requires sm_89+ (cvt to e4m3).
#pragma once
#include "common.cuh"
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

// Biased exponent of ceil_pow2(amax / 448), clamped to [1, 254]. With amax = 1.f * 2^(e - 127),
// amax / 448 = (1.f / 1.75) * 2^(e - 127 - 8), and 1.f / 1.75 lies in [0.57, 1.15): the power of
// two at or above it is 2^(e - 135), or 2^(e - 134) when 1.f > 1.75 (mantissa bits > 0x600000).
__device__ __forceinline__ int scale_exponent(float amax) {
    if (!(amax > 0.0f)) return 1;  // zero or NaN
    const u32 bits = __float_as_uint(amax);
    const int biased = static_cast<int>(bits >> 23) - 8 + ((bits & 0x7FFFFFu) > 0x600000u ? 1 : 0);
    return biased < 1 ? 1 : (biased > 254 ? 254 : biased);
}

// Two floats -> two e4m3 bytes (lo in the low byte), round to nearest even, saturating.
__device__ __forceinline__ u32 pack_e4m3x2(float lo, float hi) {
    u16 packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// Expert e's first a_scale row: its first token row, with each expert before it padded to 4 rows.
__device__ __forceinline__ int scale_row_start(const QuantizeParams& p, int e) {
    return (clamp_int(p.m_indptr[e], 0, p.cum_m) + 3 * e) / 4 * 4;
}

// Whether a token's scales land in a_scale row `scale_row` (the inverse of token_scale_row for a
// valid m_indptr): the row lies inside the rows of the last expert starting at or before it.
__device__ __forceinline__ bool scale_row_owned(const QuantizeParams& p, int scale_row) {
    if (p.num_experts <= 0) return false;
    int lo = 0, hi = p.num_experts - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (scale_row_start(p, mid) <= scale_row) lo = mid; else hi = mid - 1;
    }
    const int rows = clamp_int(p.m_indptr[lo + 1], 0, p.cum_m) - clamp_int(p.m_indptr[lo], 0, p.cum_m);
    const int start = scale_row_start(p, lo);
    return start <= scale_row && scale_row < start + rows;
}

// The a_scale row of token `row`, or -1 when no expert owns it (m_indptr clamped as in the GEMM).
__device__ __forceinline__ int token_scale_row(const QuantizeParams& p, int row) {
    int lo = 0, hi = p.num_experts - 1;
    while (lo < hi) {  // last expert whose (clamped) first row is <= row
        const int mid = (lo + hi + 1) / 2;
        if (clamp_int(p.m_indptr[mid], 0, p.cum_m) <= row) lo = mid; else hi = mid - 1;
    }
    const int begin = clamp_int(p.m_indptr[lo], 0, p.cum_m);
    const int end = clamp_int(p.m_indptr[lo + 1], 0, p.cum_m);
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
    // Items: the rows' segments, then the a_scale rows, whose words are zeroed where no token owns
    // the row (a token's row gets all its bytes from its own warps below).
    const i64 total = static_cast<i64>(p.cum_m) * kSegments;
    for (i64 item = static_cast<i64>(blockIdx.x) * WARPS + threadIdx.x / 32; item < total + p.m_padded;
         item += static_cast<i64>(gridDim.x) * WARPS) {
        if (item >= total) {
            const int scale_row = static_cast<int>(item - total);
            if (!scale_row_owned(p, scale_row)) {
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
        const int scale_row = token_scale_row(p, row);

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
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[2 * j] = bf16_lo(chunks[i].pairs[j]);
                v[2 * j + 1] = bf16_hi(chunks[i].pairs[j]);
            }
            float amax = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) amax = max_magnitude(amax, v[j]);
#pragma unroll
            for (int offset = 1; offset < kLanesPerBlock; offset *= 2)
                amax = max_magnitude(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
            const int exponent = scale_exponent(amax);
            // 1 / scale = 2^(127 - exponent), exact for exponent in [1, 254].
            const float inverse = __int_as_float(exponent < 254 ? (254 - exponent) << 23 : 1 << 22);
            if (c < kChunks) {
                e4m3x8 out;
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    // |v| * inverse <= 448 by the choice of scale; satfinite covers rounding and Inf.
                    const float* q = v + 4 * j;
                    out.quads[j] = pack_e4m3x2(q[0] * inverse, q[1] * inverse) |
                                   (pack_e4m3x2(q[2] * inverse, q[3] * inverse) << 16);
                }
                a_row[c] = out;
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
