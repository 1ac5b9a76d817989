"""The host's kernel choice (gemm/heuristics.py), for every architecture, without a GPU."""

from __future__ import annotations

import itertools

import pytest

from mxfp8_moe.gemm.device import DeviceInfo
from mxfp8_moe.gemm.heuristics import (WGMMA_TAKES_MXFP4, WGMMA_TOKEN_TILES, candidate_specs,
                                       choose_spec, resolve_scale_mode, wgmma_spec, wgmma_token_tile)
from mxfp8_moe.gemm.families import WgmmaSpec
from mxfp8_moe.gemm.spec import Variant

ARCHS = ("sm_120a", "sm_121a", "sm_90a", "sm_89")


def choose(arch="sm_120a", *, num_experts=128, cum_m=64, n=1536, k=2048, k_granularity=128, gated=True,
           scale_mode="auto", aligned=True, allow_wgmma=True):
    return choose_spec(device=DeviceInfo.for_arch(arch), num_experts=num_experts, cum_m=cum_m, n=n, k=k,
                       k_granularity=k_granularity, gated=gated, scale_mode=scale_mode, aligned=aligned,
                       allow_wgmma=allow_wgmma)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_choice_fits_the_arch(arch):
    limit = DeviceInfo.for_arch(arch).shared_memory_limit
    for num_experts, cum_m, (n, k), gated in itertools.product(
            (1, 8, 32, 128, 512), (1, 3, 8, 64, 512, 4096, 65536), ((1536, 2048), (7168, 2048), (5760, 2880)),
            (False, True)):
        spec = choose(arch, num_experts=num_experts, cum_m=cum_m, n=n, k=k, gated=gated)
        if spec.family == "simt":
            continue
        assert spec.dynamic_shared_bytes(num_experts) + 1024 <= limit, spec
        if spec.family == "wgmma":
            assert arch == "sm_90a" and spec.stages >= 2 and spec.block_t in WGMMA_TOKEN_TILES, spec
            continue
        assert spec.stages * spec.pipeline_bytes() >= spec.epilogue_bytes(), spec  # epilogue reuses the pipeline
        assert spec.block_n % (16 * spec.warps_n) == 0 and 4 % spec.warps_k == 0, spec


def test_too_many_experts_for_shared_memory_falls_back_to_the_portable_kernel():
    assert choose("sm_120a", num_experts=8192, cum_m=4).family == "simt"


def test_unaligned_or_pre_ada_run_the_portable_kernel():
    assert choose(aligned=False).family == "simt"
    assert choose("sm_86").family == "simt"


def test_token_tile_covers_random_routing():
    # 16 rows per expert on average: a 16-row tile would split half the experts in two.
    assert choose(cum_m=128 * 16).block_t == 32
    assert choose(cum_m=8).block_t == 8


def test_few_units_get_narrow_tiles_and_k_warps():
    # The mma.sync kernel's regimes (on sm_90a, with the wgmma kernel ruled out).
    spec = choose("sm_90a", num_experts=32, cum_m=1, n=4096, k=7168, allow_wgmma=False)  # one token, one expert
    assert spec.block_n <= 64 and spec.warps_k > 1 and spec.stages > 4
    many = choose("sm_90a", num_experts=128, cum_m=512, allow_wgmma=False)
    assert many.warps_k == 1 and many.stages == 4


def test_wgmma_on_hopper_from_decode_to_prefill():
    assert choose("sm_90a", cum_m=128 * 256).family == "wgmma"  # prefill
    assert choose("sm_90a", cum_m=8, gated=False, n=2048, k=768).family == "wgmma"  # decode, non-gated
    assert choose("sm_90a", cum_m=1, num_experts=32, n=4096, k=7168).family == "wgmma"  # gated, long K
    assert choose("sm_90a", cum_m=8, n=1536, k=2048).family == "wgmma"  # gated decode, short K
    # Shapes it cannot tile (gated output width not a multiple of 64) and K-major scales: mma.sync.
    assert choose("sm_90a", cum_m=8, n=1568, k=2048).family == "mma"
    assert choose("sm_90a", cum_m=128 * 256, allow_wgmma=False).family == "mma"
    # The emulated scale mode exists to run the sm_12x mma.sync path on Hopper: never wgmma.
    assert choose("sm_90a", cum_m=128 * 256, scale_mode="emulated").family == "mma"
    for arch in ("sm_120a", "sm_121a", "sm_89"):
        assert choose(arch, cum_m=128 * 256).family == "mma"


def test_mxfp4_on_hopper_runs_wgmma():
    # MXFP4 weights on the wgmma kernel (measured faster in most cells, issue 14), except with
    # interleaved up and gate rows.
    hopper = DeviceInfo.for_arch("sm_90a")
    mxfp4 = lambda variant: choose_spec(device=hopper, num_experts=128, cum_m=4096, n=5760, k=2880, k_granularity=32,
                                        gated=True, scale_mode="auto", variant=variant).family
    assert WGMMA_TAKES_MXFP4
    assert mxfp4(Variant("e2m1")) == "wgmma" and mxfp4(Variant("e2m1", interleaved=True)) == "mma"


