"""Benchmark the grouped GEMM on MoE problems from real models, next to torch's grouped GEMMs.

Method (docs/PERFORMANCE.md): per cell, 6 random top-k routings are rotated inside one CUDA graph
so the active experts' weights come from HBM, not L2; time = median of the graph's replays / 6,
the best of two rounds that time the implementations in alternating order.
The HBM floor is the bytes the call must move (active experts' weights and scales, A and its
scales, out) over the device-to-device copy bandwidth measured in the same run; the roofline is
the larger of that and the FLOPs over the FP8 tensor-core peak measured in the same run (cuBLAS
FP8 GEMM, 8192^3).
On sm_90a both tensor-core kernels (mma.sync and wgmma) are timed on every cell, whichever the
heuristic picks.

    python tools/bench_moe.py --tokens 1 16 64 256 --out bench.json   # also bench.md, bench.png
    python tools/bench_moe.py --replot results/bench-h100-v3.json          # redraw a saved result
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import indptr, routed_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepgemm_peer import deepgemm_calls, unsupported  # noqa: E402
from host_cost import decode_call, host_cost  # noqa: E402

from mxfp8_moe import k_align, m_padded, moe_gemm_mxfp8_nt_groupwise, quantize_activations, quantize_weights  # noqa: E402
from mxfp8_moe.gemm.device import device_info  # noqa: E402
from mxfp8_moe.gemm.heuristics import WGMMA_ARCHS, choose_spec, wgmma_spec  # noqa: E402
from mxfp8_moe.gemm.launch import get_kernel  # noqa: E402

MODELS = {  # name: (experts, hidden, moe_intermediate, top_k)
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "qwen3-235b-a22b": (128, 4096, 1536, 8),
    "deepseek-v3-ep8": (32, 7168, 2048, 1),
    "gpt-oss-120b": (128, 2880, 2880, 4),
}
ROUTINGS = 6
REPLAYS = 20
MEASUREMENT_ROUNDS = 2
PEERS = ("torch_", "deepgemm_")  # other libraries' columns: one that cannot run a cell is reported, not fatal


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def fp8_peak() -> float:
    """FLOP/s of torch's FP8 GEMM (cuBLAS, wgmma on Hopper) on an 8192^3 problem of random data."""
    size = 8192
    a = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    seconds = graph_time([lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)] * 4)
    return 2 * size**3 / seconds


def graph_time(calls) -> float:
    """Median seconds per call of `calls` (a list of closures) captured in one CUDA graph."""
    for call in calls:
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / len(calls)


def time_in_rounds(impls: dict[str, list]) -> dict[str, float | None]:
    """Seconds per call of each implementation (a list of per-routing closures): the best of
    MEASUREMENT_ROUNDS graph timings, taken in alternating order, because the first graph timed
    in a cell runs measurably slower. A peer that cannot run the cell gets None."""
    times: dict[str, float | None] = {}
    order = list(impls)
    for round_index in range(MEASUREMENT_ROUNDS):
        for name in order if round_index % 2 == 0 else reversed(order):
            if name in times and times[name] is None:
                continue
            try:
                seconds = graph_time(impls[name])
            except Exception as error:  # noqa: BLE001 - a peer that cannot run this cell is reported, not fatal
                if not name.startswith(PEERS):
                    raise
                times[name] = None
                print(f"  {name} failed: {str(error).splitlines()[0][:120]}", flush=True)
                continue
            times[name] = min(seconds, times.get(name) or seconds)
    return times


def torch_bf16_grouped(w_t: torch.Tensor, routing):
    """torch's bf16 grouped GEMM on random bf16 tokens of a routing's shape; w_t (E, K, N)."""
    _, m_indptr, a, _, _ = routing
    a16 = torch.randn(a.shape, device="cuda", dtype=torch.bfloat16)
    offs = m_indptr[1:].contiguous()
    return lambda: torch._grouped_mm(a16, w_t, offs=offs)


def direct(kernel, b, b_scale, routing):
    """A call of one kernel specialization, bypassing the heuristic (the stream is read at call time,
    so that a graph capture records it)."""
    _, m_indptr, a, a_scale, out = routing
    return lambda: kernel(a, b, a_scale, b_scale, m_indptr, out, torch.cuda.current_stream().cuda_stream)


