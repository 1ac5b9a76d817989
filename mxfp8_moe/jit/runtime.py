"""The CUDA driver side: load a CUBIN on a device, size a persistent grid, launch.

Launches go through cuda-python's driver API on the caller's stream. The kernel is bound to the
device's primary context (the one torch uses); a launch makes that context current only when the
calling thread holds another one, so tensors on cuda:1 run on cuda:1 whatever the current device.
A kernel that waits for the grid before it (kernels/ptx/grid_dependency.cuh) is launched with
programmatic stream serialization: its launch overlaps the end of that grid.
"""

from __future__ import annotations

import functools
import threading

from cuda.bindings import driver

from ..memo import BoundedMemo

_ARCH_SPECIFIC = {(9, 0), (10, 0), (10, 1), (10, 3), (12, 0), (12, 1)}  # have an sm_XYa target


class DriverError(RuntimeError):
    """A CUDA driver call failed."""


def _check(result, what: str) -> None:
    if result != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(result)
        raise DriverError(f"{what} failed: {name.decode() if name else result}")


def arch_name(capability: tuple[int, int]) -> str:
    """NVRTC target for a compute capability: the arch-specific sm_XYa where one exists."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if (major, minor) in _ARCH_SPECIFIC else "")


@functools.cache
def driver_version() -> int | None:
    """The installed driver's CUDA version (e.g. 13000), or None on a machine without a driver."""
    try:
        err, version = driver.cuDriverGetVersion()
    except Exception:  # noqa: BLE001 - cuda-bindings raises when libcuda cannot be loaded at all
        return None
    return version if err == driver.CUresult.CUDA_SUCCESS else None


_init_lock = threading.Lock()
_contexts: dict[int, tuple[driver.CUcontext, int, driver.CUdevice]] = {}


def primary_context(device_index: int) -> tuple[driver.CUcontext, int, driver.CUdevice]:
    """The device's primary context (retained once per process): (handle, handle as int, device)."""
    context = _contexts.get(device_index)
    if context is None:
        with _init_lock:
            if device_index not in _contexts:
                (err,) = driver.cuInit(0)
                _check(err, "cuInit")
                err, device = driver.cuDeviceGet(device_index)
                _check(err, "cuDeviceGet")
                err, handle = driver.cuDevicePrimaryCtxRetain(device)
                _check(err, "cuDevicePrimaryCtxRetain")
                _contexts[device_index] = (handle, int(handle), device)
            context = _contexts[device_index]
    return context


def _enter(context: driver.CUcontext, context_id: int) -> bool:
    """Make `context` current on this thread unless it already is; True if it was pushed (the
    caller pops it). The state lives in the caller's frame: threads never share it."""
    err, current = driver.cuCtxGetCurrent()
    _check(err, "cuCtxGetCurrent")
    if int(current) == context_id:
        return False
    (err,) = driver.cuCtxPushCurrent(context)
    _check(err, "cuCtxPushCurrent")
    return True


