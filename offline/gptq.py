"""GPTQ (Frantar et al., 2022) for one [out, in] weight, emitting checkpoint format v1.

Usage::

    acc = HessianAccumulator(in_features)
    for x in calibration_inputs:          # [..., in_features], the inputs the linear sees
        acc.add(x)
    qweight = gptq_quantize(w, acc.finalize(), scheme)

``run_gptq_batch`` runs the same algorithm on many same-shape weights (an MoE
layer's experts) in one column loop, with the same results as one at a time.

Choices that matter for the rest of the pipeline:

* The grid of each group is a plain min/max grid (``quant_grid``). By default
  it is fitted on the ORIGINAL weight up front ("static groups", AutoGPTQ's
  ``static_groups``), and columns are processed in act-order (decreasing
  Hessian diagonal). The group of a column never depends on the processing
  order, so the checkpoint needs no ``g_idx`` and kernels read groups in
  natural order. ``static_groups=False`` gives the paper's dynamic grids
  (fitted on the updated columns when the pass reaches a group; natural order).
* The result is ``format.encode`` of the values GPTQ chose, so
  ``dequantize(gptq_quantize(...))`` is bit-exact what the algorithm computed
  (``run_gptq(...).fake_quantized``).
* Every scheme runs through the same loop: the per-column rounding is the
  scheme's own (int asymmetric/symmetric, or the fp8 e4m3 cast with its
  per-channel scale), and GPTQ's error feedback only needs *some* rounding.
* Degenerate statistics never produce NaN: a Hessian without samples (an
  expert no calibration token reached) falls back to RTN; inputs that were
  always zero ("dead") are rounded without error feedback; a Hessian that is
  not positive definite even after dampening gets more dampening, then RTN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from vllm_mxmoe.format import QuantizedWeight, encode
from vllm_mxmoe.schemes import Scheme

from .quant_grid import CLIP_MODES, as_float_weight, fit_grid, fit_grid_clipped, quantize_dequantize

DEFAULT_PERCDAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
# refine_codes runs on schemes of at most this many bits: on the reference model's dev split it
# cut the perplexity increase of 2.25-bit models by 12-20% but raised that of 3.25-bit ones by
# 60-90% (every block refined), where its closer fit to the calibration Hessian costs more than
# it gains (RESULTS.md section 3).
REFINE_MAX_BITS = 2
# Dampening tried after percdamp when the Cholesky factorisation fails.
_DAMP_RETRIES = (0.1, 1.0, 10.0)


class HessianAccumulator:
    """Accumulates H = 2 X^T X / n over calibration inputs of one linear.

    The running sum is kept in `dtype` (float64 by default: millions of tokens
    summed in float32 lose digits that the Cholesky factorisation amplifies).
    Memory is allocated on the device of the first batch.
    """

    def __init__(
        self, in_features: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ):
        self.in_features = in_features
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.num_samples = 0
        self._xtx: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add inputs x [..., in_features] (every leading index is one sample)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianAccumulator: expected inputs [..., {self.in_features}], got {tuple(x.shape)}"
            )
        x = x.detach().reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        if self._xtx is None:
            self.device = x.device if self.device is None else self.device
            self._xtx = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)
        # Each batch's product in float32 (fast everywhere, no float64 copy of the
        # activations); only the running sum needs the extra precision.
        x = x.to(device=self.device, dtype=torch.float32)
        self._xtx += (x.T @ x).to(self.dtype)
        self.num_samples += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """H = 2 X^T X / n; all zeros when no sample was added."""
        if self._xtx is None:
            return torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)
        return self._xtx * (2.0 / self.num_samples)


@dataclass
class GPTQResult:
    """What GPTQ computed: the dequantized weight and the grid it used (fp16)."""

    fake_quantized: torch.Tensor  # float32 [N, K], exactly dequantize(to_quantized_weight())
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: Scheme
    used_rtn: bool  # True when the Hessian carried no usable information

    def to_quantized_weight(self) -> QuantizedWeight:
        return encode(self.fake_quantized, self.scale, self.zero, self.scheme)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, **options) -> QuantizedWeight:
    """GPTQ-quantize `w` [N, K] given its Hessian [K, K]; options as in run_gptq."""
    return run_gptq(w, hessian, scheme, **options).to_quantized_weight()


def gptq_fake_quantize(w: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, **options) -> torch.Tensor:
    """The dequantized GPTQ weight (float32), e.g. for sensitivity measurements."""
    return run_gptq(w, hessian, scheme, **options).fake_quantized


def run_gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    act_order: bool = True,
    static_groups: bool = True,
    clip: str = "minmax",
    refit_rounds: int = 0,
    refine_sweeps: int = 0,
) -> GPTQResult:
    """Run GPTQ on `w` [N, K] (any float dtype, any device) with Hessian [K, K].

    act_order: process columns by decreasing Hessian diagonal (free here, thanks
        to static groups, and clearly better at 2-3 bits).
    static_groups: fit every group's grid on the original weight up front.
        False is the original paper's dynamic grids (natural order only); at
        2 bits those can be worse than RTN, as error feedback inflates the
        later groups' ranges.
    clip: "minmax" (each group's grid spans its range) or "mse" (each static
        group's range is clipped to minimise its Hessian-diagonal-weighted
        rounding error, ``quant_grid.fit_grid_mse``).
    refit_rounds: after the pass, this many rounds of ``refit_scales``, each
        but the last followed by another GPTQ pass on the refitted grid.
    refine_sweeps: then this many sweeps of ``refine_codes`` on schemes of at most
        REFINE_MAX_BITS bits (the only ones where it measured better; see there).
    """
    job = _prepare(w, hessian, scheme, percdamp, act_order, static_groups, clip)
    if isinstance(job, GPTQResult):
        return job
    return _run_alone(job, block_size, refit_rounds, refine_sweeps, percdamp)


# Weight elements (experts x N x K) one batched GPTQ pass holds; each of its float32 [B, N, K]
# working tensors (weight, codes, scales, zeros) then takes at most 1 GiB.
DEFAULT_BATCH_ELEMENTS = 1 << 28


def run_gptq_batch(
    weights: list[torch.Tensor],
    hessians: list[torch.Tensor],
    scheme: Scheme,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    act_order: bool = True,
    static_groups: bool = True,
    clip: str = "minmax",
    refit_rounds: int = 0,
    refine_sweeps: int = 0,
    max_batch_elements: int = DEFAULT_BATCH_ELEMENTS,
) -> list[GPTQResult]:
    """``run_gptq`` of many weights of one shape (an MoE layer's experts) with one scheme.

    The column loop, which issues a dozen small operations per column, runs once for a batch
    of experts instead of once per expert: on a GPU the per-expert loop is bound by launches,
    not arithmetic. Each result equals ``run_gptq`` of its weight alone (the per-column steps are
    the same elementwise operations; only the lazy block update is a batched matmul).
    """
    if len(weights) != len(hessians):
        raise ValueError(f"GPTQ: {len(weights)} weights but {len(hessians)} Hessians")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) > 1:
        raise ValueError(f"GPTQ: a batch needs weights of one shape, got {sorted(shapes)}")
    results: list[GPTQResult | None] = [None] * len(weights)
    batchable: list[tuple[int, _GPTQJob]] = []
    for i, (w, h) in enumerate(zip(weights, hessians)):
        job = _prepare(w, h, scheme, percdamp, act_order, static_groups, clip)
        if isinstance(job, GPTQResult):
            results[i] = job
        elif job.dynamic:  # grids refitted inside the loop: one weight at a time
            results[i] = _run_alone(job, block_size, refit_rounds, refine_sweeps, percdamp)
        else:
            batchable.append((i, job))
    if batchable:
        per_batch = max(1, max_batch_elements // batchable[0][1].weight.numel())
        for start in range(0, len(batchable), per_batch):
            chunk = batchable[start : start + per_batch]
            quantized = _gptq_pass_batched([job for _, job in chunk], block_size)
            for (i, job), q in zip(chunk, quantized):
                results[i] = _finish(job, q, block_size, refit_rounds, refine_sweeps, percdamp)
    return results


@dataclass
class _GPTQJob:
    """One weight ready for the GPTQ column loop."""

    weight: torch.Tensor  # float32 [N, K], natural column order
    hessian: torch.Tensor  # as given (refit / refine use it)
    order: torch.Tensor  # processing order of the columns (act-order or natural)
    hinv: torch.Tensor  # upper Cholesky factor of the permuted, dampened H^-1 (float32)
    grid: _Grid
    dynamic: bool


def _prepare(w, hessian, scheme: Scheme, percdamp: float, act_order: bool, static_groups: bool,
             clip: str) -> _GPTQJob | GPTQResult:
    """Everything before the column loop; a GPTQResult (RTN) where the Hessian cannot guide it."""
    if clip not in CLIP_MODES:
        raise ValueError(f"GPTQ: clip must be one of {CLIP_MODES}, got {clip!r}")
    weight = as_float_weight(w, scheme)
    h = _checked_hessian(hessian, weight)
    if not (h.diagonal() > 0).any():
        return _rtn_result(weight, scheme, clip)  # no calibration sample: nothing to compensate with
    if act_order and not static_groups:
        raise ValueError("GPTQ: act_order needs static_groups (format v1 stores no g_idx)")

    _decouple_dead_inputs(h)
    importance = h.diagonal().float()  # before dampening: the columns' share of the output error

    k = weight.shape[1]
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=h.device)
    hinv = _upper_cholesky_of_inverse(h[order][:, order], percdamp)
    if hinv is None:
        warnings.warn("GPTQ: Hessian not positive definite even with heavy dampening; using RTN")
        return _rtn_result(weight, scheme, clip)

    dynamic = not static_groups and scheme.group(k) < k and not scheme.weight_is_fp8
    grid = _Grid.empty(weight, scheme) if dynamic else _Grid.fitted(weight, scheme, clip, importance)
    return _GPTQJob(weight, hessian, order, hinv, grid, dynamic)


def _run_alone(job: _GPTQJob, block_size: int, refit_rounds: int, refine_sweeps: int, percdamp: float) -> GPTQResult:
    """One job's column loop, then ``_finish``."""
    quantized = _gptq_pass(job.weight[:, job.order], job.hinv, job.order.tolist(), job.grid, block_size, job.dynamic)
    return _finish(job, quantized, block_size, refit_rounds, refine_sweeps, percdamp)


def _finish(job: _GPTQJob, quantized: torch.Tensor, block_size: int, refit_rounds: int, refine_sweeps: int,
            percdamp: float) -> GPTQResult:
    """The pass's (permuted) output back in natural order, then the optional refits and code refinement."""
    weight, order, grid, scheme = job.weight, job.order, job.grid, job.grid.scheme
    result = GPTQResult(quantized[:, torch.argsort(order)], grid.scale, grid.zero, scheme, used_rtn=False)
    for round_ in range(refit_rounds):
        result = refit_scales(weight, job.hessian, result)
        if round_ + 1 < refit_rounds:  # GPTQ again, its codes chosen on the refitted grid
            zero = None if result.zero is None else result.zero.clone()
            grid = _Grid(scheme, grid.group, result.scale.clone(), zero)
            quantized = _gptq_pass(weight[:, order], job.hinv, order.tolist(), grid, block_size, False)
            unpermuted = quantized[:, torch.argsort(order)]
            result = GPTQResult(unpermuted, grid.scale, grid.zero, scheme, used_rtn=False)
    if refines_codes_of(scheme):
        result = refine_codes(weight, job.hessian, result, refine_sweeps, percdamp)
    return result


def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, result: GPTQResult) -> GPTQResult:
    """GPTQ's codes with each row's group scales re-solved by least squares under H.

    GPTQ fixes the grid before it rounds; once the codes are known, the scales that
    minimise the row's output error (w - A s)^T H (w - A s), A[k, g] = (code_k - zero_g)
    for k in group g, are one small linear solve per row. Codes and zero points stay
    (the kernels need integer zero points), scales are rounded to fp16 as stored, and
    a row keeps its old scales unless the new ones lower its error. fp8 and RTN results
    are returned unchanged.
    """
    scheme = result.scheme
    if scheme.weight_is_fp8 or result.used_rtn:
        return result
    w = as_float_weight(weight, scheme).float()
    n, k = w.shape
    group = scheme.group(k)
    groups = k // group
    h = _checked_hessian(hessian, w).float()
    scale = result.scale.float()
    zero = result.zero.float() if result.zero is not None else torch.full_like(scale, 1 << (scheme.bits - 1))
    scale_col = scale.repeat_interleave(group, dim=1)
    zero_col = zero.repeat_interleave(group, dim=1)
    rounded = torch.round(result.fake_quantized / scale_col.clamp(min=1e-30) + zero_col)
    codes = torch.where(scale_col > 0, rounded, zero_col)
    d = (codes - zero_col).reshape(n, groups, group)
    h_blocks = h.reshape(groups, group, groups, group).permute(0, 2, 1, 3)  # [G, G, g, g]
    gram = torch.einsum("nai,abij,nbj->nab", d, h_blocks, d)
    rhs = torch.einsum("nai,nai->na", d, (w @ h).reshape(n, groups, group))
    ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
    eye = torch.eye(groups, dtype=gram.dtype, device=gram.device)
    solved = torch.linalg.solve_ex(gram + ridge[:, None, None] * eye, rhs.unsqueeze(-1))[0].squeeze(-1)
    new = solved.to(torch.float16).float()

    def error(sc):  # (w - A s)^T H (w - A s) without the constant w^T H w
        return -2 * (sc * rhs).sum(1) + torch.einsum("na,nab,nb->n", sc, gram, sc)

    better = torch.isfinite(new).all(1) & (new > 0).all(1) & (error(new) < error(scale))
    scale = torch.where(better[:, None], new, scale)
    fake = d.reshape(n, k) * scale.repeat_interleave(group, dim=1)
    return GPTQResult(fake, scale.to(torch.float16), result.zero, scheme, used_rtn=False)


