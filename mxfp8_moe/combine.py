"""The MoE block's combine: each token's top_k expert rows, weighted by their routing weights and
summed in float32, in slot order, rounded once to bf16.

    out[t] = sum over j < top_k of weight[r] * rows[r],  r = slot_row[t * top_k + j]

Deterministic on every path (no atomics, a fixed order of the sums): on a GPU one launch of
kernels/combine_rows.cuh; elsewhere, or for shapes it does not take, a gather and a sum in torch.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from .arith import ceil_div
from .gemm.device import current_stream, device_info
from .jit.struct_kernel import KernelMemo, entry_source

ENTRY = "mxfp8_moe_combine_rows"
THREADS = 256


class CombineParams(ctypes.Structure):
    """Mirror of mxfp8_moe::CombineParams."""

    _fields_ = [
        ("rows", ctypes.c_void_p),
        ("weight", ctypes.c_void_p),
        ("slot_row", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("num_tokens", ctypes.c_int32),
        ("num_rows", ctypes.c_int32),
    ]


@dataclasses.dataclass(frozen=True)
class CombineSpec:
    """One specialization of the combine kernel (arch, label, source: as gemm.spec.KernelSpec)."""

    arch: str
    hidden: int
    top_k: int
    entry = ENTRY
    params = CombineParams
    threads = THREADS

    @property
    def label(self) -> str:
        return f"combine_rows_h{self.hidden}_k{self.top_k}"

    def source(self) -> str:
        return entry_source("combine_rows.cuh", ENTRY, "CombineParams", f"combine_rows<{self.hidden}, {self.top_k}>",
                            THREADS)


def kernel_takes(rows: torch.Tensor, weight: torch.Tensor, slot_row: torch.Tensor) -> bool:
    """Contiguous bf16 rows with H % 8 == 0 on an sm_75+ GPU, float32 weights, int32 slot rows."""
    return (rows.is_cuda and rows.dtype == torch.bfloat16 and rows.is_contiguous() and rows.shape[1] % 8 == 0
            and rows.data_ptr() % 16 == 0 and weight.dtype == torch.float32 and weight.is_contiguous()
            and slot_row.dtype == torch.int32 and slot_row.is_contiguous()
            and device_info(rows.device.index).capability >= (7, 5))


_combiners = KernelMemo()


def combine_rows(rows: torch.Tensor, weight: torch.Tensor, slot_row: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(num_tokens, H) bf16 from (R, H) expert-ordered rows, their (R,) weights and the (num_tokens * top_k,)
    slot rows of mxfp8_moe.routing.route_topk."""
    if rows.dim() != 2 or weight.shape != rows.shape[:1] or slot_row.dim() != 1 or num_tokens < 0 \
            or (slot_row.numel() % num_tokens if num_tokens else slot_row.numel()):
        raise ValueError(f"combine needs rows (R, H), weight (R,) and slot_row (num_tokens * top_k,); got rows "
                         f"{tuple(rows.shape)}, weight {tuple(weight.shape)}, slot_row {tuple(slot_row.shape)}, "
                         f"num_tokens {num_tokens}")
    hidden = rows.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=rows.device)
    if num_tokens == 0:
        return out
    top_k = slot_row.numel() // num_tokens
    if not kernel_takes(rows, weight, slot_row):
        picked = slot_row.long()
        weighted = rows[picked].float() * weight[picked].unsqueeze(1)
        return weighted.view(num_tokens, top_k, hidden).sum(dim=1).to(torch.bfloat16)
    device_index = rows.device.index
    combiner = _combiners.kernel(CombineSpec(device_info(device_index).arch, hidden, top_k), device_index)
    combiner.launch((ceil_div(num_tokens * hidden // 8, THREADS), 1, 1), current_stream(device_index),
                    rows=rows.data_ptr(), weight=weight.data_ptr(), slot_row=slot_row.data_ptr(), out=out.data_ptr(),
                    num_tokens=num_tokens, num_rows=rows.shape[0])
    return out
