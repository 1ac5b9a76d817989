"""Turn a validated call into a kernel launch: the loaded kernel per (device, spec), its argument
block, its grid and its stream.

A GemmKernel is created once per (device, spec) and reused. The arguments of a launch (the
parameter block, for the wgmma kernel its tensor maps, and the pointer array the driver reads) are
built once per set of tensors and never changed after: a server that reuses its buffers launches
with one tuple lookup, and threads share the blocks without a lock.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from ..jit.build import build
from ..jit.runtime import LoadedKernel
from .device import DeviceInfo
from .spec import ENTRY, WGMMA_WEIGHT_ROWS, KernelSpec, kernel_dir
from .tensor_maps import WgmmaTensorMaps, wgmma_maps


# Distinct tensor sets per kernel in a server are bounded by its buffers; the bound only guards
# against a caller cycling through unbounded ones.
_MAX_ARGUMENTS = 1024


class GroupedGemmParams(ctypes.Structure):
    """Mirror of mxfp8_moe::GroupedGemmParams (kernels/problem.cuh), passed by value."""

    _fields_ = [
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("a_scale", ctypes.c_void_p),
        ("b_scale", ctypes.c_void_p),
        ("m_indptr", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("a_scale_stride_row", ctypes.c_int64),
        ("a_scale_stride_word", ctypes.c_int64),
        ("b_scale_stride_expert", ctypes.c_int64),
        ("b_scale_stride_row", ctypes.c_int64),
        ("b_scale_stride_word", ctypes.c_int64),
        ("cum_m", ctypes.c_int32),
        ("num_experts", ctypes.c_int32),
    ]


class GemmKernel:
    """A compiled and loaded grouped-GEMM specialization on one device."""

    def __init__(self, spec: KernelSpec, device_index: int):
        self.spec = spec
        cubin, _ = build(spec.source(), arch=spec.arch, include_dir=kernel_dir(), label=spec.label)
        # The tensor-core kernels wait for the previous grid before their first global access
        # (griddepcontrol, sm_90+): their launch may overlap its end.
        programmatic = spec.kind != "simt" and DeviceInfo.for_arch(spec.arch).capability >= (9, 0)
        self.kernel = LoadedKernel(cubin, ENTRY, device_index, spec.threads, programmatic)
        self._arguments: dict[tuple, LaunchArguments] = {}
        self._grids: dict[tuple[int, int], tuple[tuple[int, int, int], int]] = {}

    def launch_config(self, num_experts: int, cum_m: int) -> tuple[tuple[int, int, int], int]:
        """(grid, dynamic shared bytes): persistent for the MMA kernel, one block per column
        block x expert x row slice for the SIMT kernel."""
        spec = self.spec
        row_slices = max(1, min(64, -(-cum_m // num_experts))) if spec.kind == "simt" else 0
        key = (num_experts, row_slices)
        launch = self._grids.get(key)
        if launch is None:
            shared = spec.dynamic_shared_bytes(num_experts)
            if spec.kind == "simt":
                grid = (-(-spec.n_out // spec.threads), num_experts, row_slices)
            else:
                grid = (self.kernel.resident_blocks(shared), 1, 1)
            launch = self._grids[key] = (grid, shared)
        return launch

    def __call__(self, a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                 m_indptr: torch.Tensor, out: torch.Tensor, stream: int) -> None:
        cum_m, num_experts = a.shape[0], b.shape[0]
        grid, shared = self.launch_config(num_experts, cum_m)
        # Everything the arguments hold beyond what the spec fixes (N, K, the word count, the boxes).
        key = (a.data_ptr(), b.data_ptr(), a_scale.data_ptr(), b_scale.data_ptr(), m_indptr.data_ptr(),
               out.data_ptr(), cum_m, num_experts, a_scale.shape[0], a_scale.stride(), b_scale.stride())
        arguments = self._arguments.get(key)
        if arguments is None:
            if len(self._arguments) >= _MAX_ARGUMENTS:
                self._arguments.clear()
            arguments = self._arguments[key] = self._build_arguments(a, b, a_scale, b_scale, m_indptr, out)
        self.kernel.launch(grid, shared, stream, arguments.address)

    def _build_arguments(self, a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                         m_indptr: torch.Tensor, out: torch.Tensor) -> LaunchArguments:
        params = GroupedGemmParams(a.data_ptr(), b.data_ptr(), a_scale.data_ptr(), b_scale.data_ptr(),
                                   m_indptr.data_ptr(), out.data_ptr(), *a_scale.stride(), *b_scale.stride(),
                                   a.shape[0], b.shape[0])
        if self.spec.kind != "wgmma":
            return LaunchArguments(params)
        maps = WgmmaTensorMaps()
        maps.set(**wgmma_maps(a, b, a_scale, b_scale, out, block_t=self.spec.block_t,
                              weight_box_rows=WGMMA_WEIGHT_ROWS // 2))
        return LaunchArguments(params, maps)


class LaunchArguments:
    """One launch's kernel arguments as the driver reads them (an array of pointers to the
    by-value parameters); built for one set of tensors and never changed."""

    def __init__(self, *blocks: ctypes.Structure):
        self.blocks = blocks  # kept alive with the pointers to them
        self.pointers = (ctypes.c_void_p * len(blocks))(*map(ctypes.addressof, blocks))
        self.address = ctypes.addressof(self.pointers)


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
