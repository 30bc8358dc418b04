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

import threading

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_mxmoe.format import FP8_MAX, QuantizedWeight, encode  # noqa: E402
from vllm_mxmoe.kernels import align as align_mod  # noqa: E402
from vllm_mxmoe.kernels import csrc_ext  # noqa: E402
from vllm_mxmoe.kernels.align import align_routing  # noqa: E402
from vllm_mxmoe.kernels.configs import config_for_key, default_dequant  # noqa: E402
from vllm_mxmoe.kernels.act_quant import quantize_fp8_per_token, silu_and_mul  # noqa: E402
from vllm_mxmoe.kernels.fused_moe import layer_gemm_keys, mxmoe_fused_experts, select_configs  # noqa: E402
from vllm_mxmoe.kernels.grouped_gemm import grouped_gemm, needs_fp8_activations  # noqa: E402
from vllm_mxmoe.kernels.layout import ExpertGemmWeights, block_sizes  # noqa: E402
from vllm_mxmoe.kernels.reference import fake_quant_fp8_per_token, reference_fused_experts, silu_mul  # noqa: E402
from vllm_mxmoe.schemes import KNOWN_SCHEMES, parse_scheme  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = "cuda"
# The four MoE layer shapes; this script checks and times the first two unless --shapes says
# otherwise (the other two compile tile configs of their own: slow), baselines.py and tile_sweep.py
# take any of them.
LAYER_SHAPES = {
    "qwen1.5-moe": dict(hidden=2048, inter=1408, experts=60, topk=4),
    "qwen3-30b-a3b": dict(hidden=2048, inter=768, experts=128, topk=8),
    "deepseek-v2-lite": dict(hidden=2048, inter=1408, experts=64, topk=6),
    "mixtral-8x7b": dict(hidden=4096, inter=14336, experts=8, topk=2),
}
SHAPES = dict(LAYER_SHAPES)
DEFAULT_SHAPES = ("qwen1.5-moe", "qwen3-30b-a3b")
CHECK_TOKENS = (1, 16, 128, 256, 512, 2048)  # 128-512: both decode tiles (16 and 32 rows)
MIX_CHECK_TOKENS = (1, 3, 16, 40, 512, 2048)  # the mixed3.25 layer: decode tiles, the 32-row tile, prefill tiles
TIME_TOKENS = (1, 16, 64, 256, 1024, 8192)
SPLIT_TOKENS = (1, 16, 64, 256, 8192)
ZIPF_S = 1.0  # routing skew of the timed layers; 0 = uniform (what random-weight routers give)
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
    if name == "mix2":  # ~2.3 bits: 3/4 w2 per channel, 1/4 w3g128
        g = torch.Generator().manual_seed(seed)
        pick = lambda: ["w2", "w2", "w2", "w3g128"][int(torch.randint(4, (1,), generator=g))]  # noqa: E731
        return [pick() for _ in range(experts)], [pick() for _ in range(experts)]
    if name == "int4mix":  # 4-bit weight-only schemes the csrc/ kernel takes, both packings in one layer:
        pool = ["w4g128", "w4g64_sym", "w4", "w4g32", "w4g128_sym"]  # groups >= 128: fragment order; < 128: v1
        return [pool[e % 5] for e in range(experts)], [pool[(e + 2) % 5] for e in range(experts)]
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
        weights.store_block(e, qw)
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
# Variants compared in the timing part: (cfg1, cfg2, options). "table" is what the
# shipped code runs by default; the others differ from it in one thing.


ALIGN_AB = False  # one-program vs three-kernel alignment: measured 2026-11-29 (KERNEL_NOTES.md)
VARIANT_MODES = [("v1", 0), ("asm", 2)]  # ("asm_pair", 3) was no better in sm_90 SASS: not timed


def _all_int4(w) -> bool:
    return all(s.bits == 4 and s.act != "fp8" and not s.weight_is_fp8 for s in w.schemes)


def _csrc_reads(w) -> bool:
    """The csrc/ kernel takes every 4-bit weight-only block (format-v1 or fragment order)."""
    return _all_int4(w)


