"""Where a served decode step's GPU time goes: kernels of vLLM's engine at one batch size, per variant.

Run on a CUDA machine with vLLM (../shared/gpu-vllm) and the plugin registered:

    python benchmarks/serving_profile.py --config qwen3-30b-a3b --variants gptq4_marlin,mxmoe_mixed325 --batch 64

Each variant (benchmarks/speed_configs.py, random weights, CUDA graphs on as in gpu_serving_check.py) runs in
its own subprocess with the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so torch.profiler sees its
kernels: one warm-up batch, then the same ``--batch`` random 128-token prompts generating ``--tokens`` tokens
under the profiler (the warm-up leaves the prompts in vLLM's prefix cache, so the profile is nearly all decode). Prints and writes ($OUT/serving_profile_<variant>.txt) GPU time per kernel name, largest first, with
each kernel's share of the summed kernel time and its time per generated token step.

With ``--record-routing FILE`` an mxmoe variant runs eagerly instead (no CUDA graphs, no profile) and saves
the router's choice of every MoE layer at every decode step of ``--batch`` sequences (topk ids and weights,
as the plugin receives them) to FILE, for ``baselines.py --routing FILE`` to replay on the kernels alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.gpu_serving_check import dummy_engine, fixed_length, random_prompts  # noqa: E402

OUT = Path(os.environ.get("OUT", "."))
TOP = 30


def profile_variant(model_dir: str, tag: str, batch: int, tokens: int) -> None:
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    llm = dummy_engine(model_dir)
    prompts, sp = random_prompts(np.random.default_rng(0), batch), fixed_length(tokens)
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up: same shapes, nothing first-run in the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
    rows = [(e.key, e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    head = f"# {tag}: batch {batch}, {tokens} tokens out (prefix-cached prompts), wall {wall:.3f} s"
    lines = [f"{head}, kernel time {total / 1e3:.1f} ms ({len(rows)} kernel names)",
             f"{'us total':>10} {'share':>6} {'us/step':>8} {'calls':>7}  kernel"]  # fmt: skip
    for name, us, count in rows[:TOP]:
        lines.append(f"{us:10.0f} {us / total:6.1%} {us / tokens:8.1f} {count:7d}  {name[:110]}")
    text = "\n".join(lines)
    print(text, flush=True)
    (OUT / f"serving_profile_{tag}.txt").write_text(text + "\n")


def record_routing(model_dir: str, batch: int, tokens: int, path: str) -> None:
    import numpy as np
    import torch

    from vllm_mxmoe import moe

    samples = []
    forward = moe.MxMoEFusedMoEMethod.forward_eager

    def recording(self, layer, x, topk_weights, topk_ids):
        if x.shape[0] == batch:  # decode steps only (prefill batches are larger)
            samples.append((layer.mxmoe_key, topk_ids.to("cpu", torch.int32), topk_weights.float().cpu()))
        return forward(self, layer, x, topk_weights, topk_ids)

    moe.MxMoEFusedMoEMethod.forward_eager = recording
    llm = dummy_engine(model_dir, enforce_eager=True)
    llm.generate(random_prompts(np.random.default_rng(0), batch), fixed_length(tokens), use_tqdm=False)
    torch.save(samples, path)
    print(f"recorded {len(samples)} routings of {batch} tokens to {path}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="qwen3-30b-a3b", help="a name in speed_configs.CONFIGS")
    p.add_argument("--variants", default="gptq4_marlin,mxmoe_mixed325")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--record-routing", metavar="FILE", help="save decode-step routing (mxmoe variants) instead")
    p.add_argument("--one", nargs=2, metavar=("MODEL_DIR", "TAG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one and args.record_routing:
        record_routing(args.one[0], args.batch, args.tokens, args.record_routing)
        return
    if args.one:
        profile_variant(args.one[0], args.one[1], args.batch, args.tokens)
        return
    from benchmarks.speed_configs import CONFIGS, write_all

    paths = write_all(Path("/tmp/speed_cfgs") / args.config, CONFIGS[args.config])
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for tag in args.variants.split(","):
        cmd = [sys.executable, __file__, "--batch", str(args.batch), "--tokens", str(args.tokens),
               "--one", str(paths[tag]), f"{args.config}_{tag}"]  # fmt: skip
        if args.record_routing:
            cmd += ["--record-routing", args.record_routing]
        subprocess.run(cmd, env=env, check=False)


if __name__ == "__main__":
    main()
