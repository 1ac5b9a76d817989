"""The grouped-GEMM kernel families, one module each beside its template in kernels/."""

from .mma import MmaSpec
from .simt import SimtSpec
from .wgmma import WgmmaSpec

__all__ = ["MmaSpec", "SimtSpec", "WgmmaSpec"]
