"""The wgmma kernel's TMA tensor maps (gemm/tensor_maps.py, gemm/families/wgmma.py), with the
driver's encoder replaced by a recorder: no GPU needed."""

from __future__ import annotations

import ctypes

import pytest

import torch

from mxfp8_moe import to_k_major, to_mn_major_b_scale
from mxfp8_moe.gemm import launch, tensor_maps
from mxfp8_moe.gemm.families import WgmmaSpec
from mxfp8_moe.gemm.families.wgmma import WgmmaTensorMaps, wgmma_maps
from mxfp8_moe.gemm.tensor_maps import BOX_K, MAP_BYTES, operand_map, scales_fit_tma
from mxfp8_moe.jit.runtime import DriverError


class _Encoded:
    """Stands in for a CUtensorMap: 128 bytes whose first byte counts the encodes."""

    def __init__(self, index: int):
        self.buffer = ctypes.create_string_buffer(bytes([index]) * MAP_BYTES, MAP_BYTES)

    def getPtr(self):
        return ctypes.addressof(self.buffer)


@pytest.fixture
def encoder(monkeypatch, fresh_memos):
    calls = []
    driver = tensor_maps.driver

    def encode(*args):
        calls.append(args)
        return driver.CUresult.CUDA_SUCCESS, _Encoded(len(calls))

    monkeypatch.setattr(driver, "cuTensorMapEncodeTiled", encode)
    return calls


def _unpack(call):
    data_type, rank, address, dims, strides, box, element_strides, interleave, swizzle, _, fill = call
    assert rank == len(dims) == len(box) == len(element_strides) == len(strides) + 1
    assert [int(e) for e in element_strides] == [1] * rank
    assert interleave == tensor_maps.driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE
    assert fill == tensor_maps.driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE  # zeros past the end
    return data_type, address, [int(d) for d in dims], [int(s) for s in strides], [int(b) for b in box], swizzle


def test_an_operand_map_describes_a_row_major_byte_matrix_in_swizzled_boxes(encoder):
    driver = tensor_maps.driver
    encoded = operand_map(0x10000, 1000, 2880, 96)
    data_type, address, dims, strides, box, swizzle = _unpack(encoder[0])
    assert (data_type, address) == (driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8, 0x10000)
    # Innermost first: K bytes per row, then rows; a box is one 128-byte swizzle row of K by the tile's rows.
    assert (dims, strides, box) == ([2880, 1000], [2880], [BOX_K, 96])
    assert swizzle == driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B
    assert encoded == bytes([1]) * MAP_BYTES


def test_maps_are_encoded_once_per_address_and_shape(encoder):
    first = operand_map(0x10000, 1000, 2048, 128)
    assert operand_map(0x10000, 1000, 2048, 128) == first and len(encoder) == 1
    assert operand_map(0x20000, 1000, 2048, 128) != first  # another buffer
    assert operand_map(0x10000, 1001, 2048, 128) != first  # more rows
    assert len(encoder) == 3


def test_an_encoder_failure_names_the_matrix(monkeypatch, fresh_memos):
    driver = tensor_maps.driver
    monkeypatch.setattr(driver, "cuTensorMapEncodeTiled",
                        lambda *args: (driver.CUresult.CUDA_ERROR_INVALID_VALUE, None))
    with pytest.raises(DriverError, match=r"\(1000, 2048\) byte matrix at 0x10000, box 128 x 128"):
        operand_map(0x10000, 1000, 2048, 128)


def _mn_major_scales(m_padded, num_experts, n, k_align):
    """Scale tensors in FlashInfer's MN-major layout (layout.py), random words."""
    a_scale = torch.randint(0, 2**31 - 1, (k_align, m_padded), dtype=torch.int32).t()
    b_scale = to_mn_major_b_scale(torch.randint(0, 2**31 - 1, (num_experts, n, k_align), dtype=torch.int32))
    return a_scale, b_scale


