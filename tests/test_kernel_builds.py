"""Every default kernel configuration of a representative subset builds cleanly with NVRTC (CPU only).

Checked without a GPU: compile success, ptxas' resource report (no spills or stack on SM12x, shared
memory within the per-block limit) and the SASS (the block-scaled QMMA.SF is really emitted on
sm_120a, and only in native mode; the Hopper prefill kernel really runs on QGMMA, wgmma's FP8
form). tools/kernel_report.py prints the same data for all shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest

from mxfp8_moe.gemm.device import DeviceInfo
from mxfp8_moe.gemm.heuristics import (WGMMA_DECODE_TOKEN_TILES, candidate_specs, choose_spec, fit_wgmma_stages,
                                       wgmma_spec)
from mxfp8_moe.gemm.families import SimtSpec
from mxfp8_moe.gemm.spec import DEFAULT_VARIANT, KernelSpec, Variant
from mxfp8_moe.jit import inspect
from mxfp8_moe.jit.build import OPTIONS, kernel_dir
from mxfp8_moe.jit.compiler import CompileError, compile_cubin, supported_archs
from mxfp8_moe.jit.runtime import arch_name

NUM_EXPERTS = 128
SM12X = ("sm_120a", "sm_121a")
# A gated shape with K a multiple of the 128-byte stage, and an ungated one whose K (2880) ends in
# a partial stage, so the k-step tail is compiled too.
SHAPES = ((4096, 7168, True), (2880, 2880, False))
# The benchmark's other model GEMMs (Qwen3-30B/235B, DeepSeek-V3 down, gpt-oss gate_up), built for
# sm_120a too: register allocation differs from shape to shape (some of these once spilled there).
SM120_MODEL_SHAPES = ((1536, 2048, True), (2048, 768, False), (3072, 4096, True), (4096, 1536, False),
                      (7168, 2048, False), (5760, 2880, True))
SASS_OPCODES = ("QMMA.SF", "QMMA", "HMMA", "LDL", "STL")
MXFP4 = Variant("e2m1")
GPT_OSS_GATE_UP = Variant("e2m1", "clamped_swiglu", interleaved=True, bias=True)
GPT_OSS_GATE_UP_HALVES = Variant("e2m1", "clamped_swiglu", bias=True)  # as the loader reorders the rows
GPT_OSS_DOWN = Variant("e2m1", bias=True)


def _candidates(arch: str, n: int, k: int, gated: bool, k_granularity: int, scale_mode: str = "auto", *,
                variant: Variant = DEFAULT_VARIANT):
    return candidate_specs(device=DeviceInfo.for_arch(arch), num_experts=NUM_EXPERTS, n=n, k=k,
                           k_granularity=k_granularity, gated=gated, scale_mode=scale_mode, variant=variant)


def _largest(specs):
    """The candidate with the most accumulators per thread: the one most likely to spill."""
    return max(specs, key=lambda s: (s.block_t * s.block_n * (2 if s.gated else 1), s.stages))


def _specs() -> list[KernelSpec]:
    specs: dict[KernelSpec, None] = {}
    for n, k, gated in SHAPES + SM120_MODEL_SHAPES:
        for k_granularity in (32, 128):
            specs.update(dict.fromkeys(_candidates("sm_120a", n, k, gated, k_granularity)))
    # Software scales on SM120 (the fallback mode) for the ungated shape.
    for k_granularity in (32, 128):
        specs.update(dict.fromkeys(_candidates("sm_120a", *SHAPES[1], k_granularity, scale_mode="software")))
    for arch in ("sm_121a", "sm_89"):
        specs[_largest(_candidates(arch, *SHAPES[0], 32))] = None
    # sm_90a runs mma.sync with software scales for K-major scales (no TMA for them), and with
    # emulated ones, which the H100 GPU tests run: keep both building.
    specs[choose_spec(device=DeviceInfo.for_arch("sm_90a"), num_experts=NUM_EXPERTS, cum_m=64, n=1536, k=2048,
                      k_granularity=32, gated=True, scale_mode="software", allow_wgmma=False)] = None
    specs[_largest(_candidates("sm_90a", *SHAPES[1], 128, scale_mode="emulated"))] = None
    # Every wgmma configuration the heuristic picks for these shapes on sm_90a.
    for n, k, gated in SHAPES:
        for k_granularity in (32, 128):
            specs.update(dict.fromkeys(s for s in _candidates("sm_90a", n, k, gated, k_granularity)
                                       if s.family == "wgmma"))
    # Short K, where ptxas' register allocation has gone wrong for some chain plans: Qwen3-30B-A3B's
    # down GEMM (6 K blocks, chains of 3 + 3) and 10 K blocks (4 + 4 + 2).
    for k in (768, 1280):
        specs.update(dict.fromkeys(s for s in _candidates("sm_90a", 2048, k, False, 128) if s.family == "wgmma"))
    # K split in clusters: DeepSeek-V3 EP8 at one token, gate_up in 2 (as the heuristic runs it) and
    # 4, down in 2.
    hopper = DeviceInfo.for_arch("sm_90a")
    for n, k, gated, k_granularity, splits in ((4096, 7168, True, 128, 2), (4096, 7168, True, 128, 4),
                                               (7168, 2048, False, 32, 2)):
        unsplit = wgmma_spec(hopper, 32, 1, 1.0, n, k, k_granularity, gated, split_k=False)
        specs[fit_wgmma_stages(hopper, 32, dataclasses.replace(unsplit, splits=splits))] = None
    # MXFP4 weights (gpt-oss: both GEMMs, its epilogue; the model shapes) on sm_12x, and on sm_90a
    # the software-scaled and emulated forms the H100 tests run.
    for variant, shapes in ((GPT_OSS_GATE_UP, ((5760, 2880, True),)), (MXFP4, ((2880, 2880, False), *SM120_MODEL_SHAPES))):
        for n, k, gated in shapes:
            specs.update(dict.fromkeys(_candidates("sm_120a", n, k, gated, 32, variant=variant)))
    specs[_largest(_candidates("sm_121a", 5760, 2880, True, 32, variant=GPT_OSS_GATE_UP))] = None
    for mode in ("software", "emulated"):
        specs[_largest(_candidates("sm_90a", 5760, 2880, True, 32, mode, variant=GPT_OSS_GATE_UP))] = None
    # ... and every wgmma configuration gpt-oss's GEMMs take on sm_90a (weights widened to e4m3),
    # decode to prefill.
    for variant, (n, k, gated) in ((GPT_OSS_GATE_UP_HALVES, (5760, 2880, True)), (GPT_OSS_DOWN, (2880, 2880, False))):
        for rows in (1.0, 40.0, 70.0, 1000.0):
            specs[wgmma_spec(hopper, NUM_EXPERTS, NUM_EXPERTS, rows, n, k, 32, gated, variant)] = None
    # The decode token tiles (8 and 16 tokens), one or two CTAs an SM, which the GPU tests and the
    # probe run: gpt-oss's gate_up with MXFP4 and MXFP8 weights at both granularities, and an
    # ungated GEMM.
    for variant, k_granularity, (n, k, gated) in ((GPT_OSS_GATE_UP_HALVES, 32, (5760, 2880, True)),
                                                  (DEFAULT_VARIANT, 32, (5760, 2880, True)),
                                                  (DEFAULT_VARIANT, 128, (5760, 2880, True)),
                                                  (DEFAULT_VARIANT, 32, (2880, 2880, False))):
        decode = wgmma_spec(hopper, NUM_EXPERTS, NUM_EXPERTS, 1.0, n, k, k_granularity, gated, variant, split_k=False)
        for block_t in WGMMA_DECODE_TOKEN_TILES:
            for ctas_per_sm in (1, 2):
                tile = dataclasses.replace(decode, block_t=block_t, ctas_per_sm=ctas_per_sm)
                specs[fit_wgmma_stages(hopper, NUM_EXPERTS, tile)] = None
    return list(specs)


SPECS = _specs()
SM12X_SPECS = [s for s in SPECS if s.arch in SM12X]
WGMMA_SPECS = [s for s in SPECS if s.family == "wgmma"]

def _param(specs):
    return pytest.mark.parametrize("spec", specs, ids=lambda s: f"{s.arch}-{s.label}")


@functools.cache
def build(spec: KernelSpec):
    """(CompileResult, resource usage) of a spec, compiled once per session with the package's options."""
    result = compile_cubin(spec.source(), arch=spec.arch, include_dir=kernel_dir(), options=OPTIONS, label=spec.label)
    return result, inspect.resource_usage(result.log)


