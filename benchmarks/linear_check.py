"""Quantized dense linears (kernels/dense_linear.py) on a GPU: both paths (the streaming kernel and
dequantize-then-cuBLAS) checked against the torch reference, then timed against cuBLAS in bf16 on
the same shapes.

Run from the repository root on a CUDA machine (no vLLM needed):

    PYTHONPATH=. python benchmarks/linear_check.py --tokens 1,16,64,256,1024,8192 --schemes w4g128,w3g128,w2g128

Shapes: the non-expert linears of the served configs (benchmarks/speed_configs.py), as
(N, K) per layer: attention projections and Qwen1.5's shared expert. Correctness: bf16,
output poisoned with NaN, fresh random weights and inputs per shape, relative error
against x @ dequantize(W)^T in float32. Timing: CUDA-graph replay median, cycling
through enough copies of the weight that it comes from HBM, not L2. Writes
$OUT/linear_check.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import kernel_check as kc  # noqa: E402
from vllm_mxmoe.kernels.configs import num_sms  # noqa: E402
from vllm_mxmoe.kernels.dense_linear import linear_config, quantized_linear, uses_dequantized_weight  # noqa: E402
from vllm_mxmoe.kernels.reference import expert_linear  # noqa: E402

# name -> (N, K): the per-layer non-expert linears of the speed runs' models.
LINEAR_SHAPES = {
    "qwen3-30b-a3b.qkv": (5120, 2048),
    "qwen3-30b-a3b.o": (2048, 4096),
    "qwen1.5-moe.qkv": (6144, 2048),
    "qwen1.5-moe.o": (2048, 2048),
    "qwen1.5-moe.shared_gate_up": (11264, 2048),
    "qwen1.5-moe.shared_down": (2048, 5632),
}
L2_BYTES = 60 << 20  # a little above the H200's L2
OUT = Path(os.environ.get("OUT", "."))


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(2 * L2_BYTES / nbytes))


def check(name: str, scheme: str, tokens: int, seed: int, path: str) -> float:
    n, k = LINEAR_SHAPES[name]
    w = kc.make_weights([scheme], n, k, seed=seed)
    gen = torch.Generator(kc.DEVICE).manual_seed(seed)
    x = torch.randn(tokens, k, device=kc.DEVICE, generator=gen).to(kc.DTYPE)
    ref = expert_linear(x, w, 0)
    got = torch.full((tokens, n), float("nan"), device=kc.DEVICE, dtype=kc.DTYPE)
    got.copy_(quantized_linear(x, w, path=path))
    if got.isnan().any():
        return float("nan")
    return ((got.float() - ref).norm() / ref.norm()).item()


def time_linear(name: str, scheme: str, tokens: int) -> dict:
    n, k = LINEAR_SHAPES[name]
    ws = [kc.make_weights([scheme], n, k, seed=i) for i in range(1)]
    ws += [kc.copy_weights(ws[0]) for _ in range(copies_for(ws[0].nbytes()) - 1)]
    x = torch.randn(tokens, k, device=kc.DEVICE).to(kc.DTYPE)

    def ours(path):
        def run():
            for w in ws:
                quantized_linear(x, w, path=path)
        return run

    bf16 = [torch.randn(n, k, device=kc.DEVICE).to(kc.DTYPE) for _ in range(copies_for(n * k * 2))]

    def cublas():
        for w in bf16:
            F.linear(x, w)

    us = kc.bench(ours("kernel")) * 1e3 / len(ws)
    us_dq = kc.bench(ours("dequant")) * 1e3 / len(ws)
    us_bf16 = kc.bench(cublas) * 1e3 / len(bf16)
    cfg = linear_config(tokens, n, k, ws[0].group_sizes(), num_sms(x.device))
    return {
        "shape": name, "scheme": scheme, "tokens": tokens, "kernel_us": round(us, 2), "dequant_us": round(us_dq, 2),
        "bf16_us": round(us_bf16, 2), "auto": "dequant" if uses_dequantized_weight(tokens, ws[0]) else "kernel",
        "kernel_weight_tb_s": round(ws[0].nbytes() / us / 1e6, 3), "bf16_tb_s": round(n * k * 2 / us_bf16 / 1e6, 3),
        "config": f"M{cfg.block_m} N{cfg.block_n} K{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} "
                  f"split{cfg.split_k}{' swap' if cfg.swap_ab else ''}",
    }


# Kernel tiles tried by --sweep for 32-256 rows, where the decode tile re-reads the weights per
# 16 rows and the dequantized weight costs two bf16 passes: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
SWEEP_TILES = [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 128, 8, 3),
               (128, 64, 128, 4, 3), (128, 128, 128, 8, 3)]


def sweep(name: str, scheme: str, tokens: int, emit) -> None:
    """Time each SWEEP_TILES tile (swap-AB, asm dequant, K split to fill the GPU) against cuBLAS bf16."""
    from vllm_mxmoe.kernels.configs import GemmConfig, split_for_programs

    n, k = LINEAR_SHAPES[name]
    ws = [kc.make_weights([scheme], n, k, seed=0)]
    ws += [kc.copy_weights(ws[0]) for _ in range(copies_for(ws[0].nbytes()) - 1)]
    x = torch.randn(tokens, k, device=kc.DEVICE).to(kc.DTYPE)
    bf16 = [torch.randn(n, k, device=kc.DEVICE).to(kc.DTYPE) for _ in range(copies_for(n * k * 2))]
    us_bf16 = kc.bench(lambda: [F.linear(x, w) for w in bf16]) * 1e3 / len(bf16)
    for bm, bn, bk, warps, stages in SWEEP_TILES:
        if bm > 2 * max(tokens, 16):
            continue
        cfg = GemmConfig(bm, bn, bk, warps, stages, dequant=2, swap_ab=True)
        programs = math.ceil(tokens / bm) * math.ceil(n / bn)
        for split in sorted({1, split_for_programs(cfg, programs, k, num_sms(x.device))}):
            c = GemmConfig(bm, bn, bk, warps, stages, split_k=split, dequant=2, swap_ab=True)
            try:
                ref = expert_linear(x, ws[0], 0)
                err = ((quantized_linear(x, ws[0], config=c, path="kernel").float() - ref).norm() / ref.norm()).item()
                us = kc.bench(lambda c=c: [quantized_linear(x, w, config=c, path="kernel") for w in ws]) * 1e3 / len(ws)
            except Exception as e:  # noqa: BLE001  (a tile triton cannot compile: report it, try the next)
                emit(f"sweep {name} {scheme} tokens={tokens} M{bm} N{bn} K{bk} w{warps} s{stages} split{split}: "
                     f"{type(e).__name__}")
                continue
            emit(f"sweep {name} {scheme} tokens={tokens} M{bm} N{bn} K{bk} w{warps} s{stages} split{split}: "
                 f"{us:.2f} us (bf16 {us_bf16:.2f}, x{us_bf16 / us:.3f}) rel err {err:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(LINEAR_SHAPES))
    p.add_argument("--schemes", default="w4g128,w3g128,w2g128")
    p.add_argument("--tokens", default="1,16,64,256,1024,8192")
    p.add_argument("--check-tokens", default="1,7,16,100,1024")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), fp16")
    p.add_argument("--sweep", action="store_true", help="only time SWEEP_TILES at --tokens")
    args = p.parse_args()
    if args.cpu_smoke:
        global L2_BYTES
        kc.cpu_smoke_setup()
        LINEAR_SHAPES["tiny"] = (96, 256)
        args.shapes, args.tokens, args.check_tokens, L2_BYTES = "tiny", "1,20", "1,20", 1
    shapes, schemes = args.shapes.split(","), args.schemes.split(",")
    lines, rows = [], []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    device = torch.cuda.get_device_name() if kc.DEVICE == "cuda" else "cpu (interpreter smoke run)"
    emit(f"device: {device}  copy {kc.copy_bandwidth():.2f} TB/s (read + write)")
    if args.sweep:
        for name in shapes:
            for scheme in schemes:
                for t in map(int, args.tokens.split(",")):
                    sweep(name, scheme, t, emit)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "linear_sweep.txt").write_text("\n".join(lines) + "\n")
        return
    worst = 0.0
    for i, name in enumerate(shapes):
        for j, scheme in enumerate(schemes):
            for t in map(int, args.check_tokens.split(",")):
                for path in ("kernel", "dequant"):
                    err = check(name, scheme, t, seed=1000 * i + 10 * j + t, path=path)
                    worst = float("inf") if math.isnan(err) else max(worst, err)
                    emit(f"check {name} {scheme} tokens={t} {path}: rel err {err:.2e}")
    emit(f"correctness: worst rel err {worst:.2e} ({'ok' if worst < 2e-2 else 'FAILED'})")
    emit("| shape | scheme | tokens | kernel us | dequant + cuBLAS us | bf16 cuBLAS us | default path "
         "| bf16 / default | kernel TB/s (weights) | bf16 TB/s | kernel config |")
    emit("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for name in shapes:
        for scheme in schemes:
            for t in map(int, args.tokens.split(",")):
                r = time_linear(name, scheme, t)
                rows.append(r)
                default = r["dequant_us"] if r["auto"] == "dequant" else r["kernel_us"]
                emit(f"| {name} | {scheme} | {t} | {r['kernel_us']} | {r['dequant_us']} | {r['bf16_us']} | {r['auto']} "
                     f"| {r['bf16_us'] / default:.3f} | {r['kernel_weight_tb_s']} | {r['bf16_tb_s']} | {r['config']} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "linear_check.txt").write_text("\n".join(lines) + "\n")
    (OUT / "linear_check.json").write_text(json.dumps({"worst_rel_err": worst, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
