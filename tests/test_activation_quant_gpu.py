"""The fused activation quantizer against the torch quantizer: the same bits (GPU only)."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe import quantize_activations
from mxfp8_moe.activation_quant import quantize_activations_cuda

from problems import indptr

pytestmark = pytest.mark.gpu


def tokens(rows, k):
    # Per-row magnitudes over many octaves so exponents differ, plus one all-zero K block.
    x = torch.randn(rows, k, device="cuda") * torch.exp2(torch.randint(-20, 20, (rows, 1), device="cuda").float())
    if rows:
        x[rows // 2, :16] = 0
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("k", [16, 160, 2048, 2880, 7168])
def test_same_bits_as_torch(k, k_granularity):
    m_indptr = indptr([3, 0, 17, 1, 0, 40], "cuda")
    x = tokens(61, k)
    a, a_scale = quantize_activations_cuda(x, m_indptr, k_granularity)
    a_ref, a_scale_ref = quantize_activations(x, m_indptr, k_granularity, backend="torch")
    assert torch.equal(a.view(torch.uint8), a_ref.view(torch.uint8))
    assert a_scale.stride() == a_scale_ref.stride()
    assert torch.equal(a_scale, a_scale_ref)  # padding rows included: zero in both


@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("k", [160, 2880])
def test_scale_padding_is_written_not_assumed(k, k_granularity):
    # a_scale comes uninitialised from the caching allocator: blocks of its size (and of a's) are
    # filled with ones and freed first, so padding the kernel left unwritten would show.
    m_indptr = indptr([3, 0, 17, 1, 0, 40], "cuda")
    x = tokens(61, k)
    words = -(-k // (4 * k_granularity)) * ((61 + 3 * 6) // 4 * 4)
    for _ in range(3):
        torch.full((words,), -1, dtype=torch.int32, device="cuda")
        torch.full((61 * k,), -1, dtype=torch.uint8, device="cuda")
    a_scale = quantize_activations_cuda(x, m_indptr, k_granularity)[1]
    assert torch.equal(a_scale, quantize_activations(x, m_indptr, k_granularity, backend="torch")[1])
    # With no tokens at all every word is padding.
    empty = quantize_activations_cuda(x[:0], indptr([0, 0, 0, 0, 0, 0], "cuda"), k_granularity)[1]
    assert empty.shape[0] == 16 and not empty.any()


@pytest.mark.parametrize("k_granularity", [32, 128])
def test_gathered_rows_same_bits_as_torch(k_granularity):
    x = tokens(40, 2880)
    rows = torch.randint(0, 40, (97,), device="cuda")
    m_indptr = indptr([30, 0, 60, 7], "cuda")
    a, a_scale = quantize_activations_cuda(x, m_indptr, k_granularity, rows)
    a_ref, a_scale_ref = quantize_activations(x[rows], m_indptr, k_granularity, backend="torch")
    assert torch.equal(a.view(torch.uint8), a_ref.view(torch.uint8)) and torch.equal(a_scale, a_scale_ref)


def test_a_gathered_row_outside_x_quantizes_to_nan():
    x = tokens(8, 256)
    rows = torch.tensor([3, 8, -1, 0], device="cuda")
    a, _ = quantize_activations_cuda(x, indptr([4], "cuda"), 32, rows)
    nan = a.float().isnan().all(dim=1).tolist()
    assert nan == [False, True, True, False]


def test_auto_backend_uses_the_fused_kernel(monkeypatch):
    from mxfp8_moe import activation_quant

    calls = []
    real = activation_quant.quantize_activations_cuda
    monkeypatch.setattr(activation_quant, "quantize_activations_cuda", lambda *a: calls.append(1) or real(*a))
    quantize_activations(tokens(8, 256), indptr([5, 3], "cuda"))
    assert calls == [1]


def test_empty_and_adversarial_m_indptr():
    x = tokens(20, 512)
    a, a_scale = quantize_activations_cuda(x[:0], indptr([0, 0], "cuda"), 128)
    assert a.shape == (0, 512) and a_scale.shape == (4, 1)
    # Offsets outside [0, cum_m] or decreasing: data still quantized, scales only for owned rows,
    # nothing written out of bounds (run under compute-sanitizer for the proof).
    bad = torch.tensor([-7, 12, 5, 1 << 30], dtype=torch.int32, device="cuda")
    a, a_scale = quantize_activations_cuda(x, bad, 128)
    a_ref, _ = quantize_activations(x, indptr([20], "cuda"), 128, backend="torch")
    assert torch.equal(a.view(torch.uint8), a_ref.view(torch.uint8))
    torch.cuda.synchronize()
