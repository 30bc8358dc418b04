"""s18 dev: evaluate a checkpoint on the dev split (44 windows of valid.txt, every 20th).
Usage: python eval_s16_dev.py CKPT"""
import sys, json, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from pathlib import Path
from offline.evaluate import token_windows, perplexity_hf
SH = Path("/work/shared"); MODEL = SH / "reference-moe"
W = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20]
t0 = time.time()
p = perplexity_hf(Path(sys.argv[1]), W)
print(json.dumps(dict(model=sys.argv[1], ppl=round(p.perplexity, 4), windows=p.windows, s=round(time.time() - t0, 1))), flush=True)
