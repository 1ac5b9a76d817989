"""Random MoE problems for the tests and tools: routing, quantized operands, float64 reference."""

from __future__ import annotations

import dataclasses

import torch

from mxfp8_moe import (
    k_align,
    quantize_activations,
    quantize_weights,
    reference_moe_gemm,
    to_k_major,
    to_mn_major_b_scale,
)

_EXPERTS_PER_CHUNK = 16


@dataclasses.dataclass
class Problem:
    a: torch.Tensor
    b: torch.Tensor
    a_scale: torch.Tensor
    b_scale: torch.Tensor
    m_indptr: torch.Tensor
    k_granularity: int
    gated: bool

    @property
    def args(self):
        return self.a, self.b, self.a_scale, self.b_scale, self.m_indptr

    @property
    def granularity(self) -> tuple[int, int, int]:
        return (1, 1, self.k_granularity)

    def reference(self) -> torch.Tensor:
        return reference_moe_gemm(*self.args, k_granularity=self.k_granularity, is_gated=self.gated,
                                  accumulate_dtype=torch.float64)


def indptr(rows_per_expert, device="cpu") -> torch.Tensor:
    counts = torch.as_tensor(rows_per_expert, dtype=torch.int64)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).to(device)


def routed_rows(tokens: int, num_experts: int, top_k: int, generator=None) -> list[int]:
    """Rows per expert when each token picks top_k distinct experts uniformly at random."""
    scores = torch.rand(tokens, num_experts, generator=generator)
    chosen = scores.topk(top_k, dim=1).indices.flatten()
    return torch.bincount(chosen, minlength=num_experts).tolist()


def make_problem(rows_per_expert, n: int, k: int, *, k_granularity=128, gated=False, scale_layout="MN",
                 device="cuda", generator=None) -> Problem:
    """Fresh random data (never zeros), drawn on `device`: tokens ~ N(0, 1) with per-row magnitudes
    spread over a few octaves so the scales differ, weights ~ N(0, 0.05)."""
    m_indptr = indptr(rows_per_expert, device)
    cum_m, num_experts = int(sum(rows_per_expert)), len(rows_per_expert)
    magnitudes = torch.exp2(torch.randint(-3, 4, (cum_m, 1), generator=generator, device=device).float())
    x = torch.randn(cum_m, k, generator=generator, device=device) * magnitudes
    a, a_scale = quantize_activations(x, m_indptr, k_granularity)
    # Weights a few experts at a time: the float32 temporaries of a whole model-sized layer would
    # need tens of GB, enough to crowd out a second test process on the same GPU.
    b = torch.empty(num_experts, n, k, dtype=torch.float8_e4m3fn, device=device)
    b_scale = torch.empty(num_experts, n, k_align(k, k_granularity), dtype=torch.int32, device=device)
    for first in range(0, num_experts, _EXPERTS_PER_CHUNK):
        w = torch.randn(min(_EXPERTS_PER_CHUNK, num_experts - first), n, k, generator=generator, device=device)
        b_chunk, scale_chunk = quantize_weights(w * 0.05, k_granularity)
        b[first:first + len(w)] = b_chunk
        b_scale[first:first + len(w)] = scale_chunk
    if scale_layout == "K":
        a_scale = to_k_major(a_scale)
    else:
        b_scale = to_mn_major_b_scale(b_scale)
    return Problem(a, b, a_scale, b_scale, m_indptr, k_granularity, gated)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = out.double() - ref.double()
    return (diff.norm() / ref.double().norm().clamp_min(1e-30)).item()


GPT_OSS_PREFIX = "mlp.experts."


def gpt_oss_checkpoint(experts=8, hidden=256, inter=256, device="cpu") -> dict[str, torch.Tensor]:
    """One layer's expert tensors as gpt-oss's safetensors hold them: random MXFP4 codes with scales
    around 2^-7, bf16 biases."""
    tensors = {}
    for name, n, k in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
        key = f"{GPT_OSS_PREFIX}{name}"
        tensors[f"{key}_blocks"] = torch.randint(0, 256, (experts, n, k // 32, 16), dtype=torch.uint8, device=device)
        tensors[f"{key}_scales"] = torch.randint(118, 122, (experts, n, k // 32), dtype=torch.uint8, device=device)
        tensors[f"{key}_bias"] = (torch.randn(experts, n, device=device) * 0.1).bfloat16()
    return tensors
