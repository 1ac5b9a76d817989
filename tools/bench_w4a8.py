"""Benchmark the W4A8 grouped GEMM (MXFP4 weights, MXFP8 tokens) on gpt-oss's MoE layers, next to
the MXFP8 op on the same layer and torch's bf16 grouped GEMM.

Method as tools/bench_moe.py (rotated routings in one CUDA graph, best of two rounds in alternating
order); the HBM floor counts 4 bits per weight plus its scales. gate_up runs gpt-oss's epilogue
(its bias and clamped SwiGLU) in both of this package's ops, on [up; gate] halves (the layout a
loader de-interleaves the checkpoint's rows into once, and the one the Hopper wgmma kernel takes);
down its bias. On Hopper two further columns launch each tensor-core kernel with MXFP4 weights
directly, the data behind the heuristic's choice between them: mma.sync, and wgmma (the weights
widened to e4m3 in its consumers' registers; the op's choice there since session 4).

    python tools/bench_w4a8.py --out w4a8.json       # also w4a8.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import indptr, routed_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import ROUTINGS, copy_bandwidth, time_in_rounds, torch_bf16_grouped, write_results  # noqa: E402

from mxfp8_moe import (k_align, m_padded, moe_gemm_mxfp8_mxfp4_nt_groupwise, moe_gemm_mxfp8_nt_groupwise,  # noqa: E402
                       quantize_activations, quantize_weights, quantize_weights_mxfp4)
from mxfp8_moe.gemm.device import current_stream, device_info  # noqa: E402
from mxfp8_moe.gemm.heuristics import WGMMA_ARCHS, choose_spec, wgmma_spec  # noqa: E402
from mxfp8_moe.gemm.launch import get_kernel  # noqa: E402
from mxfp8_moe.gemm.spec import EpilogueArguments, Variant  # noqa: E402
from mxfp8_moe.epilogue import GPT_OSS_ALPHA, GPT_OSS_LIMIT  # noqa: E402

MODELS = {"gpt-oss-120b": 128, "gpt-oss-20b": 32}  # experts; hidden = intermediate = 2880, top-4
HIDDEN, TOP_K = 2880, 4


def bench_cell(model: str, gemm: str, tokens: int, bandwidth: float, peers: bool) -> dict:
    torch.manual_seed(zlib.crc32(f"{model} {gemm} {tokens}".encode()))
    experts = MODELS[model]
    n, k = (2 * HIDDEN, HIDDEN) if gemm == "gate_up" else (HIDDEN, HIDDEN)
    gated = gemm == "gate_up"
    n_out = n // 2 if gated else n
    w = torch.randn(experts, n, k, device="cuda") * 0.05
    mxfp4 = quantize_weights_mxfp4(w)
    mxfp8 = quantize_weights(w, 32)
    bias = torch.randn(experts, n, device="cuda")
    epilogue = dict(is_gated=gated, bias=bias)
    if gated:
        epilogue.update(activation="clamped_swiglu")
    routings = []
    for _ in range(ROUTINGS):
        rows = routed_rows(tokens, experts, TOP_K)
        m_indptr = indptr(rows, "cuda")
        a, a_scale = quantize_activations(torch.randn(sum(rows), k, device="cuda"), m_indptr, 32)
        out = torch.empty(sum(rows), n_out, dtype=torch.bfloat16, device="cuda")
        routings.append((rows, m_indptr, a, a_scale, out))

    active = statistics.mean(sum(r > 0 for r in rows) for rows, *_ in routings)
    cum_m = statistics.mean(sum(rows) for rows, *_ in routings)
    scale_bytes = 4 * k_align(k, 32)
    act_bytes = cum_m * (k + 2 * n_out) + 4 * m_padded(int(cum_m), experts) * k_align(k, 32)
    floor_w4 = (active * n * (k // 2 + scale_bytes) + active * n * 4 + act_bytes) / bandwidth  # + the bias
    floor_w8 = (active * n * (k + scale_bytes) + active * n * 4 + act_bytes) / bandwidth

    def call(op, weights):
        def bind(r):
            _, m_indptr, a, a_scale, out = r
            return lambda: op(a, weights[0], a_scale, weights[1], m_indptr, (1, 1, 32), out=out, **epilogue)
        return [bind(r) for r in routings]

    impls = {"w4a8_us": call(moe_gemm_mxfp8_mxfp4_nt_groupwise, mxfp4), "mxfp8_us": call(moe_gemm_mxfp8_nt_groupwise, mxfp8)}
    device = device_info(0)
    if device.arch in WGMMA_ARCHS:
        variant = Variant("e2m1", "clamped_swiglu" if gated else "swiglu", False, True)
        arguments = EpilogueArguments(bias, GPT_OSS_ALPHA, GPT_OSS_LIMIT)
        specs = {"w4a8_mma_us": choose_spec(device=device, num_experts=experts, cum_m=int(cum_m), n=n, k=k,
                                            k_granularity=32, gated=gated, scale_mode="auto", allow_wgmma=False,
                                            variant=variant),
                 "w4a8_wgmma_us": wgmma_spec(device, experts, round(active), cum_m / active, n, k, 32, gated, variant)}

        def direct(kernel, r):
            _, m_indptr, a, a_scale, out = r
            return lambda: kernel(a, mxfp4[0], a_scale, mxfp4[1], m_indptr, out, current_stream(0), arguments)
        for name, spec in specs.items():
            impls[name] = [direct(get_kernel(spec, 0), r) for r in routings]
    if peers:
        w_bf16 = w.to(torch.bfloat16).transpose(1, 2)
        impls["torch_bf16_grouped_us"] = [torch_bf16_grouped(w_bf16, r) for r in routings]
    row = {"model": model, "gemm": gemm, "n": n, "k": k, "tokens": tokens, "cum_m": cum_m, "active": active,
           "floor_w4_us": floor_w4 * 1e6, "floor_w8_us": floor_w8 * 1e6}
    row.update({name: None if seconds is None else seconds * 1e6 for name, seconds in time_in_rounds(impls).items()})
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | GEMM | T | W4 floor us | W4A8 us (% of floor) | W4A8 mma.sync us | W4A8 wgmma us | MXFP8 op us "
             "| W4A8 speedup | torch bf16 us |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def us(value):
        return "-" if value is None else f"{value:.1f}"

    for r in rows:
        lines.append(f"| {r['model']} | {r['gemm']} {r['n']}x{r['k']} | {r['tokens']} | {r['floor_w4_us']:.1f} | "
                     f"{r['w4a8_us']:.1f} ({100 * r['floor_w4_us'] / r['w4a8_us']:.0f}%) | {us(r.get('w4a8_mma_us'))} | "
                     f"{us(r.get('w4a8_wgmma_us'))} | "
                     f"{r['mxfp8_us']:.1f} | {r['mxfp8_us'] / r['w4a8_us']:.2f}x | {us(r.get('torch_bf16_grouped_us'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--gemms", nargs="+", default=["gate_up", "down"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--no-peers", action="store_true", help="time only this package")
    parser.add_argument("--out", type=Path, default=Path("w4a8.json"))
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    rows = []
    for model in args.models:
        for gemm in args.gemms:
            for tokens in args.tokens:
                rows.append(bench_cell(model, gemm, tokens, bandwidth, not args.no_peers))
                print(rows[-1], flush=True)
    write_results(args.out, {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "rows": rows},
                  markdown(rows))


if __name__ == "__main__":
    main()