def refine_codes(
    weight: torch.Tensor, hessian: torch.Tensor, result: GPTQResult, sweeps: int, percdamp: float = DEFAULT_PERCDAMP
) -> GPTQResult:
    """GPTQ's codes improved by coordinate descent on its objective, the grid fixed.

    GPTQ rounds each column once, in one pass; afterwards a single code may still be one
    step off its best value given all the others. Each sweep visits every column and, for
    all rows at once, moves the column's code one step down or up where that lowers the
    row's output error (w - q)^T H (w - q), H dampened as GPTQ's (``percdamp``). A step
    changes the error by 2 dq (H e)_j + dq^2 H_jj, e = q - w, and the running H e is
    updated by a rank-one term, so a sweep costs O(N K^2). The error never grows; codes
    stay in range, scales and zero points are unchanged. fp8 and RTN results are returned
    unchanged.
    """
    scheme = result.scheme
    if sweeps <= 0 or scheme.weight_is_fp8 or result.used_rtn:
        return result
    w = as_float_weight(weight, scheme).float()
    k = w.shape[1]
    group = scheme.group(k)
    h = _checked_hessian(hessian, w)
    _decouple_dead_inputs(h)
    h = (h + percdamp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype, device=h.device)).float()
    scale_col = result.scale.float().repeat_interleave(group, dim=1)
    if result.zero is not None:
        zero_col = result.zero.float().repeat_interleave(group, dim=1)
    else:
        zero_col = torch.full_like(scale_col, float(1 << (scheme.bits - 1)))
    codes = torch.where(scale_col > 0, torch.round(result.fake_quantized / scale_col.clamp(min=1e-30) + zero_col), zero_col)
    grad = ((codes - zero_col) * scale_col - w) @ h  # (H e) per row
    for _ in range(sweeps):
        moved = 0
        for j in range(k):
            s, hjj, g = scale_col[:, j], h[j, j], grad[:, j]
            best_gain = torch.zeros_like(s)
            best_step = torch.zeros_like(s)
            for step in (-1.0, 1.0):
                target = codes[:, j] + step
                dq = step * s
                gain = 2 * dq * g + dq * dq * hjj
                take = (target >= 0) & (target <= scheme.qmax) & (s > 0) & (gain < best_gain)
                best_gain = torch.where(take, gain, best_gain)
                best_step = torch.where(take, step, best_step)
            if best_step.any():
                codes[:, j] += best_step
                grad += (best_step * s)[:, None] * h[j][None, :]
                moved += int((best_step != 0).sum())
        if moved == 0:
            break
    fake = (codes - zero_col) * scale_col
    return GPTQResult(fake, result.scale, result.zero, scheme, used_rtn=False)


