"""`mxfp8-moe`: prewarm the kernel cache for a deployment, inspect the cache, describe the
environment, and run the grouped GEMM on an MoE-shaped problem.

Input problems (bad shapes, unreadable configs, unknown archs) exit with status 2 and one message;
a kernel that fails to compile, or a demo result that is off, exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import re
import sys
import time

import torch

from . import demo, envs
from .activation_quant import QuantizerSpec
from .checks import K_GRANULARITIES
from .combine import CombineSpec
from .gemm import native_guard
from .gemm.device import DeviceInfo, device_info
from .gemm.families import SimtSpec
from .gemm.heuristics import (MIN_CAPABILITY, NATIVE_ARCHS, candidate_specs, describe_kernels, listed_in_readme,
                              tensor_core_capable)
from .gemm.spec import KernelSpec
from .jit.build import build, kernel_dir
from .jit.cache import default_cache, default_cache_dir
from .jit.compiler import CompileError, nvrtc_library_path, nvrtc_version, supported_archs
from .jit.runtime import driver_version
from .model_config import GemmShape, MoeConfig
from .mxfp4 import K_GRANULARITY as MXFP4_K_GRANULARITY
from .routing import MAX_EXPERTS as ROUTE_MAX_EXPERTS, MAX_TOP_K as ROUTE_MAX_TOP_K, RouteSpec
from .version import __version__

DEFAULT_EXPERTS = 128
GRANULARITY_CHOICES = {**{str(g): (g,) for g in K_GRANULARITIES}, "both": K_GRANULARITIES}
LOG_LINES = 20  # of a failed compile's NVRTC log


class CliError(Exception):
    """Bad input to a command: reported as one line, exit status 2."""


# --- shapes and targets ---------------------------------------------------------------------------

def _shape_arg(text: str) -> tuple[int, int]:
    try:
        n, k = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,K (two integers), got {text!r}") from None
    return n, k


def _check_shape(shape: GemmShape) -> GemmShape:
    """The rules moe_gemm_mxfp8_nt_groupwise applies to its tensors, stated for a shape."""
    step = 32 if shape.gated else 16  # the output width, N / 2 when gated, must be a multiple of 16
    if shape.n < 1 or shape.n % step:
        why = " (gated: the output width N/2 must be a multiple of 16)" if shape.gated else ""
        raise CliError(f"{shape}: N must be a positive multiple of {step}{why}")
    k_multiple = MXFP4_K_GRANULARITY if shape.variant.weights == "e2m1" else 16
    if shape.k < 1 or shape.k % k_multiple:
        raise CliError(f"{shape}: K must be a positive multiple of {k_multiple}")
    if shape.num_experts < 1:
        raise CliError(f"{shape}: the number of experts must be positive")
    return shape


def _local_gpus() -> dict[str, DeviceInfo]:
    """The first GPU of each arch here."""
    if not torch.cuda.is_available():
        return {}
    gpus: dict[str, DeviceInfo] = {}
    for index in range(torch.cuda.device_count()):
        info = device_info(index)
        gpus.setdefault(info.arch, info)
    return gpus


def _targets(archs: list[str] | None) -> list[DeviceInfo]:
    local = _local_gpus()
    if not archs:
        if not local:
            raise CliError("no CUDA GPU here: pass --arch for the GPU to compile for, e.g. --arch sm_120a")
        return list(local.values())
    targets: dict[str, DeviceInfo] = {}
    for arch in archs:
        if re.fullmatch(r"sm_\d\d+[af]?", arch) is None:
            raise CliError(f"unknown arch {arch!r}: expected sm_XY, e.g. --arch sm_120a")
        info = DeviceInfo.for_arch(arch)
        if info.capability < MIN_CAPABILITY:
            raise CliError("unsupported arch %r: the kernels need sm_%d%d or later" % (arch, *MIN_CAPABILITY))
        if "sm_%d%d" % info.capability not in supported_archs():
            raise CliError("unknown arch %r: NVRTC %d.%d compiles for %s (e.g. --arch sm_120a)"
                           % (arch, *nvrtc_version(), ", ".join(supported_archs())))
        if info.arch != arch:
            print(f"note: --arch {arch} compiles as {info.arch}, the target the kernels are built for")
        if not listed_in_readme(info):
            print(f"note: {info.arch} is not among the GPUs this package lists as supported (README); "
                  f"it would run {describe_kernels(info)}, which was never run on it")
        # A GPU that is here describes itself better than the table (its SM count picks tiles).
        info = local.get(info.arch, info)
        targets.setdefault(info.arch, info)
    return list(targets.values())


def _kernel_specs(device: DeviceInfo, shape: GemmShape, k_granularity: int) -> list[KernelSpec | QuantizerSpec]:
    """What the API can pick for this shape on this device: every tile it may choose, the
    portable kernel it falls back to for misaligned tensors, and the fused quantizer of its input."""
    try:
        specs = candidate_specs(device=device, num_experts=shape.num_experts, n=shape.n, k=shape.k,
                                k_granularity=k_granularity, gated=shape.gated, scale_mode=envs.scale_mode(),
                                variant=shape.variant)
    except ValueError as error:
        raise CliError(f"{shape} on {device.arch}: {error}") from None
    specs.append(SimtSpec(device.arch, shape.n, shape.k, k_granularity, shape.gated, variant=shape.variant))
    if tensor_core_capable(device):
        specs.append(QuantizerSpec(device.arch, shape.k, k_granularity))
    return specs


def _compile(specs: list[KernelSpec | QuantizerSpec | RouteSpec | CombineSpec]) -> bool:
    """Build each spec (anything with an arch, a label and a source) through the cache, a line
    each and a summary; True if all succeeded."""
    compiled = cached = failed = 0
    start = time.perf_counter()
    for spec in specs:
        began = time.perf_counter()
        try:
            _, was_cached = build(spec.source(), arch=spec.arch, label=spec.label)
        except CompileError as error:
            failed += 1
            lines = error.log.splitlines()
            print(f"FAILED   {spec.label} for {spec.arch}; NVRTC says:")
            print("\n".join("    " + line for line in lines[:LOG_LINES]))
            if len(lines) > LOG_LINES:
                print(f"    ... {len(lines) - LOG_LINES} more lines (MXFP8_MOE_DUMP_DIR=dir keeps the whole log)")
            continue
        if was_cached:
            cached += 1
            print(f"cached   {spec.label} for {spec.arch}")
        else:
            compiled += 1
            print(f"compiled {spec.label} for {spec.arch} in {time.perf_counter() - began:.2f} s")
    print(f"{compiled} compiled, {cached} cached, {failed} failed in {time.perf_counter() - start:.2f} s")
    return failed == 0


# --- prewarm --------------------------------------------------------------------------------------

def _requested_shapes(args) -> tuple[list[GemmShape], MoeConfig | None]:
    """The GEMM shapes to compile for, and the model's config where one was given."""
    if args.tp is not None and not args.model_config:
        raise CliError("--tp splits a --model-config's experts across ranks; --shape takes one rank's N,K as they are")
    experts = DEFAULT_EXPERTS if args.num_experts is None else args.num_experts
    shapes = [GemmShape("gemm", n, k, args.gated, experts) for n, k in args.shape or ()]
    config = None
    if args.model_config:
        try:
            config = MoeConfig.load(args.model_config)
            if args.num_experts is not None:  # e.g. the experts of one rank under expert parallelism
                config = dataclasses.replace(config, num_experts=args.num_experts)
            shapes += config.gemm_shapes(1 if args.tp is None else args.tp)
        except (OSError, ValueError) as error:
            raise CliError(str(error)) from None
    if not shapes:
        raise CliError("nothing to compile: give --shape N,K or --model-config PATH")
    return [_check_shape(shape) for shape in shapes], config


