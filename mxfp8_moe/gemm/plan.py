"""Which loaded kernel serves a call: the scale-mode policy, the heuristic and the kernel table,
memoized per call shape so that a steady-state call costs one dict lookup."""

from __future__ import annotations

from ..memo import BoundedMemo
from . import native_guard
from .device import device_info
from .heuristics import NATIVE_ARCHS, choose_spec
from .launch import GemmKernel, get_kernel
from .spec import DEFAULT_VARIANT, Variant

_plans = BoundedMemo(4096)


def kernel_for(*, device_index: int, num_experts: int, cum_m: int, n: int, k: int, k_granularity: int,
               gated: bool, scale_mode: str, aligned: bool, scales_fit_tma: bool,
               variant: Variant = DEFAULT_VARIANT) -> GemmKernel:
    key = (device_index, num_experts, cum_m, n, k, k_granularity, gated, scale_mode, aligned, scales_fit_tma, variant)
    kernel = _plans.get(key)
    if kernel is not None:
        return kernel
    device = device_info(device_index)
    mode = scale_mode
    remember = True
    if scale_mode == "auto" and device.arch in NATIVE_ARCHS:
        verdict = native_guard.verified("native", device_index)
        # Capturing a CUDA graph before the guard ran: software scaling now, decided later.
        remember = verdict is not None
        mode = "native" if verdict else "software"
    spec = choose_spec(device=device, num_experts=num_experts, cum_m=cum_m, n=n, k=k, k_granularity=k_granularity,
                       gated=gated, scale_mode=mode, aligned=aligned, allow_wgmma=scales_fit_tma, variant=variant)
    kernel = get_kernel(spec, device_index)
    if remember:
        _plans.put(key, kernel)
    return kernel

