"""s16: the whole pipeline (sensitivities, allocation and GPTQ all at damping 0.3) with GPTQ in model order fitting the
unquantized model's outputs, on the test text. Equivalent CLI:
  mxmoe-quantize --model ../shared/reference-moe --calib ../shared/corpus/calib.txt --wbits 3.25 \
      --sequential --sequential-target fp --percdamp 0.3 --out OUT
  (2.25 bits: session 12's best setting, plus --schemes w2,w2g128,w3g128,w4g128,w8,w3g128_sym,w4g128_sym
   --token-weights fisher-diag --refine-codes 2)
Run as `python full_fp_d03_testsplit.py NAME`, NAME mxmoe-3.25-fp-d03 or mxmoe-2.25-best-fp-d03."""
import sys, json, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline.pipeline import quantize_mxmoe
from offline.evaluate import token_windows, perplexity_hf

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
TEST = token_windows(MODEL, SH / "corpus" / "test.txt", 512, None)
FP = {"sequential": True, "sequential_target": "fp", "percdamp": 0.3}
S3S = ("w2", "w2g128", "w3g128", "w4g128", "w8", "w3g128_sym", "w4g128_sym")
CONF = {
    "mxmoe-3.25-fp-d03": {"wbits": 3.25, "r": 1.0, **FP},
    "mxmoe-2.25-best-fp-d03": {"wbits": 2.25, "r": 1.0, "schemes": S3S, "token_weights": "fisher-diag",
                               "refine_sweeps": 2, **FP},
}
name = sys.argv[1]; t0 = time.time()
r = quantize_mxmoe(MODEL, CAL, Path("/tmp/s16acc/full") / name, cache_dir=f"/tmp/s16acc/cache_{name}", **CONF[name])
q = time.time() - t0
p = perplexity_hf(r.out_dir, TEST)
row = dict(name=name, avg_bits=r.report["achieved_avg_bits"], stages=r.stages, ppl=round(p.perplexity, 4),
           windows=p.windows, quantize_s=round(q, 1), total_s=round(time.time() - t0, 1))
print(json.dumps(row), flush=True)
with open("/work/main/benchmarks/results/accuracy_s16/full_fp_d03_testsplit.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
