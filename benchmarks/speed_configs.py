"""Real-size MoE configs with random weights (load_format="dummy") for speed runs.

Writes one folder per variant, each holding only config.json: vLLM's bf16 path,
GPTQ w4g128 (vLLM's Marlin MoE), and MxMoE checkpoints (uniform or mixed
schemes per expert; the experts' scheme map is all an MxMoE config needs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_mxmoe.format import ExpertLayerSchemes, MxMoEQuantConfig  # noqa: E402
from vllm_mxmoe.schemes import parse_scheme  # noqa: E402

QWEN15_MOE = dict(
    architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
    norm_topk_prob=False, max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151643,
    use_sliding_window=False, output_router_logits=False, qkv_bias=True,
)  # fmt: skip
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
    mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1000000.0,
    rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=False,
    bos_token_id=151643, eos_token_id=151645, use_sliding_window=False, output_router_logits=False,
)  # fmt: skip
DEEPSEEK_V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
    intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
    moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
    routed_scaling_factor=1.0, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
    hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=False,
    bos_token_id=100000, eos_token_id=100001,
)  # fmt: skip
CONFIGS = {"qwen1.5-moe-a2.7b": QWEN15_MOE, "qwen3-30b-a3b": QWEN3_30B_A3B, "deepseek-v2-lite": DEEPSEEK_V2_LITE}
GPTQ4 = dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq")
# Equal thirds of 2, 3 and 4 bits (g128): 3.25 bits per weight on average.
MIXED_325 = ["w2g128", "w3g128", "w4g128"]
# Four w2 (per channel, ~2.02 bits), one w2g128, one w3g128: ~2.26 bits on average.
MIXED_225 = ["w2", "w2g128", "w2", "w3g128", "w2", "w2"]
# The scheme mix r=auto chose on the reference model at 3.25 bits with the H200 table
# (results/2026-11-29-r-auto-h200-table/report.json: gate_up 46% w2g128, 29% w4g128, 20% w3g128,
# 5% w2; down 53% w4g128, 22% w2g128, 16% w3g128, 5% w2, 4% w8), in twentieths: ~3.29 bits.
AUTO_325_GATE_UP = ["w2g128"] * 9 + ["w4g128"] * 6 + ["w3g128"] * 4 + ["w2"]
AUTO_325_DOWN = ["w4g128"] * 11 + ["w2g128"] * 4 + ["w3g128"] * 3 + ["w2", "w8"]
# Weight-activation mix: one expert in eight w8a8fp8 (the hot ones in a real
# allocation; random weights route evenly, so which ones does not matter), rest w4g128.
WA_MIX = ["w8a8fp8"] + ["w4g128"] * 7


def num_experts(base: dict) -> int:
    return base.get("num_experts") or base["n_routed_experts"]


def moe_layers(base: dict) -> list[int]:
    first_dense = base.get("first_k_dense_replace", 0)
    dense = set(base.get("mlp_only_layers", []))
    return [i for i in range(first_dense, base["num_hidden_layers"]) if i not in dense]


# The non-expert linears a GPTQ checkpoint quantizes too (vLLM's Marlin path runs them all in
# w4g128), per architecture; "_lin4" variants quantize these in w4g128 so that both sides read
# the same bytes outside the experts. Left in bf16 on both sides' terms: the router, Qwen1.5's
# one-output shared_expert_gate, DeepSeek's kv_b_proj (MLA absorbs it at load) and its dense
# first layer (intermediate 10944 is not a whole number of 128-groups).
ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
NON_EXPERT_LINEARS = {
    "qwen3_moe": ATTENTION,
    "qwen2_moe": ATTENTION + [f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")],
    "deepseek_v2": ["self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj"]
    + [f"mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")],
}


def non_expert_linears(base: dict, scheme: str) -> dict[str, str]:
    """Module name -> scheme for every quantizable non-expert linear of the MoE layers' blocks
    (attention of every layer)."""
    names = {}
    moe = set(moe_layers(base))
    for layer in range(base["num_hidden_layers"]):
        for rel in NON_EXPERT_LINEARS[base["model_type"]]:
            if rel.startswith("mlp.") and layer not in moe:
                continue
            names[f"model.layers.{layer}.{rel}"] = scheme
    return names


def mxmoe_config(base: dict, gate_up_cycle: list[str], down_cycle: list[str], linears: str | None = None) -> dict:
    """MxMoE quantization config: expert schemes cycled over experts; ``linears``: also quantize the
    non-expert linears in this scheme."""
    experts = {}
    n = num_experts(base)
    for layer in moe_layers(base):
        experts[f"model.layers.{layer}.mlp.experts"] = ExpertLayerSchemes(
            [gate_up_cycle[(e + layer) % len(gate_up_cycle)] for e in range(n)],
            [down_cycle[(e + layer + 1) % len(down_cycle)] for e in range(n)],
        )
    lin = non_expert_linears(base, linears) if linears else {}
    names = set(gate_up_cycle) | set(down_cycle) | set(lin.values())
    return MxMoEQuantConfig(schemes={s: parse_scheme(s) for s in names}, experts=experts, linears=lin).to_dict()


def write_all(out: Path, base: dict = QWEN15_MOE) -> dict[str, Path]:
    variants = {
        "bf16": None,
        "gptq4_marlin": GPTQ4,
        "mxmoe_w4g128": mxmoe_config(base, ["w4g128"], ["w4g128"]),
        "mxmoe_mixed325": mxmoe_config(base, MIXED_325, MIXED_325),
        "mxmoe_mixed225": mxmoe_config(base, MIXED_225, MIXED_225),
        "mxmoe_auto325": mxmoe_config(base, AUTO_325_GATE_UP, AUTO_325_DOWN),
        "mxmoe_wa_mix": mxmoe_config(base, WA_MIX, WA_MIX),
        "mxmoe_w4g128_lin4": mxmoe_config(base, ["w4g128"], ["w4g128"], linears="w4g128"),
        "mxmoe_mixed325_lin4": mxmoe_config(base, MIXED_325, MIXED_325, linears="w4g128"),
        "mxmoe_mixed225_lin4": mxmoe_config(base, MIXED_225, MIXED_225, linears="w4g128"),
    }
    paths = {}
    for name, quant in variants.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(base)
        if quant:
            cfg["quantization_config"] = quant
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        paths[name] = d
    return paths


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--config", choices=sorted(CONFIGS), default="qwen1.5-moe-a2.7b")
    args = p.parse_args()
    print(write_all(args.out, CONFIGS[args.config]))
