"""A gpt-oss-shaped MoE layer on W4A8 (random MXFP4 experts in the checkpoint's layout, biases,
clamped SwiGLU, top-4 routing) against gpt-oss's formulation in bf16 with the same weights
dequantized; on a GPU also the layer's time per call in a CUDA graph.

    python tools/gpt_oss_layer.py                      # gpt-oss-120b's layer, 64 tokens
    python tools/gpt_oss_layer.py --experts 32         # gpt-oss-20b's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import GPT_OSS_PREFIX, gpt_oss_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import copy_bandwidth, graph_time  # noqa: E402

from mxfp8_moe.gpt_oss import GptOssMoE, reference_gpt_oss_forward  # noqa: E402

HIDDEN = INTER = 2880
SCALE_BLOCK = 32


def gemm_floor_bytes(active_experts: int, tokens: int, top_k: int) -> int:
    """Bytes the layer's two GEMMs must move at least: the routed experts' MXFP4 weights, scales and
    biases (gate_up 2I x H, down H x I), the MXFP8 tokens into each GEMM and bf16 rows out of it."""
    weights = active_experts * (2 * INTER * HIDDEN + HIDDEN * INTER) * (1 / 2 + 1 / SCALE_BLOCK)
    biases = active_experts * (2 * INTER + HIDDEN) * 4
    rows = tokens * top_k
    activations = rows * (HIDDEN + INTER) * (1 + 1 / SCALE_BLOCK) + rows * (INTER + HIDDEN) * 2
    return int(weights + biases + activations)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = gpt_oss_checkpoint(args.experts, HIDDEN, INTER, device)
    layer = GptOssMoE.from_checkpoint(tensors, GPT_OSS_PREFIX, top_k=args.top_k)
    bandwidth = copy_bandwidth() if device == "cuda" else None
    for tokens in args.tokens:
        x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device=device)
        logits = torch.randn(tokens, args.experts, device=device)
        out = layer(x, logits)
        ref = reference_gpt_oss_forward(x, logits, tensors, args.top_k).float()
        error = ((out.float() - ref).norm() / ref.norm()).item()
        line = f"T={tokens}: relative error {error:.3e} against bf16 with the dequantized weights"
        if device == "cuda":
            active = int(logits.topk(args.top_k, dim=1).indices.unique().numel())
            floor = gemm_floor_bytes(active, tokens, args.top_k) / bandwidth
            line += (f", {graph_time([lambda: layer(x, logits)]) * 1e6:.1f} us per layer (CUDA graph); "
                     f"its two GEMMs' HBM floor {floor * 1e6:.1f} us ({active} experts routed)")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
