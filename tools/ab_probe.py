"""A/B of tools/probe_gemm.py cells across source trees, on one card in one run (Hopper GPU machine).

Each tree is a whole checkout (its own package, kernels and probe), so a change on either side of
the Python/kernel boundary is compared as it would ship. Every (tree, cell) kernel is compiled
first, in parallel processes (`--build-only`, into the shared kernel cache: keys differ where the
sources do); then each round times every cell in every tree, the trees' order reversed on odd
rounds (A B, B A, ...), so a drift of the card's clocks over the run falls on both sides.

    git worktree add /tmp/base <commit>
    python3 tools/ab_probe.py --tree base=/tmp/base --tree new=. \\
        --cell "gpt-oss-120b gate_up 64 --weights mxfp4" --cell "gpt-oss-120b gate_up 64 --weights mxfp4 --stages 8"

Every tree's probe must take the cells' options: a tree from before 8f8de3e (no --build-only) fails
the parallel compile, and its kernels then compile inside the first timed run of each cell.
Prints one line per timing as it comes, then a table: per cell and tree, each round's median us.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

MEDIAN = re.compile(r"median ([0-9.]+) us")


def probe(tree: Path, cell: str, *extra: str, timeout: float) -> str:
    """One run of the tree's own probe; its output line, or what went wrong."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    command = [sys.executable, str(tree / "tools" / "probe_gemm.py"), *shlex.split(cell), *extra]
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        return f"failed ({done.returncode}): {(done.stderr.strip().splitlines() or [''])[-1]}"
    return (done.stdout.strip().splitlines() or ["no output"])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH", help="a checkout to time")
    parser.add_argument("--cell", action="append", required=True, help="probe_gemm.py's arguments, quoted")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="parallel compiles")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per probe run")
    args = parser.parse_args()
    trees = {}
    for item in args.tree:
        name, _, path = item.partition("=")
        if not name or name in trees or not path or not (Path(path) / "tools" / "probe_gemm.py").is_file():
            parser.error(f"--tree: expected NAME=PATH of a checkout, each NAME once; got {item!r}")
        trees[name] = Path(path).resolve()

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        builds = {(name, cell): pool.submit(probe, tree, cell, "--build-only", timeout=4 * args.timeout)
                  for name, tree in trees.items() for cell in args.cell}
        for (name, cell), future in builds.items():
            print(f"build {name}: {cell}: {future.result()}", flush=True)

    times: dict[tuple[str, str], list[str]] = {}
    for r in range(args.rounds):
        order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
        for cell in args.cell:
            for name, tree in order:
                line = probe(tree, cell, timeout=args.timeout)
                print(f"round {r} {name}: {line}", flush=True)
                found = MEDIAN.search(line)
                times.setdefault((name, cell), []).append(found.group(1) if found else "-")

    print("\n| cell | " + " | ".join(f"{name} us" for name in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for cell in args.cell:
        print(f"| {cell} | " + " | ".join(" / ".join(times[name, cell]) for name in trees) + " |")


if __name__ == "__main__":
    main()
