"""benchmarks/gpu_quantize_check.py on the CPU, with a shrunken Qwen1.5-MoE config: the random model it writes is one
the pipeline accepts, and the GPTQ timing covers every scheme and unit."""

from __future__ import annotations

import pytest

from benchmarks import gpu_quantize_check as gqc
from offline.model_spec import inspect_model
from tiny_models import REFERENCE_MOE

SMALL = dict(gqc.CONFIGS["qwen1.5-moe-a2.7b"], vocab_size=8192, hidden_size=128, intermediate_size=256,
             moe_intermediate_size=128, shared_expert_intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=4, num_experts=4, num_experts_per_tok=2)


@pytest.fixture
def small_config(monkeypatch):
    monkeypatch.setitem(gqc.CONFIGS, "small", SMALL)


def test_random_model_is_a_pipeline_input(small_config, tmp_path):
    out = gqc.random_model("small", tmp_path / "m", layers=2, tokenizer=REFERENCE_MOE)
    spec = inspect_model(out)
    assert spec.expert_layers == {f"model.layers.{i}.mlp.experts": 4 for i in range(2)}
    assert (spec.hidden_size, spec.expert_intermediate_size) == (128, 128)
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(SystemExit, match="unknown config"):
        gqc.random_model("nope", tmp_path / "x", layers=1, tokenizer=REFERENCE_MOE)


def test_gptq_time_covers_every_scheme_and_unit(small_config):
    seconds = gqc.time_gptq("small", ["w2", "w4g128"], tokens=64, repeats=1)
    assert sorted(seconds) == sorted(f"{u} {s}" for u in ("gate_up [256, 128]", "down [128, 128]") for s in ("w2", "w4g128"))
    assert all(v > 0 for v in seconds.values())
