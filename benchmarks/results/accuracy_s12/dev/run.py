"""Dev split runs for s12: per-token Fisher-weighted sensitivities (token_weights). Uses the pipeline API; 44 windows of valid.txt (every 20th)."""
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
CONF = {
  "fp": None,
  "F225-S0-d01-cd2": {"schemes": S0, "wbits": 2.25, "r": 1.0, **best, **fisher},  # s11 reference, new code
  "TL225-S0-iso": {"schemes": S0, "wbits": 2.25, "r": 1.0, **best, **iso},
  "TL225-S0-diag": {"schemes": S0, "wbits": 2.25, "r": 1.0, **best, **diag},
  "TM225-S0-iso": {"schemes": S0, "wbits": 2.25, "r": 1.0, **best, **model, **iso},
  "TM225-S0-diag": {"schemes": S0, "wbits": 2.25, "r": 1.0, **best, **model, **diag},
  "TL225-S3S-diag": {"schemes": S3S, "wbits": 2.25, "r": 1.0, **best, **diag},
  "TM225-S3S-diag": {"schemes": S3S, "wbits": 2.25, "r": 1.0, **best, **model, **diag},
  "TL225-S3S-iso": {"schemes": S3S, "wbits": 2.25, "r": 1.0, **best, **iso},
  "TM225-S3S-iso": {"schemes": S3S, "wbits": 2.25, "r": 1.0, **best, **model, **iso},
  "L225-S3S-d01-cd2": {"schemes": S3S, "wbits": 2.25, "r": 1.0, **best},  # s11 reference, new code
  # a larger sensitivity sample (1024 routed tokens per expert instead of 512), both sides
  "TL225-S3S-diag-s1024": {"schemes": S3S, "wbits": 2.25, "r": 1.0, **best, **diag, "sample_tokens": 1024},
  "L225-S3S-d01-cd2-s1024": {"schemes": S3S, "wbits": 2.25, "r": 1.0, **best, "sample_tokens": 1024},
  "L325-S0": {"schemes": S0, "wbits": 3.25, "r": 1.0},
  "TL325-S0-diag": {"schemes": S0, "wbits": 3.25, "r": 1.0, **diag},
  "TL325-S0-iso": {"schemes": S0, "wbits": 3.25, "r": 1.0, **iso},
  "TM325-S0-diag": {"schemes": S0, "wbits": 3.25, "r": 1.0, **model, **diag},
  "TM325-S0-iso": {"schemes": S0, "wbits": 3.25, "r": 1.0, **model, **iso},
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
        r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s12acc/dev/out") / n, calib_tokens=131072, seq_len=512,
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
    with open("/tmp/s12acc/dev/results.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
