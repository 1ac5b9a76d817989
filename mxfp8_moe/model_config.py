"""The grouped GEMMs of an MoE model, read from its Hugging Face config.json (for `mxfp8-moe prewarm`).

Each MoE layer runs two grouped GEMMs: gate_up (N = 2 * moe_intermediate / tp, K = hidden, with the
gated activation fused) and down (N = hidden, K = moe_intermediate / tp). Tensor parallelism splits
the intermediate dimension. Shared experts are dense MLPs, not grouped GEMMs, so they are ignored.
gpt-oss's experts ship in MXFP4 with biases and a clamped SwiGLU: its GEMMs are the W4A8 op's, with
that epilogue, on the [up; gate] halves that convert.from_gpt_oss makes of its interleaved rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .gemm.spec import DEFAULT_VARIANT, Variant

# Alternative spellings, the MoE-specific one first: Qwen2-MoE and DeepSeek-V3 also carry an
# `intermediate_size`, which is their dense MLP's width, not the experts'.
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "intermediate_size")  # Qwen-MoE, DeepSeek / Mixtral, gpt-oss
_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")  # Qwen-MoE / DeepSeek / Mixtral, gpt-oss
# The kernel variants of each model type's GEMMs (gate_up, down); others run MXFP8 with SwiGLU.
_VARIANTS = {"gpt_oss": (Variant("e2m1", "clamped_swiglu", bias=True), Variant("e2m1", bias=True))}
SLICE_MULTIPLE = 16  # a rank's share of the intermediate size is a GEMM's K and output width


@dataclasses.dataclass(frozen=True)
class GemmShape:
    """One grouped GEMM: `num_experts` weights of (n, k), n = 2 * output width when gated."""

    name: str
    n: int
    k: int
    gated: bool
    num_experts: int
    variant: Variant = DEFAULT_VARIANT  # weight format and epilogue

    def __str__(self) -> str:
        variant = f" {self.variant.label.lstrip('_').replace('_', ' ')}" if self.variant.label else ""
        return f"{self.name} N={self.n} K={self.k}{' gated' if self.gated else ''}{variant} ({self.num_experts} experts)"


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    hidden_size: int
    intermediate_size: int  # of one expert
    num_experts: int
    variants: tuple[Variant, Variant] = (DEFAULT_VARIANT, DEFAULT_VARIANT)  # gate_up's, down's
    top_k: int | None = None  # experts per token (num_experts_per_tok), where the config says
    renormalize: bool = True  # the top-k weights renormalized to sum to 1 (norm_topk_prob)

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> "MoeConfig":
        # Multimodal models (Qwen3-VL-MoE, Llama 4) keep the language model's keys under text_config.
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = config["text_config"]

        def first(keys: tuple[str, ...]) -> int | None:
            return next((config[key] for key in keys if config.get(key) is not None), None)

        values = {"hidden_size": config.get("hidden_size"), "intermediate_size": first(_INTERMEDIATE_KEYS),
                  "num_experts": first(_EXPERT_KEYS)}
        spellings = {"hidden_size": ("hidden_size",), "intermediate_size": _INTERMEDIATE_KEYS,
                     "num_experts": _EXPERT_KEYS}
        missing = [" or ".join(spellings[field]) for field, value in values.items() if value is None]
        if missing:
            raise ValueError(f"{source} is not an MoE config this reads: missing {'; '.join(missing)}")
        for field, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: {field} must be a positive integer, got {value!r}")
        top_k = config.get("num_experts_per_tok")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"{source}: num_experts_per_tok must be a positive integer, got {top_k!r}")
        return cls(**values, variants=_VARIANTS.get(config.get("model_type"), (DEFAULT_VARIANT, DEFAULT_VARIANT)),
                   top_k=top_k, renormalize=bool(config.get("norm_topk_prob", True)))

    @classmethod
    def load(cls, path: str | Path) -> "MoeConfig":
        """Read a config.json; OSError if it can't be read, ValueError if it isn't an MoE config."""
        try:
            config = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return cls.from_dict(config, source=str(path))

    def gemm_shapes(self, tp: int = 1) -> list[GemmShape]:
        """The gate_up and down GEMMs of one tensor-parallel rank."""
        if tp < 1:
            raise ValueError(f"tp must be a positive integer, got {tp}")
        local, rest = divmod(self.intermediate_size, tp)
        if rest or local % SLICE_MULTIPLE:
            # Each rank's slice is a GEMM's output width and K: a multiple of 16, so tp divides I / 16.
            units = self.intermediate_size // SLICE_MULTIPLE
            valid = [d for d in range(1, units + 1) if units % d == 0] if self.intermediate_size % SLICE_MULTIPLE == 0 else []
            what = "is too large to split" if tp > max(valid, default=0) else "does not split"
            raise ValueError(f"tp={tp} {what} the experts' intermediate size {self.intermediate_size} into slices "
                             f"that are multiples of {SLICE_MULTIPLE} (each rank would hold {self.intermediate_size / tp:g}); "
                             f"tp may be {', '.join(map(str, valid)) or 'nothing'}")
        gate_up, down = self.variants
        return [GemmShape("gate_up", 2 * local, self.hidden_size, True, self.num_experts, gate_up),
                GemmShape("down", self.hidden_size, local, False, self.num_experts, down)]
