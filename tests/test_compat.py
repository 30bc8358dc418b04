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
