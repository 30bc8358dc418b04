"""The speed runs' dummy checkpoints (benchmarks/speed_configs.py) are valid MxMoE configs."""

from __future__ import annotations

import json

import pytest

from benchmarks import speed_configs as sc
from vllm_mxmoe.config import MxMoEConfig
from vllm_mxmoe.format import parse_quant_config


@pytest.mark.parametrize("name", sorted(sc.CONFIGS))
def test_every_variant_parses_and_lin4_quantizes_attention(name, tmp_path):
    base = sc.CONFIGS[name]
    paths = sc.write_all(tmp_path, base)
    for variant, path in paths.items():
        cfg = json.loads((path / "config.json").read_text())
        if variant.startswith("mxmoe"):
            parse_quant_config(cfg["quantization_config"])
    lin4 = MxMoEConfig.from_config(json.loads((paths["mxmoe_mixed325_lin4"] / "config.json").read_text())["quantization_config"])
    last = base["num_hidden_layers"] - 1
    # vLLM's fused attention projections resolve to one scheme; MoE layers' experts keep their own map.
    qkv = "qkv_proj" if name != "deepseek-v2-lite" else "q_proj"
    assert lin4._linear_scheme(f"model.layers.{last}.self_attn.{qkv}").name == "w4g128"
    assert lin4._linear_scheme(f"model.layers.{last}.self_attn.o_proj").name == "w4g128"
    assert lin4._linear_scheme(f"model.layers.{last}.mlp.gate") is None  # the router stays unquantized
    plain = MxMoEConfig.from_config(json.loads((paths["mxmoe_mixed325"] / "config.json").read_text())["quantization_config"])
    assert plain._linear_scheme(f"model.layers.{last}.self_attn.o_proj") is None
