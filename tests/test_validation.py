"""Bad calls to moe_gemm_mxfp8_nt_groupwise: each is refused with the documented exception and a
message that names the argument, what was expected and what came, before anything is written.

One valid problem (E = 3, rows [2, 0, 5], n = 32, k = 160) is built per test from fresh random data;
every case of the table changes one thing about the call. `out` is always passed, filled with a
sentinel, and must come back bit-identical, as must every input.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import pytest
import torch

from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise, reference_moe_gemm, validation
from mxfp8_moe.layout import K_GRANULARITY_TAG
from problems import indptr, make_problem

ROWS = [2, 0, 5]
E, CUM_M, N, K = len(ROWS), sum(ROWS), 32, 160
M_PADDED = (CUM_M + 3 * E) // 4 * 4  # 16
SENTINEL = 7.0
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def no_validation_from_environment(monkeypatch):
    """These tests decide validation per call; a MXFP8_MOE_VALIDATE in the caller's shell must not."""
    monkeypatch.delenv("MXFP8_MOE_VALIDATE", raising=False)


def filled(rows: int, cols: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.full((rows, cols), SENTINEL, dtype=dtype)


def valid_call(kg: int) -> dict:
    p = make_problem(ROWS, N, K, k_granularity=kg, device="cpu")
    return dict(a=p.a, b=p.b, a_scale=p.a_scale, b_scale=p.b_scale, m_indptr=p.m_indptr,
                scale_granularity_mnk=(1, 1, kg), scale_major_mode="MN", backend="reference",
                out=filled(CUM_M, N), out_dtype=None, is_gated=False)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A contiguous byte copy, for bitwise comparison whatever the dtype."""
    return t.detach().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


# --- mutations that need more than a one-liner -------------------------------------------------

def replace_weights(call: dict, kg: int, n: int) -> None:
    """b and b_scale of a fresh problem with n rows per expert (a consistent pair)."""
    p = make_problem(ROWS, n, K, k_granularity=kg, device="cpu")
    call.update(b=p.b, b_scale=p.b_scale)


def cut_k(call: dict, k: int) -> None:
    call.update(a=call["a"][:, :k].contiguous(), b=call["b"][..., :k].contiguous())


def strided(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The same values in a non-contiguous view: every other element of a buffer twice as long."""
    shape = list(x.shape)
    shape[dim] *= 2
    buffer = torch.empty(shape, dtype=x.dtype)
    view = buffer.narrow(dim, 0, x.shape[dim] * 2)
    view = view.unflatten(dim, (x.shape[dim], 2)).select(dim + 1, 0)
    view.copy_(x)
    assert not view.is_contiguous()
    return view


def out_after(arg: str, overlap: int):
    """`arg` (its values, contiguous) and out in one byte buffer, out's first `overlap` bytes over
    arg's last ones (0: out starts at the byte after arg's last)."""
    def mutate(call: dict, kg: int) -> None:
        x = call[arg].contiguous()
        nbytes = x.numel() * x.element_size()
        buffer = torch.empty(nbytes - overlap + CUM_M * N * 2, dtype=torch.uint8)
        shared = buffer[:nbytes].view(x.dtype).view(x.shape)
        shared.copy_(x)
        call.update({arg: shared, "out": buffer[nbytes - overlap:].view(torch.bfloat16).view(CUM_M, N)})
    return mutate


def out_over_a_scale(call: dict, kg: int) -> None:
    """a_scale in FlashInfer's MN-major layout (the transpose of a (k_align, m_padded) buffer),
    out starting half-way into that buffer."""
    a_scale = call["a_scale"]
    scale_bytes = a_scale.numel() * 4
    buffer = torch.empty(scale_bytes // 2 + CUM_M * N * 2, dtype=torch.uint8)
    shared = buffer[:scale_bytes].view(torch.int32).view(a_scale.shape[1], a_scale.shape[0]).t()
    shared.copy_(a_scale)
    call.update(a_scale=shared, out=buffer[scale_bytes // 2:].view(torch.bfloat16).view(CUM_M, N))


def out_inside_b(call: dict, kg: int) -> None:
    """out is a bf16 view of the middle of b's storage."""
    call["out"] = call["b"].view(torch.bfloat16).flatten()[100:100 + CUM_M * N].view(CUM_M, N)


# --- the table ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[dict, int], None]
    name: str  # regex: where the message names the argument
    expects: tuple[str, ...] = ()  # literal substrings: what was expected, what came ({words} = k_align)
    exc: type[Exception] = ValueError


def put(**changes):
    """Replace arguments; a callable value is called per test (fresh tensors every time)."""
    return lambda call, kg: call.update({k: v() if callable(v) else v for k, v in changes.items()})


def edit(arg: str, fn):
    return lambda call, kg: call.update({arg: fn(call[arg])})


E4M3, I32, BF16 = "torch.float8_e4m3fn", "torch.int32", "torch.bfloat16"
GRAN = r"^scale_granularity_mnk\b"
WORDS = "{words}"  # k_align, filled in per k_granularity


def gated_weights(n: int, gated: bool, width: int):
    return lambda call, kg: (replace_weights(call, kg, n), call.update(is_gated=gated, out=filled(CUM_M, width)))


CASES = [
    # dtypes
    Case("a-bf16", edit("a", lambda a: a.float().to(torch.bfloat16)), r"^a\b", (E4M3, BF16)),
    Case("a-e5m2", edit("a", lambda a: a.float().to(torch.float8_e5m2)), r"^a\b", (E4M3, "torch.float8_e5m2")),
    Case("b-e5m2", edit("b", lambda b: b.float().to(torch.float8_e5m2)), r"^b\b", (E4M3, "torch.float8_e5m2")),
    Case("b-uint8", edit("b", lambda b: b.view(torch.uint8)), r"^b\b", (E4M3, "torch.uint8")),
    Case("b-bf16", edit("b", lambda b: b.float().to(torch.bfloat16)), r"^b\b", (E4M3, BF16)),
    Case("a_scale-int64", edit("a_scale", lambda s: s.long()), r"^a_scale\b", (I32, "torch.int64")),
    Case("a_scale-uint8", edit("a_scale", lambda s: s.to(torch.uint8)), r"^a_scale\b", (I32, "torch.uint8")),
    Case("b_scale-int64", edit("b_scale", lambda s: s.long()), r"^b_scale\b", (I32, "torch.int64")),
    Case("b_scale-uint8", edit("b_scale", lambda s: s.to(torch.uint8)), r"^b_scale\b", (I32, "torch.uint8")),
    Case("m_indptr-int64", edit("m_indptr", lambda m: m.long()), r"^m_indptr\b", (I32, "torch.int64")),
    Case("out-float16", put(out=lambda: filled(CUM_M, N, torch.float16)), r"^out\b", (BF16, "torch.float16")),
    Case("out-float32", put(out=lambda: filled(CUM_M, N, torch.float32)), r"^out\b", (BF16, "torch.float32")),
    # ranks
    Case("a-3d", edit("a", lambda a: a[None]), r"^a\b", ("2-D", f"(1, {CUM_M}, {K})")),
    Case("b-2d", edit("b", lambda b: b[0]), r"^b\b", ("3-D", f"({N}, {K})")),
    Case("a_scale-3d", edit("a_scale", lambda s: s[None]), r"^a_scale\b", ("2-D", f"(1, {M_PADDED}, {WORDS})")),
    Case("a_scale-1d", edit("a_scale", lambda s: s[:, 0]), r"^a_scale\b", ("2-D", f"({M_PADDED},)")),
    Case("b_scale-2d", edit("b_scale", lambda s: s[0]), r"^b_scale\b", ("3-D", f"({N}, {WORDS})")),
    Case("m_indptr-2d", edit("m_indptr", lambda m: m[None]), r"^m_indptr\b", ("1-D", f"(1, {E + 1})")),
    Case("out-3d", edit("out", lambda o: o[None]), r"^out\b", ("2-D", f"(1, {CUM_M}, {N})")),
    # shapes
    Case("k-mismatch", edit("b", lambda b: b[..., :K - 32].contiguous()), r"^b\.size\(2\)",
         (f"{K}", f"[{E}, {N}, {K - 32}]")),
    Case("k-not-16", lambda call, kg: cut_k(call, K - 8), r"a\.size\(1\)", ("multiple of 16", f"{K - 8}")),
    Case("m_indptr-long", put(m_indptr=lambda: indptr(ROWS + [0])), r"^m_indptr\b", (f"[{E + 1}]", f"[{E + 2}]")),
    Case("m_indptr-short", put(m_indptr=lambda: indptr(ROWS[:-1])), r"^m_indptr\b", (f"[{E + 1}]", f"[{E}]")),
    Case("a_scale-rows-cum_m", edit("a_scale", lambda s: s[:CUM_M]), r"^a_scale\b",
         (f"[{M_PADDED}, {WORDS}]", f"[{CUM_M}, {WORDS}]")),
    Case("a_scale-k_align", edit("a_scale", lambda s: torch.cat([s, s[:, :1]], 1)), r"^a_scale\b",
         (f"[{M_PADDED}, {WORDS}]", f"[{M_PADDED}, {{words1}}]")),
    Case("b_scale-n", edit("b_scale", lambda s: s[:, :N // 2]), r"^b_scale\b",
         (f"[{E}, {N}, {WORDS}]", f"[{E}, {N // 2}, {WORDS}]")),
    Case("b_scale-E", edit("b_scale", lambda s: s[:E - 1]), r"^b_scale\b",
         (f"[{E}, {N}, {WORDS}]", f"[{E - 1}, {N}, {WORDS}]")),
    Case("b_scale-k_align", edit("b_scale", lambda s: torch.cat([s, s[..., :1]], 2)), r"^b_scale\b",
         (f"[{E}, {N}, {WORDS}]", f"[{E}, {N}, {{words1}}]")),
    Case("gated-odd-n", gated_weights(33, True, 16), r"^b\.size\(1\)", ("even", "33")),
    Case("width-not-16", gated_weights(40, False, 40), r"b\.size\(1\)", ("multiple of 16", "40")),
    Case("gated-width-not-16", gated_weights(48, True, 24), r"b\.size\(1\) / 2", ("multiple of 16", "24")),
    Case("out-ungated-when-gated", put(is_gated=True), r"^out\b", (f"[{CUM_M}, {N // 2}]", f"[{CUM_M}, {N}]")),
    Case("out-gated-when-ungated", put(out=lambda: filled(CUM_M, N // 2)), r"^out\b",
         (f"[{CUM_M}, {N}]", f"[{CUM_M}, {N // 2}]")),
    Case("out-rows", put(out=lambda: filled(CUM_M + 1, N)), r"^out\b", (f"[{CUM_M}, {N}]", f"[{CUM_M + 1}, {N}]")),
    Case("no-experts", lambda call, kg: call.update(b=call["b"][:0], b_scale=call["b_scale"][:0],
                                                    m_indptr=call["m_indptr"][:1]),
         r"^b\b", ("at least one", f"[0, {N}, {K}]")),
    # strides
    Case("a-strided", edit("a", lambda a: strided(a, 1)), r"^a\b", ("contiguous", f"({2 * K}, 2)")),
    Case("b-strided", edit("b", lambda b: strided(b, 1)), r"^b\b", ("contiguous", f"({2 * N * K}, {2 * K}, 1)")),
    Case("m_indptr-strided", edit("m_indptr", lambda m: strided(m, 0)), r"^m_indptr\b", ("contiguous", "(2,)")),
    Case("out-strided", edit("out", lambda o: strided(o, 0)), r"^out\b", ("contiguous", f"({2 * N}, 1)")),
    # options
    Case("granularity-64", put(scale_granularity_mnk=(1, 1, 64)), GRAN, ("(1, 1, 32)", "(1, 1, 128)", "(1, 1, 64)")),
    Case("granularity-2d", put(scale_granularity_mnk=(1, 128, 128)), GRAN, ("(1, 1, 128)", "(1, 128, 128)")),
    Case("granularity-str", put(scale_granularity_mnk="abc"), GRAN, ("(1, 1, 128)", "'abc'")),
    Case("granularity-str-tuple", lambda call, kg: call.update(scale_granularity_mnk=("1", "1", str(kg))), GRAN,
         ("(1, 1, 128)", "('1', '1', '{kg}')")),
    Case("granularity-fraction", lambda call, kg: call.update(scale_granularity_mnk=(1, 1, kg + 0.5)), GRAN,
         ("(1, 1, 128)", "(1, 1, {kg}.5)")),
    Case("granularity-4", lambda call, kg: call.update(scale_granularity_mnk=(1, 1, kg, 1)), GRAN,
         ("(1, 1, 128)", "(1, 1, {kg}, 1)")),
    Case("granularity-int", lambda call, kg: call.update(scale_granularity_mnk=kg), GRAN, ("(1, 1, 128)", "got {kg}")),
    Case("scale_major_mode-K", put(scale_major_mode="K"), r"^scale_major_mode\b", ('"MN"', "'K'")),
    Case("backend-triton", put(backend="triton"), r"^backend\b", ("'reference'", "'triton'"), NotImplementedError),
    Case("backend-None", put(backend=None), r"^backend\b", ("'reference'", "None"), NotImplementedError),
    Case("out_dtype-float16", put(out_dtype=torch.float16), r"^out_dtype\b", (BF16, "torch.float16"),
         NotImplementedError),
    Case("out_dtype-float32", put(out_dtype=torch.float32), r"^out_dtype\b", (BF16, "torch.float32"),
         NotImplementedError),
    # devices (meta stands in for a second device)
    *[Case(f"{arg}-other-device", edit(arg, lambda x: x.to("meta")), rf"^{arg}\b", ("cpu", "meta"))
      for arg in ("b", "a_scale", "b_scale", "m_indptr", "out")],
    # out overlapping an input
    Case("out-overlaps-a", out_after("a", 2), r"^out\b", ("overlap a:",)),
    Case("out-overlaps-a_scale", out_over_a_scale, r"^out\b", ("overlap a_scale",)),
    Case("out-inside-b", out_inside_b, r"^out\b", ("overlap b:",)),
    Case("out-overlaps-b_scale", out_after("b_scale", 2), r"^out\b", ("overlap b_scale",)),
    Case("out-overlaps-m_indptr", out_after("m_indptr", 2), r"^out\b", ("overlap m_indptr",)),
    # not tensors
    Case("a-list", edit("a", lambda a: a.float().tolist()), r"^a\b", ("torch.Tensor", "list")),
    Case("b-None", put(b=None), r"^b\b", ("torch.Tensor", "NoneType")),
    Case("a_scale-numpy", edit("a_scale", lambda s: s.numpy()), r"^a_scale\b", ("torch.Tensor", "ndarray")),
    Case("m_indptr-list", put(m_indptr=lambda: indptr(ROWS).tolist()), r"^m_indptr\b",
         ("torch.Tensor", "list", f"[0, 2, 2, {CUM_M}]")),
    Case("out-list", put(out=lambda: filled(CUM_M, N).tolist()), r"^out\b", ("torch.Tensor", "list")),
]
assert len(CASES) >= 32 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("kg", [32, 128])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_call_is_refused_before_anything_is_written(case: Case, kg: int):
    call = valid_call(kg)
    case.mutate(call, kg)
    out = call["out"]
    assert out is not None, "the case must leave an `out` to watch"
    if isinstance(out, torch.Tensor) and out.device.type == "cpu":
        out.fill_(SENTINEL)  # after the mutation: out may share memory with an input
    watched = {k: (v, bits(v)) for k, v in call.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}

    with pytest.raises(Exception) as info:
        moe_gemm_mxfp8_nt_groupwise(**call)

    assert type(info.value) is case.exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert re.search(case.name, message), f"argument /{case.name}/ not named in: {message}"
    words = -(-K // (4 * kg))
    for text in case.expects:
        text = text.format(words=words, words1=words + 1, kg=kg)
        assert text in message, f"{text!r} missing from: {message}"
    for name, (tensor, before) in watched.items():
        assert torch.equal(bits(tensor), before), f"{name} was written"


@pytest.mark.parametrize("kg", [32, 128])
@pytest.mark.parametrize("arg", ["a", "b", "b_scale", "m_indptr"])
def test_out_right_after_an_input_is_not_an_overlap(arg: str, kg: int):
    """The overlap check is exact: out starting at the byte after an input's last one is accepted."""
    call = valid_call(kg)
    original = call[arg].clone()
    out_after(arg, 0)(call, kg)
    out = call["out"].fill_(SENTINEL)

    result = moe_gemm_mxfp8_nt_groupwise(**call)

    expected = reference_moe_gemm(*[call[name] for name in ("a", "b", "a_scale", "b_scale", "m_indptr")],
                                  k_granularity=kg)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(result, expected.to(torch.bfloat16))
    assert torch.equal(bits(call[arg]), bits(original))


def test_valid_call_passes():
    """The base problem of the table is itself valid (so each case fails for its one change)."""
    for kg in (32, 128):
        call = valid_call(kg)
        args = [call[name] for name in ("a", "b", "a_scale", "b_scale", "m_indptr")]
        expected = reference_moe_gemm(*args, k_granularity=kg)
        assert torch.equal(moe_gemm_mxfp8_nt_groupwise(**call), expected.to(torch.bfloat16))


@pytest.mark.parametrize("made_at, stated", [(32, 128), (128, 32)])
def test_scales_quantized_at_another_granularity_are_refused(made_at, stated):
    # K = 128: one scale word per row at either granularity, so only the quantizer's record tells.
    p = make_problem(ROWS, N, 128, k_granularity=made_at, device="cpu")
    out = filled(CUM_M, N)
    with pytest.raises(ValueError, match=rf"a_scale was quantized at k granularity {made_at}, but "
                                         rf"scale_granularity_mnk says {stated}; pass scale_granularity_mnk="
                                         rf"\(1, 1, {made_at}\)"):
        moe_gemm_mxfp8_nt_groupwise(*p.args, scale_granularity_mnk=(1, 1, stated), backend="reference", out=out)
    assert (out == SENTINEL).all()


def test_scale_shape_errors_say_which_granularity_fits():
    call = valid_call(32)  # K = 160: two words per row at k_gran 32, one at 128
    for name in ("a_scale", "b_scale"):  # scales from elsewhere: only their shapes tell the granularity
        vars(call[name]).pop(K_GRANULARITY_TAG, None)
    with pytest.raises(ValueError, match=r"a_scale must have shape \[16, 1\] .*, got \[16, 2\]: that is the shape at "
                                         r"k granularity 32; pass scale_granularity_mnk=\(1, 1, 32\)"):
        moe_gemm_mxfp8_nt_groupwise(**{**call, "scale_granularity_mnk": (1, 1, 128)})
    with pytest.raises(ValueError, match=r"b_scale must have shape \[3, 32, 2\] .*, got \[3, 32, 3\]; K = 160 takes 2 "
                                         r"words at k granularity 32 and 1 word at k granularity 128"):
        moe_gemm_mxfp8_nt_groupwise(**{**call, "b_scale": torch.zeros(E, N, 3, dtype=torch.int32)})
    assert (call["out"] == SENTINEL).all()


def test_verdicts_are_remembered_per_tensor_metadata(monkeypatch, fresh_memos):
    """A call with an earlier call's tensor metadata skips the checks; any change of a tensor's
    dtype, strides or address (a new buffer in place of an input) runs them again."""
    checked = []
    real_checks = validation._check_tensors
    monkeypatch.setattr(validation, "_check_tensors", lambda *args, **kw: checked.append(1) or real_checks(*args, **kw))
    call = valid_call(128)
    for name in ("a_scale", "b_scale"):  # scales from elsewhere: only their shapes tell the granularity
        vars(call[name]).pop(K_GRANULARITY_TAG, None)
    moe_gemm_mxfp8_nt_groupwise(**call)
    moe_gemm_mxfp8_nt_groupwise(**call)
    assert len(checked) == 1
    call["out"] = filled(CUM_M, N)  # a new output buffer: checked again, then remembered
    moe_gemm_mxfp8_nt_groupwise(**call)
    moe_gemm_mxfp8_nt_groupwise(**call)
    assert len(checked) == 2
    # The same tensors (no out) with another is_gated or k granularity: checked again.
    allocating = {**call, "out": None}
    moe_gemm_mxfp8_nt_groupwise(**allocating)
    moe_gemm_mxfp8_nt_groupwise(**allocating)
    assert len(checked) == 3
    assert moe_gemm_mxfp8_nt_groupwise(**{**allocating, "is_gated": True}).shape == (CUM_M, N // 2)
    assert len(checked) == 4
    with pytest.raises(ValueError, match="a_scale must have shape"):  # K = 160 needs 2 words at k_gran 32
        moe_gemm_mxfp8_nt_groupwise(**{**allocating, "scale_granularity_mnk": (1, 1, 32)})
    assert len(checked) == 5
    a = call["a"]
    for bad, message in ((a.view(torch.uint8), "a must have dtype torch.float8_e4m3fn"),
                         (strided(a, 0), "a must be contiguous")):
        with pytest.raises(ValueError, match=re.escape(message)):
            moe_gemm_mxfp8_nt_groupwise(**{**call, "a": bad})
    # out over a's bytes: the same metadata as a valid out but for the address, refused.
    overlapping = a.view(torch.uint8).view(-1)[:2 * CUM_M * N].view(torch.bfloat16).view(CUM_M, N)
    with pytest.raises(ValueError, match="out must not overlap a"):
        moe_gemm_mxfp8_nt_groupwise(**{**call, "out": overlapping})
    assert len(checked) == 8
