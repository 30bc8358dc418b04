"""Our MoE layer against vLLM's bf16 fused_moe and Marlin MoE (GPTQ w4g128), in one process.

Needs vLLM on the GPU machine (../shared/gpu-vllm, see its README):

    . /tmp/vk/env.sh && PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/baselines.py --budget-s 200

For every shape and token count, the same Zipf routing and the same timing method
(CUDA-graph replay median, weights cycled over copies so they come from HBM) for:
vLLM bf16 fused_experts, vLLM fused_marlin_moe (uint4b8, group 128, random GPTQ
weights repacked by vLLM's own gptq_marlin_moe_repack), and ours (default path) for
uniform w4g128, w8a8fp8 and the mixed layers of kernel_check.py. Each baseline is
checked against a torch float32 reference on fresh inputs first.

With ``--routing FILE`` (recorded in vLLM's engine by ``serving_profile.py --record-routing``) every token
count also replays up to ``--routing-samples`` recorded decode-step routings of that many tokens, evenly
spread over the recording (layers and steps), after the synthetic one; rows name their routing and its
busiest expert's row count.

Writes $OUT/baselines.txt and $OUT/baselines.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import kernel_check as kc  # noqa: E402
from vllm_mxmoe.kernels.fused_moe import mxmoe_fused_experts  # noqa: E402
from vllm_mxmoe.kernels.reference import reference_fused_experts  # noqa: E402

SHAPES = kc.LAYER_SHAPES
TOKENS = (1, 16, 64, 256, 1024, 8192)
COPIES = 2
DTYPE = torch.bfloat16


def torch_moe(x, w1, w2, tw, ids):
    """float32 reference with dense expert weights w1 [E, 2I, H], w2 [E, H, I]."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for e in torch.unique(ids).tolist():
        t, j = torch.nonzero(ids == e, as_tuple=True)
        h = x[t].float() @ w1[e].float().t()
        h = F.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, t, (h @ w2[e].float().t()) * tw[t, j, None])
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class VllmBf16:
    name = "vllm_bf16"

    def __init__(self, s):
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

        self.fn = fused_experts
        e, h, i = s["experts"], s["hidden"], s["inter"]
        self.copies = [
            ((torch.randn(e, 2 * i, h, device="cuda") / h**0.5).to(DTYPE),
             (torch.randn(e, h, i, device="cuda") / i**0.5).to(DTYPE))
            for _ in range(COPIES)
        ]

    def run(self, x, tw, ids, c=0):
        w1, w2 = self.copies[c]
        return self.fn(x, w1, w2, tw, ids)

    def reference(self, x, tw, ids):
        w1, w2 = self.copies[0]
        return torch_moe(x, w1, w2, tw, ids)


