"""The public function on CPU tensors: the reference backend, `out`, empty batches, scale layouts and
the opt-in check of m_indptr's values. Fresh random data every run (the seed is printed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import mxfp8_moe.api as api
from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise, reference_moe_gemm, to_k_major
from problems import indptr, make_problem

ROWS = [[2, 0, 5], [1], [0, 3, 0, 9], [4, 4]]
SENTINEL = 7.0
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def no_validation_from_environment(monkeypatch):
    """These tests decide validation per call; a MXFP8_MOE_VALIDATE in the caller's shell must not."""
    monkeypatch.delenv("MXFP8_MOE_VALIDATE", raising=False)


def problem(rows=(2, 0, 5), n=32, k=160, kg=128, gated=False):
    return make_problem(list(rows), n, k, k_granularity=kg, gated=gated, device="cpu")


def expected(p, **kwargs) -> torch.Tensor:
    """The float32 reference, rounded once to bf16: what the public function must return bit for bit."""
    return reference_moe_gemm(*p.args, k_granularity=p.k_granularity, is_gated=p.gated, **kwargs).to(BF16)


def call(p, **kwargs) -> torch.Tensor:
    return moe_gemm_mxfp8_nt_groupwise(*p.args, scale_granularity_mnk=p.granularity, is_gated=p.gated, **kwargs)


def n_out(p) -> int:
    return p.b.shape[1] // 2 if p.gated else p.b.shape[1]


def sentinel(p, rows=None) -> torch.Tensor:
    return torch.full((p.a.shape[0] if rows is None else rows, n_out(p)), SENTINEL, dtype=BF16)


