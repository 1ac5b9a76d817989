"""A guard for the one path nobody here can run: sm_12x's block-scaled MMA.

The first time a process would use the native scale mode on a device, it computes a small random
problem (both granularities, gated and not) with the native kernels and with the software-scaled
ones and compares them. If they disagree, it warns once and the device stays on software scaling.
The check allocates and syncs, so it never runs inside a CUDA graph capture: a call captured
before the verdict exists uses software scaling.
"""

from __future__ import annotations

import threading
import warnings

import torch

from ..quantize import quantize_activations, quantize_weights
from .device import device_info
from .heuristics import choose_spec
from .launch import get_kernel

_verdicts: dict[tuple[int, str], bool] = {}
_lock = threading.Lock()
_ROWS = (5, 0, 13, 1)  # an empty expert, a one-row expert, a partial token tile
_N, _K = 64, 336  # K tail: 336 = 2 * 128 + 80


class NativeScaleWarning(RuntimeWarning):
    """The native block-scaled MMA disagreed with software scaling; software scaling is used."""


def _run(mode: str, device_index: int, problem, k_granularity: int, gated: bool) -> torch.Tensor:
    a, b, a_scale, b_scale, m_indptr = problem
    spec = choose_spec(device=device_info(device_index), num_experts=len(_ROWS), cum_m=a.shape[0], n=_N, k=_K,
                       k_granularity=k_granularity, gated=gated, scale_mode=mode)
    out = torch.full((a.shape[0], _N // 2 if gated else _N), float("nan"), dtype=torch.bfloat16, device=a.device)
    get_kernel(spec, device_index)(a, b, a_scale, b_scale, m_indptr, out,
                                   torch._C._cuda_getCurrentRawStream(device_index))
    return out


def _agrees(mode: str, device_index: int) -> bool:
    device = torch.device("cuda", device_index)
    counts = torch.tensor(_ROWS)
    m_indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(int(counts.sum()), _K, device=device, generator=generator)
    w = torch.randn(len(_ROWS), _N, _K, device=device, generator=generator)
    for k_granularity in (32, 128):
        a, a_scale = quantize_activations(x, m_indptr, k_granularity)
        b, b_scale = quantize_weights(w, k_granularity)
        for gated in (False, True):
            problem = (a, b, a_scale, b_scale, m_indptr)
            candidate = _run(mode, device_index, problem, k_granularity, gated).float()
            trusted = _run("software", device_index, problem, k_granularity, gated).float()
            error = ((candidate - trusted).norm() / trusted.norm()).item()
            if not error <= 1e-2:  # also catches NaN
                warnings.warn(f"{mode} block-scaled MMA on cuda:{device_index} disagrees with software scaling "
                              f"(k_granularity={k_granularity}, gated={gated}, relative difference {error:.3g}); "
                              "using software scaling. Set MXFP8_MOE_SCALE_MODE to override.",
                              NativeScaleWarning, stacklevel=4)
                return False
    return True


def verified(mode: str, device_index: int) -> bool | None:
    """Whether `mode` may be used on the device: True/False once checked, None while capturing a
    CUDA graph before any verdict (the caller then uses software scaling for that call)."""
    key = (device_index, mode)
    verdict = _verdicts.get(key)
    if verdict is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        with _lock:
            if key not in _verdicts:
                _verdicts[key] = _agrees(mode, device_index)
            verdict = _verdicts[key]
    return verdict
