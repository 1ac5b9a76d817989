// Programmatic dependent launch (griddepcontrol, sm_90+): a grid launched with the programmatic
// stream serialization attribute may start while the grid before it on the stream is finishing.
// Its threads wait for that grid (completed, its memory visible) before touching global memory,
// and let the next such grid launch early in turn. Without the attribute both are no-ops; on
// targets before sm_90 they compile to nothing.
#pragma once
#include "../common.cuh"

namespace mxfp8_moe::ptx {

// Blocks until every prerequisite grid has completed and its memory operations are visible.
__device__ __forceinline__ void wait_for_prior_grids() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next grid on the stream (if launched programmatically) begin launching now.
__device__ __forceinline__ void allow_next_grid() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace mxfp8_moe::ptx