class Marlin:
    name = "marlin_w4"

    def __init__(self, s):
        import vllm._custom_ops as ops
        from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
        from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_moe_permute_scales
        from vllm.scalar_type import scalar_types

        self.fn, self.type_id = fused_marlin_moe, scalar_types.uint4b8.id
        e, h, i = s["experts"], s["hidden"], s["inter"]
        self.copies, self.dense = [], None
        for c in range(COPIES):
            mats = []
            dense = []
            for n, k in ((2 * i, h), (h, i)):
                q = torch.randint(0, 16, (e, k, n), device="cuda", dtype=torch.int32)
                scale = (torch.rand(e, k // 128, n, device="cuda") * 2e-3 / k**0.5 + 1e-3 / k**0.5).to(DTYPE)
                if c == 0:  # dense [E, n, k] for the reference: (q - 8) * scale
                    dense.append(((q.float() - 8) * scale.float().repeat_interleave(128, 1)).transpose(1, 2))
                shifts = torch.arange(8, device="cuda", dtype=torch.int64) * 4
                packed = (q.view(e, k // 8, 8, n).to(torch.int64) << shifts[None, None, :, None]).sum(2)
                packed = (packed - ((packed >> 31) & 1) * (1 << 32)).to(torch.int32)  # GPTQ [E, K/8, N]
                perm = torch.empty(e, 0, dtype=torch.int32, device="cuda")  # no act-order: one empty perm per expert
                mq = ops.gptq_marlin_moe_repack(packed.contiguous(), perm, k, n, 4)
                ms = marlin_moe_permute_scales(scale, k, n, 128)
                mats += [mq, ms]
            self.copies.append(mats)
            if c == 0:
                self.dense = dense

    def run(self, x, tw, ids, c=0):
        w1, s1, w2, s2 = self.copies[c]
        return self.fn(x, w1, w2, None, None, s1, s2, tw, ids, quant_type_id=self.type_id)

    def reference(self, x, tw, ids):
        return torch_moe(x, self.dense[0], self.dense[1], tw, ids)


# +csrc: GEMMs through csrc/ where it applies; +sep: silu(gate) * up as its own kernel, not in GEMM1's epilogue
OURS_FLAGS = ("csrc", "sep")


def split_assign(assign: str) -> tuple[str, set[str]]:
    """'mixed3.25+csrc+sep' -> ('mixed3.25', {'csrc', 'sep'})."""
    name, *flags = assign.split("+")
    unknown = set(flags) - set(OURS_FLAGS)
    if unknown:
        raise SystemExit(f"--ours {assign}: unknown flag(s) {sorted(unknown)}; known: {OURS_FLAGS}")
    return name, set(flags)


class Ours:
    def __init__(self, shape_name, s, assign):
        self.name = f"ours_{assign}"
        name, flags = split_assign(assign)
        self.use_csrc = "csrc" in flags
        self.fuse_silu = "sep" not in flags
        if self.use_csrc:
            from vllm_mxmoe.kernels import csrc_ext

            csrc_ext.build()
        layers = kc.make_layer(shape_name, name)
        self.bits = kc.avg_bits(*layers)
        self.copies = kc.layer_copies(layers, COPIES)

    def run(self, x, tw, ids, c=0):
        a, b = self.copies[c]
        return mxmoe_fused_experts(x, a, b, tw, ids, use_csrc=self.use_csrc, fuse_silu=self.fuse_silu)

    def reference(self, x, tw, ids):
        a, b = self.copies[0]
        return reference_fused_experts(x, a, b, tw, ids)


def _warm_vllm(job) -> str:
    """Compile vLLM's bf16 fused_moe Triton kernels for one (shape, tokens) in a worker process."""
    shape, t = job
    try:
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

        s = SHAPES[shape]
        e, h, i = s["experts"], s["hidden"], s["inter"]
        w1 = torch.randn(e, 2 * i, h, device="cuda", dtype=DTYPE)
        w2 = torch.randn(e, h, i, device="cuda", dtype=DTYPE)
        ids, tw = kc.zipf_routing(t, e, s["topk"], seed=t)
        with set_current_vllm_config(VllmConfig()):
            fused_experts(torch.randn(t, h, device="cuda", dtype=DTYPE), w1, w2, tw, ids)
        torch.cuda.synchronize()
        return ""
    except Exception:
        return f"{job}: {traceback.format_exc(limit=2)}"


def warm_vllm(jobs, procs: int) -> float:
    import multiprocessing as mp

    t0 = time.time()
    with mp.get_context("spawn").Pool(procs) as pool:
        for err in pool.imap_unordered(_warm_vllm, jobs):
            if err:
                print("vllm warm-up failed:", err, flush=True)
    return time.time() - t0


def bench(impl, x, tw, ids) -> tuple[float, str]:
    turn = itertools.cycle(range(COPIES))
    fn = lambda: impl.run(x, tw, ids, next(turn))  # noqa: E731
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median"), "graph"
    except Exception:
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, rep=60, return_mode="median"), "events"


def recorded_routings(path: str | None, tokens: int, count: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, ids, weights) of up to ``count`` recorded routings of ``tokens`` tokens, spread evenly."""
    if not path:
        return []
    samples = [s for s in torch.load(path) if s[1].shape[0] == tokens]
    picks = sorted({round(i * (len(samples) - 1) / max(count - 1, 1)) for i in range(count)}) if samples else []
    return [(f"served:{samples[i][0]}", samples[i][1].cuda(), samples[i][2].cuda()) for i in picks]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--shapes", default="qwen3-30b-a3b,qwen1.5-moe",
                    help=f"of {','.join(SHAPES)} (the last two compile new tile configs: slow)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--ours", default="w4g128,mixed3.25,mix2,w8a8fp8",
                    help="our layers (kernel_check assignments), each optionally +csrc and/or +sep (see OURS_FLAGS)")
    ap.add_argument("--procs", type=int, default=14)
    ap.add_argument("--zipf-s", type=float, default=kc.ZIPF_S,
                    help="routing skew: expert popularity ~ 1 / rank^s (0: uniform, as random-weight routers give)")
    ap.add_argument("--routing", help="recorded routings to replay (serving_profile.py --record-routing)")
    ap.add_argument("--routing-samples", type=int, default=8)
    args = ap.parse_args()
    kc.ZIPF_S = args.zipf_s
    out_dir = os.environ.get("OUT", ".")
    lines, results = [], dict(rows=[], checks=[])

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    def save():
        with open(os.path.join(out_dir, "baselines.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(out_dir, "baselines.json"), "w") as f:
            json.dump(results, f, indent=1)

    import vllm

    try:  # some vLLM kernels read the current config; outside an engine there is none
        from vllm.config import VllmConfig, set_current_vllm_config

        ctx = set_current_vllm_config(VllmConfig())
        ctx.__enter__()
    except Exception:
        emit(f"(no vLLM config context: {traceback.format_exc(limit=1)})")
    t0 = time.time()
    emit(f"# baselines {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
         f"{torch.cuda.get_device_properties(0).name}, torch {torch.__version__}, triton {triton.__version__}, "
         f"vllm {vllm.__version__}; CUDA-graph replay median, {COPIES} weight copies cycled; routing Zipf s={kc.ZIPF_S}")
    tokens_list = [int(t) for t in args.tokens.split(",")]
    ours = args.ours.split(",")
    shapes = args.shapes.split(",")
    # compile everything in parallel first (our kernels: kernel_check's workers; vLLM's: ours)
    jobs = [(sh, split_assign(a)[0], t, "table") for sh in shapes if sh in kc.SHAPES for a in ours for t in tokens_list]
    emit(f"warm-up: ours {kc.warm_up(list(dict.fromkeys(jobs)), args.procs):.0f} s, "
         f"vLLM {warm_vllm([(sh, t) for sh in shapes for t in tokens_list], args.procs):.0f} s; "
         f"MXMOE_DEQUANT={os.environ.get('MXMOE_DEQUANT', '(default)')}")
    for shape in shapes:
        s = SHAPES[shape]
        if time.time() - t0 > args.budget_s:
            emit(f"{shape}: skipped (budget)")
            continue
        impls = []
        for make in (lambda: VllmBf16(s), lambda: Marlin(s), *[(lambda a=a: Ours(shape, s, a)) for a in ours]):
            try:
                impls.append(make())
            except Exception:
                emit(f"{shape}: setup failed:\n{traceback.format_exc(limit=3)}")
        # correctness of every implementation on fresh inputs before timing
        ids, tw = kc.zipf_routing(16, s["experts"], s["topk"], seed=77)
        x = torch.randn(16, s["hidden"], device="cuda", dtype=DTYPE)
        good = []
        for impl in impls:
            try:
                out = impl.run(x, tw, ids)
                err = rel(out, impl.reference(x, tw, ids))
                ok = bool(torch.isfinite(out).all()) and err < 3e-2
            except Exception:
                err, ok = float("nan"), False
                emit(traceback.format_exc(limit=3))
            results["checks"].append(dict(shape=shape, impl=impl.name, rel_err=err, ok=ok))
            emit(f"check {shape} {impl.name}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")
            if ok:
                good.append(impl)
        bits = {i.name: getattr(i, "bits", 16.0 if i.name == "vllm_bf16" else 4.25) for i in good}
        emit(f"{'shape':16} {'tok':>5} {'routing':>22} {'max rows':>8} " + " ".join(f"{i.name + ' us':>18}" for i in good))
        for t in tokens_list:
            if time.time() - t0 > args.budget_s:
                emit(f"{shape} {t}: skipped (budget)")
                continue
            x = torch.randn(t, s["hidden"], device="cuda", dtype=DTYPE)
            synthetic = (f"zipf s={kc.ZIPF_S}", *kc.zipf_routing(t, s["experts"], s["topk"], seed=t))
            for label, ids, tw in [synthetic, *recorded_routings(args.routing, t, args.routing_samples)]:
                busiest = int(torch.bincount(ids.flatten().long(), minlength=s["experts"]).max())
                row = dict(shape=shape, tokens=t, routing=label, max_rows=busiest, us={}, how={}, bits=bits)
                for impl in good:
                    try:
                        ms, how = bench(impl, x, tw, ids)
                        row["us"][impl.name], row["how"][impl.name] = ms * 1e3, how
                    except Exception:
                        emit(f"{shape} {t} {impl.name}: failed\n{traceback.format_exc(limit=2)}")
                results["rows"].append(row)
                emit(f"{shape[:16]:16} {t:5d} {label[-22:]:>22} {busiest:8d} " + " ".join(
                    f"{row['us'].get(i.name, float('nan')):18.1f}" for i in good))
                save()
        del impls, good
        torch.cuda.empty_cache()
    emit(f"total {time.time() - t0:.0f} s")
    save()


if __name__ == "__main__":
    main()
