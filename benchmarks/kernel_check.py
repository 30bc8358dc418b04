"""GPU check and timing of the mixed-precision MoE kernels (vllm_mxmoe.kernels.fused_moe).

Run from the repository root on a CUDA machine (no vLLM needed):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/kernel_check.py [--quick]

(a) correctness in bf16 against reference_fused_experts: every known scheme
    mixed in one layer, real shapes, 1/16/256/2048 tokens, outputs poisoned
    with NaN, fresh random inputs;
(b) timing (CUDA-graph replay, median) of the whole layer and of each GEMM for
    uniform w4g128 and a mixed ~3.25-bit assignment, Zipf-skewed routing,
    1..8192 tokens. The yardsticks are measured in the same run: device copy
    bandwidth (bytes read + written) for the weight bytes the routed experts
    hold, and a bf16 matmul rate for the FLOPs.

Writes $OUT/kernel_check.txt (the table, also printed) and $OUT/kernel_check.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import asdict, replace

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_mxmoe.format import FP8_MAX, QuantizedWeight, encode  # noqa: E402
from vllm_mxmoe.kernels.align import align_routing  # noqa: E402
from vllm_mxmoe.kernels.act_quant import quantize_fp8_per_token, silu_and_mul  # noqa: E402
from vllm_mxmoe.kernels.fused_moe import mxmoe_fused_experts, select_configs  # noqa: E402
from vllm_mxmoe.kernels.grouped_gemm import grouped_gemm, needs_fp8_activations  # noqa: E402
from vllm_mxmoe.kernels.layout import ExpertGemmWeights, block_sizes  # noqa: E402
from vllm_mxmoe.kernels.reference import reference_fused_experts  # noqa: E402
from vllm_mxmoe.schemes import KNOWN_SCHEMES, parse_scheme  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = "cuda"
SHAPES = {
    "qwen1.5-moe": dict(hidden=2048, inter=1408, experts=60, topk=4),
    "qwen3-30b-a3b": dict(hidden=2048, inter=768, experts=128, topk=8),
}
CHECK_TOKENS = (1, 16, 256, 2048)
TIME_TOKENS = (1, 16, 64, 256, 1024, 8192)
ZIPF_S = 1.0
LAYER_COPIES = 4  # > L2 (about 50 MB) for every timed layer
TOL_BF16 = 2e-2  # bf16 operands (1e-3..1e-2) plus fp8 activations on some experts


# ---------------------------------------------------------------------------
# Layers and routing


def assignment(name: str, experts: int, seed: int) -> tuple[list[str], list[str]]:
    """(gate_up schemes, down schemes) per expert: a scheme name (uniform), mixed3.25, or all."""
    if name in KNOWN_SCHEMES:
        return [name] * experts, [name] * experts
    if name == "mixed3.25":  # E[bits] = .25 * 2.25 + .5 * 3.25 + .25 * 4.25 = 3.25
        g = torch.Generator().manual_seed(seed)
        pick = lambda: ["w2g128", "w3g128", "w3g128", "w4g128"][int(torch.randint(4, (1,), generator=g))]  # noqa: E731
        return [pick() for _ in range(experts)], [pick() for _ in range(experts)]
    if name == "all":
        n = len(KNOWN_SCHEMES)
        return [KNOWN_SCHEMES[e % n] for e in range(experts)], [KNOWN_SCHEMES[(e + 5) % n] for e in range(experts)]
    raise ValueError(name)


def rtn_quantize(w: torch.Tensor, scheme):
    n, k = w.shape
    if scheme.weight_is_fp8:
        return encode_any(w, w.abs().amax(1, keepdim=True).clamp(min=1e-8) / FP8_MAX, None, scheme)
    g = scheme.group(k)
    wg = w.reshape(n, k // g, g)
    if scheme.symmetric:
        return encode_any(w, wg.abs().amax(-1).clamp(min=1e-8) / ((1 << (scheme.bits - 1)) - 1), None, scheme)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo).clamp(min=1e-8) / scheme.qmax
    return encode_any(w, scale, torch.round(-lo / scale), scheme)


def encode_any(w, scale, zero, scheme):
    """format.encode, or where its packer's package (compressed-tensors) is missing, as on
    the GPU machine, the same rounding packed here by format v1's documented word order.
    A packing mistake here would show as a failed check against the reference (which
    unpacks with format.unpack)."""
    try:
        return encode(w, scale, zero, scheme)
    except ImportError:
        return _encode_v1(w, scale, zero, scheme)


def _encode_v1(w, scale, zero, scheme):
    n, k = w.shape
    scale16 = scale.to(torch.float16)
    if scheme.weight_is_fp8:
        q = (w.float() / scale16.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight(scheme, q, scale16, None)
    g = scheme.group(k)
    s = scale16.float().repeat_interleave(g, dim=1)
    zero16 = None if scheme.symmetric else zero.to(torch.float16)
    offset = (1 << (scheme.bits - 1)) if scheme.symmetric else zero16.float().repeat_interleave(g, dim=1)
    q = (torch.round(w.float() / s) + offset).clamp(0, scheme.qmax).to(torch.int64)

    def words(codes, bits):  # word j holds elements j*f .. j*f+f-1, element i at bit i*bits
        f = 32 // bits
        c = codes.reshape(codes.shape[0], -1, f)
        v = (c << (torch.arange(f, device=c.device) * bits)).sum(-1)
        return (v - ((v >> 31) & 1) * (1 << 32)).to(torch.int32)

    if scheme.bits == 3:  # per 32-element chunk: low 2 bits of 0-15, of 16-31, then bit 2 of all
        chunks = q.reshape(n, k // 32, 32)
        low = words((chunks & 3).reshape(n, -1), 2).reshape(n, k // 32, 2)
        high = words((chunks >> 2).reshape(n, -1), 1).reshape(n, k // 32, 1)
        packed = torch.cat([low, high], dim=2).reshape(n, -1)
    else:
        packed = words(q, scheme.bits)
    return QuantizedWeight(scheme, packed, scale16, zero16)


def make_weights(names: list[str], n: int, k: int, seed: int, fill: bool = True) -> ExpertGemmWeights:
    schemes = [parse_scheme(s) for s in names]
    weights = ExpertGemmWeights.allocate(schemes, n, k, device=DEVICE)
    if not fill:  # compile warm-up: the launch only needs the right shapes and meta
        return weights
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    for e, scheme in enumerate(schemes):
        qw = rtn_quantize(torch.randn(n, k, device=DEVICE, generator=g) / math.sqrt(k), scheme)
        weights.packed_view(e).copy_(qw.packed)
        weights.scale_view(e).copy_(qw.scale)
        if qw.zero is not None:
            weights.zero_view(e).copy_(qw.zero)
    return weights


def make_layer(shape: str, assign: str, fill: bool = True):
    s = SHAPES[shape]
    s13, s2 = assignment(assign, s["experts"], seed=7)
    w13 = make_weights(s13, 2 * s["inter"], s["hidden"], seed=1, fill=fill)
    w2 = make_weights(s2, s["hidden"], s["inter"], seed=2, fill=fill)
    return w13, w2


def zipf_routing(tokens: int, experts: int, topk: int, seed: int):
    """Distinct top-k experts per token drawn with Zipf(ZIPF_S) popularity over a random expert order."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rank = torch.randperm(experts, device=DEVICE, generator=g)
    p = 1.0 / (rank.float() + 1.0) ** ZIPF_S
    ids = torch.multinomial(p.expand(tokens, experts), topk, replacement=False, generator=g).to(torch.int32)
    weights = torch.randn(tokens, topk, device=DEVICE, generator=g).softmax(-1)
    return ids, weights


