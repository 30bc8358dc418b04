"""s16: GPTQ in model order with the fp target (GPTAQ) at 3.25 bits, on the test text, against the default quantizer.
Default options otherwise (131,072 calibration tokens, seed 0, damping 0.01, r = 1, roofline), as the session-9 rows
(MxMoE 3.25 19.385, uniform w3g128 19.606). Run as `python seq_fp_325_testsplit.py NAME[,NAME...]`."""
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
SEQ_FP = {"sequential": True, "sequential_target": "fp"}
CONF = {
    "mxmoe-3.25": {"wbits": 3.25, "r": 1.0},
    "mxmoe-3.25-seqfp": {"wbits": 3.25, "r": 1.0, **SEQ_FP},
    "gptq-w3g128-seqfp": {"scheme_map": uniform_map("w3g128"), **SEQ_FP},
}
for name in sys.argv[1].split(","):
    t0 = time.time()
    r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s16acc/out325") / name, cache_dir="/tmp/s16acc/cache325", **CONF[name])
    q = time.time() - t0
    p = perplexity_hf(r.out_dir, TEST)
    row = dict(name=name, avg_bits=r.report["achieved_avg_bits"], stages=r.stages, ppl=round(p.perplexity, 4),
               windows=p.windows, quantize_s=round(q, 1), total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/work/main/benchmarks/results/accuracy_s16/seq_fp_325_testsplit.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
