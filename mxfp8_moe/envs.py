"""Every environment variable the package reads, in one place.

SCALE_MODE, VALIDATE, FORCE_RECOMPILE and DUMP_DIR are read when used; LOG_LEVEL at import;
CACHE_DIR and DISABLE_DISK_CACHE when the process-wide cache is first created.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "MXFP8_MOE_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SCALE_MODES = {
    "auto": "native block-scaled MMA on sm_120a / sm_121a once its first-use check agrees with software "
            "scaling, software elsewhere",
    "native": "the block-scaled MMA on sm_120a / sm_121a, without the first-use check",
    "software": "FP32 promotion of each scale block on the CUDA cores",
    "emulated": "the native code path with the block-scaled MMA emulated (testing; mma.sync on Hopper)",
}


def _flag(name: str) -> bool:
    return os.environ.get(PREFIX + name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path | None:
    """MXFP8_MOE_CACHE_DIR: where compiled kernels are kept (default: the per-user cache dir)."""
    value = os.environ.get(PREFIX + "CACHE_DIR", "").strip()
    return Path(value).expanduser() if value else None


def force_recompile() -> bool:
    """MXFP8_MOE_FORCE_RECOMPILE=1: rebuild each kernel on first use in this process, overwrite its entry."""
    return _flag("FORCE_RECOMPILE")


def disable_disk_cache() -> bool:
    """MXFP8_MOE_DISABLE_DISK_CACHE=1: keep compiled kernels in memory only."""
    return _flag("DISABLE_DISK_CACHE")


def log_level() -> str | None:
    """MXFP8_MOE_LOG_LEVEL: level of the 'mxfp8_moe' logger (DEBUG shows every compile and its time),
    upper-cased; None if unset. invalid() says whether it is one of LOG_LEVELS."""
    value = os.environ.get(PREFIX + "LOG_LEVEL", "").strip().upper()
    return value or None


def dump_dir() -> Path | None:
    """MXFP8_MOE_DUMP_DIR: write each compile's generated source and NVRTC log here."""
    value = os.environ.get(PREFIX + "DUMP_DIR", "").strip()
    return Path(value).expanduser() if value else None


def validate_indptr() -> bool:
    """MXFP8_MOE_VALIDATE=1: sync and check m_indptr's values on every call (debugging aid)."""
    return _flag("VALIDATE")


def scale_mode() -> str:
    """MXFP8_MOE_SCALE_MODE=auto|native|software|emulated: how block scales are applied (emulated:
    the native code path with the block-scaled MMA emulated, for testing on GPUs without it)."""
    return os.environ.get(PREFIX + "SCALE_MODE", "auto").strip().lower() or "auto"


def in_effect() -> dict[str, str]:
    """The MXFP8_MOE_* variables set in this process (for `mxfp8-moe env`)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(PREFIX)}


def invalid(name: str) -> str | None:
    """What is wrong with variable `name` (with or without the prefix), if anything."""
    name = name.removeprefix(PREFIX)
    if name == "LOG_LEVEL" and log_level() not in (None, *LOG_LEVELS):
        return f"not a logging level ({', '.join(LOG_LEVELS)}): ignored"
    if name == "SCALE_MODE" and scale_mode() not in SCALE_MODES:
        return f"not one of {', '.join(SCALE_MODES)}: GEMM calls on a GPU raise ValueError"
    if name not in _KNOWN:
        return "not a variable of this package: ignored"
    return None


_KNOWN = ("CACHE_DIR", "FORCE_RECOMPILE", "DISABLE_DISK_CACHE", "LOG_LEVEL", "DUMP_DIR", "VALIDATE", "SCALE_MODE")
