"""The block-by-block reference against an independent float64 computation from dequantized inputs."""

import random

import pytest
import torch
import torch.nn.functional as F

from mxfp8_moe.layout import (
    k_align,
    m_padded,
    num_k_blocks,
    pack_ue8m0,
    to_mn_major_a_scale,
    to_mn_major_b_scale,
)
from mxfp8_moe.quantize import (
    dequantize_activations,
    dequantize_weights,
    quantize_activations,
    quantize_weights,
)
from mxfp8_moe.reference import reference_moe_gemm

COUNTS = [[0, 1, 7, 0, 13], [1], [0, 0, 3, 1], [5, 0]]


def random_fp8(*shape):
    return (torch.randn(*shape) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)


class Problem:
    """Random e4m3 operands and UE8M0 exponents, with the scale tensors built from the contract's text
    (Python loops, not the package's row map). Padding rows of a_scale hold garbage, NaN bytes included,
    since their content must not matter."""

    def __init__(self, counts, n, k, k_gran, mn_major=True):
        self.counts, self.k_gran = counts, k_gran
        num_experts, cum_m, nblocks = len(counts), sum(counts), num_k_blocks(k, k_gran)
        self.m_indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        self.a, self.b = random_fp8(cum_m, k), random_fp8(num_experts, n, k)
        # Scales 2^-7 .. 2^7 keep every product far from float32's limits.
        self.ea = torch.randint(120, 135, (cum_m, nblocks), dtype=torch.uint8)
        self.eb = torch.randint(120, 135, (num_experts, n, nblocks), dtype=torch.uint8)
        self.mn_major = mn_major

    def rows(self):
        """The contract's a_scale row of every token: (m_indptr[e] + 3 e) // 4 * 4 + i."""
        offsets = self.m_indptr.tolist()
        return [
            (offsets[e] + 3 * e) // 4 * 4 + i for e, count in enumerate(self.counts) for i in range(count)
        ]

    def scales(self):
        cum_m, k = self.a.shape
        words = k_align(k, self.k_gran)
        shape = (m_padded(cum_m, len(self.counts)), words)
        a_scale = torch.randint(-(2**31), 2**31, shape, dtype=torch.int32)
        a_scale[self.rows()] = pack_ue8m0(self.ea)
        b_scale = pack_ue8m0(self.eb)
        if self.mn_major:
            return to_mn_major_a_scale(a_scale), to_mn_major_b_scale(b_scale)
        return a_scale, b_scale

    def reference(self, **kwargs):
        a_scale, b_scale = self.scales()
        return reference_moe_gemm(
            self.a, self.b, a_scale, b_scale, self.m_indptr, k_granularity=self.k_gran, **kwargs
        )

    def expected(self, is_gated=False):
        """float64: dequantize (2^(e - 127) per block), then one matmul per expert."""
        k = self.a.shape[1]

        def dequantize(data, exponents):
            scale = torch.exp2(exponents.double() - 127).repeat_interleave(self.k_gran, -1)[..., :k]
            return data.double() * scale

        a, b = dequantize(self.a, self.ea), dequantize(self.b, self.eb)
        offsets = self.m_indptr.tolist()
        out = torch.cat([a[offsets[e] : offsets[e + 1]] @ b[e].T for e in range(len(self.counts))])
        if is_gated:
            up, gate = out.chunk(2, dim=1)
            return up * F.silu(gate)
        return out


def relative_error(x, y):
    return ((x.double() - y).norm() / y.norm()).item()