@functools.cache
def sass_counts(spec: KernelSpec) -> dict[str, int]:
    if inspect.find_tool("nvdisasm") is None and inspect.find_tool("cuobjdump") is None:
        pytest.skip("no nvdisasm/cuobjdump (pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump)")
    return inspect.count_instructions(inspect.sass(build(spec)[0].cubin), SASS_OPCODES)


@_param(SPECS)
def test_compiles_and_fits_shared_memory(spec):
    result, usage = build(spec)
    assert result.cubin[:4] == b"\x7fELF"
    # Static shared memory (the scheduler's and the kernel's own) comes on top of the dynamic size.
    limit = DeviceInfo.for_arch(spec.arch).shared_memory_limit
    total = usage["static_shared"] + spec.dynamic_shared_bytes(NUM_EXPERTS)
    assert total <= limit, f"{total} B of shared memory > {limit} B on {spec.arch}"


# What SM12x runs by default (native scales): no spills, no local memory at all. The software-scaled
# fallback keeps a second set of partial accumulators; ptxas 13.5 sometimes spills a few bytes of
# it around the k loop (well below the register cap), which the fallback may afford.
SM12X_DEFAULT_SPECS = [s for s in SM12X_SPECS if s.scale_mode == "native"]
FALLBACK_SPILL_LIMIT = 64  # bytes


