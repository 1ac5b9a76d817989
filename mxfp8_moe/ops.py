"""torch custom ops (namespace "mxfp8_moe") for the quantizer and the grouped GEMM.

As custom ops, both calls are opaque to torch.compile: Dynamo and Inductor place them in the graph
from their fake implementations (shapes, dtypes and strides computed from input shapes alone), so a
compiled MoE layer has no graph break around them, and their CUDA work lands on torch's current
stream, so CUDA graphs capture it.

    torch.ops.mxfp8_moe.quantize_activations(Tensor x, Tensor m_indptr, int k_granularity)
        -> (Tensor, Tensor)
    torch.ops.mxfp8_moe.grouped_gemm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale,
        Tensor m_indptr, int k_granularity, bool is_gated) -> Tensor

Schemas are spelled out rather than inferred from type hints, so they read the same on every
torch >= 2.4.
"""

import torch

from .api import moe_gemm_mxfp8_nt_groupwise
from .layout import k_align, m_padded
from .quantize import quantize_activations


@torch.library.custom_op(
    "mxfp8_moe::quantize_activations",
    mutates_args=(),
    schema="(Tensor x, Tensor m_indptr, int k_granularity) -> (Tensor, Tensor)",
)
def _quantize_activations(x: torch.Tensor, m_indptr: torch.Tensor,
                          k_granularity: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_activations(x, m_indptr, k_granularity)


@_quantize_activations.register_fake
def _(x, m_indptr, k_granularity):
    cum_m, k = x.shape
    a = x.new_empty((cum_m, k), dtype=torch.float8_e4m3fn)
    # The real a_scale is the MN-major transpose view of a contiguous (k_align, m_padded) tensor;
    # Inductor lays out its buffers from these strides, so they must be the real ones.
    storage = x.new_empty((k_align(k, k_granularity), m_padded(cum_m, m_indptr.shape[0] - 1)), dtype=torch.int32)
    return a, storage.t()


@torch.library.custom_op(
    "mxfp8_moe::grouped_gemm",
    mutates_args=(),
    schema="(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor m_indptr, int k_granularity, "
    "bool is_gated) -> Tensor",
)
def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  m_indptr: torch.Tensor, k_granularity: int, is_gated: bool) -> torch.Tensor:
    return moe_gemm_mxfp8_nt_groupwise(a, b, a_scale, b_scale, m_indptr, (1, 1, k_granularity), is_gated=is_gated)


@_grouped_gemm.register_fake
def _(a, b, a_scale, b_scale, m_indptr, k_granularity, is_gated):
    n = b.shape[1]
    return a.new_empty((a.shape[0], n // 2 if is_gated else n), dtype=torch.bfloat16)


def quantize_activations_op(
    x: torch.Tensor, m_indptr: torch.Tensor, k_granularity: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mxfp8_moe.quantize_activations` as a custom op: (cum_m, k) e4m3 data, MN-major a_scale."""
    return torch.ops.mxfp8_moe.quantize_activations.default(x, m_indptr, k_granularity)


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    m_indptr: torch.Tensor,
    k_granularity: int = 128,
    is_gated: bool = False,
) -> torch.Tensor:
    """`moe_gemm_mxfp8_nt_groupwise` (backend "auto", a new bf16 output) as a custom op."""
    return torch.ops.mxfp8_moe.grouped_gemm.default(a, b, a_scale, b_scale, m_indptr, k_granularity, is_gated)
