"""GPTQ in model order ("sequential", the GPTQ paper's own loop).

By default every block is quantized with the Hessian the profile measured on
the unquantized model. In model order, the calibration tokens instead run
through the model once more, one decoder layer at a time, and each MoE layer's
Hessians are taken from the outputs of the layers before it *as quantized*, so
GPTQ also compensates the error that reaches the layer. Inside a layer, down's
Hessian is taken after gate_up is quantized (its inputs are the quantized
gate_up's activations). The allocation and the sensitivities still come from
the profile; only the GPTQ fit changes.

Cost: three passes of the calibration tokens through each MoE layer (gate_up
Hessians, down Hessians, outputs for the next layer). Memory: one layer's
activations, as in the profile, plus a copy of one layer's expert weights,
which are put back once the layer's outputs are computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from .profile import MoELayer, _ExpertRecorder, _first_layer_inputs, decoder_layers
from .sensitivity import QuantizedUnit

# quantize(layer, unit, expert, weight, hessian) -> the unit quantized with its allocated scheme
QuantizeFn = Callable[[MoELayer, str, int, torch.Tensor, torch.Tensor], QuantizedUnit]


@torch.no_grad()
def quantize_in_model_order(
    model: nn.Module,
    moe_layers: list[MoELayer],
    sequences: torch.Tensor,
    quantize: QuantizeFn,
    batch_size: int,
    hessian_weights: str = "none",
) -> dict[tuple[str, str, int], QuantizedUnit]:
    """Every expert unit of ``moe_layers`` quantized by ``quantize``, keyed (prefix, unit, expert),
    with Hessians from ``sequences`` [n, seq_len] flowing through the already quantized layers.
    The model's weights are unchanged on return."""
    model.eval()
    device = next(model.parameters()).device
    by_index = {layer.index: layer for layer in moe_layers}
    batches = _first_layer_inputs(model, sequences, batch_size, device)
    units: dict[tuple[str, str, int], QuantizedUnit] = {}
    layers = decoder_layers(model)[: max(by_index) + 1]
    for index, layer in enumerate(tqdm(layers, desc="quantize (gptq, in model order)", unit="layer")):
        moe = by_index.get(index)
        if moe is None:
            _advance(layer, batches)
            continue
        experts = moe.experts
        original = {name: getattr(experts, name).data.clone() for name in ("gate_up_proj", "down_proj")}
        try:
            for unit, name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                profile = _record(layer, moe, batches, hessian_weights)
                hessians = profile.gate_up_hessian if unit == "gate_up" else profile.down_hessian
                weights = getattr(experts, name)
                for e in range(weights.shape[0]):
                    q = quantize(moe, unit, e, weights[e], hessians[e].to(weights.device))
                    units[(moe.prefix, unit, e)] = q
                    weights.data[e] = q.fake_quantized.to(weights.dtype)
            _advance(layer, batches)  # the next layer sees this one quantized
        finally:
            for name, tensor in original.items():
                getattr(experts, name).data.copy_(tensor)
    return units


def _record(layer: nn.Module, moe: MoELayer, batches: list[list], hessian_weights: str):
    """The layer's per-expert Hessians on ``batches`` with the experts' current weights."""
    recorder = _ExpertRecorder(moe.prefix, moe.experts, sample_tokens=1, seed=0, hessian_weights=hessian_weights)
    recorder.role = "fit"  # Hessians only, no sensitivity sample
    handle = moe.experts.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        for batch in batches:
            layer(batch[0], *batch[1], **batch[2])
    finally:
        handle.remove()
    return recorder.finish()


def _advance(layer: nn.Module, batches: list[list]) -> None:
    """Replace each batch's hidden states by the layer's outputs."""
    for batch in batches:
        out = layer(batch[0], *batch[1], **batch[2])
        batch[0] = out[0] if isinstance(out, tuple) else out
