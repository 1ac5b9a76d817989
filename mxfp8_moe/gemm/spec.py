"""A kernel specialization: every compile-time choice of one grouped-GEMM binary, and what its
launch needs.

Each kernel family is one module of gemm/families/ (simt, mma, wgmma) defining a frozen subclass of
KernelSpec beside its CUDA template in kernels/. A spec generates its instantiation source (one line
of template arguments, so the compiler sees every shape and tile as a constant), names itself, and
knows its launch: threads, dynamic shared memory, grid and the by-value kernel arguments. Nothing
outside the family's module branches on which family a spec is.
"""

from __future__ import annotations

import abc
import ctypes
import dataclasses
from typing import ClassVar

import torch

from ..arith import round_up

ENTRY = "mxfp8_moe_grouped_gemm"  # every family's __global__ function
SCALE_MODES = ("software", "native", "emulated")
STAGE_K_BYTES = 128  # K bytes per pipeline stage of the tensor-core kernels (kBlockK): one 128-byte row


class GroupedGemmParams(ctypes.Structure):
    """Mirror of mxfp8_moe::GroupedGemmParams (kernels/problem.cuh), passed by value."""

    _fields_ = [
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("a_scale", ctypes.c_void_p),
        ("b_scale", ctypes.c_void_p),
        ("m_indptr", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("a_scale_stride_row", ctypes.c_int64),
        ("a_scale_stride_word", ctypes.c_int64),
        ("b_scale_stride_expert", ctypes.c_int64),
        ("b_scale_stride_row", ctypes.c_int64),
        ("b_scale_stride_word", ctypes.c_int64),
        ("cum_m", ctypes.c_int32),
        ("num_experts", ctypes.c_int32),
        ("bias", ctypes.c_void_p),
        ("alpha", ctypes.c_float),
        ("limit", ctypes.c_float),
    ]

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
           m_indptr: torch.Tensor, out: torch.Tensor, epilogue: "EpilogueArguments") -> "GroupedGemmParams":
        return cls(a.data_ptr(), b.data_ptr(), a_scale.data_ptr(), b_scale.data_ptr(), m_indptr.data_ptr(),
                   out.data_ptr(), *a_scale.stride(), *b_scale.stride(), a.shape[0], b.shape[0],
                   None if epilogue.bias is None else epilogue.bias.data_ptr(), epilogue.alpha, epilogue.limit)


@dataclasses.dataclass(frozen=True)
class EpilogueArguments:
    """What a launch passes to the epilogue beside the spec: the bias tensor (for specs built with a
    bias) and the clamped SwiGLU's constants. `key`: what a launch's arguments depend on."""

    bias: torch.Tensor | None = None
    alpha: float = 0.0
    limit: float = 0.0
    key: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "key", (None if self.bias is None else self.bias.data_ptr(), self.alpha, self.limit))


NO_EPILOGUE_ARGUMENTS = EpilogueArguments()


