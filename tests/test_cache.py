"""mxfp8_moe.jit.cache: CPU only, no GPU or NVRTC needed."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from mxfp8_moe.jit import cache as cache_mod
from mxfp8_moe.jit.cache import CacheWarning, KernelCache, default_cache, default_cache_dir, reset_default_cache

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef" * 4

# A process that builds (or finds) KEY; its build appends its pid to a counter file.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
from mxfp8_moe.jit.cache import KernelCache
cache_dir, counter, sleep, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def build():
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(sleep)
    return f"binary built by {os.getpid()}".encode()
cache = KernelCache(cache_dir)
if start:  # say we're ready, then wait for the start signal so all children race
    Path(start + f".ready.{os.getpid()}").touch()
    while not os.path.exists(start):
        time.sleep(0.005)
payload, cached = cache.get_or_build(sys.argv[5], build, label="test kernel")
print(json.dumps({"payload": payload.decode(), "cached": cached}))
"""


def _child(cache_dir: Path, counter: Path, *, sleep: float = 0.0, start: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cache_dir), str(counter), str(sleep), start, KEY],
                            stdout=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)


def _builds(counter: Path) -> int:
    return len(counter.read_text().split()) if counter.exists() else 0


class Builder:
    """A build callable that counts its calls."""

    def __init__(self, payload: bytes = b"\x7fELF cubin payload" * 10, sleep: float = 0.0):
        self.payload, self.sleep, self.calls = payload, sleep, 0
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            self.calls += 1
        time.sleep(self.sleep)
        return self.payload


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


@contextlib.contextmanager
def _recorded():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


def _cache_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, CacheWarning)]


def test_miss_then_hit_across_processes(tmp_path):
    cache_dir, counter = tmp_path / "cache", tmp_path / "builds"
    first = _result(_child(cache_dir, counter))
    second = _result(_child(cache_dir, counter))
    assert first["cached"] is False and second["cached"] is True
    assert first["payload"] == second["payload"]
    assert _builds(counter) == 1
    assert (cache_dir / f"{KEY}.bin").is_file()


def test_directory_created_owner_only(tmp_path):
    directory = tmp_path / "a" / "b" / "cache"
    cache = KernelCache(directory)
    assert cache.directory == directory
    if os.name != "nt":
        assert directory.stat().st_mode & 0o777 == 0o700


def test_hit_in_same_process_reads_memory(tmp_path):
    build = Builder()
    cache = KernelCache(tmp_path)
    assert cache.get_or_build(KEY, build) == (build.payload, False)
    (tmp_path / f"{KEY}.bin").unlink()  # the memory layer answers now
    assert cache.get_or_build(KEY, build) == (build.payload, True)
    assert cache.get(KEY) == build.payload
    assert build.calls == 1
    assert KernelCache(tmp_path).get(KEY) is None


def test_force_rebuilds_and_overwrites(tmp_path):
    KernelCache(tmp_path).put(KEY, b"old binary")
    new = Builder(b"new binary")
    cache = KernelCache(tmp_path)
    assert cache.get_or_build(KEY, new, force=True) == (b"new binary", False)
    assert cache.get_or_build(KEY, new, force=True) == (b"new binary", False)
    assert new.calls == 2
    assert cache.get(KEY) == b"new binary"
    assert KernelCache(tmp_path).get(KEY) == b"new binary"


@pytest.mark.parametrize("damage", ["flip_payload_byte", "flip_label_byte", "truncate_payload",
                                    "truncate_header", "empty", "extra_bytes", "bad_magic"])
def test_damaged_entry_warns_once_and_is_rebuilt(tmp_path, damage):
    build = Builder()
    KernelCache(tmp_path).put(KEY, build.payload, label="gemm")
    path = tmp_path / f"{KEY}.bin"
    data = bytearray(path.read_bytes())
    if damage == "flip_payload_byte":
        data[-5] ^= 0x01
    elif damage == "flip_label_byte":
        data[cache_mod._HEADER.size] ^= 0x01  # the label isn't checksummed, only its length
    elif damage == "truncate_payload":
        data = data[: len(data) - 7]
    elif damage == "truncate_header":
        data = data[:10]
    elif damage == "empty":
        data = bytearray()
    elif damage == "extra_bytes":
        data += b"junk"
    elif damage == "bad_magic":
        data[0] ^= 0xFF
    path.write_bytes(bytes(data))

    cache = KernelCache(tmp_path)
    with _recorded() as record:
        payload, cached = cache.get_or_build(KEY, build)
    assert payload == build.payload
    if damage == "flip_label_byte":
        assert (cached, build.calls, _cache_warnings(record)) == (True, 0, [])
        return
    assert cached is False and build.calls == 1
    [warning] = _cache_warnings(record)
    assert str(path) in str(warning.message)
    assert cache.directory == tmp_path  # a damaged entry does not drop the disk cache
    with _recorded() as record:  # repaired on disk
        assert KernelCache(tmp_path).get(KEY) == build.payload
    assert _cache_warnings(record) == []


