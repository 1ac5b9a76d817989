"""The CUDA kernels against a float64 reference of the same quantized inputs (GPU only).

Every case draws fresh random data and poisons `out` with NaN first, so an element the kernel
fails to write shows up as NaN. Tolerance: relative Frobenius error <= 5e-3 (bfloat16 rounding of
the output is ~2e-3 per element at worst).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise
from mxfp8_moe.gemm import launch
from mxfp8_moe.gemm.device import device_info
from mxfp8_moe.gemm.heuristics import (WGMMA_ARCHS, WGMMA_DECODE_TOKEN_TILES, WGMMA_TOKEN_TILES, choose_spec,
                                       fit_wgmma_stages, wgmma_spec)
from mxfp8_moe.gemm.launch import get_kernel
from mxfp8_moe.gemm.families import SimtSpec

from problems import make_problem, relative_error, routed_rows

pytestmark = pytest.mark.gpu
TOLERANCE = 5e-3

FLASHINFER_SHAPES = [(4096, 7168), (7168, 4096), (256, 2176), (3008, 2960)]
MODELS = {  # name: (experts, hidden, moe_intermediate, top_k)
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "qwen3-235b-a22b": (128, 4096, 1536, 8),
    "deepseek-v3-ep8": (32, 7168, 2048, 1),
    "gpt-oss-120b": (128, 2880, 2880, 4),
}
ROW_COUNTS = [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 376, 1500]


def run_and_check(problem, *, out=None, backend="cuda"):
    cum_m = problem.a.shape[0]
    n_out = problem.b.shape[1] // (2 if problem.gated else 1)
    if out is None:
        out = torch.full((cum_m, n_out), float("nan"), dtype=torch.bfloat16, device=problem.a.device)
    else:
        out.fill_(float("nan"))
    result = moe_gemm_mxfp8_nt_groupwise(*problem.args, problem.granularity, "MN", backend, out=out,
                                         is_gated=problem.gated)
    assert result.data_ptr() == out.data_ptr()
    ref = problem.reference()
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    error = relative_error(out, ref)
    assert error <= TOLERANCE, f"relative error {error:.2e}"
    return out


def run_kernel_and_check(kernel, problem):
    """run_and_check for one kernel specialization launched directly, past the heuristic."""
    n_out = problem.b.shape[1] // (2 if problem.gated else 1)
    out = torch.full((problem.a.shape[0], n_out), float("nan"), dtype=torch.bfloat16, device=problem.a.device)
    kernel(*problem.args, out, torch.cuda.current_stream().cuda_stream)
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    error = relative_error(out, problem.reference())
    assert error <= TOLERANCE, f"relative error {error:.2e}"
    return out


@pytest.fixture
def hopper():
    """The device, when it runs the wgmma kernel."""
    device = device_info(0)
    if device.arch not in WGMMA_ARCHS:
        pytest.skip(f"the wgmma kernel needs sm_90a, this GPU is {device.arch}")
    return device


@pytest.fixture(params=["software", "emulated"])
def scale_mode(request, monkeypatch):
    monkeypatch.setenv("MXFP8_MOE_SCALE_MODE", request.param)
    return request.param


def flashinfer_cases():
    cases = []
    for i, (n, k) in enumerate(FLASHINFER_SHAPES):
        for j, rows in enumerate([[0, 1, 8, 12], [15, 16, 0, 32], [64, 128], [376, 0, 1, 64]]):
            kg = (32, 128)[(i + j) % 2]
            gated = (i + j) % 3 == 0
            cases.append(pytest.param(rows, n, k, kg, gated, "MN" if j % 2 == 0 else "K",
                                      id=f"n{n}-k{k}-rows{'_'.join(map(str, rows))}-g{kg}{'-gated' if gated else ''}"))
    return cases


@pytest.mark.parametrize("rows,n,k,k_granularity,gated,layout", flashinfer_cases())
def test_flashinfer_grid(rows, n, k, k_granularity, gated, layout, scale_mode):
    run_and_check(make_problem(rows, n, k, k_granularity=k_granularity, gated=gated, scale_layout=layout))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("tokens", [1, 16, 200])
@pytest.mark.parametrize("gemm", ["gate_up", "down"])
def test_model_shapes(model, tokens, gemm, scale_mode):
    experts, hidden, inter, top_k = MODELS[model]
    rows = routed_rows(tokens, experts, top_k)
    n, k = (2 * inter, hidden) if gemm == "gate_up" else (hidden, inter)
    kg = 128 if tokens != 16 else 32
    run_and_check(make_problem(rows, n, k, k_granularity=kg, gated=gemm == "gate_up"))


@pytest.mark.parametrize("k_granularity", [32, 128])
def test_row_counts(k_granularity, scale_mode):
    # Every awkward per-expert row count at once, with a K tail (k % 128 == 16).
    run_and_check(make_problem(ROW_COUNTS, 256, 400, k_granularity=k_granularity))
    run_and_check(make_problem(ROW_COUNTS[::-1], 512, 272, k_granularity=k_granularity, gated=True, scale_layout="K"))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k_granularity", [32, 128])
def test_simt_kernel(gated, k_granularity):
    problem = make_problem([5, 0, 17, 2], 96, 336, k_granularity=k_granularity, gated=gated)
    run_kernel_and_check(get_kernel(SimtSpec(device_info(0).arch, 96, 336, k_granularity, gated), 0), problem)


@pytest.mark.parametrize("block_t", WGMMA_DECODE_TOKEN_TILES + WGMMA_TOKEN_TILES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k_granularity", [32, 128])
def test_wgmma_kernel(block_t, gated, k_granularity, hopper):
    # Tiles that end inside an expert, past its last row and past N (2880 = 22.5 x 128), a K tail
    # (2880 = 22.5 x 128), empty experts first and in the middle.
    rows = [0, 1, 63, 64, 65, 0, 130, 257, 500]
    n = 5760 if gated else 2880
    problem = make_problem(rows, n, 2880, k_granularity=k_granularity, gated=gated)  # MN-major scales (TMA)
    spec = dataclasses.replace(wgmma_spec(hopper, len(rows), len(rows), 100.0, n, 2880, k_granularity, gated), block_t=block_t)
    run_kernel_and_check(get_kernel(spec, 0), problem)


@pytest.mark.parametrize("block_t", WGMMA_DECODE_TOKEN_TILES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k_granularity", [32, 128])
def test_wgmma_two_ctas_per_sm(block_t, gated, k_granularity, hopper):
    # Decode tiles with two CTAs on each SM (80 registers a thread at launch, half the shared
    # memory each): the launch really makes them co-resident, and they compute the same GEMM.
    # Experts of one row up to a few tiles, empty ones, a K tail (2880 = 22.5 x 128).
    rows = [0, 1, 3, 8, 9, 0, 17, 2, 40]
    n = 5760 if gated else 2880
    problem = make_problem(rows, n, 2880, k_granularity=k_granularity, gated=gated)
    spec = wgmma_spec(hopper, len(rows), 7, 11.4, n, 2880, k_granularity, gated, split_k=False)
    spec = fit_wgmma_stages(hopper, len(rows), dataclasses.replace(spec, block_t=block_t, ctas_per_sm=2))
    kernel = get_kernel(spec, 0)
    assert kernel.launch_config(len(rows), sum(rows))[0][0] == 2 * hopper.num_sms
    run_kernel_and_check(kernel, problem)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k_granularity", [32, 128])
def test_wgmma_kernel_small(k_granularity, gated, hopper, monkeypatch):
    # The wgmma kernel on problems small enough for racecheck, whose host-side tracking of a
    # test_wgmma_kernel problem outgrows a 128 GB machine: full 128-row tiles and partial ones, an
    # empty expert, an N tail inside a TMA store box (208 = 128 + 64 + 16), two stages that the
    # 5 K blocks wrap around several times, and two CTAs, so each reuses its staging tile after a
    # TMA store.
    rows, n, k = [128, 0, 45, 256], 256 if gated else 208, 640
    problem = make_problem(rows, n, k, k_granularity=k_granularity, gated=gated)
    spec = dataclasses.replace(wgmma_spec(hopper, len(rows), len(rows), 143.0, n, k, k_granularity, gated), block_t=128, stages=2)
    kernel = get_kernel(spec, 0)
    shared = kernel.launch_config(len(rows), sum(rows))[1]
    monkeypatch.setattr(kernel, "launch_config", lambda *_: ((2, 1, 1), shared))
    run_kernel_and_check(kernel, problem)


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k_granularity", [32, 128])
def test_wgmma_split_k(splits, gated, k_granularity, hopper, monkeypatch):
    # Clusters of `splits` CTAs share each unit over K. Two clusters and more units than that, so
    # rank 0's slots and their barriers go through several phases; one-row, partial and full
    # tiles; an empty expert; K = 960 ends inside its last block. Bitwise the same when repeated:
    # the ranks' sums meet in a fixed order.
    rows, n, k = [1, 0, 40, 128, 3], 512 if gated else 320, 960
    problem = make_problem(rows, n, k, k_granularity=k_granularity, gated=gated)
    spec = dataclasses.replace(wgmma_spec(hopper, len(rows), len(rows), 20.0, n, k, k_granularity, gated),
                               block_t=32, splits=splits)
    kernel = get_kernel(spec, 0)
    shared = kernel.launch_config(len(rows), sum(rows))[1]
    monkeypatch.setattr(kernel, "launch_config", lambda *_: ((2 * splits, 1, 1), shared))
    first = run_kernel_and_check(kernel, problem).clone()
    assert torch.equal(run_kernel_and_check(kernel, problem), first)


@pytest.mark.parametrize("gemm, splits", [("gate_up", 2), ("gate_up", 4), ("down", 2)])
def test_split_k_on_decode_shapes(gemm, splits, hopper):
    # DeepSeek-V3 EP8 at one token (32 and 56 units on 132 SMs): gate_up in 2 is what the heuristic
    # runs; the others are the kernel's other clusters on the same shapes.
    n, k = (4096, 7168) if gemm == "gate_up" else (7168, 2048)
    unsplit = wgmma_spec(hopper, 32, 1, 1.0, n, k, 128, gemm == "gate_up", split_k=False)
    spec = fit_wgmma_stages(hopper, 32, dataclasses.replace(unsplit, splits=splits))
    run_kernel_and_check(get_kernel(spec, 0), make_problem([0] * 5 + [1] + [0] * 26, n, k, gated=gemm == "gate_up"))


@pytest.mark.parametrize("layout", ["MN", "K"])
def test_scale_layout_picks_the_hopper_kernel(layout, hopper, monkeypatch):
    # The wgmma kernel copies scale words with TMA, which needs MN-major scales; K-major ones run
    # on mma.sync, with the same result.
    served, real_call = [], launch.GemmKernel.__call__

    def recording_call(self, *args):
        served.append(self.spec.family)
        return real_call(self, *args)

    monkeypatch.setattr(launch.GemmKernel, "__call__", recording_call)
    run_and_check(make_problem([70, 0, 130, 33], 512, 1024, scale_layout=layout))
    assert served == ["wgmma" if layout == "MN" else "mma"]


def test_misaligned_output_uses_portable_kernel():
    problem = make_problem([3, 9], 64, 128)
    storage = torch.empty(12 * 64 + 1, dtype=torch.bfloat16, device="cuda")
    out = storage[1:].view(12, 64)  # 2-byte offset: not 16-byte aligned
    assert choose_spec(device=device_info(0), num_experts=2, cum_m=12, n=64, k=128, k_granularity=128,
                       gated=False, scale_mode="auto", aligned=False).family == "simt"
    run_and_check(problem, out=out)


def test_default_backend_allocates_output():
    problem = make_problem([4, 0, 11], 128, 256)
    out = moe_gemm_mxfp8_nt_groupwise(*problem.args)
    assert out.shape == (15, 128) and out.dtype == torch.bfloat16
    assert relative_error(out, problem.reference()) <= TOLERANCE


def test_cuda_graph_capture_and_replay():
    problem = make_problem([3, 0, 20, 7], 256, 512, gated=True)
    out = torch.empty(30, 128, dtype=torch.bfloat16, device="cuda")
    moe_gemm_mxfp8_nt_groupwise(*problem.args, out=out, is_gated=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_gemm_mxfp8_nt_groupwise(*problem.args, out=out, is_gated=True)
    # New values in the same buffers: the replay must compute them.
    fresh = make_problem([3, 0, 20, 7], 256, 512, gated=True)
    for mine, new in zip(problem.args, fresh.args):
        mine.copy_(new)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, fresh.reference()) <= TOLERANCE


def test_non_default_stream():
    problem = make_problem([64, 64, 64], 1024, 2048)
    out = torch.full((192, 1024), float("nan"), dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)  # keep the stream busy: a launch on the wrong stream would finish first
        moe_gemm_mxfp8_nt_groupwise(*problem.args, out=out)
    stream.synchronize()
    assert not torch.isnan(out).any()
    assert relative_error(out, problem.reference()) <= TOLERANCE


def test_rows_outside_every_expert_are_untouched():
    # m_indptr ends before cum_m: the trailing rows belong to no expert.
    problem = make_problem([5, 6], 64, 128)
    problem.m_indptr[2] = 8
    out = torch.full((11, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_gemm_mxfp8_nt_groupwise(*problem.args, out=out)
    assert torch.isnan(out[8:]).all()
    assert not torch.isnan(out[:8]).any()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    problem = make_problem([4, 9], 128, 256, device="cuda:1")
    out = moe_gemm_mxfp8_nt_groupwise(*problem.args)
    assert out.device == torch.device("cuda:1")
    assert relative_error(out, problem.reference()) <= TOLERANCE


def test_native_guard_accepts_a_faithful_block_scaled_mma():
    # On sm_90a the emulated block-scaled MMA stands in for sm_120a's native one: the guard must
    # find it agrees with software scaling (on an SM120 card the same check runs the real one).
    from mxfp8_moe.gemm import native_guard

    assert native_guard.verified("emulated", 0) is True


def test_native_guard_falls_back_when_a_kernel_cannot_launch(monkeypatch, fresh_memos):
    # A block-scaled kernel that fails to build or launch during the check must mean software
    # scaling and a warning, not an exception in the caller's first GEMM.
    from mxfp8_moe.gemm import native_guard
    from mxfp8_moe.jit.runtime import DriverError

    real_get_kernel = native_guard.get_kernel

    def get_kernel(spec, device_index):
        if getattr(spec, "scale_mode", None) == "emulated":
            raise DriverError("cuLaunchKernelEx failed: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES")
        return real_get_kernel(spec, device_index)

    monkeypatch.setattr(native_guard, "get_kernel", get_kernel)
    with pytest.warns(native_guard.NativeScaleWarning, match=r"failed its first-use check \(DriverError: "):
        assert native_guard.verified("emulated", 0) is False


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_alternating_devices_honour_each_current_stream():
    # Calls alternate between cuda:0 and cuda:1 while the current device stays cuda:0; each device's
    # current stream is a busy side stream, so a launch on the wrong stream (or device) would finish
    # before the sleep and leave NaNs or a wrong answer behind.
    problems = [make_problem([7, 0, 40], 256, 512, gated=True, device=f"cuda:{d}") for d in (0, 1)]
    outs = [torch.full((47, 128), float("nan"), dtype=torch.bfloat16, device=f"cuda:{d}") for d in (0, 1)]
    streams = [torch.cuda.Stream(device=d) for d in (0, 1)]
    with torch.cuda.device(0):
        for _ in range(3):
            for d in (0, 1):
                streams[d].wait_stream(torch.cuda.current_stream(d))
                with torch.cuda.stream(streams[d]):
                    torch.cuda._sleep(5_000_000)
                    moe_gemm_mxfp8_nt_groupwise(*problems[d].args, out=outs[d], is_gated=True)
    for d in (0, 1):
        streams[d].synchronize()
        assert outs[d].device == torch.device("cuda", d)
        assert relative_error(outs[d], problems[d].reference()) <= TOLERANCE
