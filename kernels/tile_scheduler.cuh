// Which tile a persistent CTA computes next, derived on the device from m_indptr (no host sync).
//
// At kernel start every CTA clamps m_indptr into shared memory (non-decreasing, within [0, cum_m])
// and counts each expert's token tiles with a block-wide prefix sum. A work unit is (token tile, N tile), numbered token tile major, so
// CTAs running at the same time mostly share the weight tiles of one expert in L2. Experts with no
// rows own no tiles and cost nothing beyond the read of their two offsets.
#pragma once
#include "problem.cuh"

namespace mxfp8_moe {

struct WorkUnit {
    int expert;
    int row;        // first row of the tile in a / out
    int rows;       // valid rows in the tile, 1..BLOCK_T
    int scale_row;  // a_scale row of `row`
    int n_tile;
};

template <int THREADS, int BLOCK_T, int N_TILES>
struct TileScheduler {
    // Bytes of dynamic shared memory the scheduler needs in front of the pipeline buffers
    // (mirrored by the host's launch code).
    __host__ __device__ static constexpr int shared_bytes(int num_experts) {
        return (2 * 4 * (num_experts + 1) + 127) / 128 * 128;
    }

    const int* offsets;      // [E + 1] m_indptr clamped to [0, cum_m], made non-decreasing
    const int* tile_starts;  // [E + 1] token tiles before each expert
    int num_experts;

    __device__ __forceinline__ TileScheduler(const GroupedGemmParams& p, int* shared) {
        const int E = p.num_experts;
        int* clamped = shared;
        int* starts = shared + E + 1;

        // Offsets: clamped to [0, cum_m], then a running max, so the experts own disjoint row
        // ranges whose sizes add up to at most cum_m, whatever m_indptr holds (for a valid
        // m_indptr this changes nothing). Each thread takes a contiguous run of entries.
        {
            const int per_thread = ceil_div(E + 1, THREADS);
            const int first = min(E + 1, static_cast<int>(threadIdx.x) * per_thread);
            const int last = min(E + 1, first + per_thread);
            int run_max = 0;
            for (int e = first; e < last; ++e) run_max = max(run_max, clamped_offset(p, e));
            run_max = block_exclusive_scan(run_max, 0, [](int x, int y) { return max(x, y); });
            for (int e = first; e < last; ++e) clamped[e] = run_max = max(run_max, clamped_offset(p, e));
        }
        __syncthreads();

        // Token tiles per expert, and their exclusive prefix sum.
        const int per_thread = ceil_div(E, THREADS);
        const int first = min(E, static_cast<int>(threadIdx.x) * per_thread);
        const int last = min(E, first + per_thread);
        int count = 0;
        for (int e = first; e < last; ++e) count += expert_tiles(clamped, e);
        int running = block_exclusive_scan(count, 0, [](int x, int y) { return x + y; });
        for (int e = first; e < last; ++e) {
            starts[e] = running;
            running += expert_tiles(clamped, e);
        }
        if (threadIdx.x == THREADS - 1) starts[E] = running;
        __syncthreads();

        offsets = clamped;
        tile_starts = starts;
        num_experts = E;
    }

    // The same token tiles, seen with another count of N tiles (the fused layer's second GEMM).
    template <int OTHER_N_TILES>
    __device__ __forceinline__ explicit TileScheduler(const TileScheduler<THREADS, BLOCK_T, OTHER_N_TILES>& other)
        : offsets(other.offsets), tile_starts(other.tile_starts), num_experts(other.num_experts) {}

    // Exclusive scan of one value per thread, in thread order, under an associative `op`.
    template <typename Op>
    __device__ __forceinline__ static int block_exclusive_scan(int value, int identity, Op op) {
        __shared__ int warp_totals[THREADS / 32];
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
        int inclusive = value;
        for (int offset = 1; offset < 32; offset *= 2) {
            const int other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
            if (lane >= offset) inclusive = op(other, inclusive);
        }
        if (lane == 31) warp_totals[warp] = inclusive;
        __syncthreads();
        int prefix = identity;
        for (int w = 0; w < warp; ++w) prefix = op(prefix, warp_totals[w]);
        const int previous = __shfl_up_sync(0xFFFFFFFFu, inclusive, 1);
        __syncthreads();  // warp_totals is reused by the next scan
        return op(prefix, lane == 0 ? identity : previous);
    }

    __device__ __forceinline__ static int expert_tiles(const int* clamped, int e) {
        return ceil_div(max(clamped[e + 1] - clamped[e], 0), BLOCK_T);
    }

    // Read from shared memory at each use rather than kept in registers across the persistent
    // loop: a register held that long is what ptxas chose to spill in some sm_120a builds.
    __device__ __forceinline__ int num_token_tiles() const { return tile_starts[num_experts]; }
    __device__ __forceinline__ i64 num_units() const { return static_cast<i64>(tile_starts[num_experts]) * N_TILES; }

    __device__ __forceinline__ WorkUnit unit(i64 index) const {
        const int tile = static_cast<int>(index / N_TILES);
        // The expert owning `tile`: the last e with tile_starts[e] <= tile (empty experts before
        // it share its start and are skipped by taking the last).
        int lo = 0, hi = num_experts - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (tile_starts[mid] <= tile) lo = mid; else hi = mid - 1;
        }
        const ExpertRows rows = expert_rows(lo, offsets[lo], offsets[lo + 1]);  // offsets are monotone
        const int first_token = (tile - tile_starts[lo]) * BLOCK_T;
        WorkUnit w;
        w.expert = lo;
        w.row = rows.begin + first_token;
        w.rows = min(BLOCK_T, rows.end - w.row);
        w.scale_row = rows.scale_row + first_token;
        w.n_tile = static_cast<int>(index % N_TILES);
        return w;
    }
};

}  // namespace mxfp8_moe
