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
    return _grid_of_range(*_group_range(w.reshape(n, k // g, g), scheme), scheme)


def _group_range(groups: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] per group of ``groups`` [N, K/g, g], widened to contain 0 (symmetric: +-absmax)."""
    if scheme.symmetric:
        hi = groups.abs().amax(dim=-1)
        return -hi, hi
    return groups.amin(dim=-1).clamp(max=0.0), groups.amax(dim=-1).clamp(min=0.0)


# Clipping search (``fit_grid_mse``): shrink factors of the group's range tried.
DEFAULT_CLIP_GRID = 20
DEFAULT_MAX_SHRINK = 0.5


def fit_grid_mse(
    w: torch.Tensor,
    scheme: Scheme,
    importance: torch.Tensor | None = None,
    grid: int = DEFAULT_CLIP_GRID,
    max_shrink: float = DEFAULT_MAX_SHRINK,
) -> Grid:
    """Like ``fit_grid``, but each group's range is clipped to minimise its rounding error.

    For shrink factors p = 1, 1 - max_shrink/grid, ..., 1 - max_shrink the group's
    [min, max] range becomes [p*min, p*max]; every group keeps the p whose
    round-to-nearest error sum_k importance[k] * (w - q(w))^2 is smallest (the
    ``mse`` grid search of the reference GPTQ code; ``importance`` [K], e.g. the
    Hessian diagonal, weights the input columns; None: plain MSE). p = 1 is the
    min/max grid, so the error is never larger than ``fit_grid``'s. fp8 weights
    keep their absmax scale.
    """
    w = as_float_weight(w, scheme)
    n, k = w.shape
    if scheme.weight_is_fp8 or grid < 1:
        return fit_grid(w, scheme)
    g = scheme.group(k)
    groups = w.reshape(n, k // g, g)
    imp = torch.ones(k, device=w.device) if importance is None else importance.detach().float().to(w.device)
    if imp.shape != (k,):
        raise ValueError(f"importance must have shape [{k}], got {tuple(imp.shape)}")
    imp = imp.clamp(min=0).reshape(1, k // g, g)
    base_lo, base_hi = _group_range(groups, scheme)
    best_err = torch.full(base_lo.shape, float("inf"), device=w.device)
    best_scale = torch.empty(base_lo.shape, dtype=SCALE_DTYPE, device=w.device)
    best_zero = None if scheme.symmetric else torch.empty_like(best_scale)
    for i in range(grid + 1):
        p = 1.0 - max_shrink * i / grid
        scale, zero = _grid_of_range(base_lo * p, base_hi * p, scheme)
        q = quantize_dequantize(groups, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), scheme)
        err = ((q - groups).pow(2) * imp).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _grid_of_range(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme) -> Grid:
    """(scale, zero) of a range [lo, hi] (lo <= 0 <= hi; symmetric: lo = -hi)."""
    if scheme.symmetric:
        half_range = (1 << (scheme.bits - 1)) - 1
        return _storable_scale(_div(hi, half_range)), None
    scale = _storable_scale(_div(hi - lo, scheme.qmax))
    # Zero from the stored (fp16) scale, so encode sees the grid we reasoned about.
    zero = torch.round(-lo / scale.float()).clamp(0, scheme.qmax)
    return scale, zero.to(SCALE_DTYPE)


CLIP_MODES = ("minmax", "mse")


def fit_grid_clipped(w: torch.Tensor, scheme: Scheme, clip: str, importance: torch.Tensor | None = None) -> Grid:
    """``fit_grid`` (clip "minmax") or ``fit_grid_mse`` weighted by ``importance`` (clip "mse")."""
    if clip == "mse":
        return fit_grid_mse(w, scheme, importance)
    if clip == "minmax":
        return fit_grid(w, scheme)
    raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")


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