def routed_weight_bytes(w: ExpertGemmWeights, ids: torch.Tensor) -> int:
    """Packed weight + scale + zero bytes of the experts that received a token (what must be read)."""
    busy = torch.unique(ids).tolist()
    total = 0
    for e in busy:
        words, scales, zeros = block_sizes(w.schemes[e], w.n, w.k)
        total += words * 4 + (scales + zeros) * 2
    return total


def avg_bits(w13: ExpertGemmWeights, w2: ExpertGemmWeights) -> float:
    bits = sum(s.storage_bits(w13.n, w13.k) for s in w13.schemes) + sum(s.storage_bits(w2.n, w2.k) for s in w2.schemes)
    return bits / (w13.num_experts * (w13.n * w13.k + w2.n * w2.k))


# ---------------------------------------------------------------------------
# Config variants compared in the timing part (the table's choice is "table")


def variants(tokens: int, topk: int, w13, w2) -> dict[str, tuple]:
    c1, c2 = select_configs(tokens, topk, w13, w2, torch.device(DEVICE))
    out = {"table": (c1, c2)}
    if c1.block_m <= 32:  # decode-like: split-K, tile width, and no software pipelining of packed words
        if c1.split_k > 1 or c2.split_k > 1:
            out["no_split"] = (replace(c1, split_k=1), replace(c2, split_k=1))
        out["bn128"] = (replace(c1, block_n=128), replace(c2, block_n=128))
        out["stages1"] = (replace(c1, num_stages=1), replace(c2, num_stages=1))
    elif c1.block_m == 64:
        out["bm128_w8"] = tuple(replace(c, block_m=128, num_warps=8) for c in (c1, c2))
    else:
        out["bm64_w4"] = tuple(replace(c, block_m=64, num_warps=4) for c in (c1, c2))
    return out


