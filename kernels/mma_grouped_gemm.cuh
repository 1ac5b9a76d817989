// The tensor-core grouped GEMM: m16n8k32 FP8 mma.sync, fed by a cp.async pipeline.
//
// Operands are swapped ("swap AB"): the weights are the MMA's A (16-row side) and the tokens its B
// (8-column side), so an expert with 1..8 rows wastes little of each MMA; both operands are
// K-contiguous, which is what the MMA wants on either side. A CTA computes a tile of BLOCK_N output
// columns x BLOCK_T tokens of one expert (gated: the matching up and gate rows, so the SwiGLU
// epilogue needs no exchange). Persistent CTAs walk the units of a TileScheduler.
//
// Warps: WARPS_N split the tile's columns; WARPS_K split each stage's four k-steps and add their
// partial sums in shared memory at the end of a tile. Extra K warps buy memory-level parallelism
// (more warps issuing copies) for narrow tiles, which is what decode with few experts needs.
//
// Block scales enter in one of three ways (SCALE_MODE):
//   kSoftware : unscaled MMAs per K block into a partial sum, promoted with sa * sb in FP32;
//   kNative   : the block-scaled MMA of sm_120a / sm_121a, each lane passing its own scale words;
//   kEmulated : kNative's code with the block-scaled MMA replaced by its PTX-ISA semantics, so the
//               sm_12x scale indexing runs (and is tested) on sm_89 / sm_90a.
// In a fused layer (GemmRole, mma_moe_layer.cuh), gate_up quantizes its tile of the intermediate
// in the epilogue (its BLOCK_N columns hold whole scale blocks) and publishes it; down waits for
// its token tile before loading it.
#pragma once
#include "epilogue.cuh"
#include "layer.cuh"
#include "mxfp8_rounding.cuh"
#include "tile_scheduler.cuh"
#include "ptx/cp_async.cuh"
#include "ptx/grid_dependency.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/mma.cuh"

namespace mxfp8_moe {

enum ScaleMode { kSoftware = 0, kNative = 1, kEmulated = 2 };

// A fused layer's hand-over (mma_moe_layer.cuh): the counters (layer.cuh) and the quantized
// intermediate gate_up writes and down reads as its `a` and `a_scale`.
struct LayerLink {
    i32* counters;   // [0]: CTAs finished; [1 + tile]: gate_up units published on a token tile
    u8* rows;        // (cum_m, I) e4m3
    u8* scales;      // (k_align, m_padded) words of UE8M0 x4: MN-major, as the activation quantizer writes them
    i32 m_padded;
    i32 publishers;  // gate_up units per token tile (its N tiles)
};

template <int N, int K, int K_GRAN, bool GATED, int BLOCK_N, int BLOCK_T, int STAGES, int WARPS_N, int WARPS_K,
          int SCALE_MODE, typename V = Variant<>, int ROLE = kWholeKernel>
struct MmaGemm {
    static constexpr int kThreads = WARPS_N * WARPS_K * 32;
    static constexpr int kWarpsN = WARPS_N;
    static constexpr int kBlockT = BLOCK_T;
    static constexpr int kBlockK = 128;  // K bytes per pipeline stage: one 128-byte smem row
    static constexpr int kKIters = ceil_div(K, kBlockK);
    static constexpr int kNOut = GATED ? N / 2 : N;
    static constexpr int kNTiles = ceil_div(kNOut, BLOCK_N);
    static constexpr int kWeightRows = GATED ? 2 * BLOCK_N : BLOCK_N;
    static constexpr int kWarpCols = BLOCK_N / WARPS_N;        // output columns per warp
    static constexpr int kColFrags = kWarpCols / 16;           // m16 fragments per half (up or gate)
    static constexpr int kWeightFrags = GATED ? 2 * kColFrags : kColFrags;
    static constexpr int kTokenFrags = BLOCK_T / 8;

