"""Linear method for quantized non-expert linears (attention, shared experts, dense MLPs).

One scheme per vLLM layer (fused gate_up / qkv shards share it). Parameters
carry vLLM's classic ``output_dim`` / ``input_dim`` attributes so vLLM's own
column/row-parallel loaders shard them: packing runs along the input dim in
whole 32-element chunks, so a row-parallel slice of words is a slice of inputs.

On CUDA the loaded tensors move into the MoE kernels' one-block layout
(kernels/layout.py) and the forward is the grouped kernel with rows in order
(kernels/dense_linear.py); elsewhere the weight is dequantized per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.logger import init_logger
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
from .kernels.layout import ExpertGemmWeights, fill_dummy_scale_and_zero, make_dummy_weights_sane
from .kernels.reference import fake_quant_fp8_per_token
from .schemes import Scheme

logger = init_logger(f"vllm.{__name__}")


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
        layer.mxmoe_act_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        dummy = compat.is_dummy_load()
        if not dummy:
            self._check_complete(layer)
        if layer.weight_packed.is_cuda:
            self._to_kernel_layout(layer, dummy)
        elif dummy:
            zero = getattr(layer, WEIGHT_ZERO, None)
            fill_dummy_scale_and_zero(self.scheme, layer.weight_scale.data, None if zero is None else zero.data)

    def _check_complete(self, layer: torch.nn.Module) -> None:
        expected = tensor_specs(self.scheme, 1, layer.mxmoe_in_features)
        loaded = {suffix: len(shards) for suffix, shards in layer.mxmoe_loaded.items()}
        missing = [s for s in expected if loaded.get(s, 0) < layer.mxmoe_num_shards]
        if missing:
            raise CheckpointFormatError(
                f"checkpoint is missing tensor(s) {', '.join(f'{self.prefix}.{s}' for s in missing)} "
                f"(scheme {self.scheme.name})"
            )

    def _to_kernel_layout(self, layer: torch.nn.Module, dummy: bool) -> None:
        """Move the loaded tensors into a one-block ExpertGemmWeights (the kernels' order); the
        format-v1 parameters are dropped, so the weight is held once."""
        packed = layer.weight_packed.data
        gemm = ExpertGemmWeights.allocate([self.scheme], packed.shape[0], layer.mxmoe_in_features, packed.device)
        if dummy:
            make_dummy_weights_sane(gemm)
        else:
            zero = getattr(layer, WEIGHT_ZERO, None)
            gemm.store_block(0, QuantizedWeight(self.scheme, packed, layer.weight_scale.data,
                                                None if zero is None else zero.data))
        for suffix in tensor_specs(self.scheme, 1, layer.mxmoe_in_features):
            delattr(layer, suffix)
        layer.mxmoe_gemm_key = f"{self.prefix}#{id(layer)}"
        _LINEARS[layer.mxmoe_gemm_key] = gemm
        from .kernels import warmup

        if warmup.enabled():
            launches, seconds = warmup.warm_up_linear(gemm, compat.max_batched_tokens(), layer.mxmoe_act_dtype,
                                                      has_bias=getattr(layer, "bias", None) is not None)
            if launches:
                logger.info("mxmoe %s: compiled %d kernel variants in %.1f s", self.prefix, launches, seconds)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        key = getattr(layer, "mxmoe_gemm_key", None)
        if key is not None:
            # An opaque op, like the fused-MoE one: torch.compile must not trace the launch code.
            return torch.ops.mxmoe.linear(x, bias, key)
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


# One-block kernel weights by layer key, for the custom op (arguments: tensors and strings).
_LINEARS: dict[str, ExpertGemmWeights] = {}


@torch.library.custom_op("mxmoe::linear", mutates_args=())
def _linear_op(x: torch.Tensor, bias: torch.Tensor | None, layer_key: str) -> torch.Tensor:
    from .kernels.dense_linear import quantized_linear

    return quantized_linear(x, _LINEARS[layer_key], bias)


@_linear_op.register_fake
def _(x, bias, layer_key):
    return x.new_empty(*x.shape[:-1], _LINEARS[layer_key].n)