def refines_codes_of(scheme: Scheme) -> bool:
    """Whether run_gptq's ``refine_sweeps`` apply to blocks of ``scheme``."""
    return not scheme.weight_is_fp8 and scheme.bits <= REFINE_MAX_BITS


def _decouple_dead_inputs(h: torch.Tensor) -> None:
    """Dead inputs (always 0 in calibration): H[i, i] = 1 decouples column i, so it
    is plainly rounded. Unlike reference GPTQ we keep (not zero) its weights: an
    input unseen in a small calibration set can still occur at inference."""
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0


def _checked_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match weight [{n}, {k}]")
    h = hessian.detach().to(device=weight.device, dtype=torch.float64).clone()
    if not torch.isfinite(h).all():
        raise ValueError("GPTQ: Hessian contains NaN or inf (check the calibration activations)")
    return h


@dataclass
class _Grid:
    """Per-group scale/zero [N, G] (fp16) of one weight, and its per-column rounding."""

    scheme: Scheme
    group: int
    scale: torch.Tensor
    zero: torch.Tensor | None

    @classmethod
    def fitted(
        cls,
        weight: torch.Tensor,
        scheme: Scheme,
        clip: str = "minmax",
        importance: torch.Tensor | None = None,
    ) -> _Grid:
        return cls(scheme, scheme.group(weight.shape[1]), *fit_grid_clipped(weight, scheme, clip, importance))

    @classmethod
    def empty(cls, weight: torch.Tensor, scheme: Scheme) -> _Grid:
        n, k = weight.shape
        group = scheme.group(k)
        scale = torch.ones(n, k // group, dtype=torch.float16, device=weight.device)
        return cls(scheme, group, scale, None if scheme.symmetric else torch.zeros_like(scale))

    def refit(self, column: int, group_columns: torch.Tensor) -> None:
        g = column // self.group
        scale, zero = fit_grid(group_columns, self.scheme)
        self.scale[:, g : g + 1] = scale
        if self.zero is not None:
            self.zero[:, g : g + 1] = zero

    def round_column(self, values: torch.Tensor, column: int) -> torch.Tensor:
        g = column // self.group
        return quantize_dequantize(
            values, self.scale[:, g], None if self.zero is None else self.zero[:, g], self.scheme
        )


def _gptq_pass(
    weight: torch.Tensor, hinv: torch.Tensor, columns: list[int], grid: _Grid, block_size: int, dynamic: bool
) -> torch.Tensor:
    """The GPTQ loop over the (permuted) columns with lazy block updates.

    weight [N, K] permuted, hinv the upper Cholesky factor of the permuted H^-1,
    columns[j] the original index of permuted column j (it picks the group).
    Returns the quantized weight, still permuted.
    """
    weight = weight.clone()
    k = weight.shape[1]
    quantized = torch.zeros_like(weight)
    block_size = _aligned_block_size(block_size, grid.group, dynamic)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = columns[start + i]
            if dynamic and column % grid.group == 0:
                # The group's columns as GPTQ has updated them so far. A group
                # lies inside this block or starts it, and then the columns past
                # the block are up to date as well.
                grid.refit(column, torch.cat([block[:, i:], weight[:, end:]], dim=1)[:, : grid.group])
            q = grid.round_column(block[:, i], column)
            quantized[:, start + i] = q
            err = (block[:, i] - q) / hinv_block[i, i]
            block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        # Lazy update: the columns after this block see its errors in one matmul.
        weight[:, end:] -= errors @ hinv[start:end, end:]
    return quantized


def _gptq_pass_batched(jobs: list[_GPTQJob], block_size: int) -> list[torch.Tensor]:
    """``_gptq_pass`` of same-shape static-grid jobs at once; returns each job's permuted output.

    Each job's grid is expanded to one scale (and zero) per permuted column up front, since the
    jobs' column orders differ; the values are the grid's, so the rounding is the same."""
    scheme, group = jobs[0].grid.scheme, jobs[0].grid.group
    order = torch.stack([job.order for job in jobs])  # [B, K]
    rows = jobs[0].weight.shape[0]
    weight = torch.stack([job.weight for job in jobs]).gather(2, order[:, None, :].expand(-1, rows, -1))
    hinv = torch.stack([job.hinv for job in jobs])

    def per_column(grids: list[torch.Tensor]) -> torch.Tensor:
        expanded = torch.stack([g.float() for g in grids]).repeat_interleave(group, dim=2)
        return expanded.gather(2, order[:, None, :].expand_as(weight))

    scale = per_column([job.grid.scale for job in jobs])
    zero = None if jobs[0].grid.zero is None else per_column([job.grid.zero for job in jobs])
    k = weight.shape[2]
    quantized = torch.zeros_like(weight)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = weight[:, :, start:end].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[:, start:end, start:end]
        for i in range(end - start):
            c = start + i
            q = quantize_dequantize(block[:, :, i], scale[:, :, c], None if zero is None else zero[:, :, c], scheme)
            quantized[:, :, c] = q
            err = (block[:, :, i] - q) / hinv_block[:, i, i].unsqueeze(1)
            block[:, :, i:] -= err.unsqueeze(2) * hinv_block[:, i, i:].unsqueeze(1)
            errors[:, :, i] = err
        weight[:, :, end:] -= errors @ hinv[:, start:end, end:]
    return list(quantized.unbind(0))


def _rtn_result(weight: torch.Tensor, scheme: Scheme, clip: str = "minmax") -> GPTQResult:
    scale, zero = fit_grid_clipped(weight, scheme, clip)
    g = scheme.group(weight.shape[1])
    per_column_zero = None if zero is None else zero.repeat_interleave(g, dim=1)
    fake = quantize_dequantize(weight, scale.repeat_interleave(g, dim=1), per_column_zero, scheme)
    return GPTQResult(fake, scale, zero, scheme, used_rtn=True)


def damped_choleskys(h: torch.Tensor, percdamp: float):
    """Lower Cholesky factors of H + damp * mean(diag H) * I, for damp = percdamp and then the
    heavier _DAMP_RETRIES, skipping those that do not factorise; a caller takes the first one
    whose result it can use."""
    mean_diag = h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for damp in (percdamp, *_DAMP_RETRIES):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info.item() == 0:
            yield chol


def _upper_cholesky_of_inverse(h: torch.Tensor, percdamp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + damp I)^-1 as float32, or None if H is hopeless.

    Factorised in float64: the inverse of a badly conditioned Hessian is where
    float32 GPTQ implementations blow up.
    """
    for chol in damped_choleskys(h, percdamp):
        hinv = torch.cholesky_inverse(chol)
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper.float()
    return None


def _aligned_block_size(block_size: int, group: int, dynamic_groups: bool) -> int:
    """Lazy-update block size such that a dynamic group starts at a column whose
    whole group is up to date: groups either tile blocks or span whole blocks."""
    if dynamic_groups and block_size % group and group % block_size:
        return group
    return block_size
