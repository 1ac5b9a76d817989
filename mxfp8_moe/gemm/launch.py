"""Turn a validated call into a kernel launch: the loaded kernel per (device, spec), its argument
block, its grid and its stream.

A GemmKernel is created once per (device, spec) and reused: its ctypes argument block (and, for
the wgmma kernel, its tensor maps) and the pointer array the driver reads are built once, so a
call only writes the new pointers and sizes into them before launching.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from ..jit.build import build
from ..jit.runtime import LoadedKernel
from .spec import ENTRY, WGMMA_WEIGHT_ROWS, KernelSpec, kernel_dir
from .tensor_maps import WgmmaTensorMaps, wgmma_maps


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
        self.kernel = LoadedKernel(cubin, ENTRY, device_index, spec.threads)
        self._params = GroupedGemmParams()
        arguments = [self._params]
        if spec.kind == "wgmma":
            self._maps = WgmmaTensorMaps()
            self._maps_key: tuple | None = None  # the tensors self._maps describes
            arguments.append(self._maps)
        self._pointers = (ctypes.c_void_p * len(arguments))(*map(ctypes.addressof, arguments))
        self._pointers_address = ctypes.addressof(self._pointers)
        self._lock = threading.Lock()  # the argument block is shared by threads calling this kernel
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
        num_experts = b.shape[0]
        grid, shared = self.launch_config(num_experts, a.shape[0])
        with self._lock:
            p = self._params
            p.a, p.b, p.a_scale, p.b_scale = a.data_ptr(), b.data_ptr(), a_scale.data_ptr(), b_scale.data_ptr()
            p.m_indptr, p.out = m_indptr.data_ptr(), out.data_ptr()
            p.a_scale_stride_row, p.a_scale_stride_word = a_scale.stride()
            p.b_scale_stride_expert, p.b_scale_stride_row, p.b_scale_stride_word = b_scale.stride()
            p.cum_m, p.num_experts = a.shape[0], num_experts
            if self.spec.kind == "wgmma":
                self._set_maps(a, b, a_scale, b_scale, out)
            self.kernel.launch(grid, shared, stream, self._pointers_address)

    def _set_maps(self, a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  out: torch.Tensor) -> None:
        """Point the tensor maps at this call's tensors, unless they already do: a server reuses its
        buffers, so the steady state is one tuple comparison. Everything else a map holds (K, N,
        the word count, the boxes) is fixed by the spec."""
        key = (a.data_ptr(), a.shape[0], b.data_ptr(), b.shape[0], a_scale.data_ptr(), a_scale.shape[0],
               a_scale.stride(), b_scale.data_ptr(), b_scale.stride(), out.data_ptr(), out.shape[0])
        if key != self._maps_key:
            self._maps.set(**wgmma_maps(a, b, a_scale, b_scale, out, block_t=self.spec.block_t,
                                        weight_box_rows=WGMMA_WEIGHT_ROWS // 2))
            self._maps_key = key


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