def _block_specs(device: DeviceInfo, config: MoeConfig) -> list[RouteSpec | CombineSpec]:
    """The MoE block's routing (router logits in bf16 or float32) and combine kernels for a model
    whose config names its experts per token, where the kernels take its shape."""
    if config.top_k is None:
        return []
    specs: list[RouteSpec | CombineSpec] = []
    if config.num_experts <= ROUTE_MAX_EXPERTS and config.top_k <= min(ROUTE_MAX_TOP_K, config.num_experts):
        specs += [RouteSpec(device.arch, config.num_experts, config.top_k, bf16, config.renormalize)
                  for bf16 in (True, False)]
    if config.hidden_size % 8 == 0:
        specs.append(CombineSpec(device.arch, config.hidden_size, config.top_k))
    return specs


def _prewarm(args) -> int:
    shapes, config = _requested_shapes(args)
    targets = _targets(args.arch)
    granularities = sorted({g for choice in args.k_granularity or ["128"] for g in GRANULARITY_CHOICES[choice]})
    # MXFP4 weights (gpt-oss) have one scale per 32 values, whatever --k-granularity says.
    specs = [spec for device in targets for shape in shapes
             for g in ((MXFP4_K_GRANULARITY,) if shape.variant.weights == "e2m1" else granularities)
             for spec in _kernel_specs(device, shape, g)]
    if envs.scale_mode() == "auto":  # the first native call checks itself against software scaling
        specs += [spec for device in targets if device.arch in NATIVE_ARCHS
                  for mode in ("native", "software") for spec in native_guard.specs(device, mode)]
    if config is not None:  # the block around the GEMMs: its routing and its combine
        specs += [spec for device in targets for spec in _block_specs(device, config)]
    specs = list(dict.fromkeys(specs))
    for shape in shapes:
        print(f"  {shape}")
    cache = default_cache()
    print(f"{len(specs)} kernels for {', '.join(d.arch for d in targets)}, "
          f"k-granularity {' and '.join(map(str, granularities))}, cache: {cache.directory or _storage(cache)}")
    return 0 if _compile(specs) else 1


