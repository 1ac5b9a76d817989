"""Which kernels' machine code a change of kernels/ alters: the SASS of the kernels the heuristics
pick for the model shapes, compiled from the kernel sources of a git revision and from the working
tree, compared instruction by instruction (addresses and encodings aside). No GPU needed.

A refactor that leaves every kernel's SASS unchanged cannot change a result or a timing;
where a kernel differs, the GPU tests and a benchmark A/B decide. Both trees compile the working
tree's instantiation source, so the templates' interface must be the same in both.

    python tools/sass_diff.py --base HEAD~3 [--arch sm_90a --arch sm_120a] [--jobs 2]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mxfp8_moe.gemm.device import DeviceInfo
from mxfp8_moe.gemm.heuristics import choose_spec
from mxfp8_moe.gemm.spec import KernelSpec
from mxfp8_moe.jit import inspect
from mxfp8_moe.jit.build import OPTIONS, kernel_dir
from mxfp8_moe.jit.compiler import compile_cubin

REPO = Path(__file__).resolve().parents[1]
# (N, K, gated, experts): the benchmark's model GEMMs (tools/bench_moe.py).
SHAPES = ((1536, 2048, True, 128), (2048, 768, False, 128), (3072, 4096, True, 128), (4096, 1536, False, 128),
          (4096, 7168, True, 32), (7168, 2048, False, 32), (5760, 2880, True, 128), (2880, 2880, False, 128))
TOKENS = (1, 16, 256, 4096)
_ADDRESS = re.compile(r"/\*[0-9a-f]{4,}\*/")


def specs(archs: list[str]) -> list[KernelSpec]:
    """The kernels the heuristics pick for the model shapes at decode to prefill sizes, both
    granularities, with and without the wgmma kernel (scales TMA cannot read)."""
    chosen: dict[KernelSpec, None] = {}
    for arch in archs:
        for n, k, gated, experts in SHAPES:
            for k_granularity in (32, 128):
                for tokens in TOKENS:
                    for allow_wgmma in (True, False):
                        chosen[choose_spec(device=DeviceInfo.for_arch(arch), num_experts=experts,
                                           cum_m=tokens * 8, n=n, k=k, k_granularity=k_granularity, gated=gated,
                                           scale_mode="auto", allow_wgmma=allow_wgmma)] = None
    return list(chosen)


def instructions(spec: KernelSpec, include_dir: Path) -> list[str]:
    result = compile_cubin(spec.source(), arch=spec.arch, include_dir=include_dir, options=OPTIONS, label=spec.label)
    return [_ADDRESS.sub("", line).split(";")[0].strip()
            for line in inspect.sass(result.cubin).splitlines() if _ADDRESS.search(line)]


def kernels_at(revision: str, into: Path) -> Path:
    """The kernel sources of a git revision, unpacked under `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision, "kernels"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "kernels"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose kernels/ is the baseline")
    parser.add_argument("--arch", action="append", help="target, repeatable (default: sm_90a and sm_120a)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)

    chosen = specs(args.arch or ["sm_90a", "sm_120a"])
    with tempfile.TemporaryDirectory(prefix="sass_diff_") as tmp:
        base = kernels_at(args.base, Path(tmp))

        def compare(spec: KernelSpec) -> tuple[KernelSpec, int, int, bool]:
            old, new = instructions(spec, base), instructions(spec, kernel_dir())
            return spec, len(old), len(new), old == new

        differ = 0
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for spec, old, new, same in pool.map(compare, chosen):
                differ += not same
                print(f"{'same' if same else 'DIFF'}  {spec.arch}  {spec.label}  ({old} -> {new} instructions)",
                      flush=True)
    print(f"{len(chosen)} kernels, {differ} with other SASS than {args.base}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
