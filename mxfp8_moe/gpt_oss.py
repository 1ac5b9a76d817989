"""gpt-oss's MoE block on the W4A8 grouped GEMM: its checkpoint's MXFP4 experts as they ship (no
requantization), its biases, its clamped SwiGLU and its routing.

    weights, experts = softmax(top_k(router_logits))        (the k largest logits, softmax over them)
    gate, up = gate_up[e] @ hidden[t] + bias (rows interleaved in the checkpoint: gate even, up odd)
    h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),  g = min(gate, limit)
    out[t] = sum_j weights[t, j] * (down[e] @ h + down_bias[e])

Routing: a softmax over the k largest logits gives the same weights as a softmax over all of them,
top-k, renormalized (each is exp(l_i) / sum over the k of exp(l_j)), which is what
moe_layer.route computes. Activations are quantized to MXFP8 at k granularity 32, the weights'.
Every step runs on the device without a host sync (torch.compile fullgraph and CUDA graphs, as
moe_layer's block).
"""

from __future__ import annotations

import dataclasses

import torch

from .convert import from_gpt_oss
from .epilogue import GPT_OSS_ALPHA, GPT_OSS_LIMIT, GatedActivation
from .moe_layer import combine, route
from .mxfp4 import K_GRANULARITY, dequantize_weights_mxfp4
from .ops import grouped_gemm_mxfp4, quantize_activations_op


@dataclasses.dataclass(frozen=True)
class MXFP4Experts:
    """One projection of every expert in MXFP4: the W4A8 op's `b`, `b_scale` and `bias`."""

    b: torch.Tensor  # (E, N, K / 2) uint8, two e2m1 codes per byte
    b_scale: torch.Tensor  # (E, N, ceil(K / 128)) int32 UE8M0 words, MN-major
    bias: torch.Tensor  # (E, N) float32

    @classmethod
    def from_checkpoint(cls, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, *,
                        gate_up: bool) -> MXFP4Experts:
        """From `*_proj_blocks`, `*_proj_scales`, `*_proj_bias` (gate_up's rows into [up; gate] halves)."""
        return cls(*from_gpt_oss(blocks, scales, bias, gate_up=gate_up))


def gpt_oss_moe_forward(hidden: torch.Tensor, router_logits: torch.Tensor, gate_up: MXFP4Experts, down: MXFP4Experts,
                        top_k: int, *, alpha: float = GPT_OSS_ALPHA, limit: float = GPT_OSS_LIMIT) -> torch.Tensor:
    """The block: (T, H) bf16 hidden states and (T, E) router logits -> (T, H) bf16."""
    routing = route(router_logits, top_k)
    a, a_scale = quantize_activations_op(hidden, routing.m_indptr, K_GRANULARITY, routing.token)
    h = grouped_gemm_mxfp4(a, gate_up.b, a_scale, gate_up.b_scale, routing.m_indptr, gate_up.bias, True,
                           "clamped_swiglu", alpha, limit)
    a, a_scale = quantize_activations_op(h, routing.m_indptr, K_GRANULARITY)
    y = grouped_gemm_mxfp4(a, down.b, a_scale, down.b_scale, routing.m_indptr, down.bias)
    return combine(y, routing, hidden.shape[0])


class GptOssMoE(torch.nn.Module):
    """gpt-oss's MoE block, its experts loaded from the checkpoint's tensors once; they are buffers,
    so `.to()` and `state_dict()` carry them."""

    def __init__(self, gate_up: MXFP4Experts, down: MXFP4Experts, top_k: int = 4, *, alpha: float = GPT_OSS_ALPHA,
                 limit: float = GPT_OSS_LIMIT):
        super().__init__()
        experts, rows, hidden = gate_up.b.shape[0], gate_up.b.shape[1], 2 * gate_up.b.shape[2]
        if down.b.shape != (experts, hidden, rows // 4):
            raise ValueError(f"gate_up and down must be (E, 2 I, H / 2) and (E, H, I / 2) packed weights, got "
                             f"{tuple(gate_up.b.shape)} and {tuple(down.b.shape)}")
        self.top_k, self.alpha, self.limit = top_k, alpha, limit
        for name, experts_of in (("gate_up", gate_up), ("down", down)):
            for field in ("b", "b_scale", "bias"):
                self.register_buffer(f"{name}_{field}", getattr(experts_of, field))

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], prefix: str = "mlp.experts.", top_k: int = 4,
                        **kwargs) -> GptOssMoE:
        """From one layer's checkpoint tensors: `{prefix}gate_up_proj_blocks`, `_scales`, `_bias` and
        the same for `down_proj`."""
        def projection(name: str, gate_up: bool) -> MXFP4Experts:
            return MXFP4Experts.from_checkpoint(*(tensors[f"{prefix}{name}_{part}"] for part in ("blocks", "scales", "bias")),
                                                gate_up=gate_up)

        return cls(projection("gate_up_proj", True), projection("down_proj", False), top_k, **kwargs)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return gpt_oss_moe_forward(hidden, router_logits,
                                   MXFP4Experts(self.gate_up_b, self.gate_up_b_scale, self.gate_up_bias),
                                   MXFP4Experts(self.down_b, self.down_b_scale, self.down_bias), self.top_k,
                                   alpha=self.alpha, limit=self.limit)


def reference_gpt_oss_forward(hidden: torch.Tensor, router_logits: torch.Tensor, tensors: dict[str, torch.Tensor],
                              top_k: int = 4, prefix: str = "mlp.experts.", *, alpha: float = GPT_OSS_ALPHA,
                              limit: float = GPT_OSS_LIMIT) -> torch.Tensor:
    """The block as gpt-oss writes it, in bf16 with the checkpoint's weights dequantized: top-k of
    the logits then a softmax over them, interleaved gate and up rows, token by expert. For eager
    checks (it reads routing results on the host)."""
    def weights(name: str) -> torch.Tensor:
        blocks, scales = tensors[f"{prefix}{name}_blocks"], tensors[f"{prefix}{name}_scales"]
        b, b_scale, _ = from_gpt_oss(blocks, scales, gate_up=False)
        return dequantize_weights_mxfp4(b, b_scale).to(hidden.dtype)

    gate_up, down = weights("gate_up_proj"), weights("down_proj")
    gate_up_bias, down_bias = tensors[f"{prefix}gate_up_proj_bias"], tensors[f"{prefix}down_proj_bias"]
    activation = GatedActivation("clamped_swiglu", "interleaved", alpha, limit)
    values, experts = router_logits.float().topk(top_k, dim=-1)
    routing_weights = torch.softmax(values, dim=-1)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in experts.unique().tolist():
        token, slot = (experts == e).nonzero(as_tuple=True)
        h = activation(hidden[token] @ gate_up[e].t() + gate_up_bias[e].to(hidden.dtype))
        y = h @ down[e].t() + down_bias[e].to(hidden.dtype)
        out[token] += y.float() * routing_weights[token, slot].unsqueeze(1)
    return out.to(hidden.dtype)
