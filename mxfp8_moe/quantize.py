"""MXFP8 quantizers and dequantizers for the grouped GEMM's operands (reference quality, pure torch).

Scales follow the recipe of FlashInfer's tests (docs/CONTRACT.md): per (row, K block),
scale = amax / 448 rounded up to a power of two, biased exponent clamped to [1, 254], data =
clamp(x / scale, +-448) in float8_e4m3fn. The amax of a partial last K block covers its existing
elements only. Scales come back packed as UE8M0 int32 words in FlashInfer's MN-major layout; the
dequantizers read scales through their strides, so either layout works there.
"""

from __future__ import annotations

import math

import torch

from .checks import check_arg, check_k_granularity, check_m_indptr, check_offsets, check_scale
from .layout import (
    k_align,
    m_padded,
    num_k_blocks,
    pack_ue8m0,
    tag_k_granularity,
    to_mn_major_b_scale,
    token_scale_rows,
    ue8m0_to_float,
    unpack_ue8m0,
)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what the quantizers take
K_MULTIPLE = 16  # the GEMM's K is a multiple of 16 bytes (its 16-byte vector loads)


def k_blocks(x: torch.Tensor, k_granularity: int) -> torch.Tensor:
    """(..., k) -> float32 (..., num_k_blocks, k_granularity), the K tail zero-padded.

    Zero padding leaves each block's amax unchanged, so a tail block's scale sees only its elements.
    """
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.to(torch.float32), (0, -k % k_granularity))
    return padded.unflatten(-1, (-1, k_granularity))


def scale_exponents(amax: torch.Tensor, element_max: float = FP8_MAX) -> torch.Tensor:
    """Biased UE8M0 exponent of ceil_pow2(amax / element_max), clamped to [1, 254], as uint8.

    With amax = m * 2^q and element_max = f * 2^p (m, f in [0.5, 1); 448 = 0.875 * 2^9, e2m1's 6 =
    0.75 * 2^3), amax / element_max = (m / f) * 2^(q - p) where m / f lies in (0.5, 2): the smallest
    power of two at or above it is 2^(q - p), or 2^(q - p + 1) when m > f. This is exact; dividing
    and taking log2 could round across a power of two.
    """
    max_mantissa, max_exponent = math.frexp(element_max)
    mantissa, exponent = torch.frexp(amax)
    biased = exponent + (mantissa > max_mantissa).to(torch.int32) + (127 - max_exponent)
    # amax = 0 means log2 = -inf: the smallest scale (frexp's exponent 0 would give a wrong 118).
    biased = torch.where(amax > 0, biased, 1)
    return biased.clamp(1, 254).to(torch.uint8)


def _encode(blocks: torch.Tensor, exponents: torch.Tensor, k: int) -> torch.Tensor:
    """Divide (..., nb, kg) blocks by their scales, saturate, cast to e4m3, crop to k.

    Dividing by a power of two is exact down to float32's subnormals, far below e4m3's resolution.
    """
    scaled = blocks / ue8m0_to_float(exponents).unsqueeze(-1)
    data = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return data.flatten(-2)[..., :k].contiguous()


def _decode(data: torch.Tensor, words: torch.Tensor, k_granularity: int) -> torch.Tensor:
    """float32 data * scale for data (..., k) and its scale words (..., k_align) (any strides)."""
    k = data.shape[-1]
    scales = ue8m0_to_float(unpack_ue8m0(words, num_k_blocks(k, k_granularity)))
    return data.to(torch.float32) * scales.repeat_interleave(k_granularity, dim=-1)[..., :k]


def _check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    check_arg(t.dtype in FLOAT_DTYPES, f"{name}.dtype", f"one of {FLOAT_DTYPES}", t.dtype)
    check_arg(t.dim() == ndim, name, f"{ndim}-D", f"shape {tuple(t.shape)}")
    k = t.shape[-1]
    check_arg(k > 0 and k % K_MULTIPLE == 0, f"{name}.shape[-1] (K)",
              f"a positive multiple of {K_MULTIPLE}, as the grouped GEMM takes", k)


def check_fp8(name: str, t: torch.Tensor, ndim: int) -> None:
    """`t` is a float8_e4m3fn tensor of `ndim` dimensions (else ValueError naming `name`)."""
    check_arg(t.dtype == torch.float8_e4m3fn, f"{name}.dtype", "torch.float8_e4m3fn", t.dtype)
    check_arg(t.dim() == ndim, name, f"{ndim}-D", f"shape {tuple(t.shape)}")


