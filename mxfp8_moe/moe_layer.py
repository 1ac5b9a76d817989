"""A whole MoE block (routing, SwiGLU experts, combine) on MXFP8 weights and activations.

    probs = softmax(router_logits); weights, experts = top_k(probs), renormalized
    out[t] = sum_j weights[t, j] * w2[e] @ (up * silu(gate)),  [up; gate] = w13[e] @ hidden[t],  e = experts[t, j]

Every step runs on the device without a host sync and without data-dependent Python control flow,
so `moe_forward` traces under torch.compile(fullgraph=True) and captures into CUDA graphs: the
number of expert rows, T * top_k, comes from shapes, and the routing, the quantizer, the GEMM and
the combine are custom ops (`ops.py`), on a GPU each its own kernel (DESIGN.md: "The MoE block
around the GEMMs").

Weight layout: w13 is (E, 2 I, H) with rows [0, I) "up" and [I, 2 I) "gate" (the GEMM's gated
epilogue's order; checkpoints that store [gate; up], as vLLM's w13 does, swap the halves first),
w2 is (E, H, I).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops import combine_op, expert_gemms_op, quantize_activations_op, route_topk_op
from .quantize import quantize_weights


@dataclasses.dataclass(frozen=True)
class QuantizedExperts:
    """One projection of every expert in MXFP8: the GEMM's `b` and `b_scale`, and the k granularity
    of the scales, which the block's activations are quantized at too."""

    b: torch.Tensor  # (E, N, K) float8_e4m3fn
    b_scale: torch.Tensor  # (E, N, k_align) int32 UE8M0 words, MN-major
    k_granularity: int

    @classmethod
    def quantize(cls, w: torch.Tensor, k_granularity: int = 128) -> QuantizedExperts:
        return cls(*quantize_weights(w, k_granularity), k_granularity)


class Routing(NamedTuple):
    """Where each of the T * top_k expert rows comes from, rows in expert order."""

    token: torch.Tensor  # (T * top_k,) int64: the token each row copies
    weight: torch.Tensor  # (T * top_k,) float32: its routing weight
    m_indptr: torch.Tensor  # (E + 1,) int32: rows [m_indptr[e], m_indptr[e + 1]) go to expert e
    slot_row: torch.Tensor  # (T * top_k,) int32: the row of token t's slot j, at t * top_k + j


def route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True) -> Routing:
    """Softmax top-k routing and the permutation of token copies into expert order (one launch on a
    GPU for decode-sized batches: mxfp8_moe/routing.py)."""
    return Routing(*route_topk_op(router_logits, top_k, renormalize))


def combine(rows: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
    """Weight the (T * top_k, H) expert-ordered rows and add each token's top_k rows, in float32 and
    in slot order (deterministic; mxfp8_moe/combine.py)."""
    return combine_op(rows, routing.weight, routing.slot_row, num_tokens)


def moe_forward(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: QuantizedExperts,
    w2: QuantizedExperts,
    top_k: int,
    *,
    renormalize: bool = True,
    experts: str = "auto",
) -> torch.Tensor:
    """MoE block: (T, H) bf16 hidden states and (T, E) router logits -> (T, H) bf16.

    w13: (E, 2 I, H) [up; gate] and w2: (E, H, I), quantized at one k granularity, which the
    activations are quantized at too. `experts`: how the expert GEMMs run (experts.expert_gemms'
    path: "auto", "fused" or "chain"; on sm_90a the same bits every way, except where the chain
    splits K: experts.py).
    """
    if w13.k_granularity != w2.k_granularity:
        raise ValueError(f"w13 and w2 must be quantized at the same k granularity, got {w13.k_granularity} and "
                         f"{w2.k_granularity}")
    k_granularity = w13.k_granularity
    routing = route(router_logits, top_k, renormalize=renormalize)
    a, a_scale = quantize_activations_op(hidden, routing.m_indptr, k_granularity, routing.token)
    y = expert_gemms_op(a, a_scale, routing.m_indptr, w13.b, w13.b_scale, w2.b, w2.b_scale, k_granularity, experts)
    return combine(y, routing, hidden.shape[0])


class MXFP8MoE(torch.nn.Module):
    """MoE block whose expert weights are quantized to MXFP8 once, at construction, on their device.

    The quantized weights and scales are buffers, so `.to()` and `state_dict()` carry them.
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int, k_granularity: int = 128,
                 *, renormalize: bool = True):
        """w13: (E, 2 I, H) [up; gate], w2: (E, H, I), any float dtype."""
        super().__init__()
        if w2.dim() != 3 or w13.shape != (w2.shape[0], 2 * w2.shape[2], w2.shape[1]):
            raise ValueError(f"w13 and w2 must be (E, 2 I, H) and (E, H, I), got {tuple(w13.shape)} and "
                             f"{tuple(w2.shape)}")
        self.top_k, self.k_granularity, self.renormalize = top_k, k_granularity, renormalize
        for name, w in (("w13", w13), ("w2", w2)):
            b, b_scale = quantize_weights(w, k_granularity)
            self.register_buffer(name, b)
            self.register_buffer(f"{name}_scale", b_scale)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return moe_forward(hidden, router_logits, QuantizedExperts(self.w13, self.w13_scale, self.k_granularity),
                           QuantizedExperts(self.w2, self.w2_scale, self.k_granularity), self.top_k,
                           renormalize=self.renormalize)


def reference_moe_forward(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                          top_k: int, *, renormalize: bool = True) -> torch.Tensor:
    """The same block in plain bf16 torch, token by expert, to measure the MXFP8 layer against.

    Written independently of the layer (no sort, no permutation, no custom op); it reads routing
    results on the host, so it is for eager checks only.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in experts.unique().tolist():
        token, slot = (experts == e).nonzero(as_tuple=True)
        up, gate = (hidden[token] @ w13[e].to(hidden.dtype).t()).chunk(2, dim=-1)
        y = (up * F.silu(gate)) @ w2[e].to(hidden.dtype).t()
        out[token] += y.float() * weights[token, slot].unsqueeze(1)
    return out.to(hidden.dtype)
