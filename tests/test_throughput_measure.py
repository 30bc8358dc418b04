"""gpu_serving_check.measure_throughput: which prompts each timed run sees, and what it reports.

The engine is a recorder here (the real one runs on the GPU: RESULTS.md section 1); what is checked is the
benchmark's own logic: in "cached" mode the timed runs reuse the warm-up's prompts (vLLM's prefix cache then
serves them), in "fresh" mode every timed run gets prompts no earlier run saw, and the median run is reported.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from benchmarks import gpu_serving_check as gsc


class RecordingEngine:
    """Stands in for vllm.LLM.generate: records the prompts, returns max_tokens tokens per prompt."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[tuple[int, ...]], int]] = []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(([tuple(p["prompt_token_ids"]) for p in prompts], params.max_tokens))
        out = types.SimpleNamespace(token_ids=[0] * params.max_tokens)
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


@pytest.mark.parametrize("fresh", [False, True])
def test_prompts_per_timed_run(tmp_path, monkeypatch, capsys, fresh):
    monkeypatch.setattr(gsc, "OUT", tmp_path)
    engine = RecordingEngine()
    res = gsc.measure_throughput(engine, "t", [2, 3], np.random.default_rng(0), repeats=3, fresh_prompts=fresh)
    assert sorted(res) == [2, 3] and all(v > 0 for v in res.values())
    for bs, calls in ((2, engine.calls[:4]), (3, engine.calls[4:])):
        (warm, warm_tokens), *timed = calls
        assert warm_tokens == 8 and len(warm) == bs and all(len(p) == 128 for p in warm)
        assert [t for _, t in timed] == [128] * 3
        seen = [set(prompts) for prompts, _ in calls]
        if fresh:  # no timed run shares a prompt with the warm-up or another run
            assert all(not (seen[i] & seen[j]) for i in range(4) for j in range(i))
        else:
            assert all(s == seen[0] for s in seen)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT")]
    assert len(lines) == 2 and all("runs=[" in ln for ln in lines)
    assert all(("prefill=fresh" in ln) == fresh for ln in lines)
    assert (tmp_path / f"throughput_t{'_fresh' if fresh else ''}.json").exists()


def test_prefill_steps_time_one_token_of_new_prompts(tmp_path, monkeypatch, capsys):
    """measure_prefill_steps: a warm-up, then ``repeats`` runs of one token out, each on prompts no earlier run saw."""
    monkeypatch.setattr(gsc, "OUT", tmp_path)
    engine = RecordingEngine()
    res = gsc.measure_prefill_steps(engine, "t", [4], np.random.default_rng(0), repeats=5)
    assert list(res) == [4] and res[4] > 0
    assert [tokens for _, tokens in engine.calls] == [1] * 6
    seen = [set(prompts) for prompts, _ in engine.calls]
    assert all(len(s) == 4 for s in seen) and all(not (seen[i] & seen[j]) for i in range(6) for j in range(i))
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT")]
    assert "prefill_step bs=4 median_ms=" in line and (tmp_path / "prefill_step_t.json").exists()


@pytest.mark.parametrize("variant, expected", [
    ("gptq4_marlin", ("gptq4_marlin", {})),
    ("mxmoe_mixed325@MXMOE_DEQUANT=2", ("mxmoe_mixed325", {"MXMOE_DEQUANT": "2"})),
    ("mxmoe_w4g128@A=1@B=x=y", ("mxmoe_w4g128", {"A": "1", "B": "x=y"})),
])
def test_variant_environment(variant, expected):
    assert gsc.split_env(variant) == expected


def test_variant_environment_names_a_bad_setting():
    with pytest.raises(ValueError, match="NAME=VALUE, got 'FOO'"):
        gsc.split_env("mxmoe_mixed325@FOO")