@pytest.mark.parametrize("is_gated", [False, True])
@pytest.mark.parametrize("mn_major", [True, False], ids=["MN", "K"])
@pytest.mark.parametrize(("k_gran", "k"), [(32, 160), (32, 288), (128, 256), (128, 160), (128, 2960)])
@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_matches_float64(counts, k_gran, k, mn_major, is_gated):
    n = 48
    problem = Problem(counts, n, k, k_gran, mn_major)
    expected = problem.expected(is_gated)
    out = problem.reference(is_gated=is_gated)
    assert out.dtype == torch.float32
    assert out.shape == (sum(counts), n // 2 if is_gated else n)
    assert relative_error(out, expected) < 1e-5
    out64 = problem.reference(is_gated=is_gated, accumulate_dtype=torch.float64)
    assert out64.dtype == torch.float64
    assert relative_error(out64, expected) < 1e-13


def test_no_rows():
    problem = Problem([0, 0, 0], 32, 128, 32)
    assert problem.reference().shape == (0, 32)
    assert problem.reference(is_gated=True).shape == (0, 16)


@pytest.mark.parametrize("k_gran", [32, 128])
def test_quantized_inputs(k_gran):
    """Through the package's quantizers: exact against float64, close to the unquantized product."""
    counts, n, k = [3, 0, 9, 1], 64, 2880
    m_indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    x, w = torch.randn(sum(counts), k), torch.randn(len(counts), n, k)
    a, a_scale = quantize_activations(x, m_indptr, k_gran)
    b, b_scale = quantize_weights(w, k_gran, block_2d=True)
    out = reference_moe_gemm(a, b, a_scale, b_scale, m_indptr, k_granularity=k_gran)
    # Dequantized operands are exact in float32 (e4m3 values times powers of two).
    a_deq = dequantize_activations(a, a_scale, m_indptr, k_gran).double()
    b_deq = dequantize_weights(b, b_scale, k_gran).double()
    offsets = m_indptr.tolist()
    expected = torch.cat([a_deq[offsets[e] : offsets[e + 1]] @ b_deq[e].T for e in range(len(counts))])
    assert relative_error(out, expected) < 1e-5
    unquantized = torch.cat([x[offsets[e] : offsets[e + 1]] @ w[e].T for e in range(len(counts))])
    assert F.cosine_similarity(out.flatten(), unquantized.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("mn_major", [True, False], ids=["MN", "K"])
@pytest.mark.parametrize("k_gran", [32, 128])
def test_nan_scale_propagation(k_gran, mn_major):
    """A 0xFF byte poisons exactly the outputs whose sum uses it."""
    counts, n = [2, 0, 3, 4], 16
    problem = Problem(counts, n, 2 * k_gran + 32, k_gran, mn_major)
    offsets = problem.m_indptr.tolist()
    nblocks = problem.ea.shape[1]

    token = random.randrange(sum(counts))
    problem.ea[token, random.randrange(nblocks)] = 0xFF
    expert, column = 2, random.randrange(n)
    problem.eb[expert, column, random.randrange(nblocks)] = 0xFF
    expected = torch.zeros(sum(counts), n, dtype=torch.bool)
    expected[token] = True
    expected[offsets[expert] : offsets[expert + 1], column] = True
    assert torch.equal(problem.reference().isnan(), expected)

    # Gated: a NaN in the gate half (row N + j of b) reaches output column j of that expert only.
    problem = Problem(counts, n, 2 * k_gran, k_gran, mn_major)
    problem.eb[expert, n // 2 + column % (n // 2), 0] = 0xFF
    expected = torch.zeros(sum(counts), n // 2, dtype=torch.bool)
    expected[offsets[expert] : offsets[expert + 1], column % (n // 2)] = True
    assert torch.equal(problem.reference(is_gated=True).isnan(), expected)


def test_argument_checks():
    problem = Problem([2, 3], 16, 128, 32)
    a_scale, b_scale = problem.scales()
    args = (problem.a, problem.b, a_scale, b_scale, problem.m_indptr)
    with pytest.raises(ValueError, match="k_granularity must be one of"):
        reference_moe_gemm(*args, k_granularity=64)
    with pytest.raises(ValueError, match=r"a_scale.shape must be \(8, 1\), got \(4, 1\)"):
        reference_moe_gemm(problem.a, problem.b, a_scale[:4], *args[3:], k_granularity=32)
    with pytest.raises(ValueError, match=r"b.shape\[2\] must be a.shape\[1\] = 128, got 96"):
        reference_moe_gemm(problem.a, problem.b[..., :96], *args[2:], k_granularity=32)
    for offsets, message in (([0, 3, 4], r"m_indptr\[-1\] must equal cum_m = a.size\(0\) = 5, got 4"),
                             ([1, 3, 5], r"m_indptr\[0\] must be 0, got 1"),
                             ([0, 3, 2], r"m_indptr must be non-decreasing, got m_indptr\[1\] = 3 > m_indptr\[2\] = 2")):
        with pytest.raises(ValueError, match=message):
            bad = torch.tensor(offsets, dtype=torch.int32)
            reference_moe_gemm(problem.a, problem.b, a_scale, b_scale, bad, k_granularity=32)
    with pytest.raises(ValueError, match="accumulate_dtype must be one of"):
        reference_moe_gemm(*args, k_granularity=32, accumulate_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="even"):
        odd = Problem([2, 3], 15, 128, 32)
        odd.reference(is_gated=True)
