"""s16: the fp target with damping 0.3 at 3.25 bits, on the test text. MxMoE: the fixed allocation of the default
3.25-bit run (seq_fp_325_testsplit.py's mxmoe-3.25 report), so only the quantizer differs; uniform w3g128 alongside.
Run as `python seq_fp_325_d03_testsplit.py NAME`, NAME alloc325 or w3g128."""
import sys, json, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline.pipeline import quantize_mxmoe
from offline.evaluate import token_windows, perplexity_hf
from offline.scheme_map import uniform_map

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
TEST = token_windows(MODEL, SH / "corpus" / "test.txt", 512, None)
REPORT = "/tmp/s16acc/out325/mxmoe-3.25/report.json"


def alloc_map(report):
    r = json.load(open(report))
    return {"gate_up": "w4g128", "down": "w4g128", "layers": {
        L["prefix"]: {"gate_up": [e["gate_up"]["scheme"] for e in L["experts"]],
                      "down": [e["down"]["scheme"] for e in L["experts"]]} for L in r["layers"]}}


name = sys.argv[1]; t0 = time.time()
smap = alloc_map(REPORT) if name == "alloc325" else uniform_map("w3g128")
r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s16acc/out325") / f"{name}-seqfp-d03", cache_dir="/tmp/s16acc/cache325",
                   scheme_map=smap, sequential=True, sequential_target="fp", percdamp=0.3)
q = time.time() - t0
p = perplexity_hf(r.out_dir, TEST)
row = dict(name=f"{name}-seqfp-d03", avg_bits=r.report["achieved_avg_bits"], ppl=round(p.perplexity, 4),
           windows=p.windows, quantize_s=round(q, 1), total_s=round(time.time() - t0, 1))
print(json.dumps(row), flush=True)
with open("/work/main/benchmarks/results/accuracy_s16/seq_fp_325_testsplit.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
