"""GPTQ in model order ("sequential", the GPTQ paper's own loop).

Without it (``--no-sequential``) every block is quantized with the Hessian the
profile measured on the unquantized model. In model order (the pipeline's
default with GPTQ), the calibration tokens instead run through the model once
more, one decoder layer at a time, and each MoE layer's Hessians are taken from
the outputs of the layers before it *as quantized*, so GPTQ also compensates
the error that reaches the layer. Inside a layer, down's
Hessian is taken after gate_up is quantized (its inputs are the quantized
gate_up's activations). The allocation and the sensitivities still come from
the profile; only the GPTQ fit changes.

Cost: three passes of the calibration tokens through each MoE layer (gate_up
Hessians, down Hessians, outputs for the next layer). Memory: one layer's
activations, as in the profile, plus a copy of one layer's expert weights,
which are put back once the layer's outputs are computed.

Target (``target``). With "quantized" (GPTQ's own loop) GPTQ
minimises ||(Ŵ - W) X̃||², i.e. it reproduces W X̃: the unquantized weights on
the quantized model's inputs X̃. With "fp" (GPTAQ / GPTQv2, Li et al. 2025) it
targets the unquantized model's outputs instead, ||Ŵ X̃ - W X||², X the same
tokens' inputs in the unquantized model. As ||Ŵ X̃ - W X||² + λ||Ŵ - W||² =
||(Ŵ - W') X̃||²_(H+λI) + const with W' = W + W C (H + λI)^-1, H = Σ x̃ x̃ᵀ and
C = Σ (x - x̃) x̃ᵀ (same tokens, same per-token weights, same 2/n scaling as H;
λ GPTQ's dampening), GPTQ of the shifted W' with Hessian H minimises it
(``fp_target``); C = 0 gives W' = W. Tokens are paired by position: expert e's
tokens are those the quantized stream routes to e, x̃ their inputs there and x
the same positions' expert inputs in the unquantized model (a second copy of the
calibration activations runs through the unquantized layers). For down, x̃ is
act(Ĝ x̃)·(Û x̃) with the already quantized gate_up and x = act(G x)·(U x) with
the original one. Extra cost: one more pass per decoder layer (the fp stream)
and a copy of one MoE layer's expert inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from .gptq import DEFAULT_PERCDAMP, HessianAccumulator, _checked_hessian, _decouple_dead_inputs, damped_choleskys
from .profile import (
    HESSIAN_WEIGHTS,
    MoELayer,
    _ExpertRecorder,
    _first_layer_inputs,
    _routing_arguments,
    decoder_layers,
    expert_activation,
    pre_hook,
)
from .sensitivity import QuantizedUnit

# What GPTQ in model order fits: "quantized" = W on the quantized inputs (W X̃), "fp" = the
# unquantized model's outputs (W X, GPTAQ)
SEQUENTIAL_TARGETS = ("quantized", "fp")
# GPTQ's dampening with the fp target: the shift W C (H + λI)^-1 needs more regularising than GPTQ's
# own 0.01; 0.3 beat 0.01, 0.1 and 1.0 on the reference model (benchmarks/RESULTS.md section 3, session 16)
FP_TARGET_PERCDAMP = 0.3

# quantize(layer, unit, experts, weights, hessians) -> those experts' units, each quantized with its
# allocated scheme (one call per layer and unit, so that GPTQ can batch the experts)
QuantizeFn = Callable[[MoELayer, str, list[int], list[torch.Tensor], list[torch.Tensor]], list[QuantizedUnit]]


@torch.no_grad()
def quantize_in_model_order(
    model: nn.Module,
    moe_layers: list[MoELayer],
    sequences: torch.Tensor,
    quantize: QuantizeFn,
    batch_size: int,
    hessian_weights: str = "none",
    target: str = "quantized",
    percdamp: float = DEFAULT_PERCDAMP,
) -> dict[tuple[str, str, int], QuantizedUnit]:
    """Every expert unit of ``moe_layers`` quantized by ``quantize``, keyed (prefix, unit, expert),
    with Hessians from ``sequences`` [n, seq_len] flowing through the already quantized layers.
    ``target`` "fp": ``quantize`` gets the GPTAQ-shifted weight (``fp_target``, dampened with
    ``percdamp`` as GPTQ's) instead of the layer's own. The model's weights are unchanged on return."""
    if target not in SEQUENTIAL_TARGETS:
        raise ValueError(f"target must be one of {SEQUENTIAL_TARGETS}, got {target!r}")
    model.eval()
    device = next(model.parameters()).device
    by_index = {layer.index: layer for layer in moe_layers}
    batches = _first_layer_inputs(model, sequences, batch_size, device)
    # the same tokens through the unquantized layers (fp target only)
    fp_batches = [[b[0].clone(), b[1], b[2]] for b in batches] if target == "fp" else None
    units: dict[tuple[str, str, int], QuantizedUnit] = {}
    layers = decoder_layers(model)[: max(by_index) + 1]
    for index, layer in enumerate(tqdm(layers, desc="quantize (gptq, in model order)", unit="layer")):
        moe = by_index.get(index)
        if moe is None:
            _advance(layer, batches)
            if fp_batches is not None:
                _advance(layer, fp_batches)
            continue
        experts = moe.experts
        original = {name: getattr(experts, name).data.clone() for name in ("gate_up_proj", "down_proj")}
        # the fp stream's expert inputs of this layer, and its outputs (weights still original)
        fp_inputs = _advance(layer, fp_batches, capture=experts) if fp_batches is not None else None
        try:
            for unit, name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                weights = getattr(experts, name)
                if fp_inputs is None:
                    profile = _record(layer, moe, batches, hessian_weights)
                    hessians = profile.gate_up_hessian if unit == "gate_up" else profile.down_hessian
                    crosses = None
                else:
                    hessians, crosses = _record_paired(layer, moe, batches, fp_inputs, unit,
                                                       original["gate_up_proj"], hessian_weights)
                ids = list(range(weights.shape[0]))
                unit_hessians = [hessians[e].to(weights.device) for e in ids]
                targets = [weights[e] for e in ids]
                if crosses is not None:
                    targets = [fp_target(original[name][e], h, crosses[e].to(weights.device), percdamp)
                               for e, h in zip(ids, unit_hessians)]
                for e, q in zip(ids, quantize(moe, unit, ids, targets, unit_hessians)):
                    units[(moe.prefix, unit, e)] = q
                    weights.data[e] = q.fake_quantized.to(weights.dtype)
            _advance(layer, batches)  # the next layer sees this one quantized
        finally:
            for name, tensor in original.items():
                getattr(experts, name).data.copy_(tensor)
    return units


def fp_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
              percdamp: float = DEFAULT_PERCDAMP) -> torch.Tensor:
    """W' = W + W C (H + λI)^-1 (float32 [N, K]) for weight W [N, K], H = 2 X̃ᵀX̃ / n and
    C = 2 (X - X̃)ᵀ X̃ / n [K, K]: GPTQ of W' with Hessian H minimises ||Ŵ X̃ - W X||² (plus GPTQ's
    dampening λ||Ŵ - W||²). H is treated as GPTQ treats it (dead inputs decoupled, λ = percdamp
    times its mean diagonal, more dampening if that is not enough). W itself when H holds no
    sample or C is zero."""
    w = weight.detach().float()
    h = _checked_hessian(hessian, w)
    if not (h.diagonal() > 0).any() or not bool(cross.any()):
        return w.clone()
    _decouple_dead_inputs(h)
    wc = w.double() @ cross.to(device=h.device, dtype=torch.float64)
    for chol in damped_choleskys(h, percdamp):  # H + λI symmetric: W C (H + λI)^-1 = ((H + λI)^-1 (W C)^T)^T
        shift = torch.cholesky_solve(wc.T, chol).T
        if torch.isfinite(shift).all():
            return (w.double() + shift).float()
    return w.clone()


