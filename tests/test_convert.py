"""Checkpoint converters: payload and scale round trips against the source's dequantized values.

Error bound for requantized blocks (scales that are not powers of two). The source value is
v = q * s (q e4m3, s float32), computed exactly in float64. The converter picks a power-of-two
scale S per (row, K block) with amax <= 448 S and stores round_e4m3(fl32(v / S)). e4m3 has 3
mantissa bits, so its ulp is 2^-3 of the leading power of two and round to nearest errs by half
that: at most 2^-4 |v| while v / S is normal (>= 2^-6). Below that, e4m3's subnormals have a fixed
step of 2^-9, so the error is at most 2^-10 S in absolute terms: no relative bound can hold there
(0.6 * 2^-9 rounds to 2^-9, 67 % off). The float32 product before the e4m3 rounding adds at most
2^-24 |v| (twice, counting the rounding of the already rounded value), hence the 2^-22 |v| slack.
This is tighter than the 2^-3 (a full ulp) one might quote for "one e4m3 rounding".
"""


import pytest
import torch

from mxfp8_moe.convert import from_bf16, from_fp8_block_scaled, from_ocp_mx
from mxfp8_moe.layout import k_align, k_granularity_of, num_k_blocks, pack_ue8m0, unpack_ue8m0
from mxfp8_moe.quantize import dequantize_weights, quantize_weights

SHAPES = [(2, 256, 512), (3, 200, 300), (1, 130, 96)]  # full blocks, partial n and k, k < one block


def block_scaled_checkpoint(num_experts, n, k, scales):
    """A DeepSeek-V3 style checkpoint: an e4m3 payload and one float32 scale_inv per 128 x 128 block,
    like a block amax / 448 ("arbitrary"), a power of two, or a mix. Blocks differ by up to 2^+-20."""
    shape = (num_experts, num_k_blocks(n, 128), num_k_blocks(k, 128))
    magnitude = torch.exp2(torch.randint(-20, 21, shape).float())
    if scales == "power_of_two":
        scale_inv = magnitude / 256
    else:
        scale_inv = magnitude * torch.empty(shape).uniform_(0.5, 1.0) / 448  # a block's amax / 448
        if scales == "mixed":  # about half the blocks snapped to a power of two
            snap = torch.rand(shape) < 0.5
            scale_inv = torch.where(snap, magnitude / 256, scale_inv)
    # The payload spans e4m3's range, subnormals included, like real per-block quantization.
    w = torch.randn(num_experts, n, k) * 100
    w[..., ::7] *= 2.0**-12
    return w.clamp(-448, 448).to(torch.float8_e4m3fn), scale_inv


def broadcast(scale_inv, n, k, width=128):
    """Per-element float64 scale of a (E, n/128, k/128) block-scale tensor."""
    return scale_inv.double().repeat_interleave(width, 1)[:, :n].repeat_interleave(width, 2)[..., :k]


