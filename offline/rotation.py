"""Rotate a transformers MoE model's residual stream in place (QuaRot-style).

With Q orthogonal and the residual stream x replaced by x Q, the model computes
the same function if

* every RMSNorm that feeds linears has its weight g fused into those linears
  (W <- W diag(g)) and is set to 1: RMSNorm(x Q) = RMSNorm(x) Q only holds
  without the elementwise weight;
* the embedding becomes E Q;
* every linear that reads the residual (through a norm) becomes W <- W Q:
  attention q/k/v (DeepSeek-V2 MLA: q_proj or q_a_proj, kv_a_proj_with_mqa),
  the router, the experts' gate/up, dense and shared-expert gate/up, Qwen2-MoE's
  shared_expert_gate, and lm_head;
* every linear that writes the residual becomes W <- Q^T W, b <- Q^T b:
  o_proj, the experts' down, dense and shared-expert down.

The rotated weights have no outlier input channels, which is what makes the
subsequent low-bit quantization accurate. Optionally ``rotate_down_inputs_``
also rotates the experts' down_proj input (intermediate) dim with a blocked
Hadamard that the runtime must then apply online to the activations.

Expert weights in transformers 5 are fused 3-D parameters:
``experts.gate_up_proj`` [E, 2 * inter, hidden] (gate rows first, then up) and
``experts.down_proj`` [E, hidden, inter].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .hadamard import DEFAULT_MAX_BLOCK, hadamard_block_size, hadamard_matrix

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2")

# Attention linears reading the (normed) residual stream; absent ones are skipped
# (DeepSeek-V2 has q_proj only without q_lora_rank, q_a_proj only with it).
_ATTENTION_READERS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")
# Attention linears that neither read nor write the residual (MLA up-projections).
_ATTENTION_INTERNAL = ("q_b_proj", "kv_b_proj")
_SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts")  # Qwen2-MoE, DeepSeek-V2


class UnsupportedModelError(ValueError):
    """The model's architecture is not one rotate_model_ knows how to rotate."""


@dataclass
class _Slots:
    """Parameters of one norm's consumers: readers [..., out, hidden] get W diag(g) Q,
    writers [..., hidden, in] (with bias [..., hidden] or None) get Q^T W."""

    readers: list[nn.Parameter] = field(default_factory=list)
    writers: list[tuple[nn.Parameter, nn.Parameter | None]] = field(default_factory=list)


@torch.no_grad()
def rotate_model_(model: nn.Module, seed: int = 0, block: int | None = None) -> dict:
    """Rotate `model` (a *ForCausalLM) in place; its outputs (logits) are unchanged.

    The rotation is hadamard_matrix(hidden_size, seed, block=block): a full
    randomized Hadamard for a power-of-two hidden size, block-diagonal otherwise.
    Ties lm_head off the embedding (config.tie_word_embeddings = False) because the
    final norm's weight is fused into lm_head only. Returns the rotation's
    description for quantization_config["rotation"].
    """
    model_type = _check_supported(model)
    base, lm_head = _base_and_head(model, model_type)
    embed = base.embed_tokens.weight
    hidden = embed.shape[1]
    q = hadamard_matrix(hidden, seed, device=embed.device, dtype=torch.float64, block=block)

    # Map every norm to its consumers before touching anything, so an unknown
    # module fails loudly on an intact model instead of a half-rotated one.
    plan: list[tuple[nn.Module, _Slots]] = []
    for index, layer in enumerate(base.layers):
        where = f"{model_type} layer {index}"
        plan.append((layer.input_layernorm, _attention_slots(layer.self_attn, where)))
        plan.append((layer.post_attention_layernorm, _mlp_slots(layer.mlp, where)))

    _untie_lm_head(model, lm_head, base.embed_tokens)
    plan.append((base.norm, _Slots(readers=[lm_head.weight])))  # after untying: the new parameter
    _update_(embed, embed.double() @ q)
    for norm, slots in plan:
        _fuse_and_rotate_(norm, slots, q)
    return {
        "kind": "hadamard",
        "seed": seed,
        "residual": {"size": hidden, "block": hadamard_block_size(hidden, None) if block is None else block},
        "online": [],
    }


@torch.no_grad()
def rotate_down_inputs_(model: nn.Module, block: int = DEFAULT_MAX_BLOCK, seed: int = 0) -> dict:
    """Rotate the routed experts' down_proj input dim: W_down <- W_down Q.

    Weight side only: the model is correct again only if the runtime replaces
    the down_proj input h (= act(gate) * up) by ``fwht_blocked(h, block,
    hadamard_signs(inter, seed))``. Shared experts and dense MLPs are left alone.
    Returns the entry for quantization_config["rotation"]["online"].
    """
    model_type = _check_supported(model)
    base, _ = _base_and_head(model, model_type)
    inter = None
    for layer in base.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        inter = experts.down_proj.shape[-1]
        q = hadamard_matrix(inter, seed, device=experts.down_proj.device, dtype=torch.float64, block=block)
        for e in range(experts.down_proj.shape[0]):
            _update_(experts.down_proj[e], experts.down_proj[e].double() @ q)
    if inter is None:
        raise UnsupportedModelError(f"{model_type}: no routed experts to rotate")
    return {"activation": "experts.down_proj.input", "size": inter, "block": block, "seed": seed}


