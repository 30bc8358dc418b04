"""s15 dev: uniform schemes of the 2.25-bit mix (gate_up and down both) at 131k and 262k calibration tokens."""
import sys, json, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline.pipeline import quantize_mxmoe
from offline.evaluate import token_windows, perplexity_hf
from offline.scheme_map import uniform_map

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
W = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20]
REFINE = int(sys.argv[2]) if len(sys.argv) > 2 else 2
CACHES = {131072: "/tmp/s12acc/dev/cache", 262144: "/tmp/s15acc/cache"}
for spec in sys.argv[1].split(","):
    scheme, calib = spec.split("@"); calib = int(calib); t0 = time.time()
    n = f"U-{scheme}-q{calib // 1024}k-cd{REFINE}"
    r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s15acc/out") / n, calib_tokens=calib, seq_len=512,
                       cache_dir=CACHES[calib], scheme_map=uniform_map(scheme), percdamp=0.1, refine_sweeps=REFINE)
    p = perplexity_hf(r.out_dir, W)
    row = dict(name=n, calib_tokens=calib, avg_bits=r.report["achieved_avg_bits"], ppl=round(p.perplexity, 4),
               windows=p.windows, total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/tmp/s15acc/results.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
