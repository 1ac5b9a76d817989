// The Hopper grouped GEMM (sm_90a): FP8 wgmma fed by TMA through an mbarrier pipeline.
//
// On Hopper only wgmma reaches the FP8 tensor-core rate (mma.sync FP8 is emulated through FP16
// there), and TMA streams tiles with one issuing thread; on sm_90a the heuristics send every shape
// this kernel supports here (gemm/heuristics.py). The structure:
//   - warpgroup 2 produces. One thread issues the TMA copies of each stage: the weight and token
//     tiles (128-byte swizzled, straight into the layout wgmma reads) and both operands' UE8M0
//     scale words for the stage's K block, all landing on the stage's "full" barrier. Warp 1
//     then turns the stage's scale bytes into floats ("prepared" barrier), work the consumers
//     would otherwise repeat in every thread. (Copying the scale words with cp.async instead,
//     eight 4-byte copies per lane and stage, cost 30 % of the kernel's time on H100.)
//   - MXFP4 weights (wgmma has no 4-bit operand) arrive packed, two codes a byte, and stay so in
//     shared memory: each consumer thread loads its A fragment's codes, widens them to e4m3 (exact
//     for every e2m1 value) in registers and issues wgmma with A from registers. The HBM stream and
//     the stage are halved, the tensor work is the FP8 kernel's.
//   - warpgroups 0 and 1 consume: each multiplies 64 weight rows by the BLOCK_T-token tile, one
//     scale group (a K block; a k32 slice for k_gran 32) at a time, into one of a few rotating
//     partial sums, and promotes it into the FP32 accumulators with the group's scales while later
//     groups' wgmmas run; after a stage's last group it releases the stage ("empty" barrier).
//   - the epilogue writes a full tile out by TMA store, finished while the consumers go on.
// The promotion (a multiply and an FMA per accumulator per scale group) is work a plain FP8 GEMM
// does not have; it runs on the CUDA cores beside the tensor work (docs/DESIGN.md).
// Split K (SPLITS > 1, decode shapes with fewer units than SMs): the CTAs of a cluster multiply
// the same unit over their shares of K, and rank 0 adds the others' accumulators, read from its
// shared memory in rank order (a sum whose order never depends on timing), before its epilogue.
// Operands are swapped as in the mma.sync kernel: weight rows are wgmma's M (64 per warpgroup),
// tokens its N: a token tile is 8, 16, 32, 64, 96 or 128 tokens; at k_gran 32 the tile of 32 or
// more that ends an expert runs the narrowest wgmma (in steps of 32) that covers its rows.
// A gated tile puts up rows in warpgroup 0 and the matching gate rows in warpgroup 1; the
// epilogue combines them through shared memory. Work units come from the same TileScheduler as
// the other kernels; the pipeline runs on across units. Rows a tile reads past its expert
// (another expert's tokens, weights or scales) only feed output elements that are never stored;
// the copy engine zero-fills what lies past a tensor's end.
#pragma once
#include "e2m1.cuh"
#include "epilogue.cuh"
#include "layer.cuh"
#include "mxfp8_rounding.cuh"
#include "tile_scheduler.cuh"
#include "ptx/cluster.cuh"
#include "ptx/grid_dependency.cuh"
#include "ptx/tma.cuh"
#include "ptx/wgmma.cuh"

namespace mxfp8_moe {

// The scale maps need MN-major scales (consecutive rows' words adjacent), the layout FlashInfer's
// quantizers produce; the host sends other layouts to the mma.sync kernel.
struct WgmmaTensorMaps {
    ptx::TensorMap tokens;         // a as (cum_m, K) bytes; box BLOCK_T rows x 128 bytes, 128-byte swizzle
    ptx::TensorMap weights;        // b as (E * N, K) bytes; box 64 rows x 128 bytes, 128-byte swizzle
                                   // (MXFP4: (E * N, K / 2) bytes; box 64 rows x 64 bytes, 64-byte swizzle)
    ptx::TensorMap token_scales;   // a_scale as (k_align, m_padded) words; box 1 x BLOCK_T
    ptx::TensorMap weight_scales;  // b_scale as (E, k_align, N) words; box 1 x 1 x 64
    ptx::TensorMap output;         // out as (cum_m, N or N / 2) bf16; box BLOCK_T x 64, 128-byte swizzle
};

// In a fused layer (GemmRole, layer.cuh): gate_up stores each tile straight from its registers and
// then publishes it on its token tile's counter; down's producer requests a stage's bf16 token rows
// (the `tokens` map: gate_up's output) once their tile is published, and its preparer warps
// quantize them into the stage's token tile.

template <int N, int K, int K_GRAN, bool GATED, int BLOCK_T, int STAGES, int SPLITS = 1, typename V = Variant<>,
          int ROLE = kWholeKernel, int CTAS_PER_SM = 1>
struct WgmmaGemm {
    static constexpr int kConsumers = 2;                      // warpgroups multiplying
    static constexpr int kThreads = (kConsumers + 1) * 128;   // + the producer warpgroup
    static constexpr int kBlockT = BLOCK_T;
    static constexpr int kStages = STAGES;
    static constexpr bool kInLayer = ROLE != kWholeKernel;
    static constexpr bool kQuantizesTokens = ROLE == kLayerDown;
    // CTAS_PER_SM = 2 (decode tiles): two CTAs share each SM, so twice the consumer warps hide each
    // other's latencies and twice the stages are in flight, in half the registers and shared memory.
    // The launch bound then leaves each thread 65536 / (384 x 2) registers, in steps of 8: 80.
    static constexpr int kLaunchRegisters = 65536 / (kThreads * CTAS_PER_SM) / 8 * 8;
    // setmaxnreg: 128 x 40 + 256 x 232 <= 384 x 168 at one CTA an SM. Split-K and layer kernels
    // (decode tiles: few accumulators) give the producer warpgroup more: a split's K loop starts at
    // a block only known at run time, and the layer's preparers quantize tokens. Two CTAs an SM:
    // 128 x 32 + 256 x 104 <= 384 x 80.
    static constexpr int kProducerRegisters = CTAS_PER_SM > 1 ? 32 : SPLITS > 1 || kInLayer ? 56 : 40;
    static constexpr int kConsumerRegisters = CTAS_PER_SM > 1 ? 104 : SPLITS > 1 || kInLayer ? 224 : 232;
    static constexpr int kBlockK = 128;
    static constexpr int kKIters = ceil_div(K, kBlockK);
    static constexpr int kUnitKIters = kKIters / SPLITS;  // the K blocks a CTA multiplies per unit
    static constexpr int kWeightRows = 64 * kConsumers;       // weight rows per tile
    static constexpr int kNOut = GATED ? N / 2 : N;
    static constexpr int kBlockN = GATED ? 64 : kWeightRows;  // output columns per tile
    static constexpr int kNTiles = ceil_div(kNOut, kBlockN);
    static constexpr int kAccumulators = BLOCK_T / 2;         // per thread: 64 x BLOCK_T / 128
    static constexpr bool kPackedWeights = V::kWeights == kE2M1;  // MXFP4: two codes a byte
    // Producer warps preparing stages: both phases of a layer kernel count the same arrivals.
    static constexpr int kPreparers = kInLayer ? 3 : 1;
    static constexpr int kPreparerThreads = 32 * kPreparers;

