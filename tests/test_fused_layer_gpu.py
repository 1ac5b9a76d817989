"""The fused layer kernel (gate_up, SwiGLU, the intermediate's MXFP8 quantization and down in one
launch, sm_90a) against the chain of launches it replaces: the same bits, on fresh random data,
for model shapes, adversarial routings, back-to-back calls in one CUDA graph and torch.compile."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe import expert_gemms, moe_forward, quantize_activations, reference_moe_gemm
from mxfp8_moe.gemm.device import device_info
from mxfp8_moe.gemm.heuristics import layer_spec
from mxfp8_moe.gemm.layer import LAYER_MAX_ROWS, layer_counters
from mxfp8_moe.moe_layer import QuantizedExperts

from problems import indptr, relative_error, routed_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="the fused layer kernel is sm_90a's"),
]


def experts(num_experts, hidden, inter, k_granularity):
    """w13 (E, 2 I, H) [up; gate] and w2 (E, H, I) ~ N(0, 0.05), quantized to MXFP8."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda") * 0.05
    w2 = torch.randn(num_experts, hidden, inter, device="cuda") * 0.05
    return QuantizedExperts.quantize(w13, k_granularity), QuantizedExperts.quantize(w2, k_granularity)


def tokens(rows_per_expert, hidden, k_granularity):
    """MXFP8 rows ~ N(0, 1) with per-row magnitudes over a few octaves, and their m_indptr."""
    return tokens_for(indptr(rows_per_expert, "cuda"), hidden, k_granularity)


def tokens_for(m_indptr, hidden, k_granularity):
    cum_m = int(m_indptr[-1])
    x = torch.randn(cum_m, hidden, device="cuda") * torch.exp2(torch.randint(-3, 4, (cum_m, 1), device="cuda").float())
    return (*quantize_activations(x.bfloat16(), m_indptr, k_granularity), m_indptr)


def dirty_allocator(*shapes):
    """Blocks of these bf16 shapes filled with NaN and freed, so that the outputs allocated next
    start as NaN wherever the kernel leaves them unwritten."""
    for _ in range(3):
        for shape in shapes:
            torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")


def run_both(w13, w2, a, a_scale, m_indptr, k_granularity):
    args = (a, a_scale, m_indptr, w13.b, w13.b_scale, w2.b, w2.b_scale, k_granularity)
    chain = expert_gemms(*args, path="chain")
    dirty_allocator((a.shape[0], w2.b.shape[2]), (a.shape[0], w2.b.shape[1]))
    fused = expert_gemms(*args, path="fused")
    return fused, chain


# (experts, hidden, inter, top_k): small, Qwen3-30B-A3B, DeepSeek-V3 on 8 GPUs (32 local experts).
SHAPES = {"small": (8, 256, 128, 2), "qwen3-30b": (128, 2048, 768, 8), "deepseek-ep8": (32, 7168, 2048, 8)}


