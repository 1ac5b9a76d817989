"""Reliability on the GPU: the contract's special values through the CUDA kernels, and many Python
threads on their own streams calling the GEMM with mixed shapes.

The special-value cases (and their injection at fresh random places) are those of
test_reliability.py, checked there against the reference on the CPU.
"""

from __future__ import annotations

import collections
import threading

import pytest
import torch

from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise
from mxfp8_moe.gemm import heuristics, launch
from mxfp8_moe.gemm.device import device_info
from mxfp8_moe.gemm.heuristics import NATIVE_ARCHS, WGMMA_ARCHS

from problems import make_problem, relative_error
from test_reliability import K, N, ROWS, SPECIAL_CASES, inject_special

pytestmark = pytest.mark.gpu
TOLERANCE = 5e-3
SENTINEL = 12345.0  # finite poison: an unwritten element fails the value check, not the NaN check


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` at an odd address (the API then runs the SIMT kernel)."""
    flat = t.view(torch.uint8).flatten()
    storage = torch.empty(flat.numel() + 16, dtype=torch.uint8, device=t.device)
    copy = storage[1 : 1 + flat.numel()]
    copy.copy_(flat)
    return copy.view(t.dtype).view(t.shape)


@pytest.mark.parametrize("path", ["wgmma-software", "mma-software", "mma-emulated", "mma-native", "simt"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_special_values_cuda(case, k_granularity, gated, path, monkeypatch, fresh_memos):
    kind, _, mode = path.partition("-")
    arch = device_info(torch.cuda.current_device()).arch
    if mode == "native" and arch not in NATIVE_ARCHS:
        pytest.skip("native block scales need sm_120a / sm_121a")
    if kind == "wgmma" and arch not in WGMMA_ARCHS:
        pytest.skip("wgmma needs sm_90a")
    monkeypatch.setenv("MXFP8_MOE_SCALE_MODE", mode or "software")
    # Steer the heuristic to the tensor-core kernel under test (the memos start empty).
    if kind == "mma":
        monkeypatch.setattr(heuristics, "WGMMA_ARCHS", ())
    problem = make_problem(ROWS, N, K, k_granularity=k_granularity, gated=gated)
    hit = inject_special(case, problem)
    a, b, a_scale, b_scale, m_indptr = problem.args
    if kind == "simt":
        a = _misaligned(a)
        assert a.data_ptr() % 16 != 0
    out = torch.full((a.shape[0], N // 2 if gated else N), SENTINEL, dtype=torch.bfloat16, device="cuda")
    served, real_call = [], launch.GemmKernel.__call__

    def recording_call(self, *args):
        served.append(self.spec)
        return real_call(self, *args)

    monkeypatch.setattr(launch.GemmKernel, "__call__", recording_call)
    moe_gemm_mxfp8_nt_groupwise(a, b, a_scale, b_scale, m_indptr, problem.granularity, "MN", "cuda", out=out,
                                is_gated=gated)
    torch.cuda.synchronize()
    [spec] = served
    assert spec.family == kind and (kind != "mma" or spec.scale_mode == mode), spec
    ref = problem.reference()

    nan, ref_nan = torch.isnan(out).cpu(), torch.isnan(ref).cpu()
    assert torch.equal(ref_nan, hit.nan), hit.where
    assert torch.equal(nan, ref_nan), (f"{hit.where}: kernel NaN at {nan.nonzero().tolist()[:6]}, "
                                       f"reference NaN at {ref_nan.nonzero().tolist()[:6]}")
    ok = ~nan.to(out.device)
    assert torch.isfinite(out[ok]).all(), f"{hit.where}: inf where the reference is finite"
    error = relative_error(out[ok], ref[ok])
    assert error <= TOLERANCE, f"{hit.where}: relative error {error:.2e}"
    if hit.tiny:  # 2^-127 scales: tiny or flushed to zero, never NaN or large
        assert out[hit.tiny].float().abs().max() < 2.0**-100, hit.where


SHAPES = [  # rows per expert, n, k, k_granularity, gated: shapes no other test uses
    ([3, 0, 9, 17], 256, 544, 128, False),
    ([40, 25], 192, 416, 32, True),
    ([1] * 8, 320, 288, 128, False),
    ([100, 60, 7], 128, 1056, 32, False),
]
THREADS_PER_SHAPE, CALLS = 2, 5


def test_threads_on_streams_mixed_shapes(monkeypatch):
    device = torch.cuda.current_device()
    problems = [make_problem(rows, n, k, k_granularity=kg, gated=gated) for rows, n, k, kg, gated in SHAPES]
    refs = [p.reference() for p in problems]
    torch.cuda.synchronize()

    # Count kernel loads, and record which spec serves each shape (by a's and b's shapes).
    loaded, served, lock = collections.Counter(), collections.defaultdict(set), threading.Lock()
    real_init, real_call = launch.GemmKernel.__init__, launch.GemmKernel.__call__

    def counting_init(self, spec, device_index):
        with lock:
            loaded[device_index, spec] += 1
        real_init(self, spec, device_index)

    def recording_call(self, a, b, *args):
        with lock:
            served[tuple(a.shape), tuple(b.shape)].add(self.spec)
        return real_call(self, a, b, *args)

    monkeypatch.setattr(launch.GemmKernel, "__init__", counting_init)
    monkeypatch.setattr(launch.GemmKernel, "__call__", recording_call)
    before = set(launch._kernels)
    jobs = [i for i in range(len(SHAPES)) for _ in range(THREADS_PER_SHAPE)]
    barrier, results, errors = threading.Barrier(len(jobs)), {}, []

    def worker(slot: int, shape: int) -> None:
        try:
            problem, stream = problems[shape], torch.cuda.Stream(device)
            barrier.wait()
            outs = []
            with torch.cuda.stream(stream):
                for _ in range(CALLS):
                    out = torch.full((problem.a.shape[0], refs[shape].shape[1]), float("nan"),
                                     dtype=torch.bfloat16, device="cuda")
                    result = moe_gemm_mxfp8_nt_groupwise(*problem.args, problem.granularity, "MN", "cuda",
                                                         out=out, is_gated=problem.gated)
                    assert result.data_ptr() == out.data_ptr()
                    outs.append(out)
            stream.synchronize()
            results[slot] = (shape, outs)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(slot, shape)) for slot, shape in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and len(results) == len(jobs)

    for slot, (shape, outs) in sorted(results.items()):
        for call, out in enumerate(outs):
            assert not torch.isnan(out).any(), f"shape {shape}, thread {slot}, call {call}: unwritten elements"
            error = relative_error(out, refs[shape])
            assert error <= TOLERANCE, f"shape {shape}, thread {slot}, call {call}: relative error {error:.2e}"

    assert not loaded or max(loaded.values()) == 1, f"a spec was loaded more than once: {loaded}"
    assert set(launch._kernels) - before == set(loaded)
    for p in problems:  # one spec serves each shape, loaded once (or before this test)
        [spec] = served[tuple(p.a.shape), tuple(p.b.shape)]
        key = (device, spec)
        assert key in launch._kernels and (key in before or loaded[key] == 1), (spec, loaded)
