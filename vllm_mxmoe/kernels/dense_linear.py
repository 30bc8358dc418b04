"""Quantized dense linear layers (attention projections, shared experts, dense MLPs) on the GPU.

Two paths, by the number of rows (tokens):

* few rows (decode, <= 128): the MoE kernel with one block and the rows in order
  (``grouped_gemm.dense_gemm``), on W x A^T tiles with split-K, so the packed
  weights stream once per 16-64 rows. Any scheme the expert kernels take.
* many rows (prefill): the weight is dequantized once into a bf16/fp16 scratch
  by the same tile-dequantization code the GEMM uses, then cuBLAS. The GEMM
  kernel would dequantize every weight tile once per M-block, which makes it
  compute-bound at a fraction of cuBLAS's rate. Weight-only schemes only; fp8
  activation schemes always take the kernel (no dequantization in their loop).

Without this module the plugin dequantized a linear's whole weight in torch
ops on every forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .act_quant import quantize_fp8_per_token
from .configs import TILE_TABLE, GemmConfig, cdiv, fit_block_k, next_pow2, num_sms, split_for_programs
from .grouped_gemm import (
    _F_ZERO,
    _M_FLAGS,
    _M_GROUP,
    _M_S_OFF,
    _M_W_OFF,
    _M_Z_OFF,
    _codes_minus_zero,
    _dequant_tile_frag,
    _unpack_codes,
    dense_gemm,
    needs_fp8_activations,
)
from .layout import ExpertGemmWeights, is_fragment_ordered

# Kernel tiles by rows (upper bound), all W x A^T with K split to fill the GPU: from
# benchmarks/linear_check.py --sweep on an H200 (2026-11-30, w4g128, the attention and shared-expert
# shapes of Qwen3-30B-A3B and Qwen1.5-MoE): BLOCK_M 16 up to 16 rows, 32 up to 64 (1.1-1.3x over
# the 16-row tile at 64 rows), 64 up to 128.
LINEAR_TILES: list[tuple[int, GemmConfig]] = [
    (16, TILE_TABLE[0][1]),
    (64, GemmConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4, dequant=2, swap_ab=True)),
    (128, GemmConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=3, dequant=2, swap_ab=True)),
]
# From this many rows a weight-only block is dequantized once for cuBLAS instead (linear_check.py, same
# day: at 256 rows the best tile and the dequantized weight both take 1.6-2x cuBLAS bf16's time; at
# 1024 the 16-row tile 3.4-3.8x, the dequantized weight 1.2x).
DEQUANT_MIN_ROWS = LINEAR_TILES[-1][0] + 1


def linear_config(num_rows: int, n: int, k: int, groups: Sequence[int], sms: int) -> GemmConfig:
    """The tile for this many rows of an [n, k] weight (the last one beyond the table), K split so
    that the row blocks x N-blocks x splits fill ``sms`` SMs."""
    cfg = next((c for bound, c in LINEAR_TILES if num_rows <= bound), LINEAR_TILES[-1][1])
    cfg = replace(cfg, block_k=fit_block_k(cfg.block_k, k, groups))
    programs = cdiv(max(num_rows, 1), cfg.block_m) * cdiv(n, cfg.block_n)
    return replace(cfg, split_k=split_for_programs(cfg, programs, k, sms))


def is_weight_only_int(weights: ExpertGemmWeights) -> bool:
    """One block of int codes with float activations: what dequantize_weight takes."""
    scheme = weights.schemes[0]
    return weights.num_experts == 1 and scheme.act == "none" and not scheme.weight_is_fp8


def uses_dequantized_weight(num_rows: int, weights: ExpertGemmWeights) -> bool:
    return num_rows >= DEQUANT_MIN_ROWS and is_weight_only_int(weights)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, N, split_stride,
                       SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[r] = sum over split-K partials of part[s, r] (+ bias), in out's dtype."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * split_stride + row * N + offs_n, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, zeros_ptr, meta_ptr, out_ptr, N, K,
                       BITS: tl.constexpr, FRAGMENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] = (q - zero) * scale of block 0 of a layout, one [BLOCK_N, BLOCK_K] tile per program,
    with the GEMM's own tile dequantization (grouped_gemm), so both paths read the layout alike."""
    group = tl.load(meta_ptr + _M_GROUP).to(tl.int32)
    flags = tl.load(meta_ptr + _M_FLAGS)
    w_ptr = qweight_ptr + tl.load(meta_ptr + _M_W_OFF)
    s_ptr = scales_ptr + tl.load(meta_ptr + _M_S_OFF)
    z_ptr = zeros_ptr + tl.load(meta_ptr + _M_Z_OFF)
    zero_cols = tl.where((flags & _F_ZERO) != 0, N, 0)
    num_groups = K // group
    words_per_row = K * BITS // 32
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k0 = tl.program_id(1) * BLOCK_K
    g = k0 // group  # BLOCK_K divides the group
    mid: tl.constexpr = 1 << (BITS - 1)  # symmetric codes are offset by 2^(bits-1)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    if FRAGMENT:
        n2 = offs_n[:, None]
        zero = tl.load(z_ptr + n2 * num_groups + g, mask=n2 < zero_cols, other=mid).to(tl.float32)
        scale = tl.load(s_ptr + n2 * num_groups + g, mask=n_mask[:, None], other=0.0).to(DTYPE)
        MAGIC: tl.constexpr = 1024.0 if DTYPE == tl.float16 else 128.0
        w = _dequant_tile_frag(w_ptr, words_per_row, k0, offs_n, n_mask, scale, (-(zero + MAGIC)).to(DTYPE),
                               BITS, BLOCK_K, BLOCK_N, DTYPE, False, True)
    else:
        zero = tl.load(z_ptr + offs_n * num_groups + g, mask=offs_n < zero_cols, other=mid).to(tl.float32)
        scale = tl.load(s_ptr + offs_n * num_groups + g, mask=n_mask, other=0.0).to(DTYPE)
        codes = _unpack_codes(w_ptr, words_per_row, k0, offs_n, n_mask, BITS, BLOCK_K, BLOCK_N)
        w = _codes_minus_zero(codes, zero, BITS, DTYPE) * scale[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w, mask=n_mask[:, None])


