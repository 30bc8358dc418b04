"""benchmarks/perf_model_error.py: the allocator's per-layer time prediction, as it adds it up."""

from __future__ import annotations

import json

import pytest

from benchmarks.perf_model_error import compare, main, predicted_gemm_us
from offline.perf_model import PerfModel

CASE = dict(
    shape="s", assign="mixed", tokens=3, variant="table", gemm1_nk=[256, 128], gemm2_nk=[128, 128],
    gate_up_schemes=["w4g128", "w2g128", "w8"], down_schemes=["w4g128", "w4g128", "w3g128"],
    expert_tokens=[2, 0, 1], gemm1_us=10.0, gemm2_us=5.0,
)  # fmt: skip


def test_prediction_sums_routed_blocks_only():
    model = PerfModel()
    expected = (
        model.time_us("w4g128", 256, 128, 2) + model.time_us("w4g128", 128, 128, 2)
        + model.time_us("w8", 256, 128, 1) + model.time_us("w3g128", 128, 128, 1)
    )  # fmt: skip
    assert predicted_gemm_us(model, CASE) == pytest.approx(expected)
    (row,) = compare([CASE, dict(CASE, expert_tokens=None) | {"gemm1_us": float("nan")}], model, model)
    assert row["measured_us"] == 15.0 and row["table_us"] == pytest.approx(expected)


def test_cli_writes_table_and_plot(tmp_path, monkeypatch):
    table = {"device": "test", "entries": [
        {"scheme": "w4g128", "n": 256, "k": 128, "tokens": t, "us": 2.0 * t} for t in (1, 2, 4)]}  # fmt: skip
    (tmp_path / "perf_table_test.json").write_text(json.dumps(table))
    (tmp_path / "kernel_check.json").write_text(json.dumps({"timing": [CASE]}))
    monkeypatch.setattr("sys.argv", ["perf_model_error.py", str(tmp_path)])
    main()
    text = (tmp_path / "perf_model_error.md").read_text()
    assert "| s | mixed | 3 | 15.0 |" in text
    assert (tmp_path / "perf_model_error.png").stat().st_size > 1000