def test_damaged_entry_pytest_warns(tmp_path):
    KernelCache(tmp_path).put(KEY, b"payload")
    path = tmp_path / f"{KEY}.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.warns(CacheWarning, match="damaged"):
        assert KernelCache(tmp_path).get(KEY) is None


def test_other_format_version_is_a_quiet_miss(tmp_path):
    KernelCache(tmp_path).put(KEY, b"payload")
    path = tmp_path / f"{KEY}.bin"
    data = bytearray(path.read_bytes())
    data[8] += 1  # the version field follows the 8-byte magic
    path.write_bytes(bytes(data))
    with _recorded() as record:
        assert KernelCache(tmp_path).get_or_build(KEY, Builder(b"rebuilt")) == (b"rebuilt", False)
    assert _cache_warnings(record) == []
    assert KernelCache(tmp_path).get(KEY) == b"rebuilt"


def test_failed_rename_goes_memory_only(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cache_mod.os, "replace", refuse)
    cache, build = KernelCache(tmp_path), Builder()
    with pytest.warns(CacheWarning, match="memory only") as record:
        assert cache.get_or_build(KEY, build) == (build.payload, False)
        cache.put("other", b"x")
        assert cache.get_or_build("third", build) == (build.payload, False)
    assert len(_cache_warnings(record)) == 1
    assert cache.directory is None
    assert cache.get_or_build(KEY, build) == (build.payload, True)
    assert build.calls == 2
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == []  # no temp file, no entry


