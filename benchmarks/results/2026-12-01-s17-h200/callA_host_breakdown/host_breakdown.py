"""Where the host time of one eager MoE layer goes (dev probe, session 17).

Real launches on the GPU: cProfile of the layer forward, and each Triton kernel launched through
triton's JITFunction.__getitem__ against the CompiledKernel it returned (no binding), plus torch ops.
"""
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import triton  # noqa: E402

import benchmarks.kernel_check as kc  # noqa: E402
from vllm_mxmoe.kernels import act_quant, align, fused_moe, grouped_gemm  # noqa: E402

print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
SHAPE, ASSIGN = sys.argv[1] if len(sys.argv) > 1 else "qwen1.5-moe", "mixed3.25"
s = kc.SHAPES[SHAPE]
w13, w2 = kc.make_layer(SHAPE, ASSIGN)


def host_us(fn, calls=400, sync_every=20):
    fn()
    torch.cuda.synchronize()
    per = []
    for i in range(calls):
        t = time.perf_counter()
        fn()
        per.append(time.perf_counter() - t)
        if i % sync_every == sync_every - 1:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    per.sort()
    return per[len(per) // 2] * 1e6


# Record every triton launch of one forward: (module, name, grid, args, kwargs, compiled kernel)
records = []


class Recorder:
    def __init__(self, mod, name, fn):
        self.mod, self.name, self.fn = mod, name, fn

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            k = self.fn[grid](*args, **kwargs)
            records.append((self.name, self.fn, grid, args, kwargs, k))
            return k
        return run


for tokens in (16, 2048):
    x = torch.randn(tokens, s["hidden"], device="cuda", dtype=torch.bfloat16)
    ids, tw = kc.zipf_routing(tokens, s["experts"], s["topk"], seed=tokens)

    def forward():
        fused_moe.mxmoe_fused_experts(x, w13, w2, tw, ids)

    print(f"\n=== tokens {tokens}: forward host median {host_us(forward):.1f} us")
    pr = cProfile.Profile()
    forward()
    torch.cuda.synchronize()
    pr.enable()
    for i in range(200):
        forward()
        if i % 20 == 19:
            torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(40)
    print(buf.getvalue()[-6000:])

    records.clear()
    saved = []
    for mod in (act_quant, align, fused_moe, grouped_gemm):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction):
                saved.append((mod, name, obj))
                setattr(mod, name, Recorder(mod, name, obj))
    try:
        forward()
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
    torch.cuda.synchronize()
    for name, fn, grid, args, kwargs, k in records:
        via_jit = host_us(lambda: fn[grid](*args, **kwargs))  # noqa: B023
        params = [p.name for p in fn.params]
        full = list(args) + [kwargs[p] for p in params[len(args):]]
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        runner = k[grid3]
        direct = host_us(lambda: runner(*full))  # noqa: B023
        stream = torch.cuda.current_stream().cuda_stream
        from triton.backends.nvidia.driver import CudaLauncher  # noqa: F401
        raw = host_us(lambda: k.run(grid3[0], grid3[1], grid3[2],  # noqa: B023
                                    stream, k.function, k.packed_metadata, None, None, None, *full))  # noqa: B023
        print(f"{name:28s} args {len(args):2d} kwargs {len(kwargs):2d}: jit {via_jit:6.1f} us, "
              f"compiled[grid] {direct:6.1f} us, kernel.run {raw:6.1f} us")

for label, fn in [
    ("torch.empty(4096, int32)", lambda: torch.empty(4096, dtype=torch.int32, device="cuda")),
    ("torch.zeros(4096, int32)", lambda: torch.zeros(4096, dtype=torch.int32, device="cuda")),
    ("current_stream().cuda_stream", lambda: torch.cuda.current_stream().cuda_stream),
    ("tensor.data_ptr()", lambda: x.data_ptr()),
    ("w.qweight.view(float8)", lambda: w13.qweight.view(torch.float8_e4m3fn)),
    ("slice x[:100]", lambda: x[:100]),
]:
    print(f"{label:32s} {host_us(fn, calls=2000, sync_every=1000):6.2f} us")
