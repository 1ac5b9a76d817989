"""The portable family (kernels/simt_grouped_gemm.cuh): one thread per output column on the CUDA
cores, any architecture, any alignment."""

from __future__ import annotations

import dataclasses

from ...arith import ceil_div
from ..spec import KernelSpec, entry_source

MAX_ROW_SLICES = 64  # blocks per (column block, expert) splitting its rows


@dataclasses.dataclass(frozen=True)
class SimtSpec(KernelSpec):
    block_threads: int = 128  # output columns per block

    family = "simt"

    @property
    def label(self) -> str:
        return f"{self.problem_label}_t{self.block_threads}"

    @property
    def threads(self) -> int:
        return self.block_threads

    def source(self) -> str:
        return entry_source("simt_grouped_gemm.cuh", f"mxfp8_moe::SimtGemm<{self.threads}, {self.k_granularity}, "
                                                     f"{str(self.gated).lower()}, {self.n}, {self.k}"
                                                     f"{self.variant.template_argument}>")

    def dynamic_shared_bytes(self, num_experts: int) -> int:
        return 0

    def grid(self, num_experts: int, cum_m: int, resident_blocks: int) -> tuple[int, int, int]:
        """x: blocks of columns, y: experts, z: slices of an expert's rows (about one per row)."""
        row_slices = max(1, min(MAX_ROW_SLICES, ceil_div(cum_m, num_experts)))
        return ceil_div(self.n_out, self.threads), num_experts, row_slices