    // One stage: weight tile (MXFP4: packed, 64 bytes a row), token tile (both 1024-byte aligned
    // for the swizzle), the scale words (one per weight row, then one per token), then their floats
    // [k32 slice][row] (k_gran 128: one slice, the stage's K block).
    static constexpr int kWeightRowBytes = kPackedWeights ? kBlockK / 2 : kBlockK;
    static constexpr int kWeightBytes = kWeightRows * kWeightRowBytes;
    static constexpr int kTokenBytes = BLOCK_T * kBlockK;
    static constexpr int kScaleWords = kWeightRows + BLOCK_T;
    static constexpr int kScaleSlices = K_GRAN == 32 ? kBlockK / 32 : 1;
    static constexpr int kScaleFloatsOffset = kWeightBytes + kTokenBytes + kScaleWords * 4;
    // In a layer, then the stage's bf16 token rows (down: BLOCK_T rows of the K block's 128
    // columns, unswizzled; unused by gate_up, whose stages must be laid out alike).
    static constexpr int kRowsOffset =
        kWeightBytes + kTokenBytes + ceil_div(kScaleWords * 4 * (1 + kScaleSlices), 1024) * 1024;
    static constexpr int kRowsBytes = kInLayer ? BLOCK_T * kBlockK * 2 : 0;
    static constexpr int kCopyBytes =  // what a stage's copies deliver
        kWeightBytes + (kQuantizesTokens ? kWeightRows * 4 + kRowsBytes : kTokenBytes + kScaleWords * 4);
    static constexpr int kStageBytes = kRowsOffset + kRowsBytes;
    // After the stages: the bf16 output tile as the TMA store reads it (see staging_offset), then
    // for gated tiles the gate part of the activation of the gate warpgroup's accumulators,
    // [accumulator][thread] so each access is one 128-byte line.
    static constexpr int kStagingOffset = STAGES * kStageBytes;
    static constexpr int kExchangeOffset = kStagingOffset + BLOCK_T * kBlockN * 2;
    // Split K: then rank 0's slots for the other ranks' accumulators, [rank - 1][warpgroup][v / 4][thread][4].
    static constexpr int kSlotBytes = kConsumers * 128 * kAccumulators * 4;
    static constexpr int kSlotsOffset = kExchangeOffset + (GATED ? kAccumulators * 128 * 4 : 0);
    static constexpr int kTileBytes = kSlotsOffset + (SPLITS - 1) * kSlotBytes;
    // Dynamic shared memory: scheduler, barriers, up to 1 KB of alignment padding, tiles.
    static constexpr int kBarrierBytes = 256;

    static_assert(K % 16 == 0 && kNOut % 16 == 0, "K and the output width must be multiples of 16");
    static_assert(K_GRAN == 32 || K_GRAN == 128, "k granularity is 32 or 128");
    static_assert(BLOCK_T == 8 || BLOCK_T == 16 || (BLOCK_T % 32 == 0 && BLOCK_T <= 128),
                  "token tiles of 8, 16, 32, 64, 96 or 128 (ptx::Wgmma instances)");
    static_assert((3 * STAGES + 2) * 8 <= kBarrierBytes, "barriers must fit their region");
    static_assert(kKIters % SPLITS == 0, "split K: each rank multiplies as many K blocks");
    // A chain issues the next group before releasing the current one's stage: that must be another stage.
    static_assert(STAGES >= 2, "the promotion overlap needs two stages");
    // setmaxnreg moves registers within what the CTA got at launch: __launch_bounds__(384,
    // CTAS_PER_SM) caps every thread at kLaunchRegisters, and ptxas allocates exactly that.
    static_assert(128 * kProducerRegisters + kConsumers * 128 * kConsumerRegisters <= kThreads * kLaunchRegisters,
                  "the warpgroups' register counts exceed the CTA's allocation");
    // (At 32 tokens the MXFP4 consumers' four partials and fragments outgrow 104 registers: ptxas
    // serializes the wgmmas. WgmmaSpec checks the same on the host.)
    static_assert(CTAS_PER_SM == 1 || (CTAS_PER_SM == 2 && SPLITS == 1 && !kInLayer && BLOCK_T <= 16),
                  "two CTAs an SM: whole units of decode tiles (the consumers have 104 registers)");
    static_assert(!GATED || kNOut % 64 == 0, "gated tiles pair 64 up rows with 64 gate rows");
    // A warpgroup's 64 weight rows are one TMA box of consecutive rows.
    static_assert(!V::kInterleaved, "interleaved up and gate rows run on the mma.sync kernel");
    // A packed weight row's K block is 64 bytes: four 16-byte chunks, one per k32 step.
    static_assert(!kPackedWeights || K % 32 == 0, "MXFP4 rows must be whole 16-byte chunks (K % 32 == 0)");
    static_assert(!kPackedWeights || K_GRAN == 32, "MXFP4 weights have one scale per 32 values of K");
    static_assert(!kPackedWeights || BLOCK_T <= 96,
                  "MXFP4: at 128 tokens the A fragments beside the accumulators and partials spill");
    // The swizzles repeat every 1024 (128-byte) and 512 (64-byte) bytes from an aligned address.
    static_assert(kWeightBytes % 1024 == 0 && kTokenBytes % 1024 == 0 && kRowsOffset % 1024 == 0,
                  "the stage's tiles start 1024-byte aligned");
    static_assert(!kInLayer || SPLITS == 1, "a layer's phases multiply whole units");
    static_assert(!kQuantizesTokens || K % 8 == 0, "quantized tokens are read 8 bf16 at a time");

