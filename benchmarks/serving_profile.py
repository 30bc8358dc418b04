"""Where a served decode step's GPU time goes: kernels of vLLM's engine at one batch size, per variant.

Run on a CUDA machine with vLLM (../shared/gpu-vllm) and the plugin registered:

    python benchmarks/serving_profile.py --config qwen3-30b-a3b --variants gptq4_marlin,mxmoe_mixed325 --batch 64

Each variant (benchmarks/speed_configs.py, random weights, CUDA graphs on as in gpu_serving_check.py) runs in
its own subprocess with the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so torch.profiler sees its
kernels. For every batch size of ``--batch`` (a comma list; one engine serves them all): one warm-up batch,
then the same random 128-token prompts generating ``--tokens`` tokens under the profiler (the warm-up leaves
the prompts in vLLM's prefix cache, so the profile is nearly all decode; ``--fresh`` profiles other prompts of
the same length instead, so the profiled batch computes its whole prefill, e.g. ``--tokens 1`` for the prefill
step). Prints and writes
($OUT/serving_profile_<variant>[_b<batch>].txt) GPU time per kernel name, largest first, with each kernel's
share of the summed kernel time and its time per generated token step.

``--trace`` also writes every expert-GEMM kernel launch of the profiled batch in launch order, with its GPU
time ($OUT/serving_kernels_<variant>_b<batch>.json), for ``served_layer_error.py`` to split into layers, and
where the GPU sat idle between kernels (the longest gaps, with the kernels around them).

With ``--record-routing FILE`` an mxmoe variant runs eagerly instead (no CUDA graphs, no profile) and saves
the router's choice of every MoE layer at every decode step of each batch size's sequences (topk ids and
weights, as the plugin receives them) to FILE, for ``baselines.py --routing FILE`` to replay on the kernels
alone and for ``served_layer_error.py`` to predict from. ``{tag}`` in FILE becomes the variant's tag.
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
from benchmarks.gpu_serving_check import (  # noqa: E402
    SPREAD_ROUTERS_HELP,
    dummy_engine,
    fixed_length,
    ints,
    random_prompts,
)

OUT = Path(os.environ.get("OUT", "."))
TOP = 30
# Expert-GEMM kernels: ours, vLLM's Marlin MoE, vLLM's Triton fused_moe (bf16).
EXPERT_GEMM_KERNELS = ("_grouped_gemm_kernel", "marlin_moe", "fused_moe_kernel")


def kernel_events(chrome_trace: dict) -> list[dict]:
    """The GPU kernels of a torch.profiler chrome trace, in start order."""
    kernels = [e for e in chrome_trace.get("traceEvents", []) if e.get("cat") == "kernel"]
    return sorted(kernels, key=lambda e: e["ts"])


def expert_gemm_launches(kernels: list[dict]) -> list[tuple[str, float]]:
    """(kernel name, GPU us) of every expert-GEMM launch among ``kernels`` (kernel_events), in order."""
    return [(e["name"], float(e["dur"])) for e in kernels if any(k in e["name"] for k in EXPERT_GEMM_KERNELS)]


def idle_gaps(kernels: list[dict], top: int = 8) -> dict:
    """Where the GPU ran none of ``kernels`` (kernel_events) during the profiled batch: span, busy time, the
    longest gaps (us) with the kernels on either side, and the idle time summed per (kernel before, kernel after)
    pair, largest first: many short gaps at one place in the step add up there. Tells host-side stalls
    (compiles, syncs, Python, the engine's step loop) from slow kernels."""
    if not kernels:
        return {}
    start, busy, end, gaps, before = kernels[0]["ts"], 0.0, kernels[0]["ts"], [], None
    for e in kernels:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, end - start, before, e["name"][:60]))
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        end, before = max(end, e["ts"] + e["dur"]), e["name"][:60]
    gaps.sort(reverse=True)
    by_pair: dict[tuple, list] = {}
    for us, _, after, before_next in gaps:
        total = by_pair.setdefault((after, before_next), [0.0, 0])
        total[0] += us
        total[1] += 1
    pairs = sorted(by_pair.items(), key=lambda kv: -kv[1][0])
    return {
        "span_us": end - start,
        "busy_us": busy,
        "idle_us": sum(g[0] for g in gaps),
        "longest": [dict(us=g[0], at_us=g[1], after=g[2], before=g[3]) for g in gaps[:top]],
        "by_pair": [dict(us=us, count=n, after=a, before=b) for (a, b), (us, n) in pairs[:top]],
    }