def test_call_maps_cover_operands_scales_and_output(encoder):
    driver = tensor_maps.driver
    m_padded, num_experts, n, k, k_align = 520, 8, 90, 2048, 4
    a = torch.empty(500, k, dtype=torch.uint8)
    b = torch.empty(num_experts, n, k, dtype=torch.uint8)
    a_scale, b_scale = _mn_major_scales(m_padded, num_experts, n, k_align)
    out = torch.empty(500, 2 * n, dtype=torch.bfloat16)
    maps = wgmma_maps(a, b, a_scale, b_scale, out, block_t=96)
    assert list(maps) == [name for name, _ in WgmmaTensorMaps._fields_]
    tokens, weights, token_scales, weight_scales, output = map(_unpack, encoder)
    assert tokens[1:5] == (a.data_ptr(), [k, 500], [k], [BOX_K, 96])
    assert weights[1:5] == (b.data_ptr(), [k, num_experts * n], [k], [BOX_K, 64])
    uint32 = driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT32
    no_swizzle = driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_NONE
    # Rows innermost (stride one word), then words; a box is one word of a tile's rows.
    assert token_scales == (uint32, a_scale.data_ptr(), [m_padded, k_align], [4 * m_padded], [96, 1], no_swizzle)
    # Rows (N of them: rows past N read as zeros, not the padding), words, experts.
    assert weight_scales == (uint32, b_scale.data_ptr(), [n, k_align, num_experts], [4 * 92, 4 * 92 * k_align],
                             [64, 1, 1], no_swizzle)
    # Output columns innermost; a box is 64 bf16 columns (128 swizzled bytes) by a tile's rows.
    assert output == (driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, out.data_ptr(), [2 * n, 500],
                      [4 * n], [64, 96], driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B)


def test_a_size_one_dimension_gets_a_valid_stride(encoder):
    # One word per row (K <= 512 at k_gran 128) and one expert: torch reports strides of 1 there.
    a_scale = torch.randint(0, 2**31 - 1, (10, 1), dtype=torch.int32)
    b_scale = torch.randint(0, 2**31 - 1, (1, 30, 1), dtype=torch.int32)
    assert a_scale.stride() == (1, 1) and b_scale.stride() == (30, 1, 1)
    assert scales_fit_tma(a_scale, b_scale)
    wgmma_maps(torch.empty(10, 256, dtype=torch.uint8), torch.empty(1, 30, 256, dtype=torch.uint8), a_scale, b_scale,
               torch.empty(10, 32, dtype=torch.bfloat16), block_t=32)
    token_scales, weight_scales = (_unpack(call) for call in encoder[2:4])
    assert token_scales[3] == [48]  # 10 rows of 4 bytes, aligned to 16
    assert weight_scales[3] == [128, 128]  # 30 rows -> 128 bytes; one word, so the expert step is the same


def test_only_mn_major_aligned_scales_fit_tma():
    a_scale, b_scale = _mn_major_scales(520, 8, 90, 4)
    assert scales_fit_tma(a_scale, b_scale)
    assert not scales_fit_tma(to_k_major(a_scale), b_scale)  # words adjacent, rows apart
    assert not scales_fit_tma(a_scale, to_k_major(b_scale))
    assert not scales_fit_tma(a_scale[1:], b_scale)  # 4-byte aligned only
    odd = torch.randint(0, 2**31 - 1, (4, 522), dtype=torch.int32).t()[:520]  # 522-word steps: 2088 bytes
    assert not scales_fit_tma(odd, b_scale)
    broadcast = b_scale[:1].expand(8, -1, -1)  # one expert's scales for all: a 0 expert step
    assert not scales_fit_tma(a_scale, broadcast)


def test_a_scale_map_refuses_rows_that_are_not_adjacent(encoder):
    a_scale, b_scale = _mn_major_scales(520, 8, 90, 4)
    with pytest.raises(ValueError, match="row stride of 4 words"):
        wgmma_maps(torch.empty(500, 2048, dtype=torch.uint8), torch.empty(8, 90, 2048, dtype=torch.uint8),
                   a_scale, to_k_major(b_scale), torch.empty(500, 90, dtype=torch.bfloat16), block_t=96)


