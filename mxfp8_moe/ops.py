"""torch custom ops (namespace "mxfp8_moe") for the quantizer and the grouped GEMMs.

As custom ops, the calls are opaque to torch.compile: Dynamo and Inductor place them in the graph
from their fake implementations (shapes, dtypes and strides computed from input shapes alone), so a
compiled MoE layer has no graph break around them, and their CUDA work lands on torch's current
stream, so CUDA graphs capture it.

    torch.ops.mxfp8_moe.quantize_activations(Tensor x, Tensor m_indptr, int k_granularity,
        Tensor? rows=None) -> (Tensor, Tensor)
    torch.ops.mxfp8_moe.grouped_gemm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale,
        Tensor m_indptr, int k_granularity, bool is_gated) -> Tensor
    torch.ops.mxfp8_moe.grouped_gemm_mxfp4(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale,
        Tensor m_indptr, Tensor? bias, bool is_gated, str activation, float alpha, float limit) -> Tensor
    torch.ops.mxfp8_moe.route_topk(Tensor router_logits, int top_k, bool renormalize)
        -> (Tensor, Tensor, Tensor, Tensor)
    torch.ops.mxfp8_moe.combine(Tensor rows, Tensor weight, Tensor slot_row, int num_tokens) -> Tensor
    torch.ops.mxfp8_moe.expert_gemms(Tensor a, Tensor a_scale, Tensor m_indptr, Tensor w13, Tensor w13_scale,
        Tensor w2, Tensor w2_scale, int k_granularity, str path) -> Tensor

Schemas are spelled out rather than inferred from type hints, so they read the same on every
torch >= 2.4.
"""

import torch

from .api import moe_gemm_mxfp8_mxfp4_nt_groupwise, moe_gemm_mxfp8_nt_groupwise
from .combine import combine_rows
from .epilogue import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from .experts import expert_gemms
from .layout import k_align, m_padded
from .quantize import quantize_activations
from .routing import route_topk


