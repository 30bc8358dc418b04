"""rotate_model_ leaves tiny random MoE models of every supported architecture unchanged."""

import os
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from offline.hadamard import fwht_blocked, hadamard_signs
from offline.rotation import UnsupportedModelError, rotate_down_inputs_, rotate_model_

COMMON = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,  # large enough that every sublayer visibly moves the logits
}
DEEPSEEK = dict(
    COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
)  # fmt: skip

CONFIGS = {
    # tied embeddings: the rotation must untie lm_head
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True,
    ),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, qkv_bias=True,
    ),
    "mixtral": lambda: MixtralConfig(
        **COMMON, num_key_value_heads=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
    ),
    "olmoe": lambda: OlmoeConfig(
        **COMMON, num_key_value_heads=2, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        attention_bias=True,
    ),
    "deepseek_v2": lambda: DeepseekV2Config(**DEEPSEEK, q_lora_rank=32),
    "deepseek_v2_no_q_lora": lambda: DeepseekV2Config(**DEEPSEEK, q_lora_rank=None),
}  # fmt: skip


def tiny_model(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so their fusion is tested
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def relative_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", CONFIGS)
def test_rotation_preserves_outputs_and_round_trips(arch, tmp_path):
    model = tiny_model(CONFIGS[arch]())
    ref = logits(model, IDS)
    embed_before = model.model.embed_tokens.weight.clone()

    info = rotate_model_(model, seed=1)

    assert relative_diff(logits(model, IDS), ref) < 1e-4
    assert info["kind"] == "hadamard" and info["residual"] == {"size": 64, "block": 64}
    assert not torch.allclose(model.model.embed_tokens.weight, embed_before, atol=1e-3)  # really rotated
    norms = [
        p for n, p in model.named_parameters() if n.endswith("layernorm.weight") or n == "model.norm.weight"
    ]
    norms = [p for p in norms if p.shape == (64,)]  # residual norms (not MLA's q_a/kv_a norms)
    assert len(norms) == 2 * 2 + 1 and all(torch.equal(p, torch.ones(64)) for p in norms)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False

    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert "lm_head.weight" in saved
    moe_prefix = "model.layers.1." + ("block_sparse_moe" if arch == "mixtral" else "mlp")
    per_expert = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    assert {
        f"{moe_prefix}.experts.3.{p}.weight" for p in per_expert
    } <= saved  # transformers 5 un-fuses on save
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert relative_diff(logits(reloaded, IDS), ref) < 1e-4


def test_base_model_without_lm_head_is_refused():
    model = tiny_model(CONFIGS["qwen2_moe"]())
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        rotate_model_(model.model)


def test_unsupported_architecture_is_named():
    config = LlamaConfig(**COMMON, num_key_value_heads=2, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        rotate_model_(model)


@pytest.mark.parametrize("where", ["attention", "moe"])
def test_unknown_module_fails_before_anything_is_rotated(where):
    model = tiny_model(CONFIGS["qwen2_moe"]())
    layer = model.model.layers[1]
    if where == "attention":
        layer.self_attn.extra_proj = torch.nn.Linear(64, 64)
    else:
        layer.mlp.extra_scale = torch.nn.Parameter(torch.ones(64))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="layer 1.*extra_"):
        rotate_model_(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_down_input_rotation_needs_and_matches_the_online_transform():
    block = 128
    config = Qwen3MoeConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=256,
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = tiny_model(config)
    ref = logits(model, IDS)
    rotate_model_(model, seed=1)
    info = rotate_down_inputs_(model, block=block, seed=5)
    assert info == {"activation": "experts.down_proj.input", "size": 256, "block": block, "seed": 5}
    # Without the online Hadamard the function changed ...
    assert relative_diff(logits(model, IDS), ref) > 1e-2
    # ... with it (what the runtime does before the down GEMM) it is the same.
    signs = hadamard_signs(256, 5)
    for layer in model.model.layers:
        layer.mlp.experts.forward = types.MethodType(
            _experts_forward_with_online_hadamard(block, signs), layer.mlp.experts
        )
    assert relative_diff(logits(model, IDS), ref) < 1e-4


def _experts_forward_with_online_hadamard(block, signs):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = fwht_blocked(self.act_fn(gate) * up, block, signs)
            out.index_add_(
                0, token_idx, F.linear(h, self.down_proj[e]) * top_k_weights[token_idx, slot, None]
            )
        return out

    return forward