def bench_cell(model, gemm, tokens, k_granularity, bandwidth, peak, peers):
    # Each cell draws its weights and routings from a seed of its own: any run, with any subset of
    # cells, times the same problems, so times compare across runs and not only percents of floor.
    torch.manual_seed(zlib.crc32(f"{model} {gemm} {tokens} {k_granularity}".encode()))
    experts, hidden, inter, top_k = MODELS[model]
    n, k = (2 * inter, hidden) if gemm == "gate_up" else (hidden, inter)
    gated = gemm == "gate_up"
    n_out = n // 2 if gated else n
    w = torch.randn(experts, n, k, device="cuda") * 0.05
    b, b_scale = quantize_weights(w, k_granularity)
    routings = []
    for _ in range(ROUTINGS):
        rows = routed_rows(tokens, experts, top_k)
        m_indptr = indptr(rows, "cuda")
        cum_m = sum(rows)
        a, a_scale = quantize_activations(torch.randn(cum_m, k, device="cuda"), m_indptr, k_granularity)
        routings.append((rows, m_indptr, a, a_scale, torch.empty(cum_m, n_out, dtype=torch.bfloat16, device="cuda")))

    active = statistics.mean(sum(r > 0 for r in rows) for rows, *_ in routings)
    cum_m = statistics.mean(sum(rows) for rows, *_ in routings)
    weight_bytes = active * n * (k + 4 * k_align(k, k_granularity))
    act_bytes = cum_m * (k + 2 * n_out) + 4 * m_padded(int(cum_m), experts) * k_align(k, k_granularity)
    floor = (weight_bytes + act_bytes) / bandwidth
    flops = 2 * cum_m * n * k
    device = device_info(0)
    spec = choose_spec(device=device, num_experts=experts, cum_m=int(cum_m), n=n, k=k,
                       k_granularity=k_granularity, gated=gated, scale_mode="auto")
    row = {"model": model, "gemm": gemm, "n": n, "k": k, "tokens": tokens, "cum_m": cum_m, "active": active,
           "k_granularity": k_granularity, "floor_us": floor * 1e6, "roofline_us": max(floor, flops / peak) * 1e6,
           "kernel": spec.label}

    def ours(r):
        _, m_indptr, a, a_scale, out = r
        return lambda: moe_gemm_mxfp8_nt_groupwise(a, b, a_scale, b_scale, m_indptr, (1, 1, k_granularity),
                                                   out=out, is_gated=gated)

    impls = {"mxfp8_moe_us": [ours(r) for r in routings]}
    # Both tensor-core kernels on every cell where both exist: the data behind the kernel choice;
    # and the wgmma kernel split over K where wgmma_spec would split it (off in the heuristic:
    # not yet measured faster).
    if device.arch in WGMMA_ARCHS:
        active = min(experts, cum_m)
        wgmma = {split_k: wgmma_spec(device, experts, active, cum_m / active, n, k, k_granularity, gated,
                                     split_k=split_k) for split_k in (False, True)}
        kernels = {"mma_sync_us": choose_spec(device=device, num_experts=experts, cum_m=int(cum_m), n=n, k=k,
                                              k_granularity=k_granularity, gated=gated, scale_mode="auto",
                                              allow_wgmma=False),
                   "wgmma_us": wgmma[False],
                   "wgmma_split_k_us": wgmma[True] if wgmma[True] is not None and wgmma[True].splits > 1 else None}
        for name, kernel_spec in kernels.items():
            if kernel_spec is not None:
                impls[name] = [direct(get_kernel(kernel_spec, 0), b, b_scale, r) for r in routings]
    if peers:
        # torch's FP8 grouped GEMM with one scale per row / column: same bytes, coarser scales.
        b_t = b.transpose(1, 2)
        scale_b = torch.rand(experts, n, device="cuda") + 0.5
        b_bf16 = w.to(torch.bfloat16).transpose(1, 2)

        def torch_fp8(r):
            _, m_indptr, a, _, _ = r
            scale_a = torch.rand(a.shape[0], device="cuda") + 0.5
            offs = m_indptr[1:].contiguous()
            return lambda: torch._scaled_grouped_mm(a, b_t, scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16)

        impls["torch_fp8_rowwise_us"] = [torch_fp8(r) for r in routings]
        impls["torch_bf16_grouped_us"] = [torch_bf16_grouped(b_bf16, r) for r in routings]
        why_not = unsupported(n, k)
        if why_not is None:
            try:  # its JIT compile and its check against the dequantized product run here
                impls["deepgemm_us"] = deepgemm_calls(w, [rows for rows, *_ in routings])
            except Exception as error:  # noqa: BLE001 - reported, as a peer's failure in time_in_rounds
                why_not = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        if why_not is not None:
            print(f"  no DeepGEMM column: {why_not}", flush=True)
    row.update({name: seconds * 1e6 for name, seconds in time_in_rounds(impls).items() if seconds is not None})
    row["tflops"] = flops / row["mxfp8_moe_us"] / 1e6
    return row


