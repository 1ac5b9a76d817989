"""Softmax top-k routing and the permutation of token copies into expert order.

    probs = softmax(router_logits); weights, experts = top_k(probs), renormalized (or not)
    rows in expert order, each expert's rows in token order; m_indptr the CSR offsets;
    slot_row: where each (token, slot) pair went, the inverse permutation the combine gathers by

Two implementations with one result: on a GPU, for up to MAX_ROWS rows (T * top_k: decode
batches), one launch of kernels/route_topk.cuh; otherwise a few torch ops. Both run
without a host sync. They agree exactly on experts, rows and offsets and to float rounding on
weights (exp and the order of the sums differ), where no two of a token's logits tie. Ties go to
the lower expert index in the kernel, where torch.topk leaves their order unspecified: with ties
(bf16 logits have them often) the two may order a token's slots differently, or, at the k-th
place, pick a different one of the tied experts.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from .gemm.device import current_stream, device_info
from .jit.struct_kernel import KernelMemo, entry_source

ENTRY = "mxfp8_moe_route_topk"
# A warp per token: 32 warps where a lane's logits fit 64 registers (E <= 256), else 16.
MAX_THREADS = 1024
# T * top_k per launch. One CTA does the whole routing, so its time grows with the rows; on an H100
# (E 128, top-8) it took 3.3 us for 8 rows where torch's ops take 31.5 us, 12.1 us for 512 (torch
# 57.0), 42.6 us for 2048 (torch 66.0) and 83.5 us for 4096 (torch 72.6): beyond 2048 rows the torch
# path is faster (docs/PERFORMANCE.md).
MAX_ROWS = 2048
MAX_EXPERTS = 1024  # 32 logits a lane
MAX_TOP_K = 32  # one lane writes each choice


class RouteParams(ctypes.Structure):
    """Mirror of mxfp8_moe::RouteParams."""

    _fields_ = [
        ("logits", ctypes.c_void_p),
        ("token", ctypes.c_void_p),
        ("weight", ctypes.c_void_p),
        ("m_indptr", ctypes.c_void_p),
        ("slot_row", ctypes.c_void_p),
        ("num_tokens", ctypes.c_int32),
    ]


@dataclasses.dataclass(frozen=True)
class RouteSpec:
    """One specialization of the routing kernel (the interface of gemm.spec.KernelSpec: arch,
    label, source)."""

    arch: str
    num_experts: int
    top_k: int
    bf16_logits: bool
    renormalize: bool
    entry = ENTRY
    params = RouteParams

    @property
    def threads(self) -> int:
        return MAX_THREADS if self.num_experts <= 256 else MAX_THREADS // 2

    @property
    def label(self) -> str:
        dtype = "bf16" if self.bf16_logits else "f32"
        return f"route_topk_e{self.num_experts}_k{self.top_k}_{dtype}{'_renorm' if self.renormalize else ''}"

    def source(self) -> str:
        flags = f"{str(self.bf16_logits).lower()}, {str(self.renormalize).lower()}"
        return entry_source("route_topk.cuh", ENTRY, "RouteParams",
                            f"route_topk<{self.num_experts}, {self.top_k}, {flags}, {MAX_ROWS}, {self.threads}>", self.threads, 1)


def kernel_takes(logits: torch.Tensor, top_k: int) -> bool:
    """Whether the one-launch kernel routes these logits: a contiguous (T, E) float32 or bf16 CUDA
    tensor of at most MAX_ROWS rows after top-k, E <= MAX_EXPERTS, top_k <= MAX_TOP_K."""
    num_tokens, num_experts = logits.shape
    return (logits.is_cuda and logits.dtype in (torch.float32, torch.bfloat16) and logits.is_contiguous()
            and num_experts <= MAX_EXPERTS and top_k <= MAX_TOP_K and num_tokens * top_k <= MAX_ROWS
            and device_info(logits.device.index).capability >= (7, 5))


_routers = KernelMemo()


def route_kernel(logits: torch.Tensor, top_k: int, renormalize: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, weight, m_indptr, slot_row) by the one-launch kernel; the caller checked kernel_takes()."""
    num_tokens, num_experts = logits.shape
    device_index = logits.device.index
    token = torch.empty(num_tokens * top_k, dtype=torch.int64, device=logits.device)
    weight = torch.empty(num_tokens * top_k, dtype=torch.float32, device=logits.device)
    m_indptr = torch.empty(num_experts + 1, dtype=torch.int32, device=logits.device)
    slot_row = torch.empty(num_tokens * top_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return token, weight, m_indptr.zero_(), slot_row
    spec = RouteSpec(device_info(device_index).arch, num_experts, top_k, logits.dtype == torch.bfloat16, renormalize)
    router = _routers.kernel(spec, device_index)
    router.launch((1, 1, 1), current_stream(device_index), logits=logits.data_ptr(), token=token.data_ptr(),
                  weight=weight.data_ptr(), m_indptr=m_indptr.data_ptr(), slot_row=slot_row.data_ptr(),
                  num_tokens=num_tokens)
    return token, weight, m_indptr, slot_row


def route_torch(logits: torch.Tensor, top_k: int, renormalize: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, weight, m_indptr, slot_row) by torch ops, on any device and batch size."""
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # A stable sort keeps each expert's rows in token order. The offsets come from a search of the
    # sorted ids rather than bincount(minlength=E).cumsum: bincount's length is max(max(id) + 1, E),
    # data-dependent to a tracer (a graph break, or an unbacked size), where this one is E + 1.
    sorted_experts, order = experts.flatten().sort(stable=True)
    boundaries = torch.arange(num_experts + 1, device=logits.device, dtype=sorted_experts.dtype)
    m_indptr = torch.searchsorted(sorted_experts, boundaries, out_int32=True)
    positions = torch.arange(order.numel(), device=logits.device, dtype=torch.int32)
    slot_row = torch.empty_like(positions).scatter_(0, order, positions)
    return order // top_k, weights.flatten()[order], m_indptr, slot_row


def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, weight, m_indptr, slot_row) for (T, E) router logits: (T * top_k,) int64 source
    tokens and float32 weights of the expert-ordered rows, (E + 1,) int32 offsets, and (T * top_k,)
    int32 rows of the (token, slot) pairs, slot j of token t at t * top_k + j."""
    if logits.dim() != 2 or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"router_logits must be (T, E) with 1 <= top_k <= E, got {tuple(logits.shape)} "
                         f"and top_k {top_k}")
    if kernel_takes(logits, top_k):
        return route_kernel(logits, top_k, renormalize)
    return route_torch(logits, top_k, renormalize)