def dequantize_weight(weights: ExpertGemmWeights, dtype: torch.dtype) -> torch.Tensor:
    """The one weight-only block of ``weights`` as a dense [N, K] tensor in ``dtype`` (fp16/bf16)."""
    if not is_weight_only_int(weights):
        raise ValueError("dequantize_weight: needs one weight-only int block")
    scheme = weights.schemes[0]
    n, k = weights.n, weights.k
    block_n, block_k = 64, fit_block_k(128, k, weights.group_sizes())
    out = torch.empty(n, k, dtype=dtype, device=weights.qweight.device)
    _dequantize_kernel[(cdiv(n, block_n), k // block_k)](
        weights.qweight, weights.scales, weights.zeros, weights.meta, out, n, k,
        BITS=scheme.bits, FRAGMENT=is_fragment_ordered(scheme, k), BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def quantized_linear(
    x: torch.Tensor, weights: ExpertGemmWeights, bias: torch.Tensor | None = None,
    config: GemmConfig | None = None, path: str | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype, W the one block of ``weights``.

    ``path`` forces "kernel" or "dequant" (default: by DEQUANT_MIN_ROWS); ``config``
    overrides the kernel's tile (benchmarks, tests).
    """
    if weights.num_experts != 1:
        raise ValueError(f"quantized_linear: weights must hold one block, got {weights.num_experts}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape[0], weights.n
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"quantized_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    if x2.shape[1] != weights.k:
        raise ValueError(f"quantized_linear: x has {x2.shape[1]} columns, weights expect K={weights.k}")
    if rows == 0:
        return x2.new_empty(*lead, n)
    if path is None:
        path = "dequant" if uses_dequantized_weight(rows, weights) else "kernel"
    if path == "dequant":
        return F.linear(x2, dequantize_weight(weights, x2.dtype), bias).view(*lead, n)
    cfg = config or linear_config(rows, n, weights.k, weights.group_sizes(), num_sms(x2.device))
    x_fp8 = quantize_fp8_per_token(x2) if needs_fp8_activations(weights) else None
    part = dense_gemm(x2, weights, cfg, a_fp8=x_fp8)
    if cfg.split_k == 1 and bias is None:
        return part[0].view(*lead, n)
    out = torch.empty(rows, n, dtype=x2.dtype, device=x2.device)
    block_n = min(1024, next_pow2(n))
    _sum_splits_kernel[(rows, cdiv(n, block_n))](
        part, bias if bias is not None else part, out, n, rows * n,
        SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, BLOCK_N=block_n,
    )
    return out.view(*lead, n)


__all__ = ["DEQUANT_MIN_ROWS", "dequantize_weight", "is_weight_only_int", "linear_config", "quantized_linear",
           "uses_dequantized_weight"]
