"""The Hopper family (kernels/wgmma_grouped_gemm.cuh, sm_90a): FP8 wgmma fed by TMA (MXFP4 weights
widened to e4m3 in the consumers' registers), with its five tensor maps passed by value beside the
parameters."""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from ...arith import round_up
from ..spec import STAGE_K_BYTES, KernelSpec, entry_source, scheduler_shared_bytes
from ..tensor_maps import MAP_BYTES, operand_map, output_map, packed_operand_map, scale_map

WARPGROUP = 128  # threads
CONSUMERS = 2  # warpgroups multiplying; one more produces
WEIGHT_ROWS = 64 * CONSUMERS  # weight rows per tile, 64 per consumer warpgroup
BARRIER_BYTES = 256  # WgmmaGemm::kBarrierBytes
SWIZZLE_ALIGNMENT = 1024  # the tiles start 1024-byte aligned: up to this much padding


class WgmmaTensorMaps(ctypes.Structure):
    """Mirror of mxfp8_moe::WgmmaTensorMaps (kernels/wgmma_grouped_gemm.cuh), passed by value."""

    _fields_ = [(name, ctypes.c_uint8 * MAP_BYTES)
                for name in ("tokens", "weights", "token_scales", "weight_scales", "output")]

    def set(self, **maps: bytes) -> None:
        base = ctypes.addressof(self)
        for name, encoded in maps.items():
            ctypes.memmove(base + getattr(WgmmaTensorMaps, name).offset, encoded, MAP_BYTES)


def wgmma_maps(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor, *,
               block_t: int, packed_weights: bool = False) -> dict[str, bytes]:
    """The five maps of one call (scales as tensor_maps.scales_fit_tma accepts them);
    `packed_weights`: b holds MXFP4 codes, two a byte."""
    return {
        "tokens": operand_map(a.data_ptr(), a.shape[0], a.shape[1], block_t),
        "weights": weights_map(b, packed_weights),
        # a_scale (m_padded, k_align) with rows adjacent: innermost first, as it is.
        "token_scales": scale_map(a_scale.data_ptr(), tuple(a_scale.shape), a_scale.stride(), block_t),
        "weight_scales": weight_scales_map(b_scale),
        "output": output_map(out.data_ptr(), out.shape[0], out.shape[1], block_t),
    }


def weight_and_output_maps(b: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor, *, block_t: int,
                           packed_weights: bool = False) -> dict[str, bytes]:
    """The maps that do not read the tokens (all the fused layer's down phase needs of wgmma_maps)."""
    return {"weights": weights_map(b, packed_weights), "weight_scales": weight_scales_map(b_scale),
            "output": output_map(out.data_ptr(), out.shape[0], out.shape[1], block_t)}


