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
CONFIGS = {"qwen1.5-moe-a2.7b": QWEN15_MOE, "qwen3-30b-a3b": QWEN3_30B_A3B}
GPTQ4 = dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq")
# Equal thirds of 2, 3 and 4 bits (g128): 3.25 bits per weight on average.
MIXED_325 = ["w2g128", "w3g128", "w4g128"]


def mxmoe_config(base: dict, gate_up_cycle: list[str], down_cycle: list[str]) -> dict:
    experts = {}
    n = base["num_experts"]
    for layer in range(base["num_hidden_layers"]):
        experts[f"model.layers.{layer}.mlp.experts"] = ExpertLayerSchemes(
            [gate_up_cycle[(e + layer) % len(gate_up_cycle)] for e in range(n)],
            [down_cycle[(e + layer + 1) % len(down_cycle)] for e in range(n)],
        )
    names = set(gate_up_cycle) | set(down_cycle)
    return MxMoEQuantConfig(schemes={s: parse_scheme(s) for s in names}, experts=experts).to_dict()


def write_all(out: Path, base: dict = QWEN15_MOE) -> dict[str, Path]:
    variants = {
        "bf16": None,
        "gptq4_marlin": GPTQ4,
        "mxmoe_w4g128": mxmoe_config(base, ["w4g128"], ["w4g128"]),
        "mxmoe_mixed325": mxmoe_config(base, MIXED_325, MIXED_325),
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
