"""A guard for the one path nobody here can run: sm_12x's block-scaled MMA.

The first time a process would use the native scale mode on a device, it computes a small random
problem (both granularities, gated and not, with a few-units and a many-units tile configuration:
narrow tiles with K warps, wide tiles with one warp walking all four byte selectors) with the
native kernels and with the software-scaled ones and compares them. K = 1040 (eight 128-element
blocks and a 16-element tail) makes both granularities read several scale words and every byte
position of a word. If the results disagree, or a kernel of the check fails to build, to launch or
to run, it warns once and the device stays on software scaling. (A kernel that faults leaves the
CUDA context unusable, so later calls in the process fail as well; the warning says what happened.)
The check allocates and syncs, so it never runs inside a CUDA graph capture: a call captured
before the verdict exists uses software scaling. MXFP8_MOE_SCALE_MODE=native skips the check.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import torch

from ..memo import BoundedMemo
from ..quantize import quantize_activations, quantize_weights
from .device import DeviceInfo, capturing, current_stream, device_info
from .heuristics import choose_spec
from .launch import get_kernel
from .spec import KernelSpec

_verdicts = BoundedMemo(64)  # per (device, mode); clear_memos() makes the next call check again
_lock = threading.Lock()
CHECK_ROWS = (5, 0, 13, 1)  # an empty expert, a one-row expert, a partial token tile
CHECK_N, CHECK_K = 64, 1040  # k_gran 128: words 0-1 whole and byte 0 of word 2; k_gran 32: nine words


class NativeScaleWarning(RuntimeWarning):
    """The native block-scaled MMA disagreed with software scaling, or failed to run; software
    scaling is used."""


def specs(device: DeviceInfo, mode: str) -> list[KernelSpec]:
    """The kernels the check runs in `mode` (and, with mode="software", the trusted side)."""
    # The same device claiming a single SM makes choose_spec pick its many-units configuration.
    devices = (device, dataclasses.replace(device, num_sms=1))
    return [choose_spec(device=d, num_experts=len(CHECK_ROWS), cum_m=sum(CHECK_ROWS), n=CHECK_N, k=CHECK_K,
                        k_granularity=k_granularity, gated=gated, scale_mode=mode)
            for k_granularity in (32, 128) for gated in (False, True) for d in devices]


def _run(spec: KernelSpec, device_index: int, problem) -> torch.Tensor:
    a, b, a_scale, b_scale, m_indptr = problem
    out = torch.full((a.shape[0], CHECK_N // 2 if spec.gated else CHECK_N), float("nan"), dtype=torch.bfloat16,
                     device=a.device)
    get_kernel(spec, device_index)(a, b, a_scale, b_scale, m_indptr, out, current_stream(device_index))
    return out


def _warn(mode: str, device_index: int, what: str) -> None:
    warnings.warn(f"{mode} block-scaled MMA on cuda:{device_index} {what}; using software scaling. "
                  "Set MXFP8_MOE_SCALE_MODE to override.", NativeScaleWarning, stacklevel=5)


def agrees(mode: str, device_index: int) -> bool:
    """The check: True if every kernel of `mode` agrees with software scaling."""
    try:
        disagreement = first_disagreement(mode, device_index)
    except Exception as error:  # noqa: BLE001 - whatever broke, the native path is not to be trusted
        _warn(mode, device_index, f"failed its first-use check ({type(error).__name__}: {error})")
        return False
    if disagreement is not None:
        _warn(mode, device_index, f"disagrees with software scaling ({disagreement})")
        return False
    return True


def first_disagreement(mode: str, device_index: int) -> str | None:
    """None if the kernels of `mode` match the software-scaled ones, else which one and by how much."""
    where = torch.device("cuda", device_index)
    counts = torch.tensor(CHECK_ROWS)
    m_indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).to(where)
    generator = torch.Generator(device=where).manual_seed(0)
    x = torch.randn(int(counts.sum()), CHECK_K, device=where, generator=generator)
    w = torch.randn(len(CHECK_ROWS), CHECK_N, CHECK_K, device=where, generator=generator)
    operands = {}
    for k_granularity in (32, 128):
        a, a_scale = quantize_activations(x, m_indptr, k_granularity, backend="torch")
        b, b_scale = quantize_weights(w, k_granularity)
        operands[k_granularity] = (a, b, a_scale, b_scale, m_indptr)
    device = device_info(device_index)
    for candidate, trusted in zip(specs(device, mode), specs(device, "software")):
        problem = operands[candidate.k_granularity]
        result = _run(candidate, device_index, problem).float()
        expected = _run(trusted, device_index, problem).float()
        error = ((result - expected).norm() / expected.norm()).item()  # syncs: a fault raises here
        if not error <= 1e-2:  # also catches NaN
            return f"{candidate.label}: relative difference {error:.3g}"
    return None


def verified(mode: str, device_index: int) -> bool | None:
    """Whether `mode` may be used on the device: True/False once checked, None while capturing a
    CUDA graph before any verdict (the caller then uses software scaling for that call)."""
    key = (device_index, mode)
    verdict = _verdicts.get(key)
    if verdict is None:
        if capturing(device_index):
            return None
        with _lock:
            verdict = _verdicts.get(key)
            if verdict is None:
                verdict = _verdicts.put(key, agrees(mode, device_index))
    return verdict
