"""Reliability on CPU: the kernel cache under faults, concurrent cold starts, NVRTC failures and the
special values of the contract (UE8M0 0xFF is NaN, 0x00 is 2^-127; e4m3 NaN propagates).

Everything goes through the real path: jit.build.build -> NVRTC -> the default disk cache, in a
private MXFP8_MOE_CACHE_DIR. No GPU needed; the special-value cases are shared with
test_reliability_gpu.py, which runs them through the CUDA kernels.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pickle
import random
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise, reference_moe_gemm
from mxfp8_moe.gemm.families import MmaSpec, SimtSpec
from mxfp8_moe.gemm.spec import KernelSpec
from mxfp8_moe.jit.build import kernel_dir
from mxfp8_moe.jit import build as build_mod
from mxfp8_moe.jit import cache as cache_mod
from mxfp8_moe.jit import compiler
from mxfp8_moe.jit.cache import CacheWarning, KernelCache, default_cache, reset_default_cache
from mxfp8_moe.layout import num_k_blocks, token_scale_rows

from problems import make_problem

REPO = Path(__file__).resolve().parents[1]
ELF_MAGIC = b"\x7fELF"
SIMT_120 = SimtSpec("sm_120a", 256, 512, 128, False)
SIMT_90 = dataclasses.replace(SIMT_120, arch="sm_90a")
SIMT_120_B = SimtSpec("sm_120a", 384, 640, 32, True)
MMA_120 = MmaSpec("sm_120a", 128, 288, 128, False, block_n=64, block_t=8, stages=2)
# 48 columns over 4 column warps of m16 fragments: violates a static_assert of MmaGemm.
BROKEN = MmaSpec("sm_120a", 4096, 7168, 128, False, block_n=48, block_t=8, stages=4, warps_n=4, warps_k=1)
BROKEN_ASSERT = "each warp owns whole m16 fragments"


# --------------------------------------------------------------------------------------------- helpers

def _build(spec: KernelSpec) -> tuple[bytes, bool]:
    return build_mod.build(spec.source(), arch=spec.arch, include_dir=kernel_dir(), label=spec.label)


def _key(spec: KernelSpec) -> str:
    return build_mod.cache_key(spec.source(), arch=spec.arch, include_dir=kernel_dir())


def _fresh(spec: KernelSpec) -> bytes:
    """A compile that bypasses build() and the cache (and any patch of build_mod.compile_cubin)."""
    return compiler.compile_cubin(spec.source(), arch=spec.arch, include_dir=kernel_dir(),
                                  options=build_mod.OPTIONS, label=spec.label).cubin


def _elf_sm(cubin: bytes) -> set[int]:
    """SM numbers e_flags may encode (low byte in older CUDA ELF ABIs, second byte in newer)."""
    assert cubin[:4] == ELF_MAGIC
    flags = struct.unpack_from("<I", cubin, 48)[0]  # e_flags of a 64-bit ELF header
    return {flags & 0xFF, (flags >> 8) & 0xFF}


def _sm(spec: KernelSpec) -> int:
    return int(spec.arch.removeprefix("sm_").rstrip("af"))


@contextlib.contextmanager
def _cache_warnings():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        caught: list[warnings.WarningMessage] = []
        yield caught
    caught.extend(w for w in record if issubclass(w.category, CacheWarning))


def _files(directory: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob(pattern))}


CACHE_ENV = ("MXFP8_MOE_CACHE_DIR", "MXFP8_MOE_DISABLE_DISK_CACHE", "MXFP8_MOE_FORCE_RECOMPILE", "MXFP8_MOE_DUMP_DIR")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private default cache directory, read afresh by the next default_cache()."""
    for name in CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    directory = tmp_path / "kernel_cache"
    monkeypatch.setenv("MXFP8_MOE_CACHE_DIR", str(directory))
    reset_default_cache()
    yield directory
    reset_default_cache()


