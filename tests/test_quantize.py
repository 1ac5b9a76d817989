"""Quantizers: scale choice, error bounds, layouts, padding, 2-D blocks, K tails, argument checks."""


import pytest
import torch

from mxfp8_moe.layout import (k_align, k_granularity_of, m_padded, num_k_blocks, to_k_major, to_mn_major_a_scale,
                              token_scale_rows, unpack_ue8m0)
from mxfp8_moe.quantize import (
    dequantize_activations,
    dequantize_weights,
    quantize_activations,
    quantize_weights,
)

K_CASES = [(32, 160), (32, 2960), (128, 160), (128, 2880), (128, 2960), (128, 512)]


def indptr(counts):
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


def wide_range(*shape, k_gran):
    """Normal values whose magnitude varies by up to 2^+-30 from one K block (and row) to the next."""
    x = torch.randn(*shape)
    blocks = num_k_blocks(shape[-1], k_gran)
    magnitude = torch.randint(-30, 31, (*shape[:-1], blocks)).repeat_interleave(k_gran, -1)
    return torch.ldexp(x, magnitude[..., : shape[-1]])


def check_scales_and_error(x, deq, exponents, k_gran, smallest=True):
    """exponents: (..., num_blocks) uint8 of each row of x. Checks, in float64:

    - the scale s = 2^(e - 127) is large enough, amax <= 448 s, and (if smallest) the smallest such
      power of two unless e hit the lower clamp 1: amax > 224 s or e == 1;
    - round to nearest e4m3 (3 mantissa bits, no saturation since amax <= 448 s) errs by at most half
      an ulp: 2^-4 |x| for normals (|x / s| >= 2^-6), 2^-10 s in the subnormal range.
    """
    assert exponents.min() >= 1 and exponents.max() <= 254
    x, deq = x.double(), deq.double()
    k = x.shape[-1]
    scale = torch.exp2(exponents.double() - 127)
    for kb in range(exponents.shape[-1]):
        cols = slice(kb * k_gran, min(k, (kb + 1) * k_gran))
        amax, s = x[..., cols].abs().amax(-1), scale[..., kb]
        assert (amax <= 448 * s).all()
        if smallest:
            assert ((amax > 224 * s) | (exponents[..., kb] == 1)).all()
        bound = torch.maximum(x[..., cols].abs() * 2**-4, s[..., None] * 2**-10)
        assert ((deq[..., cols] - x[..., cols]).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("k_gran", "k"), K_CASES)
def test_activations(k_gran, k, dtype):
    counts = [0, 5, 1, 0, 9, 3, 0]
    m_indptr = indptr(counts)
    cum_m = sum(counts)
    x = wide_range(cum_m, k, k_gran=k_gran).to(dtype)
    a, a_scale = quantize_activations(x, m_indptr, k_gran)

    assert a.dtype == torch.float8_e4m3fn and a.shape == (cum_m, k) and a.is_contiguous()
    padded = m_padded(cum_m, len(counts))
    assert a_scale.dtype == torch.int32
    assert a_scale.shape == (padded, k_align(k, k_gran))
    assert a_scale.stride() == (1, padded)

    rows = token_scale_rows(m_indptr, cum_m)
    padding = torch.ones(padded, dtype=torch.bool)
    padding[rows] = False
    assert not a_scale[padding].any()

    deq = dequantize_activations(a, a_scale, m_indptr, k_gran)
    assert deq.dtype == torch.float32 and deq.shape == (cum_m, k)
    check_scales_and_error(x, deq, unpack_ue8m0(a_scale[rows], num_k_blocks(k, k_gran)), k_gran)
    # The scales are read through their strides: a K-major copy decodes the same.
    assert torch.equal(dequantize_activations(a, a_scale.contiguous(), m_indptr, k_gran), deq)


