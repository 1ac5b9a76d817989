"""The wgmma kernel's TMA tensor maps (gemm/tensor_maps.py), with the driver's encoder replaced by
a recorder: no GPU needed."""

from __future__ import annotations

import ctypes

import pytest

from mxfp8_moe.gemm import tensor_maps
from mxfp8_moe.gemm.tensor_maps import BOX_K, MAP_BYTES, TensorMapPair, tensor_map
from mxfp8_moe.jit.runtime import DriverError


class _Encoded:
    """Stands in for a CUtensorMap: 128 bytes whose first byte counts the encodes."""

    def __init__(self, index: int):
        self.buffer = ctypes.create_string_buffer(bytes([index]) * MAP_BYTES, MAP_BYTES)

    def getPtr(self):
        return ctypes.addressof(self.buffer)


@pytest.fixture
def encoder(monkeypatch):
    calls = []
    driver = tensor_maps.driver

    def encode(*args):
        calls.append(args)
        return driver.CUresult.CUDA_SUCCESS, _Encoded(len(calls))

    monkeypatch.setattr(driver, "cuTensorMapEncodeTiled", encode)
    monkeypatch.setattr(tensor_maps, "_maps", {})
    return calls


def test_a_map_describes_a_row_major_byte_matrix_in_swizzled_boxes(encoder):
    driver = tensor_maps.driver
    encoded = tensor_map(0x10000, 1000, 2880, 96)
    (data_type, rank, address, dims, strides, box, element_strides, interleave, swizzle, _, fill), = encoder
    assert (data_type, rank, address) == (driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, 0x10000)
    # Innermost first: K bytes per row, then rows; a box is one 128-byte swizzle row of K by the tile's rows.
    assert [int(d) for d in dims] == [2880, 1000] and [int(s) for s in strides] == [2880]
    assert [int(b) for b in box] == [BOX_K, 96] and [int(e) for e in element_strides] == [1, 1]
    assert swizzle == driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B
    assert interleave == driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE
    assert fill == driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE  # zeros past the end
    assert encoded == bytes([1]) * MAP_BYTES


def test_maps_are_encoded_once_per_address_and_shape(encoder):
    first = tensor_map(0x10000, 1000, 2048, 128)
    assert tensor_map(0x10000, 1000, 2048, 128) == first and len(encoder) == 1
    assert tensor_map(0x20000, 1000, 2048, 128) != first  # another buffer
    assert tensor_map(0x10000, 1001, 2048, 128) != first  # more rows
    assert len(encoder) == 3


def test_an_encoder_failure_names_the_matrix(monkeypatch):
    driver = tensor_maps.driver
    monkeypatch.setattr(driver, "cuTensorMapEncodeTiled",
                        lambda *args: (driver.CUresult.CUDA_ERROR_INVALID_VALUE, None))
    monkeypatch.setattr(tensor_maps, "_maps", {})
    with pytest.raises(DriverError, match=r"\(1000, 2048\) byte matrix at 0x10000, box 128 x 128"):
        tensor_map(0x10000, 1000, 2048, 128)


def test_pair_is_the_kernels_parameter_layout():
    pair = TensorMapPair()
    pair.set(tokens=b"\x01" * MAP_BYTES, weights=b"\x02" * MAP_BYTES)
    assert ctypes.sizeof(pair) == 2 * MAP_BYTES  # WgmmaTensorMaps: two 128-byte CUtensorMaps
    assert bytes(pair) == b"\x01" * MAP_BYTES + b"\x02" * MAP_BYTES
