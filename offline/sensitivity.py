"""Sensitivity of every (expert, unit, scheme) of an MoE layer (MxMoE step 2).

Δ[e, u, s] = || MoE-layer output with unit u of expert e quantized in scheme s
             − fp output ||²  summed over the calibration tokens.

Only expert e changes, and the layer adds w_te · y_e(x_t) for each token t
routed to e (w_te its routing weight), so the output error of token t is
w_te · (y_e^q(x_t) − y_e(x_t)) and other tokens contribute nothing. Δ is thus
computed on the expert's own tokens, weighted by w_te². The profile keeps a
uniform sample of an expert's routed tokens (optionally from held-out
calibration sequences that GPTQ did not fit; see profile.py); the sum over the sample is scaled by
(routed tokens / sampled tokens), an unbiased estimate of the sum over all of
them. An expert with no sampled token (never routed) has Δ = 0.

Token weights (optional, ``token_fisher``): each token's squared error is
weighted by the loss's squared gradient at the layer output, Σ_d f_{t,d} δ_{t,d}²
with f = (dNLL/dy_t)² (diagonal empirical Fisher, or its mean over d for an
isotropic weight): Δ then estimates the loss increase itself, comparable across
layers, and tokens the loss does not care about count less.

"Quantized" means exactly what the export will write: GPTQ with the unit's
Hessian from the profile (or RTN), through ``quantize_units``, which the
pipeline also uses to produce the checkpoint's tensors. The experts of a chunk
go through GPTQ as one batch per scheme and unit (``gptq.run_gptq_batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_mxmoe.format import QuantizedWeight, dequantize, encode
from vllm_mxmoe.schemes import Scheme, parse_scheme

from .gptq import DEFAULT_BATCH_ELEMENTS, DEFAULT_PERCDAMP, run_gptq, run_gptq_batch
from .ilp import UNITS
from .profile import LayerProfile, expert_activation
from .quant_grid import fit_grid_clipped

METHODS = ("gptq", "rtn")


@dataclass
class QuantizedUnit:
    """One unit (gate_up [2I, H] or down [H, I]) after quantization: the dequantized
    weight and its grid, from which row slices are encoded for the checkpoint."""

    fake_quantized: torch.Tensor  # float32, exactly what the stored tensors dequantize to
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: Scheme

    def encode_rows(self, rows: slice) -> QuantizedWeight:
        """Stored tensors of rows `rows` (e.g. gate = the first half of gate_up)."""
        zero = None if self.zero is None else self.zero[rows]
        return encode(self.fake_quantized[rows], self.scale[rows], zero, self.scheme)


def quantize_unit(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    method: str,
    clip: str = "minmax",
    percdamp: float = DEFAULT_PERCDAMP,
    refit_rounds: int = 0,
    refine_sweeps: int = 0,
) -> QuantizedUnit:
    """GPTQ (with ``hessian``; RTN when it holds no sample) or RTN of one unit's weight [N, K].

    Gate and up are quantized together as one gate_up matrix: they share a
    scheme and an input Hessian, and GPTQ treats rows independently.
    ``clip``: "minmax" grids, or "mse" clipping search (for RTN weighted by the
    Hessian diagonal when the Hessian has samples).
    """
    if method == "gptq":
        result = run_gptq(w, hessian, scheme, clip=clip, percdamp=percdamp, refit_rounds=refit_rounds,
                          refine_sweeps=refine_sweeps)
        return QuantizedUnit(result.fake_quantized, result.scale, result.zero, scheme)
    if method == "rtn":
        diag = hessian.diagonal().float()
        scale, zero = fit_grid_clipped(w, scheme, clip, diag if bool((diag > 0).any()) else None)
        fake = dequantize(encode(w.detach().float(), scale, zero, scheme), w.shape[1])
        return QuantizedUnit(fake, scale, zero, scheme)
    raise ValueError(f"unknown quantization method {method!r} (choose from {', '.join(METHODS)})")


def quantize_units(
    weights: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    scheme: Scheme,
    method: str,
    clip: str = "minmax",
    percdamp: float = DEFAULT_PERCDAMP,
    refit_rounds: int = 0,
    refine_sweeps: int = 0,
) -> list[QuantizedUnit]:
    """``quantize_unit`` of many same-shape weights with one scheme (an MoE layer's experts); GPTQ
    runs them as one batch (``gptq.run_gptq_batch``), with the same results as one at a time."""
    if method == "gptq":
        results = run_gptq_batch(list(weights), list(hessians), scheme, clip=clip, percdamp=percdamp,
                                 refit_rounds=refit_rounds, refine_sweeps=refine_sweeps)
        return [QuantizedUnit(r.fake_quantized, r.scale, r.zero, scheme) for r in results]
    return [quantize_unit(w, h, scheme, method, clip, percdamp, refit_rounds, refine_sweeps)
            for w, h in zip(weights, hessians)]


def expert_output(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """y = down · (act(gate · x) * (up · x)) for x [T, H], gate_up [2I, H], down [H, I]."""
    return F.linear(expert_activation(x, gate_up, act_fn), down)


def weighted_error(
    y_quant: torch.Tensor, y_ref: torch.Tensor, weights: torch.Tensor, fisher: torch.Tensor | None = None
) -> float:
    """Σ_t w_t² Σ_d f_{t,d} (y_quant − y_ref)_{t,d}², accumulated in float64; f [T, D] or
    [T, 1] per-token Fisher weights (None: all 1, the plain squared error)."""
    sq = (y_quant - y_ref).detach().double().pow(2)
    if fisher is not None:
        sq = sq * fisher.double()
    return float(((weights.double() ** 2) * sq.sum(dim=-1)).sum())


@torch.no_grad()
def layer_sensitivity(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    profile: LayerProfile,
    schemes: Sequence[str],
    method: str,
    progress: tqdm | None = None,
    clip: str = "minmax",
    percdamp: float = DEFAULT_PERCDAMP,
    refit_rounds: int = 0,
    refine_sweeps: int = 0,
    token_fisher: Sequence[torch.Tensor] | None = None,
) -> np.ndarray:
    """Δ as an array [experts, 2 units (gate_up, down), schemes] (float64, >= 0).

    gate_up [E, 2I, H] and down [E, H, I] are the layer's float weights (the
    same, rotated or not, that the profile was taken on). ``token_fisher[e]``:
    Fisher weights [m, H] or [m, 1] of expert e's m sampled tokens (see above).
    """
    parsed = [parse_scheme(s) for s in schemes]
    num_experts = gate_up.shape[0]
    loss = np.zeros((num_experts, len(UNITS), len(parsed)))
    device = gate_up.device
    routed = [e for e in range(num_experts) if profile.samples(e)[0].shape[0] > 0]  # never routed: Δ = 0
    if progress is not None:
        progress.update(num_experts - len(routed))
    # Experts in chunks: each chunk's GPTQ runs batched, scheme by scheme and unit by unit.
    per_chunk = max(1, DEFAULT_BATCH_ELEMENTS // gate_up[0].numel())
    for first in range(0, len(routed), per_chunk):
        chunk = routed[first : first + per_chunk]
        inputs, references, scales, fishers = {}, {}, {}, {}
        for e in chunk:
            x, w = profile.samples(e)
            inputs[e] = (x.to(device), w.to(device))
            references[e] = expert_output(inputs[e][0], gate_up[e].float(), down[e].float(), act_fn)
            scales[e] = float(profile.counts[e]) / x.shape[0]  # the sample stands for all routed tokens
            fishers[e] = None if token_fisher is None else token_fisher[e].to(device)
        for s, scheme in enumerate(parsed):
            for u, unit in enumerate(UNITS):
                source = gate_up if unit == "gate_up" else down
                hessian = profile.gate_up_hessian if unit == "gate_up" else profile.down_hessian
                fakes = quantize_units(
                    [source[e].float() for e in chunk], [hessian[e].to(device) for e in chunk], scheme, method,
                    clip, percdamp, refit_rounds, refine_sweeps,
                )
                for e, q in zip(chunk, fakes):
                    x, w = inputs[e]
                    y = (
                        expert_output(x, q.fake_quantized, down[e].float(), act_fn)
                        if unit == "gate_up"
                        else expert_output(x, gate_up[e].float(), q.fake_quantized, act_fn)
                    )
                    loss[e, u, s] = scales[e] * weighted_error(y, references[e], w, fishers[e])
        if progress is not None:
            progress.update(len(chunk))
    return loss