def check_layout(b, b_scale, shape, k_granularity):
    num_experts, n, k = shape
    assert b.dtype == torch.float8_e4m3fn and b.shape == shape and b.is_contiguous()
    words = k_align(k, k_granularity)
    assert b_scale.dtype == torch.int32 and b_scale.shape == (num_experts, n, words)
    assert b_scale.stride() == (words * -(-n // 4) * 4, 1, -(-n // 4) * 4)  # MN-major


def assert_one_rounding(out, source, exponents, k_granularity):
    """|out - source| <= max(2^-4 |v|, 2^-10 S) + 2^-22 |v| (the module docstring's bound)."""
    k = source.shape[-1]
    new_scale = torch.exp2(exponents.double() - 127).repeat_interleave(k_granularity, -1)[..., :k]
    bound = torch.maximum(source.abs() * 2**-4, new_scale * 2**-10) + source.abs() * 2**-22
    assert ((out - source).abs() <= bound).all()


def test_converted_scales_carry_their_k_granularity():
    w = torch.randn(2, 64, 256)
    assert k_granularity_of(from_bf16(w, 32)[1]) == 32
    b, _ = quantize_weights(w, 128)
    assert k_granularity_of(from_fp8_block_scaled(b, torch.ones(2, 1, 2), 32)[1]) == 32
    assert k_granularity_of(from_fp8_block_scaled(b, torch.ones(2, 1, 2), 128)[1]) == 128
    assert k_granularity_of(from_ocp_mx(b, torch.full((2, 64, 8), 127, dtype=torch.uint8))[1]) == 32


def test_from_bf16_is_quantize_weights():
    w = torch.randn(2, 64, 320, dtype=torch.bfloat16)
    b, b_scale = from_bf16(w, 32)
    b_ref, b_scale_ref = quantize_weights(w, 32)
    assert torch.equal(b.view(torch.uint8), b_ref.view(torch.uint8))
    assert torch.equal(b_scale, b_scale_ref) and b_scale.stride() == b_scale_ref.stride()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k_granularity", [32, 128])
def test_block_scaled_power_of_two_is_bit_exact(shape, k_granularity):
    w_fp8, scale_inv = block_scaled_checkpoint(*shape, "power_of_two")
    b, b_scale = from_fp8_block_scaled(w_fp8, scale_inv, k_granularity)
    check_layout(b, b_scale, shape, k_granularity)
    assert torch.equal(b.view(torch.uint8), w_fp8.view(torch.uint8))
    source = w_fp8.double() * broadcast(scale_inv, *shape[1:])
    assert torch.equal(dequantize_weights(b, b_scale, k_granularity).double(), source)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("scales", ["arbitrary", "mixed"])
def test_block_scaled_requantized_within_one_rounding(shape, k_granularity, scales):
    w_fp8, scale_inv = block_scaled_checkpoint(*shape, scales)
    b, b_scale = from_fp8_block_scaled(w_fp8, scale_inv, k_granularity)
    check_layout(b, b_scale, shape, k_granularity)
    n, k = shape[1:]
    source = w_fp8.double() * broadcast(scale_inv, n, k)
    out = dequantize_weights(b, b_scale, k_granularity).double()
    assert torch.isfinite(out).all()

    exponents = unpack_ue8m0(b_scale, num_k_blocks(k, k_granularity))
    assert_one_rounding(out, source, exponents, k_granularity)

    # Requantized (row, K block)s use the smallest sufficient power of two: amax in (224 S, 448 S].
    # Power-of-two blocks keep payload and scale.
    power_of_two = broadcast(scale_inv, n, k).log2().frac() == 0
    assert torch.equal(b.view(torch.uint8)[power_of_two], w_fp8.view(torch.uint8)[power_of_two])
    assert torch.equal(out[power_of_two], source[power_of_two])
    pad = -k % k_granularity
    amax = torch.nn.functional.pad(source.abs(), (0, pad)).unflatten(-1, (-1, k_granularity)).amax(-1)
    scale = torch.exp2(exponents.double() - 127)
    requantized = ~power_of_two[..., ::k_granularity] & (amax > 0)
    assert (amax <= 448 * scale).all()
    assert (amax[requantized] > 224 * scale[requantized]).all()


def test_block_scaled_extreme_scales_stay_finite():
    """Zero, subnormal, huge and negative scales, and an all-zero block: finite, correctly signed."""
    w_fp8, _ = block_scaled_checkpoint(1, 128, 768, "arbitrary")
    w_fp8[0, :, 640:] = 0
    scale_inv = torch.tensor([[[0.0, 2.0**-140, 3.0 * 2**100, -0.37, 2.0**-126, 1.0]]])
    b, b_scale = from_fp8_block_scaled(w_fp8, scale_inv, 128)
    out = dequantize_weights(b, b_scale, 128).double()
    source = w_fp8.double() * broadcast(scale_inv, 128, 768)
    assert torch.isfinite(out).all()
    assert (out[..., :128] == 0).all() and (out[..., 640:] == 0).all()
    assert_one_rounding(out, source, unpack_ue8m0(b_scale, 6), 128)
    assert torch.equal(out[..., 384:512] < 0, w_fp8[..., 384:512].float() > 0)  # negative scale


@pytest.mark.parametrize("k", [256, 96, 200])
def test_ocp_mx_bit_exact(k):
    num_experts, n = 3, 48
    w_fp8 = (torch.randn(num_experts, n, k) * 50).to(torch.float8_e4m3fn)
    scales = torch.randint(100, 155, (num_experts, n, num_k_blocks(k, 32)), dtype=torch.uint8)
    scales[0, 0, 0] = 0  # 2^-127, still exact
    b, b_scale = from_ocp_mx(w_fp8, scales)
    check_layout(b, b_scale, (num_experts, n, k), 32)
    assert torch.equal(b.view(torch.uint8), w_fp8.view(torch.uint8))
    assert torch.equal(b_scale, pack_ue8m0(scales))
    source = w_fp8.double() * torch.exp2(scales.double() - 127).repeat_interleave(32, -1)[..., :k]
    assert torch.equal(dequantize_weights(b, b_scale, 32).double(), source)
    b_e8m0, b_scale_e8m0 = from_ocp_mx(w_fp8, scales.view(torch.float8_e8m0fnu))
    assert torch.equal(b_scale_e8m0, b_scale)


FP8 = torch.zeros(2, 130, 300).to(torch.float8_e4m3fn)
SCALE_INV = torch.ones(2, 2, 3)
E8M0 = torch.zeros(2, 130, 10, dtype=torch.uint8)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: from_fp8_block_scaled(FP8.float(), SCALE_INV), "w_fp8.dtype must be torch.float8_e4m3fn"),
        (lambda: from_fp8_block_scaled(FP8[0], SCALE_INV), "w_fp8 must be 3-D"),
        (lambda: from_fp8_block_scaled(FP8, SCALE_INV.double()), "scale_inv.dtype must be torch.float32"),
        (lambda: from_fp8_block_scaled(FP8, SCALE_INV[:, :1]), "scale_inv.shape must be (2, 2, 3)"),
        (lambda: from_fp8_block_scaled(FP8, SCALE_INV * float("nan")), "scale_inv must be finite"),
        (lambda: from_fp8_block_scaled(FP8, SCALE_INV, 64), "k_granularity must be one of (32, 128)"),
        (lambda: from_ocp_mx(FP8.bfloat16(), E8M0), "w_fp8.dtype must be torch.float8_e4m3fn"),
        (lambda: from_ocp_mx(FP8, E8M0.int()), "scales_e8m0.dtype must be torch.uint8"),
        (lambda: from_ocp_mx(FP8, E8M0[..., :9]), "scales_e8m0.shape must be (2, 130, 10)"),
        (lambda: from_bf16(FP8), "w.dtype must be one of"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_from_gpt_oss_keeps_the_values_and_orders_gate_up_into_halves():
    from mxfp8_moe import GatedActivation, from_gpt_oss, quantize_activations, reference_moe_gemm
    from mxfp8_moe.mxfp4 import dequantize_weights_mxfp4, e2m1_to_float, unpack_e2m1

    experts, n, k = 3, 8, 96
    blocks = torch.randint(0, 256, (experts, n, k // 32, 16), dtype=torch.uint8)
    scales = torch.randint(120, 130, (experts, n, k // 32), dtype=torch.uint8)
    bias = torch.randn(experts, n, dtype=torch.bfloat16)
    # The checkpoint's values: byte j of block i of a row holds k = 32 i + 2 j (low nibble) and + 1.
    codes = torch.stack((blocks & 0xF, blocks >> 4), dim=-1).reshape(experts, n, k)
    values = e2m1_to_float(codes) * torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)

    b, b_scale, bias32 = from_gpt_oss(blocks, scales, bias, gate_up=False)
    assert b.shape == (experts, n, k // 2) and b.dtype == torch.uint8 and k_granularity_of(b_scale) == 32
    assert torch.equal(dequantize_weights_mxfp4(b, b_scale), values) and bias32.dtype == torch.float32
    assert torch.equal(e2m1_to_float(unpack_e2m1(b)), e2m1_to_float(codes))

    # gate_up: the same layer computed from the interleaved checkpoint and from the converted halves.
    b, b_scale, bias32 = from_gpt_oss(blocks, scales, bias, gate_up=True)
    order = torch.cat([torch.arange(1, n, 2), torch.arange(0, n, 2)])
    assert torch.equal(dequantize_weights_mxfp4(b, b_scale), values[:, order])
    m_indptr = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    a, a_scale = quantize_activations(torch.randn(5, k), m_indptr, 32)
    interleaved_b, interleaved_scale, _ = from_gpt_oss(blocks, scales, gate_up=False)
    activation = GatedActivation("clamped_swiglu")
    halves = reference_moe_gemm(a, b, a_scale, b_scale, m_indptr, k_granularity=32, is_gated=True,
                                accumulate_dtype=torch.float64, bias=bias32, activation=activation)
    interleaved = reference_moe_gemm(a, interleaved_b, a_scale, interleaved_scale, m_indptr, k_granularity=32,
                                     is_gated=True, accumulate_dtype=torch.float64, bias=bias.float(),
                                     activation=GatedActivation("clamped_swiglu", "interleaved"))
    torch.testing.assert_close(halves, interleaved, rtol=0, atol=0)
