"""s15 dev: separate allocation from quantizer. The 131k and 262k allocations of the best 2.25-bit setting (reports of
TL225-S3S-diag and TL225-S3S-diag-262k), each quantized as a fixed scheme map with the other calibration size."""
import sys, json, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline.pipeline import quantize_mxmoe
from offline.evaluate import token_windows, perplexity_hf

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
W = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20]
REPORTS = {"alloc131k": "/tmp/s14acc/out/TL225-S3S-diag/report.json",
           "alloc262k": "/tmp/s15acc/out/TL225-S3S-diag-262k/report.json"}
CACHES = {131072: "/tmp/s12acc/dev/cache", 262144: "/tmp/s15acc/cache"}


def scheme_map(report):
    r = json.load(open(report))
    return {"gate_up": "w2", "down": "w2", "layers": {
        L["prefix"]: {"gate_up": [e["gate_up"]["scheme"] for e in L["experts"]],
                      "down": [e["down"]["scheme"] for e in L["experts"]]} for L in r["layers"]}}


for spec in sys.argv[1].split(","):
    alloc, calib = spec.split("@"); calib = int(calib); t0 = time.time()
    n = f"{alloc}-q{calib // 1024}k"
    r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s15acc/out") / n, calib_tokens=calib, seq_len=512,
                       cache_dir=CACHES[calib], scheme_map=scheme_map(REPORTS[alloc]), percdamp=0.1, refine_sweeps=2)
    p = perplexity_hf(r.out_dir, W)
    row = dict(name=n, alloc=alloc, calib_tokens=calib, avg_bits=r.report["achieved_avg_bits"], stages=r.stages,
               ppl=round(p.perplexity, 4), windows=p.windows, total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/tmp/s15acc/results.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
