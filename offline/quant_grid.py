"""Per-group quantization grids (round-to-nearest) matching checkpoint format v1.

A grid is the (scale, zero) pair that ``vllm_mxmoe.format.encode`` takes:

* asymmetric int: ``scale = (max - min) / qmax`` per group, with the range
  widened to contain 0 so that ``zero = round(-min / scale)`` lands in
  ``[0, qmax]`` (the clamp format.encode applies would otherwise cut the range);
* symmetric int: ``scale = absmax / (2^(bits-1) - 1)``; codes are
  ``round(w / scale) + 2^(bits-1)``, so [-absmax, absmax] maps inside [1, qmax]
  without clipping (the code 0 stays unused, as in most symmetric formats);
* fp8 weights: one scale per output channel, ``absmax / 448``.

Scales and zeros come back as float16, the stored dtype, so every user of a
grid rounds with exactly the numbers a checkpoint will hold (scales rounded
up, so the grid still covers the group's range). Scales are
clamped into float16's positive normal range: an all-zero group gets a tiny
positive scale instead of 0 (which would make w/scale NaN).
"""

from __future__ import annotations

import torch

from vllm_mxmoe.format import FP8_DTYPE, FP8_MAX, SCALE_DTYPE, QuantizedWeight, dequantize, encode
from vllm_mxmoe.schemes import Scheme

# Smallest positive normal float16: smaller scales would lose precision or flush to 0.
MIN_SCALE = torch.finfo(torch.float16).tiny
MAX_SCALE = torch.finfo(torch.float16).max

Grid = tuple[torch.Tensor, "torch.Tensor | None"]


def _storable_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 scale -> float16 scale that is finite, strictly positive and never
    smaller than asked (rounding it down would clip the group's extreme values)."""
    scale = scale.clamp(MIN_SCALE, MAX_SCALE)
    stored = scale.to(SCALE_DTYPE)
    rounded_down = (stored.float() < scale) & (stored < MAX_SCALE)
    # The next float16 up: for positive finite floats, the bit pattern + 1.
    next_up = (stored.view(torch.int16) + 1).view(SCALE_DTYPE)
    return torch.where(rounded_down, next_up, stored)


def _div(x: torch.Tensor, constant: float) -> torch.Tensor:
    """x / constant, IEEE-exact on every device. (CPU torch turns division by a
    Python scalar into multiplication by its reciprocal, which differs from CUDA
    by an ulp and then, after fp16 rounding, by a whole scale step.)"""
    return x / torch.full_like(x, constant)


def as_float_weight(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`w` as a detached float32 [N, K]; ValueError if the shape does not fit `scheme` or values are not finite."""
    if w.dim() != 2:
        raise ValueError(f"scheme {scheme.name}: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    scheme.check_shape(*w.shape)
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"scheme {scheme.name}: weight of shape {tuple(w.shape)} contains NaN or inf")
    return w


def fit_grid(w: torch.Tensor, scheme: Scheme) -> Grid:
    """Min/max grid of `w` [N, K] for `scheme`: scale [N, K/g] fp16 and zero [N, K/g] fp16 or None."""
    w = as_float_weight(w, scheme)
    n, k = w.shape
    if scheme.weight_is_fp8:
        return _storable_scale(_div(w.abs().amax(dim=1, keepdim=True), FP8_MAX)), None
    g = scheme.group(k)
    groups = w.reshape(n, k // g, g)
    if scheme.symmetric:
        half_range = (1 << (scheme.bits - 1)) - 1
        return _storable_scale(_div(groups.abs().amax(dim=-1), half_range)), None
    lo = groups.amin(dim=-1).clamp(max=0.0)
    hi = groups.amax(dim=-1).clamp(min=0.0)
    scale = _storable_scale(_div(hi - lo, scheme.qmax))
    # Zero from the stored (fp16) scale, so encode sees the grid we reasoned about.
    zero = torch.round(-lo / scale.float()).clamp(0, scheme.qmax)
    return scale, zero.to(SCALE_DTYPE)


def quantize_dequantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme
) -> torch.Tensor:
    """Round `w` onto a grid and back, elementwise; scale/zero broadcast against `w`.

    Bit-exact with ``dequantize(encode(...))``: the same float32 operations in the
    same order. GPTQ calls this per column with scale/zero of shape [N].
    """
    s = scale.float()
    w = w.float()
    if scheme.weight_is_fp8:
        return (w / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s
    if scheme.symmetric:
        offset = float(1 << (scheme.bits - 1))
        q = (torch.round(w / s) + offset).clamp(0, scheme.qmax)
        return (q - offset) * s
    z = zero.float()
    q = (torch.round(w / s) + z).clamp(0, scheme.qmax)
    return (q - z) * s


def quantize_rtn(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round-to-nearest quantization of `w` [N, K] in format v1."""
    scale, zero = fit_grid(w, scheme)
    return encode(w.detach().float(), scale, zero, scheme)


def fake_quantize(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`w` after RTN quantization and dequantization (float32, same shape/device)."""
    return dequantize(quantize_rtn(w, scheme), w.shape[1])
