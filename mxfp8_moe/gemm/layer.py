"""The MoE layer's two grouped GEMMs in one launch: gate_up with its gated activation, the
intermediate's MXFP8 quantization and down, for decode sizes, where each GEMM alone is a
launch-sized amount of work.

Two kernels, one per family: on sm_90a the wgmma kernel twice on one pipeline
(kernels/wgmma_moe_layer.cuh; LayerSpec, which streams down's weights while gate_up runs), and on
sm_120a / sm_121a the mma.sync kernel twice (kernels/mma_moe_layer.cuh; MmaLayerSpec, whose gate_up
quantizes the intermediate in its epilogue; on sm_90a also in the emulated scale mode, to test it).
Both for MXFP8 weights and FlashInfer's SwiGLU (the kernel templates take the other variants; no
caller offers them yet); the heuristic (heuristics.layer_spec) decides when one serves a call.
They hand token tiles from one phase to the other through counters that every launch leaves
zeroed, as it found them (layer_counters).
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading

import torch

from ..jit.build import build
from ..jit.runtime import LoadedKernel
from ..memo import BoundedMemo
from ..layout import k_align, m_padded
from .device import capturing
from .launch import LaunchArguments
from .families.mma import MmaSpec
from .families.wgmma import WgmmaSpec, WgmmaTensorMaps, wgmma_maps, weight_and_output_maps
from .spec import NO_EPILOGUE_ARGUMENTS, STAGE_K_BYTES, GroupedGemmParams
from .tensor_maps import rows_map

ENTRY = "mxfp8_moe_layer"
# Expert rows (T * top_k) up to which the fused kernel serves a layer, and so the token tiles its
# counters must cover (a token tile holds at least one row).
LAYER_MAX_ROWS = 512
# Pipeline stages at most (the barrier region holds ten): the deeper the pipeline, the more of
# down's weights stream before its first rows are published.
LAYER_MAX_STAGES = 8


class MoeLayerParams(ctypes.Structure):
    """Mirror of mxfp8_moe::MoeLayerParams (kernels/wgmma_moe_layer.cuh), passed by value."""

    _fields_ = [("gate_up", GroupedGemmParams), ("down", GroupedGemmParams), ("counters", ctypes.c_void_p)]


class MoeLayerTensorMaps(ctypes.Structure):
    """Mirror of mxfp8_moe::MoeLayerTensorMaps, passed by value."""

    _fields_ = [("gate_up", WgmmaTensorMaps), ("down", WgmmaTensorMaps)]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The fused layer for experts with hidden size `hidden` and intermediate size `inter`: w13 is
    (E, 2 inter, hidden) [up; gate], w2 (E, hidden, inter), both at `k_granularity`."""

    arch: str
    hidden: int
    inter: int
    k_granularity: int
    block_t: int
    stages: int

    threads = 384  # WgmmaGemm::kThreads

    @property
    def gate_up(self) -> WgmmaSpec:
        return WgmmaSpec(self.arch, 2 * self.inter, self.hidden, self.k_granularity, True, block_t=self.block_t,
                         stages=self.stages)

    @property
    def down(self) -> WgmmaSpec:
        return WgmmaSpec(self.arch, self.hidden, self.inter, self.k_granularity, False, block_t=self.block_t,
                         stages=self.stages)

    @property
    def label(self) -> str:
        return f"layer_h{self.hidden}_i{self.inter}_g{self.k_granularity}_bt{self.block_t}_s{self.stages}"

    def source(self) -> str:
        # One block per SM in the launch bounds: setmaxnreg needs a register cap at entry.
        return ('#include "wgmma_moe_layer.cuh"\n'
                f"using Layer = mxfp8_moe::WgmmaMoeLayer<{self.gate_up.cpp_type('kLayerGateUp')},\n"
                f"                                       {self.down.cpp_type('kLayerDown')}>;\n"
                f'extern "C" __global__ void __launch_bounds__(Layer::kThreads, 1) {ENTRY}(\n'
                "    const __grid_constant__ mxfp8_moe::MoeLayerParams params,\n"
                "    const __grid_constant__ mxfp8_moe::MoeLayerTensorMaps maps) {\n"
                "    Layer::run(params, maps);\n}\n")

    def stage_bytes(self) -> int:
        """A stage of either phase (WgmmaGemm::kStageBytes in a layer): the GEMM's, then the bf16
        token rows the down phase quantizes."""
        return self.gate_up.stage_bytes() + self.block_t * STAGE_K_BYTES * 2

    def fixed_shared_bytes(self, num_experts: int) -> int:
        """Everything but the stages: the phases share the scheduler and barriers; the epilogue
        space is the larger of theirs."""
        return max(spec.dynamic_shared_bytes(num_experts) - spec.pipeline_bytes() for spec in (self.gate_up, self.down))

    def dynamic_shared_bytes(self, num_experts: int) -> int:
        """WgmmaMoeLayer::shared_bytes."""
        return self.fixed_shared_bytes(num_experts) + self.stages * self.stage_bytes()


