// The MoE layer's two grouped GEMMs in one persistent launch on Hopper (sm_90a), for decode
// sizes: gate_up with its activation, then down, both on the wgmma kernel's pipeline
// (wgmma_grouped_gemm.cuh), the intermediate rows handed from one phase to the other through L2
// instead of through a launch boundary and a quantizer launch.
//
// Units: the gate_up units (token tile x N tile of w13) and then the down units (token tile x N
// tile of w2) form one sequence, which CTA b walks from b in steps of gridDim.x, so every gate_up
// unit comes before every down unit, within each CTA and overall. A gate_up unit stores its rows
// of the intermediate h (activation applied, bf16) and counts itself on its token tile's counter
// (release). A down unit's producer requests its weights at once, and each stage's bf16 rows of h
// once (acquire) the token tile's counter holds all of gate_up's N tiles; its preparer warps
// quantize the rows into the stage's token tile with the activation quantizer's rounding.
// The down weights thus stream while the gate_up phase runs: at decode sizes, where each GEMM
// alone is a launch-sized amount of work, that overlap is the point.
//
// Why no wait can deadlock: the host launches at most as many CTAs as fit on the GPU at once (one
// per SM, from the occupancy), so all of them run; a CTA reaches its down units only after its
// gate_up units, and gate_up units wait for nothing, so every wait is for units that complete.
// Within a CTA, the producer blocks on a counter only for rows the consumers need before they can
// free the slot it waits for: the stage that last used the slot and the one after it (a chain of
// wgmma groups releases a stage only after issuing the next one's), all of whose weights are
// already requested (WgmmaGemm::produce).
// (Residency is what this relies on: a kernel on another stream that held SMs until this one
// finished would break it; one that finishes on its own only delays it.)
//
// The counters: layer.cuh.
#pragma once
#include "wgmma_grouped_gemm.cuh"

namespace mxfp8_moe {

// Mirrored by mxfp8_moe/gemm/layer.py.
struct MoeLayerParams {
    GroupedGemmParams gate_up;  // a, a_scale: the quantized tokens; out: h (cum_m, I) bf16
    GroupedGemmParams down;     // a, a_scale unused (h comes by maps.down.tokens); out: (cum_m, H)
    i32* counters;              // [0]: CTAs finished; [1 + tile]: gate_up units published on a token tile
};

struct MoeLayerTensorMaps {
    WgmmaTensorMaps gate_up;
    WgmmaTensorMaps down;  // tokens: h as bf16 rows (see GemmRole); token_scales unused
};

template <typename GateUp, typename Down>
struct WgmmaMoeLayer {
    static_assert(GateUp::kThreads == Down::kThreads && GateUp::kBlockT == Down::kBlockT &&
                  GateUp::kStages == Down::kStages && GateUp::kStageBytes == Down::kStageBytes &&
                  GateUp::kPreparers == Down::kPreparers, "the phases share one pipeline");
    static constexpr int kThreads = GateUp::kThreads;
    static constexpr int kTileBytes = GateUp::kTileBytes > Down::kTileBytes ? GateUp::kTileBytes : Down::kTileBytes;
    using Scheduler = typename GateUp::Scheduler;

    __host__ __device__ static constexpr int shared_bytes(int num_experts) {
        return Scheduler::shared_bytes(num_experts) + GateUp::kBarrierBytes + 1024 + kTileBytes;
    }

    __device__ __forceinline__ static void run(const MoeLayerParams& params, const MoeLayerTensorMaps& maps) {
        extern __shared__ __align__(128) u8 shared[];
        ptx::require_dynamic_shared(shared_bytes(params.gate_up.num_experts));
        ptx::wait_for_prior_grids();
        ptx::allow_next_grid();

        const Scheduler gate_up_units(params.gate_up, reinterpret_cast<int*>(shared));
        const typename Down::Scheduler down_units(gate_up_units);
        const u32 barriers = ptx::shared_address(shared + Scheduler::shared_bytes(params.gate_up.num_experts));
        const u32 tiles_address = (barriers + GateUp::kBarrierBytes + 1023) & ~1023u;
        u8* tiles = shared + (tiles_address - ptx::shared_address(shared));
        if (threadIdx.x == 0) GateUp::init_barriers(barriers);
        __syncthreads();

        const GateUp gate_up{params.gate_up, maps.gate_up, gate_up_units, tiles, barriers, params.counters, 0};
        const Down down{params.down, maps.down, down_units, tiles, barriers, params.counters, GateUp::kNTiles};
        // This CTA's first unit of each phase in the one sequence blockIdx.x + i * gridDim.x.
        const i64 gate_up_count = gate_up_units.num_units(), cta = blockIdx.x, ctas = gridDim.x;
        const i64 first_down = cta >= gate_up_count ? cta - gate_up_count
                                                    : cta + ceil_div(gate_up_count - cta, ctas) * ctas - gate_up_count;
        const int warpgroup = threadIdx.x / 128, thread = threadIdx.x % 128;
        if (warpgroup == GateUp::kConsumers) {
            asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(GateUp::kProducerRegisters));
            if (thread == 0) {
                down.produce(gate_up.produce(0, cta), first_down);
            } else if (GateUp::is_preparer(thread)) {
                const int preparer = GateUp::preparer_index(thread);
                down.prepare_stages(preparer, gate_up.prepare_stages(preparer, 0, cta), first_down);
            }
        } else {
            asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(GateUp::kConsumerRegisters));
            down.consume(warpgroup, thread, gate_up.consume(warpgroup, thread, 0, cta), first_down);
            if (warpgroup == 0 && thread == 0) ptx::bulk_wait();  // shared memory outlives the last store
        }
        reset_counters_when_last(params.counters, gate_up_units.num_token_tiles());  // (layer.cuh)
    }
};

}  // namespace mxfp8_moe