def variants(tokens: int, topk: int, w13, w2) -> dict[str, tuple]:
    c1, c2 = select_configs(tokens, topk, w13, w2, torch.device(DEVICE))
    out = {"table": (c1, c2, {})}
    dflt = default_dequant(c1.block_m)
    for name, mode in VARIANT_MODES:
        if mode == dflt or (mode == 3 and (c1.block_m > 16 or not _all_int4(w13))):
            continue
        out[name] = (replace(c1, dequant=mode), replace(c2, dequant=mode), {})
    if c1.block_m <= 16:  # decode
        if c1.split_k > 1 or c2.split_k > 1:
            out["asm_nosplit"] = (replace(c1, split_k=1, dequant=2), replace(c2, split_k=1, dequant=2), {})
        if _csrc_reads(w13) and _csrc_reads(w2) and DEVICE == "cuda" and csrc_ext.available():
            out["csrc"] = (c1, c2, {"use_csrc": True})
    if ALIGN_AB and tokens * topk <= align_mod.ONE_PROGRAM_MAX_SLOTS:
        out["align3"] = (c1, c2, {"align3": True})
    return out


def run_layer(x, w13, w2, tw, ids, cfgs, out, emap=None):
    cfg1, cfg2, opts = cfgs
    saved = align_mod.ONE_PROGRAM_MAX_SLOTS
    if opts.get("align3"):
        align_mod.ONE_PROGRAM_MAX_SLOTS = 0
    try:
        return mxmoe_fused_experts(x, w13, w2, tw, ids, emap, configs=(cfg1, cfg2), out=out,
                                   use_csrc=opts.get("use_csrc", False))
    finally:
        align_mod.ONE_PROGRAM_MAX_SLOTS = saved


def timing_jobs(assigns: list[str], quick: bool) -> list[tuple[str, str, int, str]]:
    jobs = []
    for shape in SHAPES:
        for assign in assigns:
            for t in TIME_TOKENS:
                names = ["table"]
                if shape == list(SHAPES)[-1] and not quick:  # variants on the last shape only
                    w13, w2 = make_layer(shape, assign, fill=False)
                    names = list(variants(t, SHAPES[shape]["topk"], w13, w2))
                elif not quick:  # first shape: the dequant A/B only
                    w13, w2 = make_layer(shape, assign, fill=False)
                    names = [v for v in variants(t, SHAPES[shape]["topk"], w13, w2) if v in ("table", "v1", "asm")]
                jobs += [(shape, assign, t, v) for v in names]
    return jobs


# ---------------------------------------------------------------------------
# Compile warm-up in parallel processes (triton's disk cache is shared)


def _warm(job) -> str:
    saved = os.environ.get("MXMOE_DEQUANT")
    if job[0] in ("ptable", "split"):
        os.environ["MXMOE_DEQUANT"] = str(job[-1])
    try:
        return _warm_job(job)
    finally:
        if saved is None:
            os.environ.pop("MXMOE_DEQUANT", None)
        else:
            os.environ["MXMOE_DEQUANT"] = saved


def _warm_job(job) -> str:
    if job[0] == "split":
        try:
            torch.cuda.set_device(0)
            split_launch(job[1], (job[2],), time.time(), 1e9, warm_only=True)
            torch.cuda.synchronize()
            return ""
        except Exception:
            return f"{job}: {traceback.format_exc(limit=3)}"
    if job[0] == "ptable":
        try:
            torch.cuda.set_device(0)
            _, scheme, n, k, rows, _ = job
            w, cfg, routing, a, a8 = _ptable_case(scheme, n, k, rows, fill=False)
            grouped_gemm(a, w, routing, cfg, a_fp8=a8)
            torch.cuda.synchronize()
            return ""
        except Exception:
            return f"{job}: {traceback.format_exc(limit=3)}"
    shape, assign, tokens, variant = job
    try:
        torch.cuda.set_device(0)
        w13, w2 = make_layer(shape, assign, fill=False)
        topk = SHAPES[shape]["topk"]
        if variant.startswith("mode"):  # correctness layer under a dequant mode
            c1, c2 = select_configs(tokens, topk, w13, w2, torch.device(DEVICE))
            mode = int(variant[4:])
            cfgs = (replace(c1, dequant=mode), replace(c2, dequant=mode), {})
        else:
            cfgs = variants(tokens, topk, w13, w2)[variant]
            cfgs = (cfgs[0], cfgs[1], {k: v for k, v in cfgs[2].items() if k != "use_csrc"})  # no ext in workers
        ids, tw = zipf_routing(tokens, w13.num_experts, topk, seed=tokens)
        x = torch.randn(tokens, w13.k, device=DEVICE, dtype=DTYPE)
        run_layer(x, w13, w2, tw, ids, cfgs, None)
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


