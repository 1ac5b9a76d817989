"""mxfp8_moe: MXFP8 grouped GEMM for Mixture-of-Experts inference.

The main entry point is `moe_gemm_mxfp8_nt_groupwise`, call-compatible with FlashInfer's function
of the same name; `quantize_activations` / `quantize_weights` produce its inputs.
"""

import logging as _logging

from . import envs as _envs
from .version import __version__

if _envs.invalid("LOG_LEVEL"):
    import warnings as _warnings

    _warnings.warn(f"MXFP8_MOE_LOG_LEVEL={_envs.log_level()!r}: {_envs.invalid('LOG_LEVEL')}", stacklevel=1)
elif _envs.log_level():
    _logger = _logging.getLogger("mxfp8_moe")
    _logger.setLevel(_envs.log_level())
    if not _logger.handlers:
        _handler = _logging.StreamHandler()
        _handler.setFormatter(_logging.Formatter("[mxfp8_moe %(levelname)s] %(message)s"))
        _logger.addHandler(_handler)

from .api import moe_gemm_mxfp8_mxfp4_nt_groupwise, moe_gemm_mxfp8_nt_groupwise  # noqa: E402
from .epilogue import GatedActivation  # noqa: E402
from .mxfp4 import dequantize_weights_mxfp4, quantize_weights_mxfp4  # noqa: E402
from .convert import from_bf16, from_fp8_block_scaled, from_gpt_oss, from_ocp_mx  # noqa: E402
from .memo import clear_memos  # noqa: E402
from .layout import (  # noqa: E402
    float_to_ue8m0,
    k_align,
    k_granularity_of,
    m_padded,
    num_k_blocks,
    pack_ue8m0,
    scale_row_starts,
    to_k_major,
    to_mn_major_a_scale,
    to_mn_major_b_scale,
    token_scale_rows,
    ue8m0_to_float,
    unpack_ue8m0,
)
from .quantize import (  # noqa: E402
    dequantize_activations,
    dequantize_weights,
    quantize_activations,
    quantize_weights,
)
from .reference import reference_moe_gemm  # noqa: E402
from .experts import expert_gemms  # noqa: E402
from .moe_layer import MXFP8MoE, QuantizedExperts, moe_forward, reference_moe_forward  # noqa: E402
from .gpt_oss import GptOssMoE, MXFP4Experts, gpt_oss_moe_forward, reference_gpt_oss_forward  # noqa: E402
from .ops import grouped_gemm, quantize_activations_op  # noqa: E402

__all__ = [
    "__version__",
    "moe_gemm_mxfp8_nt_groupwise",
    "moe_gemm_mxfp8_mxfp4_nt_groupwise",
    "quantize_weights_mxfp4",
    "dequantize_weights_mxfp4",
    "GatedActivation",
    "quantize_activations",
    "quantize_weights",
    "dequantize_activations",
    "dequantize_weights",
    "reference_moe_gemm",
    "from_bf16",
    "from_fp8_block_scaled",
    "from_ocp_mx",
    "from_gpt_oss",
    "expert_gemms",
    "MXFP8MoE",
    "QuantizedExperts",
    "moe_forward",
    "reference_moe_forward",
    "GptOssMoE",
    "MXFP4Experts",
    "gpt_oss_moe_forward",
    "reference_gpt_oss_forward",
    "grouped_gemm",
    "quantize_activations_op",
    "num_k_blocks",
    "k_align",
    "m_padded",
    "scale_row_starts",
    "token_scale_rows",
    "pack_ue8m0",
    "unpack_ue8m0",
    "ue8m0_to_float",
    "float_to_ue8m0",
    "to_mn_major_a_scale",
    "to_mn_major_b_scale",
    "to_k_major",
    "k_granularity_of",
    "clear_memos",
]
