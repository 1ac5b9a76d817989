"""The grouped GEMMs: validate -> choose a kernel -> get it from the cache -> launch.

`moe_gemm_mxfp8_nt_groupwise` is FlashInfer's function of that name (MXFP8 weights);
`moe_gemm_mxfp8_mxfp4_nt_groupwise` takes MXFP4 weights. Both take the same keyword-only epilogue
options (bias, gated activation), which leave FlashInfer's behaviour unchanged when not given.
"""

from __future__ import annotations

import torch

from . import envs
from .epilogue import GPT_OSS_ALPHA, GPT_OSS_LIMIT, GatedActivation
from .gemm.device import capturing, current_stream
from .gemm.plan import kernel_for
from .gemm.spec import DEFAULT_VARIANT, NO_EPILOGUE_ARGUMENTS, EpilogueArguments, Variant
from .reference import reference_moe_gemm
from .validation import VECTOR_ALIGNMENT, check_call, check_indptr_values, check_options

_DEFAULT_ACTIVATION = GatedActivation()


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
    bias: torch.Tensor | None = None,
    activation: str = "swiglu",
    gate_layout: str = "halves",
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
    validate: bool | None = None,
) -> torch.Tensor:
    """Grouped MXFP8 GEMM of an MoE layer, call-compatible with FlashInfer's function of this name.

    For every row r of expert e (rows [m_indptr[e], m_indptr[e+1]) of `a` and `out`):
    ``y[r, j] = sum_kb sa[r, kb] * sb[e, j, kb] * sum_{k in kb} a[r, k] * b[e, j, k]`` in float32
    (plus ``bias[e, j]``), rounded once to bfloat16. With ``is_gated`` the rows of each expert's
    ``b`` are [up; gate] and ``out[r, j] = up[r, j] * silu(gate[r, j])`` (or the chosen activation).

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
        is_gated: fuse the gated activation: out = up * silu(gate) by default.
        bias: optional (E, N) float32, contiguous: added to each row of b's product before the
            activation (not a FlashInfer argument).
        activation: gated only: "swiglu" (up * silu(gate)) or "clamped_swiglu" (gpt-oss:
            (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)).
        gate_layout: gated only: "halves" (rows [0, N/2) up, [N/2, N) gate) or "interleaved" (even
            rows gate, odd rows up, as gpt-oss checkpoints store them).
        alpha, limit: the clamped SwiGLU's constants (gpt-oss's by default).
        validate: check m_indptr's values (0 first, non-decreasing, cum_m last) at the cost of a
            device-to-host sync; default from MXFP8_MOE_VALIDATE.

    Returns:
        `out` (allocated when not given). Rows that belong to no expert are not written.
    """
    return _grouped_gemm("e4m3", a, b, a_scale, b_scale, m_indptr, scale_granularity_mnk, scale_major_mode, backend,
                         out, out_dtype, is_gated, bias, activation, gate_layout, alpha, limit, validate)


def moe_gemm_mxfp8_mxfp4_nt_groupwise(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    m_indptr: torch.Tensor,
    scale_granularity_mnk: tuple[int, int, int] = (1, 1, 32),
    scale_major_mode: str = "MN",
    backend: str = "auto",
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    is_gated: bool = False,
    *,
    bias: torch.Tensor | None = None,
    activation: str = "swiglu",
    gate_layout: str = "halves",
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
    validate: bool | None = None,
) -> torch.Tensor:
    """The grouped GEMM of an MoE layer with MXFP8 tokens and MXFP4 expert weights (W4A8).

    The same call as ``moe_gemm_mxfp8_nt_groupwise`` except for the weights: ``b`` is (E, N, K / 2)
    uint8, two e2m1 codes per byte (the low nibble holds the even k), ``b_scale`` one UE8M0 scale
    per 32 values of K (k_align = ceil(K / 128) words per row), so ``scale_granularity_mnk`` is
    (1, 1, 32) and K a multiple of 32. docs/CONTRACT.md has the formula and the e2m1 values;
    ``quantize_weights_mxfp4`` and ``convert.from_gpt_oss`` make the weights.
    """
    return _grouped_gemm("e2m1", a, b, a_scale, b_scale, m_indptr, scale_granularity_mnk, scale_major_mode, backend,
                         out, out_dtype, is_gated, bias, activation, gate_layout, alpha, limit, validate)


def _grouped_gemm(weights, a, b, a_scale, b_scale, m_indptr, scale_granularity_mnk, scale_major_mode, backend, out,
                  out_dtype, is_gated, bias, activation, gate_layout, alpha, limit, validate) -> torch.Tensor:
    k_granularity = check_options(scale_granularity_mnk, scale_major_mode, backend, out_dtype, weights)
    gated_activation = _gated_activation(is_gated, activation, gate_layout, alpha, limit)
    problem = check_call(a, b, a_scale, b_scale, m_indptr, out, bias, k_granularity=k_granularity, is_gated=is_gated,
                         weights=weights)
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
        result = reference_moe_gemm(a, b, a_scale, b_scale, m_indptr, k_granularity=k_granularity, is_gated=is_gated,
                                    bias=bias, activation=gated_activation)
        return out.copy_(result)

    device_index = problem.device.index
    variant = (DEFAULT_VARIANT if weights == "e4m3" and bias is None and gated_activation is _DEFAULT_ACTIVATION
               else Variant(weights, gated_activation.kind, gated_activation.layout == "interleaved", bias is not None))
    kernel = kernel_for(device_index=device_index, num_experts=problem.num_experts, cum_m=problem.cum_m,
                        n=problem.n, k=problem.k, k_granularity=k_granularity, gated=is_gated,
                        scale_mode=envs.scale_mode(), aligned=aligned, scales_fit_tma=problem.tma_scales,
                        variant=variant)
    epilogue = (NO_EPILOGUE_ARGUMENTS if bias is None and gated_activation.kind == "swiglu"
                else EpilogueArguments(bias, gated_activation.alpha, gated_activation.limit))
    kernel(a, b, a_scale, b_scale, m_indptr, out, current_stream(device_index), epilogue)
    return out


def _gated_activation(is_gated: bool, activation: str, gate_layout: str, alpha: float, limit: float) -> GatedActivation:
    """The activation the options ask for; options of a gated activation on an ungated call are refused."""
    if (activation, gate_layout, alpha, limit) == ("swiglu", "halves", GPT_OSS_ALPHA, GPT_OSS_LIMIT):
        return _DEFAULT_ACTIVATION
    if not is_gated:
        raise ValueError(f"activation, gate_layout, alpha and limit apply to gated GEMMs (is_gated=True); got "
                         f"activation={activation!r}, gate_layout={gate_layout!r}, alpha={alpha!r}, limit={limit!r} "
                         "with is_gated=False")
    return GatedActivation(activation, gate_layout, float(alpha), float(limit))