CHECK_MODES = {  # name -> (dequant mode or None for the default, use_csrc)
    "default": (None, False), "v1": (0, False), "asm": (2, False), "asm_pair": (3, False),
}


def check_correctness(shape: str, layers, mode: str = "default", tokens_list=None, label: str = "all") -> list[dict]:
    rows = []
    s = SHAPES[shape]
    w13, w2 = layers
    dequant, use_csrc = CHECK_MODES[mode] if mode in CHECK_MODES else (None, mode == "csrc")

    def cfgs(tokens, a, b):
        c1, c2 = select_configs(tokens, s["topk"], a, b, torch.device(DEVICE))
        if dequant is not None:
            c1, c2 = replace(c1, dequant=dequant), replace(c2, dequant=dequant)
        return c1, c2

    def check(tokens, name, ids, tw, a, b, emap=None):
        x = torch.randn(tokens, s["hidden"], device=DEVICE, dtype=DTYPE)
        out = torch.full_like(x, float("nan"))
        mxmoe_fused_experts(x, a, b, tw, ids, emap, configs=cfgs(tokens, a, b), out=out, use_csrc=use_csrc)
        ref = reference_fused_experts(x, a, b, tw, ids, emap)
        unwritten = int(out.isnan().sum())
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append(dict(shape=name, layer=label, mode=mode, tokens=tokens, rel_err=err, unwritten=unwritten,
                         ok=unwritten == 0 and err < TOL_BF16))

    for tokens in tokens_list or CHECK_TOKENS:
        ids, tw = zipf_routing(tokens, s["experts"], s["topk"], seed=100 + tokens + 7 * len(rows))
        check(tokens, shape, ids, tw, w13, w2)
    # expert parallelism: half the experts local
    tokens = 64 if not use_csrc else 8
    ids, tw = zipf_routing(tokens, s["experts"], s["topk"], seed=5 + len(rows))
    emap = torch.full((s["experts"],), -1, dtype=torch.int32, device=DEVICE)
    local = torch.arange(0, s["experts"], 2, device=DEVICE)
    emap[local] = torch.arange(local.numel(), dtype=torch.int32, device=DEVICE)
    w13l, w2l = slice_experts(w13, local.tolist()), slice_experts(w2, local.tolist())
    check(tokens, shape + " EP/2", ids, tw, w13l, w2l, emap)
    return rows


# Rows x columns of the fp8-copy check: odd sizes, rows of one block and of two (act 4096 > 2048).
FP8_CHECK_X = ((7, 200), (4096, 2048), (333, 768), (64, 1408), (16, 4096))
FP8_CHECK_ACT = ((9, 96), (5000, 768), (100, 1408), (30, 4096))


