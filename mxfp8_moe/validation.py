"""Argument checks for moe_gemm_mxfp8_nt_groupwise, made before anything runs or is written.

Every check FlashInfer makes, with its exception types (ValueError for shapes and values,
NotImplementedError for an unknown backend or out_dtype), plus the ones a kernel library owes its
callers: one device for all tensors, `out` fully described, no `out` that overlaps an input.
Messages name the argument, what was expected and what came. No device-to-host sync happens here;
`check_indptr_values` is the opt-in check of m_indptr's values, which needs one.

The tensor checks depend only on the tensors' metadata (type, dtype, device, shape, strides,
address), so `check_call` remembers its verdict per metadata: a server that calls again with the
same buffers pays for one tuple instead of the checks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .checks import K_GRANULARITIES, check_offsets
from .gemm.tensor_maps import scales_fit_tma
from .layout import K_GRANULARITY_TAG, k_align, m_padded
from .memo import BoundedMemo
from .mxfp4 import K_GRANULARITY as MXFP4_K_GRANULARITY

BACKENDS = ("auto", "cuda", "cute", "reference")
GRANULARITIES = tuple((1, 1, g) for g in K_GRANULARITIES)  # scale_granularity_mnk values
VECTOR_ALIGNMENT = 16  # bytes; the tensor-core kernels move a, b and out in 16-byte vectors
_checked = BoundedMemo(4096)


class GemmProblem(NamedTuple):
    num_experts: int
    cum_m: int
    n: int  # rows of B per expert (2 * n_out when gated)
    k: int
    k_granularity: int
    gated: bool
    device: torch.device
    aligned: bool  # a, b and out (when given) allow 16-byte vectors
    tma_scales: bool  # both scale tensors are laid out as the wgmma kernel's TMA reads them

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.gated else self.n


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def _tensor(name: str, x, dtype: torch.dtype, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {_describe(x)}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {x.stride()} for shape {tuple(x.shape)}")


def _shape(name: str, x: torch.Tensor, expected: tuple[int, ...], why: str) -> None:
    if x.shape != expected:
        raise ValueError(f"{name} must have shape {list(expected)} ({why}), got {list(x.shape)}")


def _dense_matrix(name: str, x, dtype: torch.dtype, device: torch.device, shape: tuple[int, int], why: str) -> None:
    """A contiguous 2-D tensor of `dtype` and `shape` on `device` (out, bias)."""
    _tensor(name, x, dtype, 2)
    if x.device != device:
        raise ValueError(f"{name} must be on the same device as a ({device}), got {x.device}")
    _shape(name, x, shape, why)
    _contiguous(name, x)


def _scale_shape(name: str, scale: torch.Tensor, leading: tuple[int, ...], why: str, k: int, k_granularity: int) -> None:
    """A scale tensor's shape: `leading` dimensions, then k_align words. For K > 128 the word count
    tells the granularities apart, so the message says which one the given shape fits."""
    expected = (*leading, k_align(k, k_granularity))
    if scale.shape == expected:
        return
    message = (f"{name} must have shape {list(expected)} ({why}, k_align = ceil(K / (4 * {k_granularity}))), "
               f"got {list(scale.shape)}")
    others = [g for g in K_GRANULARITIES if g != k_granularity and k_align(k, g) != expected[-1]]
    fits = [g for g in others if scale.shape == (*leading, k_align(k, g))]
    if fits:
        message += (f": that is the shape at k granularity {fits[0]}; pass scale_granularity_mnk=(1, 1, {fits[0]}) "
                    "if the scales were made at that granularity")
    elif others:
        message += "; K = {} takes {}".format(k, " and ".join(
            f"{k_align(k, g)} word{'s' * (k_align(k, g) != 1)} at k granularity {g}" for g in (k_granularity, *others)))
    raise ValueError(message)


def _granularity_tags(a_scale, b_scale, k_granularity: int) -> None:
    """Scales from this package's quantizers carry the granularity they were made at: a call that
    states another one is refused (for K <= 128 the shapes cannot tell, and the result would be
    silently wrong)."""
    for name, scale in (("a_scale", a_scale), ("b_scale", b_scale)):
        made_at = getattr(scale, K_GRANULARITY_TAG, None)
        if made_at is not None and made_at != k_granularity:
            raise ValueError(f"{name} was quantized at k granularity {made_at}, but scale_granularity_mnk says "
                             f"{k_granularity}; pass scale_granularity_mnk=(1, 1, {made_at})")


def check_options(scale_granularity_mnk, scale_major_mode, backend, out_dtype, weights: str = "e4m3") -> int:
    """The non-tensor arguments; returns k_granularity."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise NotImplementedError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if out_dtype is not None and out_dtype != torch.bfloat16:
        raise NotImplementedError(f"out_dtype must be torch.bfloat16 (or None), got {out_dtype!r}")
    try:
        granularity = tuple(scale_granularity_mnk)
    except TypeError:
        granularity = None
    if granularity not in GRANULARITIES:
        raise ValueError(f"scale_granularity_mnk must be (1, 1, 32) or (1, 1, 128), got {scale_granularity_mnk!r}")
    if weights == "e2m1" and granularity != (1, 1, MXFP4_K_GRANULARITY):
        raise ValueError(f"scale_granularity_mnk must be (1, 1, 32) with MXFP4 weights (one scale per 32 values), "
                         f"got {scale_granularity_mnk!r}")
    if scale_major_mode != "MN":
        raise ValueError(f'scale_major_mode must be "MN", got {scale_major_mode!r}')
    return int(granularity[2])


