"""MXFP4 expert weights: e2m1 values, two per byte, with one UE8M0 scale per 32 along K (the OCP MX
format gpt-oss checkpoints ship).

    e2m1 code (4 bits): sign, 2 exponent bits (bias 1), 1 mantissa bit
    magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 for codes 0-7; codes 8-15 are their negatives
    packing: byte k // 2 of a row holds element k in its low nibble when k is even, high when odd

Every e2m1 value is exact in e4m3 (and in bfloat16), which is what lets kernels without a 4-bit
MMA widen weights to FP8 unchanged. The quantizer's scale is the power of two at or above amax / 6,
so no value saturates (the same rule as the FP8 quantizer's amax / 448); values round to the
nearest e2m1 value, ties to the even code.
"""

from __future__ import annotations

import torch

from .checks import check_arg
from .layout import k_align, num_k_blocks, pack_ue8m0, tag_k_granularity, to_mn_major_b_scale, ue8m0_to_float, unpack_ue8m0
from .quantize import FLOAT_DTYPES, K_MULTIPLE, k_blocks, scale_exponents

K_GRANULARITY = 32  # one scale per 32 values of K (OCP MX)
E2M1_MAX = 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Halfway between neighbouring magnitudes: a magnitude rounds to the code whose interval holds it.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of e2m1 codes (any integer dtype, 0..15)."""
    table = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), device=codes.device)
    return table[codes.long()]


def unpack_e2m1(b: torch.Tensor) -> torch.Tensor:
    """(..., k / 2) packed bytes -> (..., k) codes as uint8, element 2i from byte i's low nibble."""
    check_arg(b.dtype == torch.uint8, "b.dtype", "torch.uint8 (two e2m1 codes per byte)", b.dtype)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """(..., k) uint8 codes (k even) -> (..., k / 2) bytes, element 2i in byte i's low nibble."""
    pairs = codes.unflatten(-1, (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def _round_to_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """Codes of float32 values already divided by their scale (|x| <= 6), round to nearest, ties to
    the even code."""
    magnitude = scaled.abs()
    midpoints = torch.tensor(_MIDPOINTS, device=scaled.device)
    index = torch.bucketize(magnitude, midpoints)  # magnitude == midpoint m goes to code m (the lower one)
    tie_to_odd = (index % 2 == 1) & (magnitude == midpoints[index.clamp(max=len(_MIDPOINTS) - 1)])
    code = (index + tie_to_odd.long()).to(torch.uint8)
    return code | ((scaled < 0).to(torch.uint8) << 3)


def quantize_weights_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize expert weights to MXFP4 per (row, 32 values of K).

    Args:
        w: (E, n, k) float32 / float16 / bfloat16 / float64 (quantized from float32), k a multiple
            of 32.

    Returns:
        b: (E, n, k / 2) uint8, two e2m1 codes per byte (low nibble first), contiguous.
        b_scale: (E, n, k_align) int32 UE8M0 words in MN-major layout, k granularity 32 (recorded).
    """
    check_arg(w.dtype in FLOAT_DTYPES, "w.dtype", f"one of {FLOAT_DTYPES}", w.dtype)
    check_arg(w.dim() == 3, "w", "3-D (E, n, k)", f"shape {tuple(w.shape)}")
    k = w.shape[-1]
    check_arg(k > 0 and k % K_GRANULARITY == 0 and k % K_MULTIPLE == 0, "w.shape[-1] (K)",
              f"a positive multiple of {K_GRANULARITY}", k)
    # A few experts at a time: the rounding's temporaries take ~40 bytes a value, more than an
    # 80 GB card holds for a whole gpt-oss-120b layer (2.1G values). (One chunk even with no
    # experts, so that the empty results keep their shapes.)
    step = max(1, _CHUNK_VALUES // max(1, w.shape[1] * k))
    codes, words = zip(*(_quantize_experts(w[e:e + step]) for e in range(0, max(w.shape[0], 1), step)))
    return torch.cat(codes), tag_k_granularity(to_mn_major_b_scale(torch.cat(words)), K_GRANULARITY)


_CHUNK_VALUES = 1 << 26


def _quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, n, k) weights -> packed codes (E, n, k / 2) and row-major UE8M0 words (E, n, k_align)."""
    blocks = k_blocks(w, K_GRANULARITY)
    exponents = scale_exponents(blocks.abs().amax(-1), E2M1_MAX)
    scaled = blocks / ue8m0_to_float(exponents).unsqueeze(-1)
    codes = _round_to_e2m1(scaled.clamp_(-E2M1_MAX, E2M1_MAX)).flatten(-2)
    return pack_e2m1(codes), pack_ue8m0(exponents)


def dequantize_weights_mxfp4(b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """Decode (E, n, k / 2) packed e2m1 weights and their (E, n, k_align) b_scale (any strides) to
    float32 (E, n, k), exactly. A 0xFF scale gives NaN."""
    check_arg(b.dtype == torch.uint8 and b.dim() == 3, "b", "3-D uint8 (E, n, k / 2)", f"{b.dtype} {tuple(b.shape)}")
    k = 2 * b.shape[-1]
    expected = (*b.shape[:2], k_align(k, K_GRANULARITY))
    check_arg(b_scale.dtype == torch.int32 and tuple(b_scale.shape) == expected, "b_scale",
              f"int32 of shape {expected}", f"{b_scale.dtype} {tuple(b_scale.shape)}")
    scales = ue8m0_to_float(unpack_ue8m0(b_scale, num_k_blocks(k, K_GRANULARITY)))
    return e2m1_to_float(unpack_e2m1(b)) * scales.repeat_interleave(K_GRANULARITY, dim=-1)
