"""The fused activation quantizer (kernels/quantize_activations.cuh): bf16 tokens -> e4m3 `a` and
the padded MN-major `a_scale`, in one pass on the GPU with no host sync.

It produces the same bits as the torch quantizer (mxfp8_moe.quantize) for finite inputs, and is
what `quantize_activations` runs for bf16 CUDA tensors on sm_89 and later.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading

import torch

from .arith import ceil_div
from .gemm.device import current_stream, device_info
from .jit.build import build
from .jit.runtime import LoadedKernel, arch_name
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

    @property
    def label(self) -> str:
        return f"quantize_activations_k{self.k}_g{self.k_granularity}"

    def source(self) -> str:
        return (f'#include "quantize_activations.cuh"\n'
                f'extern "C" __global__ void __launch_bounds__({WARPS * 32}) '
                f"{ENTRY}(const __grid_constant__ mxfp8_moe::QuantizeParams params) {{\n"
                f"    mxfp8_moe::quantize_activations<{self.k}, {self.k_granularity}, {WARPS}>(params);\n}}\n")


def supported(x: torch.Tensor) -> bool:
    """Whether the fused kernel takes this input: bf16, contiguous, on an sm_89+ GPU."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[1] % 16 == 0
            and x.data_ptr() % 16 == 0 and device_info(x.device.index).capability >= (8, 9))


class _Quantizer:
    """One compiled specialization (K, granularity) on one device, with its argument block."""

    def __init__(self, k: int, k_granularity: int, device_index: int):
        spec = QuantizerSpec(arch_name(device_info(device_index).capability), k, k_granularity)
        cubin, _ = build(spec.source(), arch=spec.arch, label=spec.label)
        # Programmatic launch (sm_90+): the kernel waits for the previous grid itself.
        self.kernel = LoadedKernel(cubin, ENTRY, device_index, WARPS * 32,
                                   programmatic=device_info(device_index).capability >= (9, 0))
        self.params = QuantizeParams()
        self.pointers = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))
        self.lock = threading.Lock()
        self.segments = ceil_div(k, 1024)  # warps per row (kSegments)

    def __call__(self, x, m_indptr, a, a_scale_storage, source, stream: int) -> None:
        cum_m = a.shape[0]
        blocks = min(ceil_div(cum_m * self.segments, WARPS), self.kernel.resident_blocks(0))
        with self.lock:
            p = self.params
            p.x, p.m_indptr, p.a, p.a_scale = x.data_ptr(), m_indptr.data_ptr(), a.data_ptr(), a_scale_storage.data_ptr()
            p.cum_m, p.num_experts, p.m_padded = cum_m, m_indptr.shape[0] - 1, a_scale_storage.shape[1]
            p.source, p.x_rows = (0 if source is None else source.data_ptr()), x.shape[0]
            self.kernel.launch((blocks, 1, 1), 0, stream, ctypes.addressof(self.pointers))


_quantizers: dict[tuple[int, int, int], _Quantizer] = {}
_lock = threading.Lock()


def quantize_activations_cuda(x: torch.Tensor, m_indptr: torch.Tensor, k_granularity: int,
                              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused quantization of bf16 CUDA tokens, x itself or the rows x[rows] (int64, contiguous)
    gathered on the way; see mxfp8_moe.quantize_activations."""
    k = x.shape[1]
    cum_m = x.shape[0] if rows is None else rows.shape[0]
    num_experts = m_indptr.shape[0] - 1
    device_index = x.device.index  # always set for a CUDA tensor
    key = (device_index, k, k_granularity)
    quantizer = _quantizers.get(key)
    if quantizer is None:
        with _lock:
            quantizer = _quantizers.get(key) or _quantizers.setdefault(key, _Quantizer(k, k_granularity, device_index))
    a = torch.empty(cum_m, k, dtype=torch.float8_e4m3fn, device=x.device)
    # Zeros: padding rows and unused trailing bytes of the last word stay 0.
    storage = torch.zeros(k_align(k, k_granularity), m_padded(cum_m, num_experts), dtype=torch.int32, device=x.device)
    if cum_m:
        quantizer(x, m_indptr, a, storage, rows, current_stream(device_index))
    return a, tag_k_granularity(storage.t(), k_granularity)
