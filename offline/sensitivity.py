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
Hessian from the profile (or RTN), through ``quantize_unit``, which the
pipeline also uses to produce the checkpoint's tensors.
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

from .gptq import DEFAULT_PERCDAMP, run_gptq
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
    for e in range(num_experts):
        x, w = profile.samples(e)
        if x.shape[0] == 0:  # never routed: no measurable error
            if progress is not None:
                progress.update()
            continue
        device = gate_up.device
        x, w = x.to(device), w.to(device)
        w_gate_up, w_down = gate_up[e].float(), down[e].float()
        reference = expert_output(x, w_gate_up, w_down, act_fn)
        # the sample stands for all routed tokens of the expert
        scale = float(profile.counts[e]) / x.shape[0]
        hessians = {"gate_up": profile.gate_up_hessian[e], "down": profile.down_hessian[e]}
        fisher = None if token_fisher is None else token_fisher[e].to(device)
        for s, scheme in enumerate(parsed):
            for u, unit in enumerate(UNITS):
                weight = w_gate_up if unit == "gate_up" else w_down
                fake = quantize_unit(
                    weight, hessians[unit].to(device), scheme, method, clip, percdamp, refit_rounds, refine_sweeps
                ).fake_quantized
                y = (
                    expert_output(x, fake, w_down, act_fn)
                    if unit == "gate_up"
                    else expert_output(x, w_gate_up, fake, act_fn)
                )
                loss[e, u, s] = scale * weighted_error(y, reference, w, fisher)
        if progress is not None:
            progress.update()
    return loss