def check_call(a, b, a_scale, b_scale, m_indptr, out, bias=None, *, k_granularity: int, is_gated: bool,
               weights: str = "e4m3") -> GemmProblem:
    """Validate the tensors of a call; returns the problem they describe."""
    _granularity_tags(a_scale, b_scale, k_granularity)
    try:
        key = (_metadata(a), _metadata(b), _metadata(a_scale), _metadata(b_scale), _metadata(m_indptr),
               None if out is None else _metadata(out), None if bias is None else _metadata(bias), k_granularity,
               is_gated, weights)
    except (AttributeError, RuntimeError):  # not (strided) tensors: the checks say which argument
        key = None
    problem = _checked.get(key)
    if problem is None:
        problem = _check_tensors(a, b, a_scale, b_scale, m_indptr, out, bias, k_granularity=k_granularity,
                                 is_gated=is_gated, weights=weights)
        if key is not None:
            _checked.put(key, problem)
    return problem


def _metadata(x) -> tuple:
    return type(x), x.dtype, x.device, x.shape, x.stride(), x.data_ptr()


def _check_tensors(a, b, a_scale, b_scale, m_indptr, out, bias, *, k_granularity: int, is_gated: bool,
                   weights: str) -> GemmProblem:
    mxfp4 = weights == "e2m1"
    if not mxfp4 and isinstance(b, torch.Tensor) and b.dtype == torch.uint8:
        raise ValueError("b must have dtype torch.float8_e4m3fn, got torch.uint8 (MXFP4 weights, two e2m1 per byte, "
                         "go to moe_gemm_mxfp8_mxfp4_nt_groupwise)")
    _tensor("a", a, torch.float8_e4m3fn, 2)
    _tensor("b", b, torch.uint8 if mxfp4 else torch.float8_e4m3fn, 3)
    _tensor("a_scale", a_scale, torch.int32, 2)
    _tensor("b_scale", b_scale, torch.int32, 3)
    _tensor("m_indptr", m_indptr, torch.int32, 1)
    _contiguous("a", a)
    _contiguous("b", b)
    _contiguous("m_indptr", m_indptr)

    device = a.device
    for name, x in (("b", b), ("a_scale", a_scale), ("b_scale", b_scale), ("m_indptr", m_indptr)):
        if x.device != device:
            raise ValueError(f"{name} must be on the same device as a ({device}), got {x.device}")

    cum_m, k = a.shape
    num_experts, n, k_b = b.shape
    if mxfp4 and 2 * k_b != k:
        raise ValueError(f"b.size(2) must equal a.size(1) / 2 (two e2m1 values per byte of the K dimension, {k}), "
                         f"got b of shape {list(b.shape)}")
    if not mxfp4 and k_b != k:
        raise ValueError(f"b.size(2) must equal a.size(1) (the K dimension, {k}), got b of shape {list(b.shape)}")
    if num_experts < 1:
        raise ValueError(f"b must hold at least one expert, got shape {list(b.shape)}")
    k_multiple = MXFP4_K_GRANULARITY if mxfp4 else 16  # (MXFP4: one scale per 32 values, two values a byte)
    if k == 0 or k % k_multiple != 0:
        raise ValueError(f"K (a.size(1)) must be a positive multiple of {k_multiple}"
                         f"{' with MXFP4 weights' if mxfp4 else ''}, got {k}")
    _shape("m_indptr", m_indptr, (num_experts + 1,), "num_experts + 1, num_experts = b.size(0)")
    if is_gated and n % 2 != 0:
        raise ValueError(f"b.size(1) must be even when is_gated=True (up and gate halves), got {n}")
    n_out = n // 2 if is_gated else n
    if n_out == 0 or n_out % 16 != 0:
        raise ValueError(f"the output width ({'b.size(1) / 2' if is_gated else 'b.size(1)'}) must be a positive "
                         f"multiple of 16, got {n_out}")
    _scale_shape("a_scale", a_scale, (m_padded(cum_m, num_experts),), "m_padded = (cum_m + 3 * num_experts) // 4 * 4",
                 k, k_granularity)
    _scale_shape("b_scale", b_scale, (num_experts, n), "num_experts, n", k, k_granularity)

    if bias is not None:
        _dense_matrix("bias", bias, torch.float32, device, (num_experts, n), "num_experts, n: one per row of b")
    if out is not None:
        _dense_matrix("out", out, torch.bfloat16, device, (cum_m, n_out), "cum_m, n / 2 when gated else n")
        if cum_m:
            _check_no_overlap(out, a, b, a_scale, b_scale, m_indptr, bias)
    aligned = (a.data_ptr() | b.data_ptr() | (0 if out is None else out.data_ptr())) % VECTOR_ALIGNMENT == 0
    return GemmProblem(num_experts, cum_m, n, k, k_granularity, is_gated, device, aligned,
                       scales_fit_tma(a_scale, b_scale))


