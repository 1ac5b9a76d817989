"""The experts of an MoE layer on expert-ordered MXFP8 rows: gate_up with SwiGLU, the MXFP8
quantization of the intermediate, and down.

Either the chain of three launches (the grouped GEMM, the activation quantizer, the grouped GEMM)
or, at decode sizes on sm_90a, sm_120a and sm_121a, one (gemm/layer.py: the fused layer kernel).
The intermediate is quantized with the quantizer's rounding either way: the wgmma layer (sm_90a)
gives the chain's bits, except where the chain's GEMM splits K (one token on few experts, e.g.
DeepSeek-V3 EP8's gate_up: its ranks' partial sums add in another order); the mma.sync layer's
tiles sum in another order, within 1 % of the chain.
path "auto" takes the fused kernel only while heuristics.FUSED_LAYER is on (off until it beats the
chain in the layer benchmark).
"""

from __future__ import annotations

import torch

from .api import moe_gemm_mxfp8_nt_groupwise
from .gemm.device import current_stream, device_info
from .gemm import heuristics
from . import envs
from .gemm import native_guard
from .gemm.layer import LAYER_MAX_ROWS, LayerKernel, MmaLayerKernel, get_layer_kernel
from .gemm.tensor_maps import scales_fit_tma
from .layout import k_align
from .memo import BoundedMemo
from .quantize import quantize_activations
from .validation import check_call

PATHS = ("auto", "fused", "chain")
_plans = BoundedMemo(1024)


def expert_gemms(a: torch.Tensor, a_scale: torch.Tensor, m_indptr: torch.Tensor, w13: torch.Tensor,
                 w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, k_granularity: int = 128, *,
                 path: str = "auto") -> torch.Tensor:
    """(cum_m, H) bf16: down(quantize(up * silu(gate))), [up; gate] = gate_up(a), per expert.

    a (cum_m, H) e4m3 with its a_scale, m_indptr (E + 1,), w13 (E, 2 I, H) [up; gate] and w2
    (E, H, I) e4m3 with their scales, all at `k_granularity`, as moe_gemm_mxfp8_nt_groupwise takes
    them. `path`: "auto" (the fused kernel where it applies once heuristics.FUSED_LAYER is on; the
    chain until then), "fused" (that kernel or an error saying why not) or "chain".
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    granularity = (1, 1, k_granularity)
    wants_fused = path == "fused" or (path == "auto" and heuristics.FUSED_LAYER)
    kernel = _fused_kernel(a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, k_granularity) if wants_fused else None
    if kernel is None:
        if path == "fused" and a.shape[0] > 0:  # (an empty batch is the chain's, which launches nothing)
            raise ValueError(f"path='fused' needs CUDA tensors on an sm_90a, sm_120a or sm_121a GPU, 1 to {LAYER_MAX_ROWS} rows "
                             "(a.size(0)), 16-byte aligned tensors, MN-major scales, w2 (E, H, I) e4m3 with its "
                             "(E, H, k_align(I)) scales, I a multiple of 64 and a pipeline of two stages that fits "
                             f"shared memory; got a of shape {tuple(a.shape)} on {a.device}, w2 of shape "
                             f"{tuple(w2.shape)}")
        h = moe_gemm_mxfp8_nt_groupwise(a, w13, a_scale, w13_scale, m_indptr, granularity, is_gated=True)
        h_q, h_scale = quantize_activations(h, m_indptr, k_granularity)
        return moe_gemm_mxfp8_nt_groupwise(h_q, w2, h_scale, w2_scale, m_indptr, granularity)
    out = torch.empty(a.shape, dtype=torch.bfloat16, device=a.device)
    intermediate = kernel.intermediate(a.shape[0], w2.shape[0], a.device)
    kernel(a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, *intermediate, out, current_stream(a.device.index))
    return out


def _fused_kernel(a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, k_granularity) -> LayerKernel | MmaLayerKernel | None:
    """The fused layer kernel for this call, or None where the chain serves it. Bad arguments raise
    the grouped GEMM's errors (gate_up's checked here; down's where they would fail)."""
    problem = check_call(a, w13, a_scale, w13_scale, m_indptr, None, k_granularity=k_granularity, is_gated=True)
    if problem.device.type != "cuda" or problem.cum_m == 0 or not (problem.aligned and problem.tma_scales):
        return None
    inter = problem.n_out
    down_fits = (isinstance(w2, torch.Tensor) and isinstance(w2_scale, torch.Tensor) and w2.dtype == w13.dtype
                 and w2.device == a.device and w2.shape == (problem.num_experts, problem.k, inter)
                 and w2.is_contiguous() and w2.data_ptr() % 16 == 0 and w2_scale.dtype == torch.int32
                 and w2_scale.device == a.device
                 and w2_scale.shape == (problem.num_experts, problem.k, k_align(inter, k_granularity))
                 and scales_fit_tma(a_scale, w2_scale))
    if not down_fits:
        return None
    device_index = problem.device.index
    device = device_info(device_index)
    mode = heuristics.resolve_scale_mode(envs.scale_mode(), device.arch)
    if mode == "native":
        # As the GEMM's plan decides it: the block-scaled MMA once the guard has checked it, software
        # scaling where it fails and while a CUDA graph is captured before any verdict.
        mode = "native" if native_guard.verified("native", device_index) else "software"
    key = (device_index, problem.num_experts, problem.cum_m, problem.k, inter, k_granularity, mode)
    spec = _plans.get(key)
    if spec is None:
        spec = _plans.put(key, heuristics.layer_spec(device, problem.num_experts, problem.cum_m, problem.k, inter,
                                                     k_granularity, mode) or False)
    return get_layer_kernel(spec, device_index) if spec else None
