"""moe_gemm_mxfp8_nt_groupwise: validate -> choose a kernel -> get it from the cache -> launch."""

from __future__ import annotations

import torch

from . import envs
from .gemm.device import capturing, current_stream
from .gemm.plan import kernel_for
from .reference import reference_moe_gemm
from .validation import VECTOR_ALIGNMENT, check_call, check_indptr_values, check_options


def moe_gemm_mxfp8_nt_groupwise(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    m_indptr: torch.Tensor,
    scale_granularity_mnk: tuple[int, int, int] = (1, 1, 128),
    scale_major_mode: str = "MN",
    backend: str = "auto",
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    is_gated: bool = False,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    """Grouped MXFP8 GEMM of an MoE layer, call-compatible with FlashInfer's function of this name.

    For every row r of expert e (rows [m_indptr[e], m_indptr[e+1]) of `a` and `out`):
    ``out[r, j] = sum_kb sa[r, kb] * sb[e, j, kb] * sum_{k in kb} a[r, k] * b[e, j, k]``, in float32,
    rounded once to bfloat16. With ``is_gated`` the rows of each expert's ``b`` are [up; gate] and
    ``out[r, j] = up[r, j] * silu(gate[r, j])``.

    Args:
        a: (cum_m, K) float8_e4m3fn tokens of all experts, back to back.
        b: (E, N, K) float8_e4m3fn expert weights (each expert's (N, K) row-major).
        a_scale: (m_padded, k_align) int32, four UE8M0 bytes per word, rows padded per expert.
        b_scale: (E, N, k_align) int32, four UE8M0 bytes per word.
        m_indptr: (E + 1,) int32 CSR offsets of the experts' rows.
        scale_granularity_mnk: (1, 1, 32) (OCP MXFP8) or (1, 1, 128).
        scale_major_mode: "MN" only (scales are read through their strides: MN- or K-major both work).
        backend: "auto" (CUDA kernels for CUDA tensors, the reference otherwise), "cuda", "cute"
            (FlashInfer's name, an alias of "cuda") or "reference" (pure torch, any device).
        out: optional preallocated (cum_m, N or N/2 when gated) bfloat16 output, contiguous.
        out_dtype: torch.bfloat16 or None.
        is_gated: fuse SwiGLU: out = up * silu(gate).
        validate: check m_indptr's values (0 first, non-decreasing, cum_m last) at the cost of a
            device-to-host sync; default from MXFP8_MOE_VALIDATE.

    Returns:
        `out` (allocated when not given). Rows that belong to no expert are not written.
    """
    k_granularity = check_options(scale_granularity_mnk, scale_major_mode, backend, out_dtype)
    problem = check_call(a, b, a_scale, b_scale, m_indptr, out, k_granularity=k_granularity, is_gated=is_gated)
    use_cuda = backend in ("cuda", "cute") or (backend == "auto" and problem.device.type == "cuda")
    if use_cuda and problem.device.type != "cuda":
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {problem.device}")
    if validate if validate is not None else envs.validate_indptr():
        if problem.device.type == "cuda" and capturing(problem.device.index):
            raise ValueError("validate=True (or MXFP8_MOE_VALIDATE=1) reads m_indptr on the host, which a CUDA "
                             "graph capture does not allow; validate outside the capture")
        check_indptr_values(m_indptr, problem.cum_m)
    aligned = problem.aligned
    if out is None:
        out = torch.empty((problem.cum_m, problem.n_out), dtype=torch.bfloat16, device=problem.device)
        aligned = aligned and out.data_ptr() % VECTOR_ALIGNMENT == 0  # (a custom allocator might not align)
    if problem.cum_m == 0:
        return out

    if not use_cuda:
        result = reference_moe_gemm(a, b, a_scale, b_scale, m_indptr, k_granularity=k_granularity, is_gated=is_gated)
        return out.copy_(result)

    device_index = problem.device.index
    kernel = kernel_for(device_index=device_index, num_experts=problem.num_experts, cum_m=problem.cum_m,
                        n=problem.n, k=problem.k, k_granularity=k_granularity, gated=is_gated,
                        scale_mode=envs.scale_mode(), aligned=aligned, scales_fit_tma=problem.tma_scales)
    kernel(a, b, a_scale, b_scale, m_indptr, out, current_stream(device_index))
    return out
