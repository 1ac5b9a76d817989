"""Launching without a GPU: which kernels launch programmatically (overlapping the previous grid's
end) and the driver configuration such a launch passes (gemm/launch.py, jit/runtime.py)."""

from __future__ import annotations

from mxfp8_moe.gemm import launch
from mxfp8_moe.gemm.families import MmaSpec, SimtSpec, WgmmaSpec
from mxfp8_moe.memo import BoundedMemo
from mxfp8_moe.jit.runtime import LoadedKernel, driver


class _UnloadedKernel:
    """Stands in for a loaded kernel: keeps what GemmKernel asked for."""

    def __init__(self, cubin, entry, device_index, threads, programmatic):
        self.programmatic = programmatic


def test_tensor_core_kernels_launch_programmatically_from_sm90(monkeypatch):
    # Their first global access waits for the previous grid (griddepcontrol, sm_90+); the portable
    # kernel does not wait, and sm_89 has no griddepcontrol.
    monkeypatch.setattr(launch, "build", lambda *args, **kwargs: (b"", False))
    monkeypatch.setattr(launch, "LoadedKernel", _UnloadedKernel)
    for spec, expected in ((WgmmaSpec("sm_90a", 96, 2048, 128, False, block_t=32, stages=2), True),
                           (MmaSpec("sm_120a", 96, 2048, 128, False, block_n=128, block_t=32, stages=2), True),
                           (MmaSpec("sm_89", 96, 2048, 128, False, block_n=128, block_t=32, stages=2), False),
                           (SimtSpec("sm_120a", 96, 2048, 128, False), False)):
        assert launch.GemmKernel(spec, 0).kernel.programmatic is expected, spec


def test_programmatic_launch_configuration_is_built_once_per_grid_and_stream():
    kernel = LoadedKernel.__new__(LoadedKernel)  # the configuration is host data: no module to load
    kernel.threads, kernel.programmatic, kernel._configs = 384, True, BoundedMemo(4)
    config = kernel._config((132, 1, 1), 200_000, 7)
    assert (config.gridDimX, config.gridDimY, config.gridDimZ) == (132, 1, 1)
    assert (config.blockDimX, config.blockDimY, config.blockDimZ) == (384, 1, 1)
    assert config.sharedMemBytes == 200_000 and int(config.hStream) == 7 and config.numAttrs == 1
    (attribute,) = config.attrs
    assert attribute.id == driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert attribute.value.programmaticStreamSerializationAllowed == 1
    assert kernel._config((132, 1, 1), 200_000, 7) is config  # shared by threads, never rewritten
    assert int(kernel._config((132, 1, 1), 200_000, 8).hStream) == 8 and int(config.hStream) == 7
