"""s16 dev: GPTQ in model order with the fp target (GPTAQ: fit Ŵ X̃ to W X, not W X̃) vs today's quantized target.

Usage: python seq_target.py SPEC[,SPEC...], SPEC = ALLOC:MODE with ALLOC alloc131k (s14's TL225-S3S-diag scheme map)
or w2g128 (uniform), MODE default (not sequential), seq-q (sequential, target quantized) or seq-fp (sequential,
target fp), seq-fp-rw (seq-fp with routing-weighted Hessians), seq-fp-d03 or seq-fp-d1 (seq-fp, damping 0.3 or 1.0).
Same options as s15's cross.py / run.py: 131072 calibration tokens of seq_len 512 from the cached s12
profile, percdamp 0.1, refine_sweeps 2; 44 windows of valid.txt (every 20th)."""
import sys, json, time
sys.path.insert(0, "/work/main")
sys.path.insert(0, "/work/main/benchmarks")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline.pipeline import quantize_mxmoe
from offline.evaluate import token_windows, perplexity_hf
from accuracy import uniform_map

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
W = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20]
REPORT = "/tmp/s14acc/out/TL225-S3S-diag/report.json"
RESULTS = Path(__file__).with_name("results.jsonl")
FP = {"sequential": True, "sequential_target": "fp"}
MODES = {"default": {}, "seq-q": {"sequential": True}, "seq-fp": FP,
         "seq-fp-rw": {**FP, "hessian_weights": "routing"}, "seq-fp-d03": {**FP, "percdamp": 0.3},
         "seq-fp-d1": {**FP, "percdamp": 1.0}}


def scheme_map(alloc):
    if alloc == "w2g128":
        return uniform_map("w2g128")
    r = json.load(open(REPORT))
    return {"gate_up": "w2", "down": "w2", "layers": {
        L["prefix"]: {"gate_up": [e["gate_up"]["scheme"] for e in L["experts"]],
                      "down": [e["down"]["scheme"] for e in L["experts"]]} for L in r["layers"]}}


for spec in sys.argv[1].split(","):
    alloc, mode = spec.split(":"); t0 = time.time(); n = f"{alloc}-{mode}"
    r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s16acc/out") / n, calib_tokens=131072, seq_len=512,
                       cache_dir="/tmp/s12acc/dev/cache", scheme_map=scheme_map(alloc),
                       **{"percdamp": 0.1, "refine_sweeps": 2, **MODES[mode]})
    quantize_s = time.time() - t0
    p = perplexity_hf(r.out_dir, W)
    row = dict(name=n, alloc=alloc, mode=mode, sequential_target=r.report["options"].get("sequential_target"),
               avg_bits=r.report["achieved_avg_bits"], stages=r.stages, ppl=round(p.perplexity, 4), windows=p.windows,
               quantize_s=round(quantize_s, 1), total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open(RESULTS, "a") as f: f.write(json.dumps(row) + "\n")
