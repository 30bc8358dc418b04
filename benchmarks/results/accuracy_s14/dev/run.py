"""Dev split runs for s14: symmetric 2-bit candidates (w2g128_sym 2.125 bits, w2g64_sym 2.25 bits) next to s12's best
2.25-bit setting. Uses the pipeline API and s12's caches (/tmp/s12acc/dev/cache); 44 windows of valid.txt (every 20th)."""
import sys, json, time, collections
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline.pipeline import quantize_mxmoe
from offline.evaluate import token_windows, perplexity_hf

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
W = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20]
S0 = ("w2", "w2g128", "w3g128", "w4g128", "w8")
best = {"percdamp": 0.1, "refine_sweeps": 2}
fisher = {"budget_scope": "model", "layer_weights": "fisher"}
S3S = S0 + ("w3g128_sym", "w4g128_sym")
model = {"budget_scope": "model"}
iso, diag = {"token_weights": "fisher"}, {"token_weights": "fisher-diag"}
S4S = S3S + ("w2g128_sym",)
S5S = S4S + ("w2g64_sym",)
CONF = {
  "TL225-S3S-diag": {"schemes": S3S, "wbits": 2.25, "r": 1.0, **best, **diag},  # s12's best dev row (18.8575)
  "TL225-S4S-diag": {"schemes": S4S, "wbits": 2.25, "r": 1.0, **best, **diag},
  "TL225-S5S-diag": {"schemes": S5S, "wbits": 2.25, "r": 1.0, **best, **diag},
  "U225-w2g128sym": {"scheme_map": "w2g128_sym", **best},  # uniform, for the scheme's own quality
}
sys.path.insert(0, "/work/main/benchmarks")
from accuracy import uniform_map as UM
names = sys.argv[1].split(",")
for n in names:
    o = CONF[n]; t0 = time.time(); row = {"name": n}
    d = MODEL
    if o is not None:
        o = dict(o)
        if "scheme_map" in o: o["scheme_map"] = UM(o["scheme_map"] or "w2g128")
        r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s14acc/out") / n, calib_tokens=131072, seq_len=512,
                           cache_dir="/tmp/s12acc/dev/cache", **o)
        row["avg_bits"] = r.report["achieved_avg_bits"]; row["stages"] = r.stages
        row["quantize_s"] = round(time.time() - t0, 1)
        if "predicted_loss" in r.report: row["predicted_loss"] = r.report["predicted_loss"]
        d = r.out_dir
        c = collections.Counter()
        for L in r.report.get("layers", []):
            for e in L["experts"]:
                c["gu:" + e["gate_up"]["scheme"]] += 1; c["dn:" + e["down"]["scheme"]] += 1
        row["picks"] = dict(sorted(c.items()))
        row["options"] = {k: v for k, v in o.items() if k != "scheme_map"}
    p = perplexity_hf(d, W)
    row.update(ppl=round(p.perplexity, 4), windows=p.windows, tokens=p.tokens, total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/tmp/s14acc/results.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