@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("tokens_", [1, 4, 16, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_same_bits_as_the_chain(shape, tokens_, k_granularity):
    num_experts, hidden, inter, top_k = SHAPES[shape]
    w13, w2 = experts(num_experts, hidden, inter, k_granularity)
    a, a_scale, m_indptr = tokens(routed_rows(tokens_, num_experts, top_k), hidden, k_granularity)
    fused, chain = run_both(w13, w2, a, a_scale, m_indptr, k_granularity)
    assert not fused.isnan().any()
    assert torch.equal(fused, chain)


def test_against_the_float64_reference():
    # The chain is checked against its reference elsewhere; this closes the loop for the fused path.
    # The reference rounds its float64 intermediate to bf16, the kernel its float32 one: where the
    # two roundings differ by an ulp, the intermediate's e4m3 rounding may differ by one step (1/8 of
    # its value at worst), on a few elements; over the output that stays far below 1 % (Frobenius).
    k_granularity = 128
    w13, w2 = experts(8, 512, 256, k_granularity)
    a, a_scale, m_indptr = tokens([3, 0, 1, 7, 0, 2, 0, 1], 512, k_granularity)
    fused = expert_gemms(a, a_scale, m_indptr, w13.b, w13.b_scale, w2.b, w2.b_scale, k_granularity, path="fused")
    h = reference_moe_gemm(a, w13.b, a_scale, w13.b_scale, m_indptr, k_granularity=k_granularity, is_gated=True,
                           accumulate_dtype=torch.float64).bfloat16()
    h_q, h_scale = quantize_activations(h, m_indptr, k_granularity, backend="torch")
    want = reference_moe_gemm(h_q, w2.b, h_scale, w2.b_scale, m_indptr, k_granularity=k_granularity,
                              accumulate_dtype=torch.float64)
    assert relative_error(fused, want) < 1e-2


@pytest.mark.parametrize("rows_per_expert", [
    [0, 0, 40, 0, 0, 0, 0, 0],        # every row on one expert (two token tiles)
    [1] * 8,                          # every expert one row
    [0] * 7 + [5],                    # only the last expert
    [33, 0, 0, 1, 0, 0, 64, 2],       # full and partial tiles
])
def test_adversarial_routings(rows_per_expert):
    w13, w2 = experts(8, 256, 128, 128)
    a, a_scale, m_indptr = tokens(rows_per_expert, 256, 128)
    fused, chain = run_both(w13, w2, a, a_scale, m_indptr, 128)
    assert torch.equal(fused, chain)


def test_m_indptr_out_of_range_is_clamped_as_the_gemms_clamp_it():
    # Offsets past cum_m and decreasing ones: the kernel reads them as the GEMMs do (clamped to
    # [0, cum_m], then a running max), so it computes what the clamped m_indptr asks for, finishes
    # (no wait on a tile nobody publishes) and leaves its counters zero.
    w13, w2 = experts(4, 256, 128, 128)
    a, a_scale, _ = tokens([10, 0, 6, 4], 256, 128)
    clamped = indptr([12, 0, 8, 0], "cuda")
    garbage = torch.tensor([0, 12, 5, 1000, 20], dtype=torch.int32, device="cuda")
    args = (a, a_scale, None, w13.b, w13.b_scale, w2.b, w2.b_scale, 128)
    want = expert_gemms(*args[:2], clamped, *args[3:], path="chain")
    assert torch.equal(expert_gemms(*args[:2], garbage, *args[3:], path="fused"), want)
    # The chain too: its quantizer assigns the intermediate's scale rows as the GEMMs read them.
    for _ in range(3):
        torch.full((64 * 1024,), -1, dtype=torch.int32, device="cuda")  # dirty blocks for a_scale
    assert torch.equal(expert_gemms(*args[:2], garbage, *args[3:], path="chain"), want)
    torch.cuda.synchronize()
    assert not layer_counters(0, torch.cuda.current_stream().cuda_stream).any()


def test_back_to_back_calls_in_graphs_replayed_in_any_order():
    # Ten layers, each with its own routing, in two graphs captured on torch's capture stream with
    # no eager call there first (each captured launch gets counters of its own), replayed in
    # either order with fresh tokens each time: every launch must find its counters zero.
    k_granularity = 128
    w13, w2 = experts(128, 2048, 768, k_granularity)
    routings = [indptr(routed_rows(t, 128, 8), "cuda") for t in (1, 4, 16, 2, 64, 1, 8, 3, 32, 1)]
    calls = [tokens_for(m, 2048, k_granularity) for m in routings]
    fused = lambda a, s, m: expert_gemms(a, s, m, w13.b, w13.b_scale, w2.b, w2.b_scale, k_granularity, path="fused")
    for a, s, m in calls:
        fused(a, s, m)  # kernels loaded, eager counters allocated, outside any capture
    graphs = []
    for half in (calls[:5], calls[5:]):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [fused(a, s, m) for a, s, m in half]
        graphs.append((graph, half, outs))
    for i in (1, 0, 0, 1):
        graph, half, outs = graphs[i]
        for a, s, m in half:  # fresh tokens into the graph's inputs
            new_a, new_s = tokens_for(m, 2048, k_granularity)[:2]
            a.copy_(new_a)
            s.copy_(new_s)
        graph.replay()
        torch.cuda.synchronize()
        for (a, s, m), out in zip(half, outs):
            chain = expert_gemms(a, s, m, w13.b, w13.b_scale, w2.b, w2.b_scale, k_granularity, path="chain")
            assert torch.equal(out, chain)
    assert not layer_counters(0, torch.cuda.current_stream().cuda_stream).any()


@pytest.mark.parametrize("k_granularity", [32, 128])
@pytest.mark.parametrize("rows_per_expert", [[64, 0, 130, 62, 0, 0, 0, 0], [100, 140, 0, 272]])
def test_wide_token_tiles(rows_per_expert, k_granularity):
    # Few experts with many rows: 64-token tiles and a 4-stage pipeline.
    spec = layer_spec(device_info(0), len(rows_per_expert), sum(rows_per_expert), 256, 128, k_granularity)
    assert spec is not None and spec.block_t == 64
    w13, w2 = experts(len(rows_per_expert), 256, 128, k_granularity)
    a, a_scale, m_indptr = tokens(rows_per_expert, 256, k_granularity)
    fused, chain = run_both(w13, w2, a, a_scale, m_indptr, k_granularity)
    assert torch.equal(fused, chain)


@pytest.mark.parametrize("k_granularity", [32, 128])
def test_moe_forward_fused_equals_chain_and_compiles(k_granularity):
    hidden, inter, num_experts, top_k = 2048, 768, 128, 8
    w13, w2 = experts(num_experts, hidden, inter, k_granularity)
    x = torch.randn(4, hidden, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(4, num_experts, device="cuda")
    chain = moe_forward(x, logits, w13, w2, top_k, experts="chain")
    assert torch.equal(moe_forward(x, logits, w13, w2, top_k, experts="fused"), chain)
    assert torch.equal(moe_forward(x, logits, w13, w2, top_k), chain)  # "auto": either path, the same bits
    compiled = torch.compile(lambda x, logits: moe_forward(x, logits, w13, w2, top_k), fullgraph=True)
    assert torch.equal(compiled(x, logits), chain)


def test_auto_chooses_the_fused_kernel_for_decode_only():
    device = device_info(0)
    assert layer_spec(device, 128, 8, 2048, 768, 128) is not None
    assert layer_spec(device, 128, LAYER_MAX_ROWS + 1, 2048, 768, 128) is None
    assert layer_spec(device, 128, 8, 2048, 96, 128) is None  # gated tiles need I % 64 == 0