class _FusedLayerKernel:
    """What both fused layer kernels do per call: refuse more rows than the counters cover, take the
    launch's counters, and launch with arguments built once per set of tensors, on a persistent grid
    of one CTA per SM, all resident (the phases' waits need it)."""

    def __init__(self, spec: LayerSpec | MmaLayerSpec, device_index: int, entry: str):
        self.spec = spec
        cubin, _ = build(spec.source(), arch=spec.arch, label=spec.label)
        # The kernel waits for the grid before it before its first global access (griddepcontrol).
        self.kernel = LoadedKernel(cubin, entry, device_index, spec.threads, programmatic=True)
        self.device_index = device_index
        self._arguments = BoundedMemo(256)

    def _launch(self, tensors: tuple[torch.Tensor, ...], stream: int) -> None:
        """tensors: a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, the intermediate's tensors
        (intermediate()), out."""
        a, a_scale, _, w13, w13_scale, _, w2_scale = tensors[:7]
        if a.shape[0] > LAYER_MAX_ROWS:  # the counters cover this many token tiles
            raise ValueError(f"the fused layer kernel takes at most {LAYER_MAX_ROWS} rows (a.size(0)), got {a.shape[0]}")
        counters = layer_counters(self.device_index, stream)
        # Beside the addresses, what the arguments depend on: the shapes and strides behind the
        # tensor maps and scale strides, and the intermediate's last tensor's shape (mma.sync: h_scale's
        # row count).
        key = (tuple(t.data_ptr() for t in tensors), a.shape[0], w13.shape[0], a_scale.shape, a_scale.stride(),
               w13_scale.stride(), w2_scale.stride(), tensors[-2].shape, counters.data_ptr())
        arguments = self._arguments.get(key)
        if arguments is None:
            shared = self.spec.dynamic_shared_bytes(w13.shape[0])
            grid = (self.kernel.resident_blocks(shared), 1, 1)
            arguments = self._arguments.put(key, LaunchArguments(grid, shared, self._parameters(tensors, counters)))
        self.kernel.launch(arguments.grid, arguments.shared, stream, arguments.address)


