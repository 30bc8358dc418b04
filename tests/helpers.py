"""Shared test helpers: run vLLM in a subprocess, reference generation with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def subprocess_env() -> dict[str, str]:
    """Environment for vLLM processes: without the test-only Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    return env


class VLLMFailed(RuntimeError):
    def __init__(self, returncode: int, output: str):
        super().__init__(f"vLLM exited with {returncode}:\n{output[-4000:]}")
        self.output = output


def vllm_generate(model: Path, prompts: list[list[int]], max_tokens: int, tmp: Path, **options) -> list[dict]:
    req = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, **options}
    req_path = tmp / "vllm_request.json"
    req_path.write_text(json.dumps(req))
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_generate.py"), str(req_path)],
        capture_output=True, text=True, timeout=900, env=subprocess_env(),
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise VLLMFailed(proc.returncode, output)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON "))
    return json.loads(line[len("RESULT_JSON ") :])


def hf_greedy(model_dir: Path, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from transformers, float32, no KV cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    seq, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            t = int(lp.argmax())
            tokens.append(t)
            logprobs.append(lp[t].item())
            seq.append(t)
    return tokens, logprobs
