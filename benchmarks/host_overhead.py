"""Host-side cost of one MoE layer forward outside CUDA graphs.

On the CPU (default): mxmoe_fused_experts with every Triton launch replaced by a no-op.

vLLM runs prefill chunks larger than its biggest CUDA graph eagerly; there the plugin's Python between two
kernels (config choice, routing buffers, launch arguments) is time the GPU may sit idle
(`serving_profile.py --trace` shows it as idle gaps next to our kernels). This times that Python alone, so it
leaves out the launches themselves (triton's launcher, the driver) and vLLM's custom-op dispatch:

    PYTHONPATH=. python benchmarks/host_overhead.py --shape qwen3-30b-a3b --assign mixed3.25 --tokens 4096

On a GPU (``--device cuda``): the real launches, timed from the host. Per call it reports the host time to
enqueue one layer (median over the calls) next to the wall time per call with the GPU kept busy (a run of calls
and one synchronisation). While the host time stays below the GPU's, an eager step never waits for our Python.
With vLLM importable (``--baselines``), vLLM's GPTQ-Marlin and bf16 fused-MoE ops are timed the same way:

    . /tmp/vk/env.sh && PYTHONPATH=. python benchmarks/host_overhead.py --device cuda --tokens 16,4096 --baselines
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


def cuda_host_and_wall_us(forward, calls: int = 50, reps: int = 5) -> tuple[float, float]:
    """(median host microseconds to enqueue one call, wall microseconds per call over ``calls`` back-to-back
    calls and one synchronisation), the best of ``reps`` runs each. ``calls`` stays small enough that the
    launch queue never fills (a full queue would block the host and count GPU time as host time)."""
    forward()
    torch.cuda.synchronize()
    hosts, walls = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        per_call = []
        start = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            forward()
            per_call.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) / calls * 1e6)
        hosts.append(sorted(per_call)[calls // 2] * 1e6)
    return min(hosts), min(walls)


def cuda_layers(shape: str, assign: str, baselines: bool) -> dict:
    """name -> impl with run(x, topk_weights, topk_ids): ours, and vLLM's Marlin and bf16 ops if asked for."""
    from benchmarks import baselines as bl

    s = kc.SHAPES[shape]
    impls = [bl.Ours(shape, s, assign)]
    if baselines:
        impls += [bl.Marlin(s), bl.VllmBf16(s)]
    return {impl.name: impl for impl in impls}


def run_cuda(shape: str, assign: str, token_counts: list[int], baselines: bool, calls: int, reps: int) -> None:
    s = kc.SHAPES[shape]
    impls = cuda_layers(shape, assign, baselines)
    print(f"# {shape}, Zipf routing, real launches on {torch.cuda.get_device_name()}; host = median time to enqueue "
          f"one layer, wall = time per layer with the GPU kept busy (best of {reps} runs of {calls} calls)")
    context = contextlib.nullcontext()
    if baselines:  # vLLM's fused_experts reads the current vLLM config
        from vllm.config import VllmConfig, set_current_vllm_config

        context = set_current_vllm_config(VllmConfig())
    with context:
        for tokens in token_counts:
            x = torch.randn(tokens, s["hidden"], device="cuda", dtype=torch.bfloat16)
            ids, weights = kc.zipf_routing(tokens, s["experts"], s["topk"], seed=tokens)
            for name, impl in impls.items():
                host, wall = cuda_host_and_wall_us(lambda: impl.run(x, weights, ids), calls, reps)  # noqa: B023
                idle = "GPU waits on the host" if host > 0.9 * wall else "host ahead"
                print(f"tokens {tokens:6d} {name:18s} host {host:8.1f} us  wall {wall:8.1f} us  ({idle})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", help=f"one of {', '.join(kc.LAYER_SHAPES)}")
    ap.add_argument("--assign", default="mixed3.25", help="layer schemes, as kernel_check.py --assign")
    ap.add_argument("--tokens", default="16,4096", help="comma-separated token counts")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=None, help="calls per repetition (default 200 on the CPU, 50 on a GPU)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: launches stubbed; cuda: real launches, host and wall time per call")
    ap.add_argument("--baselines", action="store_true", help="with --device cuda: also vLLM's Marlin and bf16 ops")
    args = ap.parse_args()
    if args.shape not in kc.LAYER_SHAPES:
        ap.error(f"unknown --shape {args.shape}: expected one of {', '.join(kc.LAYER_SHAPES)}")
    token_counts = [int(t) for t in args.tokens.split(",")]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is visible")
        run_cuda(args.shape, args.assign, token_counts, args.baselines, args.calls or 50, args.reps)
        return
    if args.baselines:
        ap.error("--baselines needs --device cuda")
    calls = args.calls or 200
    with stubbed_kernel_launches() as stubbed:
        print(f"# host time per mxmoe_fused_experts call, {args.shape} {args.assign}, launches stubbed "
              f"({len(stubbed)} kernels), torch {torch.__version__}, {os.cpu_count()} CPUs")
        for tokens in token_counts:
            times = host_us_per_call(args.shape, args.assign, tokens, args.reps, calls)
            print(f"tokens {tokens:6d}: min {min(times):7.1f} us, median {sorted(times)[len(times) // 2]:7.1f} us")


if __name__ == "__main__":
    main()
