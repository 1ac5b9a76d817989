"""Compile every default kernel configuration and report its resources and tensor-core SASS.

    PYTHONPATH=. python tools/kernel_report.py [--arch sm_120a ...] [--shape N,K[,gated] ...]

For each arch and weight shape, both k granularities, the configurations are those prewarm builds
(heuristics.candidate_specs). No GPU needed. Rows that spill (or use a stack frame) or whose static
+ dynamic shared memory exceeds the arch's per-block limit are flagged, and the exit status is 1 if
any row is flagged or fails to compile.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from mxfp8_moe.gemm.device import DeviceInfo
from mxfp8_moe.gemm.heuristics import candidate_specs
from mxfp8_moe.gemm.spec import KernelSpec
from mxfp8_moe.jit.build import OPTIONS, kernel_dir
from mxfp8_moe.jit.compiler import CompileError, compile_cubin
from mxfp8_moe.jit.inspect import ToolNotFound, count_instructions, resource_usage, sass

# (N, K, gated): MoE expert shapes of current models (gated = fused up/gate projection).
DEFAULT_SHAPES = ((1536, 2048, True), (2048, 768, False), (3072, 4096, True), (4096, 1536, False),
                  (4096, 7168, True), (7168, 2048, False), (5760, 2880, True), (2880, 2880, False))
DEFAULT_ARCHS = ("sm_120a", "sm_90a")
K_GRANULARITIES = (32, 128)
OPCODES = ("QMMA.SF", "QMMA", "QGMMA", "HMMA", "LDL", "STL")

COLUMNS = (("label", "<"), ("arch", "<"), ("regs", ">"), ("spill st/ld", ">"), ("stack", ">"),
           ("smem", ">"), ("dyn smem", ">"), ("QMMA.SF", ">"), ("QMMA", ">"), ("QGMMA", ">"), ("HMMA", ">"),
           ("LDL/STL", ">"), ("time s", ">"), ("flags", "<"))


def parse_shape(text: str) -> tuple[int, int, bool]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected N,K or N,K,gated; got {text!r}")
    try:
        n, k = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"N and K must be integers; got {text!r}") from None
    gated = len(parts) == 3 and parts[2].strip().lower() in ("gated", "1", "true", "yes")
    if len(parts) == 3 and not gated and parts[2].strip().lower() not in ("", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"third field must be 'gated' (or 0/1); got {text!r}")
    return n, k, gated


def default_specs(archs, shapes, num_experts: int) -> list[KernelSpec]:
    specs: dict[KernelSpec, None] = {}  # ordered set: shapes may share a configuration
    for arch in archs:
        device = DeviceInfo.for_arch(arch)
        for n, k, gated in shapes:
            for k_granularity in K_GRANULARITIES:
                specs.update(dict.fromkeys(candidate_specs(device=device, num_experts=num_experts, n=n, k=k,
                                                           k_granularity=k_granularity, gated=gated)))
    return list(specs)


def inspect_spec(spec: KernelSpec, num_experts: int) -> dict:
    row = {"label": spec.label, "arch": spec.arch}
    try:
        result = compile_cubin(spec.source(), arch=spec.arch, include_dir=kernel_dir(), options=OPTIONS,
                               label=spec.label)
    except CompileError as error:
        return {**row, "flags": "COMPILE ERROR", "error": error.log}
    usage = resource_usage(result.log)
    dynamic = spec.dynamic_shared_bytes(num_experts)
    flags = []
    if usage["spill_stores"] or usage["spill_loads"] or usage["stack_frame"]:
        flags.append("SPILL")
    limit = DeviceInfo.for_arch(spec.arch).shared_memory_limit
    if usage["static_shared"] + dynamic > limit:
        flags.append(f"SMEM>{limit}")
    row.update({
        "regs": usage["registers"], "spill st/ld": f"{usage['spill_stores']}/{usage['spill_loads']}",
        "stack": usage["stack_frame"], "smem": usage["static_shared"], "dyn smem": dynamic,
        "time s": f"{result.seconds:.2f}", "flags": " ".join(flags),
    })
    try:
        counts = count_instructions(sass(result.cubin), OPCODES)
        row.update({op: counts[op] for op in ("QMMA.SF", "QMMA", "QGMMA", "HMMA")})
        row["LDL/STL"] = f"{counts['LDL']}/{counts['STL']}"
    except ToolNotFound:
        pass  # resources are still worth reporting; SASS columns show "-"
    return row


def print_table(rows) -> None:
    cells = [[str(row.get(name, "-")) for name, _ in COLUMNS] for row in rows]
    widths = [max(len(name), *(len(c[i]) for c in cells)) for i, (name, _) in enumerate(COLUMNS)]
    print("  ".join(f"{name:{align}{w}}" for (name, align), w in zip(COLUMNS, widths)).rstrip())
    for c in cells:
        print("  ".join(f"{v:{align}{w}}" for v, (_, align), w in zip(c, COLUMNS, widths)).rstrip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append",
                        help=f"NVRTC target, repeatable (default: {' '.join(DEFAULT_ARCHS)})")
    parser.add_argument("--shape", action="append", type=parse_shape, metavar="N,K[,gated]",
                        help="weight shape, repeatable (default: a set of current MoE shapes)")
    parser.add_argument("--experts", type=int, default=128, help="num_experts for the heuristics and dynamic smem")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiles (NVRTC and the disassembler run outside the GIL); "
                             "1 gives uncontended compile times")
    args = parser.parse_args(argv)

    specs = default_specs(args.arch or DEFAULT_ARCHS, args.shape or DEFAULT_SHAPES, args.experts)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda spec: inspect_spec(spec, args.experts), specs))
    print_table(rows)

    flagged = [row for row in rows if row["flags"]]
    total = sum(float(row.get("time s", 0)) for row in rows)
    print(f"\n{len(rows)} configurations, {total:.1f} s of compiling, {len(flagged)} flagged")
    for row in flagged:
        if "error" in row:
            print(f"\n{row['label']} ({row['arch']}):\n{row['error']}", file=sys.stderr)
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
