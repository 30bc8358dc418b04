"""Perplexity of a checkpoint on a text file, non-overlapping windows.

Two back ends that must agree: transformers (an MxMoE checkpoint is
dequantized first) and vLLM (prompt log-probabilities through the real engine,
so the plugin's own path is what is measured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int
    windows: int
    seq_len: int
    backend: str


def token_windows(model_dir: str | Path, text_path: str | Path, seq_len: int, max_windows: int | None) -> list[list[int]]:
    """Tokenize the whole file and cut it into full windows of seq_len tokens."""
    from transformers import AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no config.json there (not a model folder)")
    text = Path(text_path).read_text()
    if not text.strip():
        raise ValueError(f"{text_path}: empty text")
    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(text)
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(f"{text_path}: {len(ids)} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(count)]


def _result(nll_sum: float, tokens: int, windows: list, seq_len: int, backend: str) -> PerplexityResult:
    return PerplexityResult(math.exp(nll_sum / tokens), nll_sum, tokens, len(windows), seq_len, backend)


def perplexity_hf(
    model_dir, windows: list[list[int]], dtype=torch.float32, device: str | None = None
) -> PerplexityResult:
    """transformers on ``device`` (default: cuda if available, else cpu); an MxMoE checkpoint is
    dequantized into a temporary folder."""
    from transformers import AutoModelForCausalLM

    from vllm_mxmoe.format import QUANT_METHOD

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.get("quantization_config", {}).get("quant_method") == QUANT_METHOD:
            from .dequantize import dequantize_checkpoint

            model_dir = dequantize_checkpoint(model_dir, Path(tmp) / "dq")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        nll, count = 0.0, 0
        with torch.no_grad():
            for window in tqdm(windows, desc="perplexity (transformers)", unit="window"):
                ids = torch.tensor([window], device=device)
                logits = model(ids, use_cache=False).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += len(window) - 1
    return _result(nll, count, windows, len(windows[0]), "transformers")


def perplexity_vllm(model_dir, windows: list[list[int]], dtype: str = "float32", **llm_kwargs) -> PerplexityResult:
    """vLLM's engine; prompt log-probabilities of every window token after the first."""
    from vllm import LLM, SamplingParams

    seq_len = len(windows[0])
    llm_kwargs.setdefault("gpu_memory_utilization", 0.15)
    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=seq_len + 1, enable_prefix_caching=False, **llm_kwargs)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params)
    nll, count = 0.0, 0
    for window, out in zip(windows, outs):
        for token, logprobs in zip(window[1:], out.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            count += 1
    return _result(nll, count, windows, seq_len, "vllm")


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mxmoe-eval", description="Perplexity of a (MxMoE or plain) checkpoint.")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="plain text file")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--backend", choices=["vllm", "transformers", "both"], default="vllm")
    p.add_argument("--dtype", default="float32", help="compute dtype (vLLM: float32/bfloat16/float16)")
    p.add_argument("--device", help="transformers backend: torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        windows = token_windows(args.model, args.text, args.seq_len, args.max_windows)
    except (OSError, ValueError) as e:
        print(f"mxmoe-eval: error: {e}", file=sys.stderr)
        return 2
    results = []
    if args.backend in ("transformers", "both"):
        results.append(perplexity_hf(args.model, windows, getattr(torch, args.dtype), args.device))
    if args.backend in ("vllm", "both"):
        results.append(perplexity_vllm(args.model, windows, args.dtype))
    for r in results:
        print(f"{r.backend}: perplexity {r.perplexity:.4f} over {r.tokens} tokens ({r.windows} x {r.seq_len})")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
