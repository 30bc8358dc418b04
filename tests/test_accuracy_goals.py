"""benchmarks/accuracy.py's goal check pairs each MxMoE row with the uniform row treated the same way."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import describe, goals  # noqa: E402
from offline.scheme_map import uniform_map  # noqa: E402


def _row(name, options, ppl):
    return {"name": name, **describe(options), "perplexity": ppl}


def test_goals_compare_with_the_equally_treated_uniform_row():
    uniform = {"scheme_map": uniform_map("w2g128")}
    mx = {"schemes": ("w2", "w2g128", "w3g128"), "wbits": 2.25, "r": 1.0}
    rows = [
        _row("bf16", None, 10.0),
        _row("gptq-w2g128", uniform, 14.0),  # +4
        _row("gptq-w2g128-damp0.1", {**uniform, "percdamp": 0.1}, 12.0),  # +2
        _row("mxmoe-2.25-r1", mx, 11.9),  # +1.9: under half of +4
        _row("mxmoe-2.25-r1-damp0.1", {**mx, "percdamp": 0.1}, 11.1),  # +1.1: over half of +2
        _row("seed1-mxmoe-2.25-r1", {**mx, "seed": 1}, 11.0),  # no seed-1 uniform row: not judged
    ]
    lines = goals({r["name"]: r for r in rows})
    judged = {line.split(":")[1].split()[0]: line for line in lines if "increase" in line}
    assert set(judged) == {"mxmoe-2.25-r1", "mxmoe-2.25-r1-damp0.1"}
    assert "vs gptq-w2g128 " in judged["mxmoe-2.25-r1"] and judged["mxmoe-2.25-r1"].endswith("MET")
    assert "vs gptq-w2g128-damp0.1 " in judged["mxmoe-2.25-r1-damp0.1"]
    assert judged["mxmoe-2.25-r1-damp0.1"].endswith("NOT met") and "55.0%" in judged["mxmoe-2.25-r1-damp0.1"]


def test_rows_without_a_recorded_seed_take_it_from_their_name():
    uniform = {"scheme_map": uniform_map("w3g128"), "seed": 1}
    mx = {"schemes": ("w2g128", "w3g128", "w4g128"), "wbits": 3.25, "r": 1.0, "seed": 1}
    rows = [
        _row("bf16", None, 10.0),
        _row("seed1-gptq-w3g128", uniform, 11.0),
        _row("seed1-mxmoe-3.25-r1", mx, 10.4),
    ]
    for r in rows:
        r.pop("seed")  # as in results written before the field existed
    lines = goals({r["name"]: r for r in rows})
    assert any(line.startswith("3.25 bits: seed1-mxmoe-3.25-r1") and line.endswith("MET") for line in lines)
