"""s19 dev: 2-bit groups between per-channel and g128 as allocator candidates at 2.25 bits.

At 2.25 bits the allocator gives almost every gate_up block per-channel w2 (on the reference model, K = 384:
2.083 bits) to pay for 3-bit down blocks; w2g128 costs 2.25 bits. w2g192 (2.167 bits) sits between the two.
Session 12's best 2.25-bit setting (S3 candidates, fisher-diag token weights, --refine-codes 2) with today's default
quantizer (GPTQ in model order, fp target, damping 0.3), whole pipeline, dev split (44 windows of valid.txt).

Usage: python coarse_groups.py NAME[,NAME...]   NAME = {control,g192}-seed{0,1}
Rows go to results.jsonl."""
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

torch.set_num_threads(1)
from offline import pipeline as P  # noqa: E402
from offline.evaluate import perplexity_hf, token_windows  # noqa: E402

HERE = Path(__file__).parent
SH = Path("/work/shared")
MODEL, CAL = SH / "reference-moe", SH / "corpus" / "calib.txt"
S3S = ("w2", "w2g128", "w3g128", "w4g128", "w8", "w3g128_sym", "w4g128_sym")
BEST225 = {"wbits": 2.25, "r": 1.0, "schemes": S3S, "token_weights": "fisher-diag", "refine_sweeps": 2}
VARIANTS = {"control": {}, "g192": {"schemes": S3S + ("w2g192",)}}


def allow_gate_up_only(name: str) -> None:
    """The pipeline takes a candidate only if it fits every unit; w2g192 fits gate_up (K = 384), not down (K = 128).
    For this experiment only: on down the scheme passes the shape checks, costs 10^12 bits (the ILP can never afford
    it) and is not quantized (Δ is a placeholder that is never used)."""
    from offline import sensitivity as S
    from vllm_mxmoe.schemes import Scheme

    check, bits, quantize = Scheme.check_shape, Scheme.storage_bits, S.quantize_units

    def misfit(scheme, k):
        return scheme.name == name and k % scheme.group_size != 0

    def check_shape(self, n, k, where=""):
        return None if misfit(self, k) else check(self, n, k, where)

    def storage_bits(self, n, k):
        return 10**12 if misfit(self, k) else bits(self, n, k)

    def quantize_units(weights, hessians, scheme, *args, **kwargs):
        if misfit(scheme, weights[0].shape[1]):
            return [S.QuantizedUnit(w.float().clone(), None, None, scheme) for w in weights]
        return quantize(weights, hessians, scheme, *args, **kwargs)

    Scheme.check_shape, Scheme.storage_bits, S.quantize_units = check_shape, storage_bits, quantize_units


def run(name):
    mode, seed = name.split("-")
    seed = int(seed.removeprefix("seed"))
    if mode == "g192":
        allow_gate_up_only("w2g192")
    opts = P.QuantizeOptions(**{**BEST225, **VARIANTS[mode]}, seed=seed, cache_dir=f"/tmp/s19acc/cache_seed{seed}")
    opts.validate()
    t0 = time.time()
    r = P._Pipeline(MODEL, CAL, Path("/tmp/s19acc/out") / name, opts).run()
    blocks = {u: dict(Counter(e[u]["scheme"] for L in r.report["layers"] for e in L["experts"]))
              for u in ("gate_up", "down")}
    windows = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)
    p = perplexity_hf(r.out_dir, windows[::20])
    row = dict(name=name, seed=seed, schemes=list(opts.schemes), avg_bits=r.report["achieved_avg_bits"],
               blocks=blocks, stage_seconds=r.report["stage_seconds"], ppl=round(p.perplexity, 4), windows=p.windows,
               total_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    with open(HERE / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    for n in sys.argv[1].split(","):
        run(n)
