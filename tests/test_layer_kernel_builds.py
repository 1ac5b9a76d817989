"""The fused layer kernels build cleanly for the MXFP8 models' decode shapes (CPU only). The wgmma
layer (kernels/wgmma_moe_layer.cuh, sm_90a): no spills, no serialized wgmma, the 168 registers
setmaxnreg redistributes. The mma.sync layer (kernels/mma_moe_layer.cuh; sm_120a and sm_121a
native, sm_120a software, sm_90a emulated): no spills, QMMA.SF natively, every token tile the
heuristic picks. Both: shared memory within the per-block limit and equal on host and device."""

from __future__ import annotations

import functools

import pytest

from mxfp8_moe.gemm.device import DeviceInfo
from mxfp8_moe.gemm.heuristics import (MMA_LAYER_NATIVE_MAX_TOKEN_TILE, MMA_LAYER_NOT_NATIVE_MAX_TOKEN_TILE,
                                       TOKEN_TILES, _PER_BLOCK_RESERVE, layer_spec)
from mxfp8_moe.gemm.layer import LAYER_MAX_ROWS, LayerSpec
from mxfp8_moe.jit import inspect
from mxfp8_moe.jit.build import OPTIONS, kernel_dir
from mxfp8_moe.jit.compiler import compile_cubin

H100 = DeviceInfo.for_arch("sm_90a")
# (experts, hidden, intermediate): Qwen3-30B-A3B, Qwen3-235B-A22B, DeepSeek-V3 with 8-way expert
# parallelism (32 local experts).
MODELS = {"qwen3-30b": (128, 2048, 768), "qwen3-235b": (128, 4096, 1536), "deepseek-ep8": (32, 7168, 2048)}


def _specs() -> list[LayerSpec]:
    specs = {}
    for experts, hidden, inter in MODELS.values():
        for k_granularity in (32, 128):
            for rows in (1, 8, 128, LAYER_MAX_ROWS):
                specs[layer_spec(H100, experts, rows, hidden, inter, k_granularity)] = None
            # Few experts with many rows each: the wider token tiles (64 and 128) and shallower pipelines.
            for experts_, rows in ((8, 256), (4, LAYER_MAX_ROWS)):
                specs[layer_spec(H100, experts_, rows, hidden, inter, k_granularity)] = None
    return list(specs)


SPECS = _specs()


@functools.cache
def build(spec: LayerSpec):
    result = compile_cubin(spec.source(), arch=spec.arch, include_dir=kernel_dir(), options=OPTIONS, label=spec.label)
    return result, inspect.resource_usage(result.log)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_builds_without_spills_or_serialized_wgmma(spec):
    result, usage = build(spec)
    assert "serialized" not in result.log, result.log
    assert usage["spill_stores"] == usage["spill_loads"] == usage["stack_frame"] == 0, usage
    assert usage["registers"] == 168, usage  # what setmaxnreg redistributes (WgmmaGemm's static_assert)
    limit = H100.shared_memory_limit - _PER_BLOCK_RESERVE
    assert spec.dynamic_shared_bytes(max(experts for experts, _, _ in MODELS.values())) <= limit


def test_host_and_kernel_agree_on_shared_memory():
    # The launch sizes dynamic shared memory from LayerSpec; the kernel lays it out from its own
    # constants (and traps on a mismatch). Let the compiler compare the two.
    lines = ['#include "wgmma_moe_layer.cuh"']
    for i, spec in enumerate(SPECS):
        layer = (f"mxfp8_moe::WgmmaMoeLayer<{spec.gate_up.cpp_type('kLayerGateUp')}, "
                 f"{spec.down.cpp_type('kLayerDown')}>")
        for num_experts in (1, 32, 128):
            lines.append(f"static_assert({layer}::shared_bytes({num_experts}) == {spec.dynamic_shared_bytes(num_experts)}, "
                         f'"spec {i}: {spec.label}, {num_experts} experts");')
    compile_cubin("\n".join(lines) + "\n", arch="sm_90a", include_dir=kernel_dir(), label="layer-layout-check")


