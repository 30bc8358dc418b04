"""s15 dev: a wider clip search for the grids (shrink factors down to 1 - MAX_SHRINK instead of 0.5), at 131k tokens:
uniform w2 (per channel), uniform w2g128 and the 131k allocation of the best 2.25-bit setting as a fixed map."""
import sys, json, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline import quant_grid
from offline.pipeline import quantize_mxmoe
from offline.evaluate import token_windows, perplexity_hf
from offline.scheme_map import uniform_map

MAX_SHRINK, GRID = float(sys.argv[2]), int(sys.argv[3])
quant_grid.fit_grid_mse.__defaults__ = (None, GRID, MAX_SHRINK)
SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
W = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20]


def alloc_map(report):
    r = json.load(open(report))
    return {"gate_up": "w2", "down": "w2", "layers": {
        L["prefix"]: {"gate_up": [e["gate_up"]["scheme"] for e in L["experts"]],
                      "down": [e["down"]["scheme"] for e in L["experts"]]} for L in r["layers"]}}


MAPS = {"U-w2": uniform_map("w2"), "U-w2g128": uniform_map("w2g128"),
        "alloc131k": alloc_map("/tmp/s14acc/out/TL225-S3S-diag/report.json")}
for name in sys.argv[1].split(","):
    t0 = time.time(); n = f"{name}-shrink{MAX_SHRINK}-grid{GRID}"
    r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s15acc/out") / n, calib_tokens=131072, seq_len=512,
                       cache_dir="/tmp/s12acc/dev/cache", scheme_map=MAPS[name], percdamp=0.1, refine_sweeps=2)
    p = perplexity_hf(r.out_dir, W)
    row = dict(name=n, calib_tokens=131072, avg_bits=r.report["achieved_avg_bits"], ppl=round(p.perplexity, 4),
               windows=p.windows, total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/tmp/s15acc/results.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
