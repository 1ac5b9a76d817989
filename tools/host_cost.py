"""Host time of one moe_gemm_mxfp8_nt_groupwise call (no sync) on a decode-sized problem, and where
it goes (cProfile), with the kernel already compiled and loaded.

    python tools/host_cost.py [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import make_problem  # noqa: E402

from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise  # noqa: E402


def decode_call():
    """Qwen3-30B-A3B gate_up, one token routed to 8 of 128 experts, with a preallocated out."""
    problem = make_problem([1] * 8 + [0] * 120, 1536, 2048, gated=True)
    out = torch.empty(8, 768, dtype=torch.bfloat16, device="cuda")
    return lambda: moe_gemm_mxfp8_nt_groupwise(*problem.args, out=out, is_gated=True)


def host_cost(call, calls: int = 200, repeats: int = 5) -> float:
    """Best-of-`repeats` mean seconds per call, synchronizing only between batches."""
    for _ in range(100):
        call()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
        torch.cuda.synchronize()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="also print the top functions by own time")
    args = parser.parse_args()
    call = decode_call()
    print(f"host cost per call: {host_cost(call) * 1e6:.1f} us")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [call() for _ in range(2000)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