    // MXFP4 weights: a stage's weight row is 64 bytes of packed e2m1 codes (kBlockK values), read
    // two bytes per fragment register and widened in registers (e2m1.cuh).
    static constexpr bool kMxfp4 = V::kWeights == kE2M1;
    static constexpr int kWeightRowBytes = kMxfp4 ? kBlockK / 2 : kBlockK;
    static constexpr int kWeightChunks = kWeightRowBytes / 16;

    // One pipeline stage: weight tile, token tile (rows of 128 bytes, 16-byte chunks XOR-swizzled
    // by row so ldmatrix's 8 rows hit 8 different bank groups), then one scale word per row.
    static constexpr int kWeightTileBytes = kWeightRows * kWeightRowBytes;
    static constexpr int kTokenTileBytes = BLOCK_T * kBlockK;
    static constexpr int kScaleWords = kWeightRows + BLOCK_T;
    static constexpr int kStageBytes = kWeightTileBytes + kTokenTileBytes + ceil_div(kScaleWords * 4, 128) * 128;
    static constexpr int kPipelineBytes = STAGES * kStageBytes;
    // Epilogue staging of the bf16 tile, reusing the pipeline buffers; rows padded by 16 bytes.
    static constexpr int kOutPitch = BLOCK_N * 2 + 16;
    // Then the K warps' partial accumulators, [k warp - 1][n warp][value][lane] (lanes adjacent).
    static constexpr int kAccumulators = kWeightFrags * kTokenFrags * 4;
    static constexpr int kPartialsOffset = ceil_div(BLOCK_T * kOutPitch, 16) * 16;
    static constexpr int kPartialsBytes = (WARPS_K - 1) * WARPS_N * kAccumulators * 32 * 4;

    static_assert(K % 16 == 0 && kNOut % 16 == 0, "K and the output width must be multiples of 16");
    static_assert(K_GRAN == 32 || K_GRAN == 128, "k granularity is 32 or 128");
    static_assert(BLOCK_N % (16 * WARPS_N) == 0, "each warp owns whole m16 fragments");
    static_assert(4 % WARPS_K == 0, "K warps split the four k-steps of a stage");
    static_assert(BLOCK_T % 8 == 0, "tokens come in n8 fragments");
    static_assert(STAGES >= 2, "a pipeline needs two stages");
    static_assert(!kMxfp4 || (K_GRAN == 32 && K % 32 == 0), "MXFP4 weights: one scale per 32 values, K in 32s");
    static_assert(kPartialsOffset + kPartialsBytes <= kPipelineBytes, "epilogue must fit in the pipeline buffers");
    // A layer's gate_up quantizes its own tile: the tile holds whole scale blocks, a row's chunks
    // are lanes of one warp.
    static_assert(ROLE != kLayerGateUp || (GATED && BLOCK_N % K_GRAN == 0 && 32 % (BLOCK_N / 8) == 0),
                  "a layer's gate_up tile covers whole scale blocks of the intermediate");

    using Scheduler = TileScheduler<kThreads, BLOCK_T, kNTiles>;
    using Output = Epilogue<N, GATED, V>;

    const GroupedGemmParams& p;
    u8* stages;
    int lane, warp_n, warp_k;
    const LayerLink* link = nullptr;  // in a layer

    __device__ __forceinline__ static u32 swizzled(int row, int chunk) {
        return row * kBlockK + ((chunk ^ (row & 7)) << 4);
    }

    // A packed (64-byte) weight row's chunk: rows 2i and 2i + 1 start in opposite halves of the
    // banks, so XOR-ing the chunk with (row / 2) % 4 puts the same chunk of 8 consecutive rows in 8
    // different 16-byte bank groups: a fragment's 2-byte reads are conflict-free.
    __device__ __forceinline__ static u32 packed_swizzled(int row, int chunk) {
        return row * kWeightRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4);
    }

