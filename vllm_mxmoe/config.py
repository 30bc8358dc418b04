"""MxMoEConfig: vLLM's view of an MxMoE checkpoint, registered as quantization "mxmoe"."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from . import compat
from .format import CheckpointFormatError, MxMoEQuantConfig, parse_quant_config

NAME = "mxmoe"


class MxMoEConfig(QuantizationConfig):
    """Routes each layer to its method: mixed-precision experts, quantized
    non-expert linears listed in the checkpoint, everything else unquantized."""

    def __init__(self, checkpoint: MxMoEQuantConfig) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    def __repr__(self) -> str:
        return (
            f"MxMoEConfig(experts layers={len(self.checkpoint.experts)}, "
            f"linears={len(self.checkpoint.linears)}, schemes={sorted(self.checkpoint.used_scheme_names())})"
        )

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # Triton tensor-core kernels; the CPU path has no such limit

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MxMoEConfig":
        return cls(parse_quant_config(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == NAME:
            return NAME
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, compat.MoELayer):
            schemes = self.checkpoint.expert_schemes(prefix)
            if schemes is None:
                return compat.unquantized_moe_method(layer)
            from .moe import MxMoEFusedMoEMethod

            return MxMoEFusedMoEMethod(self.checkpoint, schemes, layer.moe_config, prefix)
        if isinstance(layer, compat.LinearBase):
            scheme = self._linear_scheme(prefix)
            if scheme is None:
                return compat.UnquantizedLinearMethod()
            from .linear import MxMoELinearMethod

            return MxMoELinearMethod(scheme, prefix)
        return None

    def _linear_scheme(self, prefix: str):
        """Scheme of a (possibly fused) linear; fused shards must agree."""
        if self.checkpoint.is_ignored(prefix):
            return None
        head, _, last = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(last) or _FUSED_LINEARS.get(last)
        names = [f"{head}.{s}" for s in shards] if shards else [prefix]
        found = {name: self.checkpoint.linears.get(name) for name in names}
        distinct = set(found.values())
        if len(distinct) > 1:
            raise CheckpointFormatError(
                f"quantization_config.linears: {prefix} is one fused layer in vLLM, "
                f"so its parts need one scheme; got {found}"
            )
        name = distinct.pop()
        return None if name is None else self.checkpoint.schemes[name]


# vLLM fuses these checkpoint linears; used when the model class declares no mapping.
_FUSED_LINEARS = {
    "gate_up_proj": ["gate_proj", "up_proj"],
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
}


def register_config() -> None:
    register_quantization_config(NAME)(MxMoEConfig)
