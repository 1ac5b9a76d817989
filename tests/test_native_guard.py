"""The first-use check of sm_12x's block-scaled MMA (gemm/native_guard.py): what it computes and
how it falls back, without a GPU (tests/test_gemm_gpu.py runs it on one)."""

from __future__ import annotations

import pytest

from mxfp8_moe.gemm import native_guard
from mxfp8_moe.gemm.device import DeviceInfo
from mxfp8_moe.jit.runtime import DriverError
from mxfp8_moe.layout import k_align, num_k_blocks


def test_the_problem_reads_several_words_and_every_byte_at_both_granularities():
    for k_granularity in (32, 128):
        assert num_k_blocks(native_guard.CHECK_K, k_granularity) > 4, k_granularity  # every byte of word 0, and more
        assert k_align(native_guard.CHECK_K, k_granularity) >= 2, k_granularity
    assert native_guard.CHECK_K % 128 != 0  # a K tail


def test_it_checks_both_tile_regimes_of_both_granularities_and_gatings():
    specs = native_guard.specs(DeviceInfo.for_arch("sm_120a"), "native")
    assert {(s.k_granularity, s.gated) for s in specs} == {(32, False), (32, True), (128, False), (128, True)}
    assert {s.warps_k > 1 for s in specs} == {True, False}  # few units (K warps) and many units
    assert {s.scale_mode for s in specs} == {"native"}


@pytest.mark.parametrize("failure", [DriverError("cuLaunchKernelEx failed: CUDA_ERROR_LAUNCH_FAILED"),
                                     RuntimeError("CUDA error: an illegal instruction was encountered")])
def test_a_kernel_that_fails_means_software_scaling_with_a_warning(monkeypatch, failure):
    def fail(mode, device_index):
        raise failure

    monkeypatch.setattr(native_guard, "first_disagreement", fail)
    with pytest.warns(native_guard.NativeScaleWarning, match="native block-scaled MMA on cuda:0 failed its first-use "
                                                             rf"check \({type(failure).__name__}: "):
        assert native_guard.agrees("native", 0) is False


def test_a_disagreement_means_software_scaling_with_a_warning(monkeypatch):
    monkeypatch.setattr(native_guard, "first_disagreement", lambda mode, device_index: "mma_x: relative difference 1")
    with pytest.warns(native_guard.NativeScaleWarning, match="disagrees with software scaling \\(mma_x: relative "
                                                             "difference 1\\); using software scaling"):
        assert native_guard.agrees("native", 0) is False
    monkeypatch.setattr(native_guard, "first_disagreement", lambda mode, device_index: None)
    assert native_guard.agrees("native", 0) is True