    using Scheduler = TileScheduler<kThreads, BLOCK_T, kNTiles>;
    using Output = Epilogue<N, GATED, V>;

    __host__ __device__ static constexpr int shared_bytes(int num_experts) {
        return Scheduler::shared_bytes(num_experts) + kBarrierBytes + 1024 + kTileBytes;
    }

    const GroupedGemmParams& p;
    const WgmmaTensorMaps& maps;
    const Scheduler& scheduler;
    u8* tiles;      // 1024-byte aligned
    u32 barriers;   // full[STAGES], prepared[STAGES], empty[STAGES], split K: partials, slot free
    // In a layer: one counter per token tile (after the kernel's exit count), and how many gate_up
    // units publish on each (its N tiles).
    i32* tile_counters = nullptr;
    int tile_publishers = 0;

    __device__ __forceinline__ u32 full_barrier(int s) const { return barriers + 8 * s; }
    __device__ __forceinline__ u32 prepared_barrier(int s) const { return barriers + 8 * (STAGES + s); }
    __device__ __forceinline__ u32 empty_barrier(int s) const { return barriers + 8 * (2 * STAGES + s); }
    __device__ __forceinline__ u32 partials_barrier() const { return barriers + 8 * 3 * STAGES; }
    __device__ __forceinline__ u32 slot_free_barrier() const { return barriers + 8 * (3 * STAGES + 1); }
    __device__ __forceinline__ u8* stage(int s) const { return tiles + s * kStageBytes; }

    // Units are shared by the SPLITS CTAs of a cluster (consecutive blocks); a CTA's split is its
    // cluster rank, and it multiplies K blocks [split * kUnitKIters, (split + 1) * kUnitKIters).
    __device__ __forceinline__ static i64 first_unit() { return blockIdx.x / SPLITS; }
    __device__ __forceinline__ static i64 unit_stride() { return gridDim.x / SPLITS; }
    __device__ __forceinline__ static int first_k_block() { return SPLITS > 1 ? ptx::cluster_rank() * kUnitKIters : 0; }
    __device__ __forceinline__ float* scale_floats(int s) const {
        return reinterpret_cast<float*>(stage(s) + kScaleFloatsOffset);
    }

    // The expert's weight row (of its N) at which a tile's weight rows 64c .. 64c + 63 start.
    __device__ __forceinline__ static int weight_row(int n0, int c) {
        return GATED ? c * kNOut + n0 : n0 + 64 * c;
    }

    // ---- producer -------------------------------------------------------------------------------

    // One thread: every copy of a stage is a TMA box counted on the stage's "full" barrier. Units
    // `first`, `first` + unit_stride(), ...; `it`: the pipeline iteration of the first unit's first
    // stage. Returns the iteration after the last stage (the producer, the preparers and the
    // consumers each count the same iterations).
    __device__ __forceinline__ int produce(int it, i64 first) const {
        ptx::prefetch_tensor_map(&maps.tokens);  // (a layer's down phase: its bf16 rows)
        if constexpr (!kQuantizesTokens) ptx::prefetch_tensor_map(&maps.token_scales);
        ptx::prefetch_tensor_map(&maps.weights);
        ptx::prefetch_tensor_map(&maps.weight_scales);
        ptx::prefetch_tensor_map(&maps.output);  // for the consumers' stores
        const int kb0 = first_k_block();
        const int first_it = it;
        RowRequests requests{it, -1, 0};  // a layer's down phase
        for (i64 u = first; u < scheduler.num_units(); u += unit_stride()) {
            const WorkUnit w = scheduler.unit(u);
            const int n0 = w.n_tile * kBlockN;
            for (int kb = kb0; kb < kb0 + kUnitKIters; ++kb, ++it) {
                const int s = it % STAGES;
                // The stage that last used this slot is released only once it and the stage after it
                // have their rows: a chain issues the next group's wgmmas before it releases a stage.
                if constexpr (kQuantizesTokens) request_rows(requests, it - STAGES + 2, first_it, first, true);
                ptx::mbarrier_wait(empty_barrier(s), ((it / STAGES) & 1) ^ 1);
                const u32 full = full_barrier(s);
                const u32 weights = ptx::shared_address(stage(s));
                const u32 tokens = weights + kWeightBytes;
                const u32 scales = tokens + kTokenBytes;  // the weight rows' words, then the tokens'
                // The scale word holding this stage's K block: one of its bytes for k_gran 128,
                // all four (the stage's k32 slices) for k_gran 32.
                const int word = kb * kBlockK / K_GRAN / 4;
                ptx::mbarrier_arrive_expect_tx(full, kCopyBytes);
                if constexpr (!kQuantizesTokens) {
                    ptx::tma_load_2d(tokens, &maps.tokens, kb * kBlockK, w.row, full);
                    ptx::tma_load_2d(scales + 4 * kWeightRows, &maps.token_scales, w.scale_row, word, full);
                }
#pragma unroll
                for (int c = 0; c < kConsumers; ++c) {
                    const int row = weight_row(n0, c);
                    ptx::tma_load_2d(weights + c * 64 * kWeightRowBytes, &maps.weights, kb * kWeightRowBytes,
                                     w.expert * N + row, full);
                    ptx::tma_load_3d(scales + 4 * 64 * c, &maps.weight_scales, row, word, w.expert, full);
                }
                if constexpr (kQuantizesTokens) request_rows(requests, it + 1, first_it, first, false);
            }
        }
        if constexpr (kQuantizesTokens) request_rows(requests, it, first_it, first, true);
        return it;
    }

    // A layer's down phase: which stages have their token rows requested (`next` on), and the last
    // unit found published, with its first row (so a unit costs one acquire and one scheduler lookup,
    // not one per stage: each sits on the producer's path).
    struct RowRequests {
        int next;
        i64 unit;
        int row;
    };

