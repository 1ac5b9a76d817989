"""What the grouped GEMMs do between the FP32 product and the bf16 output: an optional per-expert
bias, then for gated GEMMs the activation of each (up, gate) pair (kernels/epilogue.cuh does the
same on the device).

    y = a @ b[e].T (+ bias[e])              one FP32 value per row of b
    gated: up, gate = the two halves of y ([up; gate], FlashInfer) or its odd and even rows
           ("interleaved", gpt-oss: even rows gate, odd rows up)
    swiglu:          out = up * silu(gate)
    clamped_swiglu:  gate = min(gate, limit), up = clamp(up, -limit, limit),
                     out = (up + 1) * gate * sigmoid(alpha * gate)          (gpt-oss)
"""

from __future__ import annotations

import dataclasses

import torch

ACTIVATIONS = ("swiglu", "clamped_swiglu")
GATE_LAYOUTS = ("halves", "interleaved")
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0


@dataclasses.dataclass(frozen=True)
class GatedActivation:
    """How a gated GEMM turns each (up, gate) pair of FP32 results into its output."""

    kind: str = "swiglu"
    layout: str = "halves"
    alpha: float = GPT_OSS_ALPHA  # clamped_swiglu only
    limit: float = GPT_OSS_LIMIT  # clamped_swiglu only

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {self.kind!r}")
        if self.layout not in GATE_LAYOUTS:
            raise ValueError(f"gate_layout must be one of {', '.join(map(repr, GATE_LAYOUTS))}, got {self.layout!r}")
        if self.kind == "clamped_swiglu" and not (self.limit > 0 and abs(self.alpha) < float("inf")):
            raise ValueError(f"clamped_swiglu needs a positive limit and a finite alpha, got limit={self.limit!r}, "
                             f"alpha={self.alpha!r}")

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, gate) of the (..., 2N) results of one row of b each."""
        if self.layout == "interleaved":
            return y[..., 1::2], y[..., 0::2]
        up, gate = y.chunk(2, dim=-1)
        return up, gate

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """The activation of (..., 2N) float results -> (..., N), in y's dtype."""
        up, gate = self.split(y)
        if self.kind == "swiglu":
            return up * torch.nn.functional.silu(gate)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(self.alpha * gate)
