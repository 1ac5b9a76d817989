"""The mma.sync fused layer (kernels/mma_moe_layer.cuh): gate_up quantizing the intermediate in its
epilogue, down on those rows, one launch. On sm_120a / sm_121a it runs as the heuristic picks it
(native block-scaled MMA); on sm_90a in the emulated scale mode, which runs the native code with
the MMA replaced by its PTX-ISA semantics. Checked against the chain of launches in the same mode
(whose tiles sum in another order: equal within float32 rounding, then one bf16 rounding) and
against a float64 reference of the same quantized inputs."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe import expert_gemms, quantize_activations, reference_moe_gemm
from mxfp8_moe.gemm.device import device_info
from mxfp8_moe.gemm.heuristics import layer_spec
from mxfp8_moe.gemm.layer import MmaLayerSpec, layer_counters
from mxfp8_moe.moe_layer import QuantizedExperts

from problems import indptr, relative_error, routed_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() not in ((9, 0), (12, 0), (12, 1)),
    reason="the mma.sync fused layer runs natively on sm_12x and emulated on sm_90a")]

SHAPES = {"small": (8, 256, 128, 2), "qwen3-30b": (128, 2048, 768, 8), "deepseek-ep8": (32, 7168, 2048, 8)}


@pytest.fixture(autouse=True)
def mode(monkeypatch, fresh_memos):
    """The scale mode the mma.sync layer runs in here: emulated on sm_90a, the default elsewhere."""
    if torch.cuda.get_device_capability() == (9, 0):
        monkeypatch.setenv("MXFP8_MOE_SCALE_MODE", "emulated")
        return "emulated"
    return "native"


def layer(num_experts, hidden, inter, k_granularity, rows_per_expert):
    w13 = QuantizedExperts.quantize(torch.randn(num_experts, 2 * inter, hidden, device="cuda") * 0.05, k_granularity)
    w2 = QuantizedExperts.quantize(torch.randn(num_experts, hidden, inter, device="cuda") * 0.05, k_granularity)
    m_indptr = indptr(rows_per_expert, "cuda")
    cum_m = int(sum(rows_per_expert))
    x = torch.randn(cum_m, hidden, device="cuda") * torch.exp2(torch.randint(-3, 4, (cum_m, 1), device="cuda").float())
    a, a_scale = quantize_activations(x.bfloat16(), m_indptr, k_granularity)
    return (a, a_scale, m_indptr, w13.b, w13.b_scale, w2.b, w2.b_scale, k_granularity)


def reference(a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, k_granularity):
    h = reference_moe_gemm(a, w13, a_scale, w13_scale, m_indptr, k_granularity=k_granularity, is_gated=True,
                           accumulate_dtype=torch.float64).bfloat16()
    h_q, h_scale = quantize_activations(h, m_indptr, k_granularity, backend="torch")
    return reference_moe_gemm(h_q, w2, h_scale, w2_scale, m_indptr, k_granularity=k_granularity,
                              accumulate_dtype=torch.float64)


@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("num_tokens", [1, 4, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_chain_and_the_reference(shape, num_tokens, k_granularity, mode):
    num_experts, hidden, inter, top_k = SHAPES[shape]
    rows = routed_rows(num_tokens, num_experts, top_k)
    assert isinstance(layer_spec(device_info(0), num_experts, sum(rows), hidden, inter, k_granularity, mode),
                      MmaLayerSpec)
    args = layer(num_experts, hidden, inter, k_granularity, rows)
    chain = expert_gemms(*args, path="chain")
    for _ in range(3):  # NaN-filled blocks for the allocator to hand out as the outputs
        torch.full((sum(rows), hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
    fused = expert_gemms(*args, path="fused")
    assert not fused.isnan().any()
    # The chain's tiles sum in another order; the intermediate's e4m3 rounding may then differ by a
    # step on a few elements, far below 1 % over the output.
    assert relative_error(fused, chain) < 1e-2
    assert relative_error(fused, reference(*args)) < 1e-2
    torch.cuda.synchronize()
    assert not layer_counters(0, torch.cuda.current_stream().cuda_stream).any()


@pytest.mark.parametrize("rows_per_expert", [[0, 0, 40, 0, 0, 0, 0, 0], [1] * 8, [0] * 7 + [5], [9, 0, 0, 1, 0, 0, 17, 2]])
def test_adversarial_routings(rows_per_expert):
    args = layer(8, 256, 128, 128, rows_per_expert)
    fused = expert_gemms(*args, path="fused")
    assert relative_error(fused, reference(*args)) < 1e-2


def test_graph_replays():
    args = layer(128, 2048, 768, 128, routed_rows(4, 128, 8))
    expert_gemms(*args, path="fused")  # kernels loaded outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = expert_gemms(*args, path="fused")
    want = reference(*args)
    for _ in range(5):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, want) < 1e-2