@_param(SM12X_SPECS)
def test_sm12x_no_spills(spec):
    _, usage = build(spec)
    if spec.scale_mode == "native":
        assert (usage["spill_stores"], usage["spill_loads"], usage["stack_frame"]) == (0, 0, 0), usage
    else:
        assert usage["spill_stores"] <= FALLBACK_SPILL_LIMIT and usage["spill_loads"] <= FALLBACK_SPILL_LIMIT, usage


@_param(SM12X_SPECS)
def test_sm12x_sass(spec):
    counts = sass_counts(spec)
    if spec.scale_mode == "native":
        assert counts["LDL"] == counts["STL"] == 0, counts
    assert counts["HMMA"] == 0, counts
    if spec.scale_mode == "native":
        # The full-rate block-scaled MMA, and no half-rate plain FP8 MMA left beside it; with MXFP4
        # weights its e2m1 x e4m3 form.
        assert counts["QMMA.SF"] > 0 and counts["QMMA"] == 0, counts
        operands = "E2M1.E4M3" if spec.variant.weights == "e2m1" else "E4M3.E4M3"
        assert inspect.count_instructions(inspect.sass(build(spec)[0].cubin), (f"QMMA.SF.16832.F32.{operands}",))[
            f"QMMA.SF.16832.F32.{operands}"] == counts["QMMA.SF"], spec
    else:
        assert counts["QMMA"] > 0 and counts["QMMA.SF"] == 0, counts


# The producer warpgroup runs on 40 registers (setmaxnreg); ptxas may spill a few words there, in
# its per-tile bookkeeping. The consumers (from setmaxnreg's register allocation to their exit)
# must keep everything in registers.
WGMMA_SPILL_LIMIT = 32  # bytes


def consumer_sass(sass_text: str) -> str:
    """The consumers' branch: from their register allocation (setmaxnreg.inc) to the producer's
    branch (setmaxnreg.dec) or the end, whichever ptxas placed after it."""
    start, producer = sass_text.index("USETMAXREG.TRY_ALLOC"), sass_text.index("USETMAXREG.DEALLOC")
    return sass_text[start:producer] if producer > start else sass_text[start:]