@dataclasses.dataclass(frozen=True)
class Variant:
    """A kernel's compile-time choices beside its shape and tile (kernels/problem.cuh: Variant)."""

    weights: str = "e4m3"  # or "e2m1": MXFP4, two codes per byte
    activation: str = "swiglu"  # gated: or "clamped_swiglu"
    interleaved: bool = False  # gated: gate rows even, up rows odd (else [up; gate] halves)
    bias: bool = False  # a per-expert bias before the activation
    _hash: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # Part of the plan memo's key on every call: hashed once, not field by field each time.
        object.__setattr__(self, "_hash", hash((self.weights, self.activation, self.interleaved, self.bias)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def label(self) -> str:
        """The label's suffix: empty for the default (MXFP8, SwiGLU on halves, no bias)."""
        return "".join(name for name, chosen in (("_w4", self.weights == "e2m1"), ("_il", self.interleaved),
                                                 ("_clamped", self.activation == "clamped_swiglu"),
                                                 ("_bias", self.bias)) if chosen)

    @property
    def cpp_type(self) -> str:
        """The kernel templates' Variant type."""
        weights = "mxfp8_moe::kE2M1" if self.weights == "e2m1" else "mxfp8_moe::kE4M3"
        activation = "mxfp8_moe::kClampedSwiGLU" if self.activation == "clamped_swiglu" else "mxfp8_moe::kSwiGLU"
        return f"mxfp8_moe::Variant<{weights}, {activation}, {str(self.interleaved).lower()}, {str(self.bias).lower()}>"

    @property
    def template_argument(self) -> str:
        """The kernel template's last argument, empty for the default, which the templates default to."""
        return "" if self == DEFAULT_VARIANT else f", {self.cpp_type}"


DEFAULT_VARIANT = Variant()


def entry_source(header: str, gemm: str, *, tensor_maps: str | None = None, min_blocks: int | None = None,
                 cluster: int = 1) -> str:
    """The source of ENTRY: `using Gemm = <gemm>;` from kernels/<header>, and a __global__ function
    bounded by Gemm::kThreads (and `min_blocks` per SM), launched in clusters of `cluster` blocks,
    that takes the parameters by value (and the family's `tensor_maps` struct) and runs Gemm::run on them."""
    parameters, arguments = "const __grid_constant__ mxfp8_moe::GroupedGemmParams params", "params"
    if tensor_maps is not None:
        parameters, arguments = f"{parameters}, const __grid_constant__ {tensor_maps} maps", f"{arguments}, maps"
    bounds = "Gemm::kThreads" if min_blocks is None else f"Gemm::kThreads, {min_blocks}"
    cluster_dims = f"__cluster_dims__({cluster}, 1, 1) " if cluster > 1 else ""
    return (f'#include "{header}"\n'
            f"using Gemm = {gemm};\n"
            f'extern "C" __global__ void {cluster_dims}__launch_bounds__({bounds}) {ENTRY}({parameters}) {{\n'
            f"    Gemm::run({arguments});\n}}\n")


def scheduler_shared_bytes(num_experts: int) -> int:
    """Dynamic shared memory of the persistent kernels' TileScheduler (TileScheduler::shared_bytes):
    the clamped offsets and the tile starts, one int each per expert + 1, in 128-byte lines."""
    return round_up(2 * 4 * (num_experts + 1), 128)


@dataclasses.dataclass(frozen=True)
class KernelSpec(abc.ABC):
    """What every family's spec holds and answers; subclasses add their tile parameters."""

    arch: str  # NVRTC target, e.g. "sm_120a"
    n: int  # rows of B per expert (2 * output width when gated)
    k: int
    k_granularity: int
    gated: bool

    # Keyword-only, so each family's tile fields follow the shape positionally.
    variant: Variant = dataclasses.field(default=DEFAULT_VARIANT, kw_only=True)

    family: ClassVar[str]  # the label's prefix: "simt", "mma", "wgmma"
    # Whether the kernel waits for the grid before it on the stream before touching global memory
    # (kernels/ptx/grid_dependency.cuh), so that its launch may overlap that grid's end (sm_90+).
    waits_for_prior_grid: ClassVar[bool] = False

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.gated else self.n

    @property
    def problem_label(self) -> str:
        """The label's first part: the family, the problem's compile-time shape and the variant."""
        return (f"{self.family}_n{self.n}_k{self.k}_g{self.k_granularity}{'_gated' if self.gated else ''}"
                f"{self.variant.label}")

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """A readable name of the specialization (logs, dumps, the cache listing)."""

    @property
    @abc.abstractmethod
    def threads(self) -> int:
        """Threads per block."""

    @property
    def cluster(self) -> int:
        """Blocks per thread-block cluster (the kernel's __cluster_dims__), 1 without clusters."""
        return 1

    @abc.abstractmethod
    def source(self) -> str:
        """The CUDA source that instantiates the kernel as ENTRY."""

    @abc.abstractmethod
    def dynamic_shared_bytes(self, num_experts: int) -> int:
        """Dynamic shared memory of a launch over `num_experts` experts."""

    @abc.abstractmethod
    def grid(self, num_experts: int, cum_m: int, resident_blocks: int) -> tuple[int, int, int]:
        """The launch grid; `resident_blocks`: how many blocks fit on the device at once (in whole
        clusters)."""

    def arguments(self, a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  m_indptr: torch.Tensor, out: torch.Tensor, epilogue: EpilogueArguments) -> tuple[ctypes.Structure, ...]:
        """The kernel's by-value parameters for one set of (validated) tensors."""
        return (GroupedGemmParams.of(a, b, a_scale, b_scale, m_indptr, out, epilogue),)
