// The MoE layer's two grouped GEMMs in one persistent launch on the mma.sync kernel (sm_120a /
// sm_121a, natively or in software scaling; sm_90a in the emulated scale mode, which is how it is
// tested on Hopper): gate_up with its activation, the intermediate's MXFP8 quantization in gate_up's
// epilogue, and down.
//
// Units: the gate_up units, then the down units, as one sequence that CTA b walks from b in steps
// of gridDim.x (every gate_up unit before every down unit, in each CTA and overall). A gate_up unit
// quantizes its tile of the intermediate (its BLOCK_N columns hold whole scale blocks) into e4m3
// rows and scale bytes and publishes it on its token tile's counter (layer.cuh); a down unit waits
// for its token tile's counter, then runs as the plain kernel does, on those rows.
//
// Why no wait can deadlock: the host launches at most as many CTAs as fit on the GPU at once, so
// all of them run; a down unit waits only for gate_up units, which come earlier in every CTA's walk
// than any down unit and wait for nothing.
#pragma once
#include "mma_grouped_gemm.cuh"

namespace mxfp8_moe {

// Mirrored by mxfp8_moe/gemm/layer.py.
struct MmaLayerParams {
    GroupedGemmParams gate_up;  // out unused: gate_up writes link's rows and scales
    GroupedGemmParams down;     // a, a_scale: link's rows and scales
    LayerLink link;
};

template <typename GateUp, typename Down>
struct MmaMoeLayer {
    static_assert(GateUp::kThreads == Down::kThreads && GateUp::kBlockT == Down::kBlockT,
                  "the phases share the CTA and the token tiles");
    static constexpr int kThreads = GateUp::kThreads;
    static constexpr int kPipelineBytes =
        GateUp::kPipelineBytes > Down::kPipelineBytes ? GateUp::kPipelineBytes : Down::kPipelineBytes;
    using Scheduler = typename GateUp::Scheduler;

    __host__ __device__ static constexpr int shared_bytes(int num_experts) {
        return Scheduler::shared_bytes(num_experts) + kPipelineBytes;
    }

    __device__ __forceinline__ static void run(const MmaLayerParams& params) {
        extern __shared__ __align__(128) u8 shared[];
        ptx::require_dynamic_shared(shared_bytes(params.gate_up.num_experts));
        ptx::wait_for_prior_grids();
        ptx::allow_next_grid();

        const Scheduler gate_up_units(params.gate_up, reinterpret_cast<int*>(shared));
        const typename Down::Scheduler down_units(gate_up_units);
        u8* stages = shared + Scheduler::shared_bytes(params.gate_up.num_experts);
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
        const GateUp gate_up{params.gate_up, stages, lane, warp % GateUp::kWarpsN, warp / GateUp::kWarpsN, &params.link};
        const Down down{params.down, stages, lane, warp % Down::kWarpsN, warp / Down::kWarpsN, &params.link};
        const i64 gate_up_count = gate_up_units.num_units();
        for (i64 u = blockIdx.x; u < gate_up_count + down_units.num_units(); u += gridDim.x) {
            if (u < gate_up_count) {
                gate_up.run_unit(gate_up_units.unit(u), u / GateUp::kNTiles);
            } else {
                const i64 d = u - gate_up_count;
                down.run_unit(down_units.unit(d), d / Down::kNTiles);
            }
        }
        reset_counters_when_last(params.link.counters, gate_up_units.num_token_tiles());
    }
};

}  // namespace mxfp8_moe