def test_split_k_where_units_leave_sms_idle():
    hopper = DeviceInfo.for_arch("sm_90a")

    def splits(num_experts, active, n, k, gated):
        return wgmma_spec(hopper, num_experts, active, 1.0, n, k, 128, gated, split_k=True).splits

    # DeepSeek-V3 EP8 gate_up, one token: 32 units, 56 K blocks. In 4, 128 CTAs: more than the 30
    # clusters of 4 an H100 holds at once; in 2, 64 CTAs of 28 K blocks.
    assert splits(32, 1, 4096, 7168, True) == 2
    assert choose("sm_90a", cum_m=1, num_experts=32, n=4096, k=7168).splits == 2  # on by default
    assert splits(32, 2, 4096, 7168, True) == 2    # two tokens: 64 units, 128 CTAs
    assert splits(32, 1, 7168, 2048, False) == 1   # ... down: 16 K blocks, too few to split
    assert splits(32, 4, 4096, 7168, True) == 1    # four tokens: 128 units
    assert splits(128, 1, 2880, 2880, False) == 1  # 23 K blocks split evenly in neither 2 nor 4
    assert splits(2, 1, 1024, 8192, False) == 4    # 8 units of 64 K blocks: 32 CTAs in 8 clusters
    # MXFP4 weights stay whole (their split kernel has not run on a GPU).
    assert wgmma_spec(hopper, 32, 1, 1.0, 4096, 7168, 32, True, Variant("e2m1"), split_k=True).splits == 1
    # Prefill-sized tiles are never split (shared memory for the slots, consumer registers).
    prefill = wgmma_spec(hopper, 32, 1, 100.0, 4096, 7168, 128, True, split_k=True)
    assert prefill is not None and (prefill.block_t, prefill.splits) == (128, 1)


@pytest.mark.parametrize("narrow_last_tile", [False, True])
def test_wgmma_token_tile_minimizes_cost(narrow_last_tile):
    def tile(rows):
        return wgmma_token_tile(rows, narrow_last_tile)

    # Decode: one tile, the smallest box to copy.
    assert tile(1) == 32 and tile(16) == 32
    # 32 +- 6 rows: one 64-row tile, not one or two 32-row ones (each re-reads the expert's weights).
    assert tile(32) == 64
    assert tile(64) == 96  # 64 +- 8 rows: one 96-row tile, not one or two of 64
    assert tile(128) == tile(4096) == 128
    tiles = [tile(r) for r in (1, 8, 32, 48, 64, 100, 128, 256, 1024)]
    assert tiles == sorted(tiles)


def test_narrow_last_tiles_make_large_tiles_cheaper():
    # 276 +- 17 rows: three 96-row tiles beat two full 128-row tiles and a mostly empty one, unless
    # the last tile is only as wide as its rows.
    assert wgmma_token_tile(276, narrow_last_tile=False) == 96
    assert wgmma_token_tile(276, narrow_last_tile=True) == 128


def test_scale_modes():
    assert choose("sm_120a").scale_mode == "native"
    assert choose("sm_121a").scale_mode == "native"
    assert choose("sm_90a").family == "wgmma"  # software scales, its only mode
    assert choose("sm_90a", allow_wgmma=False).scale_mode == "software"
    assert choose("sm_90a", scale_mode="emulated").scale_mode == "emulated"
    with pytest.raises(ValueError, match="sm_120a or sm_121a"):
        resolve_scale_mode("native", "sm_90a")
    with pytest.raises(ValueError, match="MXFP8_MOE_SCALE_MODE"):
        resolve_scale_mode("fast", "sm_120a")


def test_wgmma_spec_tile_width_follows_gating():
    gated = WgmmaSpec("sm_90a", 1536, 2048, 128, True, block_t=32, stages=2)
    assert (gated.n_out, gated.block_n) == (768, 64)
    assert WgmmaSpec("sm_90a", 1536, 2048, 128, False, block_t=32, stages=2).block_n == 128


def test_wgmma_spec_two_ctas_per_sm_only_on_decode_tiles():
    # The kernel's static_assert, said by the spec before anything compiles.
    spec = WgmmaSpec("sm_90a", 5760, 2880, 32, True, block_t=16, stages=5, ctas_per_sm=2)
    assert spec.label.endswith("_bt16_s5_x2") and spec.cpp_type().endswith("mxfp8_moe::kWholeKernel, 2>")
    for block_t, splits, ctas_per_sm in ((32, 1, 2), (8, 2, 2), (8, 1, 3)):
        with pytest.raises(ValueError, match="ctas_per_sm"):
            WgmmaSpec("sm_90a", 5760, 2880, 32, True, block_t=block_t, stages=5, splits=splits, ctas_per_sm=ctas_per_sm)


@pytest.mark.parametrize("arch", ("sm_120a", "sm_90a"))
def test_prewarm_candidates_cover_every_choice(arch):
    # What `prewarm` compiles must include whatever a call of up to 65536 rows picks, or the first
    # such call in a prewarmed deployment would compile.
    for num_experts, n, k, gated in ((128, 1536, 2048, True), (128, 2048, 768, False), (32, 4096, 7168, True)):
        candidates = set(candidate_specs(device=DeviceInfo.for_arch(arch), num_experts=num_experts, n=n, k=k,
                                         k_granularity=128, gated=gated))
        for cum_m in itertools.chain(range(1, 512), range(512, 65537, 37)):
            for allow_wgmma in (True, False):  # False: scales the wgmma kernel cannot read
                assert choose(arch, num_experts=num_experts, cum_m=cum_m, n=n, k=k, gated=gated,
                              allow_wgmma=allow_wgmma) in candidates, (cum_m, allow_wgmma)
