"""A cache of compiled binaries (CUBINs), kept on disk and in memory, keyed by an opaque string.

One file per key, ``<key>.bin``: a fixed header (magic, format version, payload length, sha256 of
the payload, length-prefixed UTF-8 label) followed by the payload. Entries are written to a temp
file in the same directory and renamed into place, so a reader never sees half an entry; a damaged
entry is a miss (one CacheWarning) and gets rebuilt. A per-key file lock keeps processes from
building the same entry twice; if the lock can't be had, we build anyway rather than hang.

A cache of executable GPU code is code: the directory must be ours and writable by no one else.
Any trouble with it (cannot create, unsafe, failed write) warns once and the cache goes on in
memory only. The cache never makes a call fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import stat
import struct
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator

import filelock
import platformdirs

from .. import envs

logger = logging.getLogger("mxfp8_moe.jit")

_MAGIC = b"MXF8MOEK"
_VERSION = 1
_HEADER = struct.Struct("<8sHQ32sH")  # magic, version, payload length, sha256(payload), label length
_KEY = re.compile(r"[0-9A-Za-z_-]{1,128}")  # a hex digest in practice; never a path


class CacheWarning(UserWarning):
    """A damaged cache entry was ignored, or the disk cache was dropped for this process."""


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    key: str
    label: str
    size: int  # bytes on disk (header included); payload bytes for a memory-only entry
    mtime: float
    path: Path | None  # None for an entry held in memory only


def _encode(payload: bytes, label: str) -> bytes:
    label_bytes = label.encode("utf-8", "replace")[:0xFFFF]
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(_MAGIC, _VERSION, len(payload), digest, len(label_bytes)) + label_bytes + payload


def _decode(data: bytes) -> tuple[bytes, str] | None:
    """(payload, label); None for an entry of another format version; ValueError if damaged."""
    if len(data) < _HEADER.size:
        raise ValueError(f"truncated header ({len(data)} bytes)")
    magic, version, size, digest, label_len = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("bad magic")
    if version != _VERSION:
        return None
    start = _HEADER.size + label_len
    if len(data) != start + size:
        raise ValueError(f"{len(data)} bytes, expected {start + size}")
    payload = data[start:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch")
    return payload, data[_HEADER.size : start].decode("utf-8", "replace")


def _unsafe(st: os.stat_result) -> str | None:
    """Why a directory or file with this stat must not be trusted, or None if it may."""
    if os.name == "nt":
        return None
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by us (uid {os.getuid()})"
    if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise ValueError(f"cache key must be 1-128 characters of [0-9A-Za-z_-], got {key!r}")


class KernelCache:
    """Compiled binaries by key: in memory, and on disk under ``directory`` (None: memory only)."""

    def __init__(self, directory: Path | None, *, lock_timeout: float = 60.0):
        self.lock_timeout = lock_timeout
        self._lock = threading.Lock()  # guards everything below, and directory
        self._memory: dict[str, tuple[bytes, str, float]] = {}  # key -> (payload, label, time put)
        self._key_locks: dict[str, threading.Lock] = {}
        self.directory: Path | None = None if directory is None else Path(directory)
        if self.directory is not None:
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                problem = _unsafe(self.directory.stat())
            except OSError as e:
                problem = f"cannot create it ({e})"
            if problem:
                self._drop_disk(problem)

    def _drop_disk(self, reason: str) -> None:
        with self._lock:
            directory, self.directory = self.directory, None
        if directory is not None:  # only the first trouble warns
            warnings.warn(f"mxfp8_moe kernel cache {directory}: {reason}; keeping compiled kernels "
                          "in memory only", CacheWarning, stacklevel=4)

    def get(self, key: str) -> bytes | None:
        _check_key(key)
        with self._lock:
            held, directory = self._memory.get(key), self.directory
        if held is not None:
            return held[0]
        if directory is None:
            return None
        entry = self._read(directory / f"{key}.bin")
        if entry is None:
            logger.debug("cache miss %s", key)
            return None
        logger.debug("cache hit %s (%s)", key, entry[1])
        with self._lock:
            return self._memory.setdefault(key, (*entry, time.time()))[0]

    def _read(self, path: Path) -> tuple[bytes, str] | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            return None
        except OSError as error:  # a symlink (O_NOFOLLOW), no permission, I/O error: never fail the call
            self._drop_disk(f"cannot open {path.name} ({error})")
            return None
        try:
            with open(fd, "rb") as f:
                problem = _unsafe(os.fstat(f.fileno()))
                data = b"" if problem else f.read()
        except OSError as e:
            problem = f"cannot read {path.name} ({e})"
        if problem:
            self._drop_disk(f"{path.name} {problem}")
            return None
        try:
            return _decode(data)
        except ValueError as e:
            warnings.warn(f"mxfp8_moe kernel cache: ignoring damaged entry {path} ({e}); it will be "
                          "rebuilt", CacheWarning, stacklevel=4)
            return None

    def put(self, key: str, payload: bytes, *, label: str = "") -> None:
        _check_key(key)
        payload = bytes(payload)
        with self._lock:
            self._memory[key] = (payload, label, time.time())
            directory = self.directory
        if directory is None:
            return
        tmp = directory / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            try:
                with open(fd, "wb") as f:
                    f.write(_encode(payload, label))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, directory / f"{key}.bin")
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        except OSError as e:
            self._drop_disk(f"cannot write {key}.bin ({e})")

    def get_or_build(self, key: str, build: Callable[[], bytes], *, label: str = "",
                     force: bool = False) -> tuple[bytes, bool]:
        """(payload, was_cached). Builds at most once across threads and processes, lock permitting."""
        _check_key(key)
        with self._lock:
            held = None if force else self._memory.get(key)
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        if held is not None:
            return held[0], True
        locked = key_lock.acquire(timeout=self.lock_timeout)  # other threads: wait for one build
        try:
            with self._file_lock(key):  # other processes
                if not force and (payload := self.get(key)) is not None:
                    return payload, True
                start = time.perf_counter()
                payload = bytes(build())
                logger.debug("built %s %s in %.3f s", label or "entry", key, time.perf_counter() - start)
                self.put(key, payload, label=label)
                return payload, False
        finally:
            if locked:
                key_lock.release()

    @contextlib.contextmanager
    def _file_lock(self, key: str) -> Iterator[None]:
        with self._lock:
            directory = self.directory
        lock = None
        if directory is not None:
            lock = filelock.FileLock(directory / f"{key}.lock", timeout=self.lock_timeout, mode=0o600)
            try:
                lock.acquire()
            except OSError as e:  # filelock.Timeout is an OSError too; flock may fail on NFS
                logger.warning("mxfp8_moe kernel cache: cannot lock %s (%r); building without the lock",
                               key, e)
                lock = None
        try:
            yield
        finally:
            if lock is not None:
                with contextlib.suppress(OSError):
                    lock.release()

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            directory, memory = self.directory, dict(self._memory)
        if directory is None:
            return [CacheEntry(k, label, len(p), t, None) for k, (p, label, t) in sorted(memory.items())]
        result = []
        for path in sorted(directory.glob("*.bin")):
            try:
                st = path.stat()
                with open(path, "rb") as f:
                    head = f.read(_HEADER.size)
                    label_len = _HEADER.unpack(head)[4] if len(head) == _HEADER.size else 0
                    label = f.read(label_len).decode("utf-8", "replace") if head[:8] == _MAGIC else ""
            except OSError:
                continue  # removed meanwhile
            result.append(CacheEntry(path.stem, label, st.st_size, st.st_mtime, path))
        return result

    def clear(self) -> int:
        """Remove every entry (and lock and leftover temp files); returns the number of entries removed."""
        with self._lock:
            directory, removed = self.directory, len(self._memory)
            self._memory.clear()
        if directory is None:
            return removed
        removed = 0
        for path in [*directory.glob("*.bin"), *directory.glob("*.lock"), *directory.glob(".*.tmp")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += path.suffix == ".bin"
        return removed


_default: KernelCache | None = None
_default_lock = threading.Lock()


def default_cache_dir() -> Path:
    """MXFP8_MOE_CACHE_DIR, else the per-user cache directory."""
    return envs.cache_dir() or Path(platformdirs.user_cache_dir("mxfp8-moe", appauthor=False))


def default_cache() -> KernelCache:
    """The process-wide cache (memory only with MXFP8_MOE_DISABLE_DISK_CACHE=1)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = KernelCache(None if envs.disable_disk_cache() else default_cache_dir())
        return _default


def reset_default_cache() -> None:
    """Forget the process-wide cache, so the next default_cache() rereads the environment."""
    global _default
    with _default_lock:
        _default = None
