"""Turn a validated call into a kernel launch: the loaded kernel per (device, spec), its argument
block, its grid and its stream.

A GemmKernel is created once per (device, spec) and reused; what a launch needs beyond the spec
(the kernel's by-value arguments, the pointer array the driver reads, the grid and the shared
memory size) is built once per set of tensors and never changed after: a server that reuses its
buffers launches with one tuple lookup, and threads share the blocks without a lock.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from ..jit.build import build
from ..jit.runtime import LoadedKernel
from ..memo import BoundedMemo
from .device import DeviceInfo
from .spec import ENTRY, NO_EPILOGUE_ARGUMENTS, EpilogueArguments, KernelSpec


class LaunchArguments:
    """One launch's configuration and kernel arguments as the driver reads them (an array of
    pointers to the by-value parameters); built for one set of tensors and never changed."""

    def __init__(self, grid: tuple[int, int, int], shared: int, blocks: tuple[ctypes.Structure, ...]):
        self.grid, self.shared = grid, shared
        self.blocks = blocks  # kept alive with the pointers to them
        self.pointers = (ctypes.c_void_p * len(blocks))(*map(ctypes.addressof, blocks))
        self.address = ctypes.addressof(self.pointers)


class GemmKernel:
    """A compiled and loaded grouped-GEMM specialization on one device."""

    def __init__(self, spec: KernelSpec, device_index: int):
        self.spec = spec
        cubin, _ = build(spec.source(), arch=spec.arch, label=spec.label)
        # A kernel that waits for the previous grid before its first global access (griddepcontrol,
        # sm_90+) may be launched while that grid finishes.
        programmatic = spec.waits_for_prior_grid and DeviceInfo.for_arch(spec.arch).capability >= (9, 0)
        self.kernel = LoadedKernel(cubin, ENTRY, device_index, spec.threads, programmatic)
        self._arguments = BoundedMemo(1024)

    def launch_config(self, num_experts: int, cum_m: int) -> tuple[tuple[int, int, int], int]:
        """(grid, dynamic shared bytes) of a launch over this many experts and rows."""
        shared = self.spec.dynamic_shared_bytes(num_experts)
        return self.spec.grid(num_experts, cum_m, self.kernel.resident_blocks(shared, self.spec.cluster)), shared

    def __call__(self, a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                 m_indptr: torch.Tensor, out: torch.Tensor, stream: int,
                 epilogue: EpilogueArguments = NO_EPILOGUE_ARGUMENTS) -> None:
        # Everything the arguments hold beyond what the spec fixes (N, K, the word count, the boxes).
        key = (a.data_ptr(), b.data_ptr(), a_scale.data_ptr(), b_scale.data_ptr(), m_indptr.data_ptr(),
               out.data_ptr(), a.shape[0], b.shape[0], a_scale.shape[0], a_scale.stride(), b_scale.stride(),
               epilogue.key)
        arguments = self._arguments.get(key)
        if arguments is None:
            grid, shared = self.launch_config(b.shape[0], a.shape[0])
            blocks = self.spec.arguments(a, b, a_scale, b_scale, m_indptr, out, epilogue)
            arguments = self._arguments.put(key, LaunchArguments(grid, shared, blocks))
        self.kernel.launch(arguments.grid, arguments.shared, stream, arguments.address)


_kernels: dict[tuple[int, KernelSpec], GemmKernel] = {}
_kernels_lock = threading.Lock()
_building: dict[tuple[int, KernelSpec], threading.Lock] = {}


def get_kernel(spec: KernelSpec, device_index: int) -> GemmKernel:
    """The loaded kernel for `spec` on a device: compiled (or read from the cache) on first use.

    Threads asking for the same spec wait for one build; different specs build in parallel.
    """
    key = (device_index, spec)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _kernels_lock:
        build_lock = _building.setdefault(key, threading.Lock())
    with build_lock:
        kernel = _kernels.get(key)
        if kernel is None:
            kernel = _kernels[key] = GemmKernel(spec, device_index)
    return kernel