@pytest.fixture
def no_cuda_path(monkeypatch):
    """Any attempt to choose or load a CUDA kernel fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the CUDA path was taken")
    monkeypatch.setattr(api, "kernel_for", forbidden)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kg", [32, 128])
@pytest.mark.parametrize("rows", ROWS, ids=str)
@pytest.mark.parametrize("n, k", [(32, 160), (64, 256), (96, 48)])
def test_reference_backend_is_the_rounded_reference(rows, n, k, kg, gated, no_cuda_path):
    p = problem(rows, n, k, kg, gated)
    out = call(p, backend="reference")
    assert out.dtype == BF16 and out.device.type == "cpu" and out.shape == (sum(rows), n_out(p))
    assert out.is_contiguous()
    assert torch.equal(out, expected(p))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kg", [32, 128])
def test_default_backend_on_cpu_is_the_reference(kg, gated, no_cuda_path):
    p = problem(kg=kg, gated=gated)
    default = call(p)
    assert torch.equal(default, call(p, backend="reference"))
    assert torch.equal(default, expected(p))


@pytest.mark.parametrize("backend", ["cuda", "cute"])
def test_cuda_backends_refuse_cpu_tensors(backend):
    p = problem()
    out = sentinel(p)
    with pytest.raises(ValueError) as info:
        call(p, backend=backend, out=out)
    message = str(info.value)
    assert f"backend={backend!r}" in message and "cpu" in message, message
    assert torch.equal(out, sentinel(p))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rows", [[0, 0, 0], [0]], ids=str)
def test_empty_batch(rows, gated, monkeypatch):
    p = problem(rows, n=64, gated=gated)
    assert p.a.shape == (0, 160) and p.a_scale.shape[0] == (3 * len(rows)) // 4 * 4

    fresh = call(p)
    assert fresh.shape == (0, n_out(p)) and fresh.dtype == BF16

    monkeypatch.setattr(api, "reference_moe_gemm", lambda *a, **k: pytest.fail("computed an empty batch"))
    buffer = torch.full((4, n_out(p)), SENTINEL, dtype=BF16)
    out = buffer[:0]
    assert call(p, out=out) is out
    assert call(p, out=out, validate=True) is out
    assert torch.equal(buffer, torch.full_like(buffer, SENTINEL))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kg", [32, 128])
def test_out_is_returned_and_fully_written(kg, gated):
    p = problem(rows=(4, 0, 9, 3), n=64, kg=kg, gated=gated)
    out = torch.full((p.a.shape[0], n_out(p)), float("nan"), dtype=BF16)
    result = call(p, out=out)
    assert result is out and result.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected(p))  # torch.equal fails on any NaN left behind


@pytest.mark.parametrize("kg", [32, 128])
def test_gated_output_is_up_times_silu_gate(kg):
    ungated = problem(rows=(3, 6, 0), n=64, kg=kg)
    gated = dataclasses.replace(ungated, gated=True)

    out = call(gated)
    assert out.shape == (9, 32)
    full = reference_moe_gemm(*ungated.args, k_granularity=kg)  # float32, (cum_m, 2N)
    up, gate = full[:, :32], full[:, 32:]
    assert torch.equal(out, (up * F.silu(gate)).to(BF16))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kg", [32, 128])
def test_scale_layouts_give_identical_results(kg, gated):
    # k = 608: 2 (kg 128) or 5 (kg 32) words per scale row, so the layouts really differ
    p = problem(rows=(5, 0, 2, 7), n=48 if not gated else 64, k=608, kg=kg, gated=gated)
    mn = call(p)
    a_scale_mn, b_scale_mn = p.a_scale, p.b_scale
    words = a_scale_mn.shape[1]
    assert words >= 2
    assert a_scale_mn.stride() == (1, a_scale_mn.shape[0])  # FlashInfer's MN-major layout
    assert b_scale_mn.stride()[1] == 1

    p.a_scale, p.b_scale = to_k_major(a_scale_mn), to_k_major(b_scale_mn)
    assert p.a_scale.stride() == (words, 1) and p.b_scale.stride()[2] == 1
    k_major = call(p)

    # and a layout of neither kind: the values inside bigger buffers full of random words
    def garbage(*shape):
        return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)
    p.a_scale = garbage(a_scale_mn.shape[0], words + 3)[:, 1:1 + words].copy_(a_scale_mn)
    p.b_scale = garbage(b_scale_mn.shape[0], b_scale_mn.shape[1], words + 2)[..., 2:].copy_(b_scale_mn)
    assert not p.a_scale.is_contiguous() and not p.b_scale.is_contiguous()
    padded = call(p)

    assert torch.equal(mn, k_major) and torch.equal(mn, padded)
    p.a_scale, p.b_scale = a_scale_mn, b_scale_mn
    assert torch.equal(mn, expected(p))


# --- the opt-in check of m_indptr's values ------------------------------------------------------

BAD_INDPTR = [  # for rows [2, 0, 5]: cum_m = 7
    ("first-not-0", [1, 2, 2, 7], r"m_indptr\[0\] must be 0, got 1"),
    ("decreasing", [0, 5, 2, 7], r"non-decreasing.*m_indptr\[1\] = 5 > m_indptr\[2\] = 2"),
    ("ends-early", [0, 2, 2, 6], r"m_indptr\[-1\] must equal cum_m.* 7, got 6"),
    ("ends-late", [0, 2, 2, 8], r"m_indptr\[-1\] must equal cum_m.* 7, got 8"),
]


def enable_validation(how: str, monkeypatch) -> dict:
    if how == "env":
        monkeypatch.setenv("MXFP8_MOE_VALIDATE", "1")
        return {}
    return {"validate": True}


@pytest.mark.parametrize("how", ["kwarg", "env"])
@pytest.mark.parametrize("values, pattern", [c[1:] for c in BAD_INDPTR], ids=[c[0] for c in BAD_INDPTR])
def test_validation_names_the_broken_rule(values, pattern, how, monkeypatch):
    p = problem()
    p.m_indptr = torch.tensor(values, dtype=torch.int32)
    out = sentinel(p)
    with pytest.raises(ValueError, match=pattern):
        call(p, out=out, **enable_validation(how, monkeypatch))
    assert torch.equal(out, sentinel(p))


@pytest.mark.parametrize("how", ["kwarg", "env"])
@pytest.mark.parametrize("kg", [32, 128])
def test_validation_passes_a_valid_indptr(kg, how, monkeypatch):
    p = problem(rows=(3, 0, 0, 6), kg=kg)
    assert torch.equal(call(p, **enable_validation(how, monkeypatch)), expected(p))


@pytest.mark.parametrize("env, validate, checked", [
    (None, None, False), ("1", None, True), ("0", None, False), ("1", False, False), (None, True, True),
])
def test_validation_is_opt_in(env, validate, checked, monkeypatch):
    """Off unless asked for; the keyword wins over the environment."""
    if env is not None:
        monkeypatch.setenv("MXFP8_MOE_VALIDATE", env)
    seen = []
    monkeypatch.setattr(api, "check_indptr_values", lambda m_indptr, cum_m: seen.append((m_indptr.tolist(), cum_m)))
    p = problem()
    call(p, validate=validate)
    assert seen == ([(indptr([2, 0, 5]).tolist(), 7)] if checked else [])


def test_reference_backend_rejects_an_invalid_m_indptr_even_without_validation():
    """The reference reads m_indptr on the host anyway, so it always checks it (the CUDA kernels
    clamp instead: tests/test_adversarial_gpu.py); `out` stays untouched."""
    p = problem()
    p.m_indptr = indptr([2, 0, 3])  # ends at 5 < cum_m = 7
    out = sentinel(p)
    with pytest.raises(ValueError, match="m_indptr"):
        call(p, out=out, backend="reference")
    assert torch.equal(out, sentinel(p))
