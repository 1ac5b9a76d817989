"""TMA tensor maps for the wgmma kernel: 2-D byte views of `a` (cum_m, K) and `b` (E * N, K) with
128-byte swizzled boxes of 128 bytes (one K block) by `box_rows` rows.

A map embeds its tensor's address, so one is encoded per distinct (address, rows, K, box): weights
keep their address from call to call and servers reuse token buffers, so a small table of encoded
maps makes the steady state a dict lookup.
"""

from __future__ import annotations

import ctypes

from cuda.bindings import driver

from ..jit.runtime import DriverError

MAP_BYTES = 128  # sizeof(CUtensorMap)
BOX_K = 128  # bytes of K per box: one swizzle row
_MAX_MAPS = 256
_maps: dict[tuple[int, int, int, int], bytes] = {}


class TensorMapPair(ctypes.Structure):
    """Mirror of mxfp8_moe::WgmmaTensorMaps (kernels/wgmma_grouped_gemm.cuh), passed by value."""

    _fields_ = [("tokens", ctypes.c_uint8 * MAP_BYTES), ("weights", ctypes.c_uint8 * MAP_BYTES)]

    def set(self, *, tokens: bytes, weights: bytes) -> None:
        base = ctypes.addressof(self)
        ctypes.memmove(base + TensorMapPair.tokens.offset, tokens, MAP_BYTES)
        ctypes.memmove(base + TensorMapPair.weights.offset, weights, MAP_BYTES)


def tensor_map(address: int, rows: int, k: int, box_rows: int) -> bytes:
    """The encoded map of a row-major (rows, k) byte matrix at `address` (16-byte aligned, k % 16 == 0)."""
    key = (address, rows, k, box_rows)
    encoded = _maps.get(key)
    if encoded is None:
        err, encoded_map = driver.cuTensorMapEncodeTiled(
            driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, address,
            [driver.cuuint64_t(k), driver.cuuint64_t(rows)], [driver.cuuint64_t(k)],
            [driver.cuuint32_t(BOX_K), driver.cuuint32_t(box_rows)], [driver.cuuint32_t(1), driver.cuuint32_t(1)],
            driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
            driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise DriverError(f"cuTensorMapEncodeTiled failed ({err}) for a ({rows}, {k}) byte matrix "
                              f"at {address:#x}, box {box_rows} x {BOX_K}")
        encoded = ctypes.string_at(encoded_map.getPtr(), MAP_BYTES)
        if len(_maps) >= _MAX_MAPS:
            _maps.clear()
        _maps[key] = encoded
    return encoded