@pytest.mark.parametrize(("k_gran", "k"), K_CASES)
def test_weights(k_gran, k):
    num_experts, n = 3, 24
    w = wide_range(num_experts, n, k, k_gran=k_gran)
    b, b_scale = quantize_weights(w, k_gran)

    assert b.dtype == torch.float8_e4m3fn and b.shape == w.shape and b.is_contiguous()
    assert b_scale.dtype == torch.int32
    assert b_scale.shape == (num_experts, n, k_align(k, k_gran))
    assert b_scale.stride() == (b_scale.shape[2] * n, 1, n)

    deq = dequantize_weights(b, b_scale, k_gran)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    check_scales_and_error(w, deq, unpack_ue8m0(b_scale, num_k_blocks(k, k_gran)), k_gran)
    assert torch.equal(dequantize_weights(b, b_scale.contiguous(), k_gran), deq)


@pytest.mark.parametrize(("k_gran", "n", "k"), [(32, 72, 160), (128, 200, 2960), (128, 128, 256)])
def test_weights_block_2d(k_gran, n, k):
    """A 2-D block's exponent is the largest of its rows' own exponents (the scale is monotone in amax),
    shared by every row of the group; the last row group may be partial."""
    w = wide_range(2, n, k, k_gran=k_gran)
    nblocks = num_k_blocks(k, k_gran)
    b, b_scale = quantize_weights(w, k_gran, block_2d=True)
    n4 = -(-n // 4) * 4
    assert b_scale.stride() == (b_scale.shape[2] * n4, 1, n4)
    shared = unpack_ue8m0(b_scale, nblocks)
    per_row = unpack_ue8m0(quantize_weights(w, k_gran)[1], nblocks)
    for start in range(0, n, k_gran):
        group = slice(start, start + k_gran)
        expected = per_row[:, group].amax(1, keepdim=True).expand_as(shared[:, group])
        assert torch.equal(shared[:, group], expected)
    # A row's share of a 2-D block scale may be larger than its own smallest scale: the bounds hold.
    check_scales_and_error(w, dequantize_weights(b, b_scale, k_gran), shared, k_gran, smallest=False)


@pytest.mark.parametrize("k_gran", [32, 128])
def test_exact_round_trip(k_gran):
    """Blocks made of e4m3 values times 2^p, with amax exactly 448 * 2^p, come back bit-exact:
    the scale is rounded up, not off by one power of two."""
    rows, k = 6, 5 * k_gran + 16
    values = (torch.randn(rows, k) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    nblocks = num_k_blocks(k, k_gran)
    cols = torch.arange(0, k, k_gran)
    values[:, cols] = 448.0
    powers = torch.randint(-100, 100, (rows, nblocks)).repeat_interleave(k_gran, -1)[:, :k]
    x = torch.ldexp(values, powers)
    a, a_scale = quantize_activations(x, indptr([rows]), k_gran)
    assert torch.equal(dequantize_activations(a, a_scale, indptr([rows]), k_gran), x)


def test_exponent_clamps():
    k_gran = 32
    x = torch.zeros(4, 3 * k_gran)
    x[1] = 1e-41  # float32 subnormal: amax / 448 is far below 2^-126
    x[2] = 3e38  # close to float32's max: 2^119 < 3e38 / 448 <= 2^120
    x[3, :k_gran] = 448.0
    a, a_scale = quantize_activations(x, indptr([4]), k_gran)
    exponents = unpack_ue8m0(a_scale, 3)
    assert exponents[0].tolist() == [1, 1, 1]  # all zero: log2(0) = -inf clamps to 1
    assert exponents[1].tolist() == [1, 1, 1]
    assert exponents[2].tolist() == [127 + 120] * 3
    assert exponents[3].tolist() == [127, 1, 1]
    check_scales_and_error(x, dequantize_activations(a, a_scale, indptr([4]), k_gran), exponents, k_gran)


def test_argument_checks():
    x, m_indptr = torch.randn(4, 64), indptr([4])
    with pytest.raises(ValueError, match="k_granularity must be one of"):
        quantize_activations(x, m_indptr, 64)
    with pytest.raises(ValueError, match="x must be 2-D"):
        quantize_activations(x[0], m_indptr)
    with pytest.raises(ValueError, match="x.dtype must be one of"):
        quantize_activations(x.int(), m_indptr)
    with pytest.raises(ValueError, match="m_indptr.dtype must be torch.int32, got torch.int64"):
        quantize_activations(x, m_indptr.long())
    with pytest.raises(ValueError, match=r"m_indptr.shape must be \(E \+ 1,\)"):
        quantize_activations(x, m_indptr[:1])
    with pytest.raises(ValueError, match="w must be 3-D"):
        quantize_weights(x)
    a, a_scale = quantize_activations(x, m_indptr, 32)
    with pytest.raises(ValueError, match=r"a_scale.shape must be \(4, 1\), got \(4, 2\)"):
        dequantize_activations(a, torch.zeros(4, 2, dtype=torch.int32), m_indptr, 32)
    with pytest.raises(ValueError, match="a.dtype must be torch.float8_e4m3fn"):
        dequantize_activations(a.float(), a_scale, m_indptr, 32)
    b, b_scale = quantize_weights(x[None], 128)
    with pytest.raises(ValueError, match="b_scale.dtype must be torch.int32"):
        dequantize_weights(b, b_scale.long(), 128)


@pytest.mark.parametrize("k", [100, 8, 0])
def test_quantizers_refuse_a_k_the_gemm_refuses(k):
    with pytest.raises(ValueError, match=rf"w.shape\[-1\] \(K\) must be a positive multiple of 16, as the grouped GEMM takes, got {k}"):
        quantize_weights(torch.randn(2, 32, k), 32)
    with pytest.raises(ValueError, match=rf"x.shape\[-1\] \(K\) must be a positive multiple of 16.*got {k}"):
        quantize_activations(torch.randn(4, k), indptr([4]), 32)


@pytest.mark.parametrize("offsets, message", [
    ([0, 2, 5], r"m_indptr\[-1\] must equal x.size\(0\) = 4, got 5"),
    ([0, 2, 3], r"m_indptr\[-1\] must equal x.size\(0\) = 4, got 3"),
    ([1, 2, 4], r"m_indptr\[0\] must be 0, got 1"),
    ([0, 3, 2, 4], r"m_indptr must be non-decreasing, got m_indptr\[1\] = 3 > m_indptr\[2\] = 2"),
])
def test_activation_offsets_on_the_host_are_checked(offsets, message):
    with pytest.raises(ValueError, match=message):
        quantize_activations(torch.randn(4, 64), torch.tensor(offsets, dtype=torch.int32), 32)


@pytest.mark.parametrize("k_gran", [32, 128])
def test_scales_carry_their_k_granularity(k_gran):
    # K = 128: both granularities give one word per row, so only the tag can tell them apart.
    a, a_scale = quantize_activations(torch.randn(6, 128), indptr([2, 4]), k_gran)
    b, b_scale = quantize_weights(torch.randn(2, 32, 128), k_gran)
    assert k_granularity_of(a_scale) == k_granularity_of(b_scale) == k_gran
    # Layout conversions keep it; a tensor made elsewhere has none.
    assert k_granularity_of(to_k_major(a_scale)) == k_granularity_of(to_mn_major_a_scale(to_k_major(a_scale))) == k_gran
    assert k_granularity_of(to_k_major(b_scale)) == k_gran
    assert k_granularity_of(a_scale.clone()) is None


@pytest.mark.parametrize("k_gran", [32, 128])
def test_gathered_rows_quantize_as_the_gathered_tensor(k_gran):
    x = torch.randn(9, 256, dtype=torch.bfloat16)
    rows = torch.tensor([4, 0, 0, 8, 2, 7, 4], dtype=torch.int64)
    m_indptr = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    a, a_scale = quantize_activations(x, m_indptr, k_gran, rows=rows)
    a_ref, a_scale_ref = quantize_activations(x[rows], m_indptr, k_gran)
    assert torch.equal(a.view(torch.uint8), a_ref.view(torch.uint8)) and torch.equal(a_scale, a_scale_ref)


def test_gathered_rows_must_be_int64():
    with pytest.raises(ValueError, match="rows must be a 1-D torch.int64"):
        quantize_activations(torch.randn(4, 64), torch.tensor([0, 4], dtype=torch.int32), 32,
                             rows=torch.zeros(4, dtype=torch.int32))
