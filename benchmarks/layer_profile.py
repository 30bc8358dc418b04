"""Where a fused MoE layer's time goes: GPU time per kernel of one mxmoe_fused_experts call.

Run from the repository root on a CUDA machine (no vLLM needed):

    PYTHONPATH=. python benchmarks/layer_profile.py --shape qwen3-30b-a3b --assign w4g128,w8a8fp8 --tokens 1,16,64,8192

The layer (benchmarks/kernel_check.make_layer, random weights) is captured in a CUDA graph
with Zipf routing as in kernel_check, replayed 20 times under torch.profiler, and each
kernel's mean time per replay is printed next to the replay's wall time. Writes
$OUT/layer_profile.txt as well.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import kernel_check as kc  # noqa: E402
from vllm_mxmoe.kernels.fused_moe import mxmoe_fused_experts  # noqa: E402

REPLAYS = 20


def profile_layer(shape: str, assign: str, tokens: int) -> list[str]:
    s = kc.SHAPES[shape]
    w13, w2 = kc.make_layer(shape, assign)
    ids, weights = kc.zipf_routing(tokens, s["experts"], s["topk"], seed=tokens)
    x = torch.randn(tokens, s["hidden"], device="cuda", dtype=kc.DTYPE)
    for _ in range(3):  # compile outside the graph
        mxmoe_fused_experts(x, w13, w2, weights, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mxmoe_fused_experts(x, w13, w2, weights, ids)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    per_kernel: dict[str, list[float]] = {}
    for e in events:
        per_kernel.setdefault(e.name[:60], []).append(e.device_time)
    wall = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / REPLAYS
    lines = [f"== {shape} {assign} {tokens} tokens: wall per replay {wall:.1f} us"]
    for name, times in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"   {sum(times) / REPLAYS:7.1f} us  x{len(times) // REPLAYS}  {name}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", help=f"one of {', '.join(kc.SHAPES)}")
    ap.add_argument("--assign", default="w4g128,mixed3.25,w8a8fp8", help="layer assignments (kernel_check names)")
    ap.add_argument("--tokens", default="1,16,64,8192")
    ap.add_argument("--zipf-s", type=float, default=kc.ZIPF_S, help="routing skew (0: uniform)")
    args = ap.parse_args()
    kc.ZIPF_S = args.zipf_s
    if not torch.cuda.is_available():
        sys.exit("layer_profile.py needs a CUDA GPU")
    if args.shape not in kc.SHAPES:
        sys.exit(f"unknown shape {args.shape!r}: expected one of {', '.join(kc.SHAPES)}")
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for assign in args.assign.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            block = profile_layer(args.shape, assign, tokens)
            print("\n".join(block), flush=True)
            lines += block
    (out / "layer_profile.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
