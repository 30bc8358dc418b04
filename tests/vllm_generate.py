"""Run vLLM's offline engine on a checkpoint in a fresh process; print JSON results.

Usage: python vllm_generate.py REQUEST.json  (keys: model, prompts (token id lists),
max_tokens, and optional quantization, dtype, tensor_parallel_size,
enable_expert_parallel, enforce_eager).
Each test gets its own process so engines never share state and crashes stay contained.
"""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    req = json.load(open(sys.argv[1]))
    llm = LLM(
        model=req["model"],
        quantization=req.get("quantization"),
        dtype=req.get("dtype", "float32"),
        enforce_eager=req.get("enforce_eager", True),
        tensor_parallel_size=req.get("tensor_parallel_size", 1),
        enable_expert_parallel=req.get("enable_expert_parallel", False),
        max_model_len=req.get("max_model_len", 512),
        gpu_memory_utilization=req.get("gpu_memory_utilization", 0.15),
        seed=0,
    )
    params = SamplingParams(max_tokens=req["max_tokens"], temperature=0.0, logprobs=1, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in req["prompts"]], params)
    result = []
    for out in outs:
        c = out.outputs[0]
        result.append(
            {"token_ids": list(c.token_ids), "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]}
        )
    print("RESULT_JSON " + json.dumps(result))