    __device__ __forceinline__ static u32 weight_chunk(int row, int chunk) {
        return kMxfp4 ? packed_swizzled(row, chunk) : swizzled(row, chunk);
    }

    // Smem row r of the weight tile holds global weight row weight_row(n0, r) of the expert: the up
    // rows of the tile's columns, then (gated) their gate rows (Output::up_row, gate_row). The
    // halves' form is spelled out: through the Output functions ptxas spilled a register in some
    // sm_120a configurations.
    __device__ __forceinline__ static int weight_row(int n0, int r) {
        if constexpr (GATED && V::kInterleaved)
            return r >= BLOCK_N ? Output::gate_row(n0 + r - BLOCK_N) : Output::up_row(n0 + r);
        return (GATED && r >= BLOCK_N) ? kNOut + n0 + r - BLOCK_N : n0 + r;
    }

    __device__ __forceinline__ static bool weight_row_valid(int n0, int r) {
        return n0 + ((GATED && r >= BLOCK_N) ? r - BLOCK_N : r) < kNOut;
    }

    __device__ __forceinline__ void load_stage(const WorkUnit& w, int n0, int k_iter, int slot) const {
        u8* stage = stages + slot * kStageBytes;
        const u32 weight_tile = ptx::shared_address(stage);
        const u32 token_tile = weight_tile + kWeightTileBytes;
        const u32 scale_words = token_tile + kTokenTileBytes;
        const int k0 = k_iter * kBlockK;
        constexpr int kRowBytes = kMxfp4 ? K / 2 : K;  // of a whole weight row
        const u8* b_expert = p.b + static_cast<i64>(w.expert) * N * kRowBytes;

        for (int c = threadIdx.x; c < kWeightRows * kWeightChunks; c += kThreads) {
            const int r = c / kWeightChunks, chunk = c % kWeightChunks;
            const int k = k0 + chunk * (kMxfp4 ? 32 : 16);  // the chunk's first value
            const bool valid = weight_row_valid(n0, r) && k < K;
            const u8* src = valid ? b_expert + static_cast<i64>(weight_row(n0, r)) * kRowBytes + (kMxfp4 ? k / 2 : k) : p.b;
            ptx::cp_async_16(weight_tile + weight_chunk(r, chunk), src, valid);
        }
        for (int c = threadIdx.x; c < BLOCK_T * 8; c += kThreads) {
            const int r = c / 8, chunk = c % 8, k = k0 + chunk * 16;
            const bool valid = r < w.rows && k < K;
            const u8* src = valid ? p.a + static_cast<i64>(w.row + r) * K + k : p.a;
            ptx::cp_async_16(token_tile + swizzled(r, chunk), src, valid);
        }
        // The int32 word holding this stage's K block(s): one 128-K block (k_gran 128) or four
        // 32-K blocks (k_gran 32, BlockK = 4 * 32 keeps them in one aligned word).
        const int word = k0 / K_GRAN / 4;
        for (int i = threadIdx.x; i < kScaleWords; i += kThreads) {
            const i32* src;
            bool valid;
            if (i < kWeightRows) {
                valid = weight_row_valid(n0, i);
                src = p.b_scale + w.expert * p.b_scale_stride_expert + weight_row(n0, i) * p.b_scale_stride_row +
                      word * p.b_scale_stride_word;
            } else {
                valid = i - kWeightRows < w.rows;
                src = p.a_scale + (w.scale_row + i - kWeightRows) * p.a_scale_stride_row + word * p.a_scale_stride_word;
            }
            ptx::cp_async_4(scale_words + 4 * i, valid ? src : p.b_scale, valid);
        }
    }

    // First smem row of weight fragment f of this warp (gated: fragments kColFrags.. are gate rows).
    __device__ __forceinline__ int fragment_row(int f) const {
        return (f < kColFrags ? 0 : BLOCK_N - kColFrags * 16) + warp_n * kWarpCols + f * 16;
    }

