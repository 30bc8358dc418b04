"""The allocator's time model against the expert GEMMs of layers served in vLLM's engine (issue 5).

perf_model_error.py compares the model with layers timed alone (kernel_check.py). This script compares it
with the same layers inside a served decode step: the GPU time of every expert-GEMM launch that
``serving_profile.py --trace`` recorded (CUDA graphs on), split into MoE layers and decode steps, against

* ``routed``: the sum over experts of ``PerfModel.time_us`` for gate_up and down at the rows each expert got
  in a recorded decode step of the same layer and batch (``serving_profile.py --record-routing``, eager
  engine, same prompts), averaged over the recorded steps;
* ``allocator``: what the allocator itself predicts, at each expert's mean rows per step (its activation
  frequency x the batch's tokens), as ``ilp.LayerProblem.from_perf_model`` does.

A variant without its own recording borrows one of another variant of the same model config (the router and
attention are the same bf16 dummy weights; rows note which), and with none at all both use even routing
(batch x top-k / experts rows each). Random weights do not always route evenly: DeepSeek-V2-Lite's dummy
router sends nearly every token to the same few experts. Variants without an mxmoe config (Marlin, bf16) get
their measured times only, as the baseline. The first step of each profiled batch (its prompts' last token,
prefix-cached) is left out.

    python benchmarks/served_layer_error.py RUN_DIR [--perf-table FILE] [--out DIR]

RUN_DIR holds serving_kernels_<tag>_b<batch>.json and, per mxmoe tag, routing_<tag>.pt (or the
routing_counts_<tag>.json this script writes from it). Writes served_layer_error.{md,json,png}.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.perf_model_error import summary  # noqa: E402
from benchmarks.speed_configs import moe_layers, num_experts  # noqa: E402
from offline.ilp import unit_shapes  # noqa: E402
from offline.perf_model import PerfModel  # noqa: E402
from vllm_mxmoe.format import parse_quant_config  # noqa: E402

DEFAULT_TABLE = Path(__file__).resolve().parent / "results" / "perf_table_h200.json"
GEMMS_PER_LAYER = 2  # gate_up and down: one launch each (split-K partials are summed by other kernels)


def layer_step_times(launches: list, layers: int) -> np.ndarray:
    """[steps, layers] GPU us of each MoE layer's two expert GEMMs, from launches in order."""
    per_step = GEMMS_PER_LAYER * layers
    if not launches or len(launches) % per_step:
        raise ValueError(f"{len(launches)} expert-GEMM launches are not whole decode steps of {layers} MoE "
                         f"layers x {GEMMS_PER_LAYER} GEMMs")  # fmt: skip
    us = np.array([d for _, d in launches], dtype=np.float64)
    return us.reshape(-1, layers, GEMMS_PER_LAYER).sum(axis=2)


def routing_counts(samples: list, experts: int) -> dict[int, dict[str, list[list[int]]]]:
    """batch -> layer prefix -> per recorded step, rows per expert; from --record-routing samples."""
    counts: dict[int, dict[str, list[list[int]]]] = defaultdict(lambda: defaultdict(list))
    for key, ids, _ in samples:
        prefix = key.split("#")[0]
        rows = np.bincount(np.asarray(ids).reshape(-1), minlength=experts)
        counts[int(ids.shape[0])][prefix].append(rows.tolist())
    return {b: dict(v) for b, v in counts.items()}


def recorded_tags(run_dir: Path) -> set[str]:
    names = [p.name for p in run_dir.glob("routing_*")]
    return {re.sub(r"^routing_(counts_)?(.+?)\.(json|pt)$", r"\2", n) for n in names}


def counts_for(run_dir: Path, tag: str, experts: int) -> tuple[dict | None, str | None]:
    """(counts, tag they were recorded with): the variant's own recording, else one of its model config's."""
    config_name = tag.split("_", 1)[0]
    tags = recorded_tags(run_dir)
    source = (
        tag if tag in tags else next((t for t in sorted(tags) if t.split("_", 1)[0] == config_name), None)
    )
    return (load_counts(run_dir, source, experts), source) if source else (None, None)


@functools.cache  # every batch size's trace of a model reads the same recording
def load_counts(run_dir: Path, tag: str, experts: int) -> dict[int, dict[str, list[list[int]]]] | None:
    cached = run_dir / f"routing_counts_{tag}.json"
    if cached.exists():
        return {int(b): v for b, v in json.loads(cached.read_text()).items()}
    recorded = run_dir / f"routing_{tag}.pt"
    if not recorded.exists():
        return None
    import torch

    counts = routing_counts(torch.load(recorded), experts)
    cached.write_text(json.dumps(counts))
    return counts


def even_rows(slots: int, experts: int) -> list[int]:
    """One step's rows per expert when ``slots`` routed rows spread as evenly as whole rows can."""
    base, extra = divmod(slots, experts)
    return [base + (e < extra) for e in range(experts)]


