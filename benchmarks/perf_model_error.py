"""The allocator's performance model against measured layer times (issue: predicted vs measured).

Reads the timing cases of one `benchmarks/kernel_check.py` run (kernel_check.json: each
case records its experts' schemes and routed token counts, and the GEMM times measured
alone) and the measured per-scheme table of the same run (perf_table_*.json). For every
case it predicts what the allocator would: the sum over routed experts of
``PerfModel.time_us`` for gate_up and down (offline/perf_model.py), once with the
measured table and once with the roofline alone, and compares with the measured
GEMM1 + GEMM2 time. Writes a table (Markdown) and a log-log scatter plot (PNG).

    python benchmarks/perf_model_error.py RUN_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.perf_model import PerfModel  # noqa: E402


def predicted_gemm_us(model: PerfModel, case: dict) -> float:
    """Sum of the per-block predictions of one layer, as the allocator adds them."""
    n1, k1, n2, k2 = case["gemm1_nk"] + case["gemm2_nk"]
    total = 0.0
    for gate_up, down, rows in zip(case["gate_up_schemes"], case["down_schemes"], case["expert_tokens"]):
        if rows:
            total += model.time_us(gate_up, n1, k1, rows) + model.time_us(down, n2, k2, rows)
    return total


def compare(cases: list[dict], table: PerfModel, roofline: PerfModel) -> list[dict]:
    rows = []
    for c in cases:
        # Only the shipped configuration ("table"); the other variants are A/B experiments.
        if c.get("variant") != "table" or "expert_tokens" not in c or not math.isfinite(c.get("gemm1_us", math.nan)):
            continue
        measured = c["gemm1_us"] + c["gemm2_us"]
        rows.append(dict(shape=c["shape"], assign=c["assign"], tokens=c["tokens"], variant=c["variant"],
                         measured_us=measured, table_us=predicted_gemm_us(table, c),
                         roofline_us=predicted_gemm_us(roofline, c)))  # fmt: skip
    if not rows:
        raise SystemExit("no timing case with expert_tokens and GEMM times in kernel_check.json")
    return rows


def summary(rows: list[dict], key: str) -> str:
    errs = [abs(r[key] / r["measured_us"] - 1) for r in rows]
    return f"mean |error| {100 * sum(errs) / len(errs):.0f}%, max {100 * max(errs):.0f}%"


def write_outputs(rows: list[dict], out: Path) -> None:
    lines = ["| shape | schemes | tokens | measured GEMMs us | table model us | roofline us |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['assign']} | {r['tokens']} | {r['measured_us']:.1f} | "
                     f"{r['table_us']:.1f} ({r['table_us'] / r['measured_us']:.2f}x) | "
                     f"{r['roofline_us']:.1f} ({r['roofline_us'] / r['measured_us']:.2f}x) |")  # fmt: skip
    lines += ["", f"table model: {summary(rows, 'table_us')}; roofline: {summary(rows, 'roofline_us')}"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf_model_error.md").write_text("\n".join(lines) + "\n")
    (out / "perf_model_error.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    m = [r["measured_us"] for r in rows]
    ax.scatter(m, [r["table_us"] for r in rows], label="measured table", s=18)
    ax.scatter(m, [r["roofline_us"] for r in rows], label="roofline only", s=18, marker="x")
    lo, hi = min(m + [r["table_us"] for r in rows]) / 1.5, max(m + [r["roofline_us"] for r in rows]) * 1.5
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, label="exact")
    ax.set(xscale="log", yscale="log", xlabel="measured GEMM1+GEMM2 time (us)", ylabel="predicted (us)",
           title="Allocator time model vs measured layers")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perf_model_error.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="folder with kernel_check.json and perf_table_*.json of one run")
    p.add_argument("--out", type=Path, help="where to write (default: RUN_DIR)")
    args = p.parse_args()
    results = json.loads((args.run_dir / "kernel_check.json").read_text())
    cases = results["timing"] if isinstance(results, dict) else results
    tables = sorted(args.run_dir.glob("perf_table_*.json"))
    if not tables:
        raise SystemExit(f"{args.run_dir}: no perf_table_*.json")
    rows = compare(cases, PerfModel.from_json(tables[0]), PerfModel())
    write_outputs(rows, args.out or args.run_dir)


if __name__ == "__main__":
    main()
