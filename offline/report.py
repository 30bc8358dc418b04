"""report.json and plots of one quantization run.

Everything about bits is recomputed here from ``Scheme.storage_bits`` (scale and
zero-point overhead included), independently of the allocator's own count.
Plots (PNG) need matplotlib; without it only report.json is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_mxmoe.schemes import parse_scheme

from .ilp import UNITS, ParetoPoint, unit_shapes


@dataclass
class LayerResult:
    """What the pipeline decided for one MoE layer, and what it predicted."""

    prefix: str
    gate_up: list[str]  # scheme per expert
    down: list[str]
    counts: list[int]  # top-k selections per expert in calibration
    num_tokens: int  # calibration tokens through the layer
    tokens: list[float]  # expected tokens per expert at --batch-tokens (the time model's input)
    schemes: list[str] = field(default_factory=list)  # candidates, the last axis of loss/time
    loss: np.ndarray | None = None  # Δ [E, 2, S]; None when the allocation was given, not chosen
    time_us: np.ndarray | None = None  # predicted µs [E, 2, S]
    r: float | None = None  # trade-off the layer was solved at
    front: list[ParetoPoint] | None = None
    loss_weight: float = 1.0  # loss = measured Δ x this (the layer's Fisher weight, or 1)


def _unit_bits(scheme_name: str, shape: tuple[int, int]) -> int:
    return parse_scheme(scheme_name).storage_bits(*shape)


def _layer_entry(layer: LayerResult, hidden: int, inter: int) -> dict[str, Any]:
    shapes = unit_shapes(hidden, inter)
    experts, total_bits = [], 0
    freq = [c / max(layer.num_tokens, 1) for c in layer.counts]
    for e in range(len(layer.gate_up)):
        entry: dict[str, Any] = {"expert": e, "activation_frequency": freq[e], "tokens": layer.tokens[e]}
        for u, unit in enumerate(UNITS):
            name = layer.gate_up[e] if unit == "gate_up" else layer.down[e]
            bits = _unit_bits(name, shapes[unit])
            total_bits += bits
            unit_entry: dict[str, Any] = {
                "scheme": name,
                "bits_per_weight": bits / (shapes[unit][0] * shapes[unit][1]),
                "storage_bits": bits,
            }
            if layer.loss is not None:
                s = layer.schemes.index(name)
                unit_entry["predicted_loss"] = float(layer.loss[e, u, s])
                unit_entry["predicted_time_us"] = float(layer.time_us[e, u, s])
            entry[unit] = unit_entry
        experts.append(entry)
    elements = len(layer.gate_up) * 3 * hidden * inter
    out: dict[str, Any] = {
        "prefix": layer.prefix,
        "avg_bits": total_bits / elements,
        "storage_bits": total_bits,
        "weight_elements": elements,
        "r": layer.r,
        "loss_weight": layer.loss_weight,
        "experts": experts,
    }
    if layer.loss is not None:
        out["predicted_loss"] = sum(e[u]["predicted_loss"] for e in experts for u in UNITS)
        out["predicted_time_us"] = sum(e[u]["predicted_time_us"] for e in experts for u in UNITS)
    if layer.front is not None:
        out["pareto_front"] = [
            {"r": p.r, "loss": p.loss, "time_us": p.time_us, "avg_bits": p.allocation.avg_bits}
            for p in layer.front
        ]
    return out


def _model_front(layers: list[dict]) -> list[dict] | None:
    """Model-level front: per r, the sums over layers (every layer solved at that r)."""
    fronts = [layer.get("pareto_front") for layer in layers]
    if not fronts or any(f is None for f in fronts):
        return None
    points = []
    for i, first in enumerate(fronts[0]):
        points.append(
            {
                "r": first["r"],
                "loss": sum(f[i]["loss"] for f in fronts),
                "time_us": sum(f[i]["time_us"] for f in fronts),
            }
        )
    return points


def build_report(
    layers: list[LayerResult],
    hidden: int,
    inter: int,
    header: dict[str, Any],
    model_front: list[ParetoPoint] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict; ``header`` (model, options, stages ...) goes first.

    ``model_front``: the Pareto front of a model-wide allocation (one ILP over all
    layers); without it the model front is the per-r sum of the layers' fronts.
    """
    entries = [_layer_entry(layer, hidden, inter) for layer in layers]
    total_bits = sum(e["storage_bits"] for e in entries)
    elements = sum(e["weight_elements"] for e in entries)
    report: dict[str, Any] = dict(header)
    report["achieved_avg_bits"] = total_bits / elements
    report["expert_storage_bits"] = total_bits
    report["expert_weight_elements"] = elements
    if all("predicted_loss" in e for e in entries):
        report["predicted_loss"] = sum(e["predicted_loss"] for e in entries)
        report["predicted_time_us"] = sum(e["predicted_time_us"] for e in entries)
    if model_front is not None:
        front = [
            {"r": p.r, "loss": p.loss, "time_us": p.time_us, "avg_bits": p.allocation.avg_bits}
            for p in model_front
        ]
    else:
        front = _model_front(entries)
    if front is not None:
        report["pareto_front"] = front
    report["layers"] = entries
    return report


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def plot_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Bits heatmap (layer x expert, per unit), activation frequency, Pareto front.
    Returns the PNG paths written; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir = Path(out_dir)
    layers = report["layers"]
    labels = [layer["prefix"] for layer in layers]
    written = []

    fig, axes = plt.subplots(1, len(UNITS), figsize=(12, 1 + 0.4 * len(layers)), squeeze=False)
    bits = {
        unit: np.array([[e[unit]["bits_per_weight"] for e in layer["experts"]] for layer in layers])
        for unit in UNITS
    }
    lo, hi = min(b.min() for b in bits.values()), max(b.max() for b in bits.values())
    for ax, unit in zip(axes[0], UNITS):
        image = ax.imshow(bits[unit], aspect="auto", cmap="viridis", vmin=lo, vmax=hi)  # one scale for both
        ax.set_title(f"{unit}: bits per weight")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        fig.colorbar(image, ax=ax)
    written.append(_save(fig, out_dir / "bits_heatmap.png", plt))

    fig, ax = plt.subplots(figsize=(8, 1 + 0.4 * len(layers)))
    freq = np.array([[e["activation_frequency"] for e in layer["experts"]] for layer in layers])
    image = ax.imshow(freq, aspect="auto", cmap="magma")
    ax.set_title("activation frequency (share of tokens routed to the expert)")
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.colorbar(image, ax=ax)
    written.append(_save(fig, out_dir / "activation_frequency.png", plt))

    if "pareto_front" in report:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        front = report["pareto_front"]
        ax.plot([p["time_us"] for p in front], [p["loss"] for p in front], "o-", label="front (r = 0 ... 1)")
        ax.plot(report["predicted_time_us"], report["predicted_loss"], "r*", markersize=14, label="chosen")
        ax.set_xlabel("predicted expert GEMM time (µs, summed over layers)")
        ax.set_ylabel("predicted loss ΣΔ")
        ax.set_yscale("log")
        ax.legend()
        written.append(_save(fig, out_dir / "pareto_front.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
