"""One Triton launch for one GEMM of all experts of a layer, each expert in its own scheme.

Program (m-block, n-block, k-split) computes out[rows of the m-block, n-tile]
for the expert owning the m-block (kernels/align.py). It reads that expert's
row of ``meta`` (kernels/layout.py) and branches to the inner loop of its
scheme; all branches live in one kernel, so they share num_warps:

* int weights (2/3/4/8 bits, any group size that is a multiple of 32,
  asymmetric or symmetric): load each packed int32 word once, unpack with
  shift/mask (in-thread, via tl.join), turn codes into floats by OR-ing them
  into a float's mantissa (no int->float convert), dequantize
  ``(q - zero) * scale`` in the activation dtype, tl.dot in fp16/bf16;
* fp8 weights, fp8 activations (w8a8fp8): fp8 x fp8 tl.dot, per-channel
  weight scale and per-token activation scale applied once after the loop;
* int4 weights, fp8 activations (w4a8fp8): ``q - 8`` is exact in e4m3, so
  fp8 x fp8 tl.dot per K tile, times the tile's group scale.

A K tile never straddles two quantization groups (configs.fit_block_k), so a
tile needs one scale/zero per output column.

Which branches get compiled follows constexpr flags (HAS_*) of the kinds
present in the layer, so a uniform layer pays for one branch only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import FP8_DTYPE
from ..schemes import Scheme
from .align import AlignedRouting
from .configs import GemmConfig
from .layout import BITS, FLAG_FP8_ACT, FLAG_FP8_WEIGHT, FLAG_ZERO, FLAGS, GROUP, S_OFF, W_OFF, Z_OFF, ExpertGemmWeights

# Inner-loop kinds; the kinds present in a layer pick the compiled branches (HAS_* flags).
KIND_W2, KIND_W3, KIND_W4, KIND_W8, KIND_W8A8FP8, KIND_W4A8FP8 = (1 << i for i in range(6))
_INT_KINDS = {2: KIND_W2, 3: KIND_W3, 4: KIND_W4, 8: KIND_W8}

# Layout constants as constexpr globals, the form a jitted function may read.
_M_BITS, _M_GROUP, _M_FLAGS = tl.constexpr(BITS), tl.constexpr(GROUP), tl.constexpr(FLAGS)
_M_W_OFF, _M_S_OFF, _M_Z_OFF = tl.constexpr(W_OFF), tl.constexpr(S_OFF), tl.constexpr(Z_OFF)
_F_ZERO, _F_FP8_WEIGHT, _F_FP8_ACT = tl.constexpr(FLAG_ZERO), tl.constexpr(FLAG_FP8_WEIGHT), tl.constexpr(FLAG_FP8_ACT)


def scheme_kind(scheme: Scheme) -> int:
    if scheme.act == "fp8":
        if scheme.weight_is_fp8:
            return KIND_W8A8FP8
        if scheme.bits == 4 and scheme.symmetric:
            return KIND_W4A8FP8
        raise NotImplementedError(f"scheme {scheme.name}: fp8 activations need fp8 weights or symmetric int4")
    if scheme.bits not in _INT_KINDS:
        raise NotImplementedError(f"scheme {scheme.name}: {scheme.bits}-bit weights")
    return _INT_KINDS[scheme.bits]


def layer_kinds(weights: ExpertGemmWeights) -> int:
    mask = 0
    for scheme in weights.schemes:
        mask |= scheme_kind(scheme)
    return mask


def needs_fp8_activations(weights: ExpertGemmWeights) -> bool:
    return any(s.act == "fp8" for s in weights.schemes)


# ---------------------------------------------------------------------------
# Inner loops, one per kind of scheme


@triton.jit
def _spread(x, FIELD: tl.constexpr, FIELDS: tl.constexpr):
    """x [...] int32 -> [..., 2, ..., 2] (FIELDS elements) with flat element i = x >> (i * FIELD).

    Built by log2(FIELDS) tl.joins: a join adds an in-thread minor dimension, so
    each thread keeps the fields of the words it loaded (no shuffles), and the
    unpacked K run of a thread goes to shared memory as wide stores.
    """
    if FIELDS == 2:
        return tl.join(x, x >> FIELD)
    elif FIELDS == 4:
        y = tl.join(x, x >> (2 * FIELD))
        return tl.join(y, y >> FIELD)
    elif FIELDS == 8:
        y = tl.join(x, x >> (4 * FIELD))
        y = tl.join(y, y >> (2 * FIELD))
        return tl.join(y, y >> FIELD)
    elif FIELDS == 16:
        y = tl.join(x, x >> (8 * FIELD))
        y = tl.join(y, y >> (4 * FIELD))
        y = tl.join(y, y >> (2 * FIELD))
        return tl.join(y, y >> FIELD)
    else:
        tl.static_assert(FIELDS == 32)
        y = tl.join(x, x >> (16 * FIELD))
        y = tl.join(y, y >> (8 * FIELD))
        y = tl.join(y, y >> (4 * FIELD))
        y = tl.join(y, y >> (2 * FIELD))
        return tl.join(y, y >> FIELD)


@triton.jit
def _unpack_codes(
    w_ptr, words_per_row, k0, offs_n, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Codes [BLOCK_N, BLOCK_K] (int32) of K tile k0, K contiguous like the packed rows.

    Each packed word is loaded once; the caller transposes the tile for tl.dot.
    """
    if BITS == 3:
        # 3 words per 32-element chunk: low 2 bits of elements 0-15, of 16-31, then bit 2 of all.
        CHUNKS: tl.constexpr = BLOCK_K // 32
        chunk = tl.arange(0, CHUNKS)
        base = w_ptr + offs_n[:, None] * words_per_row + (k0 // 32 + chunk[None, :]) * 3
        lo_a = tl.load(base, mask=n_mask[:, None], other=0)
        lo_b = tl.load(base + 1, mask=n_mask[:, None], other=0)
        hi = tl.load(base + 2, mask=n_mask[:, None], other=0)
        lo = tl.reshape(_spread(tl.join(lo_a, lo_b), 2, 16) & 3, (BLOCK_N, BLOCK_K))
        hi = tl.reshape(_spread(hi, 1, 32) & 1, (BLOCK_N, BLOCK_K))
        return lo | (hi << 2)
    else:
        # Word j holds elements j*f .. j*f+f-1 (f = 32 / BITS), element i at bit i*BITS.
        PER_WORD: tl.constexpr = 32 // BITS
        word = tl.arange(0, BLOCK_K // PER_WORD)
        words = tl.load(
            w_ptr + offs_n[:, None] * words_per_row + (k0 // PER_WORD + word[None, :]),
            mask=n_mask[:, None],
            other=0,
        )
        codes = _spread(words, BITS, PER_WORD) & ((1 << BITS) - 1)
        return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _codes_minus_zero(codes, zero, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Exact (code - zero) [BLOCK_N, BLOCK_K] for integer zero points, with no int->float convert.

    OR-ing a code into the mantissa of a power of two gives MAGIC + code exactly
    (fp16: 1024 + code for codes < 1024; bf16: 128 + code for codes < 128);
    8-bit codes under bf16 take the fp32 form (2^23 + code) instead.
    """
    if DTYPE == tl.float16 or BITS <= 4:
        MAGIC_BITS: tl.constexpr = 0x6400 if DTYPE == tl.float16 else 0x4300
        MAGIC: tl.constexpr = 1024.0 if DTYPE == tl.float16 else 128.0
        biased = (codes | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
        return biased - (zero + MAGIC).to(DTYPE)[:, None]
    else:
        biased = (codes | 0x4B000000).to(tl.float32, bitcast=True)
        return (biased - (zero + 8388608.0)[:, None]).to(DTYPE)


@triton.jit
def _int_weight_loop(
    acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
    offs_n, n_mask, kt_begin, kt_end,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, WORDS_ALIGNED: tl.constexpr,
):
    """Weight-only int codes: dequantize (q - zero) * scale in the activation dtype, dot, accumulate.

    (Scaling the dot's [BLOCK_M, BLOCK_N] partial by the group scale instead of
    each weight was measured no faster on an H200, even at BLOCK_M = 16.)
    """
    words_per_row = K * BITS // 32
    if WORDS_ALIGNED:
        words_per_row = tl.multiple_of(words_per_row, 4)
    mid: tl.constexpr = 1 << (BITS - 1)  # symmetric codes are offset by 2^(bits-1)
    for kt in range(kt_begin, kt_end):
        k0 = kt * BLOCK_K
        a = tl.load(a_ptrs + k0, mask=row_mask[:, None], other=0.0)
        codes = _unpack_codes(w_ptr, words_per_row, k0, offs_n, n_mask, BITS, BLOCK_K, BLOCK_N)
        g = k0 // group
        scale = tl.load(s_ptr + offs_n * num_groups + g, mask=n_mask, other=0.0)
        zero = tl.load(z_ptr + offs_n * num_groups + g, mask=offs_n < zero_cols, other=mid).to(tl.float32)
        w = _codes_minus_zero(codes, zero, BITS, a.dtype) * scale.to(a.dtype)[:, None]
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def _fp8_weight_loop(acc, a8_ptrs, row_mask, w8_ptr, s_ptr, K, offs_n, n_mask, kt_begin, kt_end, BLOCK_K: tl.constexpr):
    """w8a8fp8: fp8 x fp8 dot; the per-channel weight scale is applied by the caller after the loop."""
    offs_k = tl.arange(0, BLOCK_K)
    for kt in range(kt_begin, kt_end):
        k0 = kt * BLOCK_K
        a = tl.load(a8_ptrs + k0, mask=row_mask[:, None], other=0.0)
        b = tl.load(w8_ptr + offs_n[:, None] * K + (k0 + offs_k)[None, :], mask=n_mask[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return acc * scale[None, :]


@triton.jit
def _int4_fp8_act_loop(
    acc, a8_ptrs, row_mask, w_ptr, s_ptr, group, num_groups, K, offs_n, n_mask, kt_begin, kt_end,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, WORDS_ALIGNED: tl.constexpr,
):
    """w4a8fp8: symmetric int4 codes - 8 are exact in e4m3; group scale applied per K tile."""
    words_per_row = K // 8
    if WORDS_ALIGNED:
        words_per_row = tl.multiple_of(words_per_row, 4)
    for kt in range(kt_begin, kt_end):
        k0 = kt * BLOCK_K
        a = tl.load(a8_ptrs + k0, mask=row_mask[:, None], other=0.0)
        codes = _unpack_codes(w_ptr, words_per_row, k0, offs_n, n_mask, 4, BLOCK_K, BLOCK_N)
        # fp16 bits 0x6400 | code = 1024 + code; minus 1032 is code - 8, exact, then exact in e4m3.
        w = (((codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)) - 1032.0).to(tl.float8e4nv)
        scale = tl.load(s_ptr + offs_n * num_groups + k0 // group, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(w)) * scale[None, :]
    return acc


# ---------------------------------------------------------------------------
# The kernel


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a8_ptr, a_scale_ptr,
    qweight_ptr, qweight8_ptr, scales_ptr, zeros_ptr, meta_ptr,
    out_ptr, routed_weight_ptr,
    sorted_ids_ptr, block_expert_ptr, num_blocks_ptr,
    N, K, num_slots, a_row_div, stride_am, stride_a8m, split_stride,
    HAS_W2: tl.constexpr, HAS_W3: tl.constexpr, HAS_W4: tl.constexpr, HAS_W8: tl.constexpr,
    HAS_W8A8FP8: tl.constexpr, HAS_W4A8FP8: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, WORDS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if pid_m >= tl.load(num_blocks_ptr):
        return  # grid is sized for the worst case; these M-blocks hold no rows

    meta = meta_ptr + tl.load(block_expert_ptr + pid_m).to(tl.int64) * 6
    bits = tl.load(meta + _M_BITS)
    group = tl.load(meta + _M_GROUP).to(tl.int32)
    flags = tl.load(meta + _M_FLAGS)
    w_off = tl.load(meta + _M_W_OFF)
    if WORDS_ALIGNED:
        w_off = tl.multiple_of(w_off, 4)
    s_ptr = scales_ptr + tl.load(meta + _M_S_OFF)
    z_ptr = zeros_ptr + tl.load(meta + _M_Z_OFF)
    # Columns that have a zero point: all N (asymmetric) or none (symmetric: code - 2^(bits-1)).
    zero_cols = tl.where((flags & _F_ZERO) != 0, N, 0)
    fp8_act = (flags & _F_FP8_ACT) != 0
    int_act = (flags & _F_FP8_ACT) == 0
    num_groups = K // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + offs_m)
    row_mask = slots < num_slots
    a_rows = (slots // a_row_div).to(tl.int64)  # GEMM1 gathers token rows: slot // topk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    a8_ptrs = a8_ptr + a_rows[:, None] * stride_a8m + offs_k[None, :]

    k_tiles = K // BLOCK_K
    kt_begin = pid_k * k_tiles // SPLIT_K
    kt_end = (pid_k + 1) * k_tiles // SPLIT_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_ptr = qweight_ptr + w_off
    # Weight-only int schemes, one specialised loop per bit width.
    if HAS_W4:
        if (bits == 4) & int_act:
            acc = _int_weight_loop(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
                                   offs_n, n_mask, kt_begin, kt_end, 4, BLOCK_K, BLOCK_N, WORDS_ALIGNED)
    if HAS_W2:
        if bits == 2:
            acc = _int_weight_loop(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
                                   offs_n, n_mask, kt_begin, kt_end, 2, BLOCK_K, BLOCK_N, WORDS_ALIGNED)
    if HAS_W3:
        if bits == 3:
            acc = _int_weight_loop(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
                                   offs_n, n_mask, kt_begin, kt_end, 3, BLOCK_K, BLOCK_N, WORDS_ALIGNED)
    if HAS_W8:
        if (bits == 8) & int_act:
            acc = _int_weight_loop(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
                                   offs_n, n_mask, kt_begin, kt_end, 8, BLOCK_K, BLOCK_N, WORDS_ALIGNED)
    # fp8-activation schemes: per-token scale applied once at the end.
    if HAS_W8A8FP8:
        if (flags & _F_FP8_WEIGHT) != 0:
            w8_ptr = qweight8_ptr + w_off * 4  # fp8 bytes of the same buffer
            acc = _fp8_weight_loop(acc, a8_ptrs, row_mask, w8_ptr, s_ptr, K, offs_n, n_mask, kt_begin, kt_end, BLOCK_K)
            acc = acc * tl.load(a_scale_ptr + a_rows, mask=row_mask, other=0.0)[:, None]
    if HAS_W4A8FP8:
        if (bits == 4) & fp8_act:
            acc = _int4_fp8_act_loop(acc, a8_ptrs, row_mask, w_ptr, s_ptr, group, num_groups, K,
                                     offs_n, n_mask, kt_begin, kt_end, BLOCK_K, BLOCK_N, WORDS_ALIGNED)
            acc = acc * tl.load(a_scale_ptr + a_rows, mask=row_mask, other=0.0)[:, None]

    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(routed_weight_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pid_k * split_stride + slots[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def grouped_gemm(
    a: torch.Tensor,
    weights: ExpertGemmWeights,
    routing: AlignedRouting,
    config: GemmConfig,
    *,
    a_row_div: int = 1,
    a_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
    routed_weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[s, slot] = A[slot // a_row_div] @ W_e^T for every routed slot, e = its local expert.

    a: [rows, K] fp16/bf16; a_fp8: its per-token fp8 copy and scales (needed when an
    expert's scheme quantizes activations); routed_weights: [num_slots] factors for the
    output rows (second GEMM). Returns [split_k, num_slots, N]: split_k partial sums,
    in float32 when split_k > 1, else in a's dtype. Rows of slots not routed to a
    local expert are left untouched.
    """
    n, k = weights.n, weights.k
    if a.shape[-1] != k:
        raise ValueError(f"grouped_gemm: A has {a.shape[-1]} columns, weights expect K={k}")
    if k % config.block_k or any(s.group(k) % config.block_k for s in weights.schemes):
        raise ValueError(f"grouped_gemm: BLOCK_K={config.block_k} must divide K={k} and every group size")
    if routing.block_m != config.block_m:
        raise ValueError(f"grouped_gemm: routing was aligned to BLOCK_M={routing.block_m}, config says {config.block_m}")
    kinds = layer_kinds(weights)
    if needs_fp8_activations(weights) and a_fp8 is None:
        raise ValueError("grouped_gemm: a scheme quantizes activations to fp8 but no a_fp8 was given")
    a8, a_scale = a_fp8 if a_fp8 is not None else (a, a)
    out_dtype = a.dtype if config.split_k == 1 else torch.float32
    shape = (config.split_k, routing.num_slots, n)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=a.device)
    elif tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"grouped_gemm: out must be a contiguous {shape} tensor")
    grid = (routing.max_blocks, triton.cdiv(n, config.block_n), config.split_k)
    _grouped_gemm_kernel[grid](
        a, a8, a_scale,
        weights.qweight, weights.qweight.view(FP8_DTYPE), weights.scales, weights.zeros, weights.meta,
        out, routed_weights if routed_weights is not None else a_scale,
        routing.sorted_ids, routing.block_expert, routing.num_blocks,
        n, k, routing.num_slots, a_row_div, a.stride(0), a8.stride(0), routing.num_slots * n,
        HAS_W2=bool(kinds & KIND_W2), HAS_W3=bool(kinds & KIND_W3), HAS_W4=bool(kinds & KIND_W4),
        HAS_W8=bool(kinds & KIND_W8), HAS_W8A8FP8=bool(kinds & KIND_W8A8FP8), HAS_W4A8FP8=bool(kinds & KIND_W4A8FP8),
        MUL_ROUTED_WEIGHT=routed_weights is not None,
        # K % 128 == 0 makes every row and every expert block a multiple of 4 words (16-byte loads).
        WORDS_ALIGNED=k % 128 == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
