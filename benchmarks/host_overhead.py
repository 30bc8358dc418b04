"""Host-side cost of one MoE layer forward outside CUDA graphs: mxmoe_fused_experts with every Triton launch
replaced by a no-op, on the CPU.

vLLM runs prefill chunks larger than its biggest CUDA graph eagerly; there the plugin's Python between two
kernels (config choice, routing buffers, launch arguments) is time the GPU may sit idle
(`serving_profile.py --trace` shows it as idle gaps next to our kernels). This times that Python alone, so it
leaves out the launches themselves (triton's launcher, the driver) and vLLM's custom-op dispatch:

    PYTHONPATH=. python benchmarks/host_overhead.py --shape qwen3-30b-a3b --assign mixed3.25 --tokens 4096
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import benchmarks.kernel_check as kc  # noqa: E402
from vllm_mxmoe.kernels import act_quant, align, dense_linear, fused_moe, grouped_gemm  # noqa: E402

KERNEL_MODULES = (act_quant, align, dense_linear, fused_moe, grouped_gemm)


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_kernel_launches():
    """Every jitted kernel of the kernel modules (names ending in _kernel) is a no-op inside the block;
    yields their names."""
    saved = [(mod, name, getattr(mod, name)) for mod in KERNEL_MODULES for name in dir(mod)
             if name.endswith("_kernel") and hasattr(getattr(mod, name), "__getitem__")]  # fmt: skip
    try:
        for mod, name, _ in saved:
            setattr(mod, name, _NoLaunch())
        yield [f"{mod.__name__.rsplit('.', 1)[-1]}.{name}" for mod, name, _ in saved]
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)


def host_us_per_call(shape: str, assign: str, tokens: int, reps: int = 7, calls: int = 200) -> list[float]:
    """Microseconds of host time per mxmoe_fused_experts call, one figure per repetition of ``calls`` calls."""
    kc.DEVICE = "cpu"
    s = kc.SHAPES[shape]
    w13, w2 = kc.make_layer(shape, assign, fill=False)
    x = torch.randn(tokens, s["hidden"], dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["experts"], (tokens, s["topk"]), dtype=torch.int32, generator=gen)
    weights = torch.rand(tokens, s["topk"], generator=gen)

    def forward():
        fused_moe.mxmoe_fused_experts(x, w13, w2, weights, ids)

    forward()  # first call: caches (tile configs, the layer's scheme summary)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            forward()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", help=f"one of {', '.join(kc.LAYER_SHAPES)}")
    ap.add_argument("--assign", default="mixed3.25", help="layer schemes, as kernel_check.py --assign")
    ap.add_argument("--tokens", default="16,4096", help="comma-separated token counts")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if args.shape not in kc.LAYER_SHAPES:
        ap.error(f"unknown --shape {args.shape}: expected one of {', '.join(kc.LAYER_SHAPES)}")
    with stubbed_kernel_launches() as stubbed:
        print(f"# host time per mxmoe_fused_experts call, {args.shape} {args.assign}, launches stubbed "
              f"({len(stubbed)} kernels), torch {torch.__version__}, {os.cpu_count()} CPUs")
        for tokens in (int(t) for t in args.tokens.split(",")):
            times = host_us_per_call(args.shape, args.assign, tokens, args.reps, args.calls)
            print(f"tokens {tokens:6d}: min {min(times):7.1f} us, median {sorted(times)[len(times) // 2]:7.1f} us")


if __name__ == "__main__":
    main()
