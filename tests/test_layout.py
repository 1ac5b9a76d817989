"""Scale layout helpers against the contract's formulas, written out as plain Python loops."""

import math
import random

import pytest
import torch

from mxfp8_moe.checks import check_k_granularity
from mxfp8_moe.layout import (
    float_to_ue8m0,
    k_align,
    m_padded,
    num_k_blocks,
    pack_ue8m0,
    scale_row_starts,
    to_k_major,
    to_mn_major_a_scale,
    to_mn_major_b_scale,
    token_scale_rows,
    ue8m0_to_float,
    unpack_ue8m0,
)


def random_counts(num_experts):
    """Rows per expert with plenty of empty and tiny experts."""
    return [random.choice([0, 0, 1, 2, 3, 4, 5, random.randrange(40)]) for _ in range(num_experts)]


def indptr(counts):
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("k_gran", [32, 128])
def test_block_counts(k_gran):
    for k in [1, k_gran - 1, k_gran, k_gran + 1, 160, 2880, 2960, 7168, *random.sample(range(1, 9000), 20)]:
        blocks = len(range(0, k, k_gran))  # block starts
        assert num_k_blocks(k, k_gran) == blocks
        assert k_align(k, k_gran) == len(range(0, blocks, 4))  # words of 4 blocks


def test_bad_granularity():
    assert check_k_granularity(32) == 32
    with pytest.raises(ValueError, match="k_granularity must be one of"):
        check_k_granularity(64)


@pytest.mark.parametrize("num_experts", [1, 2, 3, 8, 33])
def test_scale_rows_match_formula(num_experts):
    for _ in range(5):
        counts = random_counts(num_experts)
        m_indptr = indptr(counts)
        cum_m = sum(counts)
        expected_starts, expected_rows, offset = [], [], 0
        for e, count in enumerate(counts):
            start = (offset + 3 * e) // 4 * 4
            expected_starts.append(start)
            expected_rows += [start + i for i in range(count)]
            offset += count
        starts = scale_row_starts(m_indptr)
        rows = token_scale_rows(m_indptr, cum_m)
        assert starts.dtype == rows.dtype == torch.int64
        assert starts.tolist() == expected_starts
        assert rows.tolist() == expected_rows
        # What the padding is for: 4-aligned starts, experts' rows never overlap, all inside m_padded.
        padded = m_padded(cum_m, num_experts)
        assert padded == (cum_m + 3 * num_experts) // 4 * 4
        for e, count in enumerate(counts):
            assert expected_starts[e] % 4 == 0
            end = expected_starts[e + 1] if e + 1 < num_experts else padded
            assert expected_starts[e] + count <= end
        assert len(set(expected_rows)) == cum_m


def test_token_scale_rows_all_empty():
    m_indptr = torch.zeros(5, dtype=torch.int32)
    assert token_scale_rows(m_indptr, 0).shape == (0,)
    assert m_padded(0, 4) == 12


@pytest.mark.parametrize("num_blocks", range(1, 10))
def test_pack_unpack_round_trip(num_blocks):
    exponents = torch.randint(0, 256, (3, 5, num_blocks), dtype=torch.uint8)
    words = pack_ue8m0(exponents)
    assert words.dtype == torch.int32
    assert words.shape == (3, 5, math.ceil(num_blocks / 4))
    assert torch.equal(unpack_ue8m0(words, num_blocks), exponents)
    # Unused trailing bytes are zero.
    assert not unpack_ue8m0(words, 4 * words.shape[-1])[..., num_blocks:].any()


def test_pack_byte_order():
    exponents = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 0xFF, 0x80]], dtype=torch.uint8)
    words = pack_ue8m0(exponents)
    assert words.tolist() == [[0x04030201, 5], [-(1 << 24), 0x80]]
    if torch.tensor([1], dtype=torch.int32).view(torch.uint8)[0] == 1:  # little-endian host
        # Block 0 at the lowest address, as the kernels read it.
        assert torch.equal(words[0].view(torch.uint8)[:5], exponents[0])


def test_unpack_strided_words():
    words = pack_ue8m0(torch.randint(0, 256, (4, 12, 7), dtype=torch.uint8))
    for view in (words.transpose(0, 1), words[:, ::2], to_mn_major_b_scale(words)):
        assert not view.is_contiguous()
        assert torch.equal(unpack_ue8m0(view, 7), unpack_ue8m0(view.contiguous(), 7))


def test_ue8m0_decode():
    codes = torch.arange(256).to(torch.uint8)
    values = ue8m0_to_float(codes)
    assert values.dtype == torch.float32
    # 2^-127 is a float32 subnormal; it must still be exact.
    expected = torch.tensor([math.ldexp(1.0, e - 127) for e in range(255)], dtype=torch.float64)
    assert torch.equal(values[:255].double(), expected)
    assert values[0].item() == 2.0**-127
    assert values[127].item() == 1.0
    assert values[254].item() == 2.0**127
    assert math.isnan(values[255].item())
    assert torch.equal(float_to_ue8m0(values), codes)
    assert torch.equal(float_to_ue8m0(expected), codes[:255])


def test_mn_major_a_scale():
    a_scale = torch.randint(-(2**31), 2**31, (20, 3), dtype=torch.int32)
    mn = to_mn_major_a_scale(a_scale)
    assert mn.stride() == (1, 20)
    assert mn.t().is_contiguous()
    assert torch.equal(mn, a_scale)
    k_major = to_k_major(mn)
    assert k_major.is_contiguous() and torch.equal(k_major, a_scale)


@pytest.mark.parametrize("n", [1, 6, 8, 13])
def test_mn_major_b_scale(n):
    num_experts, words = 3, 2
    b_scale = torch.randint(1, 2**31, (num_experts, n, words), dtype=torch.int32)
    n4 = math.ceil(n / 4) * 4
    mn = to_mn_major_b_scale(b_scale)
    assert mn.shape == b_scale.shape
    assert mn.stride() == (words * n4, 1, n4)
    assert torch.equal(mn, b_scale)
    storage = torch.as_strided(mn, (num_experts, words, n4), (words * n4, n4, 1))
    assert torch.equal(storage[:, :, :n], b_scale.transpose(1, 2))
    assert not storage[:, :, n:].any()
    assert torch.equal(to_k_major(mn), b_scale)