def weights_map(b: torch.Tensor, packed: bool) -> bytes:
    """b (E, N, K) bytes, or (E, N, K / 2) MXFP4 codes, as (E * N) rows: a box is one consumer's rows."""
    num_experts, n, k_bytes = b.shape
    if packed:
        return packed_operand_map(b.data_ptr(), num_experts * n, 2 * k_bytes, WEIGHT_ROWS // CONSUMERS)
    return operand_map(b.data_ptr(), num_experts * n, k_bytes, WEIGHT_ROWS // CONSUMERS)


def weight_scales_map(b_scale: torch.Tensor) -> bytes:
    """b_scale (E, N, k_align) with rows adjacent: (rows, words, experts) innermost-first."""
    return scale_map(b_scale.data_ptr(), (b_scale.shape[1], b_scale.shape[2], b_scale.shape[0]),
                     (b_scale.stride(1), b_scale.stride(2), b_scale.stride(0)), WEIGHT_ROWS // CONSUMERS)


@dataclasses.dataclass(frozen=True)
class WgmmaSpec(KernelSpec):
    block_t: int  # tokens per tile: 8, 16, 32, 64, 96 or 128
    stages: int
    splits: int = 1  # K splits: the CTAs of a cluster share each unit (WgmmaGemm's SPLITS)
    ctas_per_sm: int = 1  # 2: two CTAs share an SM, each with half its registers and shared memory

    family = "wgmma"
    waits_for_prior_grid = True

    def __post_init__(self):
        # WgmmaGemm's static_assert, said before a compile: at two CTAs an SM the consumers have
        # 104 registers, enough for whole units of decode tiles only.
        if self.ctas_per_sm not in (1, 2) or (self.ctas_per_sm == 2 and (self.splits > 1 or self.block_t > 16)):
            raise ValueError(f"ctas_per_sm: expected 1, or 2 with token tiles of at most 16 and no K split; got "
                             f"{self.ctas_per_sm} with block_t {self.block_t}, splits {self.splits}")

    @property
    def block_n(self) -> int:
        """Output columns per tile (WgmmaGemm::kBlockN): gated tiles pair 64 up with 64 gate rows."""
        return 64 if self.gated else WEIGHT_ROWS

    @property
    def label(self) -> str:
        split = f"_split{self.splits}" if self.splits > 1 else ""
        residency = f"_x{self.ctas_per_sm}" if self.ctas_per_sm > 1 else ""
        return f"{self.problem_label}_bn{self.block_n}_bt{self.block_t}_s{self.stages}{split}{residency}"

    @property
    def threads(self) -> int:
        return (CONSUMERS + 1) * WARPGROUP

    @property
    def cluster(self) -> int:
        return self.splits

    def source(self) -> str:
        # The blocks an SM holds in the launch bounds: setmaxnreg needs a register cap at entry.
        return entry_source("wgmma_grouped_gemm.cuh", self.cpp_type(), tensor_maps="mxfp8_moe::WgmmaTensorMaps",
                            min_blocks=self.ctas_per_sm, cluster=self.cluster)

    def cpp_type(self, role: str | None = None) -> str:
        """The kernel's WgmmaGemm type; `role`: its GemmRole as a phase of the fused layer
        (kernels/wgmma_moe_layer.cuh), e.g. "kLayerGateUp"."""
        head = (f"mxfp8_moe::WgmmaGemm<{self.n}, {self.k}, {self.k_granularity}, {str(self.gated).lower()}, "
                f"{self.block_t}, {self.stages}, {self.splits}")
        if role is None and self.ctas_per_sm == 1:
            return f"{head}{self.variant.template_argument}>"
        residency = f", {self.ctas_per_sm}" if self.ctas_per_sm > 1 else ""
        return f"{head}, {self.variant.cpp_type}, mxfp8_moe::{role or 'kWholeKernel'}{residency}>"

    def stage_bytes(self) -> int:
        """Weight tile (MXFP4: packed, half the bytes) and token tile, then the scale words and their
        floats (one set per k32 slice at k_gran 32) in 1024-byte units (WgmmaGemm::kStageBytes)."""
        slices = STAGE_K_BYTES // 32 if self.k_granularity == 32 else 1
        rows = WEIGHT_ROWS + self.block_t
        weight_row_bytes = STAGE_K_BYTES // 2 if self.variant.weights == "e2m1" else STAGE_K_BYTES
        return (WEIGHT_ROWS * weight_row_bytes + self.block_t * STAGE_K_BYTES
                + round_up(rows * 4 * (1 + slices), 1024))

    def pipeline_bytes(self) -> int:
        return self.stages * self.stage_bytes()

    def epilogue_bytes(self) -> int:
        """The bf16 staging tile, then for gated tiles the gate warpgroup's accumulators, one float
        per accumulator and consumer thread, then with split K rank 0's slots for the other ranks'
        accumulators (WgmmaGemm::kTileBytes - kStagingOffset)."""
        accumulators = self.block_t // 2  # per thread: 64 rows x block_t tokens / 128 threads
        slots = (self.splits - 1) * CONSUMERS * WARPGROUP * accumulators * 4
        return self.block_t * self.block_n * 2 + (accumulators * WARPGROUP * 4 if self.gated else 0) + slots

    def dynamic_shared_bytes(self, num_experts: int) -> int:
        """WgmmaGemm::shared_bytes: scheduler, barriers, alignment padding, stages, epilogue."""
        return (scheduler_shared_bytes(num_experts) + BARRIER_BYTES + SWIZZLE_ALIGNMENT + self.pipeline_bytes()
                + self.epilogue_bytes())

    def grid(self, num_experts: int, cum_m: int, resident_blocks: int) -> tuple[int, int, int]:
        return resident_blocks, 1, 1  # persistent

    def arguments(self, a, b, a_scale, b_scale, m_indptr, out, epilogue) -> tuple[ctypes.Structure, ...]:
        maps = WgmmaTensorMaps()
        maps.set(**wgmma_maps(a, b, a_scale, b_scale, out, block_t=self.block_t,
                              packed_weights=self.variant.weights == "e2m1"))
        return super().arguments(a, b, a_scale, b_scale, m_indptr, out, epilogue) + (maps,)
