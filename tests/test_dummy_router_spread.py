"""gpu_serving_check.spread_router_weights: dummy-weight routing of DeepSeek-V2-Lite's shape spreads again.

vLLM's dummy fill (every float tensor uniform(-1e-3, 1e-3) from a generator re-seeded with 1234) gives router
logits of std ~1e-5; DeepSeek's grouped_topk takes their softmax in bf16, where all 64 scores are exactly 1/64,
so every token goes to the same experts. Checked here on a plain torch module with vLLM's module names and
the router input vLLM's dummy model produces (RMSNorm of a token embedding, times a dummy norm weight; the
attention and MLP outputs are ~1e-7 and leave the residual as it was). CPU, under a second.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_serving_check import spread_router_weights

HIDDEN, EXPERTS, TOP_K, TOKENS = 2048, 64, 6, 128


def vllm_dummy_fill(tensor: torch.Tensor, seed: int = 1234) -> None:
    """vllm.model_executor.model_loader.weight_utils.initialize_single_dummy_weight on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    tensor.uniform_(-1e-3, 1e-3, generator=gen)


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(HIDDEN, EXPERTS, bias=False, dtype=torch.bfloat16)
        self.shared_expert_gate = torch.nn.Linear(HIDDEN, 1, bias=False, dtype=torch.bfloat16)  # Qwen1.5's


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.post_attention_layernorm = torch.nn.Parameter(torch.empty(HIDDEN, dtype=torch.bfloat16))
        self.mlp = Mlp()


class Model(torch.nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Parameter(torch.empty(4096, HIDDEN, dtype=torch.bfloat16))
        self.layers = torch.nn.ModuleList(Layer() for _ in range(layers))


def dummy_model() -> Model:
    model = Model()
    with torch.no_grad():
        for p in model.parameters():
            vllm_dummy_fill(p)
    return model


def routed_experts(model: Model) -> list[torch.Tensor]:
    """Each layer's top-k as vLLM 0.25's grouped_topk picks it (softmax of the bf16 logits, in bf16)."""
    ids = torch.randint(100, 4096, (TOKENS,), generator=torch.Generator().manual_seed(0))
    x = model.embed_tokens[ids].float()
    picks = []
    for layer in model.layers:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.post_attention_layernorm.float()
        logits = torch.nn.functional.linear(h.bfloat16(), layer.mlp.gate.weight)
        scores = torch.softmax(logits, dim=-1)
        picks.append(scores.float().topk(TOP_K, dim=-1).indices)
    return picks


def test_dummy_fill_collapses_bf16_grouped_topk() -> None:
    """The failure the remedy is for: every bf16 score ties, so all tokens share one set of experts."""
    for top in routed_experts(dummy_model()):
        assert top.unique().numel() == TOP_K


def test_spread_router_weights_spreads_routing() -> None:
    model = dummy_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = spread_router_weights(model)
    assert names == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    for n, p in model.named_parameters():  # only the routers' weights change
        assert torch.equal(p, before[n]) == (not n.endswith("mlp.gate.weight")), n
    assert not torch.equal(model.layers[0].mlp.gate.weight, model.layers[1].mlp.gate.weight)
    picks = routed_experts(model)
    for top in picks:
        counts = torch.bincount(top.flatten(), minlength=EXPERTS)
        assert (counts > 0).sum() >= 60  # 128 tokens x 6 slots over 64 experts
        assert counts.max() <= 0.4 * TOKENS
    assert not torch.equal(picks[0], picks[1])  # layers route differently
    # Deterministic: the same values on every call (both sides of a comparison get the same gates).
    again = dummy_model()
    spread_router_weights(again)
    assert torch.equal(again.layers[1].mlp.gate.weight, model.layers[1].mlp.gate.weight)


def test_spread_router_weights_refuses_a_quantized_gate() -> None:
    """E.g. Qwen3's gate under GPTQ-Marlin: refilling the other variants only would be unfair."""
    model = dummy_model()
    gate = model.layers[0].mlp.gate
    del gate.weight
    gate.qweight = torch.nn.Parameter(
        torch.zeros(HIDDEN // 8, EXPERTS, dtype=torch.int32), requires_grad=False
    )
    with pytest.raises(TypeError, match="layers.0.mlp.gate"):
        spread_router_weights(model)