@_param(WGMMA_SPECS)
def test_wgmma_sass(spec):
    result, usage = build(spec)
    # ptxas serializes every wgmma (each waits for the one before), undoing the promotion overlap,
    # when it cannot prove a promotion reads only retired partials (C7514) or runs short of
    # registers for the wgmma pipeline (C7511).
    assert "serialized" not in result.log, result.log
    assert usage["spill_stores"] <= WGMMA_SPILL_LIMIT and usage["spill_loads"] <= WGMMA_SPILL_LIMIT, usage
    # setmaxnreg redistributes the registers per thread the launch bound gives the CTA (168 at one
    # CTA an SM, 80 at two; the kernel's static_assert): with fewer at entry the consumers'
    # allocation would wait forever.
    assert usage["registers"] == 65536 // (384 * spec.ctas_per_sm) // 8 * 8, usage
    if inspect.find_tool("nvdisasm") is None and inspect.find_tool("cuobjdump") is None:
        pytest.skip("no nvdisasm/cuobjdump (pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump)")
    sass_text = inspect.sass(build(spec)[0].cubin)
    counts = inspect.count_instructions(sass_text, ("QGMMA", "QMMA", "HMMA", "UTMALDG", "UTMASTG"))
    # Four k32 wgmmas per stage, operands and scales by TMA, full output tiles out by TMA store; no
    # mma.sync path compiled in beside them. The whole tile's wgmma is as wide as the token tile.
    assert counts["QGMMA"] >= 4 and counts["UTMALDG"] > 0 and counts["UTMASTG"] > 0, counts
    assert f"QGMMA.64x{spec.block_t}x32.F32.E4M3.E4M3" in sass_text, spec
    assert counts["QMMA"] == counts["HMMA"] == 0, counts
    consumers = inspect.count_instructions(consumer_sass(sass_text), ("QGMMA", "LDL", "STL"))
    assert consumers["QGMMA"] >= 4 and consumers["LDL"] == consumers["STL"] == 0, consumers
    # Split K: the cluster barriers at start and exit; MXFP4: the consumers' widening (2-byte
    # fragment loads, byte permutes) and every wgmma with A from registers (`QGMMA... Rd, Ra,
    # gdesc`), none from a widened tile in shared memory (`QGMMA... Rd, gdesc, ...`).
    cluster = inspect.count_instructions(sass_text, ("UCGABAR_ARV", "UCGABAR_WAIT"))
    if spec.splits > 1:
        assert cluster["UCGABAR_ARV"] >= 2 and cluster["UCGABAR_WAIT"] >= 2, cluster
    a_from_registers = len(re.findall(r"QGMMA\S* R\d+, R\d+, gdesc", sass_text))
    if spec.variant.weights == "e2m1":
        widening = inspect.count_instructions(consumer_sass(sass_text), ("PRMT", "LDS.U16"))
        assert widening["PRMT"] >= 16 and widening["LDS.U16"] >= 4, widening
        assert a_from_registers == counts["QGMMA"], (a_from_registers, counts)
    else:
        assert a_from_registers == 0, a_from_registers


def test_wgmma_host_and_kernel_agree_on_shared_memory():
    # The launch sizes dynamic shared memory from KernelSpec; the kernel lays it out from its own
    # constants (and traps on a mismatch). Let the compiler compare the two for every config.
    lines = ['#include "wgmma_grouped_gemm.cuh"']
    for i, spec in enumerate(WGMMA_SPECS):
        for stages in (2, spec.stages):
            for num_experts in (1, 7, 128, 300):
                staged = dataclasses.replace(spec, stages=stages)
                lines.append(f"static_assert({staged.cpp_type()}::shared_bytes({num_experts}) == "
                             f"{staged.dynamic_shared_bytes(num_experts)}, "
                             f'"spec {i}, {stages} stages, {num_experts} experts");')
    compile_cubin("\n".join(lines) + "\n", arch="sm_90a", include_dir=kernel_dir(), label="layout-check")


def test_mma_host_and_kernel_agree_on_shared_memory():
    # The same comparison for the mma.sync kernel's pipeline (MXFP4 weight rows are half as long).
    lines = ['#include "mma_grouped_gemm.cuh"']
    for i, spec in enumerate(s for s in SPECS if s.family == "mma"):
        gemm = re.search(r"using Gemm = (.*);", spec.source())[1]
        lines.append(f'static_assert({gemm}::kPipelineBytes == {spec.pipeline_bytes()}, "spec {i}: {spec.label}");')
    compile_cubin("\n".join(lines) + "\n", arch="sm_120a", include_dir=kernel_dir(), label="mma-layout-check")


