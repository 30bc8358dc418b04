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
  2/3/4-bit codes have a second, field-wise path (DEQUANT mode 2, the default for
  decode tiles, configs.default_dequant): inline PTX LOP3 + two FMAs per f16x2/bf16x2
  pair, with a pure-Triton twin (mode 1) that the interpreter runs; 3-bit blocks are
  read in kernel order (layout.to_kernel_order: a 2-bit plane, then a bit-2 plane),
  so they unpack as 2-bit words plus one LOP3 per pair; 2/3/4-bit blocks with
  128-aligned groups are further kept in fragment order (layout.is_fragment_ordered):
  each lane's words hold exactly its K positions of the MMA operand, so their tile
  is dequantized straight into the register operand (W x A^T, HAS_W*_FRAGMENT), and
  their 2/3-bit codes decode in place (_decode_pair; 3 bits in nibbles and spare
  bits, layout._w3_fragment_bits) at about a 4-bit pair's cost;
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

import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..format import FP8_DTYPE
from ..schemes import Scheme
from .align import AlignedRouting
from .configs import GemmConfig, cdiv, interpreting, resolve_dequant
from .layout import (
    BITS,
    FLAG_FP8_ACT,
    FLAG_FP8_WEIGHT,
    FLAG_FRAGMENT,
    FLAG_ZERO,
    FLAGS,
    GROUP,
    S_OFF,
    W_OFF,
    Z_OFF,
    ExpertGemmWeights,
    is_fragment_ordered,
)

# Inner-loop kinds; the kinds present in a layer pick the compiled branches (HAS_* flags).
KIND_W2, KIND_W3, KIND_W4, KIND_W8, KIND_W8A8FP8, KIND_W4A8FP8 = (1 << i for i in range(6))
# 2/3/4-bit blocks in fragment order (layout.is_fragment_ordered): their own inner loop.
KIND_W2_FRAGMENT, KIND_W3_FRAGMENT, KIND_W4_FRAGMENT = (1 << i for i in range(6, 9))
_FRAGMENT_KINDS = {2: KIND_W2_FRAGMENT, 3: KIND_W3_FRAGMENT, 4: KIND_W4_FRAGMENT}
_INT_KINDS = {2: KIND_W2, 3: KIND_W3, 4: KIND_W4, 8: KIND_W8}

# Layout constants as constexpr globals, the form a jitted function may read.
_M_BITS, _M_GROUP, _M_FLAGS = tl.constexpr(BITS), tl.constexpr(GROUP), tl.constexpr(FLAGS)
_M_W_OFF, _M_S_OFF, _M_Z_OFF = tl.constexpr(W_OFF), tl.constexpr(S_OFF), tl.constexpr(Z_OFF)
_F_ZERO, _F_FP8_WEIGHT, _F_FP8_ACT = tl.constexpr(FLAG_ZERO), tl.constexpr(FLAG_FP8_WEIGHT), tl.constexpr(FLAG_FP8_ACT)
_F_FRAGMENT = tl.constexpr(FLAG_FRAGMENT)


def scheme_kind(scheme: Scheme, k: int) -> int:
    if scheme.act == "fp8":
        if scheme.weight_is_fp8:
            return KIND_W8A8FP8
        if scheme.bits == 4 and scheme.symmetric:
            return KIND_W4A8FP8
        raise NotImplementedError(f"scheme {scheme.name}: fp8 activations need fp8 weights or symmetric int4")
    if scheme.bits not in _INT_KINDS:
        raise NotImplementedError(f"scheme {scheme.name}: {scheme.bits}-bit weights")
    if is_fragment_ordered(scheme, k):
        return _FRAGMENT_KINDS[scheme.bits]
    return _INT_KINDS[scheme.bits]


def layer_kinds(weights: ExpertGemmWeights) -> int:
    mask = 0
    for scheme in weights.distinct_schemes:
        mask |= scheme_kind(scheme, weights.k)
    return mask


def needs_fp8_activations(weights: ExpertGemmWeights) -> bool:
    return any(s.act == "fp8" for s in weights.distinct_schemes)


def all_w8a8fp8(weights: ExpertGemmWeights) -> bool:
    """Every block runs on fp8 tensor cores with nothing to dequantize (configs.FP8_PREFILL_CONFIG)."""
    return all(s.act == "fp8" and s.weight_is_fp8 for s in weights.distinct_schemes)


def has_3bit_blocks(weights: ExpertGemmWeights) -> bool:
    """Some block is 3-bit weight-only (configs.LOW_BIT_WIDE_DECODE_MAX_ROWS)."""
    return any(s.bits == 3 and s.act != "fp8" for s in weights.distinct_schemes)