@pytest.fixture
def compiles(monkeypatch) -> dict[tuple[str, str], int]:
    """Count real NVRTC compiles made by build(), by (label, arch)."""
    counts: dict[tuple[str, str], int] = {}
    lock, real = threading.Lock(), build_mod.compile_cubin

    def counting(source, *, arch, label, **kwargs):
        with lock:
            counts[label, arch] = counts.get((label, arch), 0) + 1
        return real(source, arch=arch, label=label, **kwargs)

    monkeypatch.setattr(build_mod, "compile_cubin", counting)
    return counts


# ------------------------------------------------------------------------------- 1. cache under faults

@pytest.mark.parametrize("damage", ["truncate", "flip_payload_byte"])
def test_damaged_entry_rebuilt_once(cache_dir, compiles, damage):
    first, cached = _build(SIMT_120)
    assert not cached and first == _fresh(SIMT_120)
    path = cache_dir / f"{_key(SIMT_120)}.bin"
    data = bytearray(path.read_bytes())
    payload_start = len(data) - len(first)
    rng = random.Random()
    if damage == "truncate":
        cut = rng.randrange(0, len(data))
        data = data[:cut]
        detail = f"cut at {cut}"
    else:
        index = rng.randrange(payload_start, len(data))
        data[index] ^= 1 << rng.randrange(8)
        detail = f"byte {index}"
    path.write_bytes(bytes(data))

    reset_default_cache()  # a new process: nothing in memory
    with _cache_warnings() as caught:
        cubin, cached = _build(SIMT_120)
        again, cached_again = _build(SIMT_120)
    assert len(caught) == 1, (detail, [str(w.message) for w in caught])
    assert str(path) in str(caught[0].message)
    assert (cached, cached_again) == (False, True), detail
    assert cubin == again == _fresh(SIMT_120)
    assert compiles[SIMT_120.label, SIMT_120.arch] == 2
    with _cache_warnings() as caught:  # repaired on disk
        assert KernelCache(cache_dir).get(_key(SIMT_120)) == cubin
    assert caught == []


def test_arch_and_nvrtc_version_never_share_entries(cache_dir, compiles, monkeypatch):
    assert _key(SIMT_120) != _key(SIMT_90)
    cubin_120, cached_120 = _build(SIMT_120)
    cubin_90, cached_90 = _build(SIMT_90)  # the sm_120a entry exists now; it must not be returned
    assert not cached_120 and not cached_90
    assert cubin_120 != cubin_90
    assert _sm(SIMT_120) in _elf_sm(cubin_120) and _sm(SIMT_90) in _elf_sm(cubin_90)
    assert _sm(SIMT_90) not in _elf_sm(cubin_120)

    reset_default_cache()  # from disk, each key returns its own arch's binary
    assert _build(SIMT_90) == (cubin_90, True)
    assert _build(SIMT_120) == (cubin_120, True)
    entries = _files(cache_dir, "*.bin")
    assert set(entries) == {f"{_key(SIMT_120)}.bin", f"{_key(SIMT_90)}.bin"}

    # Another NVRTC: another key, a fresh compile, and the old entries untouched.
    real = build_mod.nvrtc_version()
    monkeypatch.setattr(build_mod, "nvrtc_version", lambda: (real[0] - 1, real[1] + 3))
    other_key = _key(SIMT_120)
    assert other_key not in (_key(SIMT_90), *(name.removesuffix(".bin") for name in entries))
    reset_default_cache()
    cubin, cached = _build(SIMT_120)
    assert not cached and _sm(SIMT_120) in _elf_sm(cubin)
    assert compiles[SIMT_120.label, SIMT_120.arch] == 2
    after = _files(cache_dir, "*.bin")
    assert {name: after[name] for name in entries} == entries
    assert set(after) - set(entries) == {f"{other_key}.bin"}