def profile_variant(
    model_dir: str, tag: str, batches: list[int], tokens: int, trace: bool, spread_routers: bool = False,
    fresh: bool = False,
) -> None:
    import json
    import tempfile

    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    llm = dummy_engine(model_dir, spread_routers=spread_routers)
    for batch in batches:
        name = tag if len(batches) == 1 else f"{tag}_b{batch}"
        prompts, sp = random_prompts(np.random.default_rng(0), batch), fixed_length(tokens)
        llm.generate(prompts, sp, use_tqdm=False)  # warm-up: same shapes, nothing first-run in the profile
        if fresh:  # other prompts of the same length: the profiled batch computes its whole prefill
            prompts = random_prompts(np.random.default_rng(1), batch)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            wall = time.perf_counter() - t
        rows = [(e.key, e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0]
        rows.sort(key=lambda r: -r[1])
        total = sum(r[1] for r in rows)
        kind = "fresh" if fresh else "prefix-cached"
        head = f"# {name}: batch {batch}, {tokens} tokens out ({kind} prompts), wall {wall:.3f} s"
        lines = [f"{head}, kernel time {total / 1e3:.1f} ms ({len(rows)} kernel names)",
                 f"{'us total':>10} {'share':>6} {'us/step':>8} {'calls':>7}  kernel"]  # fmt: skip
        for kernel, us, count in rows[:TOP]:
            lines.append(f"{us:10.0f} {us / total:6.1%} {us / tokens:8.1f} {count:7d}  {kernel[:110]}")
        text = "\n".join(lines)
        print(text, flush=True)
        (OUT / f"serving_profile_{name}.txt").write_text(text + "\n")
        if trace:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                prof.export_chrome_trace(f.name)
                kernels = kernel_events(json.loads(Path(f.name).read_text()))
            gaps = idle_gaps(kernels)
            config = json.loads((Path(model_dir) / "config.json").read_text())
            meta = dict(variant=tag, batch=batch, tokens=tokens, config=config, idle=gaps,
                        launches=expert_gemm_launches(kernels))  # fmt: skip
            (OUT / f"serving_kernels_{tag}_b{batch}.json").write_text(json.dumps(meta))
            if gaps:
                longest = ", ".join(
                    f"{g['us'] / 1e3:.2f} ms at {g['at_us'] / 1e3:.1f}" for g in gaps["longest"][:4]
                )
                busy = f"GPU busy {gaps['busy_us'] / 1e3:.1f} of {gaps['span_us'] / 1e3:.1f} ms"
                print(f"# {name}: {busy}; longest idle {longest}", flush=True)
                for p in gaps["by_pair"][:5]:
                    print(f"#   idle {p['us'] / 1e3:.2f} ms in {p['count']} gaps: {p['after']} -> {p['before']}",
                          flush=True)


def record_routing(
    model_dir: str, batches: list[int], tokens: int, path: str, spread_routers: bool = False
) -> None:
    """Eager engine; saves (layer key, topk ids, topk weights) of every MoE layer at every decode step of every
    batch size (the ids' rows are the batch size)."""
    import numpy as np
    import torch

    from vllm_mxmoe import moe

    samples, current = [], {"batch": None}  # None while the engine starts (its warm-up runs)
    forward = moe.MxMoEFusedMoEMethod.forward_eager

    def recording(self, layer, x, topk_weights, topk_ids):
        if x.shape[0] == current["batch"]:  # decode steps only (prefill batches are larger)
            samples.append((layer.mxmoe_key, topk_ids.to("cpu", torch.int32), topk_weights.float().cpu()))
        return forward(self, layer, x, topk_weights, topk_ids)

    moe.MxMoEFusedMoEMethod.forward_eager = recording
    llm = dummy_engine(model_dir, spread_routers=spread_routers, enforce_eager=True)
    for batch in batches:
        current["batch"] = batch
        llm.generate(random_prompts(np.random.default_rng(0), batch), fixed_length(tokens), use_tqdm=False)
    torch.save(samples, path)
    print(f"recorded {len(samples)} routings of {batches} tokens to {path}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="qwen3-30b-a3b", help="a name in speed_configs.CONFIGS")
    p.add_argument("--variants", default="gptq4_marlin,mxmoe_mixed325")
    p.add_argument("--batch", default="64", help="batch sizes, comma-separated")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--trace", action="store_true", help="also write every expert-GEMM launch in order")
    p.add_argument(
        "--record-routing", metavar="FILE", help="save decode-step routing (mxmoe variants) instead"
    )
    p.add_argument("--spread-routers", action="store_true", help=SPREAD_ROUTERS_HELP)
    p.add_argument("--fresh", action="store_true",
                   help="profile new prompts (the whole prefill computed) instead of the warm-up's cached ones")
    p.add_argument("--one", nargs=2, metavar=("MODEL_DIR", "TAG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    batches = ints(args.batch)
    if args.one and args.record_routing:
        path = args.record_routing.format(tag=args.one[1])
        record_routing(args.one[0], batches, args.tokens, path, args.spread_routers)
        return
    if args.one:
        profile_variant(args.one[0], args.one[1], batches, args.tokens, args.trace, args.spread_routers, args.fresh)
        return
    from benchmarks.speed_configs import CONFIGS, write_all

    paths = write_all(Path("/tmp/speed_cfgs") / args.config, CONFIGS[args.config])
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for tag in args.variants.split(","):
        cmd = [sys.executable, __file__, "--batch", args.batch, "--tokens", str(args.tokens),
               "--one", str(paths[tag]), f"{args.config}_{tag}"]  # fmt: skip
        if args.trace:
            cmd.append("--trace")
        if args.record_routing:
            cmd += ["--record-routing", args.record_routing]
        if args.spread_routers:
            cmd.append("--spread-routers")
        if args.fresh:
            cmd.append("--fresh")
        subprocess.run(cmd, env=env, check=False)


if __name__ == "__main__":
    main()