def test_subset_covers_wgmma_token_tiles():
    assert {s.block_t for s in WGMMA_SPECS} == {8, 16, 32, 64, 96, 128}
    assert {s.k_granularity for s in WGMMA_SPECS} == {32, 128} and {s.splits for s in WGMMA_SPECS} == {1, 2, 4}
    assert {s.ctas_per_sm for s in WGMMA_SPECS} == {1, 2}
    assert {s.block_t for s in WGMMA_SPECS if s.variant.weights == "e2m1"} == {8, 16, 32, 64, 96}  # MXFP4: up to 96


def test_subset_covers_both_scale_modes_on_sm120():
    modes = {s.scale_mode for s in SM12X_SPECS if s.arch == "sm_120a"}
    assert modes == {"native", "software"} and SM12X_DEFAULT_SPECS


def _simt_archs() -> list[str]:
    # Every real target of this NVRTC from sm_75 on, as the runtime names it (sm_90 -> sm_90a).
    archs = []
    for arch in supported_archs():
        digits = arch.removeprefix("sm_")
        capability = (int(digits[:-1]), int(digits[-1]))
        if capability >= (7, 5):
            archs.append(arch_name(capability))
    return archs


@pytest.mark.parametrize("arch", _simt_archs())
def test_simt_compiles(arch):
    spec = SimtSpec(arch, 5760, 2880, 32, True)
    _, usage = build(spec)
    assert usage["spill_stores"] == usage["spill_loads"] == 0, usage


def test_simt_targets_include_sm75_to_sm121a():
    assert {"sm_75", "sm_89", "sm_90a", "sm_120a", "sm_121a"} <= set(_simt_archs())


def test_compile_error_carries_nvrtc_log():
    source = '#include "mma_grouped_gemm.cuh"\nextern "C" __global__ void k() { undefined_identifier_xyz = 1; }\n'
    with pytest.raises(CompileError) as info:
        compile_cubin(source, arch="sm_120a", include_dir=kernel_dir(), label="broken")
    error = info.value
    assert (error.label, error.arch) == ("broken", "sm_120a")
    assert "undefined_identifier_xyz" in error.log and "is undefined" in error.log, error.log


# The helpers themselves, on fixed text.

PTXAS_LOG = """\
ptxas info    : 64 bytes gmem
ptxas info    : Compiling entry function 'kernel' for 'sm_120a'
ptxas info    : Function properties for kernel
ptxas         .     24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Function properties for _Z6helperv
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 2048 bytes smem
ptxas info    : Compile time = 1.0 ms
"""


def test_resource_usage_parses_ptxas_report():
    # The entry's "Used" line follows its callee's properties; the callee's zeros must not win.
    assert inspect.resource_usage(PTXAS_LOG) == {
        "registers": 96, "stack_frame": 24, "spill_stores": 8, "spill_loads": 12, "static_shared": 2048}
    assert inspect.resource_usage(PTXAS_LOG.replace(", 2048 bytes smem", ""))["static_shared"] == 0
    with pytest.raises(ValueError, match="-Xptxas=-v"):
        inspect.resource_usage("")


def test_count_instructions_splits_qmma_variants():
    text = """\
        /*0100*/                   QMMA.SF.16832.F32.E4M3.E4M3.E8 R20, R24, R32, R20, R46, R44, URZ ;
        /*0110*/               @P0 QMMA.16832.F32.E4M3.E4M3 R4, R8, R12, R4 ;
        /*0120*/              @!P1 QMMA.16832.F32.E4M3.E4M3 R4, R8, R12, R4 ;   /* 0x000000000c04727a */
        /*0130*/                   STL.64 [R1], R2 ;
        /*0140*/                   LDL.LU R3, [R1+0x4] ;
        /*0150*/                   LDS R5, [R2] ;
        /*0160*/                   HMMA.16816.F32 R8, R12, R14, R8 ;
                                                                          /* 0x000fe20000000f00 */
"""
    counts = inspect.count_instructions(text, SASS_OPCODES)
    assert counts == {"QMMA.SF": 1, "QMMA": 2, "HMMA": 1, "LDL": 1, "STL": 1}
    assert inspect.count_instructions(text, ("QMMA",)) == {"QMMA": 3}