def predicted_layer_us(model: PerfModel, gate_up: list[str], down: list[str], shapes: dict, rows) -> float:
    """Sum over experts with rows of the predicted gate_up and down times (rows may be fractional)."""
    total = 0.0
    for e, r in enumerate(rows):
        if r > 0:
            total += model.time_us(gate_up[e], *shapes["gate_up"], float(r))
            total += model.time_us(down[e], *shapes["down"], float(r))
    return total


def analyse(
    trace: dict, counts: dict | None, model: PerfModel, routing_label: str = "recorded"
) -> list[dict]:
    """One row per MoE layer of one profiled (variant, batch)."""
    config = trace["config"]
    layers = moe_layers(config)
    experts, topk, batch = num_experts(config), config["num_experts_per_tok"], trace["batch"]
    times = layer_step_times(trace["launches"], len(layers))[1:]  # step 0: the prompts' last token
    quant = config.get("quantization_config") or {}
    mx = parse_quant_config(quant) if quant.get("quant_method") == "mxmoe" else None
    shapes = unit_shapes(config["hidden_size"], config["moe_intermediate_size"])
    rows = []
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        row = dict(variant=trace["variant"], batch=batch, layer=layer, steps=len(times),
                   measured_us=float(times[:, i].mean()))  # fmt: skip
        if mx is not None:
            schemes = mx.expert_schemes(prefix)
            steps = (counts or {}).get(batch, {}).get(prefix)
            if steps:
                row["routing"] = routing_label
                per_step = [
                    predicted_layer_us(model, schemes.gate_up, schemes.down, shapes, s) for s in steps
                ]
                row["routed_us"] = float(np.mean(per_step))
                mean_rows = np.mean(np.asarray(steps, dtype=np.float64), axis=0)
            else:
                row["routing"] = "even"
                mean_rows = np.full(experts, batch * topk / experts)
                row["routed_us"] = predicted_layer_us(model, schemes.gate_up, schemes.down, shapes,
                                                      even_rows(batch * topk, experts))  # fmt: skip
            row["allocator_us"] = predicted_layer_us(model, schemes.gate_up, schemes.down, shapes, mean_rows)
        rows.append(row)
    return rows


def write_outputs(rows: list[dict], out: Path) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["batch"])].append(r)
    lines = ["| variant | batch | routing | layers x steps | measured us/layer | routed model us | allocator model us |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (variant, batch), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        measured = np.mean([r["measured_us"] for r in g])
        routing = g[0].get("routing", "")
        cells = [f"| {variant} | {batch} | {routing} | {len(g)} x {g[0]['steps']} | {measured:.1f} |"]
        for key in ("routed_us", "allocator_us"):
            if key in g[0]:
                pred = np.mean([r[key] for r in g])
                cells.append(f" {pred:.1f} ({pred / measured:.2f}x; per layer {summary(g, key)}) |")
            else:
                cells.append(" |")
        lines.append("".join(cells))
    modelled = [r for r in rows if "routed_us" in r]
    if modelled:
        lines += ["", (f"all modelled layers: routed {summary(modelled, 'routed_us')}; "
                       f"allocator {summary(modelled, 'allocator_us')}")]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "served_layer_error.md").write_text("\n".join(lines) + "\n")
    (out / "served_layer_error.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    if modelled:
        _plot(modelled, out / "served_layer_error.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    # colour: model config; marker: batch size (the variants of one config and batch lie close together)
    configs = sorted({r["variant"].split("_", 1)[0] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    for r_config, colour in zip(configs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        for batch, marker in zip(batches, "os^vD<>ph*"):
            g = [r for r in rows if r["batch"] == batch and r["variant"].split("_", 1)[0] == r_config]
            if g:
                ax.scatter([r["measured_us"] for r in g], [r["allocator_us"] for r in g], s=12, marker=marker,
                           color=colour, label=f"{r_config} b{batch}")  # fmt: skip
    values = [r[k] for r in rows for k in ("measured_us", "allocator_us")]
    lo, hi = min(values) / 1.3, max(values) * 1.3
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="measured in vLLM's engine: gate_up + down GEMMs per layer (us)",
           ylabel="allocator's prediction (us)", title="Time model vs served MoE layers (one point per layer)")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="folder with serving_kernels_*.json (and routing_<tag>.pt)")
    p.add_argument("--perf-table", type=Path, default=DEFAULT_TABLE)
    p.add_argument("--out", type=Path, help="where to write (default: RUN_DIR)")
    args = p.parse_args()
    model = PerfModel.from_json(args.perf_table)
    traces = sorted(args.run_dir.glob("serving_kernels_*_b*.json"))
    if not traces:
        raise SystemExit(f"no serving_kernels_<tag>_b<batch>.json in {args.run_dir}")
    rows = []
    for path in traces:
        trace = json.loads(path.read_text())
        tag = re.match(r"serving_kernels_(.+)_b\d+\.json", path.name).group(1)
        counts, source = counts_for(args.run_dir, tag, num_experts(trace["config"]))
        label = "recorded" if source == tag else f"recorded with {source}"
        rows += analyse(trace, counts, model, label)
    write_outputs(rows, args.out or args.run_dir)


if __name__ == "__main__":
    main()
