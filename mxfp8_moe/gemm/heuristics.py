"""Which kernel specialization runs a problem, decided from shapes alone (never from m_indptr's
values, which would need a device-to-host sync).

Decode-sized MoE GEMMs are memory-bound: the time is the active experts' weight bytes over the
bandwidth the CTAs can pull. Two regimes follow from the expected number of work units:
- many units (at least one per SM): wide tiles and a 4-deep pipeline (2-3 CTAs per SM on H100's
  227 KB of shared memory, one on SM120's 99 KB);
- few units (few active experts, e.g. one token): narrow N tiles so more SMs stream weights, extra
  warps splitting K so each CTA keeps enough copies in flight, and deep pipelines.
A problem no tile configuration fits (e.g. thousands of experts) runs on the portable kernel.
The token tile covers an expert's expected rows plus two standard deviations of random routing
(Poisson), so most experts need one tile and their weights are read once.

On sm_90a the wgmma kernel (FP8 at a rate mma.sync cannot reach on Hopper, TMA loads) runs every
problem it supports: with TMA scale loads, the promotion overlap and TMA stores it beat mma.sync
in every model cell from one token up (measured per cell on the H100: docs/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import math

from ..arith import ceil_div
from .device import DeviceInfo
from .families import MmaSpec, SimtSpec, WgmmaSpec
from .layer import LAYER_MAX_ROWS, LAYER_MAX_STAGES, LayerSpec, MmaLayerSpec
from .spec import DEFAULT_VARIANT, SCALE_MODES, STAGE_K_BYTES, KernelSpec, Variant, scheduler_shared_bytes

TOKEN_TILES = (8, 16, 32, 64)
MANY_UNITS_STAGES = 4
MAX_STAGES = 16  # few-units regime
FEW_UNITS_WARPS = 8
NATIVE_ARCHS = ("sm_120a", "sm_121a")
WGMMA_ARCHS = ("sm_90a",)
WGMMA_TOKEN_TILES = (32, 64, 96, 128)
# The kernel also builds tiles of 8 and 16 tokens (wgmma m64n8 / m64n16): at decode an expert holds
# a few rows, and a 32-token tile's promotion scales 32 columns where they hold 1-8. At 8 tokens the
# consumers' k32 group is 49 instructions a warp instead of 77 (MXFP4) and 19 instead of 47 (MXFP8
# k_gran 32) in the gpt-oss gate_up SASS; their consumers fit in 104 registers, so two CTAs can
# share an SM (WgmmaSpec.ctas_per_sm). Neither is chosen here until a GPU run has timed them: the
# build and GPU tests cover them, and tools/probe_gemm.py --block-t / --ctas-per-sm runs them.
WGMMA_DECODE_TOKEN_TILES = (8, 16)
# MXFP4 weights: at 128 tokens the consumers' A fragments beside 192 registers of accumulators and
# partials make ptxas spill (WgmmaGemm's static_assert).
WGMMA_MXFP4_TOKEN_TILES = (32, 64, 96)
WGMMA_MAX_STAGES = 5
# K splits the wgmma kernel may run a unit in (its cluster size), largest first: when a call's
# units are fewer than the SMs (one token on a few experts), splitting K puts more SMs to streaming
# the weights. Only as many as keep every split's CTA on its own SM at once: clusters must each fit
# in one GPC, and on the H100 only 30 clusters of 4 are resident (cuOccupancyMaxActiveClusters;
# 66 of 2), so 32 units split in 4 ran in two rounds (PERFORMANCE.md, session 7).
WGMMA_SPLITS = (4, 2)
WGMMA_RESIDENT_CLUSTER_SMS = {2: 1.0, 4: 120 / 132}  # the SMs' share clusters of that size can fill
WGMMA_SPLIT_MAX_TOKEN_TILE = 64
# Each split keeps at least this many K blocks: DeepSeek's down at one token (16 K blocks) split
# in 2 took 14.5 us against 12.7 (Nsight Compute, H100): the cluster barriers and the reduction
# cost more than 8 K blocks of streaming saves.
WGMMA_SPLIT_MIN_K_BLOCKS = 16
# MXFP4 weights on the wgmma kernel (issue 14). Widened in shared memory it was, on the H100
# (gpt-oss-120b), 1.06-2.39x the mma.sync kernel at T = 1, 4 and from 256 up, 0.5-11 % slower at
# T = 16 and 64 (docs/PERFORMANCE.md, "W4A8"); widened in registers (session 11) it took 10 % off
# the T = 64 gate_up cell, the one re-timed (770 -> 690 us). The GPU tests pass with it on (H100).
WGMMA_TAKES_MXFP4 = True
# Decode units split over K in clusters (issue 15), within the two rules above: DeepSeek-V3 EP8's
# gate_up at one token (32 units) in 2 took 19.7 us against 23.9 in the layer benchmark (H100,
# PERFORMANCE.md, session 7); no other measured cell splits.
WGMMA_SPLITS_K = True
# path "auto" of experts.expert_gemms takes the fused layer kernel (issue 15). Off: on H100 the
# fused layer runs at 0.95-1.06x the chain's speed (Qwen3-30B/235B, DeepSeek EP8, T 1-16;
# PERFORMANCE.md, session 6): faster in one cell of nine, within 1 % in three, 2-5 % slower in five.
FUSED_LAYER = False
# The fused layer's consumers have 224 registers (its producer warpgroup, which quantizes tokens,
# keeps 56): at 128-token tiles they spill (8-16 B, tests/test_layer_kernel_builds.py).
LAYER_MAX_TOKEN_TILE = 64
# The mma.sync fused layer's widest token tile without spills (tests/test_layer_kernel_builds.py):
# natively 64 against gate_up's 64-column tiles (k_gran 32) and 32 against its 128-column ones
# (k_gran 128: 64 spill 24 B on sm_120a); in the software and emulated scale modes (the emulated
# one is how it runs on sm_90a), whose MMAs need more registers, 8.
MMA_LAYER_NATIVE_MAX_TOKEN_TILE = {32: 64, 128: 32}
MMA_LAYER_NOT_NATIVE_MAX_TOKEN_TILE = 8
# Cost of a token tile beside the columns it multiplies, in token columns: a fixed part (its
# epilogue, its weight tile's trip from L2 or HBM) and, per row of its token box, the copy of that
# row (the box is the whole tile even where the expert's rows end; copied, not multiplied: 1/8).
# Fitted on H100 (docs/PERFORMANCE.md, v6): 32 +- 6 rows per expert run 7-14 % faster in 64-row
# tiles than in 32-row ones, which needs an overhead above 54.
WGMMA_TILE_OVERHEAD = 64
WGMMA_BOX_ROW_COST = 1 / 8
# The k granularity at which the wgmma kernel multiplies an expert's last tile only as wide as its
# rows (kernels/wgmma_grouped_gemm.cuh: multiply_narrowest).
WGMMA_NARROW_LAST_TILE_K_GRANULARITY = 32
# Standard-normal quantiles at probabilities 0.1, 0.3, 0.5, 0.7, 0.9: an expert's rows under
# random routing, Poisson(mean) ~ mean + z sqrt(mean).
_ROUTING_QUANTILES = (-1.2816, -0.5244, 0.0, 0.5244, 1.2816)
# Shared memory of a block beside its dynamic part: the 1 KB the hardware reserves for each resident
# block, and a bound on the kernels' static shared memory (the scheduler's scan keeps one int per
# warp: 64 B at 16 warps), so two few-units CTAs really fit on one SM.
HARDWARE_RESERVED_SHARED = 1024
STATIC_SHARED_BOUND = 128
_PER_BLOCK_RESERVE = HARDWARE_RESERVED_SHARED + STATIC_SHARED_BOUND


MIN_CAPABILITY = (7, 5)  # the oldest GPUs the portable kernel is built for
# The GPUs of the README's table ("Supported GPUs and what was verified where"): below sm_89 the
# portable kernel, then Ada, Hopper and the Blackwell workstation parts. Others (sm_100a, sm_103a,
# sm_110a) run what their capability allows; no kernel here was tuned or run on them.
LISTED_CAPABILITIES = ((8, 9), (9, 0), (12, 0), (12, 1))


def listed_in_readme(device: DeviceInfo) -> bool:
    return MIN_CAPABILITY <= device.capability < (8, 9) or device.capability in LISTED_CAPABILITIES


def describe_kernels(device: DeviceInfo) -> str:
    """What calls on this GPU run, in a phrase (for the CLI)."""
    if device.arch in WGMMA_ARCHS:
        return "the wgmma kernel (mma.sync for scales TMA cannot read), software scales"
    if device.arch in NATIVE_ARCHS:
        return "the mma.sync kernel with the block-scaled MMA (native scales, checked at first use)"
    if tensor_core_capable(device):
        return "the mma.sync kernel, software scales"
    return "the portable CUDA-core kernel"


def resolve_scale_mode(requested: str, arch: str) -> str:
    """'auto' -> native on sm_120a / sm_121a, software elsewhere; explicit modes are checked."""
    if requested == "auto":
        return "native" if arch in NATIVE_ARCHS else "software"
    if requested == "native" and arch not in NATIVE_ARCHS:
        raise ValueError(f"MXFP8_MOE_SCALE_MODE=native needs sm_120a or sm_121a; this GPU is {arch}")
    if requested not in SCALE_MODES:
        raise ValueError(f"MXFP8_MOE_SCALE_MODE must be auto, native, software or emulated; got {requested!r}")
    return requested


def tensor_core_capable(device: DeviceInfo) -> bool:
    """FP8 mma.sync exists from sm_89 on."""
    return device.capability >= (8, 9)


def choose_spec(*, device: DeviceInfo, num_experts: int, cum_m: int, n: int, k: int, k_granularity: int,
                gated: bool, scale_mode: str, aligned: bool = True, allow_wgmma: bool = True,
                variant: Variant = DEFAULT_VARIANT) -> KernelSpec:
    """The kernel for a call shape. `aligned`: a, b and out allow 16-byte vectors (else the SIMT
    kernel); `allow_wgmma`: the scales are laid out as the wgmma kernel's TMA reads them; `variant`:
    weight format and epilogue (interleaved gate and up rows run on mma.sync, whose tiles gather
    rows one by one; so do MXFP4 weights while WGMMA_TAKES_MXFP4 is off)."""
    portable = SimtSpec(device.arch, n, k, k_granularity, gated, variant=variant)
    if not (tensor_core_capable(device) and aligned):
        return portable
    allow_wgmma = allow_wgmma and not variant.interleaved and (variant.weights == "e4m3" or WGMMA_TAKES_MXFP4)

    active_experts = max(1, min(num_experts, cum_m))
    rows = cum_m / active_experts
    mode = resolve_scale_mode(scale_mode, device.arch)
    # (The emulated mode exists to run the sm_12x mma.sync scale path here: it keeps mma.sync.)
    if allow_wgmma and device.arch in WGMMA_ARCHS and mode == "software":
        spec = wgmma_spec(device, num_experts, active_experts, rows, n, k, k_granularity, gated, variant)
        if spec is not None:
            return spec
    block_t = mma_token_tile(rows)
    token_tiles = active_experts * math.ceil(rows / block_t)

    # Gated tiles carry up and gate rows: half the output columns for the same weight bytes.
    n_out = n // 2 if gated else n
    block_n = 64 if gated else 128
    warps_n, warps_k = 4, 1
    few_units = token_tiles * ceil_div(n_out, block_n) < device.num_sms
    if few_units:
        while block_n > 32 and token_tiles * ceil_div(n_out, block_n) < device.num_sms:
            block_n //= 2
        # A narrow tile has few column warps; K warps restore the copy-issuing parallelism.
        warps_n = min(4, block_n // 16)
        warps_k = min(4, FEW_UNITS_WARPS // warps_n)

    spec = MmaSpec(device.arch, n, k, k_granularity, gated, block_n=block_n, block_t=block_t, stages=1,
                   warps_n=warps_n, warps_k=warps_k, scale_mode=mode, variant=variant)
    # Few units: let two CTAs share an SM and give each as deep a pipeline as fits.
    budget = (device.shared_memory_limit // 2 if few_units else device.shared_memory_limit) - _PER_BLOCK_RESERVE
    budget -= spec.dynamic_shared_bytes(num_experts) - spec.pipeline_bytes()
    # The epilogue reuses the pipeline's memory: fewer K warps when their partial sums don't fit.
    while spec.warps_k > 1 and spec.epilogue_bytes() > budget:
        spec = dataclasses.replace(spec, warps_k=spec.warps_k // 2)
    stages = min(MAX_STAGES if few_units else MANY_UNITS_STAGES, budget // spec.pipeline_bytes())
    stages = max(stages, ceil_div(spec.epilogue_bytes(), spec.pipeline_bytes()))
    if stages < 2 or stages * spec.pipeline_bytes() > budget:
        return portable
    return dataclasses.replace(spec, stages=stages)


def wgmma_spec(device: DeviceInfo, num_experts: int, active_experts: int, rows: float, n: int, k: int,
               k_granularity: int, gated: bool, variant: Variant = DEFAULT_VARIANT, *,
               split_k: bool = WGMMA_SPLITS_K) -> WgmmaSpec | None:
    """The wgmma kernel with as many pipeline stages as fit (None if two do not); with `split_k`,
    its K split over a cluster when the expected units leave SMs idle, every cluster is resident
    at once and each rank keeps WGMMA_SPLIT_MIN_K_BLOCKS, on decode tiles only (at wider ones rank
    0's slots crowd out the pipeline, and a split kernel's consumers, 224 registers, spill at 128
    tokens)."""
    if (n // 2 if gated else n) % (64 if gated else 16):
        return None  # gated tiles pair 64 up rows with 64 gate rows
    block_t = wgmma_token_tile(rows, narrow_last_tile=k_granularity == WGMMA_NARROW_LAST_TILE_K_GRANULARITY,
                               tiles=WGMMA_MXFP4_TOKEN_TILES if variant.weights == "e2m1" else WGMMA_TOKEN_TILES)
    unsplit = WgmmaSpec(device.arch, n, k, k_granularity, gated, block_t=block_t, stages=1, variant=variant)
    units = active_experts * math.ceil(rows / block_t) * ceil_div(unsplit.n_out, unsplit.block_n)
    k_blocks = ceil_div(k, STAGE_K_BYTES)
    # MXFP4 weights split over K have not run on a GPU: they stay whole.
    splittable = split_k and block_t <= WGMMA_SPLIT_MAX_TOKEN_TILE and variant.weights == "e4m3"
    splits = [s for s in WGMMA_SPLITS if splittable and k_blocks % s == 0 and k_blocks // s >= WGMMA_SPLIT_MIN_K_BLOCKS
              and units * s <= device.num_sms * WGMMA_RESIDENT_CLUSTER_SMS[s]]
    for spec in [dataclasses.replace(unsplit, splits=s) for s in splits] + [unsplit]:
        fitted = fit_wgmma_stages(device, num_experts, spec)
        if fitted is not None:
            return fitted
    return None


def fit_wgmma_stages(device: DeviceInfo, num_experts: int, spec: WgmmaSpec,
                     max_stages: int = WGMMA_MAX_STAGES) -> WgmmaSpec | None:
    """`spec` with as many pipeline stages as fit beside its other shared memory (in its share of
    the per-block limit, when CTAs share an SM), up to `max_stages` (None if two do not)."""
    budget = (device.shared_memory_limit // spec.ctas_per_sm - _PER_BLOCK_RESERVE
              - (spec.dynamic_shared_bytes(num_experts) - spec.pipeline_bytes()))
    stages = min(max_stages, budget // spec.stage_bytes())
    return dataclasses.replace(spec, stages=stages) if stages >= 2 else None


def layer_spec(device: DeviceInfo, num_experts: int, cum_m: int, hidden: int, inter: int, k_granularity: int,
               scale_mode: str = "software") -> LayerSpec | MmaLayerSpec | None:
    """The fused layer kernel (gemm/layer.py) for a batch of `cum_m` expert rows, or None where the
    chain of launches serves it (above LAYER_MAX_ROWS, or shapes the kernel does not take): on
    sm_90a the wgmma one (the emulated scale mode asks for the mma.sync one, to test it there), on
    sm_120a / sm_121a the mma.sync one in `scale_mode` (native or software, as the GEMM's plan
    resolved it)."""
    if not 0 < cum_m <= LAYER_MAX_ROWS or inter % 64 or hidden % 16:
        return None
    if device.arch in NATIVE_ARCHS or (device.arch in WGMMA_ARCHS and scale_mode == "emulated"):
        return mma_layer_spec(device, num_experts, cum_m, hidden, inter, k_granularity, scale_mode)
    if device.arch not in WGMMA_ARCHS:
        return None
    active_experts = max(1, min(num_experts, cum_m))
    rows = cum_m / active_experts
    specs = [wgmma_spec(device, num_experts, active_experts, rows, n, k, k_granularity, gated, split_k=False)
             for n, k, gated in ((2 * inter, hidden, True), (hidden, inter, False))]
    if None in specs:
        return None
    spec = LayerSpec(device.arch, hidden, inter, k_granularity, min(specs[0].block_t, LAYER_MAX_TOKEN_TILE), 1)
    budget = device.shared_memory_limit - _PER_BLOCK_RESERVE - spec.fixed_shared_bytes(num_experts)
    stages = min(LAYER_MAX_STAGES, budget // spec.stage_bytes())
    return dataclasses.replace(spec, stages=stages) if stages >= 2 else None


def mma_layer_spec(device: DeviceInfo, num_experts: int, cum_m: int, hidden: int, inter: int, k_granularity: int,
                   scale_mode: str) -> MmaLayerSpec | None:
    """The mma.sync fused layer: four column warps, the plain kernel's token tile, gate_up tiles of
    max(64, k_granularity) columns (whole scale blocks for its epilogue's quantization), down tiles
    of 128, each phase's pipeline as deep as fits beside the scheduler."""
    active_experts = max(1, min(num_experts, cum_m))
    rows = cum_m / active_experts
    block_t = mma_token_tile(rows)
    block_t = min(block_t, MMA_LAYER_NATIVE_MAX_TOKEN_TILE[k_granularity] if scale_mode == "native"
                  else MMA_LAYER_NOT_NATIVE_MAX_TOKEN_TILE)
    phases = [MmaSpec(device.arch, n, k, k_granularity, gated, block_n=block_n, block_t=block_t, stages=1,
                      scale_mode=scale_mode)
              for n, k, gated, block_n in ((2 * inter, hidden, True, max(64, k_granularity)), (hidden, inter, False, 128))]
    budget = device.shared_memory_limit - _PER_BLOCK_RESERVE - scheduler_shared_bytes(num_experts)
    staged = []
    for spec in phases:
        stages = min(MAX_STAGES, budget // spec.stage_bytes())
        if stages < 2 or stages * spec.stage_bytes() < spec.epilogue_bytes():
            return None
        staged.append(dataclasses.replace(spec, stages=stages))
    return MmaLayerSpec(*staged)


def mma_token_tile(rows: float) -> int:
    """The mma.sync kernel's token tile: the narrowest that holds an expert's likely rows (the mean
    and two standard deviations of a random routing's count)."""
    return next((t for t in TOKEN_TILES if t >= rows + 2 * math.sqrt(rows)), TOKEN_TILES[-1])


def wgmma_token_tile(rows: float, narrow_last_tile: bool, tiles: tuple[int, ...] = WGMMA_TOKEN_TILES) -> int:
    """The token tile (of `tiles`) of least cost over an expert's likely row counts: the token columns its
    wgmmas multiply (with `narrow_last_tile`, an expert's last tile of 32 or more only the multiple
    of 32 that covers its rows), the tile's overhead and its token box's copy."""
    samples = [max(1, round(rows + z * math.sqrt(rows))) for z in _ROUTING_QUANTILES]

    def cost(tile: int) -> float:
        total = 0.0
        for r in samples:
            full, rest = divmod(r, tile)
            columns = full * tile + (min(tile, math.ceil(rest / 32) * 32) if narrow_last_tile else tile * (rest > 0))
            tiles = full + (rest > 0)
            total += columns + tiles * (WGMMA_TILE_OVERHEAD + WGMMA_BOX_ROW_COST * tile)
        return total

    return min(tiles, key=cost)


def candidate_specs(*, device: DeviceInfo, num_experts: int, n: int, k: int, k_granularity: int, gated: bool,
                    scale_mode: str = "auto", max_tokens: int = 1 << 16,
                    variant: Variant = DEFAULT_VARIANT) -> list[KernelSpec]:
    """Every specialization choose_spec can pick for this weight shape (what `prewarm` compiles),
    on sm_90a also for scales the wgmma kernel cannot read (K-major: mma.sync)."""
    specs: dict[KernelSpec, None] = {}
    for allow_wgmma in (True, False) if device.arch in WGMMA_ARCHS else (True,):
        cum_m = 1
        while cum_m <= max_tokens:
            specs[choose_spec(device=device, num_experts=num_experts, cum_m=cum_m, n=n, k=k,
                              k_granularity=k_granularity, gated=gated, scale_mode=scale_mode,
                              allow_wgmma=allow_wgmma, variant=variant)] = None
            cum_m = cum_m + 1 if cum_m < 64 else cum_m * 9 // 8  # fine enough to meet every tile boundary
    return list(specs)
