"""MXFP4 weights and the epilogue options (bias, clamped SwiGLU, interleaved gate and up rows) on
the CUDA kernels, against the float64 reference of the same quantized inputs (GPU only).

Each case draws fresh data and poisons `out` with NaN. The kernel under test is chosen by the
heuristic (mma.sync for MXFP4 and interleaved rows on every tensor-core GPU, wgmma on sm_90a for
the rest), by MXFP8_MOE_SCALE_MODE=emulated (the sm_120a block-scaled path, its MMA emulated), or
launched directly (the portable kernel; the wgmma kernel with MXFP4 weights, widened to e4m3 in
its consumers' registers, at every token tile it takes).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mxfp8_moe import (GatedActivation, moe_gemm_mxfp8_mxfp4_nt_groupwise, moe_gemm_mxfp8_nt_groupwise,
                       quantize_activations, quantize_weights, quantize_weights_mxfp4, reference_moe_gemm)
from mxfp8_moe.gemm import launch
from mxfp8_moe.gemm.device import current_stream, device_info
from mxfp8_moe.gemm.families import SimtSpec
from mxfp8_moe.gemm.heuristics import (WGMMA_ARCHS, WGMMA_DECODE_TOKEN_TILES, WGMMA_MXFP4_TOKEN_TILES,
                                       WGMMA_TAKES_MXFP4, fit_wgmma_stages, wgmma_spec)
from mxfp8_moe.gemm.launch import get_kernel
from mxfp8_moe.gemm.spec import EpilogueArguments, Variant
from mxfp8_moe.layout import to_k_major

from problems import indptr, relative_error, routed_rows

pytestmark = pytest.mark.gpu
TOLERANCE = 5e-3
# Empty experts, one row, partial and full tiles; K = 2880 ends in half a 128-value stage.
ROWS = [0, 1, 17, 0, 64, 130]
ACTIVATIONS = {
    "plain": None,
    "swiglu": GatedActivation(),
    "clamped": GatedActivation("clamped_swiglu"),
    "clamped-interleaved": GatedActivation("clamped_swiglu", "interleaved", alpha=1.5, limit=2.0),
    "swiglu-interleaved": GatedActivation("swiglu", "interleaved"),
}


def problem(weights: str, n: int, k: int, k_granularity: int = 32, *, bias: bool):
    m_indptr = indptr(ROWS, "cuda")
    x = torch.randn(sum(ROWS), k, device="cuda") * torch.exp2(torch.randint(-3, 4, (sum(ROWS), 1), device="cuda").float())
    a, a_scale = quantize_activations(x, m_indptr, k_granularity)
    w = torch.randn(len(ROWS), n, k, device="cuda") * 0.05
    b, b_scale = quantize_weights_mxfp4(w) if weights == "e2m1" else quantize_weights(w, k_granularity)
    return (a, b, a_scale, b_scale, m_indptr), (torch.randn(len(ROWS), n, device="cuda") if bias else None)


def check(call, operands, bias, activation, k_granularity, **kwargs):
    a, b = operands[:2]
    n_out = b.shape[1] // (2 if activation else 1)
    out = torch.full((a.shape[0], n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
    options = {} if activation is None else dict(activation=activation.kind, gate_layout=activation.layout,
                                                 alpha=activation.alpha, limit=activation.limit)
    call(*operands, (1, 1, k_granularity), out=out, is_gated=activation is not None, bias=bias, **options, **kwargs)
    expected = reference_moe_gemm(*operands, k_granularity=k_granularity, is_gated=activation is not None,
                                  accumulate_dtype=torch.float64, bias=bias, activation=activation or GatedActivation())
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    error = relative_error(out, expected)
    assert error <= TOLERANCE, f"relative error {error:.2e}"


@pytest.fixture
def served(monkeypatch):
    """The families of the kernels the calls launch."""
    families, real_call = [], launch.GemmKernel.__call__

    def recording_call(self, *args):
        families.append(self.spec.family)
        return real_call(self, *args)

    monkeypatch.setattr(launch.GemmKernel, "__call__", recording_call)
    return families


@pytest.mark.parametrize("scales", ["auto", "auto-k-major", "emulated"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_mxfp4_weights(name, bias, scales, served, monkeypatch, fresh_memos):
    monkeypatch.setenv("MXFP8_MOE_SCALE_MODE", scales.removesuffix("-k-major"))
    operands, bias_tensor = problem("e2m1", 256, 2880, bias=bias)
    if scales.endswith("k-major"):  # TMA cannot read these: mma.sync on sm_90a too
        a, b, a_scale, b_scale, m_indptr = operands
        operands = (a, b, to_k_major(a_scale), to_k_major(b_scale), m_indptr)
    check(moe_gemm_mxfp8_mxfp4_nt_groupwise, operands, bias_tensor, ACTIVATIONS[name], 32)
    interleaved = ACTIVATIONS[name] is not None and ACTIVATIONS[name].layout == "interleaved"
    wgmma = WGMMA_TAKES_MXFP4 and device_info(0).arch in WGMMA_ARCHS and scales == "auto" and not interleaved
    assert served == ["wgmma" if wgmma else "mma"]


@pytest.mark.parametrize("block_t", WGMMA_DECODE_TOKEN_TILES + WGMMA_MXFP4_TOKEN_TILES)
@pytest.mark.parametrize("rows", [ROWS, [0, 3, 0, 250, 600, 1]], ids=["small", "prefill"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", ["plain", "swiglu", "clamped"])
def test_mxfp4_on_the_wgmma_kernel(name, bias, rows, block_t):
    check_mxfp4_wgmma(name, bias, rows, block_t, ctas_per_sm=1)


@pytest.mark.parametrize("block_t", WGMMA_DECODE_TOKEN_TILES)
@pytest.mark.parametrize("name", ["plain", "clamped"])
def test_mxfp4_wgmma_two_ctas_per_sm(name, block_t):
    # Decode tiles, two CTAs on each SM (80 registers a thread at launch): co-resident, same GEMM.
    check_mxfp4_wgmma(name, True, ROWS, block_t, ctas_per_sm=2)


def check_mxfp4_wgmma(name: str, bias: bool, rows: list[int], block_t: int, ctas_per_sm: int) -> None:
    """The wgmma kernel with MXFP4 weights at this tile, launched directly, against the float64
    reference (NaN-poisoned output)."""
    device = device_info(0)
    if device.arch not in WGMMA_ARCHS:
        pytest.skip(f"the wgmma kernel needs sm_90a, this GPU is {device.arch}")
    activation = ACTIVATIONS[name]
    n, k = (512, 2880) if activation else (320, 2880)
    m_indptr = indptr(rows, "cuda")
    a, a_scale = quantize_activations(torch.randn(sum(rows), k, device="cuda"), m_indptr, 32)
    b, b_scale = quantize_weights_mxfp4(torch.randn(len(rows), n, k, device="cuda") * 0.05)
    bias_tensor = torch.randn(len(rows), n, device="cuda") if bias else None
    variant = Variant("e2m1", activation.kind if activation else "swiglu", False, bias)
    expected_rows = sum(rows) / sum(r > 0 for r in rows)
    spec = wgmma_spec(device, len(rows), sum(r > 0 for r in rows), expected_rows, n, k, 32, activation is not None,
                      variant)
    spec = fit_wgmma_stages(device, len(rows), dataclasses.replace(spec, block_t=block_t, ctas_per_sm=ctas_per_sm))
    kernel = get_kernel(spec, 0)
    assert kernel.launch_config(len(rows), sum(rows))[0][0] == ctas_per_sm * device.num_sms
    out = torch.full((sum(rows), n // 2 if activation else n), float("nan"), dtype=torch.bfloat16, device="cuda")
    kernel(a, b, a_scale, b_scale, m_indptr, out, current_stream(0), EpilogueArguments(
        bias_tensor, *((activation.alpha, activation.limit) if activation else (0.0, 0.0))))
    expected = reference_moe_gemm(a, b, a_scale, b_scale, m_indptr, k_granularity=32, is_gated=activation is not None,
                                  accumulate_dtype=torch.float64, bias=bias_tensor,
                                  activation=activation or GatedActivation())
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert relative_error(out, expected) <= TOLERANCE


@pytest.mark.parametrize("tokens", [1, 40, 900])
def test_mxfp4_weights_on_model_shapes(tokens, fresh_memos):
    # gpt-oss-20b's gate_up (32 experts, N = 5760, K = 2880) under top-4 routing: one row per
    # expert up to several full 128-token tiles, the token tile the heuristic picks for each.
    rows = routed_rows(tokens, 32, 4)
    m_indptr = indptr(rows, "cuda")
    a, a_scale = quantize_activations(torch.randn(sum(rows), 2880, device="cuda"), m_indptr, 32)
    b, b_scale = quantize_weights_mxfp4(torch.randn(32, 5760, 2880, device="cuda") * 0.05)
    check(moe_gemm_mxfp8_mxfp4_nt_groupwise, (a, b, a_scale, b_scale, m_indptr), torch.randn(32, 5760, device="cuda"),
          ACTIVATIONS["clamped"], 32)


@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_mxfp8_epilogue_options(name, bias, k_granularity, served, fresh_memos):
    operands, bias_tensor = problem("e4m3", 5760 if ACTIVATIONS[name] else 2880, 2880, k_granularity, bias=bias)
    check(moe_gemm_mxfp8_nt_groupwise, operands, bias_tensor, ACTIVATIONS[name], k_granularity)
    interleaved = ACTIVATIONS[name] is not None and ACTIVATIONS[name].layout == "interleaved"
    hopper = device_info(0).arch in WGMMA_ARCHS
    assert served == ["wgmma" if hopper and not interleaved else "mma"]


@pytest.mark.parametrize("weights", ["e4m3", "e2m1"])
@pytest.mark.parametrize("name", ["plain", "clamped-interleaved"])
def test_portable_kernel(weights, name):
    operands, bias = problem(weights, 192, 320, bias=True)
    activation = ACTIVATIONS[name]
    variant = Variant(weights, activation.kind if activation else "swiglu",
                      bool(activation) and activation.layout == "interleaved", True)
    kernel = get_kernel(SimtSpec(device_info(0).arch, 192, 320, 32, activation is not None, variant=variant), 0)
    out = torch.full((operands[0].shape[0], 96 if activation else 192), float("nan"), dtype=torch.bfloat16,
                     device="cuda")
    kernel(*operands, out, current_stream(0), EpilogueArguments(bias, *(
        (activation.alpha, activation.limit) if activation else (0.0, 0.0))))
    expected = reference_moe_gemm(*operands, k_granularity=32, is_gated=activation is not None,
                                  accumulate_dtype=torch.float64, bias=bias, activation=activation or GatedActivation())
    assert not torch.isnan(out).any()
    assert relative_error(out, expected) <= TOLERANCE


def test_nan_stays_nan_through_the_clamp():
    # The clamped SwiGLU's comparisons must not turn a NaN product into the limit.
    operands, _ = problem("e2m1", 128, 256, bias=False)
    a, b, a_scale, b_scale, m_indptr = operands
    a_scale[:, 0] = 0x7F7F7FFF  # the first K block of every row: scale 0xFF (NaN)
    out = moe_gemm_mxfp8_mxfp4_nt_groupwise(a, b, a_scale, b_scale, m_indptr, is_gated=True,
                                            activation="clamped_swiglu")
    assert torch.isnan(out).all()


def test_cuda_graph_replays_bias_and_mxfp4():
    operands, bias = problem("e2m1", 256, 640, bias=True)
    out = torch.empty(sum(ROWS), 128, dtype=torch.bfloat16, device="cuda")
    call = dict(out=out, is_gated=True, bias=bias, activation="clamped_swiglu", gate_layout="interleaved")
    moe_gemm_mxfp8_mxfp4_nt_groupwise(*operands, **call)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_gemm_mxfp8_mxfp4_nt_groupwise(*operands, **call)
    fresh, fresh_bias = problem("e2m1", 256, 640, bias=True)
    for mine, new in zip((*operands, bias), (*fresh, fresh_bias)):
        mine.copy_(new)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = reference_moe_gemm(*operands, k_granularity=32, is_gated=True, accumulate_dtype=torch.float64,
                                  bias=bias, activation=GatedActivation("clamped_swiglu", "interleaved"))
    assert relative_error(out, expected) <= TOLERANCE
