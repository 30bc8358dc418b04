"""Activation kernels around the grouped GEMMs: per-token fp8 quantization and SiLU-and-mul.

Per-token fp8 (e4m3) matches kernels/reference.py's ``fake_quant_fp8_per_token``:
``scale = max(|row|, 1e-12) / 448``, ``q = fp8(x / scale)`` rounded to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import FP8_DTYPE
from .configs import interpreting, next_pow2


@triton.jit
def round_to_e4m3_grid(x):
    """Round fp32 to the nearest-even e4m3 value (|x| <= 448), so the fp8 cast after it is exact.

    Done by hand because triton 3.9's interpreter rounds fp32 -> fp8 wrongly when
    rounding carries into the exponent (7.8 -> 4.0); on the GPU it costs a few
    integer ops in kernels that are memory bound anyway.
    """
    bits = x.to(tl.int32, bitcast=True)
    # Normal range: keep 3 mantissa bits (drop 20), ties to even.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range (|x| < 2^-6): adding 1.5 * 2^14 rounds to a multiple of 2^-9.
    subnormal = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def to_e4m3(x, HW_CAST: tl.constexpr):
    """fp32 (|x| <= 448) -> e4m3, rounded to nearest even: the hardware cast on the GPU (one cvt
    per pair; the hand rounding cost the fp8 SiLU kernel 14 of its 121 us at 8192 tokens on an
    H200), the hand rounding under the interpreter (HW_CAST = not configs.interpreting())."""
    if HW_CAST:
        return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return round_to_e4m3_grid(x).to(tl.float8e4nv)


@triton.jit
def _quantize_row_fp8(src_ptr, dst_ptr, scale_ptr, row, n_cols, amax, BLOCK: tl.constexpr, HW_CAST: tl.constexpr):
    scale = tl.maximum(amax, 1e-12) / 448.0  # format.FP8_MAX
    tl.store(scale_ptr + row, scale)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(src_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        q = to_e4m3(tl.clamp(x / scale, -448.0, 448.0), HW_CAST)
        tl.store(dst_ptr + cols, q, mask=cols < n_cols)


@triton.jit
def _fp8_per_token_kernel(x_ptr, q_ptr, scale_ptr, n_cols, stride_x, stride_q, BLOCK: tl.constexpr,
                          HW_CAST: tl.constexpr):
    row = tl.program_id(0)
    src = x_ptr + row.to(tl.int64) * stride_x
    amax = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(src + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    _quantize_row_fp8(src, q_ptr + row.to(tl.int64) * stride_q, scale_ptr, row, n_cols, tl.max(amax, axis=0), BLOCK,
                      HW_CAST)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (fp8 e4m3 [R, K], float32 scale [R]) with x ~= q * scale[:, None]."""
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _fp8_per_token_kernel[(rows,)](
            x, q, scale, cols, x.stride(0), q.stride(0), BLOCK=min(4096, next_pow2(cols)),
            HW_CAST=not interpreting(),
        )
    return q, scale


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr, slot_expert_ptr, act_ptr, q_ptr, scale_ptr, inter, split_stride,
    SPLIT_K: tl.constexpr, QUANT_FP8: tl.constexpr, STORE_ACT: tl.constexpr, BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr, HW_CAST: tl.constexpr,
):
    """One row: act = silu(gate) * up, gate/up summed over the split-K partials first.

    With QUANT_FP8 the per-token fp8 copy is made from the rounded act: from registers when the
    row fits one BLOCK (and then, without STORE_ACT, act is never written in its own dtype: no
    block of the next GEMM reads it), else from the stored row.
    """
    row = tl.program_id(0).to(tl.int64)
    if tl.load(slot_expert_ptr + row) < 0:
        return  # slot of another rank's expert: GEMM1 left it unwritten, GEMM2 never reads it
    src = gate_up_ptr + row * 2 * inter
    dst = act_ptr + row * inter
    amax = tl.zeros((BLOCK,), tl.float32)
    act = tl.zeros((BLOCK,), act_ptr.dtype.element_ty)
    for c0 in range(0, inter, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < inter
        gate = tl.zeros((BLOCK,), tl.float32)
        up = tl.zeros((BLOCK,), tl.float32)
        for s in tl.static_range(SPLIT_K):
            gate += tl.load(src + s * split_stride + cols, mask=ok, other=0.0).to(tl.float32)
            up += tl.load(src + s * split_stride + inter + cols, mask=ok, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate)) * up).to(act_ptr.dtype.element_ty)
        if STORE_ACT:
            tl.store(dst + cols, act, mask=ok)
        amax = tl.maximum(amax, tl.abs(act.to(tl.float32)))
    if QUANT_FP8:
        if ONE_BLOCK:
            scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0  # format.FP8_MAX
            tl.store(scale_ptr + row, scale)
            cols = tl.arange(0, BLOCK)
            q = to_e4m3(tl.clamp(act.to(tl.float32) / scale, -448.0, 448.0), HW_CAST)
            tl.store(q_ptr + row * inter + cols, q, mask=cols < inter)
        else:
            tl.debug_barrier()  # the row just stored is read back by other threads
            _quantize_row_fp8(dst, q_ptr + row * inter, scale_ptr, row, inter, tl.max(amax, axis=0), BLOCK, HW_CAST)


def silu_and_mul(
    gate_up: torch.Tensor, slot_expert: torch.Tensor, out_dtype: torch.dtype, quantize_fp8: bool,
    store_act: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """gate_up [S, R, 2I] (S split-K partials, summed here) -> act [R, I] (+ its per-token fp8 copy).

    Rows whose slot_expert [R] is -1 (not a local expert) are skipped. ``store_act=False`` (with
    quantize_fp8, when only the fp8 copy is read) leaves act unwritten where a row fits one block.
    """
    splits, rows, two_inter = gate_up.shape
    inter = two_inter // 2
    act = torch.empty(rows, inter, dtype=out_dtype, device=gate_up.device)
    fp8 = None
    q, scale = act, act  # placeholders: pointers the kernel does not touch
    if quantize_fp8:
        q = torch.empty(rows, inter, dtype=FP8_DTYPE, device=gate_up.device)
        scale = torch.empty(rows, dtype=torch.float32, device=gate_up.device)
        fp8 = (q, scale)
    block = min(2048, next_pow2(inter))
    one_block = block >= inter
    if rows:
        _silu_and_mul_kernel[(rows,)](
            gate_up, slot_expert, act, q, scale, inter, rows * two_inter,
            SPLIT_K=splits, QUANT_FP8=quantize_fp8, STORE_ACT=store_act or not (quantize_fp8 and one_block),
            BLOCK=block, ONE_BLOCK=one_block, HW_CAST=not interpreting(),
        )
    return act, fp8


__all__ = ["quantize_fp8_per_token", "silu_and_mul", "round_to_e4m3_grid", "to_e4m3"]
