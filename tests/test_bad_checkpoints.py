"""Broken checkpoints must fail at load time with an error naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from helpers import VLLMFailed, vllm_generate
from offline.cli import quantize_main
from tiny_models import build_tiny_model

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    src = build_tiny_model("qwen3_moe", root / "fp")
    assert quantize_main(["--model", str(src), "--out", str(root / "q"), "--scheme", "w4g128"]) == 0
    return root / "q"


def _copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _edit_tensors(ckpt, edit):
    tensors = load_file(str(ckpt / SHARD))
    edit(tensors)
    save_file(tensors, str(ckpt / SHARD), metadata={"format": "pt"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: SHARD for name in tensors}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_config(ckpt, edit):
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _load_fails(ckpt, tmp_path) -> str:
    with pytest.raises(VLLMFailed) as info:
        vllm_generate(ckpt, [[1, 2, 3]], 2, tmp_path)
    return info.value.output


@pytest.mark.slow
def test_missing_tensor_is_named(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path)
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale"
    _edit_tensors(ckpt, lambda t: t.pop(name))
    out = _load_fails(ckpt, tmp_path)
    assert "missing" in out and name in out


@pytest.mark.slow
def test_wrong_shape_tensor_is_named(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path)
    name = "model.layers.0.mlp.experts.2.gate_proj.weight_packed"

    def widen(tensors):
        tensors[name] = tensors[name][:, :-1].contiguous()

    _edit_tensors(ckpt, widen)
    out = _load_fails(ckpt, tmp_path)
    assert f"tensor {name}: expected shape" in out


@pytest.mark.slow
def test_unknown_scheme_is_named(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path)

    def bad_scheme(cfg):
        qc = cfg["quantization_config"]
        qc["schemes"]["w5g64"] = {}
        qc["experts"]["model.layers.0.mlp.experts"]["down"][1] = "w5g64"

    _edit_config(ckpt, bad_scheme)
    out = _load_fails(ckpt, tmp_path)
    assert "unknown scheme 'w5g64'" in out


@pytest.mark.slow
def test_corrupt_quantization_config_is_named(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path)
    _edit_config(ckpt, lambda cfg: cfg["quantization_config"]["experts"]["model.layers.1.mlp.experts"].pop("down"))
    out = _load_fails(ckpt, tmp_path)
    assert "quantization_config.experts['model.layers.1.mlp.experts']: missing key 'down'" in out


@pytest.mark.slow
def test_config_that_is_not_json_fails(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path)
    (ckpt / "config.json").write_text('{"architectures": ["Qwen3MoeForCausalLM"], "quantization_config": {')
    out = _load_fails(ckpt, tmp_path)
    assert "config.json" in out
