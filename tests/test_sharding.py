"""Which TP degrees a checkpoint's expert schemes shard at, and the quantize-time warning."""

from __future__ import annotations

import json

from tiny_models import build_tiny_model

from offline.cli import quantize_main
from vllm_mxmoe.format import ExpertLayerSchemes
from vllm_mxmoe.schemes import parse_scheme
from vllm_mxmoe.sharding import describe_problems, down_shard_reason, max_tp_degree, shard_problems

SCHEMES = {n: parse_scheme(n) for n in ("w4g128", "w4g64", "w3g32", "w8", "w2g128")}


def test_down_reason_follows_the_per_rank_intermediate_size():
    assert down_shard_reason(SCHEMES["w4g128"], 2048, 768, 2) is None  # 384 = 3 x 128
    assert down_shard_reason(SCHEMES["w4g128"], 2048, 768, 4) is not None  # 192
    assert "does not divide in_features=192" in down_shard_reason(SCHEMES["w4g128"], 2048, 768, 4)
    assert down_shard_reason(SCHEMES["w8"], 2048, 768, 8) is None  # per channel: 96 = 3 x 32
    assert "not divisible by 5" in down_shard_reason(SCHEMES["w8"], 2048, 768, 5)


def test_problems_name_each_block_and_the_limit_is_the_weakest_scheme():
    experts = {"model.layers.0.mlp.experts": ExpertLayerSchemes(["w4g128"] * 3, ["w4g64", "w2g128", "w8"])}
    problems = shard_problems(experts, SCHEMES, 384, 256, [2, 4])
    assert [(p.block, p.tp_size) for p in problems] == [("model.layers.0.mlp.experts.1.down", 4)]
    assert max_tp_degree(experts, SCHEMES, 384, 256) == 2
    (line,) = describe_problems(problems)
    assert "--tensor-parallel-size 4" in line and "experts.1.down (w2g128)" in line
    assert "--enable-expert-parallel" in line


def test_quantize_warns_about_a_tp_degree_the_schemes_cannot_serve(tmp_path, capsys):
    src = build_tiny_model("qwen2_moe", tmp_path / "fp")
    (tmp_path / "map.json").write_text(json.dumps({"gate_up": "w4g128", "down": ["w4g64", "w4g128"] * 4}))
    args = ["--model", str(src), "--scheme-map", str(tmp_path / "map.json"), "--tp-sizes", "2"]
    assert quantize_main(args + ["--out", str(tmp_path / "q")]) == 0
    err = capsys.readouterr().err
    assert "warning: 8 expert down block(s) cannot be served with --tensor-parallel-size 2" in err
    assert ".experts.1.down (w4g128)" in err

    (tmp_path / "ok.json").write_text(json.dumps({"gate_up": "w4g128", "down": "w4g64"}))
    ok = ["--model", str(src), "--scheme-map", str(tmp_path / "ok.json"), "--tp-sizes", "2"]
    assert quantize_main(ok + ["--out", str(tmp_path / "q2")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert "experts shard up to --tensor-parallel-size 2" in captured.out


def test_bad_tp_sizes_are_a_usage_error(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        quantize_main(["--model", "x", "--out", str(tmp_path), "--scheme", "w4", "--tp-sizes", "two"])
    assert "expected comma-separated integers, got 'two'" in capsys.readouterr().err