@torch.library.custom_op(
    "mxfp8_moe::quantize_activations",
    mutates_args=(),
    schema="(Tensor x, Tensor m_indptr, int k_granularity, Tensor? rows=None) -> (Tensor, Tensor)",
)
def _quantize_activations(x: torch.Tensor, m_indptr: torch.Tensor, k_granularity: int,
                          rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_activations(x, m_indptr, k_granularity, rows=rows)


@_quantize_activations.register_fake
def _(x, m_indptr, k_granularity, rows=None):
    cum_m, k = x.shape if rows is None else (rows.shape[0], x.shape[1])
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


def _gemm_output(a: torch.Tensor, b: torch.Tensor, is_gated: bool) -> torch.Tensor:
    """A grouped GEMM's output as its fake implementation describes it: (cum_m, N or N / 2) bf16."""
    n = b.shape[1]
    return a.new_empty((a.shape[0], n // 2 if is_gated else n), dtype=torch.bfloat16)


@_grouped_gemm.register_fake
def _(a, b, a_scale, b_scale, m_indptr, k_granularity, is_gated):
    return _gemm_output(a, b, is_gated)


@torch.library.custom_op(
    "mxfp8_moe::grouped_gemm_mxfp4",
    mutates_args=(),
    schema="(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor m_indptr, Tensor? bias, bool is_gated, "
    "str activation, float alpha, float limit) -> Tensor",
)
def _grouped_gemm_mxfp4(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                        m_indptr: torch.Tensor, bias: torch.Tensor | None, is_gated: bool, activation: str, alpha: float,
                        limit: float) -> torch.Tensor:
    options = dict(activation=activation, alpha=alpha, limit=limit) if is_gated else {}
    return moe_gemm_mxfp8_mxfp4_nt_groupwise(a, b, a_scale, b_scale, m_indptr, is_gated=is_gated, bias=bias, **options)


@_grouped_gemm_mxfp4.register_fake
def _(a, b, a_scale, b_scale, m_indptr, bias, is_gated, activation, alpha, limit):
    return _gemm_output(a, b, is_gated)


@torch.library.custom_op(
    "mxfp8_moe::route_topk",
    mutates_args=(),
    schema="(Tensor router_logits, int top_k, bool renormalize) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _route_topk(router_logits: torch.Tensor, top_k: int,
                renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return route_topk(router_logits, top_k, renormalize)


@_route_topk.register_fake
def _(router_logits, top_k, renormalize):
    rows = router_logits.shape[0] * top_k
    return (router_logits.new_empty((rows,), dtype=torch.int64), router_logits.new_empty((rows,), dtype=torch.float32),
            router_logits.new_empty((router_logits.shape[1] + 1,), dtype=torch.int32),
            router_logits.new_empty((rows,), dtype=torch.int32))


@torch.library.custom_op(
    "mxfp8_moe::combine",
    mutates_args=(),
    schema="(Tensor rows, Tensor weight, Tensor slot_row, int num_tokens) -> Tensor",
)
def _combine(rows: torch.Tensor, weight: torch.Tensor, slot_row: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return combine_rows(rows, weight, slot_row, num_tokens)


@_combine.register_fake
def _(rows, weight, slot_row, num_tokens):
    return rows.new_empty((num_tokens, rows.shape[1]), dtype=torch.bfloat16)


@torch.library.custom_op(
    "mxfp8_moe::expert_gemms",
    mutates_args=(),
    schema="(Tensor a, Tensor a_scale, Tensor m_indptr, Tensor w13, Tensor w13_scale, Tensor w2, Tensor w2_scale, "
    "int k_granularity, str path) -> Tensor",
)
def _expert_gemms(a: torch.Tensor, a_scale: torch.Tensor, m_indptr: torch.Tensor, w13: torch.Tensor,
                  w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, k_granularity: int,
                  path: str) -> torch.Tensor:
    return expert_gemms(a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, k_granularity, path=path)


@_expert_gemms.register_fake
def _(a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, k_granularity, path):
    return a.new_empty((a.shape[0], w2.shape[1]), dtype=torch.bfloat16)


def quantize_activations_op(
    x: torch.Tensor, m_indptr: torch.Tensor, k_granularity: int = 128, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mxfp8_moe.quantize_activations` as a custom op: (cum_m, k) e4m3 data, MN-major a_scale;
    with `rows`, of x[rows], gathered on the way."""
    return torch.ops.mxfp8_moe.quantize_activations.default(x, m_indptr, k_granularity, rows)


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


def grouped_gemm_mxfp4(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    m_indptr: torch.Tensor,
    bias: torch.Tensor | None = None,
    is_gated: bool = False,
    activation: str = "swiglu",
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
) -> torch.Tensor:
    """`moe_gemm_mxfp8_mxfp4_nt_groupwise` (backend "auto", a new bf16 output, [up; gate] halves) as
    a custom op."""
    return torch.ops.mxfp8_moe.grouped_gemm_mxfp4.default(a, b, a_scale, b_scale, m_indptr, bias, is_gated, activation,
                                                          alpha, limit)


def route_topk_op(router_logits: torch.Tensor, top_k: int, renormalize: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mxfp8_moe.routing.route_topk` as a custom op: (token, weight, m_indptr, slot_row)."""
    return torch.ops.mxfp8_moe.route_topk.default(router_logits, top_k, renormalize)


def combine_op(rows: torch.Tensor, weight: torch.Tensor, slot_row: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`mxfp8_moe.combine.combine_rows` as a custom op: (num_tokens, H) bf16."""
    return torch.ops.mxfp8_moe.combine.default(rows, weight, slot_row, num_tokens)


def expert_gemms_op(a: torch.Tensor, a_scale: torch.Tensor, m_indptr: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, k_granularity: int = 128,
                    path: str = "auto") -> torch.Tensor:
    """`mxfp8_moe.experts.expert_gemms` as a custom op: (cum_m, H) bf16."""
    return torch.ops.mxfp8_moe.expert_gemms.default(a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, k_granularity,
                                                    path)
