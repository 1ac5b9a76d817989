"""Time one grouped-GEMM cell on the wgmma kernel launched directly, built from the kernel sources
of your choice: the A/B probe behind the "probe" rows of docs/PERFORMANCE.md (Hopper GPU machine).

The weights are drawn once and copied six times; launch i reads copy i % 6, so no launch finds
its weights in L2 (50 MB) from the launch before. CUDA events around 30 launches back to back
(the launch gap included, as in a graph of decode steps), median of 7 such rounds, after 20
launches of each copy. For an A/B, time the same cell from a checkout of the base
commit's kernels and from the working tree, on the same card, in one session:

    git worktree add /tmp/base <commit>
    python3 tools/probe_gemm.py gpt-oss-120b gate_up 64 --weights mxfp4 --kernels /tmp/base/kernels
    python3 tools/probe_gemm.py gpt-oss-120b gate_up 64 --weights mxfp4
    python3 tools/probe_gemm.py deepseek-v3-ep8 gate_up 1 --stages 9
    python3 tools/probe_gemm.py deepseek-v3-ep8 gate_up 1 --splits 2   # K over a cluster of 2 CTAs
    python3 tools/probe_gemm.py deepseek-v3-ep8 layer 1     # the fused layer kernel

Both trees are compiled from this checkout's instantiation source, so the kernel templates'
parameters must be the same in both. gpt-oss cells run gpt-oss's epilogue (bias; clamped SwiGLU on
[up; gate] halves for gate_up). "layer" times the fused layer kernel (gate_up, SwiGLU, the
intermediate's quantization and down in one launch; MXFP8 models). The chain it replaces is three
launches with host work between them: compare the two in tools/bench_layer.py (CUDA graphs).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import indptr, routed_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import MODELS  # noqa: E402

from mxfp8_moe import quantize_activations, quantize_weights, quantize_weights_mxfp4  # noqa: E402
from mxfp8_moe.epilogue import GPT_OSS_ALPHA, GPT_OSS_LIMIT  # noqa: E402
from mxfp8_moe.gemm.device import current_stream, device_info  # noqa: E402
from mxfp8_moe.gemm.heuristics import WGMMA_MAX_STAGES, fit_wgmma_stages, layer_spec, wgmma_spec  # noqa: E402
from mxfp8_moe.gemm.layer import get_layer_kernel  # noqa: E402
from mxfp8_moe.gemm.launch import get_kernel  # noqa: E402
from mxfp8_moe.arith import ceil_div  # noqa: E402
from mxfp8_moe.gemm.spec import STAGE_K_BYTES, EpilogueArguments, Variant  # noqa: E402
from mxfp8_moe.jit import build  # noqa: E402

COPIES = 6
LAUNCHES = 30
REPEATS = 7
WARMUP_ROUNDS = 20


def probe(model: str, gemm: str, tokens: int, weights: str, k_granularity: int, *, stages: int | None,
          splits: int | None, block_t: int | None, ctas_per_sm: int, build_only: bool) -> str:
    torch.manual_seed(0)
    experts, hidden, intermediate, top_k = MODELS[model]
    gated = gemm == "gate_up"
    n, k = (2 * intermediate, hidden) if gated else (hidden, intermediate)
    gpt_oss = model.startswith("gpt-oss")
    variant = Variant("e2m1" if weights == "mxfp4" else "e4m3", "clamped_swiglu" if gpt_oss and gated else "swiglu",
                      False, gpt_oss)
    # The routing draws from the CPU generator and the data from the GPU's, so choosing (and, with
    # `build_only`, compiling) the kernel before any data is drawn leaves both sequences as they were.
    rows = routed_rows(tokens, experts, top_k)
    device = device_info(0)
    active = sum(r > 0 for r in rows)
    chosen = wgmma_spec(device, experts, active, sum(rows) / active, n, k, k_granularity, gated, variant,
                        split_k=False)
    if splits is not None and ceil_div(k, STAGE_K_BYTES) % splits:
        raise SystemExit(f"--splits {splits} does not divide the {ceil_div(k, STAGE_K_BYTES)} K blocks")
    try:
        spec = dataclasses.replace(chosen, splits=splits or chosen.splits, block_t=block_t or chosen.block_t,
                                   ctas_per_sm=ctas_per_sm)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if spec != chosen or stages is not None:  # the most stages up to the request (or the default) that fit
        spec = fit_wgmma_stages(device, experts, spec, stages or WGMMA_MAX_STAGES)
    kernel = get_kernel(spec, 0)
    if build_only:
        return f"{model} {gemm} T={tokens} {weights}: {spec.label} built"

    w = torch.randn(experts, n, k, device="cuda") * 0.05
    b, b_scale = quantize_weights_mxfp4(w) if weights == "mxfp4" else quantize_weights(w, k_granularity)
    del w
    m_indptr = indptr(rows, "cuda")
    a, a_scale = quantize_activations(torch.randn(sum(rows), k, device="cuda"), m_indptr, k_granularity)
    out = torch.empty(sum(rows), n // 2 if gated else n, dtype=torch.bfloat16, device="cuda")
    epilogue = (EpilogueArguments(torch.randn(experts, n, device="cuda"), GPT_OSS_ALPHA, GPT_OSS_LIMIT),) if gpt_oss else ()
    calls = [lambda copy=b.clone(): kernel(a, copy, a_scale, b_scale, m_indptr, out, current_stream(0), *epilogue)
             for _ in range(COPIES)]
    return f"{model} {gemm} T={tokens} {weights}: {spec.label} median {median_us(calls):.1f} us"


def probe_layer(model: str, tokens: int, k_granularity: int, *, build_only: bool) -> str:
    torch.manual_seed(0)
    experts, hidden, intermediate, top_k = MODELS[model]
    rows = routed_rows(tokens, experts, top_k)  # the CPU generator, as in probe()
    spec = layer_spec(device_info(0), experts, sum(rows), hidden, intermediate, k_granularity)
    if spec is None:
        raise SystemExit(f"the fused layer kernel does not serve {model} at T = {tokens} here")
    kernel = get_layer_kernel(spec, 0)
    if build_only:
        return f"{model} layer T={tokens}: {spec.label} built"

    w13, w13_scale = quantize_weights(torch.randn(experts, 2 * intermediate, hidden, device="cuda") * 0.05,
                                      k_granularity)
    w2, w2_scale = quantize_weights(torch.randn(experts, hidden, intermediate, device="cuda") * 0.05, k_granularity)
    m_indptr = indptr(rows, "cuda")
    a, a_scale = quantize_activations(torch.randn(sum(rows), hidden, device="cuda"), m_indptr, k_granularity)
    h = torch.empty(sum(rows), intermediate, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(sum(rows), hidden, dtype=torch.bfloat16, device="cuda")
    copies = [(w13.clone(), w2.clone()) for _ in range(COPIES)]
    fused = [lambda c=c: kernel(a, a_scale, m_indptr, c[0], w13_scale, c[1], w2_scale, h, out, current_stream(0))
             for c in copies]
    return f"{model} layer T={tokens}: {spec.label} median {median_us(fused):.1f} us"


def median_us(calls) -> float:
    """Time per call of LAUNCHES calls back to back, rotating over the weight copies: the median of
    REPEATS rounds, after WARMUP_ROUNDS calls of each copy (clocks up: a single launch after an idle
    host gap ran at idle clocks, ~9 us over Nsight Compute's duration at one token)."""
    for _ in range(WARMUP_ROUNDS):
        for call in calls:
            call()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(LAUNCHES):
            calls[i % COPIES]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAUNCHES)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("gemm", choices=["gate_up", "down", "layer"])
    parser.add_argument("tokens", type=int)
    parser.add_argument("--weights", choices=["mxfp8", "mxfp4"], default="mxfp8")
    parser.add_argument("--k-granularity", type=int, choices=[32, 128], default=None,
                        help="default: 32 for MXFP4 weights, else 128")
    parser.add_argument("--stages", type=int, help="pipeline stages (at most this many that fit)")
    parser.add_argument("--block-t", type=int, choices=[8, 16, 32, 64, 96, 128],
                        help="token tile (default: the heuristic's)")
    parser.add_argument("--ctas-per-sm", type=int, choices=[1, 2], default=1,
                        help="2: two CTAs an SM, each with half the registers and shared memory (decode tiles)")
    parser.add_argument("--build-only", action="store_true",
                        help="compile the kernel into the cache and exit (an A/B driver's parallel prewarm)")
    parser.add_argument("--kernels", type=Path, help="kernel source tree to build from (default: this checkout's)")
    parser.add_argument("--splits", type=int, choices=[1, 2, 4],
                        help="K split over a cluster of this many CTAs (default: unsplit, as the heuristic runs)")
    args = parser.parse_args()
    k_granularity = args.k_granularity or (32 if args.weights == "mxfp4" else 128)
    if args.weights == "mxfp4" and k_granularity != 32:
        parser.error("MXFP4 weights have one scale per 32 values of K")
    if args.kernels is not None:
        kernels = args.kernels.resolve()
        build.kernel_dir = lambda: kernels  # where build() resolves the instantiation's #includes
    if args.gemm == "layer":
        if (args.weights != "mxfp8" or args.stages is not None or args.splits is not None or args.block_t is not None
                or args.ctas_per_sm > 1):
            parser.error("the layer probe runs MXFP8 weights, unsplit, at the heuristic's tiles and pipeline depth")
        print(probe_layer(args.model, args.tokens, k_granularity, build_only=args.build_only), flush=True)
    else:
        print(probe(args.model, args.gemm, args.tokens, args.weights, k_granularity, stages=args.stages,
                    splits=args.splits, block_t=args.block_t, ctas_per_sm=args.ctas_per_sm,
                    build_only=args.build_only), flush=True)


if __name__ == "__main__":
    main()
