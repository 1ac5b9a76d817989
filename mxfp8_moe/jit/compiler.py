"""NVRTC: CUDA C++ source -> CUBIN for a named architecture. Needs no GPU and no driver.

The compiler knows nothing about GEMMs: it takes a source string, an include directory and
options, and returns the CUBIN with NVRTC's log, or raises CompileError holding the log.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from cuda.bindings import nvrtc

BASE_OPTIONS = ("-std=c++17", "-default-device", "--device-as-default-execution-space", "-lineinfo")


class CompileError(RuntimeError):
    """NVRTC rejected a kernel; `log` holds NVRTC's output, `label` names the specialization."""

    def __init__(self, label: str, arch: str, log: str):
        self.label, self.arch, self.log = label, arch, log
        super().__init__(f"NVRTC failed to compile {label} for {arch}:\n{log}")


@dataclass(frozen=True)
class CompileResult:
    cubin: bytes
    log: str
    seconds: float


def _check(result, label: str, arch: str, program=None) -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _program_log(program) if program is not None else ""
        _, message = nvrtc.nvrtcGetErrorString(result)
        raise CompileError(label, arch, f"{message.decode()}\n{log}".strip())


def _program_log(program) -> str:
    _, size = nvrtc.nvrtcGetProgramLogSize(program)
    buffer = b" " * size
    nvrtc.nvrtcGetProgramLog(program, buffer)
    return buffer.rstrip(b"\x00").decode(errors="replace").strip()


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "nvrtcVersion", "-")
    return major, minor


@functools.cache
def supported_archs() -> tuple[str, ...]:
    """The real architectures ("sm_90", ...) this NVRTC can compile for."""
    err, count = nvrtc.nvrtcGetNumSupportedArchs()
    _check(err, "nvrtcGetNumSupportedArchs", "-")
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    _check(err, "nvrtcGetSupportedArchs", "-")
    return tuple(f"sm_{a}" for a in archs[:count])


def nvrtc_library_path() -> str | None:
    """Where the loaded libnvrtc lives (for `mxfp8-moe env`), if cuda.pathfinder can tell."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception:  # noqa: BLE001 - purely informational
        return None


def compile_cubin(source: str, *, arch: str, include_dir: Path, options: tuple[str, ...] = (), label: str = "kernel") -> CompileResult:
    """Compile `source` to a CUBIN for `arch` (e.g. "sm_120a"). Raises CompileError with the log."""
    opts = [f"--gpu-architecture={arch}", f"--include-path={include_dir}", *BASE_OPTIONS, *options]
    start = time.perf_counter()
    err, program = nvrtc.nvrtcCreateProgram(source.encode(), f"{label}.cu".encode(), 0, [], [])
    _check(err, label, arch)
    try:
        (err,) = nvrtc.nvrtcCompileProgram(program, len(opts), [o.encode() for o in opts])
        _check(err, label, arch, program)
        log = _program_log(program)
        err, size = nvrtc.nvrtcGetCUBINSize(program)
        _check(err, label, arch, program)
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(program, cubin)
        _check(err, label, arch, program)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return CompileResult(cubin=cubin, log=log, seconds=time.perf_counter() - start)
