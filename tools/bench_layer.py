"""Benchmark the whole MoE layer at decode sizes, router logits in and hidden states out: the layer
with its expert GEMMs fused into one launch (route, gather + quantize, fused, combine; sm_90a,
MXFP8 models), the chain of launches (route, gather + quantize, gate_up, quantize, down, combine),
each of the chain's stages alone, and a bf16 torch block, beside the sum of the two GEMMs' HBM
floors.

Method as tools/bench_moe.py: per cell, 6 routings (router logits drawn afresh) rotate inside one
CUDA graph so the routed experts' weights come from HBM, not L2; time = median replay / 6, best of
two rounds in alternating order. A stage is timed on the real outputs of the stage before it. The
floor counts the routed experts' weights and scales (8 bits a weight for MXFP8, 4 for gpt-oss's
MXFP4, plus its biases), the MXFP8 rows into each GEMM and the bf16 rows out, over the copy
bandwidth measured in the same run. The bf16 block is routing, torch._grouped_mm twice and the
combine (for gpt-oss without its biases and clamp: the same GEMM shapes). Before timing, each cell
checks its first routing: the fused layer against the chain, and the chain against the bf16 block
where that block runs the same weights (check_cell).

    python tools/bench_layer.py --out layer.json          # also layer.md
    python tools/bench_layer.py --models gpt-oss-120b --tokens 1 64
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import GPT_OSS_PREFIX, gpt_oss_checkpoint, relative_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import MODELS, ROUTINGS, copy_bandwidth, time_in_rounds, write_results  # noqa: E402

from mxfp8_moe.gpt_oss import GptOssMoE  # noqa: E402
from mxfp8_moe.moe_layer import QuantizedExperts, combine, moe_forward, route  # noqa: E402
from mxfp8_moe.ops import grouped_gemm, grouped_gemm_mxfp4, quantize_activations_op  # noqa: E402

TOKENS = [1, 2, 4, 8, 16, 32, 64]
STAGES = ["route", "quantize_x", "gate_up", "quantize_h", "down", "combine"]


@dataclasses.dataclass
class Layer:
    """One model's MoE layer on this package's ops, and the bf16 weights the torch block runs."""

    top_k: int
    k_granularity: int
    weight_bits: float  # per weight, scales included
    bias_bytes_per_expert: int
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the chain of launches
    fused: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # the expert GEMMs in one launch
    gate_up: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (a, a_scale, m_indptr) -> h
    down: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    w13_t: torch.Tensor  # (E, H, 2 I) bf16 view, [up; gate] columns
    w2_t: torch.Tensor  # (E, I, H) bf16 view
    bf16_is_reference: bool  # the torch block's weights are the ones quantized (not gpt-oss's stand-ins)


def mxfp8_layer(experts: int, hidden: int, inter: int, top_k: int, k_granularity: int = 128) -> Layer:
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.05
    q13, q2 = QuantizedExperts.quantize(w13, k_granularity), QuantizedExperts.quantize(w2, k_granularity)
    return Layer(
        top_k, k_granularity, 8 + 8 / k_granularity, 0,
        lambda x, logits: moe_forward(x, logits, q13, q2, top_k, experts="chain"),
        # The fused layer kernel is sm_90a's.
        (lambda x, logits: moe_forward(x, logits, q13, q2, top_k, experts="fused"))
        if torch.cuda.get_device_capability() == (9, 0) else None,
        lambda a, s, m: grouped_gemm(a, q13.b, s, q13.b_scale, m, k_granularity, is_gated=True),
        lambda a, s, m: grouped_gemm(a, q2.b, s, q2.b_scale, m, k_granularity),
        w13.transpose(1, 2), w2.transpose(1, 2), True)


def gpt_oss_layer(experts: int, hidden: int, inter: int, top_k: int) -> Layer:
    tensors = gpt_oss_checkpoint(experts, hidden, inter, "cuda")
    block = GptOssMoE.from_checkpoint(tensors, GPT_OSS_PREFIX, top_k=top_k)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.05
    return Layer(
        top_k, 32, 4 + 8 / 32, 4 * (2 * inter + hidden), block, None,
        lambda a, s, m: grouped_gemm_mxfp4(a, block.gate_up_b, s, block.gate_up_b_scale, m, block.gate_up_bias,
                                           True, "clamped_swiglu", block.alpha, block.limit),
        lambda a, s, m: grouped_gemm_mxfp4(a, block.down_b, s, block.down_b_scale, m, block.down_bias),
        w13.transpose(1, 2), w2.transpose(1, 2), False)


def torch_bf16_block(layer: Layer, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    routing = route(logits, layer.top_k)
    offs = routing.m_indptr[1:]
    up, gate = torch._grouped_mm(x[routing.token], layer.w13_t, offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm((up * F.silu(gate)).contiguous(), layer.w2_t, offs=offs)
    return combine(y, routing, x.shape[0])


def stage_calls(layer: Layer, x: torch.Tensor, logits: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The chain's launches one by one, each a closure over the outputs of the one before (run once here)."""
    routing = route(logits, layer.top_k)
    a, a_scale = quantize_activations_op(x, routing.m_indptr, layer.k_granularity, routing.token)
    h = layer.gate_up(a, a_scale, routing.m_indptr)
    ah, ah_scale = quantize_activations_op(h, routing.m_indptr, layer.k_granularity)
    y = layer.down(ah, ah_scale, routing.m_indptr)
    kg, m = layer.k_granularity, routing.m_indptr
    return {
        "route": lambda: route(logits, layer.top_k),
        "quantize_x": lambda: quantize_activations_op(x, m, kg, routing.token),
        "gate_up": lambda: layer.gate_up(a, a_scale, m),
        "quantize_h": lambda: quantize_activations_op(h, m, kg),
        "down": lambda: layer.down(ah, ah_scale, m),
        "combine": lambda: combine(y, routing, x.shape[0]),
    }


