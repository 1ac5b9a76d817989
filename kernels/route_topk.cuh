// Softmax top-k routing and the permutation into expert order, in one launch of one CTA.
//
// For decode-sized batches the routing is a handful of small torch ops (softmax, top-k, the
// renormalization, a sort, a search, the division for token ids), each a launch that costs more
// than its work. Here one CTA does it all:
//   1. a warp per token: softmax statistics over the E logits (held in registers as keys), then TOP_K
//      rounds of a warp arg-max, the experts and weights into shared memory, and a shared-memory
//      count per expert (integer atomics: the counts do not depend on their order). A round is one
//      lane-local scan and two warp reductions (redux.sync on sm_80+: the largest order-preserving
//      key of a logit, then the lowest expert holding it), not a five-step shuffle tree;
//   2. an exclusive scan of the counts -> m_indptr;
//   3. one warp places the chosen (token, slot) pairs, 32 at a time in order: lanes choosing the
//      same expert find each other (match.any) and take consecutive rows in lane order, so each
//      expert's rows come in token order, as a stable sort would give (and as the torch path of
//      mxfp8_moe/routing.py gives): the result is deterministic. It also records where each pair
//      went (slot_row), which the combine reads to gather a token's rows without atomics.
// Ties between equal logits go to the lower expert index; NaN counts as the largest value, as in
// torch.topk, so the chosen experts are always in [0, E).
#pragma once
#include "common.cuh"
#include "ptx/grid_dependency.cuh"

namespace mxfp8_moe {

// Mirrored by mxfp8_moe/routing.py.
struct RouteParams {
    const void* logits;  // (T, E) float32 or bfloat16, row-major
    i64* token;          // (T * TOP_K,) the token of each expert-ordered row
    float* weight;       // (T * TOP_K,) its routing weight
    i32* m_indptr;       // (E + 1,)
    i32* slot_row;       // (T * TOP_K,) the row that (token t, slot j) became, at t * TOP_K + j
    i32 num_tokens;      // T, with T * TOP_K <= MAX_ROWS (checked by the host)
};

// A logit as an unsigned key in the logits' order (NaN, of either sign, above +inf; -0 equal to
// +0, so the two tie as equal logits do), and back (a NaN key gives a NaN).
__device__ __forceinline__ u32 order_key(float v) {
    const u32 bits = __float_as_uint(v == 0.0f ? 0.0f : v);
    return v != v ? 0xFFFFFFFFu : (bits & 0x80000000u ? ~bits : bits | 0x80000000u);
}
__device__ __forceinline__ float key_value(u32 key) {
    return __uint_as_float(key & 0x80000000u ? key & 0x7FFFFFFFu : ~key);
}

// The warp's largest / smallest value (every lane active).
__device__ __forceinline__ u32 warp_max(u32 v) {
#if __CUDA_ARCH__ >= 800
    asm("redux.sync.max.u32 %0, %0, 0xffffffff;" : "+r"(v));
#else
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(~0u, v, offset));
#endif
    return v;
}
__device__ __forceinline__ u32 warp_min(u32 v) {
#if __CUDA_ARCH__ >= 800
    asm("redux.sync.min.u32 %0, %0, 0xffffffff;" : "+r"(v));
#else
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = min(v, __shfl_xor_sync(~0u, v, offset));
#endif
    return v;
}

// The lanes of the warp whose `value` equals this lane's (every lane active).
__device__ __forceinline__ u32 lanes_matching(int value) {
    u32 lanes;
    asm("match.any.sync.b32 %0, %1, 0xffffffff;" : "=r"(lanes) : "r"(value));
    return lanes;
}

