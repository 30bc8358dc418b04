"""Where a decode-size grouped GEMM is bound: HBM traffic or the work inside the SM.

Run from the repository root on a CUDA machine (no vLLM needed):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/decode_probe.py --shape qwen3-30b-a3b \
        --assign w4g128,w2g128,w3g128,mixed3.25 --tokens 16,64 --zipf-s 0

Each GEMM of the layer (gate_up, down; the shipped tile config) is timed twice on the same
routing: as served ("hbm": four copies of the layer cycled, so weights come from HBM), and with
every expert's meta row pointing at expert 0's block ("l2": the same instructions, address
pattern within a block and program count, but one ~1.5 MB block that stays in L2). If "l2" is
not much faster, DRAM is not what limits the kernel; if it is, the access pattern or the bytes
in flight are. The device copy bandwidth (read + write, measured first) is the yardstick for the TB/s column.
--overrides times config variants too (hbm only; output compared with the shipped config), e.g.
"s3:num_stages=3" "u1:k_unroll=1,num_stages=4".
With --ncu-target GEMM the script only runs that GEMM (hbm, then l2) a few times, for ncu.
Writes $OUT/decode_probe.txt. `TRITON_INTERPRET=1 ... --cpu-smoke` runs it on tiny shapes on a CPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import kernel_check as kc
from benchmarks import tile_sweep as ts
from vllm_mxmoe.kernels.align import align_routing
from vllm_mxmoe.kernels.fused_moe import select_configs
from vllm_mxmoe.kernels.layout import S_OFF, W_OFF, Z_OFF


def all_experts_on_block0(w):
    """The same layer with every expert reading expert 0's weights, scales and zeros (L2-resident)."""
    meta = w.meta.clone()
    for col in (W_OFF, S_OFF, Z_OFF):
        meta[:, col] = meta[0, col]
    return replace(w, meta=meta)


def gemm_runner(which: str, cfg, weights, inputs, topk: int):
    """A no-argument launch of one GEMM, taking its weights from the iterator ``weights``."""
    return lambda: ts.run_gemm(which, cfg, next(weights), inputs, topk)


def parse_override(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    return name, {k: int(v) for k, v in (kv.split("=") for kv in body.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--assign", default="w4g128")
    ap.add_argument("--tokens", default="16,64")
    ap.add_argument("--zipf-s", type=float, default=0.0)
    ap.add_argument("--ncu-target", choices=["gate_up", "down"], default=None)
    ap.add_argument("--overrides", nargs="*", default=[], metavar="NAME:FIELD=V,...")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.cpu_smoke:
        kc.cpu_smoke_setup()
        args.shape = "tiny-a"
    kc.ZIPF_S = args.zipf_s
    topk = kc.SHAPES[args.shape]["topk"]
    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    if args.ncu_target is None:
        emit(f"device copy bandwidth (read + write): {kc.copy_bandwidth():.2f} TB/s")
    emit(f"{'assign':>10} {'tok':>4} {'gemm':>7} {'config':>34} {'hbm us':>8} {'l2 us':>8} {'hbm TB/s':>9} {'l2/hbm':>7}")
    for assign, tokens in itertools.product(args.assign.split(","), map(int, args.tokens.split(","))):
        w13, w2 = kc.make_layer(args.shape, assign)
        copies = kc.layer_copies((w13, w2), kc.LAYER_COPIES)
        c1, c2 = select_configs(tokens, topk, w13, w2, torch.device(kc.DEVICE))
        for which, cfg in (("gate_up", c1), ("down", c2)):
            if args.ncu_target and which != args.ncu_target:
                continue
            inputs = ts.gemm_inputs(args.shape, assign, tokens, cfg.block_m, w13, w2)
            idx = 0 if which == "gate_up" else 1
            turn = itertools.cycle([c[idx] for c in copies])
            on_l2 = all_experts_on_block0(copies[0][idx])
            hbm = gemm_runner(which, cfg, turn, inputs, topk)
            l2 = gemm_runner(which, cfg, itertools.repeat(on_l2), inputs, topk)
            if args.ncu_target:
                for fn in (hbm, l2):
                    for _ in range(6):
                        fn()
                if kc.DEVICE == "cuda":
                    torch.cuda.synchronize()
                continue
            t_hbm = kc.bench(hbm) * 1e3
            t_l2 = kc.bench(l2) * 1e3
            weight_bytes = kc.routed_weight_bytes(copies[0][idx], inputs[0])
            tbs = weight_bytes / t_hbm / 1e6
            desc = (f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} "
                    f"sk{cfg.split_k} u{cfg.k_unroll}")
            emit(f"{assign:>10} {tokens:>4} {which:>7} {desc:>34} {t_hbm:8.1f} {t_l2:8.1f} {tbs:9.2f} {t_l2 / t_hbm:7.2f}")
            want = ts.run_gemm(which, cfg, copies[0][idx], inputs, topk).float().sum(0)  # over split-K partials
            for name, fields in map(parse_override, args.overrides):
                var = replace(cfg, **fields)
                var_inputs = inputs
                if var.block_m != cfg.block_m:  # the routing is aligned to BLOCK_M: same tokens, new alignment
                    ids = inputs[0]
                    var_inputs = (ids, inputs[1], align_routing(ids, w13.num_experts, var.block_m), *inputs[3:])
                got = ts.run_gemm(which, var, copies[0][idx], var_inputs, topk).float().sum(0)
                diff = ((got - want).norm() / want.norm()).item()  # against the shipped config (kernel_check checks that)
                t = kc.bench(gemm_runner(which, var, turn, var_inputs, topk)) * 1e3
                emit(f"{assign:>10} {tokens:>4} {which:>7} {name:>34} {t:8.1f} {'':>8} "
                     f"{weight_bytes / t / 1e6:9.2f} {t / t_hbm:7.2f} (vs shipped; diff {diff:.1e})")
    out = Path(os.environ.get("OUT", "."))
    if lines and args.ncu_target is None:
        (out / "decode_probe.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
