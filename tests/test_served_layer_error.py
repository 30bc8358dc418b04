"""benchmarks/served_layer_error.py: served expert-GEMM launches split into layers, against the time model."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import served_layer_error as sle
from benchmarks import speed_configs as sc
from benchmarks.serving_profile import expert_gemm_launches, idle_gaps, kernel_events
from offline.perf_model import PerfModel

# Two MoE layers of four experts, top-2; layer 0 is dense (DeepSeek-style first_k_dense_replace).
BASE = dict(
    num_hidden_layers=3, first_k_dense_replace=1, num_experts=4, num_experts_per_tok=2, hidden_size=256,
    moe_intermediate_size=128,
)  # fmt: skip
SHAPES = {"gate_up": (256, 256), "down": (256, 128)}


def mixed_config() -> dict:
    return dict(BASE, quantization_config=sc.mxmoe_config(BASE, ["w4g128", "w2g128"], ["w3g128", "w4g128"]))


def trace(config: dict, batch: int, layer_us: list[list[float]]) -> dict:
    """A recorded trace whose step s, layer l launches take layer_us[s][l] (split 2:1 over gate_up, down)."""
    launches = [(name, us * share) for step in layer_us for us in step
                for name, share in (("_grouped_gemm_kernel", 2 / 3), ("_grouped_gemm_kernel", 1 / 3))]  # fmt: skip
    return dict(variant="tiny_mxmoe_mix", batch=batch, tokens=len(layer_us), config=config, launches=launches)


def test_launches_are_filtered_and_ordered_from_a_chrome_trace():
    events = [
        dict(cat="kernel", name="_grouped_gemm_kernel", ts=30, dur=4.0),
        dict(cat="kernel", name="flash_fwd", ts=10, dur=9.0),
        dict(cat="kernel", name="void marlin_moe_wna16::Marlin<1>", ts=20, dur=2.0),
        dict(cat="cpu_op", name="_grouped_gemm_kernel", ts=5, dur=1.0),
    ]
    launches = expert_gemm_launches(kernel_events({"traceEvents": events}))
    assert launches == [("void marlin_moe_wna16::Marlin<1>", 2.0), ("_grouped_gemm_kernel", 4.0)]


def test_idle_gaps_count_only_time_without_any_kernel():
    events = [dict(cat="kernel", name="a", ts=0, dur=10), dict(cat="kernel", name="b", ts=5, dur=10),
              dict(cat="cpu_op", name="host", ts=20, dur=100), dict(cat="kernel", name="c", ts=40, dur=5),
              dict(cat="kernel", name="d", ts=46, dur=4)]  # fmt: skip
    gaps = idle_gaps(kernel_events({"traceEvents": events}))
    assert (gaps["span_us"], gaps["busy_us"], gaps["idle_us"]) == (50, 24, 26)
    assert gaps["longest"][0] == dict(us=25, at_us=15, after="b", before="c")
    assert gaps["by_pair"] == [dict(us=25, count=1, after="b", before="c"), dict(us=1, count=1, after="c", before="d")]
    repeated = [dict(cat="kernel", name="ab"[i % 2], ts=10 * i, dur=4 + 3 * (i % 2)) for i in range(6)]
    pairs = idle_gaps(kernel_events({"traceEvents": repeated}))["by_pair"]  # a->b gaps 6 us, b->a gaps 3 us
    assert pairs == [dict(us=18, count=3, after="a", before="b"), dict(us=6, count=2, after="b", before="a")]
    assert idle_gaps(kernel_events({"traceEvents": []})) == {}


def test_layer_times_drop_the_first_step_and_follow_the_checkpoint_schemes():
    config = mixed_config()
    model = PerfModel()
    steps = [[100.0, 200.0], [10.0, 20.0], [30.0, 40.0]]
    # Recorded routing, batch 3: step rows per expert in layer 1 and layer 2.
    samples = [("model.layers.1.mlp.experts#7", torch.tensor([[0, 1], [0, 2], [0, 1]]), None),
               ("model.layers.2.mlp.experts#8", torch.tensor([[3, 2], [3, 2], [3, 1]]), None),
               ("model.layers.1.mlp.experts#7", torch.tensor([[0, 1], [1, 2], [1, 3]]), None)]  # fmt: skip
    counts = sle.routing_counts(samples, experts=4)
    assert counts[3]["model.layers.1.mlp.experts"] == [[3, 2, 1, 0], [1, 3, 1, 1]]
    rows = sle.analyse(trace(config, 3, steps), counts, model)
    assert [r["layer"] for r in rows] == [1, 2]
    assert [r["measured_us"] for r in rows] == pytest.approx([20.0, 30.0])  # steps 1 and 2 only
    schemes = sc.mxmoe_config(BASE, ["w4g128", "w2g128"], ["w3g128", "w4g128"])["experts"]
    gu, dn = schemes["model.layers.1.mlp.experts"]["gate_up"], schemes["model.layers.1.mlp.experts"]["down"]

    def layer1(rows_per_expert):
        return sum(model.time_us(gu[e], *SHAPES["gate_up"], r) + model.time_us(dn[e], *SHAPES["down"], r)
                   for e, r in enumerate(rows_per_expert) if r)  # fmt: skip

    assert rows[0]["routed_us"] == pytest.approx((layer1([3, 2, 1, 0]) + layer1([1, 3, 1, 1])) / 2)
    assert rows[0]["allocator_us"] == pytest.approx(layer1([2, 2.5, 1, 0.5]))
    with pytest.raises(ValueError, match="not whole decode steps of 2 MoE layers"):
        sle.analyse(
            dict(trace(config, 3, steps), launches=[("_grouped_gemm_kernel", 1.0)] * 5), counts, model
        )


def test_even_routing_without_a_recording_and_baselines_measured_only():
    assert sle.even_rows(6, 4) == [2, 2, 1, 1] and sum(sle.even_rows(2, 8)) == 2
    model = PerfModel()
    rows = sle.analyse(trace(mixed_config(), 1, [[1.0, 1.0], [2.0, 4.0]]), None, model)
    assert rows[0]["routing"] == "even" and rows[0]["routed_us"] > 0
    # allocator: every expert at 0.5 rows; routed: two experts at one row each
    assert rows[0]["allocator_us"] != rows[0]["routed_us"]
    marlin = sle.analyse(
        dict(trace(BASE, 1, [[1.0, 1.0], [2.0, 4.0]]), variant="tiny_gptq4_marlin"), None, model
    )
    assert [r["measured_us"] for r in marlin] == [2.0, 4.0] and "routed_us" not in marlin[0]


def test_cli_writes_table_counts_and_plot(tmp_path, monkeypatch):
    config = mixed_config()
    for tag, cfg in (("tiny_mxmoe_mix", config), ("tiny_mxmoe_w4", config), ("tiny_gptq4_marlin", BASE)):
        t = dict(trace(cfg, 2, [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]), variant=tag)
        (tmp_path / f"serving_kernels_{tag}_b2.json").write_text(json.dumps(t))
    torch.save([("model.layers.1.mlp.experts#1", torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2))],
               tmp_path / "routing_tiny_mxmoe_mix.pt")  # fmt: skip
    monkeypatch.setattr("sys.argv", ["served_layer_error.py", str(tmp_path)])
    sle.main()
    text = (tmp_path / "served_layer_error.md").read_text()
    assert "| tiny_mxmoe_mix | 2 | recorded | 2 x 2 | 8.5 |" in text
    assert "| tiny_mxmoe_w4 | 2 | recorded with tiny_mxmoe_mix | 2 x 2 | 8.5 |" in text  # borrowed routing
    assert "| tiny_gptq4_marlin | 2 |  | 2 x 2 | 8.5 | | |" in text
    assert json.loads((tmp_path / "routing_counts_tiny_mxmoe_mix.json").read_text())["2"]
    assert (tmp_path / "served_layer_error.png").stat().st_size > 1000