def _check_no_overlap(out, a, b, a_scale, b_scale, m_indptr, bias) -> None:
    """An input that shares a byte with `out` would be overwritten while the kernel still reads it.

    Byte spans come from shapes and strides (all validated, all non-empty): a, b, m_indptr, bias and
    out are contiguous; the scale tensors may have any strides.
    """
    (cum_m, k), (num_experts, n, k_bytes) = a.shape, b.shape
    rows, words = a_scale.shape
    a_row, a_word = a_scale.stride()
    b_expert, b_row, b_word = b_scale.stride()
    first = out.data_ptr()
    last = first + 2 * out.numel() - 1
    for name, start, size in (
        ("a", a.data_ptr(), cum_m * k),
        ("b", b.data_ptr(), num_experts * n * k_bytes),
        ("a_scale", a_scale.data_ptr(), 4 * ((rows - 1) * a_row + (words - 1) * a_word + 1)),
        ("b_scale", b_scale.data_ptr(), 4 * ((num_experts - 1) * b_expert + (n - 1) * b_row + (words - 1) * b_word + 1)),
        ("m_indptr", m_indptr.data_ptr(), 4 * (num_experts + 1)),
        *((("bias", bias.data_ptr(), 4 * num_experts * n),) if bias is not None else ()),
    ):
        if start <= last and first < start + size:
            raise ValueError(f"out must not overlap {name}: out spans bytes [{first:#x}, {last:#x}], "
                             f"{name} spans [{start:#x}, {start + size - 1:#x}]")


def check_indptr_values(m_indptr: torch.Tensor, cum_m: int) -> None:
    """The opt-in check of m_indptr's values (syncs with the device): which rule broke, if any."""
    check_offsets(m_indptr.tolist(), cum_m)
