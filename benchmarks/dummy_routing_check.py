"""Does a speed run's dummy weight fill change routing? (CPU, about a minute.)

A scaled-down Qwen3-MoE (Qwen3-30B-A3B's hidden size, heads and 128 experts top-8; 4 layers,
expert width 64) with vLLM-style dummy weights (every float parameter uniform(-1e-3, 1e-3)),
then the attention and/or expert weights replaced by the plugin's old dummy fill for quantized
blocks ((q - 1) * s, q uniform 0..15, s uniform(1e-3, 2e-3): all positive) or the current one
((q - 8) * s, s of random sign; vllm_mxmoe.kernels.layout.make_dummy_weights_sane). Prints, per
layer, how many experts receive any of the 128 tokens x 8 slots and the busiest expert's share.

    python benchmarks/dummy_routing_check.py
"""
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

CONFIG = Qwen3MoeConfig(vocab_size=4096, hidden_size=2048, intermediate_size=256, moe_intermediate_size=64,
                        num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512)
SELECT = {
    "attention": lambda name: ".self_attn." in name and name.endswith("proj.weight"),
    "experts": lambda name: ".experts." in name,
}
SELECT["both"] = lambda name: SELECT["attention"](name) or SELECT["experts"](name)


def vllm_fill(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.data.uniform_(-1e-3, 1e-3, generator=g)


def quantized_fill(model: torch.nn.Module, which: str, fill: str, seed: int) -> None:
    """The dequantized weights of the plugin's dummy fill, old or current, for the chosen linears."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if not SELECT[which](name):
            continue
        q = torch.randint(0, 16, param.shape, generator=g).float()
        if fill == "old":
            param.data.copy_((q - 1) * torch.empty(param.shape).uniform_(1e-3, 2e-3, generator=g))
        else:
            scale = torch.empty(param.shape[:-1] + (1,)).uniform_(-1e-3 / 8, 1e-3 / 8, generator=g)
            param.data.copy_((q - 8) * scale)


def routing_counts(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Slots per expert in each layer (the router's top-k)."""
    counts = {}

    def hook(layer):
        def record(_mod, _inp, out):
            logits = out if torch.is_tensor(out) else out[0]
            counts[layer] = torch.bincount(logits.topk(CONFIG.num_experts_per_tok, dim=-1).indices.flatten(),
                                           minlength=CONFIG.num_experts)
        return record

    handles = [m.mlp.gate.register_forward_hook(hook(i)) for i, m in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return counts


def main() -> None:
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(CONFIG).eval()
    ids = torch.randint(100, 4000, (1, 128), generator=torch.Generator().manual_seed(1))
    for which, fill in [(None, "vLLM bf16 only"), ("attention", "old"), ("experts", "old"), ("both", "old"),
                        ("both", "current")]:
        vllm_fill(model, seed=0)
        if which:
            quantized_fill(model, which, fill, seed=1)
        counts = routing_counts(model, ids)
        desc = ", ".join(f"L{i}: {int((c > 0).sum())} experts, busiest {c.max().item() / c.sum().item():.2f}"
                         for i, c in sorted(counts.items()))
        print(f"{which or '-':9s} {fill:14s} | {desc}", flush=True)


if __name__ == "__main__":
    main()
