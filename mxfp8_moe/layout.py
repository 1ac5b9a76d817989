"""Scale layout helpers: counts, the padded a_scale row map, UE8M0 packing and the MN-major views.

Everything here follows docs/CONTRACT.md ("Scales"). The tensor functions run on whatever device
their inputs live on and never read a device tensor's values on the host, so they are safe inside
CUDA graph capture.
"""

from __future__ import annotations

import torch

from .arith import ceil_div, round_up
from .checks import check_arg

# One UE8M0 byte per K block, four per int32 word, block 4w + i in byte i (bits 8i..8i+7).

# Scale tensors made by this package (quantizers, converters, the layout conversions below) carry
# the k granularity they were made at in this attribute: the GEMM refuses a call that states
# another, which for K <= 128 no shape could reveal.
K_GRANULARITY_TAG = "mxfp8_moe_k_granularity"


def tag_k_granularity(scale: torch.Tensor, k_granularity: int) -> torch.Tensor:
    """Record on `scale` the k granularity it was made at; returns `scale`."""
    setattr(scale, K_GRANULARITY_TAG, k_granularity)
    return scale


def k_granularity_of(scale: torch.Tensor) -> int | None:
    """The k granularity recorded on a scale tensor, or None if nothing was recorded."""
    return getattr(scale, K_GRANULARITY_TAG, None)


def _same_tag(source: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    made_at = k_granularity_of(source)
    return result if made_at is None else tag_k_granularity(result, made_at)


def num_k_blocks(k: int, k_granularity: int) -> int:
    """Number of K blocks (one scale each): ceil(k / k_granularity); the last block may be partial."""
    return ceil_div(k, k_granularity)


def k_align(k: int, k_granularity: int) -> int:
    """Int32 words per scale row: ceil(k / (4 * k_granularity)), four UE8M0 bytes per word."""
    return ceil_div(k, 4 * k_granularity)


def m_padded(cum_m: int, num_experts: int) -> int:
    """Rows of a_scale: (cum_m + 3 * E) // 4 * 4, room for every expert's rows padded to a multiple of 4."""
    return (cum_m + 3 * num_experts) // 4 * 4


def scale_row_starts(m_indptr: torch.Tensor) -> torch.Tensor:
    """First a_scale row of each expert, (m_indptr[e] + 3 * e) // 4 * 4, as an int64 (E,) tensor."""
    experts = torch.arange(m_indptr.numel() - 1, device=m_indptr.device)
    return (m_indptr[:-1].long() + 3 * experts) // 4 * 4


def token_scale_rows(m_indptr: torch.Tensor, cum_m: int) -> torch.Tensor:
    """The a_scale row of every token, as an int64 (cum_m,) tensor on m_indptr's device.

    Token i of expert e (global row m_indptr[e] + i) maps to scale_row_starts(m_indptr)[e] + i.
    cum_m comes from a shape (a.size(0)), not from m_indptr[-1], so nothing is read on the host.
    """
    bounds = m_indptr.long()
    tokens = torch.arange(cum_m, device=m_indptr.device)
    # The owner of token t is the number of experts that end at or before t; empty experts end where
    # they start, so they are skipped. The clamp keeps the gathers in bounds if m_indptr[-1] < cum_m.
    expert = torch.searchsorted(bounds[1:], tokens, right=True).clamp_(max=bounds.numel() - 2)
    return scale_row_starts(m_indptr)[expert] + (tokens - bounds[expert])


def pack_ue8m0(exponents: torch.Tensor) -> torch.Tensor:
    """Pack UE8M0 bytes (..., nblocks) uint8 into int32 words (..., ceil(nblocks / 4)).

    Block 4w + i goes to byte i (the low byte first) of word w; unused trailing bytes are 0.
    """
    check_arg(exponents.dtype == torch.uint8, "exponents", "torch.uint8", exponents.dtype)
    nblocks = exponents.shape[-1]
    padded = torch.nn.functional.pad(exponents, (0, -nblocks % 4)).unflatten(-1, (-1, 4))
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=exponents.device)  # no host copy: graph-safe
    # Assemble in int64, where byte 3 cannot overflow, then wrap to the int32 bit pattern explicitly
    # (an int64 -> int32 cast of values >= 2^31 is not something to rely on).
    words = (padded.long() << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_ue8m0(words: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Unpack int32 words (..., k_align) into UE8M0 bytes (..., num_blocks) uint8.

    Works on any strides (MN-major views included): it only uses elementwise ops.
    """
    check_arg(words.dtype == torch.int32, "words", "torch.int32", words.dtype)
    capacity = 4 * words.shape[-1]
    check_arg(0 <= num_blocks <= capacity, "num_blocks", f"in [0, {capacity}] (4 per word)", num_blocks)
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=words.device)
    # The arithmetic shift drags the sign bit in for byte 3; the mask drops it.
    blocks = (words.unsqueeze(-1) >> shifts) & 0xFF
    return blocks.flatten(-2)[..., :num_blocks].to(torch.uint8)


def ue8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """Decode UE8M0 bytes to float32 2^(e - 127), exactly; 0xFF decodes to NaN.

    UE8M0 and float32 share the exponent bias, so e << 23 is the float32 bit pattern of 2^(e - 127)
    for e in 1..254. e = 0 is the float32 subnormal 2^-127 (mantissa bit 22 alone), and 0xFF would be
    +inf, so it gets a quiet NaN pattern instead. Building bits avoids any libm rounding.
    """
    check_arg(e.dtype == torch.uint8, "e", "torch.uint8", e.dtype)
    e = e.to(torch.int32)
    bits = torch.where(e == 0, 1 << 22, e << 23)
    bits = torch.where(e == 0xFF, 0x7FC00000, bits)
    return bits.view(torch.float32)


def float_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Encode powers of two in [2^-127, 2^127] (and NaN) as UE8M0 bytes; inverse of ue8m0_to_float.

    Reads the float32 exponent field, so mantissa bits of a non-power-of-two are ignored; the result
    for such values, or for ones out of range, is unspecified (checking would cost a host sync).
    """
    bits = scale.to(torch.float32).view(torch.int32)
    # 2^-127 is subnormal: its exponent field is 0, which is also its UE8M0 code.
    return ((bits >> 23) & 0xFF).to(torch.uint8)


def to_mn_major_a_scale(a_scale: torch.Tensor) -> torch.Tensor:
    """Return a_scale (m_padded, k_align) as FlashInfer lays it out: the transpose view of a
    contiguous (k_align, m_padded) tensor, strides (1, m_padded)."""
    return _same_tag(a_scale, a_scale.t().contiguous().t())


def to_mn_major_b_scale(b_scale: torch.Tensor) -> torch.Tensor:
    """Return b_scale (E, n, k_align) as FlashInfer lays it out: a view of a contiguous
    (E, k_align, align4(n)) tensor, strides (k_align * align4(n), 1, align4(n)); pad columns are 0."""
    num_experts, n, words = b_scale.shape
    storage = b_scale.new_zeros(num_experts, words, round_up(n, 4))
    storage[:, :, :n] = b_scale.transpose(1, 2)
    return _same_tag(b_scale, storage.transpose(1, 2)[:, :n])


def to_k_major(scale: torch.Tensor) -> torch.Tensor:
    """Return a scale tensor in K-major (row-major, contiguous) layout, the same values."""
    return _same_tag(scale, scale.contiguous())
