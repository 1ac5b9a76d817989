"""MXFP4 weights (mxfp8_moe/mxfp4.py): e2m1 codes and packing, the quantizer's scale and rounding,
and the reference GEMM with MXFP4 weights, a bias and the gated activations (CPU)."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe import quantize_activations, reference_moe_gemm
from mxfp8_moe.epilogue import GatedActivation
from mxfp8_moe.layout import k_granularity_of, ue8m0_to_float, unpack_ue8m0
from mxfp8_moe.mxfp4 import (E2M1_MAGNITUDES, dequantize_weights_mxfp4, e2m1_to_float, pack_e2m1,
                             quantize_weights_mxfp4, unpack_e2m1)
from mxfp8_moe.quantize import dequantize_activations


def test_codes_and_packing():
    assert e2m1_to_float(torch.arange(16)).tolist() == list(E2M1_MAGNITUDES) + [-m for m in E2M1_MAGNITUDES]
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(packed[..., 0] & 0xF, codes[..., 0]) and torch.equal(packed[..., 0] >> 4, codes[..., 1])
    assert torch.equal(unpack_e2m1(packed), codes)


def test_quantizer_scale_and_rounding():
    # Block maxima at, just above and below 6 * 2^p, and the ties between e2m1 values.
    w = torch.zeros(1, 4, 32)
    w[0, 0, :8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # scale 1: ties to the even code
    w[0, 1, 0] = 6.0001  # scale 2
    w[0, 2, 0] = 0.375  # 0.375 / 6 -> scale 2^-4: 6 exactly
    w[0, 3, :2] = torch.tensor([-12.0, 3.0])  # scale 2: -6, 1.5
    b, b_scale = quantize_weights_mxfp4(w)
    scales = ue8m0_to_float(unpack_ue8m0(b_scale, 1))[0, :, 0]
    assert scales.tolist() == [1.0, 2.0, 2.0 ** -4, 2.0]
    values = e2m1_to_float(unpack_e2m1(b))[0]
    assert values[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert values[1, 0] == 3.0 and values[2, 0] == 6.0 and values[3, :2].tolist() == [-6.0, 1.5]
    assert k_granularity_of(b_scale) == 32


@pytest.mark.parametrize("shape", [(2, 16, 64), (3, 40, 2880)])
def test_quantizer_error_and_round_trip(shape):
    w = torch.randn(*shape) * torch.exp2(torch.randint(-8, 8, (*shape[:2], 1)).float())
    b, b_scale = quantize_weights_mxfp4(w)
    values = dequantize_weights_mxfp4(b, b_scale)
    # Within half a step of e2m1 at the block's scale: at most 1/4 of the largest step (2 of 6).
    blocks = w.unflatten(-1, (-1, 32))
    step = ue8m0_to_float(unpack_ue8m0(b_scale, shape[-1] // 32)).unsqueeze(-1)
    assert ((values.unflatten(-1, (-1, 32)) - blocks).abs() <= step + 1e-30).all()
    # Quantizing the dequantized values gives them back exactly (the encoding may differ: a block
    # whose values all rounded below 3 * scale takes a scale half as large).
    assert torch.equal(dequantize_weights_mxfp4(*quantize_weights_mxfp4(values)), values)


def test_quantizer_in_expert_chunks_gives_the_same_bits(monkeypatch):
    # Large layers are quantized a few experts at a time (the temporaries would not fit a GPU).
    import mxfp8_moe.mxfp4 as mxfp4

    w = torch.randn(7, 48, 96) * torch.logspace(-3, 3, 7).view(7, 1, 1)
    whole_b, whole_scale = mxfp4.quantize_weights_mxfp4(w)
    monkeypatch.setattr(mxfp4, "_CHUNK_VALUES", 2 * 48 * 96)  # chunks of 2, 2, 2, 1 experts
    b, scale = mxfp4.quantize_weights_mxfp4(w)
    assert torch.equal(b, whole_b) and torch.equal(scale, whole_scale)
    assert scale.stride() == whole_scale.stride() and k_granularity_of(scale) == 32


def test_quantizer_refuses_k_not_a_multiple_of_32():
    with pytest.raises(ValueError, match=r"w.shape\[-1\] \(K\) must be a positive multiple of 32, got 48"):
        quantize_weights_mxfp4(torch.randn(1, 16, 48))


def _independent_reference(a, a_scale, b, b_scale, m_indptr, bias, activation):
    """Dequantize, multiply in float64, add the bias, activate: not the reference's block loop."""
    x = dequantize_activations(a, a_scale, m_indptr, 32).double()
    w = dequantize_weights_mxfp4(b, b_scale).double()
    rows = []
    for e in range(w.shape[0]):
        y = x[m_indptr[e]:m_indptr[e + 1]] @ w[e].T + bias[e].double()
        rows.append(activation(y) if activation is not None else y)
    return torch.cat(rows)


@pytest.mark.parametrize("activation", [None, GatedActivation(), GatedActivation("clamped_swiglu"),
                                        GatedActivation("clamped_swiglu", "interleaved", alpha=1.5, limit=3.0),
                                        GatedActivation("swiglu", "interleaved")],
                         ids=["plain", "swiglu", "clamped", "clamped-interleaved", "swiglu-interleaved"])
def test_reference_with_mxfp4_weights_bias_and_activation(activation):
    counts = torch.tensor([3, 0, 6, 1])
    m_indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
    a, a_scale = quantize_activations(torch.randn(10, 96) * 4, m_indptr, 32)
    b, b_scale = quantize_weights_mxfp4(torch.randn(4, 64, 96))
    bias = torch.randn(4, 64)
    result = reference_moe_gemm(a, b, a_scale, b_scale, m_indptr, k_granularity=32, is_gated=activation is not None,
                                accumulate_dtype=torch.float64, bias=bias,
                                activation=activation or GatedActivation())
    expected = _independent_reference(a, a_scale, b, b_scale, m_indptr, bias, activation)
    assert result.shape == expected.shape == (10, 32 if activation else 64)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_clamped_swiglu_clamps():
    act = GatedActivation("clamped_swiglu", limit=7.0, alpha=1.702)
    y = torch.tensor([[20.0, -20.0, 20.0, 20.0]], dtype=torch.float64)  # [up; gate] halves: up (20, -20), gate (20, 20)
    out = act(y)
    gate = torch.tensor(7.0, dtype=torch.float64)
    assert torch.allclose(out, torch.stack([(7 + 1) * gate * torch.sigmoid(1.702 * gate),
                                            (-7 + 1) * gate * torch.sigmoid(1.702 * gate)])[None])


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="gelu"), "activation must be one of 'swiglu', 'clamped_swiglu', got 'gelu'"),
    (dict(layout="pairs"), "gate_layout must be one of 'halves', 'interleaved', got 'pairs'"),
    (dict(kind="clamped_swiglu", limit=0.0), "clamped_swiglu needs a positive limit"),
])
def test_activation_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedActivation(**kwargs)


def test_reference_refuses_mxfp4_at_granularity_128():
    m_indptr = torch.tensor([0, 4], dtype=torch.int32)
    a, a_scale = quantize_activations(torch.randn(4, 64), m_indptr, 128)
    b, _ = quantize_weights_mxfp4(torch.randn(1, 16, 64))
    with pytest.raises(ValueError, match="k_granularity must be 32 for MXFP4 weights, got 128"):
        reference_moe_gemm(a, b, a_scale, torch.zeros(1, 16, 1, dtype=torch.int32), m_indptr, k_granularity=128)
