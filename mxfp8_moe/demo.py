"""`mxfp8-moe demo`: one MoE layer's grouped GEMM on random data, checked, explained and timed.

On a GPU it runs the kernel this package picks, checks it against a float64 reference of the same
quantized inputs and times it. Without a GPU it runs the reference backend (the contract's formula
in plain torch) and compiles the sm_120a kernel the same call would run on an RTX PRO 6000 (NVRTC
needs no GPU). Both report what MXFP8 costs: the error of the quantized product against the
unquantized bf16 one. Each step prints as it starts and says how long it took.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time

import torch

from .api import moe_gemm_mxfp8_nt_groupwise
from .gemm.device import DeviceInfo
from .gemm.heuristics import choose_spec
from .jit import inspect
from .jit.build import build
from .jit.compiler import CompileError
from .layout import k_align, to_mn_major_b_scale
from .model_config import GemmShape
from .quantize import quantize_activations, quantize_weights
from .reference import reference_moe_gemm

TOLERANCE = 5e-3  # the kernel's relative Frobenius error against the float64 reference
# MXFP8 against the unquantized product: two e4m3 roundings with power-of-two block scales cost a
# few percent on Gaussian data; far more means the quantizers or the reference are broken.
QUANTIZATION_BOUND = 0.1
RUNS, WARMUP = 20, 3
ARCH = "sm_120a"  # what the demo compiles when there is no GPU to run on
WEIGHT_STD = 0.05


@dataclasses.dataclass
class Problem:
    operands: tuple  # a, b, a_scale, b_scale, m_indptr: the GEMM's MXFP8 inputs
    exact: torch.Tensor  # (cum_m, n_out) float64: the product of the unquantized bf16 values
    active: int  # experts with at least one row


@contextlib.contextmanager
def _step(what: str):
    print(f"{what} ...", end=" ", flush=True)
    start = time.perf_counter()
    yield
    print(f"{time.perf_counter() - start:.1f} s", flush=True)


def _relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.double() - expected).norm() / expected.norm()).item()


def make_problem(shape: GemmShape, tokens: int, top_k: int, k_granularity: int, device: torch.device,
                 generator: torch.Generator) -> Problem:
    """Random bf16 tokens routed top-k to random bf16 experts, quantized, with their exact product."""
    x = torch.randn(tokens, shape.k, generator=generator, device=device).to(torch.bfloat16)
    experts = torch.rand(tokens, shape.num_experts, generator=generator, device=device).topk(top_k, dim=1).indices
    # Row t * top_k + j of the flattened choices is token t's j-th expert; sort the rows by expert.
    order = experts.flatten().argsort(stable=True)
    counts = torch.bincount(experts.flatten(), minlength=shape.num_experts)
    m_indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    rows = x[order // top_k]
    a, a_scale = quantize_activations(rows, m_indptr, k_granularity)

    b = torch.zeros((shape.num_experts, shape.n, shape.k), dtype=torch.float8_e4m3fn, device=device)
    b_scale = to_mn_major_b_scale(torch.zeros((shape.num_experts, shape.n, k_align(shape.k, k_granularity)),
                                              dtype=torch.int32, device=device))
    exact = torch.empty(rows.shape[0], shape.n // 2 if shape.gated else shape.n, dtype=torch.float64, device=device)
    # Experts no token picked are never read, so only the others get weights, drawn one expert at a
    # time: all of them at once would be 1.6 GB of float32 for Qwen3-30B-A3B's gate_up.
    bounds = m_indptr.tolist()
    for e in counts.nonzero().flatten().tolist():
        w = torch.randn((1, shape.n, shape.k), generator=generator, device=device).mul_(WEIGHT_STD).to(torch.bfloat16)
        b[e : e + 1], b_scale[e : e + 1] = quantize_weights(w, k_granularity)
        product = rows[bounds[e] : bounds[e + 1]].double() @ w[0].double().T
        if shape.gated:
            up, gate = product.chunk(2, dim=1)
            product = up * torch.nn.functional.silu(gate)
        exact[bounds[e] : bounds[e + 1]] = product
    return Problem((a, b, a_scale, b_scale, m_indptr), exact, int((counts > 0).sum()))


def _median_ms(run) -> float:
    for _ in range(WARMUP):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(RUNS)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _on_gpu(problem: Problem, shape: GemmShape, k_granularity: int) -> bool:
    """Run, check and time the kernel; True if it matches the reference."""
    call = dict(scale_granularity_mnk=(1, 1, k_granularity), is_gated=shape.gated)
    with _step("running the kernel (compiled on first use)"):
        out = moe_gemm_mxfp8_nt_groupwise(*problem.operands, **call)
        torch.cuda.synchronize()
    with _step("computing the float64 reference of the same MXFP8 inputs"):
        reference = reference_moe_gemm(*problem.operands, k_granularity=k_granularity, is_gated=shape.gated,
                                       accumulate_dtype=torch.float64)
    error = _relative_error(out, reference)
    print(f"kernel against that reference: relative error {error:.2e} (limit {TOLERANCE:.0e}: bf16 rounding)")
    _report_quantization(reference, problem, k_granularity)
    ms = _median_ms(lambda: moe_gemm_mxfp8_nt_groupwise(*problem.operands, out=out, **call))
    a = problem.operands[0]
    flops = 2 * a.shape[0] * shape.n * shape.k
    weight_bytes = problem.active * shape.n * shape.k
    print(f"time {ms * 1e3:.1f} us per call (median of {RUNS}): {flops / ms / 1e9:.1f} TFLOP/s, "
          f"{weight_bytes / ms / 1e6:.0f} GB/s of the {problem.active} active experts' weights")
    accurate = error <= TOLERANCE  # False for NaN too
    if not accurate:
        print(f"error: the kernel's relative error {error:.2e} exceeds {TOLERANCE:.0e}", file=sys.stderr)
    return accurate


def _without_gpu(problem: Problem, shape: GemmShape, k_granularity: int) -> bool:
    """The reference backend, then a compile for sm_120a; True if both went as they should."""
    with _step("running the reference backend (the contract's formula in float32)"):
        out = moe_gemm_mxfp8_nt_groupwise(*problem.operands, (1, 1, k_granularity), backend="reference",
                                          is_gated=shape.gated)
    sane = _report_quantization(out, problem, k_granularity)
    a, b = problem.operands[:2]
    spec = choose_spec(device=DeviceInfo.for_arch(ARCH), num_experts=b.shape[0], cum_m=a.shape[0], n=shape.n,
                       k=shape.k, k_granularity=k_granularity, gated=shape.gated, scale_mode="auto")
    try:
        with _step(f"compiling the kernel an RTX PRO 6000 ({ARCH}) runs for this call"):
            cubin, cached = build(spec.source(), arch=spec.arch, label=spec.label)
    except CompileError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return False
    described = f"  {spec.label}: {len(cubin) / 1024:.0f} KiB of {ARCH} code{' (from the cache)' if cached else ''}"
    if inspect.find_tool("nvdisasm") or inspect.find_tool("cuobjdump"):
        count = inspect.count_instructions(inspect.sass(cubin), ("QMMA.SF",))["QMMA.SF"]
        described += f", {count} block-scaled MMA instructions (QMMA.SF) in its SASS"
    print(described)
    print("no GPU here: run on one to execute and time the kernel")
    return sane


def _report_quantization(result: torch.Tensor, problem: Problem, k_granularity: int) -> bool:
    """Print what MXFP8 costs on this problem; True if it is within reason."""
    error = _relative_error(result, problem.exact)
    # Power-of-two scales shift values without rounding them: on data whose blocks stay within
    # e4m3's range the error is the e4m3 rounding alone, the same at either granularity.
    print(f"MXFP8 against the unquantized bf16 product: relative error {error:.2e} (the e4m3 rounding of tokens "
          f"and weights; one power-of-two scale per {k_granularity} elements)")
    if not error <= QUANTIZATION_BOUND:
        print(f"error: quantization error {error:.2e} above {QUANTIZATION_BOUND}: the quantizers or the reference "
              "are broken", file=sys.stderr)
        return False
    return True


def run(shape: GemmShape, tokens: int, top_k: int, k_granularity: int, seed: int) -> bool:
    """The demo; True if every check passed."""
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    where = torch.cuda.get_device_name(device) if on_gpu else "the CPU (no GPU here)"
    print(f"{tokens} tokens, top-{top_k} of {shape.num_experts} experts, N={shape.n} K={shape.k}"
          f"{' gated' if shape.gated else ''}, k-granularity {k_granularity}, on {where}")
    generator = torch.Generator(device).manual_seed(seed)
    with _step("drawing the tokens and weights, quantizing them to MXFP8"):
        problem = make_problem(shape, tokens, top_k, k_granularity, device, generator)
    print(f"{problem.operands[0].shape[0]} expert rows, {problem.active} experts active")
    return (_on_gpu if on_gpu else _without_gpu)(problem, shape, k_granularity)
