"""Run the MXFP8 MoE block on a model-shaped problem: its error against the bf16 block and its time
per stage.

    python tools/moe_layer_demo.py                      # Qwen3-30B-A3B's MoE block, 64 tokens
    python tools/moe_layer_demo.py --tokens 1 --compile

On a GPU, stages are timed with CUDA events; without one, on the CPU with perf_counter, at a
smaller default shape (the CPU GEMM is the reference backend). Times are medians over --repeats
eager runs, so at few tokens they include each stage's host-side launch cost; --compile adds the
whole block under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mxfp8_moe.moe_layer import MXFP8MoE, combine, reference_moe_forward, route  # noqa: E402
from mxfp8_moe.ops import grouped_gemm, quantize_activations_op  # noqa: E402

# experts, hidden, moe_intermediate, top_k, tokens
GPU_SHAPE = (128, 2048, 768, 8, 64)  # Qwen3-30B-A3B
CPU_SHAPE = (16, 512, 256, 4, 16)


def stages(layer: MXFP8MoE, hidden: torch.Tensor, logits: torch.Tensor):
    """moe_forward's steps, yielding each one's name once its work is issued."""
    kg = layer.k_granularity
    routing = route(logits, layer.top_k, renormalize=layer.renormalize)
    yield "routing + permutation"
    a, a_scale = quantize_activations_op(hidden, routing.m_indptr, kg, routing.token)
    yield "gather + quantize (gate_up input)"
    h = grouped_gemm(a, layer.w13, a_scale, layer.w13_scale, routing.m_indptr, kg, is_gated=True)
    yield "gate_up GEMM + SwiGLU"
    a, a_scale = quantize_activations_op(h, routing.m_indptr, kg)
    yield "quantize (down input)"
    y = grouped_gemm(a, layer.w2, a_scale, layer.w2_scale, routing.m_indptr, kg)
    yield "down GEMM"
    combine(y, routing, hidden.shape[0])
    yield "combine"


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def median_ms(clock: Clock, fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.ms(start, end))
    return statistics.median(times)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, value in zip(("--experts", "--hidden", "--inter", "--top-k", "--tokens"), default):
        parser.add_argument(flag, type=int, default=value)
    parser.add_argument("--k-granularity", type=int, choices=(32, 128), default=128)
    parser.add_argument("--repeats", type=int, default=50 if device.type == "cuda" else 5)
    parser.add_argument("--compile", action="store_true", help="also time the block under torch.compile")
    args = parser.parse_args()

    torch.manual_seed(0)
    w13 = (torch.randn(args.experts, 2 * args.inter, args.hidden, device=device) * 0.02).bfloat16()
    w2 = (torch.randn(args.experts, args.hidden, args.inter, device=device) * 0.02).bfloat16()
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
    logits = torch.randn(args.tokens, args.experts, device=device)
    layer = MXFP8MoE(w13, w2, args.top_k, args.k_granularity)

    print(f"{device.type}: E={args.experts} H={args.hidden} I={args.inter} top_k={args.top_k} T={args.tokens} "
          f"k_granularity={args.k_granularity}")
    out = layer(hidden, logits)  # also compiles the GEMM kernels
    ref = reference_moe_forward(hidden, logits, w13, w2, args.top_k)
    error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"relative Frobenius error vs the bf16 block: {error:.4f} (MXFP8 on Gaussian data: about 0.066)")

    clock = Clock(device)
    per_stage: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        marks, names = [clock.mark()], []
        for name in stages(layer, hidden, logits):
            names.append(name)
            marks.append(clock.mark())
        clock.sync()
        for name, start, end in zip(names, marks, marks[1:]):
            per_stage.setdefault(name, []).append(clock.ms(start, end))
    for name, times in per_stage.items():
        print(f"  {name:<34} {statistics.median(times) * 1e3:10.1f} us")
    print(f"  {'total (eager)':<34} {median_ms(clock, lambda: layer(hidden, logits), args.repeats) * 1e3:10.1f} us")
    if args.compile:
        compiled = torch.compile(layer, fullgraph=True)
        compiled(hidden, logits)
        print(f"  {'total (torch.compile)':<34} "
              f"{median_ms(clock, lambda: compiled(hidden, logits), args.repeats) * 1e3:10.1f} us")


if __name__ == "__main__":
    main()
