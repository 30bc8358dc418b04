"""The offline pipeline on a GPU: real-size MoE configs with random weights, timed per stage.

    python benchmarks/gpu_quantize_check.py random-model qwen1.5-moe-a2.7b /tmp/rq --layers 2 \\
        --tokenizer ../shared/reference-moe
    mxmoe-quantize --model /tmp/rq --calib ../shared/corpus/calib.txt --wbits 3.25 --out /tmp/rq-q

`random-model` writes a transformers checkpoint (bf16) of a config from speed_configs.py, optionally with fewer
decoder layers, and a tokenizer copied from another folder (its ids must fall inside the config's vocabulary).
Random weights mean nothing for accuracy; they give the pipeline's time and memory at real layer shapes
(report.json: stage_seconds, peak_device_memory_gib). Routing of random routers is near uniform.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed_configs import CONFIGS  # noqa: E402
from vllm_mxmoe.schemes import DEFAULT_SCHEMES  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def random_model(name: str, out: Path, layers: int | None, tokenizer: Path, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in CONFIGS:
        raise SystemExit(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    fields = dict(CONFIGS[name])
    fields.pop("architectures", None)
    fields.pop("torch_dtype", None)
    model_type = fields.pop("model_type")
    if layers is not None:
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: minutes less for billions of weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out), max_shard_size="4GB")
    copied = [f for f in TOKENIZER_FILES if (tokenizer / f).is_file()]
    for f in copied:
        shutil.copyfile(tokenizer / f, out / f)
    if not copied:
        raise SystemExit(f"no tokenizer files in {tokenizer}")
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {config.num_hidden_layers} layers, {params / 1e9:.2f} B parameters -> {out} "
          f"({time.perf_counter() - start:.0f} s on {device})")
    return out


def time_gptq(name: str, schemes: list[str], tokens: int = 512, repeats: int = 3) -> dict:
    """Seconds per quantize_unit call of one expert's units at the config's shapes (median of ``repeats``), on
    cuda if available: the unit of work the sensitivity stage repeats experts x units x schemes times."""
    from offline.pipeline import FP_TARGET_PERCDAMP
    from offline.sensitivity import quantize_unit
    from vllm_mxmoe.schemes import parse_scheme

    cfg = CONFIGS[name]
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    seconds = {}
    for unit, (n, k) in {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}.items():
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        x = torch.randn(tokens, k, device=device, generator=gen)
        h = 2 * x.T.double() @ x.double() / tokens
        for scheme in schemes:
            times = []
            for _ in range(repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                quantize_unit(w, h, parse_scheme(scheme), "gptq", "mse", FP_TARGET_PERCDAMP)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            seconds[f"{unit} [{n}, {k}] {scheme}"] = sorted(times)[len(times) // 2]
    for key, value in seconds.items():
        print(f"{name} {key}: {value * 1e3:.1f} ms on {device}")
    per_expert = sum(seconds.values())
    experts = cfg.get("num_experts", cfg.get("n_routed_experts", cfg.get("num_local_experts")))
    print(f"{name}: {per_expert:.2f} s per expert for {len(schemes)} schemes x 2 units; "
          f"{per_expert * experts:.0f} s per layer of {experts} experts")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    rm = sub.add_parser("random-model", help="a real-size config with random bf16 weights, saved for transformers")
    rm.add_argument("config", choices=sorted(CONFIGS))
    rm.add_argument("out", type=Path)
    rm.add_argument("--layers", type=int, help="decoder layers to keep (default: the config's)")
    rm.add_argument("--tokenizer", type=Path, required=True, help="folder whose tokenizer files are copied")
    gt = sub.add_parser("gptq-time", help="time one expert's GPTQ per scheme at a config's shapes")
    gt.add_argument("config", choices=sorted(CONFIGS))
    gt.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    args = p.parse_args(argv)
    if args.cmd == "random-model":
        random_model(args.config, args.out, args.layers, args.tokenizer)
    elif args.cmd == "gptq-time":
        time_gptq(args.config, args.schemes.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