def all_int4_fragment(weights: ExpertGemmWeights) -> bool:
    """Every block is 4-bit weight-only in fragment order (configs.UNROLLED_DECODE)."""
    return all(s.bits == 4 and is_fragment_ordered(s, weights.k) for s in weights.distinct_schemes)


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
def _load_w3_planes(w_ptr, words_per_row, k0, offs_n, n_mask, BLOCK_K: tl.constexpr):
    """A 3-bit K tile's words in kernel order: [BLOCK_N, BLOCK_K/16] of the 2-bit plane, [BLOCK_N, BLOCK_K/32]
    of the bit-2 plane, which starts after the row's K/16 low-bit words."""
    row = w_ptr + offs_n[:, None] * words_per_row
    lo_words = words_per_row // 3 * 2
    lo = tl.load(row + (k0 // 16 + tl.arange(0, BLOCK_K // 16))[None, :], mask=n_mask[:, None], other=0)
    hi = tl.load(row + lo_words + (k0 // 32 + tl.arange(0, BLOCK_K // 32))[None, :], mask=n_mask[:, None], other=0)
    return lo, hi


@triton.jit
def _unpack_codes(
    w_ptr, words_per_row, k0, offs_n, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Codes [BLOCK_N, BLOCK_K] (int32) of K tile k0, K contiguous like the packed rows.

    Each packed word is loaded once; the caller transposes the tile for tl.dot.
    """
    if BITS == 3:
        # Kernel order (layout.to_kernel_order): the row's 2-bit plane, then its bit-2 plane.
        lo, hi = _load_w3_planes(w_ptr, words_per_row, k0, offs_n, n_mask, BLOCK_K)
        lo = tl.reshape(_spread(lo, 2, 16) & 3, (BLOCK_N, BLOCK_K))
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


# ---------------------------------------------------------------------------
# Field-wise dequantization (DEQUANT >= 1): each packed word gives F = 32 / BITS
# output tensors [BLOCK_N, words] ("field j of every word", already (q - zero) *
# scale in the activation dtype), interleaved back into K order by tl.join. Mode
# 2 computes the fields in inline PTX, Marlin-style: two words per asm call,
# PRMT their low (high) halves together, then per field one LOP3 (mask | magic
# exponent) on a pair, one FMA (- (zero + magic)) and one FMA (* scale) on the
# f16x2/bf16x2 pair: ~1.5 instructions per weight instead of ~4. Mode 1 is the
# same computation in plain Triton (the interpreter cannot run inline asm), so
# CPU tests exercise the same field order and joins.


def _magic(dtype_is_fp16: bool) -> int:
    return 0x64006400 if dtype_is_fp16 else 0x43004300


def _asm_pairs(bits: int, fp16: bool) -> str:
    """PTX for 2 words ($F*1.., see constraints) -> F half2/bf162 outputs $0..$F-1 (pack=2)."""
    f = 32 // bits
    typ = "f16x2" if fp16 else "bf16x2"
    one = "0x3C003C00" if fp16 else "0x3F803F80"
    mask = {2: "0x00030003", 4: "0x000f000f"}[bits]
    w0, w1, sc, nz = f"${f}", f"${f + 1}", f"${f + 2}", f"${f + 3}"
    lines = [
        "{", ".reg .b32 lo, hi, t, u, one, mz;",
        f"mov.b32 one, {one};", "mov.b32 mz, 0x80008000;",
        f"prmt.b32 lo, {w0}, {w1}, 0x5410;", f"prmt.b32 hi, {w0}, {w1}, 0x7632;",
    ]
    half = f // 2
    for j in range(f):
        src = "lo" if j < half else "hi"
        sh = (j % half) * bits
        if sh:
            lines.append(f"shr.u32 u, {src}, {sh};")
            src = "u"
        lines.append(f"lop3.b32 t, {src}, {mask}, {hex(_magic(fp16))}, 0xea;")
        lines.append(f"fma.rn.{typ} t, t, one, {nz};")
        lines.append(f"fma.rn.{typ} ${j}, t, {sc}, mz;")
    lines.append("}")
    return "\n".join(lines)


def _shift_to_bit2(src: str, j: int) -> str:
    """PTX: v = src moved so that its bits j and j + 16 sit at bits 2 and 18 (bit 2 of pair j; the
    bits a left shift carries across the halves are masked off by the LOP3 that follows)."""
    if j > 2:
        return f"shr.u32 v, {src}, {j - 2};"
    if j < 2:
        return f"shl.b32 v, {src}, {2 - j};"
    return f"mov.b32 v, {src};"


def _asm_pairs_w3(fp16: bool) -> str:
    """3-bit, kernel order: 2 low-bit words ($16, $17) and the bit-2 bits of each ($18, $19: bit j = weight j
    of that word's 16) -> 16 pair outputs, field j of both words, as the 2-bit path plus one LOP3 for bit 2."""
    typ = "f16x2" if fp16 else "bf16x2"
    one = "0x3C003C00" if fp16 else "0x3F803F80"
    lines = [
        "{", ".reg .b32 lo, lh, h, t, u, v, one, mz;",
        f"mov.b32 one, {one};", "mov.b32 mz, 0x80008000;",
        "prmt.b32 lo, $16, $17, 0x5410;", "prmt.b32 lh, $16, $17, 0x7632;",
        "prmt.b32 h, $18, $19, 0x5410;",  # bit j of each half: bit 2 of that word's field j
    ]
    for j in range(16):
        src = "lo" if j < 8 else "lh"
        sh = (j % 8) * 2
        if sh:
            lines.append(f"shr.u32 u, {src}, {sh};")
            src = "u"
        lines.append(_shift_to_bit2("h", j))
        lines.append(f"lop3.b32 t, {src}, 0x00030003, {hex(_magic(fp16))}, 0xea;")
        lines.append("lop3.b32 t, v, 0x00040004, t, 0xea;")
        lines.append(f"fma.rn.{typ} t, t, one, $21;")
        lines.append(f"fma.rn.{typ} ${j}, t, $20, mz;")
    lines.append("}")
    return "\n".join(lines)


_ASM_W4_F16, _ASM_W4_BF16 = tl.constexpr(_asm_pairs(4, True)), tl.constexpr(_asm_pairs(4, False))
_ASM_W2_F16, _ASM_W2_BF16 = tl.constexpr(_asm_pairs(2, True)), tl.constexpr(_asm_pairs(2, False))
_ASM_W3_F16, _ASM_W3_BF16 = tl.constexpr(_asm_pairs_w3(True)), tl.constexpr(_asm_pairs_w3(False))


def _pow2_pair(exp: int, fp16: bool) -> str:
    """2^exp in both halves of an f16x2/bf16x2 register (exp >= -14)."""
    half = (15 + exp) << 10 if fp16 else (127 + exp) << 7
    return hex(half * 0x10001)


def _decode_pair(out: str, src: str, bits: int, shift: int, fp16: bool) -> list[str]:
    """PTX: the pair of bits-wide fields at bits shift and 16 + shift of src -> out = q - (zero + magic).

    A field inside bits 0-6 lies in the mantissa of a bf16 (and of an f16) magic number: one LOP3
    (mask | magic) makes magic + 2^shift q, and the FMA with 2^-shift and nz{shift} = -(zero + magic
    / 2^shift) gives q - zero exactly, so a word need not be shifted for every field. Registers
    scale{shift} and nz{shift} must hold 2^-shift and that zero term."""
    assert shift + bits <= 7
    mask = ((1 << bits) - 1) << shift
    typ = "f16x2" if fp16 else "bf16x2"
    return [f"lop3.b32 t, {src}, {hex(mask * 0x10001)}, {hex(_magic(fp16))}, 0xea;",
            f"fma.rn.{typ} {out}, t, scale{shift}, nz{shift};"]


def _pair_registers(shifts: tuple[int, ...], nz_inputs: list[str], fp16: bool) -> list[str]:
    regs = ", ".join(f"scale{s}, nz{s}" for s in shifts)
    lines = [f".reg .b32 t, u, a, b, {regs};"]
    for s, nz in zip(shifts, nz_inputs):
        lines += [f"mov.b32 scale{s}, {_pow2_pair(-s, fp16)};", f"mov.b32 nz{s}, {nz};"]
    return lines


def _asm_w4_in_word(fp16: bool) -> str:
    """4-bit: one word ($4, $5 the same word) -> 4 pairs (nibble i, i + 4) minus the zero point, unscaled,
    in $0..$3; $6 = -(zero + magic). A nibble at bit 4 would reach a bf16's exponent, so every nibble
    but the first is shifted down: SHR + LOP3 + FMA each."""
    lines = ["{", *_pair_registers((0,), ["$6"], fp16)]
    for i in range(4):
        src = "$4"
        if i:
            lines.append(f"shr.u32 u, $4, {4 * i};")
            src = "u"
        lines += _decode_pair(f"${i}", src, 4, 0, fp16)
    lines.append("}")
    return "\n".join(lines)


def _asm_w2_in_word(fp16: bool) -> str:
    """2-bit: one word ($8, $9 the same word) -> 8 pairs (field i, i + 8) minus the zero point, unscaled,
    in $0..$7; $10, $11, $12 = -(zero + magic / 2^s) for s = 0, 2, 4. Fields 3j..3j+2 decode from the
    word shifted by 6j (_decode_pair): two shifts per word instead of seven."""
    lines = ["{", *_pair_registers((0, 2, 4), ["$10", "$11", "$12"], fp16)]
    for i in range(8):
        src = "$8"
        if i >= 3:
            if i % 3 == 0:
                lines.append(f"shr.u32 u, $8, {2 * i};")
            src = "u"
        lines += _decode_pair(f"${i}", src, 2, 2 * (i % 3), fp16)
    lines.append("}")
    return "\n".join(lines)


def _asm_w3_in_word(fp16: bool) -> str:
    """3-bit (layout._w3_fragment_bits): low-plane word x ($8, $9) and high-plane word xh ($10, $11,
    already shifted by 8 k6) -> 8 pairs, field i + 4 k5 (i = k3 + 2 k4) in $i + 4 k5, minus the zero
    point, unscaled; $12, $13 = -(zero + magic), -(zero + magic / 16). Codes sit in nibble 0 or 1 of
    x, x >> 8, xh and s, the word of gathered spare bits: one LOP3 + FMA per pair."""
    lines = ["{", *_pair_registers((0, 4), ["$12", "$13"], fp16)]
    lines += _decode_pair("$0", "$8", 3, 0, fp16) + _decode_pair("$1", "$8", 3, 4, fp16)
    lines.append("shr.u32 u, $8, 8;")
    lines += _decode_pair("$4", "u", 3, 0, fp16) + _decode_pair("$5", "u", 3, 4, fp16)
    lines += _decode_pair("$2", "$10", 3, 0, fp16) + _decode_pair("$6", "$10", 3, 4, fp16)
    # s: bit 0 of each nibble from x's nibble spare bits (bit 3), bit 1 from those two nibbles up,
    # bit 2 from xh's; LOP3 0xe4 = (a & c) | (b & ~c) selects by the mask in c.
    lines += ["shr.u32 a, $8, 3;", "shr.u32 b, $8, 10;", "lop3.b32 a, a, b, 0x11111111, 0xe4;",
              "shr.u32 b, $10, 1;", "lop3.b32 u, a, b, 0x33333333, 0xe4;"]
    lines += _decode_pair("$3", "u", 3, 0, fp16) + _decode_pair("$7", "u", 3, 4, fp16)
    lines.append("}")
    return "\n".join(lines)


_ASM_W4P_F16, _ASM_W4P_BF16 = tl.constexpr(_asm_w4_in_word(True)), tl.constexpr(_asm_w4_in_word(False))
_ASM_W2P_F16, _ASM_W2P_BF16 = tl.constexpr(_asm_w2_in_word(True)), tl.constexpr(_asm_w2_in_word(False))
_ASM_W3P_F16, _ASM_W3P_BF16 = tl.constexpr(_asm_w3_in_word(True)), tl.constexpr(_asm_w3_in_word(False))
# Outputs, then the word(s) twice (pack = 2), then the zero terms.
_CONS_4P, _CONS_2P, _CONS_3P = (tl.constexpr(",".join(["=r"] * f + ["r"] * n)) for f, n in ((4, 3), (8, 5), (8, 6)))
_CONS_8, _CONS_16, _CONS_W3 = (tl.constexpr(",".join(["=r"] * f + ["r"] * (2 * n + 2)))
                               for f, n in ((8, 1), (16, 1), (16, 2)))


@triton.jit
def _field(words, j: tl.constexpr, BITS: tl.constexpr, scale, nzero, DTYPE: tl.constexpr):
    """Pure-Triton field j of every word, (q - zero) * scale; nzero = -(zero + magic)."""
    MAGIC_BITS: tl.constexpr = 0x6400 if DTYPE == tl.float16 else 0x4300
    q = ((words >> (j * BITS)) & ((1 << BITS) - 1)) | MAGIC_BITS
    return (q.to(tl.int16).to(DTYPE, bitcast=True) + nzero) * scale


@triton.jit
def _field3(lo, hi, j: tl.constexpr, scale, nzero, DTYPE: tl.constexpr):
    """Pure-Triton twin of _asm_pairs_w3: field j of each low-bit word, bit 2 from bit j of hi."""
    MAGIC_BITS: tl.constexpr = 0x6400 if DTYPE == tl.float16 else 0x4300
    q = ((lo >> (2 * j)) & 3) | (((hi >> j) & 1) << 2) | MAGIC_BITS
    return (q.to(tl.int16).to(DTYPE, bitcast=True) + nzero) * scale


@triton.jit
def _permute_k8(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Columns inside each 8-group reordered: out[:, 8w + 2j + h] = x[:, 8w + j + 4h] (mode 3's K order)."""
    x = tl.reshape(x, (ROWS, COLS // 8, 2, 4))
    return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (ROWS, COLS))


@triton.jit
def _dequant_tile_w4_paired(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """4-bit tile [BLOCK_N, BLOCK_K] in _permute_k8's K order: column 8w + 2j + h = field j + 4h of word w,
    so that each f16x2/bf16x2 register the LOP3 makes (bits 4j and 4j + 16) is one adjacent pair (no PRMT)."""
    word = tl.arange(0, BLOCK_K // 8)
    words = tl.load(w_ptr + offs_n[:, None] * words_per_row + (k0 // 8 + word[None, :]), mask=n_mask[:, None], other=0)
    x = tl.join(words, words)  # [BN, W, 2]: an asm call (pack=2) gets one word twice
    sc = scale[:, :, None]
    nz = nzero[:, :, None]
    if USE_ASM:
        if DTYPE == tl.float16:  # literal dtype tuples: a constexpr tuple does not unpack in every triton
            o = tl.inline_asm_elementwise(_ASM_W4P_F16, _CONS_4P,
                                          [x, sc, nz],
                                              dtype=(
                                                  tl.float16, tl.float16, tl.float16, tl.float16,
                                              ),
                                          is_pure=True, pack=2)
        else:
            o = tl.inline_asm_elementwise(_ASM_W4P_BF16, _CONS_4P,
                                          [x, sc, nz],
                                              dtype=(
                                                  tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                                              ),
                                          is_pure=True, pack=2)
    else:
        h16 = (tl.arange(0, 2) * 16)[None, None, :]
        o = (_field(x >> h16, 0, 4, sc, nz, DTYPE), _field(x >> h16, 1, 4, sc, nz, DTYPE),
             _field(x >> h16, 2, 4, sc, nz, DTYPE), _field(x >> h16, 3, 4, sc, nz, DTYPE))
    t = tl.join(tl.join(o[0], o[2]), tl.join(o[1], o[3]))  # [BN, W, h, j>>1, j&1]
    t = tl.permute(t, (0, 1, 3, 4, 2))  # [BN, W, j>>1, j&1, h]
    return tl.reshape(t, (BLOCK_N, BLOCK_K))


@triton.jit
def _fragment_tile_to_k_order(t, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr):
    """Dequantized fields [BN, words, k0, <field bits>] of a fragment-order tile -> [BN, BLOCK_K] in K order.

    Only register relabelling (reshape + permute): words are [C, k2, k1, k6, k5] (4 bits) or
    [C, k2, k1, k6] (2/3 bits; C and the k5/k6 a sub-chunk tile fixes are absent), the field
    bits [k4, k3] (4 bits, and every 32-K tile) or [k5, k4, k3].
    """
    if BLOCK_K >= 128:
        t = tl.reshape(t, (BLOCK_N, BLOCK_K // 128, 2, 2, 2, 2, 2, 2, 2))
        if BITS == 4:  # [BN, C, k2, k1, k6, k5, k0, k4, k3]
            t = tl.permute(t, (0, 1, 4, 5, 7, 8, 2, 3, 6))
        else:  # [BN, C, k2, k1, k6, k0, k5, k4, k3]
            t = tl.permute(t, (0, 1, 4, 6, 7, 8, 2, 3, 5))
    elif BLOCK_K == 64:
        t = tl.reshape(t, (BLOCK_N, 2, 2, 2, 2, 2, 2))
        if BITS == 4:  # [BN, k2, k1, k5, k0, k4, k3]
            t = tl.permute(t, (0, 3, 5, 6, 1, 2, 4))
        else:  # [BN, k2, k1, k0, k5, k4, k3]
            t = tl.permute(t, (0, 4, 5, 6, 1, 2, 3))
    else:  # [BN, k2, k1, k0, k4, k3]
        t = tl.permute(tl.reshape(t, (BLOCK_N, 2, 2, 2, 2, 2)), (0, 4, 5, 1, 2, 3))
    return tl.reshape(t, (BLOCK_N, BLOCK_K))  # [BN, (C,) k6, k5, k4, k3, k2, k1, k0]


@triton.jit
def _dequant_tile_w4_frag(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero, BLOCK_K: tl.constexpr,
                          BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr, SCALED: tl.constexpr):
    """4-bit tile [BLOCK_N, BLOCK_K] of q - zero (times scale if SCALED; the asm never scales) in K
    order, read from a block in fragment order (layout._fragment_slots).

    Word 4c + j of a 128-chunk holds K positions k1, k2 = c, k5, k6 = j; nibble f holds
    k3 + 2 k4 + 4 k0. One LOP3 per (word, j) gives the pair (k0 = 0, 1) the MMA reads
    from one register, and the joins and permutes below only relabel registers: triton
    loads the words straight into the wgmma/mma operand layout, with no shared-memory
    round trip of the dequantized tile. Tiles of 32 or 64 K read their words of a chunk.
    """
    chunk_word = (k0 // 128) * 16
    if BLOCK_K >= 128:
        word = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # [C, k2, k1, k6, k5]
    elif BLOCK_K == 64:
        i = tl.arange(0, 8)  # [k2, k1, k5]; k6 fixed
        word = chunk_word + (i & 1) + 2 * ((k0 // 64) & 1) + 4 * (i >> 1)
    else:
        tl.static_assert(BLOCK_K == 32)
        i = tl.arange(0, 4)  # [k2, k1]; k5, k6 fixed
        word = chunk_word + ((k0 // 32) & 1) + 2 * ((k0 // 64) & 1) + 4 * i
    words = tl.load(w_ptr + offs_n[:, None] * words_per_row + word[None, :], mask=n_mask[:, None], other=0)
    x = tl.join(words, words)  # an asm call (pack=2) gets one word twice
    sc = scale[:, :, None]
    nz = nzero[:, :, None]
    if USE_ASM:
        tl.static_assert(not SCALED)
        if DTYPE == tl.float16:  # literal dtype tuples: a constexpr tuple does not unpack in every triton
            o = tl.inline_asm_elementwise(_ASM_W4P_F16, _CONS_4P, [x, nz],
                                          dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                          is_pure=True, pack=2)
        else:
            o = tl.inline_asm_elementwise(_ASM_W4P_BF16, _CONS_4P, [x, nz],
                                          dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                          is_pure=True, pack=2)
    else:
        h16 = (tl.arange(0, 2) * 16)[None, None, :]
        x = x >> h16
        o = (_frag_field(x, x, 0, 4, sc, nz, DTYPE, SCALED), _frag_field(x, x, 1, 4, sc, nz, DTYPE, SCALED),
             _frag_field(x, x, 2, 4, sc, nz, DTYPE, SCALED), _frag_field(x, x, 3, 4, sc, nz, DTYPE, SCALED))
    t = tl.join(tl.join(o[0], o[2]), tl.join(o[1], o[3]))  # [BN, words, k0, k4, k3]
    return _fragment_tile_to_k_order(t, BLOCK_N, BLOCK_K, 4)


@triton.jit
def _w3_spare_codes(x, xh):
    """The codes kept in spare bits (layout._w3_fragment_bits), gathered into nibbles 0 and 1 (k5 = 0, 1)
    of one word: _asm_w3_in_word's s, computed once per word for both fields."""
    return ((x >> 3) & 0x11111111) | ((x >> 10) & 0x22222222) | ((xh >> 1) & 0x44444444)


@triton.jit
def _w3_fragment_code(x, xh, xs, i: tl.constexpr, k5):
    """Code of field i + 4 k5 (i = k3 + 2 k4 < 4; k5 may be a runtime value) from low-plane words x,
    high-plane words xh >> 8 k6 and their spare codes xs, as layout._w3_fragment_bits places it."""
    if i < 2:
        return (x >> (4 * (i + 2 * k5))) & 7
    elif i == 2:
        return (xh >> (4 * k5)) & 7
    else:
        return (xs >> (4 * k5)) & 7


@triton.jit
def _frag_field(x, xh, i: tl.constexpr, BITS: tl.constexpr, scale, nzero, DTYPE: tl.constexpr, SCALED: tl.constexpr,
                k5=0, xs=0):
    """Pure-Triton twin of the _asm_w*_in_word decoders: field i of words x minus the zero point (nzero =
    -(zero + magic)), times scale if SCALED; 3 bits: field i + 4 k5 of _w3_fragment_code."""
    MAGIC_BITS: tl.constexpr = 0x6400 if DTYPE == tl.float16 else 0x4300
    if BITS == 4:
        q = (x >> (4 * i)) & 15
    elif BITS == 2:
        q = (x >> (2 * i)) & 3
    else:
        q = _w3_fragment_code(x, xh, xs, i % 4, i // 4 + k5)
    q = q | MAGIC_BITS
    w = q.to(tl.int16).to(DTYPE, bitcast=True) + nzero
    if SCALED:
        w = w * scale
    return w


@triton.jit
def _frag_fields4(x, xh, xs, BITS: tl.constexpr, scale, nzero, DTYPE: tl.constexpr, SCALED: tl.constexpr, k5):
    """Fields 0-3 of _frag_field, joined as (f0, f2), (f1, f3) like the 4-bit asm path's outputs."""
    f0 = _frag_field(x, xh, 0, BITS, scale, nzero, DTYPE, SCALED, k5, xs)
    f1 = _frag_field(x, xh, 1, BITS, scale, nzero, DTYPE, SCALED, k5, xs)
    f2 = _frag_field(x, xh, 2, BITS, scale, nzero, DTYPE, SCALED, k5, xs)
    f3 = _frag_field(x, xh, 3, BITS, scale, nzero, DTYPE, SCALED, k5, xs)
    return tl.join(tl.join(f0, f2), tl.join(f1, f3))


@triton.jit
def _frag_fields8(x, xh, xs, BITS: tl.constexpr, scale, nzero, DTYPE: tl.constexpr, SCALED: tl.constexpr):
    """Fields 0-7 of _frag_field, in _join8's order."""
    return _join8(_frag_field(x, xh, 0, BITS, scale, nzero, DTYPE, SCALED, 0, xs),
                  _frag_field(x, xh, 1, BITS, scale, nzero, DTYPE, SCALED, 0, xs),
                  _frag_field(x, xh, 2, BITS, scale, nzero, DTYPE, SCALED, 0, xs),
                  _frag_field(x, xh, 3, BITS, scale, nzero, DTYPE, SCALED, 0, xs),
                  _frag_field(x, xh, 4, BITS, scale, nzero, DTYPE, SCALED, 0, xs),
                  _frag_field(x, xh, 5, BITS, scale, nzero, DTYPE, SCALED, 0, xs),
                  _frag_field(x, xh, 6, BITS, scale, nzero, DTYPE, SCALED, 0, xs),
                  _frag_field(x, xh, 7, BITS, scale, nzero, DTYPE, SCALED, 0, xs))


@triton.jit
def _dequant_tile_w23_frag(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero, BITS: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr,
                           SCALED: tl.constexpr):
    """2/3-bit tile [BLOCK_N, BLOCK_K] of q - zero (times scale if SCALED; the asm never scales) in K
    order, read from a block in fragment order (layout._fragment_slots, layout._w3_fragment_bits).

    The 2-bit words hold lane c's K positions in word 2c + k6 of a 128-chunk, field k3 + 2 k4 +
    4 k5 + 8 k0. 3-bit blocks keep the same words as their low plane and a high plane of one word
    per lane and chunk, whose bytes 0 and 2 (k6 = 0) or 1 and 3 (k6 = 1) go with low word 2c + k6.
    As in _dequant_tile_w4_frag, the reshapes only relabel registers. Tiles of 32 or 64 K read
    their words of a chunk (32: the fields with that k5, in plain Triton).
    """
    row = w_ptr + offs_n[:, None] * words_per_row
    if BLOCK_K >= 128:
        lw = k0 // 16 + tl.arange(0, BLOCK_K // 16)  # [C, k2, k1, k6]
        hw = k0 // 32 + tl.arange(0, BLOCK_K // 32)  # [C, k2, k1]
    else:
        lane = tl.arange(0, 4)  # [k2, k1]
        lw = (k0 // 128) * 8 + (k0 // 64) % 2 + 2 * lane
        hw = (k0 // 128) * 4 + lane
    lo = tl.load(row + lw[None, :], mask=n_mask[:, None], other=0)
    hi = lo
    k5 = 0
    if BITS == 3:
        hi = tl.load(row + words_per_row // 3 * 2 + hw[None, :], mask=n_mask[:, None], other=0)
        if BLOCK_K >= 128:
            hi = tl.reshape(tl.join(hi, hi >> 8), (BLOCK_N, BLOCK_K // 16))  # per low word: [C, k2, k1, k6]
        else:
            hi = hi >> (8 * ((k0 // 64) % 2))
        if BLOCK_K == 32:
            k5 = (k0 // 32) % 2
    elif BLOCK_K == 32:
        lo = lo >> (8 * ((k0 // 32) % 2))  # fields 4 k5 .. 4 k5 + 3 (and + 8) become 0..3
    x = tl.join(lo, lo)  # an asm call (pack=2) gets one word twice
    xh = tl.join(hi, hi)
    sc = scale[:, :, None]
    nz = nzero[:, :, None]
    if USE_ASM and BLOCK_K >= 64:
        tl.static_assert(not SCALED)
        # -(zero + magic / 16) (and / 4 for 2 bits): exact, nzero being an integer in [-255, -128]
        # (bf16) or [-2047, -1024] (f16).
        MAGIC: tl.constexpr = 1024.0 if DTYPE == tl.float16 else 128.0
        nz16 = (nz.to(tl.float32) + 0.9375 * MAGIC).to(DTYPE)
        if BITS == 2:
            nz4 = (nz.to(tl.float32) + 0.75 * MAGIC).to(DTYPE)
            if DTYPE == tl.float16:  # literal dtype tuples: a constexpr tuple does not unpack in every triton
                o = tl.inline_asm_elementwise(_ASM_W2P_F16, _CONS_2P, [x, nz, nz4, nz16],
                                              dtype=(tl.float16, tl.float16, tl.float16, tl.float16,
                                                     tl.float16, tl.float16, tl.float16, tl.float16),
                                              is_pure=True, pack=2)
            else:
                o = tl.inline_asm_elementwise(_ASM_W2P_BF16, _CONS_2P, [x, nz, nz4, nz16],
                                              dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                                                     tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                              is_pure=True, pack=2)
        else:
            if DTYPE == tl.float16:
                o = tl.inline_asm_elementwise(_ASM_W3P_F16, _CONS_3P, [x, xh, nz, nz16],
                                              dtype=(tl.float16, tl.float16, tl.float16, tl.float16,
                                                     tl.float16, tl.float16, tl.float16, tl.float16),
                                              is_pure=True, pack=2)
            else:
                o = tl.inline_asm_elementwise(_ASM_W3P_BF16, _CONS_3P, [x, xh, nz, nz16],
                                              dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                                                     tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                              is_pure=True, pack=2)
        t = _join8(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7])  # [BN, words, k0, k5, k4, k3]
    else:
        h16 = (tl.arange(0, 2) * 16)[None, None, :]
        x = x >> h16
        xh = xh >> h16
        xs = x  # 3 bits: the spare-bit codes, gathered once for every field
        if BITS == 3:
            xs = _w3_spare_codes(x, xh)
        if BLOCK_K >= 64:
            t = _frag_fields8(x, xh, xs, BITS, sc, nz, DTYPE, SCALED)
        else:
            t = _frag_fields4(x, xh, xs, BITS, sc, nz, DTYPE, SCALED, k5)
    return _fragment_tile_to_k_order(t, BLOCK_N, BLOCK_K, BITS)


@triton.jit
def _dequant_tile_frag(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero, BITS: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr,
                       SCALED: tl.constexpr):
    if BITS == 4:
        return _dequant_tile_w4_frag(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero,
                                     BLOCK_K, BLOCK_N, DTYPE, USE_ASM, SCALED)
    return _dequant_tile_w23_frag(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero,
                                  BITS, BLOCK_K, BLOCK_N, DTYPE, USE_ASM, SCALED)


@triton.jit
def _join8(o0, o1, o2, o3, o4, o5, o6, o7):
    """[..] x 8 -> [.., 8] with [.., f] = o_f (nested joins; the last join is the lowest bit)."""
    return tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))


@triton.jit
def _join16(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15):
    return tl.join(_join8(o0, o2, o4, o6, o8, o10, o12, o14), _join8(o1, o3, o5, o7, o9, o11, o13, o15))


@triton.jit
def _dequant_tile(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero,
                  BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                  USE_ASM: tl.constexpr):
    """Dequantized weights [BLOCK_N, BLOCK_K] in DTYPE, K in memory order; scale/nzero [BLOCK_N, 1] in DTYPE."""
    if BITS == 3:
        lo, hi = _load_w3_planes(w_ptr, words_per_row, k0, offs_n, n_mask, BLOCK_K)
        # Low-bit word w covers weights 16w..16w+15 of the tile: its bit-2 bits are half of hi word w // 2.
        hi = tl.reshape(tl.join(hi, hi >> 16), (BLOCK_N, BLOCK_K // 16))
        if USE_ASM:
            if DTYPE == tl.float16:  # literal dtype tuples: a constexpr tuple does not unpack in every triton
                o = tl.inline_asm_elementwise(
                    _ASM_W3_F16, _CONS_W3,
                    [lo, hi, scale, nzero],
                        dtype=(
                            tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                            tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                        ), is_pure=True, pack=2)
            else:
                o = tl.inline_asm_elementwise(
                    _ASM_W3_BF16, _CONS_W3,
                    [lo, hi, scale, nzero],
                        dtype=(
                            tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                            tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                        ), is_pure=True, pack=2)
        else:
            o = (_field3(lo, hi, 0, scale, nzero, DTYPE), _field3(lo, hi, 1, scale, nzero, DTYPE),
                 _field3(lo, hi, 2, scale, nzero, DTYPE), _field3(lo, hi, 3, scale, nzero, DTYPE),
                 _field3(lo, hi, 4, scale, nzero, DTYPE), _field3(lo, hi, 5, scale, nzero, DTYPE),
                 _field3(lo, hi, 6, scale, nzero, DTYPE), _field3(lo, hi, 7, scale, nzero, DTYPE),
                 _field3(lo, hi, 8, scale, nzero, DTYPE), _field3(lo, hi, 9, scale, nzero, DTYPE),
                 _field3(lo, hi, 10, scale, nzero, DTYPE), _field3(lo, hi, 11, scale, nzero, DTYPE),
                 _field3(lo, hi, 12, scale, nzero, DTYPE), _field3(lo, hi, 13, scale, nzero, DTYPE),
                 _field3(lo, hi, 14, scale, nzero, DTYPE), _field3(lo, hi, 15, scale, nzero, DTYPE))
        t = _join16(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7],
                    o[8], o[9], o[10], o[11], o[12], o[13], o[14], o[15])
        return tl.reshape(t, (BLOCK_N, BLOCK_K))
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        word = tl.arange(0, BLOCK_K // PER_WORD)
        words = tl.load(
            w_ptr + offs_n[:, None] * words_per_row + (k0 // PER_WORD + word[None, :]),
            mask=n_mask[:, None],
            other=0,
        )
        if BITS == 4:
            if USE_ASM:
                if DTYPE == tl.float16:  # literal dtype tuples: a constexpr tuple does not unpack in every triton
                    o = tl.inline_asm_elementwise(
                        _ASM_W4_F16, _CONS_8,
                        [words, scale, nzero],
                            dtype=(
                                tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                                tl.float16, tl.float16,
                            ), is_pure=True, pack=2)
                else:
                    o = tl.inline_asm_elementwise(
                        _ASM_W4_BF16, _CONS_8,
                        [words, scale, nzero],
                            dtype=(
                                tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                                tl.bfloat16, tl.bfloat16,
                            ), is_pure=True, pack=2)
            else:
                o = (_field(words, 0, 4, scale, nzero, DTYPE), _field(words, 1, 4, scale, nzero, DTYPE),
                     _field(words, 2, 4, scale, nzero, DTYPE), _field(words, 3, 4, scale, nzero, DTYPE),
                     _field(words, 4, 4, scale, nzero, DTYPE), _field(words, 5, 4, scale, nzero, DTYPE),
                     _field(words, 6, 4, scale, nzero, DTYPE), _field(words, 7, 4, scale, nzero, DTYPE))
            t = _join8(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7])
        else:
            tl.static_assert(BITS == 2)
            if USE_ASM:
                if DTYPE == tl.float16:  # literal dtype tuples: a constexpr tuple does not unpack in every triton
                    o = tl.inline_asm_elementwise(
                        _ASM_W2_F16, _CONS_16,
                        [words, scale, nzero],
                            dtype=(
                                tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                                tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                                tl.float16, tl.float16, tl.float16, tl.float16,
                            ), is_pure=True, pack=2)
                else:
                    o = tl.inline_asm_elementwise(
                        _ASM_W2_BF16, _CONS_16,
                        [words, scale, nzero],
                            dtype=(
                                tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                                tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                                tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                            ), is_pure=True, pack=2)
            else:
                o = (_field(words, 0, 2, scale, nzero, DTYPE), _field(words, 1, 2, scale, nzero, DTYPE),
                     _field(words, 2, 2, scale, nzero, DTYPE), _field(words, 3, 2, scale, nzero, DTYPE),
                     _field(words, 4, 2, scale, nzero, DTYPE), _field(words, 5, 2, scale, nzero, DTYPE),
                     _field(words, 6, 2, scale, nzero, DTYPE), _field(words, 7, 2, scale, nzero, DTYPE),
                     _field(words, 8, 2, scale, nzero, DTYPE), _field(words, 9, 2, scale, nzero, DTYPE),
                     _field(words, 10, 2, scale, nzero, DTYPE), _field(words, 11, 2, scale, nzero, DTYPE),
                     _field(words, 12, 2, scale, nzero, DTYPE), _field(words, 13, 2, scale, nzero, DTYPE),
                     _field(words, 14, 2, scale, nzero, DTYPE), _field(words, 15, 2, scale, nzero, DTYPE))
            t = _join16(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7],
                        o[8], o[9], o[10], o[11], o[12], o[13], o[14], o[15])
        return tl.reshape(t, (BLOCK_N, BLOCK_K))


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
def _tile_start(kt, a_ptrs, row_mask, z_ptr, zero_cols, num_groups, offs_n, inv_tiles, mid: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """K tile kt's first column, activation rows, group and -(zero + magic) per output row [BLOCK_N, 1]."""
    k0 = kt * BLOCK_K
    a = tl.load(a_ptrs + k0, mask=row_mask[:, None], other=0.0)
    # The group of tile kt is floor((kt + 0.5) / tiles per group) in fp32: 3 instructions instead of an
    # integer division, exact since (kt + 0.5) / tiles stays >= 0.5 / tiles from an integer (K tiles < 2^22).
    g = ((kt + 0.5) * inv_tiles).to(tl.int32)
    n2 = offs_n[:, None]
    zero = tl.load(z_ptr + n2 * num_groups + g, mask=n2 < zero_cols, other=mid).to(tl.float32)
    MAGIC: tl.constexpr = 1024.0 if a.dtype == tl.float16 else 128.0
    return k0, a, g, (-(zero + MAGIC)).to(a.dtype)


@triton.jit
def _post_scaled_step(
    acc_t, acc, kt, a_ptrs, row_mask, w_ptr, words_per_row, s_ptr, z_ptr, zero_cols, num_groups, offs_n, n_mask,
    inv_tiles, mid: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_ASM: tl.constexpr, SWAP_AB: tl.constexpr,
):
    """One K tile of a fragment-order block: the tile holds q - zero, the group scale multiplies its fp32 product."""
    k0, a, g, nzero = _tile_start(kt, a_ptrs, row_mask, z_ptr, zero_cols, num_groups, offs_n, inv_tiles, mid, BLOCK_K)
    w = _dequant_tile_frag(w_ptr, words_per_row, k0, offs_n, n_mask, nzero, nzero, BITS, BLOCK_K,
                           BLOCK_N, a.dtype, USE_ASM, False)  # (the first nzero: an unused scale)
    scale32 = tl.load(s_ptr + offs_n * num_groups + g, mask=n_mask, other=0.0).to(tl.float32)
    if SWAP_AB:
        acc_t += tl.dot(w, tl.trans(a)) * scale32[:, None]
    else:
        acc += tl.dot(a, tl.trans(w)) * scale32[None, :]
    return acc_t, acc


@triton.jit
def _int_weight_loop_fields(
    acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
    offs_n, n_mask, kt_begin, kt_end,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, WORDS_ALIGNED: tl.constexpr,
    USE_ASM: tl.constexpr, PAIRED: tl.constexpr, BLOCK_M: tl.constexpr, SWAP_AB: tl.constexpr = False,
    FRAG: tl.constexpr = False, K_UNROLL: tl.constexpr = 1,
):
    """2/3/4-bit weight-only codes, field-wise dequantization (see _dequant_tile).

    SWAP_AB computes the tile transposed, W [BLOCK_N, BLOCK_K] x A^T: the dequantized
    weights become the MMA's first operand and the few token rows its narrow second one.
    """
    words_per_row = K * BITS // 32
    if WORDS_ALIGNED:
        words_per_row = tl.multiple_of(words_per_row, 4)
    mid: tl.constexpr = 1 << (BITS - 1)
    # Fragment tiles in decode hold q - zero (small integers, exact) and the group's scale multiplies
    # each K tile's fp32 product: BLOCK_M x BLOCK_N FMAs per step instead of BLOCK_N x BLOCK_K / 2
    # bf16x2 multiplies, and no scale rounded to bf16. Large tiles (BLOCK_M > 32) scale the weights;
    # the asm never does (it serves decode tiles, or everything when MXMOE_DEQUANT forces it).
    POST_SCALE: tl.constexpr = FRAG and (USE_ASM or BLOCK_M <= 32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # K tiles per group (BLOCK_K divides the group: configs.fit_block_k).
    inv_tiles = 1.0 / (group // BLOCK_K).to(tl.float32)
    if POST_SCALE:
        # K_UNROLL tiles per loop iteration: the loop's own work (pipeline stage bookkeeping, address
        # updates, barriers: about 130 of the 215 sm_90 instructions of a 4-bit 64 x 128 step) is
        # shared by both. An odd tile count leaves one tile for after the loop.
        if K_UNROLL == 1:
            for kt in range(kt_begin, kt_end):
                acc_t, acc = _post_scaled_step(acc_t, acc, kt, a_ptrs, row_mask, w_ptr, words_per_row, s_ptr, z_ptr,
                                               zero_cols, num_groups, offs_n, n_mask, inv_tiles, mid, BITS, BLOCK_K,
                                               BLOCK_N, USE_ASM, SWAP_AB)
        else:
            tl.static_assert(K_UNROLL == 2)
            for i in range((kt_end - kt_begin) // 2):
                for j in tl.static_range(2):
                    acc_t, acc = _post_scaled_step(acc_t, acc, kt_begin + 2 * i + j, a_ptrs, row_mask, w_ptr,
                                                   words_per_row, s_ptr, z_ptr, zero_cols, num_groups, offs_n, n_mask,
                                                   inv_tiles, mid, BITS, BLOCK_K, BLOCK_N, USE_ASM, SWAP_AB)
            if (kt_end - kt_begin) % 2 == 1:
                acc_t, acc = _post_scaled_step(acc_t, acc, kt_end - 1, a_ptrs, row_mask, w_ptr, words_per_row, s_ptr,
                                               z_ptr, zero_cols, num_groups, offs_n, n_mask, inv_tiles, mid, BITS,
                                               BLOCK_K, BLOCK_N, USE_ASM, SWAP_AB)
    else:
        for kt in range(kt_begin, kt_end):
            k0, a, g, nzero = _tile_start(kt, a_ptrs, row_mask, z_ptr, zero_cols, num_groups, offs_n, inv_tiles, mid,
                                          BLOCK_K)
            scale = tl.load(s_ptr + offs_n[:, None] * num_groups + g, mask=n_mask[:, None], other=0.0).to(a.dtype)
            if FRAG:
                w = _dequant_tile_frag(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero, BITS, BLOCK_K,
                                       BLOCK_N, a.dtype, USE_ASM, True)
            elif PAIRED:
                a = _permute_k8(a, BLOCK_M, BLOCK_K)
                w = _dequant_tile_w4_paired(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero,
                                            BLOCK_K, BLOCK_N, a.dtype, USE_ASM)
            else:
                w = _dequant_tile(w_ptr, words_per_row, k0, offs_n, n_mask, scale, nzero,
                                  BITS, BLOCK_K, BLOCK_N, a.dtype, USE_ASM)
            if SWAP_AB:
                acc_t = tl.dot(w, tl.trans(a), acc_t)
            else:
                acc = tl.dot(a, tl.trans(w), acc)
    if SWAP_AB:
        acc += tl.trans(acc_t)
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
def _store_silu_and_mul(acc, out_ptr, slots, row_mask, pid_n, inter, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """act[slot, c] = silu(gate) * up from a GATED tile [BLOCK_M, gate cols | up cols]; gate and up are
    rounded to act's dtype first, so act equals act_quant.silu_and_mul on the stored gate_up bit for bit."""
    HALF: tl.constexpr = BLOCK_N // 2
    gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
    dtype = out_ptr.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
    cols = pid_n * HALF + tl.arange(0, HALF)
    ptrs = out_ptr + slots[:, None].to(tl.int64) * inter + cols[None, :]
    tl.store(ptrs, act, mask=row_mask[:, None] & (cols < inter)[None, :])


# num_slots is not specialised on (divisibility by 16), so one compile serves every batch size of a
# config (kernels/warmup.py compiles them all at load time). split_stride = num_slots * N keeps its
# specialisation: N is a multiple of 16 in practice, and the output stores need that alignment.
@triton.jit(do_not_specialize=["num_slots"])
def _grouped_gemm_kernel(
    a_ptr, a8_ptr, a_scale_ptr,
    qweight_ptr, qweight8_ptr, scales_ptr, zeros_ptr, meta_ptr,
    out_ptr, routed_weight_ptr,
    sorted_ids_ptr, block_expert_ptr, num_blocks_ptr,
    N, K, num_slots, a_row_div, stride_am, stride_a8m, split_stride,
    HAS_W2: tl.constexpr, HAS_W3: tl.constexpr, HAS_W4: tl.constexpr, HAS_W8: tl.constexpr,
    HAS_W8A8FP8: tl.constexpr, HAS_W4A8FP8: tl.constexpr,
    HAS_W2_FRAGMENT: tl.constexpr, HAS_W3_FRAGMENT: tl.constexpr, HAS_W4_FRAGMENT: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, WORDS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DEQUANT: tl.constexpr = 0, USE_ASM: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
    DENSE: tl.constexpr = False, K_UNROLL: tl.constexpr = 1, GATED: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if DENSE:
        # One expert and rows in order (a dense linear layer): no routing to read.
        meta = meta_ptr
        slots = offs_m
    else:
        # The routing reads are independent: issue them together, so a program waits one memory
        # round trip for them, not two, before it can load its expert's meta and weights.
        num_blocks = tl.load(num_blocks_ptr)
        expert = tl.load(block_expert_ptr + pid_m)
        slots = tl.load(sorted_ids_ptr + offs_m)
        if pid_m >= num_blocks:
            return  # grid is sized for the worst case; these M-blocks hold no rows
        meta = meta_ptr + expert.to(tl.int64) * 6
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

    row_mask = slots < num_slots
    a_rows = (slots // a_row_div).to(tl.int64)  # GEMM1 gathers token rows: slot // topk
    if GATED:
        # A gate_up GEMM whose epilogue applies SiLU(gate) * up: the tile's first half holds gate rows
        # c..c+HALF, its second half the up rows of the same columns (inter + c..), so each program owns
        # whole output columns of act.
        HALF: tl.constexpr = BLOCK_N // 2
        tile_row = tl.arange(0, BLOCK_N)
        act_col = pid_n * HALF + tile_row % HALF
        offs_n = act_col + (tile_row // HALF) * (N // 2)
        n_mask = act_col < N // 2
    else:
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
        if (bits == 4) & int_act & ((flags & _F_FRAGMENT) == 0):
            if DEQUANT == 0:
                acc = _int_weight_loop(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
                                       offs_n, n_mask, kt_begin, kt_end, 4, BLOCK_K, BLOCK_N, WORDS_ALIGNED)
            else:
                acc = _int_weight_loop_fields(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group,
                                              num_groups, K, offs_n, n_mask, kt_begin, kt_end, 4, BLOCK_K,
                                              BLOCK_N, WORDS_ALIGNED, USE_ASM,
                                              DEQUANT == 3, BLOCK_M, SWAP_AB)
    # Fragment order (layout.is_fragment_ordered): field-wise in every mode (mode 0: without asm). Tiles of
    # < 128 K compute W x A^T whatever the config says: triton 3.6 cannot lay out their permuted tile as a
    # shared-memory MMA operand.
    if HAS_W4_FRAGMENT:
        if (bits == 4) & int_act & ((flags & _F_FRAGMENT) != 0):
            acc = _int_weight_loop_fields(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group,
                                          num_groups, K, offs_n, n_mask, kt_begin, kt_end, 4, BLOCK_K,
                                          BLOCK_N, WORDS_ALIGNED, USE_ASM, False, BLOCK_M,
                                          SWAP_AB or BLOCK_K < 128, True, K_UNROLL)
    if HAS_W2_FRAGMENT:
        if (bits == 2) & ((flags & _F_FRAGMENT) != 0):
            acc = _int_weight_loop_fields(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group,
                                          num_groups, K, offs_n, n_mask, kt_begin, kt_end, 2, BLOCK_K,
                                          BLOCK_N, WORDS_ALIGNED, USE_ASM, False, BLOCK_M,
                                          SWAP_AB or BLOCK_K < 128, True, K_UNROLL)
    if HAS_W3_FRAGMENT:
        if (bits == 3) & ((flags & _F_FRAGMENT) != 0):
            acc = _int_weight_loop_fields(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group,
                                          num_groups, K, offs_n, n_mask, kt_begin, kt_end, 3, BLOCK_K,
                                          BLOCK_N, WORDS_ALIGNED, USE_ASM, False, BLOCK_M,
                                          SWAP_AB or BLOCK_K < 128, True, K_UNROLL)
    if HAS_W2:
        if (bits == 2) & ((flags & _F_FRAGMENT) == 0):
            if DEQUANT == 0:
                acc = _int_weight_loop(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
                                       offs_n, n_mask, kt_begin, kt_end, 2, BLOCK_K, BLOCK_N, WORDS_ALIGNED)
            else:
                acc = _int_weight_loop_fields(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group,
                                              num_groups, K, offs_n, n_mask, kt_begin, kt_end, 2, BLOCK_K,
                                              BLOCK_N, WORDS_ALIGNED, USE_ASM and BLOCK_M <= 32,
                                              False, BLOCK_M, SWAP_AB)
    if HAS_W3:
        if (bits == 3) & ((flags & _F_FRAGMENT) == 0):
            if DEQUANT == 0:
                acc = _int_weight_loop(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group, num_groups, K,
                                       offs_n, n_mask, kt_begin, kt_end, 3, BLOCK_K, BLOCK_N, WORDS_ALIGNED)
            else:
                acc = _int_weight_loop_fields(acc, a_ptrs, row_mask, w_ptr, s_ptr, z_ptr, zero_cols, group,
                                              num_groups, K, offs_n, n_mask, kt_begin, kt_end, 3, BLOCK_K,
                                              BLOCK_N, WORDS_ALIGNED, USE_ASM and BLOCK_M <= 32,
                                              False, BLOCK_M, SWAP_AB)
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
    if GATED:
        _store_silu_and_mul(acc, out_ptr, slots, row_mask, pid_n, N // 2, BLOCK_M, BLOCK_N)
        return
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
    gated: bool = False,
) -> torch.Tensor:
    """out[s, slot] = A[slot // a_row_div] @ W_e^T for every routed slot, e = its local expert.

    a: [rows, K] fp16/bf16; a_fp8: its per-token fp8 copy and scales (needed when an
    expert's scheme quantizes activations); routed_weights: [num_slots] factors for the
    output rows (second GEMM). Returns [split_k, num_slots, N]: split_k partial sums,
    in float32 when split_k > 1, else in a's dtype. Rows of slots not routed to a
    local expert are left untouched.

    ``gated`` (a gate_up GEMM: gate rows first, N = 2 * inter; split_k 1): the epilogue applies
    silu(gate) * up and returns act [1, num_slots, inter] in a's dtype, equal bit for bit to
    act_quant.silu_and_mul on the ungated output.
    """
    if routing.block_m != config.block_m:
        raise ValueError(f"grouped_gemm: routing was aligned to BLOCK_M={routing.block_m}, config says {config.block_m}")
    out = _checked_output(a, weights, config, routing.num_slots, a_fp8, out, gated)
    n_programs = cdiv(weights.n // 2, config.block_n // 2) if gated else cdiv(weights.n, config.block_n)
    grid = (routing.max_blocks, n_programs, config.split_k)
    launch = _Launch(grid, a, weights, out, config, a_fp8, routed_weights, routing.sorted_ids, routing.block_expert,
                     routing.num_blocks, routing.num_slots, a_row_div, dense=False, gated=gated)
    _run_with_fallback(launch)
    return out


def dense_gemm(
    a: torch.Tensor,
    weights: ExpertGemmWeights,
    config: GemmConfig,
    *,
    a_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[s] = A @ W^T for a one-expert ``weights`` (a dense linear layer in any scheme): the
    grouped kernel with every row of A in order, no routing. Returns [split_k, rows, N] like
    grouped_gemm (float32 partials when split_k > 1)."""
    if weights.num_experts != 1:
        raise ValueError(f"dense_gemm: weights must hold one block, got {weights.num_experts}")
    rows = a.shape[0]
    out = _checked_output(a, weights, config, rows, a_fp8, out)
    if rows:
        grid = (cdiv(rows, config.block_m), cdiv(weights.n, config.block_n), config.split_k)
        meta = weights.meta  # stands in for the routing pointers the dense kernel never reads
        _run_with_fallback(_Launch(grid, a, weights, out, config, a_fp8, None, meta, meta, meta, rows, 1, dense=True))
    return out


def _checked_output(a, weights, config, num_slots, a_fp8, out, gated=False):
    n, k = weights.n, weights.k
    if a.shape[-1] != k:
        raise ValueError(f"grouped_gemm: A has {a.shape[-1]} columns, weights expect K={k}")
    if k % config.block_k or any(g % config.block_k for g in weights.group_sizes()):
        raise ValueError(f"grouped_gemm: BLOCK_K={config.block_k} must divide K={k} and every group size")
    if needs_fp8_activations(weights) and a_fp8 is None:
        raise ValueError("grouped_gemm: a scheme quantizes activations to fp8 but no a_fp8 was given")
    if gated and (config.split_k != 1 or n % 2 or config.block_n % 2):
        raise ValueError(f"grouped_gemm: gated needs split_k=1 and even N and BLOCK_N (split_k={config.split_k}, "
                         f"N={n}, BLOCK_N={config.block_n})")
    out_dtype = a.dtype if config.split_k == 1 else torch.float32
    shape = (config.split_k, num_slots, n // 2 if gated else n)
    if out is None:
        return torch.empty(shape, dtype=out_dtype, device=a.device)
    if tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"grouped_gemm: out must be a contiguous {shape} tensor")
    return out


@dataclass
class _Launch:
    grid: tuple[int, int, int]
    a: torch.Tensor
    weights: ExpertGemmWeights
    out: torch.Tensor
    config: GemmConfig
    a_fp8: tuple[torch.Tensor, torch.Tensor] | None
    routed_weights: torch.Tensor | None
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_blocks: torch.Tensor
    num_slots: int
    a_row_div: int
    dense: bool
    gated: bool = False


def _run_with_fallback(launch: _Launch) -> None:
    """Launch with the config's dequant mode; a triton that cannot compile the field-wise path for
    this config gets mode 0 (warned once per config)."""
    config = launch.config
    kinds = layer_kinds(launch.weights)
    dequant = resolve_dequant(config.dequant, config.block_m, bool(kinds & KIND_W3_FRAGMENT))
    key = (kinds, config, launch.a.dtype, launch.dense, launch.gated)
    if dequant and key in _ASM_COMPILE_FAILED:
        dequant = 0
    try:
        _launch(launch, kinds, dequant)
    except Exception as e:
        if not dequant or "PassManager" not in str(e) and "CompilationError" not in type(e).__name__:
            raise
        _ASM_COMPILE_FAILED.add(key)
        warnings.warn(f"grouped_gemm: dequant mode {dequant} failed to compile for {config} ({type(e).__name__}); "
                      "using mode 0 for it", stacklevel=3)
        _launch(launch, kinds, 0)


_ASM_COMPILE_FAILED: set = set()


def _launch(launch: _Launch, kinds: int, dequant: int) -> None:
    a, weights, config = launch.a, launch.weights, launch.config
    a8, a_scale = launch.a_fp8 if launch.a_fp8 is not None else (a, a)
    n, k = weights.n, weights.k
    _grouped_gemm_kernel[launch.grid](
        a, a8, a_scale,
        weights.qweight, weights.qweight.view(FP8_DTYPE), weights.scales, weights.zeros, weights.meta,
        launch.out, launch.routed_weights if launch.routed_weights is not None else a_scale,
        launch.sorted_ids, launch.block_expert, launch.num_blocks,
        n, k, launch.num_slots, launch.a_row_div, a.stride(0), a8.stride(0), launch.num_slots * n,
        HAS_W2=bool(kinds & KIND_W2), HAS_W3=bool(kinds & KIND_W3), HAS_W4=bool(kinds & KIND_W4),
        HAS_W8=bool(kinds & KIND_W8), HAS_W8A8FP8=bool(kinds & KIND_W8A8FP8), HAS_W4A8FP8=bool(kinds & KIND_W4A8FP8),
        HAS_W2_FRAGMENT=bool(kinds & KIND_W2_FRAGMENT), HAS_W3_FRAGMENT=bool(kinds & KIND_W3_FRAGMENT),
        HAS_W4_FRAGMENT=bool(kinds & KIND_W4_FRAGMENT), MUL_ROUTED_WEIGHT=launch.routed_weights is not None,
        # K % 128 == 0 makes every row and every expert block a multiple of 4 words (16-byte loads).
        WORDS_ALIGNED=k % 128 == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        DEQUANT=dequant, USE_ASM=dequant >= 2 and not interpreting(), SWAP_AB=config.swap_ab, DENSE=launch.dense,
        K_UNROLL=config.k_unroll, GATED=launch.gated, num_warps=config.num_warps, num_stages=config.num_stages,
    )