    // A layer's down phase: request the token rows of pipeline iterations requests.next .. limit - 1,
    // whose weights are already requested (their "full" barriers expect the rows' bytes too), as far
    // as their token tiles are published (acquire), or, with `wait`, waiting for them. So the weights
    // of the next stages stream while gate_up units are still running; a slot whose stage still
    // waits for its rows is the only thing that holds the producer. Iterations map back to units as
    // produce() counts them (from `first_it` at unit `first`, kUnitKIters per unit).
    __device__ __forceinline__ void request_rows(RowRequests& requests, int limit, int first_it, i64 first,
                                                 bool wait) const {
        for (; requests.next < limit; ++requests.next) {
            const int done = requests.next - first_it;
            const i64 u = first + static_cast<i64>(done / kUnitKIters) * unit_stride();
            if (u != requests.unit) {
                const i32* counter = tile_counters + 1 + u / kNTiles;
                if (ptx::load_acquire(counter) < tile_publishers) {
                    if (!wait) return;
                    while (ptx::load_acquire(counter) < tile_publishers) ptx::sleep_ns(64);
                }
                ptx::fence_proxy_async_global();  // the rows' generic stores, acquired above, before the copies read them
                requests.unit = u;
                requests.row = scheduler.unit(u).row;
            }
            const int s = requests.next % STAGES;
            ptx::tma_load_2d(ptx::shared_address(stage(s) + kRowsOffset), &maps.tokens, done % kUnitKIters * kBlockK,
                             requests.row, full_barrier(s));
        }
    }

    // Once per stage for the whole CTA, by the kPreparerThreads threads of warps 1 .. kPreparers:
    // scale bytes -> floats (byte kb % 4 of each word for k_gran 128, all four bytes, the stage's
    // k32 slices, for k_gran 32) and, as a layer's down phase, the token tile from the gate_up
    // phase's rows. Units and iterations as produce().
    __device__ __forceinline__ int prepare_stages(int preparer, int it, i64 first) const {
        const int kb0 = first_k_block();
        for (i64 u = first; u < scheduler.num_units(); u += unit_stride()) {
            WorkUnit w{};
            if constexpr (kQuantizesTokens) w = scheduler.unit(u);
            for (int kb = kb0; kb < kb0 + kUnitKIters; ++kb, ++it) {
                const int s = it % STAGES;
                // The consumers' release of the stage's previous round already precedes "full"
                // (through the producer); waiting for it here as well makes the ordering of these
                // float writes after their reads direct, and adds no wait beyond "full"'s.
                ptx::mbarrier_wait(empty_barrier(s), ((it / STAGES) & 1) ^ 1);
                ptx::mbarrier_wait(full_barrier(s), (it / STAGES) & 1);
                const u32* words = reinterpret_cast<const u32*>(stage(s) + kWeightBytes + kTokenBytes);
                float* floats = scale_floats(s);
                // (The token words are quantize_tokens' to fill, as a layer's down phase.)
                for (int i = preparer; i < (kQuantizesTokens ? kWeightRows : kScaleWords); i += kPreparerThreads) {
                    const u32 word = words[i];
#pragma unroll
                    for (int slice = 0; slice < kScaleSlices; ++slice) {
                        // A k32 slice past K (k_gran 32, last stage) has zero-filled data and a
                        // padding scale byte that may hold anything (0xFF = NaN): scale it by 0,
                        // so it adds nothing, as in the reference and the mma.sync kernel.
                        const bool past_k = K_GRAN == 32 && kb * kBlockK + slice * 32 >= K;
                        floats[slice * kScaleWords + i] =
                            past_k ? 0.0f : ue8m0_to_float(byte_of(word, K_GRAN == 32 ? slice : kb % 4));
                    }
                }
                if constexpr (kQuantizesTokens) quantize_tokens(s, kb, w, preparer);
                ptx::mbarrier_arrive(prepared_barrier(s));
            }
        }
        return it;
    }

    // A layer's down phase: the stage's token tile (K block kb of the unit's rows) from the bf16 rows
    // the copy brought, quantized exactly as the activation quantizer would (same rounding,
    // mxfp8_rounding.cuh; a scale per K_GRAN columns), into the 128-byte swizzle wgmma reads, and
    // the tokens' scale floats beside the weight rows'. Sixteen lanes cover a row's 128 columns, 8
    // each; a warp takes two rows at a time, over the expert's rows only (one or two at decode:
    // this work is on every stage's path). Columns past K quantize to zeros; the rows past the
    // expert (another tile's, maybe not yet published) are zeros written as such, scale 0: they
    // feed only outputs that are never stored.
    __device__ __forceinline__ void quantize_tokens(int s, int kb, const WorkUnit& w, int preparer) const {
        constexpr int kLanesPerGroup = K_GRAN == 32 ? 4 : 16;  // lanes of one scale group
        const int warp = preparer / 32, lane = preparer % 32, column_lane = lane % 16;
        const int column = kb * kBlockK + 8 * column_lane;
        const u8* rows = stage(s) + kRowsOffset;
        u8* tile = stage(s) + kWeightBytes;
        float* token_floats = scale_floats(s) + kWeightRows;
        const int quantized_rows = min(BLOCK_T, (w.rows + 1) / 2 * 2);  // whole row pairs: warp-uniform loops
        for (int t0 = 2 * warp; t0 < quantized_rows; t0 += 2 * kPreparers) {
            const int t = t0 + lane / 16;
            const bool inside = t < w.rows && column < K;
            bf16x8 chunk{{0u, 0u, 0u, 0u}};
            if (inside) chunk = *reinterpret_cast<const bf16x8*>(rows + t * kBlockK * 2 + column_lane * 16);
            float v[8];
            unpack8(chunk, v);
            const int exponent = scale_exponent(block_amax<kLanesPerGroup>(v));
            // Eight bytes: half of the row's 16-byte chunk column_lane / 2, swizzled by the row.
            *reinterpret_cast<e4m3x8*>(tile + t * kBlockK + ((column_lane / 2) ^ (t % 8)) * 16 + column_lane % 2 * 8) =
                quantize8(v, inverse_scale(exponent));
            if (column_lane % kLanesPerGroup == 0)
                token_floats[column_lane / kLanesPerGroup * kScaleWords + t] =
                    inside ? ue8m0_to_float(static_cast<u32>(exponent)) : 0.0f;
        }
        for (int i = preparer; i < (BLOCK_T - quantized_rows) * 8; i += kPreparerThreads) {
            const int t = quantized_rows + i / 8, chunk = i % 8;
            *reinterpret_cast<u32x4*>(tile + t * kBlockK + chunk * 16) = u32x4{0u, 0u, 0u, 0u};
            if (chunk < kScaleSlices) token_floats[chunk * kScaleWords + t] = 0.0f;
        }
        ptx::fence_proxy_async_shared();  // the consumers' wgmmas read the tile through the async proxy
    }

