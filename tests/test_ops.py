"""The custom ops: same results as the direct calls, fake impls that match the real outputs (shapes,
dtypes, strides), torch.library.opcheck, and on a GPU torch.compile(fullgraph=True) and CUDA graphs."""


import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise, quantize_activations
from mxfp8_moe.ops import grouped_gemm, quantize_activations_op

from problems import indptr, make_problem, relative_error

ROWS = [3, 0, 9, 4]  # an expert without rows, counts that are not multiples of 4
GEMM_TOLERANCE = 5e-3  # as in test_gemm_gpu.py: bf16 rounding of the output


def assert_same_layout(real: torch.Tensor, fake: torch.Tensor):
    assert (fake.shape, fake.dtype, fake.stride(), fake.device) == (real.shape, real.dtype, real.stride(), real.device)


def gemm_args(problem):
    return (*problem.args, problem.k_granularity, problem.gated)


@pytest.mark.parametrize("k_granularity", [32, 128])
def test_quantize_op_matches_direct_call(k_granularity):
    x = torch.randn(sum(ROWS), 320, dtype=torch.bfloat16)
    m_indptr = indptr(ROWS)
    a, a_scale = quantize_activations_op(x, m_indptr, k_granularity)
    want_a, want_scale = quantize_activations(x, m_indptr, k_granularity)
    assert torch.equal(a.view(torch.uint8), want_a.view(torch.uint8))
    assert torch.equal(a_scale, want_scale)
    assert a_scale.stride() == want_scale.stride() == (1, a_scale.shape[0])  # MN-major


@pytest.mark.parametrize("gated", [False, True])
def test_grouped_gemm_op_matches_direct_call(gated):
    problem = make_problem(ROWS, 64, 256, k_granularity=32, gated=gated, device="cpu")
    out = grouped_gemm(*gemm_args(problem))
    assert torch.equal(out, moe_gemm_mxfp8_nt_groupwise(*problem.args, problem.granularity, is_gated=gated))
    assert out.shape == (sum(ROWS), 32 if gated else 64) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("num_experts, rows, k, k_granularity", [(1, 1, 32, 32), (4, 16, 320, 32), (9, 5, 1024, 128)])
def test_quantize_fake_matches_real_layout(num_experts, rows, k, k_granularity):
    # Every (rows, E) pair pads a_scale differently: m_padded = (rows + 3 E) // 4 * 4.
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    m_indptr = indptr([rows] + [0] * (num_experts - 1))
    real = quantize_activations_op(x, m_indptr, k_granularity)
    with FakeTensorMode() as mode:
        fake = quantize_activations_op(mode.from_tensor(x), mode.from_tensor(m_indptr), k_granularity)
    for r, f in zip(real, fake):
        assert_same_layout(r, f)


@pytest.mark.parametrize("gated", [False, True])
def test_grouped_gemm_fake_matches_real_layout(gated):
    problem = make_problem(ROWS, 64, 256, gated=gated, device="cpu")
    real = grouped_gemm(*gemm_args(problem))
    with FakeTensorMode() as mode:
        fake = grouped_gemm(*(mode.from_tensor(t) for t in problem.args), problem.k_granularity, gated)
    assert_same_layout(real, fake)


def test_opcheck_quantize():
    x = torch.randn(sum(ROWS), 256, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.mxfp8_moe.quantize_activations.default, (x, indptr(ROWS), 128))


def test_opcheck_grouped_gemm():
    problem = make_problem(ROWS, 64, 256, gated=True, device="cpu")
    # test_schema is left out: its mutation check compares inputs with torch.allclose, which has no
    # float8 kernel on CPU; the op declares no mutation and the direct-call test shows inputs intact.
    torch.library.opcheck(torch.ops.mxfp8_moe.grouped_gemm.default, gemm_args(problem),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def quantize_then_gemm(x, m_indptr, b, b_scale):
    a, a_scale = quantize_activations_op(x, m_indptr, 128)
    return grouped_gemm(a, b, a_scale, b_scale, m_indptr, 128, is_gated=True)


@pytest.mark.gpu
def test_compile_fullgraph_matches_eager_cuda():
    problem = make_problem(ROWS, 256, 512, gated=True)
    x = torch.randn(sum(ROWS), 512, dtype=torch.bfloat16, device="cuda")
    args = (x, problem.m_indptr, problem.b, problem.b_scale)
    compiled = torch.compile(quantize_then_gemm, fullgraph=True)
    assert torch.equal(compiled(*args), quantize_then_gemm(*args))


@pytest.mark.gpu
def test_grouped_gemm_op_cuda_graph():
    problem = make_problem(ROWS, 256, 512, gated=True)
    args = gemm_args(problem)
    grouped_gemm(*args)  # compile the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_gemm(*args)
    fresh = make_problem(ROWS, 256, 512, gated=True)
    for mine, new in zip(problem.args, fresh.args):
        mine.copy_(new)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, fresh.reference()) <= GEMM_TOLERANCE


@pytest.mark.gpu
def test_quantize_and_gemm_ops_cuda_graph():
    problem = make_problem(ROWS, 256, 512, gated=True)
    x = torch.randn(sum(ROWS), 512, dtype=torch.bfloat16, device="cuda")
    args = (x, problem.m_indptr, problem.b, problem.b_scale)
    quantize_then_gemm(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quantize_then_gemm(*args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, quantize_then_gemm(*args))
