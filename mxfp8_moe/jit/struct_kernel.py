"""A kernel whose one argument is a C struct passed by value (`__grid_constant__`), mirrored by a
ctypes.Structure: compiled once per specialization, loaded once per device, launched with the
struct's fields filled in.

The MoE block's small kernels (routing, the activation quantizer, the combine) are all of this
kind; the GEMM families pass tensor maps beside their struct and have their own launcher.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Callable, Hashable

from ..gemm.device import DeviceInfo
from .build import build
from .runtime import LoadedKernel


def entry_source(header: str, entry: str, params: str, call: str, threads: int, min_blocks: int | None = None) -> str:
    """The generated source of one specialization: `entry`, taking the struct `params` by value,
    calls the template instantiation `call` (both in namespace mxfp8_moe) declared in `header`."""
    bounds = f"{threads}" if min_blocks is None else f"{threads}, {min_blocks}"
    return (f'#include "{header}"\n'
            f'extern "C" __global__ void __launch_bounds__({bounds}) '
            f"{entry}(const __grid_constant__ mxfp8_moe::{params} params) {{\n"
            f"    mxfp8_moe::{call}(params);\n}}\n")


class StructKernel:
    """One compiled specialization on one device, with its argument block. Launches from several
    threads take turns filling the one block (the driver copies it at launch)."""

    def __init__(self, source: str, *, arch: str, label: str, entry: str, params: type[ctypes.Structure],
                 threads: int, device_index: int):
        cubin, _ = build(source, arch=arch, label=label)
        # Each of these kernels waits for the grid before it (griddepcontrol, sm_90+) before its
        # first global access, so from sm_90 on it may be launched while that grid finishes.
        programmatic = DeviceInfo.for_arch(arch).capability >= (9, 0)
        self.kernel = LoadedKernel(cubin, entry, device_index, threads, programmatic=programmatic)
        self._params = params()
        self._fields = {name for name, _ in params._fields_}
        self._pointers = (ctypes.c_void_p * 1)(ctypes.addressof(self._params))
        self._lock = threading.Lock()

    def launch(self, grid: tuple[int, int, int], stream: int, **fields) -> None:
        """Set the struct's fields (pointers as ints) and launch on `stream`."""
        unknown = fields.keys() - self._fields
        if unknown:  # setattr would add a Python attribute and leave the C field as it was
            raise TypeError(f"{type(self._params).__name__} has no field {sorted(unknown)}")
        with self._lock:
            for name, value in fields.items():
                setattr(self._params, name, value)
            self.kernel.launch(grid, 0, stream, ctypes.addressof(self._pointers))


class KernelMemo:
    """Kernels by key (a spec and a device), each made once even when threads race for it."""

    def __init__(self):
        self._kernels: dict[Hashable, StructKernel] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], StructKernel]) -> StructKernel:
        kernel = self._kernels.get(key)
        if kernel is None:
            with self._lock:
                kernel = self._kernels.get(key) or self._kernels.setdefault(key, make())
        return kernel

    def kernel(self, spec, device_index: int) -> StructKernel:
        """The kernel of `spec` on a device: a hashable spec with `arch`, `label`, `source()` and the
        class attributes `entry`, `params` (its ctypes struct) and `threads`."""
        return self.get((device_index, spec), lambda: StructKernel(
            spec.source(), arch=spec.arch, label=spec.label, entry=spec.entry, params=spec.params,
            threads=spec.threads, device_index=device_index))
