// What the fused MoE layer kernels (wgmma_moe_layer.cuh on sm_90a, mma_moe_layer.cuh on sm_12x)
// share: the roles a GEMM takes in them and the counters through which the gate_up phase hands
// token tiles to the down phase.
//
// The counters (an exit count, then one per token tile) are zero on entry; a gate_up unit adds one
// to its token tile's counter once its rows are stored (release), a down unit waits until the
// counter holds all of gate_up's N tiles (acquire), and the last CTA to finish zeroes them again,
// so each launch leaves them as it found them and back-to-back calls need no reset launch.
#pragma once
#include "common.cuh"
#include "ptx/cluster.cuh"
#include "ptx/global_flags.cuh"

namespace mxfp8_moe {

// What a grouped GEMM is within its launch: the whole kernel, or a phase of a fused layer.
enum GemmRole { kWholeKernel = 0, kLayerGateUp = 1, kLayerDown = 2 };

// Counts this CTA out once every thread of it is done with the counters; the last one zeroes every
// counter the launch used. Every thread of the CTA calls it, maybe from divergent paths (a warp
// whose lanes took different roles): hence non-.aligned barriers, the verdict passed by the
// barrier's own reduction (a flag in shared memory read past __syncthreads was seen by racecheck
// in a lane of a diverged warp before thread 0 had written it).
__device__ __forceinline__ void reset_counters_when_last(i32* counters, int token_tiles) {
    ptx::cta_sync_divergent();
    const bool last = threadIdx.x == 0 && ptx::fetch_add_acq_rel(counters, 1) == static_cast<int>(gridDim.x) - 1;
    if (!ptx::cta_or_divergent(last)) return;
    for (int t = threadIdx.x; t < token_tiles; t += blockDim.x) counters[1 + t] = 0;
    if (threadIdx.x == 0) counters[0] = 0;
}

}  // namespace mxfp8_moe