def timing_jobs(assigns: list[str], quick: bool) -> list[tuple[str, str, int, str]]:
    jobs = []
    for shape in SHAPES:
        for assign in assigns:
            for t in TIME_TOKENS:
                names = ["table"]
                if shape == list(SHAPES)[-1] and not quick:  # config variants on the last shape only
                    w13, w2 = make_layer(shape, assign, fill=False)
                    names = list(variants(t, SHAPES[shape]["topk"], w13, w2))
                jobs += [(shape, assign, t, v) for v in names]
    return jobs


# ---------------------------------------------------------------------------
# Compile warm-up in parallel processes (triton's disk cache is shared)


def _warm(job) -> str:
    shape, assign, tokens, variant = job
    try:
        torch.cuda.set_device(0)
        w13, w2 = make_layer(shape, assign, fill=False)
        topk = SHAPES[shape]["topk"]
        cfgs = variants(tokens, topk, w13, w2)[variant] if variant != "table" else None
        ids, tw = zipf_routing(tokens, w13.num_experts, topk, seed=tokens)
        x = torch.randn(tokens, w13.k, device=DEVICE, dtype=DTYPE)
        mxmoe_fused_experts(x, w13, w2, tw, ids, configs=cfgs)
        torch.cuda.synchronize()
        return ""
    except Exception:  # reported, and the main process will hit the same error with context
        return f"{job}: {traceback.format_exc(limit=3)}"


def warm_up(jobs, procs: int) -> float:
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        for err in pool.imap_unordered(_warm, jobs):
            if err:
                print("warm-up failed:", err, flush=True)
    return time.time() - t0


# ---------------------------------------------------------------------------
# (a) correctness


def check_correctness(shape: str, layers) -> list[dict]:
    rows = []
    s = SHAPES[shape]
    w13, w2 = layers
    for tokens in CHECK_TOKENS:
        ids, tw = zipf_routing(tokens, s["experts"], s["topk"], seed=100 + tokens)
        x = torch.randn(tokens, s["hidden"], device=DEVICE, dtype=DTYPE)
        out = torch.full_like(x, float("nan"))
        mxmoe_fused_experts(x, w13, w2, tw, ids, out=out)
        ref = reference_fused_experts(x, w13, w2, tw, ids)
        unwritten = int(out.isnan().sum())
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append(dict(shape=shape, tokens=tokens, rel_err=err, unwritten=unwritten,
                         ok=unwritten == 0 and err < TOL_BF16))
    # expert parallelism: half the experts local
    tokens = 64
    ids, tw = zipf_routing(tokens, s["experts"], s["topk"], seed=5)
    emap = torch.full((s["experts"],), -1, dtype=torch.int32, device=DEVICE)
    local = torch.arange(0, s["experts"], 2, device=DEVICE)
    emap[local] = torch.arange(local.numel(), dtype=torch.int32, device=DEVICE)
    w13l, w2l = slice_experts(w13, local.tolist()), slice_experts(w2, local.tolist())
    x = torch.randn(tokens, s["hidden"], device=DEVICE, dtype=DTYPE)
    out = torch.full_like(x, float("nan"))
    mxmoe_fused_experts(x, w13l, w2l, tw, ids, emap, out=out)
    ref = reference_fused_experts(x, w13l, w2l, tw, ids, emap)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    rows.append(dict(shape=shape + " EP/2", tokens=tokens, rel_err=err, unwritten=int(out.isnan().sum()),
                     ok=not out.isnan().any() and err < TOL_BF16))
    return rows


def slice_experts(w: ExpertGemmWeights, experts: list[int]) -> ExpertGemmWeights:
    sub = ExpertGemmWeights.allocate([w.schemes[e] for e in experts], w.n, w.k, device=DEVICE)
    for i, e in enumerate(experts):
        sub.packed_view(i).copy_(w.packed_view(e))
        sub.scale_view(i).copy_(w.scale_view(e))
        if w.zero_view(e) is not None:
            sub.zero_view(i).copy_(w.zero_view(e))
    return sub


# ---------------------------------------------------------------------------
# (b) timing


