"""s17: does the session-16 quantizer (GPTQ in model order, fp target, damping 0.3 everywhere) beat the default one
with another seed (Hadamard signs and profile token sample, seed 1)? Whole pipeline, test text. Equivalent CLI:
  mxmoe-quantize --model ../shared/reference-moe --calib ../shared/corpus/calib.txt --wbits 3.25 --seed 1 \
      [--sequential --sequential-target fp --percdamp 0.3] --out OUT
  (2.25 bits: session 12's best setting, plus --schemes w2,w2g128,w3g128,w4g128,w8,w3g128_sym,w4g128_sym
   --token-weights fisher-diag --refine-codes 2 --percdamp 0.1 for the default-quantizer row)
Run as `python seed1_testsplit.py NAME [NAME ...]`."""
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
FP = {"sequential": True, "sequential_target": "fp", "percdamp": 0.3}
S3S = ("w2", "w2g128", "w3g128", "w4g128", "w8", "w3g128_sym", "w4g128_sym")
BEST225 = {"wbits": 2.25, "r": 1.0, "schemes": S3S, "token_weights": "fisher-diag", "refine_sweeps": 2}
CONF = {
    "mxmoe-3.25-seed1": {"wbits": 3.25, "r": 1.0, "seed": 1},
    "mxmoe-3.25-fp-d03-seed1": {"wbits": 3.25, "r": 1.0, "seed": 1, **FP},
    "mxmoe-2.25-best-seed1": {**BEST225, "percdamp": 0.1, "seed": 1},
    "mxmoe-2.25-best-fp-d03-seed1": {**BEST225, "seed": 1, **FP},
    # the uniform rows with the same quantizer, for the goal ratios at seed 1
    "gptq-w2g128-fp-d03-seed1": {"scheme_map": uniform_map("w2g128"), "refine_sweeps": 2, "seed": 1, **FP},
    "gptq-w3g128-fp-d03-seed1": {"scheme_map": uniform_map("w3g128"), "seed": 1, **FP},
}
for name in sys.argv[1:]:
    t0 = time.time()
    r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s17acc/out") / name, cache_dir=f"/tmp/s17acc/cache_{name}", **CONF[name])
    q = time.time() - t0
    p = perplexity_hf(r.out_dir, TEST)
    row = dict(name=name, avg_bits=r.report["achieved_avg_bits"], stages=r.stages, ppl=round(p.perplexity, 4),
               windows=p.windows, quantize_s=round(q, 1), total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open("/work/main/benchmarks/results/accuracy_s17/seed1_testsplit.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