def write_results(out: Path, result: dict, table: str) -> None:
    """The run's JSON at `out`, its markdown table beside it (.md) and on stdout."""
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table)
    print(table)


def plot(result: dict, path: Path) -> None:
    """Percent of the roofline against T, one line per GEMM shape and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    shapes = list(dict.fromkeys((r["model"], r["gemm"]) for r in rows))
    impls = {"mxfp8_moe_us": ("mxfp8_moe", "-"), "torch_fp8_rowwise_us": ("torch FP8 rowwise", ":")}
    fig, ax = plt.subplots(figsize=(10, 6))
    for i, shape in enumerate(shapes):
        cells = sorted((r for r in rows if (r["model"], r["gemm"]) == shape), key=lambda r: r["tokens"])
        for key, (name, style) in impls.items():
            points = [(r["tokens"], 100 * r.get("roofline_us", r["floor_us"]) / r[key]) for r in cells if r.get(key)]
            if points:
                ax.plot(*zip(*points), style, marker="o", color=f"C{i}",
                        label=f"{shape[0]} {shape[1]} ({name})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("% of roofline: HBM floor or FP8 peak (higher is better)")
    ax.set_title(f"MXFP8 MoE grouped GEMM, {result['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows) -> str:
    """Percentages are of the roofline: the HBM floor, or FLOPs over the FP8 peak where larger."""
    head = ("| model | GEMM (N x K) | T | kg | active | floor us | roofline us | mxfp8_moe us (% roofline) | TFLOPS "
            "| mma.sync us | wgmma us | wgmma split K us | torch FP8 rowwise us (% roofline) | torch bf16 us "
            "| DeepGEMM us (% roofline) | speedup vs torch FP8 |\n" + "|---" * 16 + "|\n")
    lines = []
    for r in rows:
        fp8 = r.get("torch_fp8_rowwise_us")
        roofline = r.get("roofline_us", r["floor_us"])
        pct = lambda t: f"{t:.1f} ({100 * roofline / t:.0f}%)" if t else "-"  # noqa: E731
        us = lambda t: f"{t:.1f}" if t else "-"  # noqa: E731
        speedup = f"{fp8 / r['mxfp8_moe_us']:.2f}x" if fp8 else "-"
        lines.append(f"| {r['model']} | {r['gemm']} {r['n']}x{r['k']} | {r['tokens']} | {r['k_granularity']} "
                     f"| {r['active']:.0f} | {r['floor_us']:.1f} | {roofline:.1f} | {pct(r['mxfp8_moe_us'])} "
                     f"| {r.get('tflops', 0):.0f} | {us(r.get('mma_sync_us'))} | {us(r.get('wgmma_us'))} "
                     f"| {us(r.get('wgmma_split_k_us'))} | {pct(fp8)} "
                     f"| {us(r.get('torch_bf16_grouped_us'))} | {pct(r.get('deepgemm_us'))} | {speedup} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--gemms", nargs="+", default=["gate_up", "down"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--k-granularity", nargs="+", type=int, default=[128])
    parser.add_argument("--no-peers", action="store_true", help="time only this package")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only draw the PNG of a saved result (no GPU)")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return

    bandwidth = copy_bandwidth()
    peak = fp8_peak()
    host = host_cost(decode_call())
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, FP8 peak "
          f"{peak / 1e12:.0f} TFLOPS, host cost per call {host * 1e6:.1f} us", flush=True)
    rows = []
    for model in args.models:
        for gemm in args.gemms:
            for kg in args.k_granularity:
                for tokens in args.tokens:
                    row = bench_cell(model, gemm, tokens, kg, bandwidth, peak, not args.no_peers)
                    rows.append(row)
                    print(f"{model} {gemm} T={tokens} kg={kg}: roofline {row['roofline_us']:.1f} us, "
                          f"mxfp8_moe {row['mxfp8_moe_us']:.1f} us ({row['kernel']}), "
                          f"mma.sync {row.get('mma_sync_us')}, wgmma {row.get('wgmma_us')}, "
                          f"wgmma split K {row.get('wgmma_split_k_us')}, "
                          f"torch fp8 {row.get('torch_fp8_rowwise_us')}, DeepGEMM {row.get('deepgemm_us')}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "fp8_peak_flops": peak,
              "host_cost_s": host, "rows": rows}
    write_results(args.out, result, markdown(rows))
    try:
        plot(result, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
