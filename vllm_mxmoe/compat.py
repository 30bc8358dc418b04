"""The few places where the supported vLLM versions differ.

vLLM 0.25 (the CUDA machine) names the MoE layer ``FusedMoE``; 0.32+ splits it
into a runner and ``RoutedExperts``, which owns the weights and calls
``quant_method.apply``. Everything version-specific the plugin needs goes
through this module.
"""

from __future__ import annotations

import torch

try:  # vLLM >= 0.32
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts as MoELayer
except ImportError:  # vLLM 0.25
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE as MoELayer  # type: ignore

from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod

try:
    from vllm.config import get_current_vllm_config_or_none
except ImportError:  # older names
    from vllm.config import get_current_vllm_config as get_current_vllm_config_or_none  # type: ignore

__all__ = [
    "MoELayer",
    "FusedMoEMethodBase",
    "LinearBase",
    "LinearMethodBase",
    "UnquantizedLinearMethod",
    "is_dummy_load",
    "max_batched_tokens",
    "moe_top_k",
    "moe_tp_rank_size",
    "global_to_local_expert",
    "local_expert_global_ids",
    "unquantized_moe_method",
]


def is_dummy_load() -> bool:
    """True when vLLM fills weights randomly instead of reading the checkpoint."""
    cfg = get_current_vllm_config_or_none()
    fmt = getattr(getattr(cfg, "load_config", None), "load_format", None)
    return str(getattr(fmt, "value", fmt)) == "dummy"


def max_batched_tokens(default: int = 8192) -> int:
    """Most tokens one forward can carry (the scheduler's budget); ``default`` outside an engine."""
    cfg = get_current_vllm_config_or_none()
    value = getattr(getattr(cfg, "scheduler_config", None), "max_num_batched_tokens", None)
    return int(value) if value else default


def moe_top_k(layer: torch.nn.Module) -> int:
    cfg = getattr(layer, "moe_config", None) or getattr(layer, "moe", None)
    top_k = getattr(cfg, "experts_per_token", None) or getattr(layer, "top_k", None)
    if not top_k:
        raise RuntimeError(f"cannot find the top-k of MoE layer {type(layer).__name__}")
    return int(top_k)


def moe_tp_rank_size(layer: torch.nn.Module) -> tuple[int, int]:
    """(rank, size) over which this layer's intermediate dim is sharded."""
    cfg = getattr(layer, "moe_config", None) or getattr(layer, "moe", None)
    rank = getattr(cfg, "tp_rank", None)
    size = getattr(cfg, "tp_size", None)
    if rank is None:  # vLLM 0.25 keeps them on the layer
        rank, size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    return int(rank), int(size)


def expert_map(layer: torch.nn.Module) -> torch.Tensor | None:
    """Global -> local expert id map (-1: not on this rank), None without EP."""
    return getattr(layer, "expert_map", None)


def global_to_local_expert(layer: torch.nn.Module, global_id: int) -> int:
    return int(layer._map_global_expert_id_to_local_expert_id(global_id))


def local_expert_global_ids(layer: torch.nn.Module, num_local: int) -> list[int]:
    """The global expert id held in each local slot."""
    emap = expert_map(layer)
    if emap is None:
        return list(range(num_local))
    ids = [-1] * num_local
    for g, local in enumerate(emap.tolist()):
        if 0 <= local < num_local:
            ids[local] = g
    if -1 in ids:
        raise RuntimeError(f"expert map {emap.tolist()} leaves a local expert slot empty")
    return ids


def unquantized_moe_method(layer: torch.nn.Module):
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    return UnquantizedFusedMoEMethod(layer.moe_config)
