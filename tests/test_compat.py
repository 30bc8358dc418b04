"""vLLM-version glue the GPU path relies on (vllm_mxmoe/compat.py), checked with stand-in layers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_mxmoe import compat


def test_top_k_from_the_moe_config_or_the_layer():
    assert compat.moe_top_k(SimpleNamespace(moe_config=SimpleNamespace(experts_per_token=8))) == 8
    assert compat.moe_top_k(SimpleNamespace(moe_config=None, top_k=6)) == 6  # vLLM 0.25 keeps it on the layer
    with pytest.raises(RuntimeError, match="top-k"):
        compat.moe_top_k(SimpleNamespace())


def test_max_batched_tokens_outside_an_engine_is_the_default():
    assert compat.max_batched_tokens(default=1234) == 1234


def test_moe_method_reuses_its_gemm_weights_until_a_tensor_moves():
    """An eager forward must not rebuild the layer's ExpertGemmWeights (and what they derive from the scheme
    mix) per call; a moved or replaced tensor gets fresh ones."""
    import torch

    from vllm_mxmoe.moe import MxMoEFusedMoEMethod
    from vllm_mxmoe.schemes import parse_scheme

    method = object.__new__(MxMoEFusedMoEMethod)  # the method's vLLM base class needs an engine's MoE config
    method._gemm_weights_cache = None
    w4, w2 = parse_scheme("w4g128"), parse_scheme("w2g128")
    layer = SimpleNamespace(mxmoe_schemes=([w4, w2, w4], [w2, w2, w4]), mxmoe_dims=(128, 64))
    for name in ("w13", "w2"):
        for part in ("weight_packed", "weight_scale", "weight_zero_point"):
            setattr(layer, f"{name}_{part}", torch.nn.Parameter(torch.zeros(8), requires_grad=False))
        setattr(layer, f"{name}_mxmoe_meta", torch.zeros(3, 6, dtype=torch.int64))
    w13, w2_weights = method.gemm_weights(layer)
    assert (w13.n, w13.k, w2_weights.n, w2_weights.k) == (128, 128, 128, 64)
    assert w13.distinct_schemes == (w4, w2) and w2_weights.distinct_schemes == (w2, w4)
    again = method.gemm_weights(layer)
    assert again[0] is w13 and again[1] is w2_weights
    layer.w2_weight_scale = torch.nn.Parameter(torch.ones(16), requires_grad=False)  # e.g. reloaded elsewhere
    fresh = method.gemm_weights(layer)
    assert fresh[0] is not w13 and fresh[1].scales.data_ptr() == layer.w2_weight_scale.data_ptr()