# --- cache ----------------------------------------------------------------------------------------

def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _storage(cache) -> str:
    if cache.directory is not None:
        return "disk"
    if envs.disable_disk_cache():
        return "memory only (MXFP8_MOE_DISABLE_DISK_CACHE=1): nothing is kept between processes"
    return "memory only (the directory cannot be used safely; see the warning above)"


def _cache(args) -> int:
    cache = default_cache()
    if args.cache_command == "clear":
        print(f"removed {cache.clear()} entries from {default_cache_dir()}")
        return 0
    entries = cache.entries()
    if args.cache_command == "info":
        print(f"directory: {default_cache_dir()}")
        print(f"storage:   {_storage(cache)}")
        print(f"entries:   {len(entries)}")
        print(f"size:      {_size(sum(e.size for e in entries))}")
    else:
        if not entries:
            print(f"no entries in {default_cache_dir()}")
        width = max((len(e.label) for e in entries), default=0)
        now = time.time()
        for entry in sorted(entries, key=lambda e: e.label):
            print(f"{entry.label:<{width}}  {_size(entry.size):>10}  {_age(now - entry.mtime):>4}")
    return 0


# --- env ------------------------------------------------------------------------------------------

def _probe(read) -> str:
    # `env` is what people run when something is broken: report a failing probe, never stop on it.
    try:
        return read()
    except Exception as error:  # noqa: BLE001
        return f"unavailable ({type(error).__name__}: {error})"


def _driver() -> str:
    version = driver_version()
    return "none" if version is None else f"{version // 1000}.{version % 1000 // 10}"


def _nvrtc() -> str:
    return "%d.%d (%s)" % (*nvrtc_version(), nvrtc_library_path() or "library path unknown")


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return ["none" + ("" if torch.version.cuda else " (torch is a CPU-only build)")]
    return [f"cuda:{i} {torch.cuda.get_device_name(i)} ({device_info(i).arch}, {device_info(i).num_sms} SMs)"
            for i in range(torch.cuda.device_count())]


def _env(args) -> int:
    rows = [
        ("mxfp8_moe", __version__),
        ("python", sys.version.split()[0]),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("cuda-bindings", _probe(lambda: importlib.metadata.version("cuda-bindings"))),
        ("driver", _probe(_driver)),
        ("nvrtc", _probe(_nvrtc)),
        ("nvrtc archs", _probe(lambda: " ".join(supported_archs()))),
        *(("gpu", line) for line in _gpus()),
        ("kernel sources", str(kernel_dir())),
        ("cache", str(default_cache_dir()) + (" (disk cache disabled)" if envs.disable_disk_cache() else "")),
        ("scale mode", f"{envs.scale_mode()}: {envs.SCALE_MODES.get(envs.scale_mode(), 'invalid')}"),
        *((name, value if (problem := envs.invalid(name)) is None else f"{value} ({problem})")
          for name, value in envs.in_effect().items()),
    ]
    if not envs.in_effect():
        rows.append((f"{envs.PREFIX}*", "none set"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 1}} {value}")
    return 0


# --- demo -----------------------------------------------------------------------------------------