def bench(fn) -> float:
    """Median ms of CUDA-graph replays (capture also proves there is no host sync)."""
    if DEVICE == "cpu":  # --cpu-smoke: one run, to exercise the script
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")


def copy_bandwidth() -> float:
    if DEVICE == "cpu":
        return 1.0
    src = torch.empty(2 << 30, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    return 2 * src.numel() / ms / 1e9  # TB/s, read + write


def matmul_tflops() -> float:
    if DEVICE == "cpu":
        return 1.0
    a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    ms = triton.testing.do_bench(lambda: a @ b, rep=200, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def copy_weights(w: ExpertGemmWeights) -> ExpertGemmWeights:
    return replace(w, qweight=w.qweight.clone(), scales=w.scales.clone(), zeros=w.zeros.clone())


def layer_copies(layers, n: int):
    """n copies of a layer: timing cycles through them so that weights come from HBM, not L2,
    as in a model where the next call of this kernel is another layer's."""
    w13, w2 = layers
    return [(w13, w2)] + [(copy_weights(w13), copy_weights(w2)) for _ in range(n - 1)]


def time_case(shape: str, assign: str, copies, tokens: int, variant: str, copy_tbs: float, mm_tflops: float,
              gemms: bool) -> dict:
    s = SHAPES[shape]
    w13, w2 = copies[0]
    topk = s["topk"]
    cfg1, cfg2 = variants(tokens, topk, w13, w2)[variant]
    ids, tw = zipf_routing(tokens, s["experts"], topk, seed=tokens)
    x = torch.randn(tokens, s["hidden"], device=DEVICE, dtype=DTYPE)
    out = torch.empty_like(x)
    turn = itertools.cycle(copies)

    def layer():
        a, b = next(turn)
        mxmoe_fused_experts(x, a, b, tw, ids, configs=(cfg1, cfg2), out=out)

    layer_ms = bench(layer)
    g1_ms = g2_ms = float("nan")
    if gemms:  # the GEMMs alone, on inputs prepared once
        routing = align_routing(ids, s["experts"], cfg1.block_m)
        x8 = quantize_fp8_per_token(x) if needs_fp8_activations(w13) else None
        gate_up = grouped_gemm(x, w13, routing, cfg1, a_row_div=topk, a_fp8=x8)
        act, act8 = silu_and_mul(gate_up, routing.slot_expert, DTYPE, needs_fp8_activations(w2))
        down = grouped_gemm(act, w2, routing, cfg2, a_fp8=act8, routed_weights=tw.reshape(-1))
        g1_ms = bench(lambda: grouped_gemm(x, next(turn)[0], routing, cfg1, a_row_div=topk, a_fp8=x8, out=gate_up))
        g2_ms = bench(lambda: grouped_gemm(act, next(turn)[1], routing, cfg2, a_fp8=act8,
                                           routed_weights=tw.reshape(-1), out=down))

    b13, b2 = routed_weight_bytes(w13, ids), routed_weight_bytes(w2, ids)
    flops = 2 * tokens * topk * (w13.n * w13.k + w2.n * w2.k)
    floor_ms = max((b13 + b2) / (copy_tbs * 1e9), flops / (mm_tflops * 1e9))
    return dict(
        shape=shape, assign=assign, tokens=tokens, variant=variant,
        cfg1=asdict(cfg1), cfg2=asdict(cfg2),
        layer_us=layer_ms * 1e3, gemm1_us=g1_ms * 1e3, gemm2_us=g2_ms * 1e3,
        weight_mb=(b13 + b2) / 1e6,
        layer_tbs=(b13 + b2) / (layer_ms * 1e9), gemm1_tbs=b13 / (g1_ms * 1e9), gemm2_tbs=b2 / (g2_ms * 1e9),
        tflops=flops / (layer_ms * 1e9), floor_us=floor_ms * 1e3, floor_frac=floor_ms / layer_ms,
    )


def cpu_smoke_setup():
    """Exercise this script on a CPU: tiny shapes, fp16 (the interpreter's bf16 dot is wrong)."""
    global DEVICE, DTYPE, SHAPES, CHECK_TOKENS, TIME_TOKENS
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--cpu-smoke needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    DEVICE, DTYPE = "cpu", torch.float16
    SHAPES = {"tiny-a": dict(hidden=256, inter=128, experts=12, topk=2), "tiny-b": dict(hidden=128, inter=256, experts=16, topk=4)}
    CHECK_TOKENS, TIME_TOKENS = (1, 9), (1, 40)


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="table configs only, no variants")
    ap.add_argument("--assign", default="w4g128,mixed3.25",
                    help="layers to time: scheme names (uniform layers, e.g. w2g128,w3g128,w8), mixed3.25")
    ap.add_argument("--procs", type=int, default=12, help="processes compiling in parallel")
    ap.add_argument("--budget-s", type=float, default=330, help="skip timing cases after this many seconds")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), fp16")
    args = ap.parse_args()
    if args.cpu_smoke:
        cpu_smoke_setup()
    out_dir = os.environ.get("OUT", ".")
    lines: list[str] = []
    results: dict = dict(check=[], timing=[])

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    def save():  # after each part, so a run cut short still leaves its results
        with open(os.path.join(out_dir, "kernel_check.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(out_dir, "kernel_check.json"), "w") as f:
            json.dump(results, f, indent=1)

    name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu (interpreter smoke run)"
    emit(f"# kernel_check {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, "
         f"torch {torch.__version__}, triton {triton.__version__}")
    t_start = time.time()
    jobs = [(shape, "all", t, "table") for shape in SHAPES for t in CHECK_TOKENS + (64,)]
    assigns = args.assign.split(",")
    jobs += timing_jobs(assigns, args.quick)
    if DEVICE == "cuda":
        emit(f"compile warm-up: {len(jobs)} cases in {warm_up(jobs, args.procs):.0f} s ({args.procs} processes)")

    copy_tbs, mm_tflops = copy_bandwidth(), matmul_tflops()
    emit(f"device copy bandwidth {copy_tbs:.2f} TB/s (read+write); bf16 matmul {mm_tflops:.0f} TFLOP/s")

    results.update(copy_tbs=copy_tbs, mm_tflops=mm_tflops)
    emit(f"\n## (a) correctness, {DTYPE}, every known scheme mixed, Zipf routing, NaN-poisoned outputs")
    emit(f"{'shape':22} {'tokens':>6} {'rel err':>9} {'unwritten':>9}  ok")
    for shape in SHAPES:
        try:
            layers = make_layer(shape, "all")
            for r in check_correctness(shape, layers):
                results["check"].append(r)
                emit(f"{r['shape']:22} {r['tokens']:6d} {r['rel_err']:9.2e} {r['unwritten']:9d}  {'ok' if r['ok'] else 'FAIL'}")
            del layers
        except Exception:
            emit(f"{shape}: correctness run failed:\n{traceback.format_exc()}")
    save()

    emit("\n## (b) timing: CUDA-graph replay median; TB/s = routed experts' weight bytes / time; "
         "floor = max(bytes / copy BW, FLOPs / matmul rate)")
    emit(f"{'shape':14} {'assign':9} {'tok':>5} {'variant':16} {'layer us':>9} {'g1 us':>8} {'g2 us':>8} "
         f"{'MB':>7} {'TB/s':>5} {'g1TB/s':>6} {'g2TB/s':>6} {'TFLOP/s':>7} {'floor us':>8} {'%floor':>6}")
    for shape in SHAPES:
        for assign in assigns:
            try:
                layers = make_layer(shape, assign)
                copies = layer_copies(layers, LAYER_COPIES if DEVICE == "cuda" else 1)
            except Exception:
                emit(f"{shape} {assign}: build failed:\n{traceback.format_exc()}")
                continue
            emit(f"# {shape} {assign}: {avg_bits(*layers):.3f} bits/weight with scales and zeros")
            for (js, ja, t, v) in jobs:
                if (js, ja) != (shape, assign):
                    continue
                if time.time() - t_start > args.budget_s:
                    emit(f"{shape} {assign} {t} {v}: skipped (time budget)")
                    continue
                try:
                    r = time_case(shape, assign, copies, t, v, copy_tbs, mm_tflops, gemms=v == "table")
                except Exception:
                    emit(f"{shape} {assign} {t} {v}: failed:\n{traceback.format_exc(limit=4)}")
                    continue
                results["timing"].append(r)
                emit(f"{shape[:14]:14} {assign:9} {t:5d} {v:16} {r['layer_us']:9.1f} {r['gemm1_us']:8.1f} "
                     f"{r['gemm2_us']:8.1f} {r['weight_mb']:7.1f} {r['layer_tbs']:5.2f} {r['gemm1_tbs']:6.2f} "
                     f"{r['gemm2_tbs']:6.2f} {r['tflops']:7.1f} {r['floor_us']:8.1f} {100 * r['floor_frac']:5.0f}%")
                save()
            del layers, copies
    emit(f"\ntotal {time.time() - t_start:.0f} s")
    save()


if __name__ == "__main__":
    main()