class LoadedKernel:
    """One __global__ function of a CUBIN, loaded into one device's primary context.

    `programmatic`: the kernel waits for the previous grid on its stream before touching global
    memory (griddepcontrol.wait), so it may be launched while that grid finishes."""

    def __init__(self, cubin: bytes, name: str, device_index: int, threads: int, programmatic: bool = False):
        self.device_index = device_index
        self.threads = threads
        self.programmatic = programmatic
        self._configs = BoundedMemo(256)  # per (grid, shared size, stream) in use
        self._context, self._context_id, device = primary_context(device_index)
        pushed = _enter(self._context, self._context_id)
        try:
            err, self._module = driver.cuModuleLoadData(cubin)
            _check(err, "cuModuleLoadData")
            err, self.function = driver.cuModuleGetFunction(self._module, name.encode())
            _check(err, f"cuModuleGetFunction({name})")
            err, self.num_sms = driver.cuDeviceGetAttribute(
                driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device)
            _check(err, "cuDeviceGetAttribute")
            err, max_shared = driver.cuDeviceGetAttribute(
                driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device)
            _check(err, "cuDeviceGetAttribute")
            err, static_shared = driver.cuFuncGetAttribute(
                driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, self.function)
            _check(err, "cuFuncGetAttribute")
            # Dynamic shared memory grows with the number of experts: allow up to the device's limit.
            self.max_dynamic_shared = max_shared - static_shared
            (err,) = driver.cuFuncSetAttribute(
                self.function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.max_dynamic_shared)
            _check(err, "cuFuncSetAttribute")
        finally:
            if pushed:
                driver.cuCtxPopCurrent()
        self._resident = BoundedMemo(256)  # per dynamic shared size

    def resident_blocks(self, dynamic_shared: int, cluster: int = 1) -> int:
        """How many blocks fit on the whole device at once: the size of a persistent grid. A
        kernel built with clusters of `cluster` blocks counts whole clusters, which must each fit
        in one GPC: fewer than the SMs divided by the cluster size where a GPC's SMs do not divide."""
        blocks = self._resident.get((dynamic_shared, cluster))
        if blocks is None:
            pushed = _enter(self._context, self._context_id)
            try:
                if cluster == 1:
                    err, per_sm = driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                        self.function, self.threads, dynamic_shared)
                    resident = per_sm * self.num_sms
                else:
                    config = driver.CUlaunchConfig()
                    config.gridDimX, config.gridDimY, config.gridDimZ = cluster, 1, 1
                    config.blockDimX, config.blockDimY, config.blockDimZ = self.threads, 1, 1
                    config.sharedMemBytes = dynamic_shared
                    err, clusters = driver.cuOccupancyMaxActiveClusters(self.function, config)
                    resident = clusters * cluster
            finally:
                if pushed:
                    driver.cuCtxPopCurrent()
            _check(err, "cuOccupancyMaxActiveClusters" if cluster > 1 else "cuOccupancyMaxActiveBlocksPerMultiprocessor")
            if resident < 1:
                raise DriverError(f"kernel cannot launch: {dynamic_shared} B of dynamic shared memory "
                                  f"(limit {self.max_dynamic_shared} B), {self.threads} threads, clusters of {cluster}")
            blocks = self._resident.put((dynamic_shared, cluster), resident)
        return blocks

    def launch(self, grid: tuple[int, int, int], dynamic_shared: int, stream: int, params_address: int) -> None:
        """Launch on `stream` (a raw handle); params_address points at the void* array of arguments."""
        pushed = _enter(self._context, self._context_id)
        try:
            if self.programmatic:
                (err,) = driver.cuLaunchKernelEx(self._config(grid, dynamic_shared, stream), self.function,
                                                 params_address, 0)
            else:
                (err,) = driver.cuLaunchKernel(self.function, *grid, self.threads, 1, 1, dynamic_shared,
                                               stream, params_address, 0)
        finally:
            if pushed:
                driver.cuCtxPopCurrent()
        _check(err, "cuLaunchKernelEx" if self.programmatic else "cuLaunchKernel")

    def _config(self, grid: tuple[int, int, int], dynamic_shared: int, stream: int) -> driver.CUlaunchConfig:
        """The programmatic launch's configuration, built once per (grid, shared size, stream) and
        never changed after, so threads share it."""
        key = (grid, dynamic_shared, stream)
        config = self._configs.get(key)
        if config is None:
            serialization = driver.CUlaunchAttribute()
            serialization.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            serialization.value.programmaticStreamSerializationAllowed = 1
            config = driver.CUlaunchConfig()
            config.gridDimX, config.gridDimY, config.gridDimZ = grid
            config.blockDimX, config.blockDimY, config.blockDimZ = self.threads, 1, 1
            config.sharedMemBytes = dynamic_shared
            config.hStream = stream
            config.attrs = [serialization]
            config.numAttrs = 1
            self._configs.put(key, config)
        return config
