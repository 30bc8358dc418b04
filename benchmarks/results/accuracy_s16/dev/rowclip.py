"""s16 dev: GPTQ-aware clipping, chosen per row. For each block, GPTQ runs on several grids (the default MSE-clipped
grid, and min/max ranges shrunk by a row-wide factor p), and every row keeps the grid whose GPTQ result has the
lowest output error (q - w) H (q - w)^T under the block's Hessian (rows are independent in GPTQ). Then the usual
--refine-codes sweeps. Fixed allocations only (the sensitivities are not re-measured); patched in this script.
Dev split: 44 windows of valid.txt, 131k calibration tokens (cached stages of s12), damping 0.1, refine 2."""
import sys, json, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline import gptq, sensitivity
from offline.gptq import (_Grid, _checked_hessian, _decouple_dead_inputs, _gptq_pass, _upper_cholesky_of_inverse,
                          GPTQResult, refine_codes, refines_codes_of)
from offline.quant_grid import as_float_weight, fit_grid_mse, _group_range, _grid_of_range
from offline.pipeline import quantize_mxmoe
from offline.evaluate import token_windows, perplexity_hf
from offline.scheme_map import uniform_map

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
W = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20]
SHRINK = [1.0 - 0.05 * i for i in range(11)]  # 1.0 ... 0.5
orig_run_gptq = gptq.run_gptq
STATS = {"rows": 0, "kept_mse": 0}


def run_gptq_rowclip(w, hessian, scheme, *, percdamp=0.01, clip="mse", refit_rounds=0, refine_sweeps=0, **kw):
    weight = as_float_weight(w, scheme)
    h = _checked_hessian(hessian, weight)
    if scheme.weight_is_fp8 or not (h.diagonal() > 0).any() or refit_rounds:
        return orig_run_gptq(w, hessian, scheme, percdamp=percdamp, clip=clip, refit_rounds=refit_rounds,
                             refine_sweeps=refine_sweeps, **kw)
    _decouple_dead_inputs(h)
    importance = h.diagonal().float()
    n, k = weight.shape
    order = torch.argsort(h.diagonal(), descending=True)
    hinv = _upper_cholesky_of_inverse(h[order][:, order], percdamp)
    if hinv is None:
        return orig_run_gptq(w, hessian, scheme, percdamp=percdamp, clip=clip, refine_sweeps=refine_sweeps, **kw)
    g = scheme.group(k)
    hf = h.float()
    grids = [fit_grid_mse(weight, scheme, importance)]
    lo, hi = _group_range(weight.reshape(n, k // g, g), scheme)
    grids += [_grid_of_range(lo * p, hi * p, scheme) for p in SHRINK]
    best_err = torch.full((n,), float("inf")); best = None
    for ci, (scale, zero) in enumerate(grids):
        grid = _Grid(scheme, g, scale.clone(), None if zero is None else zero.clone())
        q = _gptq_pass(weight[:, order], hinv, order.tolist(), grid, gptq.DEFAULT_BLOCK_SIZE, False)[:, torch.argsort(order)]
        e = q - weight
        err = ((e @ hf) * e).sum(1)
        if best is None:
            best = [q.clone(), scale.clone(), None if zero is None else zero.clone()]
            best_err = err; chosen = torch.zeros(n, dtype=torch.long)
            continue
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best[0][take] = q[take]; best[1][take] = scale[take]
        if zero is not None:
            best[2][take] = zero[take]
        chosen[take] = ci
    STATS["rows"] += n; STATS["kept_mse"] += int((chosen == 0).sum())
    result = GPTQResult(best[0], best[1], best[2], scheme, used_rtn=False)
    if refines_codes_of(scheme):
        result = refine_codes(weight, hessian, result, refine_sweeps, percdamp)
    return result


REPORT = "/tmp/s14acc/out/TL225-S3S-diag/report.json"


def alloc_map(report):
    r = json.load(open(report))
    return {"gate_up": "w2", "down": "w2", "layers": {
        L["prefix"]: {"gate_up": [e["gate_up"]["scheme"] for e in L["experts"]],
                      "down": [e["down"]["scheme"] for e in L["experts"]]} for L in r["layers"]}}


MAPS = {"alloc131k": lambda: alloc_map(REPORT), "U-w2g128": lambda: uniform_map("w2g128"),
        "U-w2": lambda: uniform_map("w2")}
for spec in sys.argv[1].split(","):
    name, mode = spec.split(":")
    sensitivity.run_gptq = run_gptq_rowclip if mode == "rowclip" else orig_run_gptq
    STATS.update(rows=0, kept_mse=0); t0 = time.time()
    out = Path("/tmp/s16acc/out") / f"{name}-{mode}"
    r = quantize_mxmoe(MODEL, CAL, out, calib_tokens=131072, seq_len=512, cache_dir="/tmp/s12acc/dev/cache",
                       scheme_map=MAPS[name](), percdamp=0.1, refine_sweeps=2)
    p = perplexity_hf(r.out_dir, W)
    row = dict(name=name, mode=mode, avg_bits=r.report["achieved_avg_bits"], stages=r.stages, ppl=round(p.perplexity, 4),
               windows=p.windows, rows=STATS["rows"], rows_kept_mse_grid=STATS["kept_mse"],
               total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/work/main/benchmarks/results/accuracy_s16/dev/rowclip_results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
