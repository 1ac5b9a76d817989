"""The launcher of the struct-argument kernels (mxfp8_moe/jit/struct_kernel.py), without a GPU: the
driver side is replaced by a recorder."""

from __future__ import annotations

import ctypes

import pytest

from mxfp8_moe.jit import struct_kernel


class Params(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("count", ctypes.c_int32)]


class Recorder:
    def __init__(self, cubin, entry, device_index, threads, programmatic=False):
        self.launches = []

    def launch(self, grid, dynamic_shared, stream, params_address):
        pointer = ctypes.cast(params_address, ctypes.POINTER(ctypes.c_void_p))[0]
        params = Params.from_address(pointer)
        self.launches.append((grid, stream, params.x, params.count))


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(struct_kernel, "build", lambda source, arch, label: (b"", True))
    monkeypatch.setattr(struct_kernel, "LoadedKernel", Recorder)
    return struct_kernel.StructKernel("", arch="sm_90a", label="t", entry="e", params=Params, threads=32,
                                      device_index=0)


def test_launch_fills_the_struct_the_kernel_reads(kernel):
    kernel.launch((3, 1, 1), 7, x=0x1000, count=5)
    kernel.launch((1, 1, 1), 7, count=6)  # fields not named keep their last values
    assert kernel.kernel.launches == [((3, 1, 1), 7, 0x1000, 5), ((1, 1, 1), 7, 0x1000, 6)]


def test_a_field_the_struct_lacks_is_an_error(kernel):
    with pytest.raises(TypeError, match="no field"):
        kernel.launch((1, 1, 1), 0, counts=5)
    assert kernel.kernel.launches == []


def test_memo_makes_each_kernel_once(kernel):
    memo, made = struct_kernel.KernelMemo(), []
    make = lambda: made.append(1) or kernel  # noqa: E731
    assert memo.get("a", make) is memo.get("a", make) is kernel
    assert made == [1]