def test_covers_granularities_token_tiles_and_pipeline_depths():
    assert {s.k_granularity for s in SPECS} == {32, 128}
    assert {s.block_t for s in SPECS} == {32, 64}  # 128 spills (heuristics.LAYER_MAX_TOKEN_TILE)
    assert {s.stages for s in SPECS} >= {4, 7}


# The mma.sync fused layer: sm_120a / sm_121a natively (and in software scaling, the fallback the
# native guard may choose), and sm_90a in the emulated scale mode, which is how its code is run on
# the lent Hopper GPUs.
SM120 = DeviceInfo.for_arch("sm_120a")


def _mma_specs():
    specs = {}
    for device, modes in ((SM120, ("native", "software")), (DeviceInfo.for_arch("sm_121a"), ("native",)),
                          (H100, ("emulated",))):
        for mode in modes:
            for experts, hidden, inter in MODELS.values():
                # (experts, rows): the models' decode sizes, and eight experts with 8 and 40 rows
                # each, whose token tiles (16, 64) the model sizes under the row cap do not reach.
                cases = [(experts, rows) for rows in (1, 128, LAYER_MAX_ROWS)] + [(8, 64), (8, 320)]
                for k_granularity in (32, 128):
                    for num_experts, rows in cases:
                        specs[layer_spec(device, num_experts, rows, hidden, inter, k_granularity, mode)] = None
    return list(specs)


MMA_SPECS = _mma_specs()


@pytest.mark.parametrize("spec", MMA_SPECS, ids=lambda s: f"{s.arch}-{s.label}")
def test_mma_layer_builds_without_spills(spec):
    result, usage = build(spec)
    assert usage["spill_stores"] == usage["spill_loads"] == usage["stack_frame"] == 0, usage
    device = DeviceInfo.for_arch(spec.arch)
    assert spec.dynamic_shared_bytes(128) <= device.shared_memory_limit - _PER_BLOCK_RESERVE
    if spec.gate_up.scale_mode == "native":
        if inspect.find_tool("nvdisasm") is None and inspect.find_tool("cuobjdump") is None:
            pytest.skip("no nvdisasm/cuobjdump")
        counts = inspect.count_instructions(inspect.sass(result.cubin), ("QMMA.SF", "REDG"))
        # The block-scaled MMA in both phases; gate_up's publication on its token tile's counter.
        assert counts["QMMA.SF"] > 0 and counts["REDG"] >= 1, counts


def test_mma_layer_covers_every_token_tile_the_heuristic_picks():
    for k_granularity, widest in MMA_LAYER_NATIVE_MAX_TOKEN_TILE.items():
        native = {s.gate_up.block_t for s in MMA_SPECS
                  if s.gate_up.scale_mode == "native" and s.gate_up.k_granularity == k_granularity}
        assert native == {t for t in TOKEN_TILES if t <= widest}, (k_granularity, native)
    assert {s.gate_up.block_t for s in MMA_SPECS if s.gate_up.scale_mode != "native"} == {
        MMA_LAYER_NOT_NATIVE_MAX_TOKEN_TILE}


def test_mma_layer_host_and_kernel_agree_on_shared_memory():
    for arch in ("sm_120a", "sm_90a"):
        lines = ['#include "mma_moe_layer.cuh"']
        for i, spec in enumerate(s for s in MMA_SPECS if s.arch == arch):
            layer = f"mxfp8_moe::MmaMoeLayer<{spec.gate_up.cpp_type('kLayerGateUp')}, {spec.down.cpp_type('kLayerDown')}>"
            for num_experts in (1, 32, 128):
                lines.append(f"static_assert({layer}::shared_bytes({num_experts}) == {spec.dynamic_shared_bytes(num_experts)}, "
                             f'"spec {i}: {spec.label}, {num_experts} experts");')
        compile_cubin("\n".join(lines) + "\n", arch=arch, include_dir=kernel_dir(), label="mma-layer-layout-check")
