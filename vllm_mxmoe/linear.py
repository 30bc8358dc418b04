"""Linear method for quantized non-expert linears (shared experts, dense MLPs).

One scheme per vLLM layer (fused gate_up / qkv shards share it). Parameters
carry vLLM's classic ``output_dim`` / ``input_dim`` attributes so vLLM's own
column/row-parallel loaders shard them: packing runs along the input dim in
whole 32-element chunks, so a row-parallel slice of words is a slice of inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.utils import set_weight_attrs

from . import compat
from .format import (
    WEIGHT_PACKED,
    WEIGHT_ZERO,
    CheckpointFormatError,
    QuantizedWeight,
    dequantize,
    tensor_specs,
)
from .kernels.reference import fake_quant_fp8_per_token
from .schemes import Scheme


class MxMoELinearMethod(compat.LinearMethodBase):
    def __init__(self, scheme: Scheme, prefix: str):
        self.scheme = scheme
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        n, k = sum(output_partition_sizes), input_size_per_partition
        try:
            self.scheme.check_shape(n, k)
        except ValueError as e:
            raise ValueError(f"{self.prefix}: {e} (per-rank input size)") from None
        per_channel = self.scheme.group_size is None
        layer.mxmoe_loaded = {}  # suffix -> shard ids loaded (fused layers load per shard)
        for suffix, (shape, dtype) in tensor_specs(self.scheme, n, k).items():
            param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            attrs = {"output_dim": 0}
            if suffix == WEIGHT_PACKED or not per_channel:
                attrs["input_dim"] = 1  # a per-channel scale spans all inputs: not sharded
            set_weight_attrs(param, attrs)
            param.weight_loader = _recording_loader(layer, suffix, extra_weight_attrs["weight_loader"])
            layer.register_parameter(suffix, param)
        layer.mxmoe_in_features = k
        layer.mxmoe_num_shards = len(output_partition_sizes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if compat.is_dummy_load():
            layer.weight_scale.data.uniform_(1e-3, 2e-3)
            if hasattr(layer, WEIGHT_ZERO):
                layer.weight_zero_point.data.fill_(1.0)
            return
        expected = tensor_specs(self.scheme, 1, layer.mxmoe_in_features)
        loaded = {suffix: len(shards) for suffix, shards in layer.mxmoe_loaded.items()}
        missing = [s for s in expected if loaded.get(s, 0) < layer.mxmoe_num_shards]
        if missing:
            raise CheckpointFormatError(
                f"checkpoint is missing tensor(s) {', '.join(f'{self.prefix}.{s}' for s in missing)} "
                f"(scheme {self.scheme.name})"
            )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        qw = QuantizedWeight(
            self.scheme, layer.weight_packed, layer.weight_scale, getattr(layer, WEIGHT_ZERO, None)
        )
        w = dequantize(qw, layer.mxmoe_in_features, x.dtype)
        if self.scheme.act == "fp8":
            x = fake_quant_fp8_per_token(x).to(x.dtype)
        return F.linear(x, w, bias)


def _recording_loader(layer: torch.nn.Module, suffix: str, vllm_loader):
    """vLLM's loader, noting which tensors arrived (for the completeness check)."""

    def load(param, loaded_weight, *args, **kwargs):
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        layer.mxmoe_loaded.setdefault(suffix, set()).add(shard)
        return vllm_loader(param, loaded_weight, *args, **kwargs)

    return load

