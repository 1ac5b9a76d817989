"""The fused activation quantizer (kernels/quantize_activations.cuh): bf16 tokens -> e4m3 `a` and
the padded MN-major `a_scale`, in one pass on the GPU with no host sync.

It produces the same bits as the torch quantizer (mxfp8_moe.quantize) for finite inputs, and is
what `quantize_activations` runs for bf16 CUDA tensors on sm_89 and later.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from .arith import ceil_div
from .gemm.device import current_stream, device_info
from .jit.struct_kernel import KernelMemo, entry_source
from .layout import k_align, m_padded, tag_k_granularity

ENTRY = "mxfp8_moe_quantize_activations"
WARPS = 8


class QuantizeParams(ctypes.Structure):
    """Mirror of mxfp8_moe::QuantizeParams."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("m_indptr", ctypes.c_void_p),
        ("a", ctypes.c_void_p),
        ("a_scale", ctypes.c_void_p),
        ("cum_m", ctypes.c_int32),
        ("num_experts", ctypes.c_int32),
        ("m_padded", ctypes.c_int32),
        ("source", ctypes.c_void_p),
        ("x_rows", ctypes.c_int32),
    ]


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """One specialization of the quantizer kernel (the same interface as gemm.spec.KernelSpec, so
    `prewarm` builds both alike)."""

    arch: str
    k: int
    k_granularity: int
    entry = ENTRY
    params = QuantizeParams
    threads = WARPS * 32

    @property
    def label(self) -> str:
        return f"quantize_activations_k{self.k}_g{self.k_granularity}"

    def source(self) -> str:
        return entry_source("quantize_activations.cuh", ENTRY, "QuantizeParams",
                            f"quantize_activations<{self.k}, {self.k_granularity}, {WARPS}>", WARPS * 32)


def supported(x: torch.Tensor) -> bool:
    """Whether the fused kernel takes this input: bf16, contiguous, on an sm_89+ GPU."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[1] % 16 == 0
            and x.data_ptr() % 16 == 0 and device_info(x.device.index).capability >= (8, 9))


_quantizers = KernelMemo()


def quantize_activations_cuda(x: torch.Tensor, m_indptr: torch.Tensor, k_granularity: int,
                              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused quantization of bf16 CUDA tokens, x itself or the rows x[rows] (int64, contiguous)
    gathered on the way; see mxfp8_moe.quantize_activations."""
    k = x.shape[1]
    cum_m = x.shape[0] if rows is None else rows.shape[0]
    num_experts = m_indptr.shape[0] - 1
    device_index = x.device.index  # always set for a CUDA tensor
    quantizer = _quantizers.kernel(QuantizerSpec(device_info(device_index).arch, k, k_granularity), device_index)
    a = torch.empty(cum_m, k, dtype=torch.float8_e4m3fn, device=x.device)
    # Every word is written by the kernel: its zero padding too.
    storage = torch.empty(k_align(k, k_granularity), m_padded(cum_m, num_experts), dtype=torch.int32, device=x.device)
    if storage.numel():
        # A warp quantizes a 1024-element segment of a row, or zeroes an a_scale row no token owns;
        # the grid is at most what fits at once.
        warps = cum_m * ceil_div(k, 1024) + storage.shape[1]
        blocks = min(ceil_div(warps, WARPS), quantizer.kernel.resident_blocks(0))
        quantizer.launch((blocks, 1, 1), current_stream(device_index), x=x.data_ptr(), m_indptr=m_indptr.data_ptr(),
                         a=a.data_ptr(), a_scale=storage.data_ptr(), cum_m=cum_m, num_experts=num_experts,
                         m_padded=storage.shape[1], source=0 if rows is None else rows.data_ptr(), x_rows=x.shape[0])
    return a, tag_k_granularity(storage.t(), k_granularity)