class LayerKernel(_FusedLayerKernel):
    """A compiled and loaded LayerSpec on one device."""

    def __init__(self, spec: LayerSpec, device_index: int):
        super().__init__(spec, device_index, ENTRY)

    def intermediate(self, cum_m: int, num_experts: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """What a call needs between its phases: h, the activated gate_up rows in bf16."""
        return (torch.empty((cum_m, self.spec.inter), dtype=torch.bfloat16, device=device),)

    def __call__(self, a: torch.Tensor, a_scale: torch.Tensor, m_indptr: torch.Tensor, w13: torch.Tensor,
                 w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, h: torch.Tensor, out: torch.Tensor,
                 stream: int) -> None:
        """out = the down GEMM of (the gate_up GEMM of a, activated, in h), for validated tensors:
        a (cum_m, hidden) e4m3 with its MN-major a_scale, h (cum_m, inter) and out (cum_m, hidden) bf16."""
        self._launch((a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, h, out), stream)

    def _parameters(self, tensors, counters) -> tuple[ctypes.Structure, ...]:
        a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, h, out = tensors
        params = MoeLayerParams(
            GroupedGemmParams.of(a, w13, a_scale, w13_scale, m_indptr, h, NO_EPILOGUE_ARGUMENTS),
            # The down phase reads h by its tokens map (bf16, quantized in the kernel): no a, no a_scale.
            GroupedGemmParams(b=w2.data_ptr(), b_scale=w2_scale.data_ptr(), m_indptr=m_indptr.data_ptr(),
                              out=out.data_ptr(), b_scale_stride_expert=w2_scale.stride(0),
                              b_scale_stride_row=w2_scale.stride(1), b_scale_stride_word=w2_scale.stride(2),
                              cum_m=a.shape[0], num_experts=w2.shape[0]),
            counters.data_ptr())
        maps = MoeLayerTensorMaps()
        maps.gate_up.set(**wgmma_maps(a, w13, a_scale, w13_scale, h, block_t=self.spec.block_t))
        maps.down.set(tokens=rows_map(h.data_ptr(), h.shape[0], h.shape[1], self.spec.block_t),
                      **weight_and_output_maps(w2, w2_scale, out, block_t=self.spec.block_t))
        return params, maps


class LayerLink(ctypes.Structure):
    """Mirror of mxfp8_moe::LayerLink (kernels/mma_grouped_gemm.cuh)."""

    _fields_ = [("counters", ctypes.c_void_p), ("rows", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("m_padded", ctypes.c_int32), ("publishers", ctypes.c_int32)]


class MmaLayerParams(ctypes.Structure):
    """Mirror of mxfp8_moe::MmaLayerParams (kernels/mma_moe_layer.cuh), passed by value."""

    _fields_ = [("gate_up", GroupedGemmParams), ("down", GroupedGemmParams), ("link", LayerLink)]


MMA_ENTRY = "mxfp8_moe_mma_layer"


@dataclasses.dataclass(frozen=True)
class MmaLayerSpec:
    """The fused layer on the mma.sync kernel: its two phases' MmaSpecs (same warps and token tile;
    gate_up's columns a multiple of the k granularity, so its epilogue holds whole scale blocks)."""

    gate_up: MmaSpec
    down: MmaSpec

    def __post_init__(self):
        g, d = self.gate_up, self.down
        if (g.threads, g.block_t, g.arch, g.scale_mode) != (d.threads, d.block_t, d.arch, d.scale_mode):
            raise ValueError(f"the phases must share warps, token tile, arch and scale mode: {g.label} / {d.label}")
        if not g.gated or g.block_n % g.k_granularity or 32 % (g.block_n // 8):
            raise ValueError(f"gate_up's tile must be gated and cover whole scale blocks: {g.label}")

    @property
    def arch(self) -> str:
        return self.gate_up.arch

    @property
    def threads(self) -> int:
        return self.gate_up.threads

    @property
    def label(self) -> str:
        return f"mmalayer_{self.gate_up.label}_{self.down.label.split('_', 1)[1]}"

    def source(self) -> str:
        return ('#include "mma_moe_layer.cuh"\n'
                f"using Layer = mxfp8_moe::MmaMoeLayer<{self.gate_up.cpp_type('kLayerGateUp')},\n"
                f"                                     {self.down.cpp_type('kLayerDown')}>;\n"
                f'extern "C" __global__ void __launch_bounds__(Layer::kThreads) {MMA_ENTRY}(\n'
                "    const __grid_constant__ mxfp8_moe::MmaLayerParams params) {\n"
                "    Layer::run(params);\n}\n")

    def dynamic_shared_bytes(self, num_experts: int) -> int:
        """MmaMoeLayer::shared_bytes: the scheduler, then the larger of the phases' pipelines."""
        return max(self.gate_up.dynamic_shared_bytes(num_experts), self.down.dynamic_shared_bytes(num_experts))


class MmaLayerKernel(_FusedLayerKernel):
    """A compiled and loaded MmaLayerSpec on one device."""

    def __init__(self, spec: MmaLayerSpec, device_index: int):
        super().__init__(spec, device_index, MMA_ENTRY)

    def intermediate(self, cum_m: int, num_experts: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """What a call needs between its phases: the quantized intermediate, (cum_m, I) e4m3 and the
        (k_align, m_padded) int32 storage of its MN-major scales (gate_up writes the scale bytes of
        real rows' blocks; down reads whole words and uses only those bytes)."""
        inter, k_granularity = self.spec.down.k, self.spec.down.k_granularity
        return (torch.empty((cum_m, inter), dtype=torch.float8_e4m3fn, device=device),
                torch.empty((k_align(inter, k_granularity), m_padded(cum_m, num_experts)), dtype=torch.int32,
                            device=device))

    def __call__(self, a: torch.Tensor, a_scale: torch.Tensor, m_indptr: torch.Tensor, w13: torch.Tensor,
                 w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, h: torch.Tensor,
                 h_scale: torch.Tensor, out: torch.Tensor, stream: int) -> None:
        """out = the down GEMM of (the gate_up GEMM of a, activated and quantized into h (cum_m, inter)
        e4m3 and h_scale, the (k_align, m_padded) int32 storage of its MN-major scales)."""
        self._launch((a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, h, h_scale, out), stream)

    def _parameters(self, tensors, counters) -> tuple[ctypes.Structure, ...]:
        a, a_scale, m_indptr, w13, w13_scale, w2, w2_scale, h, h_scale, out = tensors
        scale_rows = h_scale.shape[1]  # m_padded
        h_scale_mn = h_scale.t()  # (m_padded, k_align) as the GEMM reads a_scale: strides (1, m_padded)
        params = MmaLayerParams(
            GroupedGemmParams.of(a, w13, a_scale, w13_scale, m_indptr, out, NO_EPILOGUE_ARGUMENTS),
            GroupedGemmParams.of(h, w2, h_scale_mn, w2_scale, m_indptr, out, NO_EPILOGUE_ARGUMENTS),
            LayerLink(counters.data_ptr(), h.data_ptr(), h_scale.data_ptr(), scale_rows,
                      -(-self.spec.gate_up.n_out // self.spec.gate_up.block_n)))
        return (params,)


_kernels: dict[tuple[int, LayerSpec | MmaLayerSpec], LayerKernel | MmaLayerKernel] = {}
_counters: dict[tuple[int, int], torch.Tensor] = {}
_lock = threading.Lock()


def get_layer_kernel(spec: LayerSpec | MmaLayerSpec, device_index: int) -> LayerKernel | MmaLayerKernel:
    """The loaded kernel of `spec` on a device, compiled (or read from the cache) on first use."""
    key = (device_index, spec)
    kernel = _kernels.get(key)
    if kernel is None:
        make = LayerKernel if isinstance(spec, LayerSpec) else MmaLayerKernel
        with _lock:
            kernel = _kernels.get(key) or _kernels.setdefault(key, make(spec, device_index))
    return kernel


def layer_counters(device_index: int, stream: int) -> torch.Tensor:
    """The counters of a launch: an exit count and one per token tile, zero on entry (each launch
    zeroes them again as it ends). Eager launches share one set per stream, so that layers running at
    the same time on two streams never share them. A launch captured into a CUDA graph gets a set
    of its own, zeroed by the graph itself: a set allocated during a capture belongs to that graph's
    memory pool and is zeroed only in its replays, and graphs may replay in any order or at once."""
    if capturing(device_index):
        return torch.zeros(1 + LAYER_MAX_ROWS, dtype=torch.int32, device=f"cuda:{device_index}")
    key = (device_index, stream)
    counters = _counters.get(key)
    if counters is None:
        with _lock:
            counters = _counters.get(key)
            if counters is None:
                counters = _counters[key] = torch.zeros(1 + LAYER_MAX_ROWS, dtype=torch.int32,
                                                        device=f"cuda:{device_index}")
    return counters