class _FullDisk:
    """A file whose write lands half its bytes, then fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)


def _inject(fault: str, directory: Path, monkeypatch) -> None:
    directory.mkdir(mode=0o700, parents=True)
    if fault == "read_only_dir":
        if os.geteuid() == 0:
            pytest.skip("root writes through directory permissions (read_only_fs covers it)")
        directory.chmod(0o500)  # the test restores 0o700
    elif fault == "read_only_fs":  # EROFS for any open that could write inside the directory
        real_open, inside = os.open, str(directory) + os.sep

        def erofs(path, flags, *args, **kwargs):
            if str(path).startswith(inside) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", erofs)
    elif fault == "enospc_write":
        def full_open(file, mode="r", *args, **kwargs):
            f = builtins.open(file, mode, *args, **kwargs)
            return _FullDisk(f) if "w" in mode else f

        monkeypatch.setattr(cache_mod, "open", full_open, raising=False)
    elif fault == "enospc_fsync":
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(cache_mod.os, "fsync", full)
    else:
        raise AssertionError(fault)


@pytest.mark.parametrize("fault", ["read_only_dir", "read_only_fs", "enospc_write", "enospc_fsync"])
def test_unwritable_cache_warns_once_and_builds(cache_dir, compiles, monkeypatch, fault):
    try:
        _inject(fault, cache_dir, monkeypatch)
        begin = time.monotonic()
        with _cache_warnings() as caught:
            first, cached_first = _build(SIMT_120)
            second, cached_second = _build(SIMT_90)
            again, cached_again = _build(SIMT_120)
        assert time.monotonic() - begin < 30
        assert len(caught) == 1, [str(w.message) for w in caught]
        assert "memory only" in str(caught[0].message)
        assert (cached_first, cached_second, cached_again) == (False, False, True)
        assert first == again == _fresh(SIMT_120) and second == _fresh(SIMT_90)
        assert default_cache().directory is None
        assert sum(compiles.values()) == 2
        leftovers = [p.name for p in cache_dir.iterdir() if p.suffix != ".lock"]
        assert leftovers == [], leftovers  # no entry, no temp file
    finally:
        with contextlib.suppress(FileNotFoundError):
            cache_dir.chmod(0o700)


@pytest.mark.parametrize("entry", ["symlink_to_entry", "symlink_loop", "unreadable"])
def test_unopenable_entry_does_not_fail_the_build(cache_dir, monkeypatch, entry):
    path = cache_dir / f"{_key(SIMT_120)}.bin"
    if entry == "unreadable":  # EACCES, as a mode-000 entry gives a non-root user
        _build(SIMT_120)
        real_open = os.open

        def denied(p, flags, *args, **kwargs):
            if str(p) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
            return real_open(p, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)
    else:
        cache_dir.mkdir(mode=0o700)
        if entry == "symlink_to_entry":  # a valid entry, but reached through a link
            KernelCache(cache_dir).put(_key(SIMT_120), _fresh(SIMT_120))
            path.rename(cache_dir / "elsewhere")
            path.symlink_to(cache_dir / "elsewhere")
        else:
            path.symlink_to(path)
    reset_default_cache()
    with _cache_warnings() as caught:
        cubin, _ = _build(SIMT_120)
    assert cubin == _fresh(SIMT_120) and len(caught) <= 1


@pytest.mark.parametrize("stale", ["junk_file", "killed_holder"])
def test_stale_lock_file_does_not_block(cache_dir, compiles, stale, foreign_lock):
    cache_dir.mkdir(mode=0o700)
    lock_path = cache_dir / f"{_key(SIMT_120)}.lock"
    if stale == "junk_file":
        lock_path.write_bytes(os.urandom(37))
        lock_path.chmod(0o600)
    else:
        with foreign_lock(lock_path):
            pass  # the holder is killed with the lock file left behind
        assert lock_path.exists()
    begin = time.monotonic()
    with _cache_warnings() as caught:
        cubin, cached = _build(SIMT_120)
    assert time.monotonic() - begin < 10
    assert caught == [] and not cached and cubin == _fresh(SIMT_120)
    with _cache_warnings() as caught:
        assert KernelCache(cache_dir).get(_key(SIMT_120)) == cubin
    assert caught == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o770, 0o722])
def test_group_writable_cache_dir_compiles_in_memory(cache_dir, compiles, mode):
    cache_dir.mkdir()
    cache_dir.chmod(mode)
    with _cache_warnings() as caught:
        cubin, cached = _build(SIMT_120)
        again, cached_again = _build(SIMT_120)
    assert len(caught) == 1 and "writable by group or others" in str(caught[0].message)
    assert cubin[:4] == ELF_MAGIC and cubin == again == _fresh(SIMT_120)
    assert (cached, cached_again) == (False, True)
    assert compiles == {(SIMT_120.label, SIMT_120.arch): 1}
    assert list(cache_dir.iterdir()) == []  # nothing written into an untrusted directory
    assert stat.S_IMODE(cache_dir.stat().st_mode) == mode


# ------------------------------------------------------------------------------------ 2. concurrency

CHILD = r"""
import hashlib, json, os, pickle, sys, time, warnings
from pathlib import Path
from mxfp8_moe.jit.cache import CacheWarning
warnings.simplefilter("error", CacheWarning)
from mxfp8_moe.jit.build import build, cache_key, kernel_dir
specs = pickle.loads(bytes.fromhex(sys.argv[1]))
start, rotate = Path(sys.argv[2]), int(sys.argv[3])
Path(f"{start}.ready.{os.getpid()}").touch()
while not start.exists():
    time.sleep(0.002)
