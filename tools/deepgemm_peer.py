"""DeepGEMM's M-grouped contiguous FP8 GEMM as a benchmark peer, where the `deep_gemm` package
(SGLang's sgl-deep-gemm wheel) imports and the GPU is Hopper or newer.

It takes the block-FP8 recipe: tokens with one float scale per row and 128 columns of K, weights
with one float scale per 128 x 128 block, and each expert's rows padded to its M alignment with
the padding rows marked -1 in the per-row expert index, as its users lay out their batches. The
column is checked once per cell against the product of the dequantized operands, so it is known
to compute the same GEMM; it writes the full N columns (no fused activation).
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    import deep_gemm
except Exception as error:  # noqa: BLE001 - absent wheel, or one that cannot load its extension here
    deep_gemm = None
    IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    IMPORT_ERROR = None

BLOCK = 128  # the recipe's scale block along K (tokens and weights) and N (weights)
E4M3_MAX = 448.0


def unsupported(n: int, k: int) -> str | None:
    """Why DeepGEMM cannot run an (n, k) GEMM here, or None if it can."""
    if deep_gemm is None:
        return f"deep_gemm not importable ({IMPORT_ERROR})"
    if torch.cuda.get_device_capability()[0] < 9:
        return "deep_gemm needs sm_90 or newer"
    if n % BLOCK or k % BLOCK:
        return f"the block-FP8 recipe needs N and K multiples of {BLOCK}, got {n} x {k}"
    return None


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K) -> e4m3 values and (E, N / 128, K / 128) float scales, one per 128 x 128 block."""
    e, n, k = w.shape
    blocks = w.float().view(e, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-8) / E4M3_MAX
    q = (blocks / scale[:, :, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(e, n, k), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 values and (M, K / 128) float scales."""
    m, k = x.shape
    groups = x.float().view(m, k // BLOCK, BLOCK)
    scale = groups.abs().amax(dim=2).clamp(min=1e-8) / E4M3_MAX
    return (groups / scale[:, :, None]).to(torch.float8_e4m3fn).view(m, k), scale


def padded_batch(rows: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random tokens for a routing, each expert's rows padded to DeepGEMM's M alignment: the e4m3
    rows, their scales, the per-row expert index (-1 on padding rows) and the real rows' positions."""
    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    index, real = [], []
    for expert, count in enumerate(rows):
        if count:
            padded = -(-count // align) * align
            real.extend(range(len(index), len(index) + count))
            index.extend([expert] * count + [-1] * (padded - count))
    index = torch.tensor(index, dtype=torch.int32, device="cuda")
    x = torch.randn(index.numel(), k, device="cuda") * (index >= 0).unsqueeze(1)
    a, a_scale = quantize_rows(x)
    # The kernel reads token scales MN-major and TMA-aligned: laid out so once here, not per call.
    to_kernel_layout = getattr(deep_gemm, "get_mn_major_tma_aligned_tensor", None)
    if to_kernel_layout is not None:
        a_scale = to_kernel_layout(a_scale)
    return a, a_scale, index, torch.tensor(real, device="cuda")


def deepgemm_calls(w: torch.Tensor, routings_rows: list[list[int]]) -> list[Callable[[], None]]:
    """One closure per routing computing its grouped GEMM with DeepGEMM (weights w (E, N, K)),
    after checking the first routing's result against the dequantized product."""
    b, b_scale = quantize_blocks(w)
    calls = []
    for i, rows in enumerate(routings_rows):
        a, a_scale, index, real = padded_batch(rows, w.shape[2])
        out = torch.empty(a.shape[0], w.shape[1], dtype=torch.bfloat16, device="cuda")

        def call(a=a, a_scale=a_scale, index=index, out=out):
            deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, a_scale), (b, b_scale), out, index)

        if i == 0:
            call()
            check(a, a_scale, b, b_scale, index, real, out)
        calls.append(call)
    return calls


def check(a, a_scale, b, b_scale, index, real, out) -> None:
    """DeepGEMM's real rows against the float product of the dequantized operands, expert by expert."""
    a_deq = a.float() * a_scale.repeat_interleave(BLOCK, dim=1)
    expert = index[real].long()
    error = reference_norm = 0.0
    for e in expert.unique().tolist():
        sel = real[expert == e]
        b_deq = b[e].float() * b_scale[e].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        ref = a_deq[sel] @ b_deq.t()
        error += (out[sel].float() - ref).square().sum().item()
        reference_norm += ref.square().sum().item()
    relative = (error / reference_norm) ** 0.5
    if not relative < 1e-2:
        raise AssertionError(f"DeepGEMM's grouped GEMM is off the dequantized product by {relative:.2e}")
