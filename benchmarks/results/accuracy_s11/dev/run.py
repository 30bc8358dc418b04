"""Dev split runs for s11: coarse-group candidates. Uses the pipeline API; 44 windows of valid.txt (every 20th)."""
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
SC = S0 + ("w3", "w4")          # coarse (per-channel = g384 on gate_up) 3/4-bit analogues
SC3 = S0 + ("w3",)
U = lambda s: {"default": s}
def uniform_map(s):
    return {"default": s}
best = {"percdamp": 0.1, "refine_sweeps": 2}
fisher = {"budget_scope": "model", "layer_weights": "fisher"}
CONF = {
  "fp": None,
  "u-w2g128-d01-cd2": {"scheme_map": None, **best},
  "L225-S0-d01-cd2": {"schemes": S0, "wbits": 2.25, "r": 1.0, **best},
  "L225-SC-d01-cd2": {"schemes": SC, "wbits": 2.25, "r": 1.0, **best},
  "F225-S0-d01-cd2": {"schemes": S0, "wbits": 2.25, "r": 1.0, **best, **fisher},
  "F225-SC-d01-cd2": {"schemes": SC, "wbits": 2.25, "r": 1.0, **best, **fisher},
  "L225-SC3-d01-cd2": {"schemes": SC3, "wbits": 2.25, "r": 1.0, **best},
  "F225-SC3-d01-cd2": {"schemes": SC3, "wbits": 2.25, "r": 1.0, **best, **fisher},
  "L225-SS-d01-cd2": {"schemes": S0 + ("w2g128_sym", "w3g128_sym", "w4g128_sym"), "wbits": 2.25, "r": 1.0, **best},
  "F225-SS-d01-cd2": {"schemes": S0 + ("w2g128_sym", "w3g128_sym", "w4g128_sym"), "wbits": 2.25, "r": 1.0, **best, **fisher},
  "L225-S3S-d01-cd2": {"schemes": S0 + ("w3g128_sym", "w4g128_sym"), "wbits": 2.25, "r": 1.0, **best},
  "F225-S3S-d01-cd2": {"schemes": S0 + ("w3g128_sym", "w4g128_sym"), "wbits": 2.25, "r": 1.0, **best, **fisher},
  "u-w3g128": {"scheme_map": "w3g128"},
  "L325-S0": {"schemes": S0, "wbits": 3.25, "r": 1.0},
  "L325-SC": {"schemes": SC, "wbits": 3.25, "r": 1.0},
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
        r = quantize_mxmoe(MODEL, CAL, Path("/tmp/dev2/out") / n, calib_tokens=131072, seq_len=512,
                           cache_dir="/tmp/dev2/cache", **o)
        row["avg_bits"] = r.report["achieved_avg_bits"]; row["stages"] = r.stages
        row["quantize_s"] = round(time.time() - t0, 1)
        if "predicted_loss" in r.report: row["predicted_loss"] = r.report["predicted_loss"]
        d = r.out_dir
        c = collections.Counter()
        for L in r.report.get("layers", []):
            for e in L["experts"]:
                c["gu:" + e["gate_up"]["scheme"]] += 1; c["dn:" + e["down"]["scheme"]] += 1
        row["picks"] = dict(sorted(c.items()))
    p = perplexity_hf(d, W)
    row.update(ppl=round(p.perplexity, 4), windows=p.windows, tokens=p.tokens, total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/tmp/dev2/results.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