    // ---- consumers ------------------------------------------------------------------------------

    // acc += partial * (weight scale of the row) * (token scale of the column), from one slice's
    // floats, over the tile's first WIDTH token columns.
    template <int WIDTH>
    __device__ __forceinline__ static void promote(float (&acc)[kAccumulators], const float (&partial)[WIDTH / 2],
                                                   const float* scales, int warpgroup, int thread) {
        const int warp = thread / 32, lane = thread % 32;
        const int row = 64 * warpgroup + 16 * warp + lane / 4;
        const float weight_scale[2] = {scales[row], scales[row + 8]};
        const f32x2* token_scales = reinterpret_cast<const f32x2*>(scales + kWeightRows + 2 * (lane % 4));
#pragma unroll
        for (int j = 0; j < WIDTH / 8; ++j) {
            const f32x2 token_scale = token_scales[4 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                acc[4 * j + i] += partial[4 * j + i] * (weight_scale[i / 2] * (i % 2 ? token_scale.y : token_scale.x));
        }
    }

    // A scale group is the K range of one scale: a stage's K block (k_gran 128) or one of its k32
    // slices. Its wgmmas sum into a partial that is promoted with the group's scales while later
    // groups' wgmmas run, in partials that rotate.
    static constexpr int kGroupsPerStage = K_GRAN == 32 ? kBlockK / 32 : 1;
    static constexpr int kGroups = kUnitKIters * kGroupsPerStage;
    static constexpr int kGroupK = kBlockK / kGroupsPerStage;
    // Partials of a WIDTH-token multiply: two, so a group's promotion runs during the next group's
    // wgmmas; four for MXFP4 weights on tiles of up to 64 tokens, where each group's wgmma waits
    // on its A fragment's loads and widening: three groups in flight then cover them. (Measured
    // together with the register-A path, H100, gpt-oss gate_up T = 64: 770 -> 690 us. On MXFP8
    // weights at k_gran 32 four partials changed nothing, 723 -> 726 us, so they keep two.)
    __host__ __device__ static constexpr int partials(int width) { return kPackedWeights && width <= 64 ? 4 : 2; }
    // Groups per chain: a chain ends with no wgmma in flight, since ptxas serializes every wgmma
    // of the kernel when a loop carries one in flight across its back edge. The chain's last
    // D - 1 promotions overlap less: a chain of two partials is four groups, of four partials two
    // K blocks. Six groups (K = 768 at k_gran 128) run as 3 + 3: as 4 + 2, ptxas spilled in the
    // consumers (an allocator quirk, not a rule: 4 + 4 + 2 is clean and 4 + 3 + 3 spills; the
    // build tests hold K = 768 and 1280).
    __host__ __device__ static constexpr int chain_groups(int width) { return 4 * partials(width) / 2; }
    static constexpr bool kThreeAndThree = kGroups == 6;
    // At k_gran 32 an expert's last tile multiplies only the token columns that hold its rows, in
    // steps of 32 (tiles of 8 and 16 tokens always run whole); heuristics.wgmma_token_tile assumes
    // the same.
    static constexpr bool kNarrowLastTile = K_GRAN == 32;
    static constexpr int kWidthStep = 32;
    static constexpr int kNarrowestWidth = kNarrowLastTile && BLOCK_T > kWidthStep ? kWidthStep : BLOCK_T;

    // Units and iterations as produce(): `first_stage` is the pipeline iteration of the first
    // unit's first K block.
    __device__ __forceinline__ int consume(int warpgroup, int thread, int first_stage, i64 first) const {
        float acc[kAccumulators];
        int round = 0;  // units done: the split-K barriers' phase
        for (i64 u = first; u < scheduler.num_units(); u += unit_stride(), first_stage += kUnitKIters, ++round) {
            const WorkUnit w = scheduler.unit(u);
#pragma unroll
            for (int i = 0; i < kAccumulators; ++i) acc[i] = 0.0f;
            multiply_narrowest<kNarrowestWidth>(acc, first_stage, w.rows, warpgroup, thread);
            if constexpr (SPLITS > 1) {
                if (!gather_splits(acc, round, warpgroup, thread)) continue;  // rank 0 stores the tile
            }
            store_tile(acc, w, warpgroup, thread);
            if constexpr (ROLE == kLayerGateUp) publish_tile(u / kNTiles, warpgroup, thread);
        }
        return first_stage;
    }

    // A layer's gate_up phase: once every consumer's stores of the tile are done (the barrier), one
    // thread counts the tile on its token tile's counter, releasing at GPU scope what the barrier
    // ordered before it (release is cumulative).
    __device__ __forceinline__ void publish_tile(i64 tile, int warpgroup, int thread) const {
        static_assert(GATED, "gate_up's store_tile ends with the consumers' barrier this relies on");
        if (warpgroup == 0 && thread == 0) ptx::add_release(tile_counters + 1 + tile, 1);
    }

    // Split K: every rank but 0 writes its accumulators into its slot in rank 0's shared memory and
    // arrives on rank 0's "partials" barrier; rank 0 waits for all of them, adds the slots in rank
    // order, and frees each slot by arriving on its writer's "slot free" barrier, which that rank
    // waits on before it writes the next unit's. Returns whether this CTA stores the tile.
    __device__ __forceinline__ bool gather_splits(float (&acc)[kAccumulators], int round, int warpgroup,
                                                  int thread) const {
        const int rank = ptx::cluster_rank();
        const int first = (warpgroup * kAccumulators / 4) * 128 + thread;  // this thread's first float4
        if (rank != 0) {
            ptx::mbarrier_wait<true>(slot_free_barrier(), (round & 1) ^ 1);
            const u32 slot = ptx::map_shared(ptx::shared_address(tiles + kSlotsOffset + (rank - 1) * kSlotBytes), 0);
#pragma unroll
            for (int j = 0; j < kAccumulators / 4; ++j)
                ptx::store_cluster(slot + 16 * (first + 128 * j), acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
            ptx::mbarrier_arrive_remote(ptx::map_shared(partials_barrier(), 0));
            return false;
        }
        ptx::mbarrier_wait<true>(partials_barrier(), round & 1);
#pragma unroll 1
        for (int r = 1; r < SPLITS; ++r) {
            const u32x4* slot = reinterpret_cast<const u32x4*>(tiles + kSlotsOffset + (r - 1) * kSlotBytes);
#pragma unroll
            for (int j = 0; j < kAccumulators / 4; ++j) {
                const u32x4 v = slot[first + 128 * j];
                acc[4 * j] += __uint_as_float(v.x);
                acc[4 * j + 1] += __uint_as_float(v.y);
                acc[4 * j + 2] += __uint_as_float(v.z);
                acc[4 * j + 3] += __uint_as_float(v.w);
            }
        }
        for (int r = 1; r < SPLITS; ++r) ptx::mbarrier_arrive_remote(ptx::map_shared(slot_free_barrier(), r));
        return true;
    }

    // The tile's K loop with the narrowest wgmma, from WIDTH up, that covers its rows (at k_gran 128
    // consume starts at BLOCK_T: always full width). Under random routing every expert's last tile
    // is partial; at k_gran 32, whose four promotions per K block are the limit, promoting only the
    // columns that hold rows pays: 5-8 % on H100 at T = 4096. At k_gran 128 the feed is the limit,
    // and narrow tiles (in shorter chains) cost up to 6 %. The width is uniform across the CTA (one
    // unit), as wgmma requires; accumulators past it keep their zeros and belong to rows that are
    // never stored. Each width has its own partials, live only inside its loop: partials shared by
    // all widths stay live across the branches, and ptxas then serializes the wgmmas for want of
    // registers (C7511).
    template <int WIDTH>
    __device__ __forceinline__ void multiply_narrowest(float (&acc)[kAccumulators], int first_stage, int rows,
                                                       int warpgroup, int thread) const {
        if constexpr (WIDTH < BLOCK_T) {
            if (rows > WIDTH) {
                multiply_narrowest<WIDTH + kWidthStep>(acc, first_stage, rows, warpgroup, thread);
                return;
            }
        }
        constexpr int kDepth = partials(WIDTH);
        float partial[kDepth][WIDTH / 2];
        if constexpr (WIDTH == BLOCK_T) {
            if constexpr (kThreeAndThree) {
                chain<3, WIDTH>(acc, partial, first_stage, 0, warpgroup, thread);
                chain<3, WIDTH>(acc, partial, first_stage, 3, warpgroup, thread);
            } else {
                constexpr int kChain = chain_groups(WIDTH);
                int g = 0;
                for (; g + kChain <= kGroups; g += kChain) chain<kChain, WIDTH>(acc, partial, first_stage, g, warpgroup, thread);
                chain<kGroups % kChain, WIDTH>(acc, partial, first_stage, g, warpgroup, thread);
            }
        } else {
            // A narrower tile (at most one per expert) runs chains of one group per partial: its
            // wgmmas are short, and chains of chain_groups() for every width made the code 1.7x
            // larger (gpt-oss gate_up: 68 -> 118 KB of SASS) for no measured gain. (Chains of one
            // made ptxas spill in the consumers.)
            static_assert(kGroups % kDepth == 0, "k_gran 32: four groups per K block");
            for (int g = 0; g < kGroups; g += kDepth) chain<kDepth, WIDTH>(acc, partial, first_stage, g, warpgroup, thread);
        }
    }

    // Groups g0 .. g0 + COUNT - 1: group g sums into partial[(g - g0) % D], D = partials(WIDTH); the
    // first D - 1 are issued up front, so D - 1 groups' wgmmas run during each promotion.
    template <int COUNT, int WIDTH, int D = partials(WIDTH)>
    __device__ __forceinline__ void chain(float (&acc)[kAccumulators], float (&partial)[D][WIDTH / 2],
                                          int first_stage, int g0, int warpgroup, int thread) const {
        if constexpr (COUNT > 0) {
            issue_ahead<0, (COUNT < D - 1 ? COUNT : D - 1), WIDTH>(partial, first_stage, g0, warpgroup);
            chain_link<0, COUNT, WIDTH>(acc, partial, first_stage, g0, warpgroup, thread);
        }
    }

    template <int I, int AHEAD, int WIDTH, int D>
    __device__ __forceinline__ void issue_ahead(float (&partial)[D][WIDTH / 2], int first_stage, int g0,
                                                int warpgroup) const {
        if constexpr (I < AHEAD) {
            issue_group<WIDTH>(partial[I], first_stage, g0 + I, warpgroup);
            issue_ahead<I + 1, AHEAD, WIDTH>(partial, first_stage, g0, warpgroup);
        }
    }

    // Link I: issue group I + D - 1, then promote group I once its wgmmas are done (every read of a
    // partial follows the wait that retires its wgmmas; the groups issued after it may run on).
    template <int I, int COUNT, int WIDTH, int D>
    __device__ __forceinline__ void chain_link(float (&acc)[kAccumulators], float (&partial)[D][WIDTH / 2],
                                               int first_stage, int g0, int warpgroup, int thread) const {
        constexpr int kNext = I + D - 1;
        if constexpr (kNext < COUNT) issue_group<WIDTH>(partial[kNext % D], first_stage, g0 + kNext, warpgroup);
        ptx::wgmma_wait<(COUNT - 1 - I < D - 1 ? COUNT - 1 - I : D - 1)>();
        finish_group<WIDTH>(acc, partial[I % D], first_stage, g0 + I, warpgroup, thread);
        if constexpr (I + 1 < COUNT) chain_link<I + 1, COUNT, WIDTH>(acc, partial, first_stage, g0, warpgroup, thread);
    }

    // Group g's wgmmas into `partial`, after waiting for its stage at the stage's first group.
    template <int WIDTH>
    __device__ __forceinline__ void issue_group(float (&partial)[WIDTH / 2], int first_stage, int g, int warpgroup) const {
        const int it = first_stage + g / kGroupsPerStage, s = it % STAGES, slice = g % kGroupsPerStage;
        if (slice == 0) {
            // "prepared" completes after "full" (the preparers waited for it); waiting for both
            // keeps the copies' visibility a direct acquire of the barrier they completed on.
            ptx::mbarrier_wait(full_barrier(s), (it / STAGES) & 1);
            ptx::mbarrier_wait(prepared_barrier(s), (it / STAGES) & 1);
        }
        // k32 step ks of the stage starts 32 bytes further: +2 in the descriptor's address field.
        const u64 b = ptx::smem_descriptor_sw128(ptx::shared_address(stage(s)) + kWeightBytes) + 2 * slice;
        if constexpr (kPackedWeights) {  // k_gran 32: the group is one k32 step
            u32 a[4];
            weight_fragment(a, s, slice, warpgroup);
            ptx::wgmma_fence();  // the fragment is written; the partial was last read D groups before
            ptx::Wgmma<WIDTH>::run(partial, a, b, 0);
        } else {
            const u64 a = ptx::smem_descriptor_sw128(ptx::shared_address(stage(s)) + warpgroup * 64 * kBlockK) + 2 * slice;
            ptx::wgmma_fence();  // the partial was last read by the promotion of the group D before
#pragma unroll
            for (int ks = 0; ks < kGroupK / 32; ++ks) ptx::Wgmma<WIDTH>::run(partial, a + 2 * ks, b + 2 * ks, ks);
        }
        ptx::wgmma_commit();
    }

    // MXFP4: this thread's A fragment of k32 step `step` of stage s, widened to e4m3: the codes
    // 4 q .. 4 q + 3 (register 0: row g, 1: row g + 8) and 16 + 4 q .. 19 + 4 q (registers 2, 3) of
    // the step, for rows g = 16 warp + lane / 4 of the warpgroup's 64 and q = lane % 4, each four
    // codes one 2-byte load. The packed tile holds 64-byte rows whose 16-byte chunk j (step j) the
    // copy's 64-byte swizzle puts at j ^ (row / 2) % 4: a load's eight rows (rows g and g + 8 have
    // the same phase) then fall on distinct banks, where unswizzled rows 0, 2, 4 and 6 shared one.
    __device__ __forceinline__ void weight_fragment(u32 (&a)[4], int s, int step, int warpgroup) const {
        const int thread = threadIdx.x % 128;
        const int row = 16 * (thread / 32) + thread % 32 / 4;
        const u8* chunk = stage(s) + (64 * warpgroup + row) * kWeightRowBytes + 16 * (step ^ (row / 2 % 4)) + 2 * (thread % 4);
        constexpr int kEightRows = 8 * kWeightRowBytes;
        a[0] = e2m1_to_e4m3<0>(*reinterpret_cast<const u16*>(chunk));
        a[1] = e2m1_to_e4m3<0>(*reinterpret_cast<const u16*>(chunk + kEightRows));
        a[2] = e2m1_to_e4m3<0>(*reinterpret_cast<const u16*>(chunk + 8));
        a[3] = e2m1_to_e4m3<0>(*reinterpret_cast<const u16*>(chunk + kEightRows + 8));
    }

    // Promote group g's partial (its wgmmas are done); after the stage's last group, release the
    // stage. Every thread arrives, since an arrive releases only the arriving thread's own reads.
    template <int WIDTH>
    __device__ __forceinline__ void finish_group(float (&acc)[kAccumulators], float (&partial)[WIDTH / 2],
                                                 int first_stage, int g, int warpgroup, int thread) const {
        const int it = first_stage + g / kGroupsPerStage, s = it % STAGES, slice = g % kGroupsPerStage;
        ptx::fence_registers(partial);
        promote<WIDTH>(acc, partial, scale_floats(s) + slice * kScaleWords, warpgroup, thread);
        if (slice == kGroupsPerStage - 1) ptx::mbarrier_arrive(empty_barrier(s));
    }

    // Named barrier 1 among the two consumer warpgroups (barrier 0 is __syncthreads).
    __device__ __forceinline__ static void consumers_sync() {
        asm volatile("bar.sync 1, %0;\n" :: "n"(kConsumers * 128) : "memory");
    }

    // Byte offset of output element (token, col) of a tile in the staging tile: per 64 columns,
    // BLOCK_T rows of 128 bytes whose 16-byte chunks are swizzled by row (the TMA store's 128-byte
    // swizzle), which also spreads a warp's 2-byte writes over distinct banks.
    __device__ __forceinline__ static int staging_offset(int token, int col) {
        return (col / 64) * BLOCK_T * 128 + token * 128 + (((col % 64 / 8) ^ (token % 8)) * 16) + col % 8 * 2;
    }

    // The epilogue's values out (gated: warpgroup 1 hands the activation's gate part of its
    // accumulators to warpgroup 0, which holds the matching up ones). A full tile (every row in its
    // expert) goes through a staging tile and out by TMA store, finished by the copy engine while
    // the consumers go on with the next unit (storing synchronously cost 9-17 % of the kernel's
    // time); the tile that ends an expert is stored by the consumers straight from their
    // registers, its valid rows only.
    __device__ __forceinline__ void store_tile(const float (&acc)[kAccumulators], const WorkUnit& w, int warpgroup,
                                               int thread) const {
        float* exchange = reinterpret_cast<float*>(tiles + kExchangeOffset);
        if (GATED && warpgroup == 1) {
            const int first_col = w.n_tile * kBlockN + 16 * (thread / 32) + thread % 32 / 4;
#pragma unroll
            for (int v = 0; v < kAccumulators; ++v)
                exchange[v * 128 + thread] =
                    Output::gate_part(p, Output::gate_with_bias(p, w.expert, first_col + 8 * (v % 4 / 2), acc[v]));
        }
        // (A layer's gate_up stores from registers: a TMA store's writes would need a wait and a
        // proxy fence before the tile's publication, and at decode sizes its tiles are partial anyway.)
        if (w.rows == BLOCK_T && ROLE != kLayerGateUp) {
            store_full_tile(acc, exchange, w, warpgroup, thread);
        } else {
            if (GATED) consumers_sync();  // the exchange is written
            if (!GATED || warpgroup == 0) store_partial_tile(acc, exchange, w, warpgroup, thread);
            if (GATED) consumers_sync();  // ... and read before the next tile writes it
        }
    }

    __device__ __forceinline__ void store_full_tile(const float (&acc)[kAccumulators], const float* exchange,
                                                    const WorkUnit& w, int warpgroup, int thread) const {
        u8* staging = tiles + kStagingOffset;
        const int warp = thread / 32, lane = thread % 32;
        const bool issuer = warpgroup == 0 && thread == 0;  // issues the TMA stores
        if (issuer) ptx::bulk_wait_read();  // the last TMA store has read the staging tile
        consumers_sync();                   // ... and, gated, the exchange is written
        if (!GATED || warpgroup == 0) {
#pragma unroll
            for (int j = 0; j < BLOCK_T / 8; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int v = 4 * j + i;
                    const int col = (GATED ? 0 : 64 * warpgroup) + 16 * warp + lane / 4 + 8 * (i / 2);
                    const u16 value = Output::combine(p, Output::up_with_bias(p, w.expert, w.n_tile * kBlockN + col, acc[v]),
                                                      GATED ? exchange[v * 128 + thread] : 0.0f);
                    const int token = 8 * j + 2 * (lane % 4) + i % 2;
                    *reinterpret_cast<u16*>(staging + staging_offset(token, col)) = value;
                }
            ptx::fence_proxy_async_shared();  // for the TMA store
        }
        consumers_sync();
        if (issuer) {
            const int n0 = w.n_tile * kBlockN;
#pragma unroll
            for (int box = 0; box < kBlockN / 64; ++box)  // columns past N are clipped
                if (n0 + 64 * box < kNOut)
                    ptx::tma_store_2d(&maps.output, ptx::shared_address(staging + box * BLOCK_T * 128),
                                      n0 + 64 * box, w.row);
            ptx::bulk_commit();
        }
    }

    // The tile that ends an expert: a thread's accumulators, each to its (token, column) of out (a
    // warp's eight lanes of one token write 16 consecutive bytes), no staging tile; the gated
    // exchange's barriers are store_tile's. Decode tiles hold a few rows: the staging round trip
    // and its barriers cost 2-5 % there.
    __device__ __forceinline__ void store_partial_tile(const float (&acc)[kAccumulators], const float* exchange,
                                                       const WorkUnit& w, int warpgroup, int thread) const {
        const int warp = thread / 32, lane = thread % 32;
        const int n0 = w.n_tile * kBlockN;
#pragma unroll
        for (int j = 0; j < BLOCK_T / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int v = 4 * j + i;
                const int col = n0 + (GATED ? 0 : 64 * warpgroup) + 16 * warp + lane / 4 + 8 * (i / 2);
                const int token = 8 * j + 2 * (lane % 4) + i % 2;
                if (token < w.rows && col < kNOut)
                    Output::store(p.out, w.row + token, col,
                                  Output::combine(p, Output::up_with_bias(p, w.expert, col, acc[v]),
                                                  GATED ? exchange[v * 128 + thread] : 0.0f));
            }
    }

    __device__ __forceinline__ static void run(const GroupedGemmParams& params, const WgmmaTensorMaps& maps) {
        extern __shared__ __align__(128) u8 shared[];
        const int scheduler_bytes = Scheduler::shared_bytes(params.num_experts);
        ptx::require_dynamic_shared(shared_bytes(params.num_experts));
        // The launch may overlap the previous kernel's end: wait for it before the first global
        // access (the scheduler reads m_indptr), then let the next kernel launch the same way.
        ptx::wait_for_prior_grids();
        ptx::allow_next_grid();

        const Scheduler scheduler(params, reinterpret_cast<int*>(shared));
        const u32 barriers = ptx::shared_address(shared + scheduler_bytes);
        const u32 tiles_address = (barriers + kBarrierBytes + 1023) & ~1023u;
        u8* tiles = shared + scheduler_bytes + (tiles_address - barriers);
        if (threadIdx.x == 0) init_barriers(barriers);
        __syncthreads();
        if constexpr (SPLITS > 1) ptx::cluster_sync();  // no CTA arrives on another's barrier before its init

        const WgmmaGemm gemm{params, maps, scheduler, tiles, barriers};
        const int warpgroup = threadIdx.x / 128, thread = threadIdx.x % 128;
        if (warpgroup == kConsumers) {
            asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(kProducerRegisters));
            if (thread == 0) gemm.produce(0, first_unit());
            else if (is_preparer(thread)) gemm.prepare_stages(preparer_index(thread), 0, first_unit());
        } else {
            asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(kConsumerRegisters));
            gemm.consume(warpgroup, thread, 0, first_unit());
            if (warpgroup == 0 && thread == 0) ptx::bulk_wait();  // shared memory outlives the last store
        }
        if constexpr (SPLITS > 1) ptx::cluster_sync();  // ... and the other ranks' last accesses to it
    }