def check_fp8_copies() -> list[dict]:
    """The per-token fp8 copies (of x, and of act made by SiLU-and-mul) against torch's RTNE cast: exact
    for x; for act, whose SiLU may differ from torch's by an ulp, at most 1% of the fp8 values differ."""
    rows = []
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for n, k in FP8_CHECK_X:
        x = (torch.randn(n, k, device=DEVICE, generator=g) * torch.logspace(-3, 3, n, device=DEVICE)[:, None]).to(DTYPE)
        q, scale = quantize_fp8_per_token(x)
        want = (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        differ = (q.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()
        rows.append(dict(shape=f"x {n}x{k}", layer="fp8copy", mode="per-token", tokens=n, rel_err=differ,
                         unwritten=0, ok=differ == 0.0))
    for n, inter in FP8_CHECK_ACT:
        parts = (torch.randn(2, n, 2 * inter, device=DEVICE, generator=g) * 3).to(DTYPE)
        slot_expert = torch.zeros(n, dtype=torch.int32, device=DEVICE)
        slot_expert[::5] = -1  # other ranks' slots: skipped
        summed = parts.float().sum(0)
        want = fake_quant_fp8_per_token(silu_mul(summed).to(DTYPE))
        live = slot_expert >= 0
        for store_act in (True, False):
            _, (q, scale) = silu_and_mul(parts, slot_expert, DTYPE, True, store_act=store_act)
            differ = ((q.float() * scale[:, None]) != want)[live].float().mean().item()
            rows.append(dict(shape=f"act {n}x{inter}", layer="fp8copy", mode="silu" + ("" if store_act else "-noact"),
                             tokens=n, rel_err=differ, unwritten=0, ok=differ <= 0.01))
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
    cfgs = variants(tokens, topk, w13, w2)[variant]
    cfg1, cfg2, opts = cfgs
    use_csrc = bool(opts.get("use_csrc"))
    ids, tw = zipf_routing(tokens, s["experts"], topk, seed=tokens)
    x = torch.randn(tokens, s["hidden"], device=DEVICE, dtype=DTYPE)
    out = torch.empty_like(x)
    turn = itertools.cycle(copies)

    def layer():
        a, b = next(turn)
        run_layer(x, a, b, tw, ids, cfgs, out)

    layer_ms = bench(layer)
    g1_ms = g2_ms = float("nan")
    if gemms:  # the GEMMs alone, on inputs prepared once
        routing = align_routing(ids, s["experts"], cfg1.block_m)
        x8 = quantize_fp8_per_token(x) if needs_fp8_activations(w13) else None
        if use_csrc:
            gate_up = csrc_ext.w4_gemv(x, w13, routing, a_row_div=topk)
            act, act8 = silu_and_mul(gate_up, routing.slot_expert, DTYPE, False)
            down = csrc_ext.w4_gemv(act, w2, routing, routed_weights=tw.reshape(-1))
            g1_ms = bench(lambda: csrc_ext.w4_gemv(x, next(turn)[0], routing, a_row_div=topk, out=gate_up))
            g2_ms = bench(lambda: csrc_ext.w4_gemv(act, next(turn)[1], routing, routed_weights=tw.reshape(-1),
                                                   out=down))
        else:
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
        cfg1=asdict(cfg1), cfg2=asdict(cfg2), opts=opts,
        layer_us=layer_ms * 1e3, gemm1_us=g1_ms * 1e3, gemm2_us=g2_ms * 1e3,
        weight_mb=(b13 + b2) / 1e6,
        layer_tbs=(b13 + b2) / (layer_ms * 1e9), gemm1_tbs=b13 / (g1_ms * 1e9), gemm2_tbs=b2 / (g2_ms * 1e9),
        tflops=flops / (layer_ms * 1e9), floor_us=floor_ms * 1e3, floor_frac=floor_ms / layer_ms,
        # What benchmarks/perf_model_error.py needs to predict this layer as the allocator would.
        gemm1_nk=[w13.n, w13.k], gemm2_nk=[w2.n, w2.k],
        gate_up_schemes=[sc.name for sc in w13.schemes], down_schemes=[sc.name for sc in w2.schemes],
        expert_tokens=torch.bincount(ids.flatten().long(), minlength=s["experts"]).tolist(),
    )


def _subset(w: ExpertGemmWeights, scheme_name: str):
    """(weights of the experts in scheme_name, global -> local map) for a one-scheme launch."""
    experts = [e for e, sc in enumerate(w.schemes) if sc.name == scheme_name]
    emap = torch.full((w.num_experts,), -1, dtype=torch.int32, device=DEVICE)
    emap[torch.tensor(experts, device=DEVICE)] = torch.arange(len(experts), dtype=torch.int32, device=DEVICE)
    return slice_experts(w, experts), emap


def split_launch(shape: str, tokens_list, t_start: float, budget_s: float, warm_only: bool = False) -> list[dict]:
    """GEMM time of the mixed layer: one launch per GEMM (all schemes) vs one launch per scheme.

    Both use the same tile config (chosen for the whole layer); a per-scheme launch
    only sees its experts' rows (expert map), as a per-scheme kernel would."""
    s = SHAPES[shape]
    topk, experts = s["topk"], s["experts"]
    layers = make_layer(shape, "mixed3.25", fill=not warm_only)
    copies = layer_copies(layers, 1 if warm_only else LAYER_COPIES)
    w13, w2 = layers
    subs13 = {n: _subset(w13, n) for n in sorted({sc.name for sc in w13.schemes})}
    subs2 = {n: _subset(w2, n) for n in sorted({sc.name for sc in w2.schemes})}
    n_copies = 1 if warm_only else LAYER_COPIES
    sub_copies13 = {n: [w] + [copy_weights(w) for _ in range(n_copies - 1)] for n, (w, _) in subs13.items()}
    sub_copies2 = {n: [w] + [copy_weights(w) for _ in range(n_copies - 1)] for n, (w, _) in subs2.items()}
    rows = []
    for tokens in tokens_list:
        if time.time() - t_start > budget_s:
            break
        ids, tw = zipf_routing(tokens, experts, topk, seed=tokens)
        x = torch.randn(tokens, s["hidden"], device=DEVICE, dtype=DTYPE)
        c1, c2 = select_configs(tokens, topk, w13, w2, torch.device(DEVICE))
        routing = align_routing(ids, experts, c1.block_m)
        gate_up = grouped_gemm(x, w13, routing, c1, a_row_div=topk)
        act, _ = silu_and_mul(gate_up, routing.slot_expert, DTYPE, False)
        down = grouped_gemm(act, w2, routing, c2, routed_weights=tw.reshape(-1))
        if warm_only:  # compile the per-scheme launches too
            for subs, cfg, a, div, rw in ((subs13, c1, x, topk, None), (subs2, c2, act, 1, tw.reshape(-1))):
                for w, emap in subs.values():
                    grouped_gemm(a, w, align_routing(ids, w.num_experts, cfg.block_m, emap), cfg,
                                 a_row_div=div, routed_weights=rw)
            continue
        turn = itertools.cycle(copies)
        fused = bench(lambda: grouped_gemm(x, next(turn)[0], routing, c1, a_row_div=topk, out=gate_up))
        fused += bench(lambda: grouped_gemm(act, next(turn)[1], routing, c2, routed_weights=tw.reshape(-1), out=down))
        parts_us = {}
        for tag, subs, sub_copies, cfg, a, div, rw in (
            ("g1", subs13, sub_copies13, c1, x, topk, None), ("g2", subs2, sub_copies2, c2, act, 1, tw.reshape(-1))
        ):
            for name, (w, emap) in subs.items():
                r = align_routing(ids, w.num_experts, cfg.block_m, emap)
                o = grouped_gemm(a, w, r, cfg, a_row_div=div, routed_weights=rw)
                cyc = itertools.cycle(sub_copies[name])
                ms = bench(lambda: grouped_gemm(a, next(cyc), r, cfg, a_row_div=div, routed_weights=rw, out=o))
                parts_us[f"{tag}:{name}"] = ms * 1e3
        rows.append(dict(shape=shape, tokens=tokens, fused_us=fused * 1e3, split_us=sum(parts_us.values()),
                         parts_us=parts_us))
    return rows


PTABLE_EXPERTS = 64


def _ptable_case(scheme: str, n: int, k: int, rows: int, fill: bool = True):
    w = make_weights([scheme] * PTABLE_EXPERTS, n, k, seed=11, fill=fill)
    tokens = PTABLE_EXPERTS * rows
    ids = torch.arange(PTABLE_EXPERTS, device=DEVICE, dtype=torch.int32).repeat_interleave(rows)[:, None]
    cfg = config_for_key(layer_gemm_keys(w, w)[0], tokens, 1, PTABLE_EXPERTS, torch.device(DEVICE))  # uniform layer
    routing = align_routing(ids, PTABLE_EXPERTS, cfg.block_m)
    a = torch.randn(tokens, k, device=DEVICE, dtype=DTYPE)
    a8 = quantize_fp8_per_token(a) if needs_fp8_activations(w) else None
    return w, cfg, routing, a, a8


def perf_table_shapes():
    return sorted({(2 * s["inter"], s["hidden"]) for s in SHAPES.values()} | {(s["hidden"], s["inter"]) for s in SHAPES.values()})


def perf_table(schemes, rows_list, t_start: float, budget_s: float, emit) -> dict:
    """us per expert block GEMM (one [n, k] weight applied to `tokens` rows), in offline/perf_model.py's format.

    Measured on a uniform layer of PTABLE_EXPERTS experts that all get the same rows,
    launched once with the shipped default config (grouped_gemm alone), time / experts;
    two weight copies cycled so weights come from HBM."""
    entries = []
    emit(f"{'scheme':10} {'n':>5} {'k':>5} " + " ".join(f"{'t=' + str(t):>9}" for t in rows_list))
    for n, k in perf_table_shapes():
        for scheme in schemes:
            line = []
            for rows in rows_list:
                if time.time() - t_start > budget_s:
                    line.append("skipped")
                    continue
                try:
                    w, cfg, routing, a, a8 = _ptable_case(scheme, n, k, rows)
                    ws = [w, copy_weights(w)]
                    out = grouped_gemm(a, w, routing, cfg, a_fp8=a8)
                    cyc = itertools.cycle(ws)
                    ms = bench(lambda: grouped_gemm(a, next(cyc), routing, cfg, a_fp8=a8, out=out))
                    us = ms * 1e3 / PTABLE_EXPERTS
                    entries.append(dict(scheme=parse_scheme(scheme).name, n=n, k=k, tokens=rows, us=us))
                    line.append(f"{us:9.2f}")
                except Exception:
                    line.append("failed")
                    emit(traceback.format_exc(limit=3))
            emit(f"{scheme:10} {n:5d} {k:5d} " + " ".join(f"{x:>9}" for x in line))
    name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu"
    return dict(device=name, source="benchmarks/kernel_check.py --parts table",
                date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}", default_dequant=default_dequant(),
                experts_per_launch=PTABLE_EXPERTS, entries=entries)


