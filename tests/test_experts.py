"""expert_gemms (gate_up -> SwiGLU -> MXFP8 -> down) on CPU: the chain's composition, the path
option's errors, and when the heuristic offers the fused layer kernel (CPU only; the kernel itself
is tested on a GPU in test_fused_layer_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe import expert_gemms, moe_gemm_mxfp8_nt_groupwise, quantize_activations
from mxfp8_moe.gemm import heuristics
from mxfp8_moe.gemm.device import DeviceInfo
from mxfp8_moe.gemm.layer import LAYER_MAX_ROWS, MmaLayerSpec
from mxfp8_moe.moe_layer import QuantizedExperts

from problems import indptr


def small_layer(k_granularity=128):
    w13 = QuantizedExperts.quantize(torch.randn(4, 256, 256) * 0.05, k_granularity)
    w2 = QuantizedExperts.quantize(torch.randn(4, 256, 128) * 0.05, k_granularity)
    m_indptr = indptr([3, 0, 5, 1])
    a, a_scale = quantize_activations(torch.randn(9, 256), m_indptr, k_granularity)
    return (a, a_scale, m_indptr, w13.b, w13.b_scale, w2.b, w2.b_scale, k_granularity)


@pytest.mark.parametrize("k_granularity", [32, 128])
def test_chain_is_gate_up_quantize_down(k_granularity):
    a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, _ = args = small_layer(k_granularity)
    granularity = (1, 1, k_granularity)
    h = moe_gemm_mxfp8_nt_groupwise(a, w13, a_scale, w13_scale, m_indptr, granularity, is_gated=True)
    h_q, h_scale = quantize_activations(h, m_indptr, k_granularity)
    want = moe_gemm_mxfp8_nt_groupwise(h_q, w2, h_scale, w2_scale, m_indptr, granularity)
    for path in ("auto", "chain"):
        assert torch.equal(expert_gemms(*args, path=path), want)


def test_fused_path_says_why_it_cannot_run_here():
    with pytest.raises(ValueError, match=r"path='fused' needs CUDA tensors on an sm_90a, sm_120a or sm_121a GPU.*got a of "
                                         r"shape \(9, 256\) on cpu"):
        expert_gemms(*small_layer(), path="fused")


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match=r"path must be one of \('auto', 'fused', 'chain'\), got 'fast'"):
        expert_gemms(*small_layer(), path="fast")


def test_bad_arguments_get_the_grouped_gemms_errors():
    a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, kg = small_layer()
    with pytest.raises(ValueError, match="a_scale"):
        expert_gemms(a, a_scale[:, :0], m_indptr, w13, w13_scale, w2, w2_scale, kg, path="fused")


H100 = DeviceInfo.for_arch("sm_90a")


def test_the_wgmma_layer_is_offered_on_sm90a_at_decode_sizes_only():
    spec = heuristics.layer_spec(H100, 128, 8, 2048, 768, 128)
    assert spec is not None and spec.stages >= 2
    assert spec.dynamic_shared_bytes(128) <= H100.shared_memory_limit
    assert heuristics.layer_spec(H100, 128, LAYER_MAX_ROWS, 2048, 768, 128) is not None
    assert heuristics.layer_spec(H100, 128, LAYER_MAX_ROWS + 1, 2048, 768, 128) is None
    assert heuristics.layer_spec(H100, 128, 0, 2048, 768, 128) is None
    assert heuristics.layer_spec(H100, 128, 8, 2048, 96, 128) is None  # gated tiles pair 64 up with 64 gate rows
    for arch in ("sm_89", "sm_100a"):
        assert heuristics.layer_spec(DeviceInfo.for_arch(arch), 128, 8, 2048, 768, 128) is None


def test_sm120_and_emulated_sm90_get_the_mma_sync_layer():
    sm120 = DeviceInfo.for_arch("sm_120a")
    for mode in ("native", "software"):
        spec = heuristics.layer_spec(sm120, 128, 8, 2048, 768, 128, mode)
        assert isinstance(spec, MmaLayerSpec) and spec.gate_up.scale_mode == spec.down.scale_mode == mode
        assert spec.gate_up.block_n % 128 == 0  # whole scale blocks in gate_up's epilogue
        assert spec.dynamic_shared_bytes(128) <= sm120.shared_memory_limit
    emulated = heuristics.layer_spec(H100, 128, 8, 2048, 768, 32, "emulated")
    assert isinstance(emulated, MmaLayerSpec) and emulated.gate_up.block_n % 32 == 0

