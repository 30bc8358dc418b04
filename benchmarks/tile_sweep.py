"""Tile-config sweep of the grouped GEMMs on a GPU: what configs.TILE_TABLE should say.

Run from the repository root on a CUDA machine (no vLLM needed):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/tile_sweep.py --shapes qwen3-30b-a3b \
        --assign w4g128,mixed3.25 --tokens 1,16,64,256 --procs 15 --budget-s 420

For each (shape, layer assignment, token count) and each GEMM of the layer
(gate_up, down) it times every candidate config on the same Zipf routing as
benchmarks/kernel_check.py (CUDA-graph replay median, weights cycled over
layer copies so they come from HBM), with the shipped config first. Compiles
run beforehand in parallel processes (triton's disk cache is shared). Writes
$OUT/tile_sweep.json and a table of shipped vs best per case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import kernel_check as kc  # noqa: E402
from vllm_mxmoe.kernels.act_quant import quantize_fp8_per_token  # noqa: E402
from vllm_mxmoe.kernels.align import align_routing  # noqa: E402
from vllm_mxmoe.kernels.configs import GemmConfig, fit_block_k  # noqa: E402
from vllm_mxmoe.kernels.fused_moe import select_configs  # noqa: E402
from vllm_mxmoe.kernels.grouped_gemm import grouped_gemm, needs_fp8_activations  # noqa: E402

BLOCK_N = (32, 64, 128, 256)
BLOCK_K = (128, 256)
STAGES = (2, 3, 4)
SPLIT_K = (1, 2, 4)
REP_MS = 20  # per config; the shipped one is timed the same way
MAX_TILE = 128 * 128  # BLOCK_M x BLOCK_N; --max-tile raises it (e.g. 128 x 256 fp8 prefill tiles)


def candidates(
    shipped: GemmConfig, n: int, k: int, groups: Sequence[int], swap_ab: bool | str = False, *,
    block_n: Sequence[int] = BLOCK_N, block_k: Sequence[int] = BLOCK_K, stages: Sequence[int] = STAGES,
    max_tile: int = MAX_TILE, split_k: Sequence[int] = SPLIT_K,
) -> list[GemmConfig]:
    """The shipped config first, then the grid around it (same BLOCK_M; BLOCK_M one step down in decode);
    ``swap_ab`` adds each config with the tile computed as W x A^T ("only": only that one)."""
    block_ms = [shipped.block_m] + ([shipped.block_m // 2] if shipped.block_m >= 32 else [])
    out = [shipped]
    for bm, bn, bk, st in itertools.product(block_ms, block_n, block_k, stages):
        bk = fit_block_k(bk, k, groups)
        if bn > n or bm * bn > max_tile:
            continue
        for warps in (4, 8) if bm * bn >= 64 * 128 or bn == 256 else (2, 4) if bn <= 64 else (4,):
            splits = sorted(set(split_k) | {shipped.split_k}) if bm <= 16 else (1,)
            for sk in splits:
                if sk > k // bk:
                    continue
                cfg = GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=st, split_k=sk,
                                 dequant=shipped.dequant)
                for c in {False: (cfg,), True: (cfg, replace(cfg, swap_ab=True)), "only": (replace(cfg, swap_ab=True),)}[swap_ab]:
                    if c not in out:
                        out.append(c)
    return out


def gemm_inputs(shape: str, assign: str, tokens: int, block_m: int, w13, w2):
    s = kc.SHAPES[shape]
    ids, tw = kc.zipf_routing(tokens, s["experts"], s["topk"], seed=tokens)
    routing = align_routing(ids, s["experts"], block_m)
    x = torch.randn(tokens, s["hidden"], device=kc.DEVICE, dtype=kc.DTYPE)
    act = torch.randn(tokens * s["topk"], s["inter"], device=kc.DEVICE, dtype=kc.DTYPE) * 0.1
    x8 = quantize_fp8_per_token(x) if needs_fp8_activations(w13) else None
    act8 = quantize_fp8_per_token(act) if needs_fp8_activations(w2) else None
    return ids, tw, routing, x, act, x8, act8


def run_gemm(which: str, cfg: GemmConfig, w, inputs, topk: int):
    ids, tw, routing, x, act, x8, act8 = inputs
    if which == "gate_up":
        return grouped_gemm(x, w, routing, cfg, a_row_div=topk, a_fp8=x8)
    return grouped_gemm(act, w, routing, cfg, a_fp8=act8, routed_weights=tw.reshape(-1))


def cases(shapes, assigns, tokens_list, swap_ab=False, **grid):
    """(shape, assign, tokens, gemm, [configs]) in priority order: decode token counts first."""
    out = []
    for t in tokens_list:
        for shape in shapes:
            topk = kc.SHAPES[shape]["topk"]
            for assign in assigns:
                w13, w2 = kc.make_layer(shape, assign, fill=False)
                c1, c2 = select_configs(t, topk, w13, w2, torch.device(kc.DEVICE))
                for which, w, shipped in (("gate_up", w13, c1), ("down", w2, c2)):
                    out.append((shape, assign, t, which, candidates(shipped, w.n, w.k, w.group_sizes(), swap_ab, **grid)))
    return out


def _compile(job) -> str:
    shape, assign, t, which, cfg = job
    try:
        torch.cuda.set_device(0)
        w13, w2 = kc.make_layer(shape, assign, fill=False)
        inputs = gemm_inputs(shape, assign, t, cfg.block_m, w13, w2)
        run_gemm(which, cfg, w13 if which == "gate_up" else w2, inputs, kc.SHAPES[shape]["topk"])
        torch.cuda.synchronize()
        return ""
    except Exception:
        return f"{job}: {traceback.format_exc(limit=2)}"


def _ints(csv: str) -> list[int]:
    return [int(v) for v in csv.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-30b-a3b")
    ap.add_argument("--assign", default="w4g128,mixed3.25")
    ap.add_argument("--tokens", default="16,64,1,256", help="in priority order")
    ap.add_argument("--procs", type=int, default=15)
    ap.add_argument("--swap-ab", action="store_true", help="also time every config with GemmConfig.swap_ab")
    ap.add_argument("--only-swap-ab", action="store_true", help="time every config with GemmConfig.swap_ab only")
    ap.add_argument("--block-n", default=",".join(map(str, BLOCK_N)), help="BLOCK_N values of the grid")
    ap.add_argument("--block-k", default=",".join(map(str, BLOCK_K)), help="BLOCK_K values of the grid")
    ap.add_argument("--stages", default=",".join(map(str, STAGES)), help="num_stages values of the grid")
    ap.add_argument("--max-tile", type=int, default=MAX_TILE, help="largest BLOCK_M x BLOCK_N tried")
    ap.add_argument("--split-k", default=",".join(map(str, SPLIT_K)), help="split-K values of the grid (decode tiles)")
    ap.add_argument("--zipf-s", type=float, default=kc.ZIPF_S, help="routing skew (0: uniform, as random-weight routers give)")
    ap.add_argument("--budget-s", type=float, default=420, help="stop timing new cases after this many seconds")
    ap.add_argument("--compile-budget-s", type=float, default=200)
    args = ap.parse_args()
    kc.ZIPF_S = args.zipf_s
    t0 = time.time()
    out_dir = Path(os.environ.get("OUT", "."))
    shapes, assigns = args.shapes.split(","), args.assign.split(",")
    grid = {"block_n": _ints(args.block_n), "block_k": _ints(args.block_k), "stages": _ints(args.stages),
            "max_tile": args.max_tile, "split_k": _ints(args.split_k)}
    todo = cases(shapes, assigns, _ints(args.tokens), "only" if args.only_swap_ab else args.swap_ab, **grid)
    # One compile per (layer, GEMM, config): the token count is not a specialisation key.
    jobs = list({(sh, a, which, cfg): (sh, a, t, which, cfg) for sh, a, t, which, cfgs in todo for cfg in cfgs}.values())
    print(f"{len(todo)} cases, {len(jobs)} configs to compile", flush=True)
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for i, err in enumerate(pool.imap_unordered(_compile, jobs)):
            if err:
                print("compile failed:", err.splitlines()[0], flush=True)
            if time.time() - t0 > args.compile_budget_s:
                print(f"compile budget spent after {i + 1} of {len(jobs)}", flush=True)
                pool.terminate()
                break
    print(f"compiled in {time.time() - t0:.0f} s", flush=True)

    results = []
    layers = {}
    for shape, assign, t, which, cfgs in todo:
        if time.time() - t0 > args.budget_s:
            print(f"budget spent: skipping {shape} {assign} {t} {which}", flush=True)
            continue
        if (shape, assign) not in layers:
            layers.clear()  # one layer's copies at a time (HBM)
            layers[(shape, assign)] = kc.layer_copies(kc.make_layer(shape, assign), kc.LAYER_COPIES)
        copies = layers[(shape, assign)]
        topk = kc.SHAPES[shape]["topk"]
        idx = 0 if which == "gate_up" else 1
        by_m = {}
        rows = []
        for cfg in cfgs:
            if cfg.block_m not in by_m:
                by_m[cfg.block_m] = gemm_inputs(shape, assign, t, cfg.block_m, *copies[0])
            inputs = by_m[cfg.block_m]
            turn = itertools.cycle(copies)
            try:
                us = triton.testing.do_bench_cudagraph(
                    lambda: run_gemm(which, cfg, next(turn)[idx], inputs, topk), rep=REP_MS, return_mode="median") * 1e3
            except Exception as e:  # a config triton cannot build (e.g. shared memory): skip it
                print(f"  skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            rows.append(dict(cfg=asdict(cfg), us=us))
        if not rows:
            continue
        shipped, best = rows[0], min(rows, key=lambda r: r["us"])
        top = sorted(rows, key=lambda r: r["us"])[:5]
        results.append(dict(shape=shape, assign=assign, tokens=t, gemm=which, shipped=shipped, best=best, top5=top,
                            tried=len(rows)))
        print(f"{shape:14s} {assign:9s} {t:5d} {which:7s} shipped {shipped['us']:7.1f} us  best {best['us']:7.1f} us "
              f"({shipped['us'] / best['us']:.2f}x) {best['cfg']}", flush=True)
        (out_dir / "tile_sweep.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__,
            triton=triton.__version__, results=results), indent=1))
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
