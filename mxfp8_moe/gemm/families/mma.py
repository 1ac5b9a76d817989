"""The mma.sync family (kernels/mma_grouped_gemm.cuh): FP8 tensor cores from sm_89 on, a cp.async
pipeline, and on sm_120a / sm_121a the block-scaled MMA (scale_mode "native", or "emulated" to run
its code path on other GPUs)."""

from __future__ import annotations

import dataclasses

from ...arith import round_up
from ..spec import SCALE_MODES, STAGE_K_BYTES, KernelSpec, entry_source, scheduler_shared_bytes

_SCALE_MODE_ENUM = {"software": "kSoftware", "native": "kNative", "emulated": "kEmulated"}
OUT_ROW_PADDING = 16  # bytes after each row of the epilogue's bf16 tile (MmaGemm::kOutPitch)


@dataclasses.dataclass(frozen=True)
class MmaSpec(KernelSpec):
    block_n: int  # output columns per tile (gated: as many up and as many gate rows)
    block_t: int  # tokens per tile
    stages: int
    warps_n: int = 4  # warps across the tile's columns
    warps_k: int = 1  # warps across each stage's k-steps (summed at the end of a tile)
    scale_mode: str = "software"

    family = "mma"
    waits_for_prior_grid = True

    def __post_init__(self):
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")

    @property
    def label(self) -> str:
        return (f"{self.problem_label}_bn{self.block_n}_bt{self.block_t}_s{self.stages}"
                f"_w{self.warps_n}x{self.warps_k}_{self.scale_mode}")

    @property
    def threads(self) -> int:
        return self.warps_n * self.warps_k * 32

    @property
    def weight_rows(self) -> int:
        return 2 * self.block_n if self.gated else self.block_n

    def source(self) -> str:
        return entry_source("mma_grouped_gemm.cuh", self.cpp_type())

    def cpp_type(self, role: str | None = None) -> str:
        """The kernel's MmaGemm type; `role`: its GemmRole as a phase of the fused layer
        (kernels/mma_moe_layer.cuh), e.g. "kLayerGateUp"."""
        head = (f"mxfp8_moe::MmaGemm<{self.n}, {self.k}, {self.k_granularity}, {str(self.gated).lower()}, "
                f"{self.block_n}, {self.block_t}, {self.stages}, {self.warps_n}, {self.warps_k}, "
                f"mxfp8_moe::{_SCALE_MODE_ENUM[self.scale_mode]}")
        if role is None:
            return f"{head}{self.variant.template_argument}>"
        return f"{head}, {self.variant.cpp_type}, mxfp8_moe::{role}>"

    def stage_bytes(self) -> int:
        """One pipeline stage: weight and token tiles (MXFP4 weight rows: half the bytes), then a
        scale word per row (MmaGemm::kStageBytes)."""
        weight_row_bytes = STAGE_K_BYTES // 2 if self.variant.weights == "e2m1" else STAGE_K_BYTES
        rows = self.weight_rows + self.block_t
        return self.weight_rows * weight_row_bytes + self.block_t * STAGE_K_BYTES + round_up(rows * 4, 128)

    def pipeline_bytes(self) -> int:
        return self.stages * self.stage_bytes()

    def epilogue_bytes(self) -> int:
        """Shared memory the epilogue reuses from the pipeline: the bf16 tile, then the K warps'
        partial sums (MmaGemm::kPartialsOffset + kPartialsBytes)."""
        tile = round_up(self.block_t * (self.block_n * 2 + OUT_ROW_PADDING), 16)
        accumulators = (2 if self.gated else 1) * (self.block_n // self.warps_n // 16) * (self.block_t // 8) * 4
        return tile + (self.warps_k - 1) * self.warps_n * accumulators * 32 * 4

    def dynamic_shared_bytes(self, num_experts: int) -> int:
        return scheduler_shared_bytes(num_experts) + self.pipeline_bytes()

    def grid(self, num_experts: int, cum_m: int, resident_blocks: int) -> tuple[int, int, int]:
        return resident_blocks, 1, 1  # persistent