template <int E, int TOP_K, bool BF16_LOGITS, bool RENORMALIZE, int MAX_ROWS, int THREADS>
__device__ __forceinline__ void route_topk(const RouteParams& p) {
    constexpr int kPerLane = ceil_div(E, 32);
    constexpr int kWarps = THREADS / 32;
    static_assert(kPerLane <= 32, "a lane holds at most 32 logits and their keys");
    static_assert(TOP_K <= E && TOP_K <= 32, "top-k of E experts, one lane writes each");
    __shared__ i32 chosen_expert[MAX_ROWS];
    __shared__ float chosen_weight[MAX_ROWS];
    __shared__ i32 expert_count[E];
    __shared__ i32 expert_start[E];

    // Launched to overlap the previous kernel's end: wait for it (it wrote the logits), then let
    // the quantizer that reads this kernel's rows launch the same way.
    ptx::wait_for_prior_grids();
    ptx::allow_next_grid();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int rows = p.num_tokens * TOP_K;
    for (int e = threadIdx.x; e < E; e += THREADS) expert_count[e] = 0;
    __syncthreads();

    for (int t = warp; t < p.num_tokens; t += kWarps) {
        // The logits as keys (mapping back is exact); experts past E get 0, below every logit's.
        u32 key[kPerLane];
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
            const int e = j * 32 + lane;
            if (e >= E) {
                key[j] = 0u;
            } else if (BF16_LOGITS) {
                const u16 bits = static_cast<const u16*>(p.logits)[static_cast<i64>(t) * E + e];
                key[j] = order_key(__uint_as_float(static_cast<u32>(bits) << 16));
            } else {
                key[j] = order_key(static_cast<const float*>(p.logits)[static_cast<i64>(t) * E + e]);
            }
        }
        // Softmax statistics: the row's max (NaN if any logit is NaN: then so is every
        // probability, as in torch) and sum of exp(logit - max).
        u32 lane_max = key[0];
#pragma unroll
        for (int j = 1; j < kPerLane; ++j) lane_max = max(lane_max, key[j]);
        const float row_max = key_value(warp_max(lane_max));
        float row_sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j)
            if (j * 32 + lane < E) row_sum += expf(key_value(key[j]) - row_max);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) row_sum += __shfl_xor_sync(~0u, row_sum, offset);

        // Round k: each lane's best untaken key (the lower j, the lower expert, wins a tie), then
        // the warp's largest key, then the lowest expert holding it.
        float my_probability = 0.0f, chosen_sum = 0.0f;
        int my_expert = 0;
        u32 taken = 0;  // bit j: this lane's expert j * 32 + lane is chosen
        for (int k = 0; k < TOP_K; ++k) {
            u32 lane_best = 0;  // below every logit's key (-inf's is 0x007FFFFF, a NaN's the largest)
            int lane_expert = lane;
#pragma unroll
            for (int j = 0; j < kPerLane; ++j)
                if (!(taken >> j & 1u) && key[j] > lane_best) {
                    lane_best = key[j];
                    lane_expert = j * 32 + lane;
                }
            const u32 best = warp_max(lane_best);
            const int expert = static_cast<int>(warp_min(lane_best == best ? lane_expert : 0x7FFFFFFF));
            if (expert % 32 == lane) taken |= 1u << (expert / 32);
            const float probability = expf(key_value(best) - row_max) / row_sum;
            chosen_sum += probability;
            if (lane == k) {
                my_probability = probability;
                my_expert = expert;
            }
        }
        if (lane < TOP_K) {
            chosen_expert[t * TOP_K + lane] = my_expert;
            chosen_weight[t * TOP_K + lane] = RENORMALIZE ? my_probability / chosen_sum : my_probability;
            atomicAdd(&expert_count[my_expert], 1);
        }
    }
    __syncthreads();

    if (warp == 0) {  // exclusive scan of the counts: each lane sums a run of experts, then the warp
        constexpr int kRun = ceil_div(E, 32);
        int run_total = 0;
#pragma unroll
        for (int j = 0; j < kRun; ++j)
            if (lane * kRun + j < E) run_total += expert_count[lane * kRun + j];
        int before = run_total;
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
            const int other = __shfl_up_sync(~0u, before, offset);
            if (lane >= offset) before += other;
        }
        int start = before - run_total;
#pragma unroll
        for (int j = 0; j < kRun; ++j) {
            const int e = lane * kRun + j;
            if (e < E) {
                expert_start[e] = start;
                p.m_indptr[e] = start;
                start += expert_count[e];
            }
        }
        if (lane == 31) p.m_indptr[E] = before;
    }
    __syncthreads();

    // Placement, 32 pairs a step in pair order: a lane's row is its expert's next free row plus
    // the lanes before it with the same expert; the lowest of them then advances the expert.
    if (warp == 0) {
        for (int r0 = 0; r0 < rows; r0 += 32) {
            const int r = r0 + lane;
            const int e = r < rows ? chosen_expert[r] : -1;
            const u32 same = lanes_matching(e);
            const int rank = __popc(same & ((1u << lane) - 1u));
            if (r < rows) {
                const int position = expert_start[e] + rank;
                p.slot_row[r] = position;
                p.token[position] = r / TOP_K;
                p.weight[position] = chosen_weight[r];
            }
            __syncwarp();  // every lane has read its expert's start
            if (r < rows && rank == 0) expert_start[e] += __popc(same);
            __syncwarp();
        }
    }
}

}  // namespace mxfp8_moe