    // The weights of k-step ks as the MMA's A fragments: e4m3 bytes by ldmatrix, or (MXFP4) each
    // register's four codes read as two bytes and widened: to the block-scaled MMA's e2m1 containers
    // in the native and emulated modes, to e4m3 for software scaling.
    __device__ __forceinline__ void load_fragments(u32 (&a)[kWeightFrags][4], u32 (&b)[kTokenFrags][2],
                                                   u32 weight_tile, u32 token_tile, int ks) const {
        const int matrix = lane / 8, r = lane % 8;
        if constexpr (kMxfp4) {
            // The lane read here, not the member: ptxas would otherwise keep the rows' addresses
            // from one unit to the next, and spilled one in some sm_120a configurations.
            const int lane_here = ptx::lane_id(), g = lane_here / 4, t = lane_here % 4;
#pragma unroll
            for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    // Register i: row g (+8 for odd i), values 4t.. (+16 for i >= 2) of the k-step,
                    // which are bytes 2t (+8) of the stage row's chunk ks.
                    const int row = fragment_row(f) + g + 8 * (i % 2);
                    const u32 packed = ptx::load_shared_u16(weight_tile + packed_swizzled(row, ks) + 2 * t + 8 * (i / 2));
                    a[f][i] = SCALE_MODE == kSoftware ? e2m1_to_e4m3<0>(packed) : e2m1_containers(packed);
                }
        } else {
#pragma unroll
            for (int f = 0; f < kWeightFrags; ++f)
                ptx::ldmatrix_x4(a[f], weight_tile + swizzled(fragment_row(f) + r + (matrix & 1) * 8, 2 * ks + matrix / 2));
        }
#pragma unroll
        for (int j = 0; j < kTokenFrags; ++j)
            ptx::ldmatrix_x2(b[j], token_tile + swizzled(j * 8 + r, 2 * ks + (matrix & 1)));
    }

    // Multiply one stage into the accumulators.
    __device__ __forceinline__ void compute_stage(float (&acc)[kWeightFrags][kTokenFrags][4], int k_iter, int slot) const {
        const u8* stage = stages + slot * kStageBytes;
        const u32 weight_tile = ptx::shared_address(stage);
        const u32 token_tile = weight_tile + kWeightTileBytes;
        const u32* scale_words = reinterpret_cast<const u32*>(stage + kWeightTileBytes + kTokenTileBytes);
        const int k0 = k_iter * kBlockK;
        const int g = lane / 4, t = lane % 4;
        // k_gran 128: the stage's block is byte (k0 / 128) % 4 of its word.
        const int block_byte = (k0 / 128) % 4;

        if constexpr (SCALE_MODE == kSoftware) {
            float weight_scale[kWeightFrags][2], token_scale[kTokenFrags][2];
            float partial[kWeightFrags][kTokenFrags][4];
#pragma unroll
            for (int ks = 0; ks < kBlockK / 32; ++ks) {
                if (ks % WARPS_K != warp_k) continue;
                if (k0 + ks * 32 >= K) break;
                const int byte = K_GRAN == 32 ? ks : block_byte;
                if (K_GRAN == 32 || ks < WARPS_K) {  // this warp's first k-step of the stage
#pragma unroll
                    for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
                            weight_scale[f][h] = ue8m0_to_float(byte_of(scale_words[fragment_row(f) + g + 8 * h], byte));
#pragma unroll
                    for (int j = 0; j < kTokenFrags; ++j)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
                            token_scale[j][h] = ue8m0_to_float(byte_of(scale_words[kWeightRows + j * 8 + 2 * t + h], byte));
#pragma unroll
                    for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
                        for (int j = 0; j < kTokenFrags; ++j)
#pragma unroll
                            for (int i = 0; i < 4; ++i) partial[f][j][i] = 0.0f;
                }
                u32 a[kWeightFrags][4], b[kTokenFrags][2];
                load_fragments(a, b, weight_tile, token_tile, ks);
#pragma unroll
                for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
                    for (int j = 0; j < kTokenFrags; ++j) ptx::mma_e4m3(partial[f][j], a[f], b[j], partial[f][j]);
                // Promote at the end of each K block: after every k-step for k_gran 32, after this
                // warp's last valid k-step of the stage for k_gran 128.
                const bool block_ends = K_GRAN == 32 || ks + WARPS_K >= kBlockK / 32 || k0 + (ks + WARPS_K) * 32 >= K;
                if (block_ends) {
#pragma unroll
                    for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
                        for (int j = 0; j < kTokenFrags; ++j)
#pragma unroll
                            for (int i = 0; i < 4; ++i)
                                acc[f][j][i] += (weight_scale[f][i / 2] * token_scale[j][i % 2]) * partial[f][j][i];
                }
            }
        } else {
            // Lane (g, t) supplies the scale of weight row g (t = 0) or g + 8 (t = 1) of each
            // fragment (thread-id-a = 0; lanes t = 2, 3 are ignored) and of token column g
            // (thread-id-b = 0). k_gran 128 shifts the wanted byte to byte 0; k_gran 32 selects
            // byte ks with the immediate byte-id.
            const int shift = K_GRAN == 128 ? 8 * block_byte : 0;
            u32 sfa[kWeightFrags], sfb[kTokenFrags];
#pragma unroll
            for (int f = 0; f < kWeightFrags; ++f) sfa[f] = scale_words[fragment_row(f) + g + 8 * (t & 1)] >> shift;
#pragma unroll
            for (int j = 0; j < kTokenFrags; ++j) sfb[j] = scale_words[kWeightRows + j * 8 + g] >> shift;
#pragma unroll
            for (int ks = 0; ks < kBlockK / 32; ++ks) {
                if (ks % WARPS_K != warp_k) continue;
                if (k0 + ks * 32 >= K) break;
                u32 a[kWeightFrags][4], b[kTokenFrags][2];
                load_fragments(a, b, weight_tile, token_tile, ks);
#pragma unroll
                for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
                    for (int j = 0; j < kTokenFrags; ++j) scaled_mma<K_GRAN == 32 ? 1 : 0>(acc[f][j], a[f], b[j], sfa[f], sfb[j], ks);
            }
        }
    }

    // The byte-id immediates must be compile-time: dispatch ks (0..3) to template instances.
    template <int PER_STEP_BYTE>
    __device__ __forceinline__ static void scaled_mma(float (&acc)[4], const u32 (&a)[4], const u32 (&b)[2], u32 sfa,
                                                      u32 sfb, int ks) {
        if (!PER_STEP_BYTE) return scaled_mma_byte<0>(acc, a, b, sfa, sfb);
        switch (ks) {
            case 0: return scaled_mma_byte<0>(acc, a, b, sfa, sfb);
            case 1: return scaled_mma_byte<1>(acc, a, b, sfa, sfb);
            case 2: return scaled_mma_byte<2>(acc, a, b, sfa, sfb);
            default: return scaled_mma_byte<3>(acc, a, b, sfa, sfb);
        }
    }

    template <int BYTE>
    __device__ __forceinline__ static void scaled_mma_byte(float (&acc)[4], const u32 (&a)[4], const u32 (&b)[2], u32 sfa, u32 sfb) {
        if constexpr (SCALE_MODE == kNative && kMxfp4)
            ptx::mma_e2m1_e4m3_block_scaled<BYTE, 0, BYTE, 0>(acc, a, b, acc, sfa, sfb);
        else if constexpr (SCALE_MODE == kNative)
            ptx::mma_e4m3_block_scaled<BYTE, 0, BYTE, 0>(acc, a, b, acc, sfa, sfb);
        else if constexpr (kMxfp4)
            ptx::mma_e2m1_e4m3_block_scaled_emulated<BYTE, 0, BYTE, 0>(acc, a, b, acc, sfa, sfb);
        else
            ptx::mma_e4m3_block_scaled_emulated<BYTE, 0, BYTE, 0>(acc, a, b, acc, sfa, sfb);
    }

    // K warps > 0 hand their partial sums to K warp 0 through shared memory.
    __device__ __forceinline__ void reduce_k_warps(float (&acc)[kWeightFrags][kTokenFrags][4]) const {
        if constexpr (WARPS_K > 1) {
            float* partials = reinterpret_cast<float*>(stages + kPartialsOffset);
            auto slot = [&](int k_warp, int f, int j, int i) {
                return (((k_warp - 1) * WARPS_N + warp_n) * kAccumulators + (f * kTokenFrags + j) * 4 + i) * 32 + lane;
            };
            if (warp_k > 0) {
#pragma unroll
                for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
                    for (int j = 0; j < kTokenFrags; ++j)
#pragma unroll
                        for (int i = 0; i < 4; ++i) partials[slot(warp_k, f, j, i)] = acc[f][j][i];
            }
            __syncthreads();
            if (warp_k == 0) {
                for (int k_warp = 1; k_warp < WARPS_K; ++k_warp)
#pragma unroll
                    for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
                        for (int j = 0; j < kTokenFrags; ++j)
#pragma unroll
                            for (int i = 0; i < 4; ++i) acc[f][j][i] += partials[slot(k_warp, f, j, i)];
            }
        }
    }

    // The epilogue's values through a padded smem tile, then 16-byte row stores of the
    // tile's valid rows and columns only.
    // `token_tile`: the unit's token tile (a layer's gate_up publishes on its counter).
    __device__ __forceinline__ void store_tile(const float (&acc)[kWeightFrags][kTokenFrags][4], const WorkUnit& w, int n0,
                                               i64 token_tile) const {
        const int g = lane / 4, t = lane % 4;
        if (warp_k == 0) {
#pragma unroll
            for (int f = 0; f < kColFrags; ++f)
#pragma unroll
                for (int j = 0; j < kTokenFrags; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        // (Ungated, kColFrags == kWeightFrags: the gate operand is unused.)
                        const int col = warp_n * kWarpCols + f * 16 + g + 8 * (i / 2);
                        const u16 value =
                            Output::value(p, Output::up_with_bias(p, w.expert, n0 + col, acc[f][j][i]),
                                          Output::gate_with_bias(p, w.expert, n0 + col, acc[GATED ? kColFrags + f : f][j][i]));
                        const int token = j * 8 + 2 * t + i % 2;
                        *reinterpret_cast<u16*>(stages + token * kOutPitch + col * 2) = value;
                    }
        }
        __syncthreads();
        if constexpr (ROLE == kLayerGateUp) {
            store_quantized_tile(w, n0, token_tile);
            return;
        }
        constexpr int kChunks = BLOCK_N / 8;
        for (int c = threadIdx.x; c < BLOCK_T * kChunks; c += kThreads) {
            const int r = c / kChunks, col = n0 + (c % kChunks) * 8;
            if (r < w.rows && col < kNOut) Output::store8(p.out, w.row + r, col, stages + r * kOutPitch + (c % kChunks) * 16);
        }
    }

    // A layer's gate_up: the staged bf16 tile quantized as the activation quantizer would
    // (mxfp8_rounding.cuh: a scale per K_GRAN columns, the lanes of a block reducing its amax with
    // shuffles) into the intermediate's e4m3 rows and scale bytes; then published on the token
    // tile's counter (release, after the barrier that orders every thread's stores before it).
    __device__ __forceinline__ void store_quantized_tile(const WorkUnit& w, int n0, i64 token_tile) const {
        constexpr int kChunks = BLOCK_N / 8, kLanesPerBlock = K_GRAN / 8, kRowsPerPass = kThreads / kChunks;
        for (int r0 = 0; r0 < BLOCK_T; r0 += kRowsPerPass) {  // uniform: every lane shuffles
            const int r = r0 + static_cast<int>(threadIdx.x) / kChunks, c = threadIdx.x % kChunks, col = n0 + 8 * c;
            const bool inside = r < w.rows && col < kNOut;
            bf16x8 chunk{{0u, 0u, 0u, 0u}};
            if (inside) chunk = *reinterpret_cast<const bf16x8*>(stages + r * kOutPitch + c * 16);
            float v[8];
            unpack8(chunk, v);
            const int exponent = scale_exponent(block_amax<kLanesPerBlock>(v));
            if (inside) {
                *reinterpret_cast<e4m3x8*>(link->rows + static_cast<i64>(w.row + r) * kNOut + col) =
                    quantize8(v, inverse_scale(exponent));
                if (c % kLanesPerBlock == 0) {
                    const int block = col / K_GRAN;
                    link->scales[(static_cast<i64>(block / 4) * link->m_padded + w.scale_row + r) * 4 + block % 4] =
                        static_cast<u8>(exponent);
                }
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) ptx::add_release(link->counters + 1 + token_tile, 1);
    }

    // `token_tile`: the unit's token tile (a layer's phases hand over by it).
    __device__ __forceinline__ void run_unit(const WorkUnit& w, i64 token_tile) const {
        const int n0 = w.n_tile * BLOCK_N;
        if constexpr (ROLE == kLayerDown) {
            // Its rows come from other CTAs' gate_up units: one thread acquires the tile's counter
            // (which also invalidates this SM's L1), the barrier orders every thread's loads after it.
            if (threadIdx.x == 0)
                while (ptx::load_acquire(link->counters + 1 + token_tile) < link->publishers) ptx::sleep_ns(64);
            __syncthreads();
        }
        float acc[kWeightFrags][kTokenFrags][4];
#pragma unroll
        for (int f = 0; f < kWeightFrags; ++f)
#pragma unroll
            for (int j = 0; j < kTokenFrags; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[f][j][i] = 0.0f;

#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < kKIters) load_stage(w, n0, s, s);
            ptx::cp_async_commit();
        }
        for (int k_iter = 0; k_iter < kKIters; ++k_iter) {
            ptx::cp_async_wait<STAGES - 2>();
            __syncthreads();
            // The slot refilled here was read in the previous iteration, which the barrier closed.
            const int next = k_iter + STAGES - 1;
            if (next < kKIters) load_stage(w, n0, next, next % STAGES);
            ptx::cp_async_commit();
            compute_stage(acc, k_iter, k_iter % STAGES);
        }
        ptx::cp_async_wait<0>();
        __syncthreads();
        reduce_k_warps(acc);
        store_tile(acc, w, n0, token_tile);
        __syncthreads();
    }

    __device__ __forceinline__ static void run(const GroupedGemmParams& params) {
        extern __shared__ __align__(128) u8 shared[];
        const int scheduler_bytes = Scheduler::shared_bytes(params.num_experts);
        ptx::require_dynamic_shared(scheduler_bytes + kPipelineBytes);
        // The launch may overlap the previous kernel's end: wait for it before the first global
        // access (the scheduler reads m_indptr), then let the next kernel launch the same way.
        ptx::wait_for_prior_grids();
        ptx::allow_next_grid();

        const Scheduler scheduler(params, reinterpret_cast<int*>(shared));
        const int warp = threadIdx.x / 32;
        const MmaGemm gemm{params, shared + scheduler_bytes, static_cast<int>(threadIdx.x % 32), warp % WARPS_N, warp / WARPS_N};
        for (i64 u = blockIdx.x; u < scheduler.num_units(); u += gridDim.x) gemm.run_unit(scheduler.unit(u), u / kNTiles);
    }
};

}  // namespace mxfp8_moe