class _PairedRecorder:
    """Forward pre-hook on one experts module: per expert, H = 2 Σ x̃ x̃ᵀ / n and C = 2 Σ (x - x̃) x̃ᵀ / n
    of one unit, over the tokens the (quantized) stream now running routes to it, x the same
    positions' inputs in the fp stream (``reference``, set per batch). Token weights as
    _ExpertRecorder's (``hessian_weights``)."""

    def __init__(self, experts: nn.Module, unit: str, reference_gate_up: torch.Tensor, hessian_weights: str):
        if hessian_weights not in HESSIAN_WEIGHTS:
            raise ValueError(f"hessian_weights must be one of {HESSIAN_WEIGHTS}, got {hessian_weights!r}")
        self.experts, self.unit, self.hessian_weights = experts, unit, hessian_weights
        self.reference_gate_up = reference_gate_up
        num_experts, two_inter, hidden = experts.gate_up_proj.shape
        self.num_experts = num_experts
        k = hidden if unit == "gate_up" else two_inter // 2
        self.hessians = [HessianAccumulator(k) for _ in range(num_experts)]
        self.crosses: list[torch.Tensor | None] = [None] * num_experts
        self.reference: torch.Tensor | None = None  # fp expert inputs [T, hidden] of the batch now running

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, top_k_index, top_k_weights = _routing_arguments(args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        reference = self.reference.reshape(-1, hidden.shape[-1])
        if reference.shape != hidden.shape:
            raise RuntimeError(f"fp stream has {tuple(reference.shape)} expert inputs, quantized {tuple(hidden.shape)}")
        ids = top_k_index.reshape(hidden.shape[0], -1)
        weights = top_k_weights.reshape(hidden.shape[0], -1)
        valid = ids[(ids >= 0) & (ids < self.num_experts)]
        for expert in valid.unique().tolist():
            token, slot = torch.where(ids == expert)
            x_q, x_fp = hidden[token].float(), reference[token].float()
            if self.unit == "down":
                x_q = expert_activation(x_q, self.experts.gate_up_proj[expert].float(), self.experts.act_fn)
                x_fp = expert_activation(x_fp, self.reference_gate_up[expert].float(), self.experts.act_fn)
            if self.hessian_weights == "routing":  # H = Σ w_t² x̃ x̃ᵀ, C = Σ w_t² (x - x̃) x̃ᵀ
                r = weights[token, slot].float().unsqueeze(-1).to(x_q.device)
                x_q, x_fp = x_q * r, x_fp * r
            self.hessians[expert].add(x_q)
            acc = self.hessians[expert]
            product = ((x_fp - x_q).T @ x_q).to(acc.dtype)
            self.crosses[expert] = product if self.crosses[expert] is None else self.crosses[expert] + product

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, C) [E, K, K] float32 on CPU; zeros for experts no token reached."""
        hessians = torch.stack([a.finalize().float().cpu() for a in self.hessians])
        crosses = torch.zeros_like(hessians)
        for e, (acc, cross) in enumerate(zip(self.hessians, self.crosses)):
            if cross is not None and acc.num_samples:
                crosses[e] = (cross * (2.0 / acc.num_samples)).float().cpu()
        return hessians, crosses


def _record(layer: nn.Module, moe: MoELayer, batches: list[list], hessian_weights: str):
    """The layer's per-expert Hessians on ``batches`` with the experts' current weights."""
    recorder = _ExpertRecorder(moe.prefix, moe.experts, sample_tokens=1, seed=0, hessian_weights=hessian_weights)
    recorder.role = "fit"  # Hessians only, no sensitivity sample
    with pre_hook(moe.experts, recorder):
        for batch in batches:
            layer(batch[0], *batch[1], **batch[2])
    return recorder.finish()


def _record_paired(layer: nn.Module, moe: MoELayer, batches: list[list], fp_inputs: list[torch.Tensor],
                   unit: str, reference_gate_up: torch.Tensor, hessian_weights: str):
    """(H, C) of ``unit`` per expert (_PairedRecorder) on ``batches`` with the experts' current weights."""
    recorder = _PairedRecorder(moe.experts, unit, reference_gate_up, hessian_weights)
    with pre_hook(moe.experts, recorder):
        for batch, reference in zip(batches, fp_inputs):
            recorder.reference = reference
            layer(batch[0], *batch[1], **batch[2])
    return recorder.finish()


def _advance(layer: nn.Module, batches: list[list], capture: nn.Module | None = None) -> list[torch.Tensor] | None:
    """Replace each batch's hidden states by the layer's outputs; with ``capture`` (an experts
    module of the layer), return the hidden states it received, per batch."""
    seen: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        seen.append(_routing_arguments(args, kwargs)[0].detach().clone())

    with pre_hook(capture, keep):
        for batch in batches:
            out = layer(batch[0], *batch[1], **batch[2])
            batch[0] = out[0] if isinstance(out, tuple) else out
    if capture is not None and len(seen) != len(batches):
        raise RuntimeError(f"experts module ran {len(seen)} times for {len(batches)} batches")
    return seen if capture is not None else None
