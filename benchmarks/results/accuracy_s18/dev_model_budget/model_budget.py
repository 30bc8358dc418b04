"""s18 dev: the model-wide budget (one ILP over all MoE layers) with today's default quantizer.

Session 12's best 2.25-bit setting (inorder.BEST225: S3 candidates, fisher-diag token weights, --refine-codes 2,
GPTQ in model order, fp target, damping 0.3), whole pipeline (offline.pipeline._Pipeline, unchanged), with
budget_scope="model" instead of "layer". Caches shared with ../dev/inorder.py (/tmp/s18acc/cache_seed{0,1}):
the profile and Δ keys do not depend on the budget scope, so the model rows read the control's Δ.

Usage: python model_budget.py NAME[,NAME...]
  NAME = {model,modelnotok,layernotok}-seed{0,1}
    model:      budget_scope="model", token_weights="fisher-diag" (the pipeline then applies no layer gains:
                Δ is comparable across layers through the token weights' one model-wide mean)
    modelnotok: budget_scope="model", token_weights="none", layer_weights="fisher" (per-layer Fisher gains,
                the "model-budget-fisher" rows of sessions 8-11)
    layernotok: budget_scope="layer", token_weights="none" (the per-layer control of modelnotok)
  python model_budget.py test:NAME[,...]   evaluates the existing checkpoint /tmp/s18acc/out_mb/NAME (or
  /tmp/s18acc/out/NAME for control-seedN) on test.txt (611 windows of 512, transformers)
Rows go to results.jsonl (dev) or test_results.jsonl (test)."""
import sys, json, time
from collections import Counter
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "dev"))
import torch
torch.set_num_threads(1)
import inorder as I  # noqa: E402  (BEST225, MODEL, CAL, SH, allocation)
from offline import pipeline as P  # noqa: E402
from offline.evaluate import token_windows, perplexity_hf  # noqa: E402

VARIANTS = {
    "model": dict(budget_scope="model"),
    "modelnotok": dict(budget_scope="model", token_weights="none", layer_weights="fisher"),
    "layernotok": dict(budget_scope="layer", token_weights="none"),
}


def summary(report):
    """Blocks per scheme (per unit and all), per-layer avg bits and loss weights."""
    per_unit = {u: Counter(e[u]["scheme"] for L in report["layers"] for e in L["experts"]) for u in ("gate_up", "down")}
    return dict(
        blocks=dict(sum(per_unit.values(), Counter())),
        blocks_gate_up=dict(per_unit["gate_up"]), blocks_down=dict(per_unit["down"]),
        layer_avg_bits=[round(L["avg_bits"], 4) for L in report["layers"]],
        loss_weights=[round(L["loss_weight"], 4) for L in report["layers"]],
    )


def changed(a_report, b_report):
    a, b = I.allocation(a_report), I.allocation(b_report)
    return sum(x != y for p in a for u in (0, 1) for x, y in zip(a[p][u], b[p][u]))


def run_dev(name):
    mode, seed = name.split("-")
    seed = int(seed.removeprefix("seed"))
    opts = P.QuantizeOptions(**{**I.BEST225, **VARIANTS[mode]}, seed=seed, cache_dir=f"/tmp/s18acc/cache_seed{seed}")
    opts.validate()
    out = Path("/tmp/s18acc/out_mb") / name
    t0 = time.time()
    r = P._Pipeline(I.MODEL, I.CAL, out, opts).run()
    quantize_s = time.time() - t0
    row = dict(name=name, mode=mode, seed=seed, options=VARIANTS[mode], avg_bits=r.report["achieved_avg_bits"],
               stages=r.stages, layer_gains=r.report.get("layer_gains"), quantize_s=round(quantize_s, 1),
               **summary(r.report))
    control = Path(f"/tmp/s18acc/out/control-seed{seed}/report.json")
    if control.is_file():
        c = json.load(open(control))
        row["changed_blocks_vs_control"] = changed(c, r.report)
        row["control_layer_avg_bits"] = [round(L["avg_bits"], 4) for L in c["layers"]]
    windows = token_windows(I.MODEL, I.SH / "corpus" / "valid.txt", 512, None)
    p = perplexity_hf(r.out_dir, windows[::20])
    row.update(ppl=round(p.perplexity, 4), windows=p.windows, total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open(HERE / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def run_test(name):
    base = Path("/tmp/s18acc/out") if name.startswith("control") else Path("/tmp/s18acc/out_mb")
    t0 = time.time()
    windows = token_windows(I.MODEL, I.SH / "corpus" / "test.txt", 512, None)
    p = perplexity_hf(base / name, windows)
    row = dict(name=name, split="test", checkpoint=str(base / name), ppl=round(p.perplexity, 4), windows=p.windows,
               eval_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open(HERE / "test_results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    arg = sys.argv[1]
    if arg.startswith("test:"):
        for name in arg.removeprefix("test:").split(","):
            run_test(name)
    else:
        for name in arg.split(","):
            run_dev(name)


if __name__ == "__main__":
    main()