def gemm_floor_bytes(layer: Layer, hidden: int, inter: int, routed: torch.Tensor) -> float:
    """Bytes the layer's two GEMMs must move at least, for one routing ((T, top_k) expert ids)."""
    active, rows = routed.unique().numel(), routed.numel()
    weights = active * (3 * hidden * inter * layer.weight_bits / 8 + layer.bias_bytes_per_expert)
    tokens_in = rows * (hidden + inter) * (1 + 1 / layer.k_granularity)  # MXFP8 rows and their scales
    rows_out = rows * (inter + hidden) * 2  # bf16
    return weights + tokens_in + rows_out


def check_cell(model: str, tokens: int, layer: Layer, x: torch.Tensor, logits: torch.Tensor) -> None:
    """What is timed computes the layer: the fused layer within 1 % of the chain (the mma.sync
    layer's summation order; the wgmma one has the chain's bits where the chain does not split K),
    and the chain within 8 % of the bf16 block on the weights it quantized (MXFP8's rounding of
    weights, tokens and the intermediate: tests/test_moe_layer.py's bound). Exits naming the cell
    otherwise."""
    chain = layer.forward(x, logits)
    errors = {"fused vs chain": (relative_error(layer.fused(x, logits), chain), 0.01)} if layer.fused else {}
    if layer.bf16_is_reference:
        errors["chain vs bf16 block"] = (relative_error(chain, torch_bf16_block(layer, x, logits)), 0.08)
    bad = {name: error for name, (error, limit) in errors.items() if not error <= limit}
    if bad:
        raise SystemExit(f"{model} T={tokens}: relative error {bad} over its limit")


def bench_cell(model: str, layer: Layer, hidden: int, inter: int, experts: int, tokens: int,
               bandwidth: float) -> dict:
    torch.manual_seed(zlib.crc32(f"layer {model} {tokens}".encode()))
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    logits = [torch.randn(tokens, experts, device="cuda") for _ in range(ROUTINGS)]
    check_cell(model, tokens, layer, x, logits[0])
    floors = [gemm_floor_bytes(layer, hidden, inter, lg.topk(layer.top_k, dim=1).indices) / bandwidth
              for lg in logits]
    stages = [stage_calls(layer, x, lg) for lg in logits]
    impls = {"chain_us": [lambda lg=lg: layer.forward(x, lg) for lg in logits],
             **({"fused_us": [lambda lg=lg: layer.fused(x, lg) for lg in logits]} if layer.fused else {}),
             "torch_bf16_us": [lambda lg=lg: torch_bf16_block(layer, x, lg) for lg in logits]}
    impls.update({f"{name}_us": [calls[name] for calls in stages] for name in STAGES})
    row = {"model": model, "tokens": tokens, "floor_us": statistics.mean(floors) * 1e6}
    row.update({name: seconds * 1e6 for name, seconds in time_in_rounds(impls).items() if seconds is not None})
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| model | T | GEMM floors us | fused us (x floor, x chain) | chain us (x floor) | torch bf16 us | "
            + " | ".join(f"{s} us" for s in STAGES) + " | sum of stages us |\n"
            + "|---" * (7 + len(STAGES)) + "|\n")
    lines = []
    for r in rows:
        stages = [r.get(f"{s}_us") for s in STAGES]
        us = lambda t: f"{t:.1f}" if t else "-"  # noqa: E731
        fused = r.get("fused_us")
        fused = f"{fused:.1f} ({fused / r['floor_us']:.2f}x, {r['chain_us'] / fused:.2f}x faster)" if fused else "-"
        lines.append(f"| {r['model']} | {r['tokens']} | {r['floor_us']:.1f} | {fused} | {r['chain_us']:.1f} "
                     f"({r['chain_us'] / r['floor_us']:.2f}x) | {us(r.get('torch_bf16_us'))} | "
                     + " | ".join(us(t) for t in stages) + f" | {sum(t for t in stages if t):.1f} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--out", type=Path, default=Path("layer.json"))
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for model in args.models:
        experts, hidden, inter, top_k = MODELS[model]
        torch.manual_seed(zlib.crc32(f"layer weights {model}".encode()))
        make = gpt_oss_layer if model.startswith("gpt-oss") else mxfp8_layer
        layer = make(experts, hidden, inter, top_k)
        for tokens in args.tokens:
            row = bench_cell(model, layer, hidden, inter, experts, tokens, bandwidth)
            rows.append(row)
            print(f"{model} T={tokens}: floor {row['floor_us']:.1f} us, fused {row.get('fused_us')}, "
                  f"chain {row['chain_us']:.1f} us, "
                  f"torch bf16 {row.get('torch_bf16_us')}", flush=True)
        del layer
        torch.cuda.empty_cache()
    write_results(args.out, {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "rows": rows},
                  markdown(rows))


if __name__ == "__main__":
    main()