def quantize_activations(
    x: torch.Tensor, m_indptr: torch.Tensor, k_granularity: int = 128, *, backend: str = "auto",
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize packed activations per (row, K block), optionally gathering them from x first.

    backend "auto" runs the fused CUDA kernel (mxfp8_moe.activation_quant; same bits for finite
    inputs, one pass, no host sync) for contiguous bf16 CUDA tokens on sm_89 and later, and plain
    torch otherwise; "torch" forces plain torch.

    Args:
        x: (cum_m, k) float32 / float16 / bfloat16 / float64 (quantized from float32), the tokens
            of all experts back to back.
        m_indptr: (E + 1,) int32 CSR offsets of the experts' rows in x (moved to x's device, not
            read on the host).
        k_granularity: 32 or 128 elements of K per scale.
        rows: optional (cum_m,) int64 row indices: quantize x[rows] (an MoE block's token copies in
            expert order) without materializing it; the fused kernel reads each row where it lies,
            and a row index outside x quantizes to NaN there rather than reading outside.

    Returns:
        a: (cum_m, k) float8_e4m3fn, contiguous.
        a_scale: (m_padded, k_align) int32 UE8M0 words in MN-major layout (strides (1, m_padded));
            token i of expert e sits at row (m_indptr[e] + 3 e) // 4 * 4 + i, padding rows are 0.
    """
    check_k_granularity(k_granularity)
    _check_float("x", x, 2)
    num_experts = check_m_indptr(m_indptr)
    check_arg(backend in ("auto", "torch"), "backend", '"auto" or "torch"', repr(backend))
    if rows is not None:
        check_arg(rows.dim() == 1 and rows.dtype == torch.int64 and rows.device == x.device, "rows",
                  f"a 1-D torch.int64 tensor on {x.device}", f"{rows.dim()}-D {rows.dtype} on {rows.device}")
    cum_m, k = x.shape if rows is None else (rows.shape[0], x.shape[1])
    if m_indptr.device.type == "cpu":  # free to read: no device sync
        check_offsets(m_indptr.tolist(), cum_m, rows="x.size(0)" if rows is None else "rows.size(0)")
    if backend == "auto" and m_indptr.device == x.device:
        from . import activation_quant  # the GPU path imports the JIT runtime: only when needed

        if activation_quant.supported(x):
            return activation_quant.quantize_activations_cuda(x, m_indptr.contiguous(), k_granularity,
                                                              None if rows is None else rows.contiguous())
    if rows is not None:
        x = x[rows]

    blocks = k_blocks(x, k_granularity)
    exponents = scale_exponents(blocks.abs().amax(-1))
    a = _encode(blocks, exponents, k)

    # Fill the contiguous (k_align, m_padded) storage through its transpose: the result is the
    # MN-major view FlashInfer's quantizer hands over, with no second copy.
    storage = x.new_zeros(k_align(k, k_granularity), m_padded(cum_m, num_experts), dtype=torch.int32)
    a_scale = storage.t()
    a_scale[token_scale_rows(m_indptr.to(x.device), cum_m)] = pack_ue8m0(exponents)
    return a, tag_k_granularity(a_scale, k_granularity)


def quantize_weights(
    w: torch.Tensor, k_granularity: int = 128, block_2d: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize expert weights per (row, K block), or per (k_granularity x k_granularity) block.

    Args:
        w: (E, n, k) float32 / float16 / bfloat16 / float64 (quantized from float32).
        k_granularity: 32 or 128 elements of K per scale.
        block_2d: share one scale across each group of k_granularity rows (the last group may be
            partial), as 2-D block-scaled checkpoints do; the scale is broadcast to every row.

    Returns:
        b: (E, n, k) float8_e4m3fn, contiguous.
        b_scale: (E, n, k_align) int32 UE8M0 words in MN-major layout
            (strides (k_align * align4(n), 1, align4(n))).
    """
    check_k_granularity(k_granularity)
    _check_float("w", w, 3)
    n, k = w.shape[1:]

    blocks = k_blocks(w, k_granularity)
    amax = blocks.abs().amax(-1)  # (E, n, nb)
    if block_2d:
        # Zero rows pad n to whole row groups without changing any group's amax.
        groups = torch.nn.functional.pad(amax, (0, 0, 0, -n % k_granularity))
        group_amax = groups.unflatten(1, (-1, k_granularity)).amax(2)
        amax = group_amax.repeat_interleave(k_granularity, dim=1)[:, :n]
    exponents = scale_exponents(amax)
    b_scale = tag_k_granularity(to_mn_major_b_scale(pack_ue8m0(exponents)), k_granularity)
    return _encode(blocks, exponents, k), b_scale


def dequantize_activations(
    a: torch.Tensor, a_scale: torch.Tensor, m_indptr: torch.Tensor, k_granularity: int
) -> torch.Tensor:
    """Decode (cum_m, k) float8_e4m3fn activations and their (m_padded, k_align) a_scale to float32.

    a_scale is read through its strides, so MN-major and K-major both work. The result is exact
    (an e4m3 value times a power of two) unless it leaves float32's range. A 0xFF scale gives NaN.
    """
    check_k_granularity(k_granularity)
    check_fp8("a", a, 2)
    num_experts = check_m_indptr(m_indptr)
    cum_m, k = a.shape
    check_scale("a_scale", a_scale, (m_padded(cum_m, num_experts), k_align(k, k_granularity)))
    words = a_scale[token_scale_rows(m_indptr.to(a.device), cum_m)]
    return _decode(a, words, k_granularity)


def dequantize_weights(b: torch.Tensor, b_scale: torch.Tensor, k_granularity: int) -> torch.Tensor:
    """Decode (E, n, k) float8_e4m3fn weights and their (E, n, k_align) b_scale to float32.

    b_scale is read through its strides, so MN-major and K-major both work. A 0xFF scale gives NaN.
    """
    check_k_granularity(k_granularity)
    check_fp8("b", b, 3)
    num_experts, n, k = b.shape
    check_scale("b_scale", b_scale, (num_experts, n, k_align(k, k_granularity)))
    return _decode(b, b_scale, k_granularity)
