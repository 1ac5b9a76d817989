"""Argument checks shared by the helpers that take scales and offsets (quantizers, reference,
checkpoint conversion, expert parallelism): ValueError("<name> must be <expected>, got <got>").

The GEMM entry point has its own, faster checks with FlashInfer's exception types
(validation.py).
"""

from __future__ import annotations

import torch

K_GRANULARITIES = (32, 128)  # elements of K per UE8M0 scale: OCP MXFP8 and DeepGEMM-style


def check_arg(ok: bool, name: str, expected: str, got: object) -> None:
    """Raise ValueError("<name> must be <expected>, got <got>") unless ok."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {got}")


def check_k_granularity(k_granularity: int) -> int:
    """Return k_granularity if it is 32 (OCP MXFP8) or 128 (DeepGEMM-style); else raise ValueError."""
    check_arg(
        k_granularity in K_GRANULARITIES, "k_granularity", f"one of {K_GRANULARITIES}", repr(k_granularity)
    )
    return k_granularity


def check_m_indptr(m_indptr: torch.Tensor) -> int:
    """Check that m_indptr is a 1-D int32 tensor of E + 1 >= 2 offsets and return E (values unread)."""
    check_arg(m_indptr.dtype == torch.int32, "m_indptr.dtype", "torch.int32", m_indptr.dtype)
    shape = tuple(m_indptr.shape)
    check_arg(len(shape) == 1 and shape[0] >= 2, "m_indptr.shape", "(E + 1,) with E >= 1", shape)
    return shape[0] - 1


def check_offsets(offsets: list[int], cum_m: int, rows: str = "cum_m = a.size(0)", name: str = "m_indptr") -> None:
    """The rules of m_indptr's values (read on the host): 0 first, non-decreasing, cum_m last (`rows`
    names where cum_m comes from); the message says which one broke, and where."""
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
    for e, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        if hi < lo:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{e}] = {lo} > {name}[{e + 1}] = {hi}")
    if offsets[-1] != cum_m:
        raise ValueError(f"{name}[-1] must equal {rows} = {cum_m}, got {offsets[-1]}")


def check_scale(name: str, scale: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Check that a packed scale tensor is int32 of the given logical shape (any strides)."""
    check_arg(scale.dtype == torch.int32, f"{name}.dtype", "torch.int32", scale.dtype)
    check_arg(tuple(scale.shape) == shape, f"{name}.shape", str(shape), tuple(scale.shape))
