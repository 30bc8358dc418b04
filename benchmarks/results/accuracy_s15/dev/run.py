"""Dev split runs for s15: 262,144 calibration tokens (twice the default) for s12's best 2.25-bit setting and the
equally treated uniform w2g128 row. Pipeline API; 44 windows of valid.txt (every 20th), as s11-s14."""
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
S3S = S0 + ("w3g128_sym", "w4g128_sym")
best = {"percdamp": 0.1, "refine_sweeps": 2}
diag = {"token_weights": "fisher-diag"}
CONF = {
  "U225-w2g128-262k": ({"scheme_map": "w2g128", **best}, 262144),
  "TL225-S3S-diag-262k": ({"schemes": S3S, "wbits": 2.25, "r": 1.0, **best, **diag}, 262144),
}
sys.path.insert(0, "/work/main/benchmarks")
from accuracy import uniform_map as UM
for n in sys.argv[1].split(","):
    o, calib = CONF[n]; o = dict(o); t0 = time.time(); row = {"name": n, "calib_tokens": calib}
    if "scheme_map" in o: o["scheme_map"] = UM(o["scheme_map"])
    r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s15acc/out") / n, calib_tokens=calib, seq_len=512,
                       cache_dir="/tmp/s15acc/cache", **o)
    row["avg_bits"] = r.report["achieved_avg_bits"]; row["stages"] = r.stages
    row["quantize_s"] = round(time.time() - t0, 1)
    c = collections.Counter()
    for L in r.report.get("layers", []):
        for e in L["experts"]:
            c["gu:" + e["gate_up"]["scheme"]] += 1; c["dn:" + e["down"]["scheme"]] += 1
    row["picks"] = dict(sorted(c.items()))
    p = perplexity_hf(r.out_dir, W)
    row.update(ppl=round(p.perplexity, 4), windows=p.windows, tokens=p.tokens, total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/tmp/s15acc/results.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