def _demo(args) -> int:
    n, k = args.shape
    shape = _check_shape(GemmShape("demo", n, k, args.gated, args.num_experts))
    if not 1 <= args.top_k <= shape.num_experts:
        raise CliError(f"--top-k must be in [1, {shape.num_experts}] (the number of experts), got {args.top_k}")
    if args.tokens < 1:
        raise CliError(f"--tokens must be positive, got {args.tokens}")
    return 0 if demo.run(shape, args.tokens, args.top_k, args.k_granularity, args.seed) else 1


# --- command line ---------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxfp8-moe", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--version", action="version", version=f"mxfp8_moe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prewarm = commands.add_parser(
        "prewarm", help="compile the kernels a deployment will use into the cache",
        description="Compile every kernel the API can choose for the given weight shapes, so that no "
                    "request waits for NVRTC. Shapes come from --shape and/or --model-config.")
    prewarm.add_argument("--arch", action="append", metavar="SM",
                         help="target, e.g. sm_120a (repeatable; default: the GPUs here)")
    prewarm.add_argument("--shape", action="append", type=_shape_arg, metavar="N,K",
                         help="N = rows of B per expert (2 * intermediate for gate_up), K = columns (repeatable)")
    prewarm.add_argument("--gated", action="store_true", help="the --shape GEMMs fuse SwiGLU (gate_up)")
    prewarm.add_argument("--k-granularity", action="append", choices=tuple(GRANULARITY_CHOICES),
                         help="elements of K per scale (repeatable; default 128)")
    prewarm.add_argument("--num-experts", type=int, metavar="E",
                         help=f"experts per GEMM, which sizes the scheduler's shared memory (default {DEFAULT_EXPERTS} "
                              "for --shape; overrides the config's count, e.g. for one rank under expert parallelism)")
    prewarm.add_argument("--model-config", metavar="PATH",
                         help="a Hugging Face config.json of an MoE model: compiles its gate_up and down GEMMs")
    prewarm.add_argument("--tp", type=int, help="tensor-parallel ranks splitting the experts' intermediate "
                                                "dimension (with --model-config only; default 1)")
    prewarm.set_defaults(run=_prewarm)

    cache = commands.add_parser("cache", help="inspect or clear the kernel cache",
                                description=f"The cache directory is {envs.PREFIX}CACHE_DIR or the per-user cache.")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    cache_commands.add_parser("info", help="directory, number of entries, total size")
    cache_commands.add_parser("list", help="one line per entry: label, size, age")
    cache_commands.add_parser("clear", help="remove every entry")
    cache.set_defaults(run=_cache)

    env = commands.add_parser(
        "env", help="versions, driver, NVRTC, GPUs, cache and settings in effect",
        description="Print what this package runs with: its version, Python, torch, cuda-bindings, the driver, "
                    "NVRTC and the archs it compiles for, the GPUs, the kernel sources, the cache directory, the "
                    f"scale mode and every {envs.PREFIX}* variable set (with what is wrong with it, if anything). "
                    "Paste it into bug reports.")
    env.set_defaults(run=_env)

    demo_command = commands.add_parser(
        "demo", help="run the grouped GEMM on an MoE problem and check it against a float64 reference",
        description="Default problem: Qwen3-30B-A3B's gate_up GEMM (128 experts, top-8, hidden 2048, "
                    "moe_intermediate 768). Without a GPU: runs the reference backend and compiles the "
                    f"{demo.ARCH} kernel the call would run, and reports the error MXFP8 adds to the "
                    "unquantized product.")
    demo_command.add_argument("--tokens", type=int, default=64, help="tokens before routing (default 64)")
    demo_command.add_argument("--top-k", type=int, default=8, help="experts per token (default 8)")
    demo_command.add_argument("--num-experts", type=int, default=DEFAULT_EXPERTS, help="default %(default)s")
    demo_command.add_argument("--shape", type=_shape_arg, default=(1536, 2048), metavar="N,K", help="default 1536,2048")
    demo_command.add_argument("--gated", action=argparse.BooleanOptionalAction, default=True,
                      help="fuse SwiGLU (default: gated)")
    demo_command.add_argument("--k-granularity", type=int, choices=(32, 128), default=128, help="default 128")
    demo_command.add_argument("--seed", type=int, default=0, help="seed of the random tokens, weights and routing "
                                                          "(default 0)")
    demo_command.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as error:
        print(f"mxfp8-moe {args.command}: error: {error}", file=sys.stderr)
        return 2
