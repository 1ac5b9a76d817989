// Softmax top-k routing and the permutation into expert order, in one launch of one CTA.
//
// For decode-sized batches the routing is a handful of small torch ops (softmax, top-k, the
// renormalization, a sort, a search, the division for token ids), each a launch that costs more
// than its work. Here one CTA does it all:
//   1. a warp per token: softmax statistics over the E logits (held in registers), then TOP_K
//      rounds of a warp arg-max, the experts and weights into shared memory, and a shared-memory
//      count per expert (integer atomics: the counts do not depend on their order);
//   2. an exclusive scan of the counts -> m_indptr;
//   3. a thread per expert walks the chosen (token, slot) pairs in order and writes its rows, so
//      each expert's rows come in token order, as a stable sort would give (and as the torch path
//      of mxfp8_moe/routing.py gives): the result is deterministic. It also records where each
//      pair went (slot_row), which the combine reads to gather a token's rows without atomics.
// Ties between equal logits go to the lower expert index; NaN counts as the largest value, as in
// torch.topk, so the chosen experts are always in [0, E).
// One CTA's time grows with the rows (H100: 5 us for 8 rows, 31 us for 512, 117 us for 2048), so
// the host runs it up to 512 rows, where it beats the torch ops (mxfp8_moe/routing.py: MAX_ROWS).
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

// Whether (v, i) ranks before (best, best_index): larger value first, NaN above everything, the
// lower index first among equals.
__device__ __forceinline__ bool ranks_before(float v, int i, float best, int best_index) {
    const bool v_nan = v != v, best_nan = best != best;
    if (v_nan != best_nan) return v_nan;
    return v > best || ((v == best || v_nan) && i < best_index);
}

template <int E, int TOP_K, bool BF16_LOGITS, bool RENORMALIZE, int MAX_ROWS, int THREADS>
__device__ __forceinline__ void route_topk(const RouteParams& p) {
    constexpr int kPerLane = ceil_div(E, 32);
    constexpr int kWarps = THREADS / 32;
    static_assert(kPerLane <= 32, "one bit per logit of a lane marks it taken");
    static_assert(TOP_K <= E && TOP_K <= 32, "top-k of E experts, one lane writes each");
    static_assert(MAX_ROWS % 4 == 0, "rows are scanned four at a time");
    __shared__ alignas(16) i32 chosen_expert[MAX_ROWS];
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
    // Rows past the end (up to the next multiple of 4) belong to no expert.
    for (int r = rows + threadIdx.x; r < ceil_div(rows, 4) * 4; r += THREADS) chosen_expert[r] = -1;
    __syncthreads();

    for (int t = warp; t < p.num_tokens; t += kWarps) {
        float logit[kPerLane];
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
            const int e = j * 32 + lane;
            if (e >= E) {
                logit[j] = -__int_as_float(0x7F800000);  // -inf: never ahead of a real logit
            } else if (BF16_LOGITS) {
                const u16 bits = static_cast<const u16*>(p.logits)[static_cast<i64>(t) * E + e];
                logit[j] = __int_as_float(static_cast<int>(static_cast<u32>(bits) << 16));
            } else {
                logit[j] = static_cast<const float*>(p.logits)[static_cast<i64>(t) * E + e];
            }
        }
        // Softmax statistics: the row's max and sum of exp(logit - max).
        float row_max = logit[0];
#pragma unroll
        for (int j = 1; j < kPerLane; ++j) row_max = fmaxf(row_max, logit[j]);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) row_max = fmaxf(row_max, __shfl_xor_sync(~0u, row_max, offset));
        float row_sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j)
            if (j * 32 + lane < E) row_sum += expf(logit[j] - row_max);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) row_sum += __shfl_xor_sync(~0u, row_sum, offset);

        u32 taken = 0;
        float my_probability = 0.0f, chosen_sum = 0.0f;
        int my_expert = 0;
        for (int k = 0; k < TOP_K; ++k) {
            float best = -__int_as_float(0x7F800000);
            int best_index = 0x7FFFFFFF;
#pragma unroll
            for (int j = 0; j < kPerLane; ++j) {
                const int e = j * 32 + lane;
                if (e < E && !(taken >> j & 1u) && ranks_before(logit[j], e, best, best_index)) {
                    best = logit[j];
                    best_index = e;
                }
            }
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) {
                const float other = __shfl_xor_sync(~0u, best, offset);
                const int other_index = __shfl_xor_sync(~0u, best_index, offset);
                if (ranks_before(other, other_index, best, best_index)) {
                    best = other;
                    best_index = other_index;
                }
            }
            if (best_index % 32 == lane) taken |= 1u << (best_index / 32);
            const float probability = expf(best - row_max) / row_sum;
            chosen_sum += probability;
            if (lane == k) {
                my_probability = probability;
                my_expert = best_index;
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

    for (int e = threadIdx.x; e < E; e += THREADS) {
        int position = expert_start[e];
        for (int r = 0; r < rows; r += 4) {
            const u32x4 four = *reinterpret_cast<const u32x4*>(chosen_expert + r);
            const int ids[4] = {static_cast<int>(four.x), static_cast<int>(four.y), static_cast<int>(four.z),
                                static_cast<int>(four.w)};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (ids[i] == e) {
                    p.slot_row[r + i] = position;
                    p.token[position] = (r + i) / TOP_K;
                    p.weight[position] = chosen_weight[r + i];
                    ++position;
                }
            }
        }
    }
}

}  // namespace mxfp8_moe