def test_failed_open_goes_memory_only(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_writes(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(path).endswith(".tmp"):
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(cache_mod.os, "open", refuse_writes)
    cache, build = KernelCache(tmp_path), Builder()
    with pytest.warns(CacheWarning) as record:
        assert cache.get_or_build(KEY, build) == (build.payload, False)
    assert len(_cache_warnings(record)) == 1
    assert cache.directory is None
    assert not (tmp_path / f"{KEY}.bin").exists() and _leftovers(tmp_path) == []


def test_uncreatable_directory_goes_memory_only(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(CacheWarning, match="cannot create") as record:
        cache = KernelCache(blocker / "cache")
    assert len(_cache_warnings(record)) == 1
    assert cache.directory is None
    build = Builder()
    with _recorded() as record:
        assert cache.get_or_build(KEY, build) == (build.payload, False)
        assert cache.get_or_build(KEY, build) == (build.payload, True)
    assert _cache_warnings(record) == [] and build.calls == 1


def test_enospc_warns_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_mod.os, "fsync", full)  # fails after the temp file was written
    cache, build = KernelCache(tmp_path), Builder()
    with pytest.warns(CacheWarning, match="No space") as record:
        assert cache.get_or_build(KEY, build) == (build.payload, False)
    assert len(_cache_warnings(record)) == 1
    assert cache.directory is None
    assert _leftovers(tmp_path) == [] and not (tmp_path / f"{KEY}.bin").exists()


def test_processes_racing_build_once(tmp_path):
    cache_dir, counter, start = tmp_path / "cache", tmp_path / "builds", tmp_path / "start"
    procs = [_child(cache_dir, counter, sleep=0.5, start=str(start)) for _ in range(4)]
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("start.ready.*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    start.touch()
    results = [_result(p) for p in procs]
    assert _builds(counter) == 1
    assert len({r["payload"] for r in results}) == 1
    assert sorted(r["cached"] for r in results) == [False, True, True, True]
    assert _leftovers(cache_dir) == []


def test_lock_held_elsewhere_builds_anyway(tmp_path, foreign_lock):
    with foreign_lock(tmp_path / f"{KEY}.lock"):
        cache, build = KernelCache(tmp_path, lock_timeout=0.2), Builder()
        begin = time.monotonic()
        assert cache.get_or_build(KEY, build) == (build.payload, False)
        assert time.monotonic() - begin < 5
        assert build.calls == 1
        assert KernelCache(tmp_path).get(KEY) == build.payload


def test_locking_error_builds_anyway(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cache_mod.filelock.FileLock, "acquire", broken)
    cache, build = KernelCache(tmp_path), Builder()
    assert cache.get_or_build(KEY, build) == (build.payload, False)
    assert KernelCache(tmp_path).get(KEY) == build.payload


def test_stale_lock_file_does_not_block(tmp_path):
    (tmp_path / f"{KEY}.lock").write_text("left by a killed process")
    cache, build = KernelCache(tmp_path, lock_timeout=10), Builder()
    begin = time.monotonic()
    assert cache.get_or_build(KEY, build) == (build.payload, False)
    assert time.monotonic() - begin < 2


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_directory_writable_by_others_goes_memory_only(tmp_path, mode):
    if os.name == "nt":
        pytest.skip("no POSIX permissions")
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    KernelCache(tmp_path / "shared_ok")  # a good directory beside it is fine
    with pytest.warns(CacheWarning, match="writable by group or others"):
        cache = KernelCache(directory)
    assert cache.directory is None
    build = Builder()
    assert cache.get_or_build(KEY, build) == (build.payload, False)
    assert list(directory.iterdir()) == []


def test_sticky_directory_of_ours_is_accepted(tmp_path):
    if os.name == "nt":
        pytest.skip("no POSIX permissions")
    directory = tmp_path / "sticky"
    directory.mkdir()
    directory.chmod(0o1777)
    with _recorded() as record:
        assert KernelCache(directory).directory == directory
    assert _cache_warnings(record) == []


def test_entry_writable_by_others_is_not_loaded(tmp_path):
    if os.name == "nt":
        pytest.skip("no POSIX permissions")
    KernelCache(tmp_path).put(KEY, b"trusted?")
    (tmp_path / f"{KEY}.bin").chmod(0o666)
    cache = KernelCache(tmp_path)
    with pytest.warns(CacheWarning, match="writable by group or others"):
        assert cache.get_or_build(KEY, Builder(b"rebuilt")) == (b"rebuilt", False)
    assert cache.directory is None


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_directory_owned_by_someone_else_goes_memory_only(tmp_path):
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 12345, -1)
    with pytest.warns(CacheWarning, match="owned by uid 12345"):
        assert KernelCache(directory).directory is None


def test_threads_build_once(tmp_path):
    cache, build = KernelCache(tmp_path), Builder(sleep=0.2)
    barrier, results = threading.Barrier(8), []

    def worker():
        barrier.wait()
        results.append(cache.get_or_build(KEY, build))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1
    assert sorted(cached for _, cached in results) == [False] + [True] * 7
    assert {payload for payload, _ in results} == {build.payload}


def test_entries_and_clear(tmp_path):
    cache = KernelCache(tmp_path)
    cache.put("aa", b"1" * 10, label="gemm m=128")
    cache.put("bb", b"2" * 20, label="gemm m=256 \u00b5")
    cache.get_or_build("cc", Builder(b"3" * 30), label="from build")
    (tmp_path / ".stale.123.abc.tmp").write_bytes(b"half")
    assert (tmp_path / "cc.lock").exists()
    entries = KernelCache(tmp_path).entries()
    assert [(e.key, e.label, e.path) for e in entries] == [
        ("aa", "gemm m=128", tmp_path / "aa.bin"),
        ("bb", "gemm m=256 \u00b5", tmp_path / "bb.bin"),
        ("cc", "from build", tmp_path / "cc.bin"),
    ]
    assert all(e.size == e.path.stat().st_size and e.mtime > 0 for e in entries)
    assert cache.clear() == 3
    assert cache.entries() == [] and cache.get("aa") is None
    assert list(tmp_path.iterdir()) == []


def test_memory_only_entries_and_clear():
    cache = KernelCache(None)
    assert cache.directory is None
    cache.put("aa", b"123", label="x")
    [entry] = cache.entries()
    assert (entry.key, entry.label, entry.size, entry.path) == ("aa", "x", 3, None)
    assert cache.clear() == 1
    assert cache.entries() == [] and cache.get("aa") is None


@pytest.mark.parametrize("key", ["", "../evil", "a/b", "a.bin", "x" * 129])
def test_unsafe_keys_rejected(tmp_path, key):
    with pytest.raises(ValueError):
        KernelCache(tmp_path).get(key)


def test_debug_logging(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="mxfp8_moe.jit")
    KernelCache(tmp_path).get_or_build(KEY, Builder(), label="my kernel")
    KernelCache(tmp_path).get_or_build(KEY, Builder(), label="my kernel")
    text = caplog.text
    assert "cache miss" in text and "built my kernel" in text and "cache hit" in text


@pytest.fixture
def fresh_default(monkeypatch):
    for name in ("MXFP8_MOE_CACHE_DIR", "MXFP8_MOE_DISABLE_DISK_CACHE"):
        monkeypatch.delenv(name, raising=False)
    reset_default_cache()
    yield monkeypatch
    reset_default_cache()


def test_default_cache_honors_env(tmp_path, fresh_default):
    fresh_default.setenv("MXFP8_MOE_CACHE_DIR", str(tmp_path / "env_dir"))
    assert default_cache_dir() == tmp_path / "env_dir"
    cache = default_cache()
    assert cache is default_cache() and cache.directory == tmp_path / "env_dir"
    fresh_default.setenv("MXFP8_MOE_DISABLE_DISK_CACHE", "1")
    assert default_cache() is cache  # a singleton until reset
    reset_default_cache()
    assert default_cache().directory is None


def test_default_cache_dir_is_per_user(fresh_default):
    assert "mxfp8-moe" in str(default_cache_dir())


def test_default_cache_created_once_across_threads(tmp_path, fresh_default):
    fresh_default.setenv("MXFP8_MOE_CACHE_DIR", str(tmp_path))
    barrier, seen = threading.Barrier(8), []

    def worker():
        barrier.wait()
        seen.append(default_cache())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 1