    // The producer warpgroup's threads that prepare stages (warps 1 .. kPreparers), and their
    // index among the preparers. (One preparer warp is handed its lane: ptxas then knows the
    // index's range, and the MXFP8 kernels keep the code they had before MXFP4 came.)
    __device__ __forceinline__ static bool is_preparer(int thread) { return thread / 32 >= 1 && thread / 32 <= kPreparers; }
    __device__ __forceinline__ static int preparer_index(int thread) { return kPreparers == 1 ? thread % 32 : thread - 32; }

    // By one thread, before the CTA's first __syncthreads.
    __device__ __forceinline__ static void init_barriers(u32 barriers) {
        for (int s = 0; s < STAGES; ++s) {
            ptx::mbarrier_init(barriers + 8 * s, 1);                                // the producer's expect_tx
            ptx::mbarrier_init(barriers + 8 * (STAGES + s), kPreparerThreads);      // the preparer warps
            ptx::mbarrier_init(barriers + 8 * (2 * STAGES + s), kConsumers * 128);  // every consumer thread
        }
        if (SPLITS > 1) {
            ptx::mbarrier_init(barriers + 8 * 3 * STAGES, (SPLITS - 1) * kConsumers * 128);  // partials: other ranks
            ptx::mbarrier_init(barriers + 8 * (3 * STAGES + 1), kConsumers * 128);          // slot free: rank 0
        }
        ptx::fence_barrier_init();
    }
};

}  // namespace mxfp8_moe
