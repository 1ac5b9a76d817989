"""Convert expert weights as checkpoints store them into this package's layout.

Every converter returns ``(b, b_scale)``: b (E, n, k) float8_e4m3fn contiguous and b_scale (E, n,
k_align) int32 UE8M0 words in FlashInfer's MN-major layout, the operands of
``moe_gemm_mxfp8_nt_groupwise``. Weights must already be (E, n, k) with K contiguous (the NT GEMM's
B); checkpoints that store (E, k, n) need a transpose first.

Conversion is a load-time step: temporaries are float32 copies of the weights' size, so very large
layers are best converted a slice of experts at a time (experts are independent; torch.cat the
pieces).
"""

from __future__ import annotations

import torch

from .checks import check_arg, check_k_granularity
from .layout import float_to_ue8m0, num_k_blocks, pack_ue8m0, tag_k_granularity, to_mn_major_b_scale, ue8m0_to_float
from .quantize import FP8_MAX, check_fp8, k_blocks, quantize_weights, scale_exponents

BLOCK = 128  # DeepSeek-V3 style checkpoints: one float32 scale per 128 x 128 block
OCP_BLOCK = 32  # OCP MX: one E8M0 scale per 1 x 32 block


def from_bf16(w: torch.Tensor, k_granularity: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize unquantized (E, n, k) weights (bf16, or any float dtype quantize_weights takes)."""
    return quantize_weights(w, k_granularity)


def _is_normal_power_of_two(s: torch.Tensor) -> torch.Tensor:
    """True where float32 s is +2^p with p in [-126, 127]: sign and mantissa bits 0, exponent field
    1..254, exactly the scales a UE8M0 byte in [1, 254] encodes."""
    bits = s.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    return ((bits & ~(0xFF << 23)) == 0) & (exponent >= 1) & (exponent <= 254)


def from_fp8_block_scaled(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, k_granularity: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert 128 x 128 block-scaled FP8 weights (DeepSeek-V3 style, value = w_fp8 * scale_inv).

    Each block's scale is broadcast to its rows, then per (row, K block of k_granularity):
    - if the block's scale is a power of two, the e4m3 payload is kept bit-exact and only the scale
      is re-encoded as UE8M0 (the values are unchanged);
    - otherwise the row's values in that K block are requantized with the package's rule, scale =
      ceil_pow2(amax / 448) of the row's own values. That scale is at most ceil_pow2(scale_inv),
      the block-wide choice, so no value exceeds 448 and a row with a small amax keeps more
      precision. The only error is one e4m3 rounding of a float32 product (tests/test_convert.py
      derives the bound).
    With k_granularity 32 each 128-wide block splits into four 32-wide ones, each requantized from
    its own amax (power-of-two blocks keep their payload and scale, which is exact at any width).

    Args:
        w_fp8: (E, n, k) float8_e4m3fn.
        scale_inv: (E, ceil(n / 128), ceil(k / 128)) float32, finite (checked: this reads the
            values on the host, which a load-time converter can afford).
        k_granularity: 32 or 128, the K width of each output scale.
    """
    check_k_granularity(k_granularity)
    check_fp8("w_fp8", w_fp8, 3)
    num_experts, n, k = w_fp8.shape
    check_arg(scale_inv.dtype == torch.float32, "scale_inv.dtype", "torch.float32", scale_inv.dtype)
    expected = (num_experts, num_k_blocks(n, BLOCK), num_k_blocks(k, BLOCK))
    check_arg(tuple(scale_inv.shape) == expected, "scale_inv.shape", f"{expected} (E, ceil(n/128), ceil(k/128))",
              tuple(scale_inv.shape))
    check_arg(scale_inv.device == w_fp8.device, "scale_inv.device", f"w_fp8's device ({w_fp8.device})",
              scale_inv.device)
    check_arg(bool(torch.isfinite(scale_inv).all()), "scale_inv", "finite", "inf or NaN entries")

    # One source scale per output (row, K block): rows broadcast, each 128-block repeated for its
    # 128 / k_granularity sub-blocks, the partial tails cropped.
    nb = num_k_blocks(k, k_granularity)
    s = scale_inv.repeat_interleave(BLOCK, 1)[:, :n].repeat_interleave(BLOCK // k_granularity, 2)[..., :nb]

    blocks = k_blocks(w_fp8, k_granularity)  # (E, n, nb, kg) float32, exact
    amax = blocks.abs().amax(-1)
    # amax (an e4m3 value, 4 significant bits) times s (24) is exact in float64, and cannot
    # overflow there, so the rounded-up exponent is exactly the package's rule.
    requantized = scale_exponents(amax.double() * s.abs().double())
    exponents = torch.where(_is_normal_power_of_two(s), float_to_ue8m0(s), requantized)

    # New payload = old payload * s / new scale. For power-of-two blocks the ratio is exactly 1, so
    # the e4m3 bits come back unchanged. The ratio is exact in float32 (a power-of-two quotient of
    # a normal float32 that stays far from float32's limits whenever amax > 0); all-zero rows
    # (amax = 0) get 1, which keeps their zeros instead of risking 0 * inf.
    ratio = s / ue8m0_to_float(exponents)
    ratio = torch.where(amax > 0, ratio, 1.0)
    scaled = (blocks * ratio.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
    b = scaled.to(torch.float8_e4m3fn).flatten(-2)[..., :k].contiguous()
    return b, tag_k_granularity(to_mn_major_b_scale(pack_ue8m0(exponents)), k_granularity)


def from_ocp_mx(w_fp8: torch.Tensor, scales_e8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert OCP MXFP8 weights (one E8M0 scale per 1 x 32 block) to k_granularity 32, bit-exact.

    The payload is kept; the scale bytes are packed four per int32 word and laid out MN-major.
    E8M0 and UE8M0 are the same encoding (bias 127, 0xFF = NaN), so no value changes.

    Args:
        w_fp8: (E, n, k) float8_e4m3fn.
        scales_e8m0: (E, n, ceil(k / 32)) uint8 (or torch.float8_e8m0fnu, read as its bytes).
    """
    check_fp8("w_fp8", w_fp8, 3)
    num_experts, n, k = w_fp8.shape
    check_arg(scales_e8m0.dtype in (torch.uint8, torch.float8_e8m0fnu), "scales_e8m0.dtype",
              "torch.uint8 or torch.float8_e8m0fnu", scales_e8m0.dtype)
    expected = (num_experts, n, num_k_blocks(k, OCP_BLOCK))
    check_arg(tuple(scales_e8m0.shape) == expected, "scales_e8m0.shape", f"{expected} (E, n, ceil(k/32))",
              tuple(scales_e8m0.shape))
    check_arg(scales_e8m0.device == w_fp8.device, "scales_e8m0.device", f"w_fp8's device ({w_fp8.device})",
              scales_e8m0.device)
    b_scale = to_mn_major_b_scale(pack_ue8m0(scales_e8m0.view(torch.uint8)))
    return w_fp8.contiguous(), tag_k_granularity(b_scale, OCP_BLOCK)


def from_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                 gate_up: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Convert one gpt-oss expert projection (MXFP4 as its checkpoint ships it) to the W4A8 op's
    operands, with no requantization.

    gpt-oss stores `*_proj_blocks` uint8 (E, n, k / 32, 16) (K runs along the blocks, then the 16
    bytes; each byte two e2m1 codes, the low nibble first), `*_proj_scales` uint8 (E, n, k / 32)
    (UE8M0) and `*_proj_bias` (E, n). Its gate_up rows interleave gate (even) and up (odd): with
    `gate_up` they are reordered into [up; gate] halves, the layout every kernel family takes
    (the op's gate_layout="halves"), bias rows alike.

    Returns:
        b: (E, n, k / 2) uint8, contiguous; b_scale: (E, n, ceil(k / 128)) int32 UE8M0 words,
        MN-major, k granularity 32; bias: (E, n) float32 (None if none was given).
    """
    check_arg(blocks.dtype == torch.uint8 and blocks.dim() == 4 and blocks.shape[-1] == 16, "blocks",
              "uint8 of shape (E, n, k / 32, 16)", f"{blocks.dtype} {tuple(blocks.shape)}")
    num_experts, n, num_blocks, _ = blocks.shape
    check_arg(scales.dtype == torch.uint8 and tuple(scales.shape) == (num_experts, n, num_blocks), "scales",
              f"uint8 of shape {(num_experts, n, num_blocks)}", f"{scales.dtype} {tuple(scales.shape)}")
    if bias is not None:
        check_arg(bias.is_floating_point() and tuple(bias.shape) == (num_experts, n), "bias",
                  f"a float tensor of shape {(num_experts, n)}", f"{bias.dtype} {tuple(bias.shape)}")
    if gate_up:
        check_arg(n % 2 == 0, "blocks.shape[1]", "even (gate and up rows) with gate_up=True", n)
        order = torch.cat([torch.arange(1, n, 2), torch.arange(0, n, 2)]).to(blocks.device)
        blocks, scales = blocks[:, order], scales[:, order]
        bias = None if bias is None else bias[:, order]
    b = blocks.reshape(num_experts, n, num_blocks * 16).contiguous()
    b_scale = tag_k_granularity(to_mn_major_b_scale(pack_ue8m0(scales)), OCP_BLOCK)
    return b, b_scale, None if bias is None else bias.to(torch.float32).contiguous()