def table_jobs(schemes, rows_list, mode):
    return [("ptable", sc, n, k, r, mode) for n, k in perf_table_shapes() for sc in schemes for r in rows_list]


def cpu_smoke_setup():
    """Exercise this script on a CPU: tiny shapes, fp16 (the interpreter's bf16 dot is wrong)."""
    global DEVICE, DTYPE, SHAPES, CHECK_TOKENS, MIX_CHECK_TOKENS, TIME_TOKENS
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--cpu-smoke needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    DEVICE, DTYPE = "cpu", torch.float16
    SHAPES = {"tiny-a": dict(hidden=256, inter=128, experts=12, topk=2), "tiny-b": dict(hidden=128, inter=256, experts=16, topk=4)}
    CHECK_TOKENS, MIX_CHECK_TOKENS, TIME_TOKENS = (1, 9), (1, 9), (1, 40)
    global SPLIT_TOKENS, LAYER_COPIES, FP8_CHECK_X, FP8_CHECK_ACT
    SPLIT_TOKENS, LAYER_COPIES = (3,), 1
    FP8_CHECK_X, FP8_CHECK_ACT = ((7, 200),), ((9, 96), (3, 4096))


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="table configs only, no variants")
    ap.add_argument("--assign", default="w4g128,mixed3.25",
                    help="layers to time: scheme names (uniform layers, e.g. w2g128,w3g128,w8), mixed3.25")
    ap.add_argument("--procs", type=int, default=12, help="processes compiling in parallel")
    ap.add_argument("--budget-s", type=float, default=330, help="skip timing cases after this many seconds")
    ap.add_argument("--part-budget-s", type=float, default=60, help="seconds each of split and table may take")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), fp16")
    ap.add_argument("--parts", default="check,time,split",
                    help="comma list of: check, time, split (one launch vs one per scheme), table (perf table JSON)")
    ap.add_argument("--check-modes", default="default,v1,asm",
                    help="dequant modes checked against the reference (csrc is added when the extension builds)")
    ap.add_argument("--csrc", type=int, default=1, help="build csrc/ (torch cpp_extension) and check/time it")
    ap.add_argument("--promote", type=int, default=1,
                    help="use the inline-PTX dequant for split/table when it passed the checks")
    ap.add_argument("--table-tokens", default="1,4,16,64,256", help="rows per expert measured for the perf table")
    ap.add_argument("--table-schemes", default="w2g128,w3g128,w4g128,w8,w8a8fp8", help="schemes of the perf table")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma list of {', '.join(LAYER_SHAPES)}")
    ap.add_argument("--time-tokens", default=None, help="token counts of the timing part (default: TIME_TOKENS)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    global SHAPES, TIME_TOKENS
    if args.cpu_smoke:
        cpu_smoke_setup()
    if not args.cpu_smoke:
        unknown = set(args.shapes.split(",")) - set(LAYER_SHAPES)
        if unknown:
            ap.error(f"unknown --shapes {', '.join(sorted(unknown))}: expected some of {', '.join(LAYER_SHAPES)}")
        SHAPES = {k: SHAPES[k] for k in args.shapes.split(",")}
    if args.time_tokens:
        TIME_TOKENS = tuple(int(t) for t in args.time_tokens.split(","))
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
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
    build = {}
    if DEVICE == "cuda" and args.csrc:  # nvcc runs while Triton compiles

        def _build():
            t0 = time.time()
            try:
                csrc_ext.build()
                build["s"] = time.time() - t0
            except Exception:
                build["error"] = traceback.format_exc(limit=2)[-3000:]

        build_thread = threading.Thread(target=_build, daemon=True)
        build_thread.start()
    modes = [m for m in args.check_modes.split(",") if m]
    jobs = []
    if "check" in parts:
        for m in modes:
            d = CHECK_MODES[m][0]
            var = "table" if d is None else f"mode{d}"
            jobs += [(shape, "all", t, var) for shape in SHAPES for t in CHECK_TOKENS + (64,)]
        jobs += [(shape, "int4mix", t, "table") for shape in SHAPES for t in (1, 3, 8, 16, 40)]
        if "default" in modes:
            jobs += [(shape, "mixed3.25", t, "table") for shape in SHAPES for t in MIX_CHECK_TOKENS + (64,)]
    assigns = args.assign.split(",")
    time_jobs = timing_jobs(assigns, args.quick) if "time" in parts else []
    jobs += time_jobs
    later_mode = 2 if (args.promote and "asm" in modes) else default_dequant()  # what promotion will pick
    if "split" in parts and "mixed3.25" in assigns:
        jobs += [("split", shape, t, later_mode) for shape in SHAPES for t in SPLIT_TOKENS]
    table_schemes = args.table_schemes.split(",")
    table_rows = [int(t) for t in args.table_tokens.split(",")]
    if "table" in parts:
        jobs += table_jobs(table_schemes, table_rows, later_mode)
    jobs = list(dict.fromkeys(jobs))
    if DEVICE == "cuda":
        emit(f"compile warm-up: {len(jobs)} cases in {warm_up(jobs, args.procs):.0f} s ({args.procs} processes)")
        if args.csrc:
            build_thread.join()
            emit(f"csrc/ extension: built in {build['s']:.0f} s" if "s" in build else
                 f"csrc/ extension: build FAILED\n{build.get('error')}")
            if csrc_ext.available():
                modes.append("csrc")

    copy_tbs, mm_tflops = copy_bandwidth(), matmul_tflops()
    emit(f"device copy bandwidth {copy_tbs:.2f} TB/s (read+write); bf16 matmul {mm_tflops:.0f} TFLOP/s")

    results.update(copy_tbs=copy_tbs, mm_tflops=mm_tflops, default_dequant=default_dequant())
    if "check" in parts:
        emit(f"\n## (a) correctness, {DTYPE}, Zipf routing, NaN-poisoned outputs, fresh inputs; "
             f"layer 'all' = every known scheme mixed, 'int4mix' = the 4-bit weight-only schemes")
        emit(f"{'shape':22} {'layer':8} {'mode':9} {'tokens':>6} {'rel err':>9} {'unwritten':>9}  ok")
        for shape in SHAPES:
            # Besides 'all' (every scheme), the weight-only 3.25-bit mix the benchmarks time, at decode and prefill
            # sizes: its GEMM1 applies SiLU in the epilogue wherever it is unsplit ('all' holds fp8-activation
            # blocks in GEMM2, which keep the separate SiLU kernel).
            checks = [(m, "int4mix" if m == "csrc" else "all") for m in modes]
            checks += [("default", "mixed3.25")] if "default" in modes else []
            for m, label in checks:
                try:
                    layers = make_layer(shape, label)
                    toks = None if label == "all" else MIX_CHECK_TOKENS if label == "mixed3.25" else (1, 3, 16, 40)
                    for r in check_correctness(shape, layers, m, toks, label):
                        results["check"].append(r)
                        emit(f"{r['shape']:22} {label:8} {m:9} {r['tokens']:6d} {r['rel_err']:9.2e} "
                             f"{r['unwritten']:9d}  {'ok' if r['ok'] else 'FAIL'}")
                    del layers
                except Exception:
                    emit(f"{shape} {m}: correctness run failed:\n{traceback.format_exc(limit=-3)}")
                    results["check"].append(dict(shape=shape, layer=label, mode=m, tokens=-1, rel_err=float("nan"),
                                                 unwritten=-1, ok=False))
                save()
        emit("fp8 activation copies (rel err column: share of fp8 values that differ from torch's cast)")
        for r in check_fp8_copies():
            results["check"].append(r)
            emit(f"{r['shape']:22} {r['layer']:8} {r['mode']:9} {r['tokens']:6d} {r['rel_err']:9.2e} "
                 f"{r['unwritten']:9d}  {'ok' if r['ok'] else 'FAIL'}")
        bad = [r for r in results["check"] if not r["ok"]]
        emit(f"correctness: {len(results['check']) - len(bad)} ok, {len(bad)} FAIL")
        failed_modes = {r["mode"] for r in bad}
    else:
        failed_modes = set()

    if "time" in parts:
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
                for job in time_jobs:
                    if (job[0], job[1]) != (shape, assign):
                        continue
                    js, ja, t, v = job
                    if {"asm": "asm", "asm_pair": "asm_pair", "v1": "v1", "csrc": "csrc"}.get(v) in failed_modes:
                        emit(f"{shape} {assign} {t} {v}: skipped (failed the correctness check)")
                        continue
                    if time.time() - t_start > args.budget_s:
                        emit(f"{shape} {assign} {t} {v}: skipped (time budget)")
                        continue
                    try:
                        r = time_case(shape, assign, copies, t, v, copy_tbs, mm_tflops, gemms=True)
                    except Exception:
                        emit(f"{shape} {assign} {t} {v}: failed:\n{traceback.format_exc(limit=4)}")
                        continue
                    results["timing"].append(r)
                    emit(f"{shape[:14]:14} {assign:9} {t:5d} {v:16} {r['layer_us']:9.1f} {r['gemm1_us']:8.1f} "
                         f"{r['gemm2_us']:8.1f} {r['weight_mb']:7.1f} {r['layer_tbs']:5.2f} {r['gemm1_tbs']:6.2f} "
                         f"{r['gemm2_tbs']:6.2f} {r['tflops']:7.1f} {r['floor_us']:8.1f} {100 * r['floor_frac']:5.0f}%")
                    save()
                del layers, copies
    # The split and table parts (and a later baselines run, via $OUT/chosen_env.sh) use the
    # inline-PTX dequant when it passed every check here, else the shipped default.
    if args.promote and "check" in parts and "asm" in modes and "asm" not in failed_modes:
        os.environ["MXMOE_DEQUANT"] = "2"
    chosen = dict(MXMOE_DEQUANT=str(default_dequant()))
    if "csrc" in modes and "csrc" not in failed_modes:
        chosen["MXMOE_CSRC_OK"] = "1"
    results["chosen_env"] = chosen
    with open(os.path.join(out_dir, "chosen_env.sh"), "w") as f:
        f.write("".join(f"export {k}={v}\n" for k, v in chosen.items()))
    emit(f"chosen for the parts below: {chosen}")
    save()
    if "split" in parts and "mixed3.25" in assigns:
        t_split = time.time()
        emit("\n## (c) one launch per GEMM for the mixed layer vs one launch per scheme (GEMMs only, us)")
        emit(f"{'shape':14} {'tok':>5} {'fused g1+g2':>11} {'per-scheme sum':>14}  parts")
        for shape in SHAPES:
            try:
                for r in split_launch(shape, SPLIT_TOKENS, t_split, args.part_budget_s):
                    results.setdefault("split", []).append(r)
                    emit(f"{shape[:14]:14} {r['tokens']:5d} {r['fused_us']:11.1f} {r['split_us']:14.1f}  "
                         + ", ".join(f"{k} {v:.1f}" for k, v in r["parts_us"].items()))
                    save()
            except Exception:
                emit(f"{shape} split launch failed:\n{traceback.format_exc(limit=4)}")
    if "table" in parts:
        emit("\n## (d) perf table: us per expert block GEMM (uniform layer, every expert the same rows)")
        try:
            table = perf_table(table_schemes, table_rows, time.time(), args.part_budget_s, emit)
            path = os.path.join(out_dir, "perf_table_h200.json")
            with open(path, "w") as f:
                json.dump(table, f, indent=1)
            emit(f"wrote {path}: {len(table['entries'])} entries")
        except Exception:
            emit(f"perf table failed:\n{traceback.format_exc(limit=4)}")
    emit(f"\ntotal {time.time() - t_start:.0f} s")
    save()


if __name__ == "__main__":
    main()
