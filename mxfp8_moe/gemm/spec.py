"""A kernel specialization: every compile-time choice of one grouped-GEMM binary.

A KernelSpec names the kernel template and its parameters; it generates the instantiation source
(one line of template arguments, so the compiler sees every shape and tile as a constant) and knows
how much dynamic shared memory a launch needs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

SCALE_MODES = ("software", "native", "emulated")
_SCALE_MODE_ENUM = {"software": "kSoftware", "native": "kNative", "emulated": "kEmulated"}
BLOCK_K = 128  # K bytes per pipeline stage of the MMA kernel (kBlockK in the template)
ENTRY = "mxfp8_moe_grouped_gemm"
WGMMA_THREADS = 384  # two consumer warpgroups and a producer (WgmmaGemm::kThreads)
WGMMA_WEIGHT_ROWS = 128  # weight rows per tile: 64 per consumer warpgroup


def kernel_dir() -> Path:
    """The CUDA sources: mxfp8_moe/kernels in a wheel, ../kernels in a source checkout."""
    installed = Path(__file__).resolve().parent.parent / "kernels"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "kernels"


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    kind: str  # "wgmma" (Hopper, sm_90a), "mma" (tensor cores, sm_89+) or "simt" (CUDA cores, any arch)
    arch: str  # NVRTC target, e.g. "sm_120a"
    n: int  # rows of B per expert (2 * output width when gated)
    k: int
    k_granularity: int
    gated: bool
    block_n: int = 128  # output columns per tile (simt: threads per block; wgmma: 64 gated, else 128)
    block_t: int = 0  # tokens per tile
    stages: int = 0
    warps_n: int = 4  # warps across the tile's columns
    warps_k: int = 1  # warps across each stage's k-steps (summed at the end of a tile)
    scale_mode: str = "software"

    def __post_init__(self):
        # The wgmma kernel's tile width follows from `gated` (WgmmaGemm::kBlockN); block_n records it.
        if self.kind == "wgmma" and self.block_n != (64 if self.gated else WGMMA_WEIGHT_ROWS):
            raise ValueError(f"a wgmma spec has block_n {64 if self.gated else WGMMA_WEIGHT_ROWS} "
                             f"(gated={self.gated}), got {self.block_n}")

    @property
    def threads(self) -> int:
        if self.kind == "wgmma":
            return WGMMA_THREADS
        return self.warps_n * self.warps_k * 32 if self.kind == "mma" else self.block_n

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.gated else self.n

    @property
    def label(self) -> str:
        common = f"{self.kind}_n{self.n}_k{self.k}_g{self.k_granularity}{'_gated' if self.gated else ''}"
        if self.kind == "simt":
            return f"{common}_t{self.threads}"
        if self.kind == "wgmma":
            return f"{common}_bn{self.block_n}_bt{self.block_t}_s{self.stages}"
        return f"{common}_bn{self.block_n}_bt{self.block_t}_s{self.stages}_w{self.warps_n}x{self.warps_k}_{self.scale_mode}"

    def source(self) -> str:
        gated = "true" if self.gated else "false"
        if self.kind == "simt":
            return (f'#include "simt_grouped_gemm.cuh"\n'
                    f'extern "C" __global__ void __launch_bounds__({self.threads}) '
                    f"{ENTRY}(const __grid_constant__ mxfp8_moe::GroupedGemmParams params) {{\n"
                    f"    mxfp8_moe::simt_grouped_gemm<{self.threads}, {self.k_granularity}, {gated}, "
                    f"{self.n}, {self.k}>(params);\n}}\n")
        if self.kind == "wgmma":
            # (threads, 1): setmaxnreg needs a register cap at entry.
            return (f'#include "wgmma_grouped_gemm.cuh"\n'
                    f"using Gemm = mxfp8_moe::WgmmaGemm<{self.n}, {self.k}, {self.k_granularity}, {gated}, "
                    f"{self.block_t}, {self.stages}>;\n"
                    f'extern "C" __global__ void __launch_bounds__(Gemm::kThreads, 1) '
                    f"{ENTRY}(const __grid_constant__ mxfp8_moe::GroupedGemmParams params, "
                    f"const __grid_constant__ mxfp8_moe::WgmmaTensorMaps maps) {{\n"
                    f"    Gemm::run(params, maps);\n}}\n")
        return (f'#include "mma_grouped_gemm.cuh"\n'
                f"using Gemm = mxfp8_moe::MmaGemm<{self.n}, {self.k}, {self.k_granularity}, {gated}, "
                f"{self.block_n}, {self.block_t}, {self.stages}, {self.warps_n}, {self.warps_k}, "
                f"mxfp8_moe::{_SCALE_MODE_ENUM[self.scale_mode]}>;\n"
                f'extern "C" __global__ void __launch_bounds__(Gemm::kThreads) '
                f"{ENTRY}(const __grid_constant__ mxfp8_moe::GroupedGemmParams params) {{\n"
                f"    Gemm::run(params);\n}}\n")

    def pipeline_bytes(self) -> int:
        """Shared memory of the pipeline stages (MmaGemm::kPipelineBytes, WgmmaGemm's stages)."""
        if self.kind == "wgmma":  # + scale words and their floats, one set per k32 slice for k_gran 32
            slices = BLOCK_K // 32 if self.k_granularity == 32 else 1
            scale_bytes = -(-(WGMMA_WEIGHT_ROWS + self.block_t) * 4 * (1 + slices) // 1024) * 1024
            return self.stages * ((WGMMA_WEIGHT_ROWS + self.block_t) * BLOCK_K + scale_bytes)
        weight_rows = 2 * self.block_n if self.gated else self.block_n
        scale_bytes = -(-(weight_rows + self.block_t) * 4 // 128) * 128
        return self.stages * ((weight_rows + self.block_t) * BLOCK_K + scale_bytes)

    def epilogue_bytes(self) -> int:
        """MMA kernel: shared memory the epilogue reuses from the pipeline, the bf16 tile then the
        K warps' partial sums (MmaGemm::kPartialsOffset + kPartialsBytes). wgmma kernel: its own
        bf16 tile, then the gate warpgroup's values (WgmmaGemm::kTileBytes - kStagingOffset)."""
        if self.kind == "wgmma":
            return self.block_t * self.block_n * 2 + (self.block_t // 2 * 128 * 4 if self.gated else 0)
        tile = -(-self.block_t * (self.block_n * 2 + 16) // 16) * 16
        accumulators = (2 if self.gated else 1) * (self.block_n // self.warps_n // 16) * (self.block_t // 8) * 4
        return tile + (self.warps_k - 1) * self.warps_n * accumulators * 32 * 4

    def dynamic_shared_bytes(self, num_experts: int) -> int:
        """Dynamic shared memory for a launch over `num_experts` experts (0 for simt)."""
        if self.kind == "simt":
            return 0
        scheduler = -(-(2 * 4 * (num_experts + 1)) // 128) * 128  # TileScheduler::shared_bytes
        if self.kind == "wgmma":  # WgmmaGemm::shared_bytes: + barriers + alignment padding
            return scheduler + 256 + 1024 + self.pipeline_bytes() + self.epilogue_bytes()
        return scheduler + self.pipeline_bytes()
