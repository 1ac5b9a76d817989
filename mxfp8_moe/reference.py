"""Reference MoE grouped GEMM (MXFP8 tokens, MXFP8 or MXFP4 weights): the contract's formula,
block by block, in plain torch.

It is what kernels are tested against, so it follows docs/CONTRACT.md literally rather than
dequantizing first: each K block's product of the raw e4m3 (and e2m1) values is scaled by sa * sb
and added to the accumulator, as the kernel's float32 accumulation does; then the bias and the
gated activation (mxfp8_moe.epilogue). The result is not rounded to bfloat16.
"""

from __future__ import annotations

import torch

from .checks import check_arg, check_k_granularity, check_m_indptr, check_offsets, check_scale
from .epilogue import GatedActivation
from .layout import k_align, m_padded, num_k_blocks, scale_row_starts, ue8m0_to_float, unpack_ue8m0
from .mxfp4 import K_GRANULARITY as MXFP4_K_GRANULARITY
from .mxfp4 import e2m1_to_float, unpack_e2m1

_ACCUMULATE_DTYPES = (torch.float32, torch.float64)


def reference_moe_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    m_indptr: torch.Tensor,
    *,
    k_granularity: int,
    is_gated: bool = False,
    accumulate_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
    activation: GatedActivation = GatedActivation(),
) -> torch.Tensor:
    """Compute moe_gemm_mxfp8_nt_groupwise's (or, for uint8 `b`, moe_gemm_mxfp8_mxfp4_nt_groupwise's)
    result, unrounded, in accumulate_dtype.

    For each row r of expert e: y[r, j] = sum over K blocks kb of
    (sa[r, kb] * sb[e, j, kb]) * (a[r, block kb] . b[e, j, block kb]), accumulated block by block,
    plus bias[e, j] when given. With is_gated the result is `activation` of each row's (up, gate)
    pairs, of shape (cum_m, n // 2) (by default up * silu(gate) with b's rows [0, N) up, [N, 2N) gate).

    Args:
        a: (cum_m, k) float8_e4m3fn, the experts' rows back to back.
        b: (E, n, k) float8_e4m3fn, or (E, n, k / 2) uint8 holding two e2m1 codes per byte (MXFP4,
            k_granularity 32).
        a_scale: (m_padded, k_align) int32 UE8M0 words, any strides (MN-major or K-major).
        b_scale: (E, n, k_align) int32 UE8M0 words, any strides.
        m_indptr: (E + 1,) int32 row offsets; read on the host (a sync) and checked.
        k_granularity: 32 or 128.
        is_gated: apply the gated activation.
        accumulate_dtype: torch.float32 (what kernels do) or torch.float64.
        bias: optional (E, n) float tensor added to y before the activation.
        activation: the gated activation (mxfp8_moe.epilogue.GatedActivation).

    Returns:
        (cum_m, n) or, gated, (cum_m, n // 2) tensor of accumulate_dtype on a's device. A 0xFF
        (NaN) scale byte makes NaN exactly the outputs whose sum uses it.
    """
    check_k_granularity(k_granularity)
    fp8 = torch.float8_e4m3fn
    check_arg(a.dtype == fp8 and a.dim() == 2, "a", "2-D float8_e4m3fn", f"{a.dtype} {tuple(a.shape)}")
    check_arg(b.dtype in (fp8, torch.uint8) and b.dim() == 3, "b", "3-D float8_e4m3fn, or uint8 (MXFP4)",
              f"{b.dtype} {tuple(b.shape)}")
    mxfp4 = b.dtype == torch.uint8
    num_experts = check_m_indptr(m_indptr)
    cum_m, k = a.shape
    n = b.shape[1]
    check_arg(b.shape[0] == num_experts, "b.shape[0]", f"E = {num_experts} (from m_indptr)", b.shape[0])
    if mxfp4:
        check_arg(b.shape[2] * 2 == k, "b.shape[2]", f"a.shape[1] / 2 = {k / 2} (two e2m1 per byte)", b.shape[2])
        check_arg(k_granularity == MXFP4_K_GRANULARITY, "k_granularity", f"{MXFP4_K_GRANULARITY} for MXFP4 weights",
                  k_granularity)
    else:
        check_arg(b.shape[2] == k, "b.shape[2]", f"a.shape[1] = {k}", b.shape[2])
    if bias is not None:
        check_arg(tuple(bias.shape) == (num_experts, n) and bias.is_floating_point(), "bias",
                  f"a float tensor of shape {(num_experts, n)}", f"{bias.dtype} {tuple(bias.shape)}")
    words = k_align(k, k_granularity)
    check_scale("a_scale", a_scale, (m_padded(cum_m, num_experts), words))
    check_scale("b_scale", b_scale, (num_experts, n, words))
    check_arg(
        accumulate_dtype in _ACCUMULATE_DTYPES,
        "accumulate_dtype",
        f"one of {_ACCUMULATE_DTYPES}",
        accumulate_dtype,
    )
    check_arg(n % 2 == 0 or not is_gated, "b.shape[1]", "even (up and gate halves) when is_gated", n)
    bounds = m_indptr.tolist()
    check_offsets(bounds, cum_m)

    nblocks = num_k_blocks(k, k_granularity)
    sa = ue8m0_to_float(unpack_ue8m0(a_scale, nblocks)).to(accumulate_dtype)  # (m_padded, nblocks)
    sb = ue8m0_to_float(unpack_ue8m0(b_scale, nblocks)).to(accumulate_dtype)  # (E, n, nblocks)
    starts = scale_row_starts(m_indptr).tolist()
    a_acc = a.to(accumulate_dtype)
    out = torch.zeros(cum_m, n, dtype=accumulate_dtype, device=a.device)
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        b_e = e2m1_to_float(unpack_e2m1(b[e])) if mxfp4 else b[e]
        a_e, b_e, out_e = a_acc[lo:hi], b_e.to(accumulate_dtype), out[lo:hi]
        sa_e = sa[starts[e] : starts[e] + hi - lo]
        for kb in range(nblocks):
            cols = slice(kb * k_granularity, (kb + 1) * k_granularity)  # the tail block is cut at k
            out_e.addcmul_(torch.outer(sa_e[:, kb], sb[e, :, kb]), a_e[:, cols] @ b_e[:, cols].T)
    if bias is not None:
        rows = torch.tensor([hi - lo for lo, hi in zip(bounds, bounds[1:])], device=bias.device)
        out += bias.to(accumulate_dtype).repeat_interleave(rows, dim=0, output_size=cum_m).to(out.device)
    return activation(out) if is_gated else out