# ---------------------------------------------------------------------------
# Model structure


def _check_supported(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"Hadamard rotation does not support model type {model_type!r} "
            f"({type(model).__name__}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _base_and_head(model: nn.Module, model_type: str) -> tuple[nn.Module, nn.Linear]:
    """(decoder with embed_tokens/layers/norm, lm_head)."""
    base = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm")):
        # A base model's output is the residual itself: rotated, and with the final
        # norm's gain nowhere to go. Only lm_head can absorb both.
        raise UnsupportedModelError(
            f"{model_type}: rotation needs a causal LM with model.embed_tokens/layers/norm and lm_head, "
            f"got {type(model).__name__}"
        )
    return base, lm_head


def _attention_slots(attn: nn.Module, where: str) -> _Slots:
    known = set(_ATTENTION_READERS) | set(_ATTENTION_INTERNAL) | {"o_proj"}
    for name, child in attn.named_children():
        if isinstance(child, nn.Linear) and name not in known:
            raise UnsupportedModelError(
                f"{where}: unknown attention linear {name!r}; cannot tell if it reads the residual"
            )
    readers = [
        getattr(attn, name).weight for name in _ATTENTION_READERS if getattr(attn, name, None) is not None
    ]
    if not readers:
        raise UnsupportedModelError(
            f"{where}: attention {type(attn).__name__} has none of {_ATTENTION_READERS}"
        )
    return _Slots(readers=readers, writers=[(attn.o_proj.weight, attn.o_proj.bias)])


def _mlp_slots(mlp: nn.Module, where: str) -> _Slots:
    if not hasattr(mlp, "experts"):
        return _dense_mlp_slots(mlp, where)
    experts = mlp.experts
    fused = isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)
    if not fused or getattr(experts, "is_transposed", False):
        raise UnsupportedModelError(
            f"{where}: {type(experts).__name__} is not the fused [E, 2*inter, hidden] gate_up_proj layout"
        )
    slots = _Slots(
        readers=[mlp.gate.weight, experts.gate_up_proj],
        writers=[(experts.down_proj, getattr(experts, "down_proj_bias", None))],
    )
    for name in _SHARED_EXPERT_NAMES:
        shared = getattr(mlp, name, None)
        if shared is not None:
            shared_slots = _dense_mlp_slots(shared, f"{where} {name}")
            slots.readers += shared_slots.readers
            slots.writers += shared_slots.writers
    if getattr(mlp, "shared_expert_gate", None) is not None:
        slots.readers.append(mlp.shared_expert_gate.weight)
    _check_all_covered(mlp, slots, where)
    return slots


def _dense_mlp_slots(mlp: nn.Module, where: str) -> _Slots:
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        raise UnsupportedModelError(
            f"{where}: MLP {type(mlp).__name__} lacks gate_proj/up_proj/down_proj linears"
        )
    return _Slots(
        readers=[mlp.gate_proj.weight, mlp.up_proj.weight],
        writers=[(mlp.down_proj.weight, mlp.down_proj.bias)],
    )


def _check_all_covered(mlp: nn.Module, slots: _Slots, where: str) -> None:
    """Fail loudly on an MLP parameter we would silently leave unrotated.

    Biases of readers act on outputs, so they need nothing."""
    covered = {id(p) for p in slots.readers}
    covered |= {id(p) for w, b in slots.writers for p in (w, b) if p is not None}
    for name, param in mlp.named_parameters():
        if id(param) not in covered and not name.endswith("bias"):
            raise UnsupportedModelError(f"{where}: do not know how to rotate MLP parameter {name!r}")


# ---------------------------------------------------------------------------
# The math (float64, cast back to each parameter's dtype)


def _fuse_and_rotate_(norm: nn.Module, slots: _Slots, q: torch.Tensor) -> None:
    gain = norm.weight.double()
    for weight in slots.readers:
        for matrix in _matrices(weight):  # [out, hidden]
            _update_(matrix, (matrix.double() * gain) @ q)
    for weight, bias in slots.writers:
        for matrix in _matrices(weight):  # [hidden, in]
            _update_(matrix, q.T @ matrix.double())
        if bias is not None:
            for vector in _matrices(bias):  # [hidden]
                _update_(vector, vector.double() @ q)
    norm.weight.fill_(1.0)


def _matrices(param: torch.Tensor) -> list[torch.Tensor]:
    """A 2-D weight itself, or the per-expert views of a fused 3-D one (bounds float64 memory)."""
    return [param] if param.dim() <= 2 else list(param.unbind(0))


def _update_(target: torch.Tensor, value: torch.Tensor) -> None:
    target.copy_(value.to(target.dtype))


def _untie_lm_head(model: nn.Module, lm_head: nn.Linear, embed: nn.Embedding) -> None:
    """Give lm_head its own storage: the final norm is fused into it, not into the embedding."""
    if lm_head.weight.data_ptr() == embed.weight.data_ptr():
        lm_head.weight = nn.Parameter(embed.weight.detach().clone())
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
