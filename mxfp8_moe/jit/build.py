"""Source -> CUBIN through the disk cache: the one place that decides what a cache key holds.

The key covers everything that changes the binary: the generated source, the contents of every
file under the include directory, the target arch, the NVRTC version, the options and the package
version. A compile is logged with its time; MXFP8_MOE_DUMP_DIR receives each compile's source and
NVRTC log; MXFP8_MOE_FORCE_RECOMPILE rebuilds each key once per process.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from pathlib import Path

from .. import envs
from ..version import __version__
from .cache import default_cache
from .compiler import BASE_OPTIONS, CompileError, compile_cubin, nvrtc_version

logger = logging.getLogger("mxfp8_moe.jit")

OPTIONS = ("-Xptxas=-v",)  # ptxas' resource report lands in the log (dumped, and read by tools/)

_forced: set[str] = set()
_forced_lock = threading.Lock()


@functools.cache
def _tree_digest(include_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(include_dir.rglob("*")):
        if path.is_file() and path.suffix in (".cuh", ".h", ".cu"):
            digest.update(path.relative_to(include_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def kernel_dir() -> Path:
    """The package's CUDA sources: mxfp8_moe/kernels in a wheel, ../kernels in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "kernels"
    return installed if installed.is_dir() else package.parent / "kernels"


def cache_key(source: str, *, arch: str, include_dir: Path) -> str:
    digest = hashlib.sha256()
    for part in (__version__, arch, "nvrtc %d.%d" % nvrtc_version(), " ".join((*BASE_OPTIONS, *OPTIONS)),
                 _tree_digest(include_dir), source):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:40]


def build(source: str, *, arch: str, label: str, include_dir: Path | None = None) -> tuple[bytes, bool]:
    """CUBIN for `source` on `arch`, from the cache or freshly compiled: (cubin, was_cached).
    `include_dir`: where the source's #includes resolve (default: the package's kernels)."""
    include_dir = kernel_dir() if include_dir is None else include_dir
    key = cache_key(source, arch=arch, include_dir=include_dir)
    force = False
    if envs.force_recompile():
        with _forced_lock:
            force = key not in _forced
            _forced.add(key)

    def compile_now() -> bytes:
        try:
            result = compile_cubin(source, arch=arch, include_dir=include_dir, options=OPTIONS, label=label)
        except CompileError as error:
            _dump(label, arch, source, error.log)
            raise
        logger.info("compiled %s for %s in %.2f s", label, arch, result.seconds)
        _dump(label, arch, source, result.log)
        return result.cubin

    return default_cache().get_or_build(key, compile_now, label=f"{label} {arch}", force=force)


def _dump(label: str, arch: str, source: str, log: str) -> None:
    directory = envs.dump_dir()
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{label}.{arch}.cu").write_text(source)
        (directory / f"{label}.{arch}.log").write_text(log)
    except OSError as error:  # a debugging aid must not fail (or mask the error of) a compile
        logger.warning("cannot write MXFP8_MOE_DUMP_DIR=%s: %s", directory, error)