def test_maps_are_the_kernels_parameter_layout():
    maps = WgmmaTensorMaps()
    names = [name for name, _ in WgmmaTensorMaps._fields_]
    assert names == ["tokens", "weights", "token_scales", "weight_scales", "output"]  # kernels/wgmma_grouped_gemm.cuh
    maps.set(**{name: bytes([i + 1]) * MAP_BYTES for i, name in enumerate(names)})
    assert ctypes.sizeof(maps) == 5 * MAP_BYTES
    assert bytes(maps) == b"".join(bytes([i + 1]) * MAP_BYTES for i in range(5))


class _RecordingKernel:
    """Stands in for a loaded kernel: records the tensor maps each launch passes."""

    def __init__(self, cubin, entry, device_index, threads, programmatic):
        self.launched: list[bytes] = []

    def resident_blocks(self, shared_bytes, cluster=1):
        return 132

    def launch(self, grid, shared_bytes, stream, pointers):
        params, maps = (ctypes.c_void_p * 2).from_address(pointers)
        self.launched.append(ctypes.string_at(maps, ctypes.sizeof(WgmmaTensorMaps)))


def test_a_kernel_reencodes_its_maps_only_when_a_tensor_moves(encoder, monkeypatch):
    monkeypatch.setattr(launch, "build", lambda *args, **kwargs: (b"", False))
    monkeypatch.setattr(launch, "LoadedKernel", _RecordingKernel)
    spec = WgmmaSpec("sm_90a", 96, 2048, 128, False, block_t=32, stages=2)
    kernel = launch.GemmKernel(spec, 0)
    a, b = torch.empty(500, 2048, dtype=torch.uint8), torch.empty(8, 96, 2048, dtype=torch.uint8)
    a_scale, b_scale = _mn_major_scales(520, 8, 96, 4)
    m_indptr, out = torch.zeros(9, dtype=torch.int32), torch.empty(500, 96, dtype=torch.bfloat16)
    kernel(a, b, a_scale, b_scale, m_indptr, out, 0)
    first = kernel.kernel.launched[-1]
    assert len(encoder) == 5 and first == b"".join(bytes([i]) * MAP_BYTES for i in range(1, 6))
    kernel(a, b, a_scale, b_scale, m_indptr, out, 0)  # the same tensors: nothing re-encoded or rewritten
    assert len(encoder) == 5 and kernel.kernel.launched[-1] == first
    kernel(a, b, a_scale, b_scale, m_indptr, torch.empty_like(out), 0)  # a new output buffer
    moved = kernel.kernel.launched[-1]
    assert len(encoder) == 6 and moved[:4 * MAP_BYTES] == first[:4 * MAP_BYTES]
    assert moved[4 * MAP_BYTES:] == bytes([6]) * MAP_BYTES
    kernel(a.clone(), b, a_scale, b_scale, m_indptr, out, 0)  # new tokens, the first output again
    assert len(encoder) == 7 and kernel.kernel.launched[-1][:MAP_BYTES] == bytes([7]) * MAP_BYTES
    assert kernel.kernel.launched[-1][4 * MAP_BYTES:] == first[4 * MAP_BYTES:]  # that map was kept


def test_packed_weights_map_in_64_byte_swizzled_boxes(encoder):
    # MXFP4 weights (E, N, K / 2): a box is one consumer's 64 rows by the K block's 64 packed bytes,
    # swizzled in 64-byte rows as the kernel's fragment loads assume (chunk j of row r at j ^ (r / 2) % 4).
    driver = tensor_maps.driver
    num_experts, n, k = 4, 96, 2880
    b = torch.empty(num_experts, n, k // 2, dtype=torch.uint8)
    a_scale, b_scale = _mn_major_scales(64, num_experts, n, k // 32)
    wgmma_maps(torch.empty(50, k, dtype=torch.uint8), b, a_scale, b_scale, torch.empty(50, n, dtype=torch.bfloat16),
               block_t=32, packed_weights=True)
    data_type, address, dims, strides, box, swizzle = _unpack(encoder[1])
    assert (data_type, address) == (driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8, b.data_ptr())
    assert (dims, strides, box) == ([k // 2, num_experts * n], [k // 2], [BOX_K // 2, 64])
    assert swizzle == driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_64B