results = {}
for spec in specs[rotate:] + specs[:rotate]:
    cubin, cached = build(spec.source(), arch=spec.arch, include_dir=kernel_dir(), label=spec.label)
    key = cache_key(spec.source(), arch=spec.arch, include_dir=kernel_dir())
    results[spec.label + " " + spec.arch] = [hashlib.sha256(cubin).hexdigest(), cached, cubin[:4].hex(), key]
print(json.dumps(results))
"""


def test_processes_cold_start_compile_each_spec_once(cache_dir, tmp_path):
    specs, processes = [SIMT_120, SIMT_90, MMA_120], 8
    env = {name: value for name, value in os.environ.items() if name not in CACHE_ENV}
    env["MXFP8_MOE_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    start = tmp_path / "start"
    argv = pickle.dumps(specs).hex()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, argv, str(start), str(i % len(specs))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(processes)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("start.ready.*"))) < processes and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.01)
        start.touch()  # all imported: race
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outputs]

    fresh, keys = KernelCache(cache_dir), []
    for spec in specs:
        name = f"{spec.label} {spec.arch}"
        digests = {r[name][0] for r in results}
        assert len(digests) == 1, f"{name}: processes got different binaries"
        assert {r[name][2] for r in results} == {ELF_MAGIC.hex()}
        builds = sum(not r[name][1] for r in results)
        assert builds == 1, f"{name} compiled {builds} times across {processes} processes"
        [key] = {r[name][3] for r in results}
        keys.append(key)
        with _cache_warnings() as caught:
            entry = fresh.get(key)
        assert caught == [] and entry is not None
        assert hashlib.sha256(entry).hexdigest() == digests.pop()
    assert sorted(p.name for p in cache_dir.glob("*.bin")) == sorted(f"{key}.bin" for key in keys)
    assert [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("disk", [True, False], ids=["disk", "memory_only"])
def test_threads_compile_each_spec_once(cache_dir, compiles, monkeypatch, disk):
    if not disk:  # no file lock to lean on: the per-key thread lock alone
        monkeypatch.setenv("MXFP8_MOE_DISABLE_DISK_CACHE", "1")
        reset_default_cache()
    specs = [SIMT_120, SIMT_90, SIMT_120_B, MMA_120]
    work = [s for s in specs for _ in range(2)]
    random.shuffle(work)
    barrier, results, errors = threading.Barrier(len(work)), [], []
    lock = threading.Lock()

    def worker(spec):
        try:
            barrier.wait()
            cubin, cached = _build(spec)
            with lock:
                results.append((spec, cubin, cached))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in work]
    with _cache_warnings() as caught:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert errors == [] and caught == []
    assert compiles == {(s.label, s.arch): 1 for s in specs}
    for spec in specs:
        mine = [(cubin, cached) for s, cubin, cached in results if s == spec]
        assert sorted(cached for _, cached in mine) == [False, True]
        assert mine[0][0] == mine[1][0] == _fresh(spec)
    assert len(list(cache_dir.glob("*.bin"))) == (len(specs) if disk else 0)


# --------------------------------------------------------------------------------- 3. NVRTC failure

def test_compile_error_caches_nothing(cache_dir, compiles):
    _build(SIMT_120)  # an entry that must survive untouched
    before = _files(cache_dir, "*.bin")
    for attempt in range(2):  # the failure is not remembered, and no lock is left held
        begin = time.monotonic()
        with pytest.raises(compiler.CompileError) as raised:
            _build(BROKEN)
        assert time.monotonic() - begin < 30
        error = raised.value
        assert BROKEN_ASSERT in error.log and "static assert" in error.log
        assert (error.label, error.arch) == (BROKEN.label, BROKEN.arch)
        assert BROKEN.label in str(error) and BROKEN.arch in str(error)
    assert compiles[BROKEN.label, BROKEN.arch] == 2
    assert _files(cache_dir, "*.bin") == before
    assert not (cache_dir / f"{_key(BROKEN)}.bin").exists()
    assert default_cache().get(_key(BROKEN)) is None
    assert [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")] == []
    cubin, cached = _build(MMA_120)  # the next valid build works
    assert not cached and cubin == _fresh(MMA_120)


def test_compile_error_dumps_source_and_log(cache_dir, tmp_path, monkeypatch):
    dump = tmp_path / "dump"
    monkeypatch.setenv("MXFP8_MOE_DUMP_DIR", str(dump))
    with pytest.raises(compiler.CompileError) as raised:
        _build(BROKEN)
    assert (dump / f"{BROKEN.label}.{BROKEN.arch}.cu").read_text() == BROKEN.source()
    log = (dump / f"{BROKEN.label}.{BROKEN.arch}.log").read_text()
    assert BROKEN_ASSERT in log and log == raised.value.log


# ---------------------------------------------------------------------- 4. special values (reference)

ROWS = [5, 3, 0, 6]  # an empty expert, and padding rows in a_scale between experts
N, K = 128, 288  # K = 288: a partial last K block, and unused bytes in the last scale word
EMPTY_EXPERT = 2
SPECIAL_CASES = [
    "a_scale_nan", "a_scale_nan_padding_row", "a_scale_nan_unused_byte",
    "b_scale_nan", "b_scale_nan_empty_expert", "b_scale_nan_unused_byte",
    "a_e4m3_nan", "b_e4m3_nan", "a_scale_zero", "ab_scale_zero",
]


@dataclasses.dataclass
class Injected:
    nan: torch.Tensor  # (cum_m, n_out) bool on the CPU: exactly where the contract puts NaN
    tiny: list[int]  # rows scaled by 2^-127 (or less): finite and tiny, possibly flushed to 0
    scale_row: int  # a_scale row of the damaged token (a_scale_zero)
    where: str


def _set_scale_byte(scale: torch.Tensor, index: tuple[int, ...], block: int, value: int) -> None:
    """Set UE8M0 byte `block` of scale[index] (through any strides)."""
    word, byte = divmod(block, 4)
    bits = int(scale[(*index, word)]) & 0xFFFFFFFF
    bits = (bits & ~(0xFF << 8 * byte)) | (value << 8 * byte)
    scale[(*index, word)] = bits - (1 << 32) if bits >= 1 << 31 else bits


def inject_special(case: str, problem) -> Injected:
    """Damage `problem` in place at a fresh random place; return what the output must show."""
    a, b, a_scale, b_scale, m_indptr = problem.args
    cum_m, k = a.shape
    num_experts, n, _ = b.shape
    n_out = n // 2 if problem.gated else n
    nblocks = num_k_blocks(k, problem.k_granularity)
    words = a_scale.shape[1]
    bounds = m_indptr.tolist()
    scale_rows = token_scale_rows(m_indptr, cum_m).tolist()
    pick = random.Random()
    r = pick.randrange(cum_m)
    e = next(x for x in range(num_experts) if bounds[x] <= r < bounds[x + 1])  # r's expert
    j, kb, c = pick.randrange(n), pick.randrange(nblocks), pick.randrange(k)
    unused = pick.randrange(nblocks, 4 * words)
    nan = torch.zeros(cum_m, n_out, dtype=torch.bool)
    rows_e, tiny = slice(bounds[e], bounds[e + 1]), []
    if case == "a_scale_nan":
        _set_scale_byte(a_scale, (scale_rows[r],), kb, 0xFF)
        nan[r] = True
        where = f"token {r} block {kb}"
    elif case == "a_scale_nan_padding_row":
        row = pick.choice(sorted(set(range(a_scale.shape[0])) - set(scale_rows)))
        _set_scale_byte(a_scale, (row,), kb, 0xFF)
        where = f"padding row {row} block {kb}"
    elif case == "a_scale_nan_unused_byte":
        _set_scale_byte(a_scale, (scale_rows[r],), unused, 0xFF)
        where = f"token {r} byte {unused}"
    elif case == "b_scale_nan":
        _set_scale_byte(b_scale, (e, j), kb, 0xFF)
        nan[rows_e, j % n_out] = True
        where = f"expert {e} row {j} block {kb}"
    elif case == "b_scale_nan_empty_expert":
        _set_scale_byte(b_scale, (EMPTY_EXPERT, j), kb, 0xFF)
        where = f"expert {EMPTY_EXPERT} row {j} block {kb}"
    elif case == "b_scale_nan_unused_byte":
        _set_scale_byte(b_scale, (e, j), unused, 0xFF)
        where = f"expert {e} row {j} byte {unused}"
    elif case == "a_e4m3_nan":
        a.view(torch.uint8)[r, c] = pick.choice([0x7F, 0xFF])
        nan[r] = True
        where = f"a[{r}, {c}]"
    elif case == "b_e4m3_nan":
        b.view(torch.uint8)[e, j, c] = pick.choice([0x7F, 0xFF])
        nan[rows_e, j % n_out] = True
        where = f"b[{e}, {j}, {c}]"
    elif case == "a_scale_zero":  # every block of one token at 2^-127
        for block in range(nblocks):
            _set_scale_byte(a_scale, (scale_rows[r],), block, 0x00)
        tiny, where = [r], f"token {r}"
    elif case == "ab_scale_zero":  # and every block of its expert's weights too
        for block in range(nblocks):
            _set_scale_byte(a_scale, (scale_rows[r],), block, 0x00)
            for row in range(n):
                _set_scale_byte(b_scale, (e, row), block, 0x00)
        tiny, where = list(range(bounds[e], bounds[e + 1])), f"token {r}, expert {e}"
    else:
        raise AssertionError(case)
    return Injected(nan, tiny, scale_rows[r], f"{case} at {where}")


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_special_values_reference(case, k_granularity, gated):
    problem = make_problem(ROWS, N, K, k_granularity=k_granularity, gated=gated, device="cpu")
    clean = problem.reference()
    hit = inject_special(case, problem)
    api = moe_gemm_mxfp8_nt_groupwise(*problem.args, problem.granularity, "MN", "reference", is_gated=gated)
    exact = problem.reference()
    fp32 = reference_moe_gemm(*problem.args, k_granularity=k_granularity, is_gated=gated)
    for name, result in (("api", api), ("float64", exact), ("float32", fp32)):
        mask = torch.isnan(result)
        assert torch.equal(mask, hit.nan), (f"{name}, {hit.where}: NaN at {mask.nonzero().tolist()[:6]}, "
                                            f"expected at {hit.nan.nonzero().tolist()[:6]}")
        assert not torch.isinf(result).any(), f"{name}, {hit.where}"
    untouched = ~hit.nan
    untouched[hit.tiny] = False
    torch.testing.assert_close(exact[untouched], clean[untouched], rtol=0, atol=0, msg=hit.where)
    if hit.tiny:
        assert exact[hit.tiny].abs().max() < 2.0**-100 and (exact[hit.tiny] != 0).any(), hit.where
        assert api[hit.tiny].float().abs().max() < 2.0**-100, hit.where
    if case == "a_scale_zero" and not gated:  # exactly 2^-127 times the row at unit scales
        [row] = hit.tiny
        for block in range(num_k_blocks(K, k_granularity)):
            _set_scale_byte(problem.a_scale, (hit.scale_row,), block, 127)
        unit = problem.reference()[row]
        torch.testing.assert_close(exact[row], unit * 2.0**-127, rtol=1e-12, atol=0, msg=hit.where)
