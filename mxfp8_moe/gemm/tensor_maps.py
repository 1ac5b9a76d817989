"""TMA tensor maps of the grouped GEMM's tensors: 2-D byte views of an operand (rows, K) in
128-byte swizzled boxes of 128 bytes (one K block) by a tile's rows (MXFP4 weights: 64-byte
swizzled boxes of the K block's 64 packed bytes), views of MN-major scale
tensors whose boxes are one scale word of consecutive rows, and the bf16 output in 128-byte
swizzled boxes of 64 columns by a tile's rows. (families/wgmma.py assembles its kernel's maps.)

A map embeds its tensor's address, so one is encoded per distinct (address, shape, strides, box):
weights keep their address from call to call and servers reuse token buffers, so a small table
of encoded maps makes the steady state a dict lookup.
"""

from __future__ import annotations

import ctypes

import torch
from cuda.bindings import driver

from ..arith import round_up
from ..jit.runtime import DriverError
from ..memo import BoundedMemo

MAP_BYTES = 128  # sizeof(CUtensorMap)
BOX_K = 128  # bytes of K per operand box: one swizzle row
OUTPUT_BOX_COLUMNS = 64  # bf16 columns per output box: one swizzle row
WORD = 4  # bytes per scale word
_ALIGNMENT = 16  # TMA: global addresses and strides in multiples of 16 bytes
_maps = BoundedMemo(256)


def scales_fit_tma(a_scale: torch.Tensor, b_scale: torch.Tensor) -> bool:
    """Whether both scale tensors are MN-major (a row's neighbour is the next word in memory), as
    FlashInfer's quantizers lay them out, with the 16-byte alignment TMA needs. A stride of a size-1
    dimension is never taken, so it does not count; a broadcast (stride 0) dimension does not fit.
    (On every call: written for speed.)"""
    a_strides, b_strides = a_scale.stride(), b_scale.stride()
    if a_strides[0] != 1 or b_strides[1] != 1 or (a_scale.data_ptr() | b_scale.data_ptr()) % _ALIGNMENT:
        return False
    return (_step_fits(a_scale.shape[1], a_strides[1]) and _step_fits(b_scale.shape[2], b_strides[2])
            and _step_fits(b_scale.shape[0], b_strides[0]))


def _step_fits(size: int, stride: int) -> bool:
    return size == 1 or (stride > 0 and stride * WORD % _ALIGNMENT == 0)


def operand_map(address: int, rows: int, k: int, box_rows: int) -> bytes:
    """A row-major (rows, k) byte matrix at `address` (16-byte aligned, k % 16 == 0)."""
    return _encoded(driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8, address, (k, rows), (k,),
                    (BOX_K, box_rows), driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
                    f"({rows}, {k}) byte matrix")


def packed_operand_map(address: int, rows: int, k: int, box_rows: int) -> bytes:
    """A row-major (rows, k / 2) matrix of MXFP4 codes at `address` (16-byte aligned, k % 32 == 0),
    in 64-byte swizzled boxes of one K block's 64 bytes: 16-byte chunk j of box row r lands at
    chunk j ^ (r / 2) % 4, so the kernel's fragment loads (eight rows at a time) avoid bank conflicts."""
    return _encoded(driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8, address, (k // 2, rows), (k // 2,),
                    (BOX_K // 2, box_rows), driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_64B,
                    f"({rows}, {k // 2}) MXFP4 byte matrix")


def output_map(address: int, rows: int, columns: int, box_rows: int) -> bytes:
    """A row-major (rows, columns) bf16 matrix at `address` (16-byte aligned, columns % 16 == 0)."""
    return _encoded(driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, address, (columns, rows),
                    (2 * columns,), (OUTPUT_BOX_COLUMNS, box_rows),
                    driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B, f"({rows}, {columns}) bf16 matrix")


def rows_map(address: int, rows: int, columns: int, box_rows: int) -> bytes:
    """A row-major (rows, columns) bf16 matrix at `address` (16-byte aligned, columns % 8 == 0) in
    unswizzled boxes of one K block's columns (the fused layer's down phase quantizes them itself)."""
    return _encoded(driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, address, (columns, rows),
                    (2 * columns,), (BOX_K, box_rows), driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_NONE,
                    f"({rows}, {columns}) bf16 matrix")


def scale_map(address: int, dims, strides, box_rows: int) -> bytes:
    """Scale words at `address` with dims and element strides innermost first (the rows, stride 1);
    a box is `box_rows` consecutive rows of one word."""
    if strides[0] != 1:
        raise ValueError(f"a scale map reads scale rows as adjacent words (MN-major scales); got a row "
                         f"stride of {strides[0]} words (scales_fit_tma decides which scales it may be given)")
    # A size-1 dimension's stride is never taken, but the encoder checks it: give it one that
    # would be valid, the aligned extent of the dimensions inside it.
    byte_strides, inner_bytes = [], dims[0] * WORD
    for size, stride in zip(dims[1:], strides[1:]):
        step = stride * WORD if size > 1 else round_up(inner_bytes, _ALIGNMENT)
        byte_strides.append(step)
        inner_bytes = step * size
    return _encoded(driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT32, address, tuple(dims),
                    tuple(byte_strides), (box_rows,) + (1,) * (len(dims) - 1),
                    driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_NONE,
                    f"scale tensor of {tuple(reversed(dims))} words")


def _encoded(data_type, address: int, dims: tuple, byte_strides: tuple, box: tuple, swizzle, what: str) -> bytes:
    key = (data_type, address, dims, byte_strides, box, swizzle)
    encoded = _maps.get(key)
    if encoded is None:
        err, encoded_map = driver.cuTensorMapEncodeTiled(
            data_type, len(dims), address, [driver.cuuint64_t(d) for d in dims],
            [driver.cuuint64_t(s) for s in byte_strides], [driver.cuuint32_t(b) for b in box],
            [driver.cuuint32_t(1)] * len(dims),
            driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
            driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise DriverError(f"cuTensorMapEncodeTiled failed ({err}) for a {what} at {address:#x}, "
                              f"box {' x '.join(map(str, reversed(box)))}")
        encoded = _maps.put(key, ctypes.string_at(encoded_map.getPtr(), MAP_BYTES))
    return encoded
