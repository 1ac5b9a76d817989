"""Time the one-launch routing kernel against the torch ops it replaces (mxfp8_moe/routing.py),
each in a CUDA graph with 6 router-logit tensors rotated, at decode batch sizes.

    python tools/bench_routing.py                         # E = 128 top-8 and E = 32 top-1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import ROUTINGS, graph_time  # noqa: E402

from mxfp8_moe.routing import MAX_ROWS, route_kernel, route_torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["128x8", "32x1"], help="experts x top-k")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 256])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; the kernel takes up to {MAX_ROWS} rows (T x top-k)")
    for shape in args.shapes:
        experts, top_k = map(int, shape.split("x"))
        for tokens in args.tokens:
            logits = [torch.randn(tokens, experts, device="cuda") for _ in range(ROUTINGS)]
            torch_us = graph_time([lambda lg=lg: route_torch(lg, top_k, True) for lg in logits]) * 1e6
            line = f"E={experts} top-{top_k} T={tokens}: torch {torch_us:.1f} us"
            if tokens * top_k <= MAX_ROWS:
                kernel_us = graph_time([lambda lg=lg: route_kernel(lg, top_k, True) for lg in logits]) * 1e6
                line += f", kernel {kernel_us:.1f} us"
            print(line, flush=True)


if __name__ == "__main__":
    main()
