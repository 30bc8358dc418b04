"""In-memory layout of one mixed-precision expert GEMM (all experts of a layer).

Each expert's block is kept in its own scheme, back to back in flat buffers,
so a 2-bit expert costs 2-bit memory and one kernel launch can serve every
expert by looking up its row of ``meta``:

* ``qweight``  int32 words; expert e's [N, K*bits/32] block (fp8 weights: the
  [N, K] bytes viewed as [N, K/4] words) starts at word ``meta[e, W_OFF]``.
* ``scales``   float16; expert e's [N, K/group] starts at ``meta[e, S_OFF]``.
* ``zeros``    float16; expert e's [N, K/group] starts at ``meta[e, Z_OFF]``
  (asymmetric schemes only; symmetric ones use code - 2**(bits-1)).

``meta`` is int64 [E, 6]: bits, group size, flags, and the three offsets.
The packing inside a block is format v1's (vllm_mxmoe.format), except 3-bit
blocks and 2/3/4-bit weight-only blocks with 128-aligned groups, which are kept
in kernel order (``to_kernel_order``): the loaders convert on the way in and
``block`` converts back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..format import FP8_DTYPE, FP8_MAX, QuantizedWeight, dequantize, unpack
from ..schemes import Scheme

BITS, GROUP, FLAGS, W_OFF, S_OFF, Z_OFF = range(6)
FLAG_ZERO = 1  # asymmetric: a zero point per group
FLAG_FP8_WEIGHT = 2  # weights are fp8 e4m3, one scale per output channel
FLAG_FP8_ACT = 4  # activations are quantized to fp8 per token before the GEMM
FLAG_FRAGMENT = 8  # 2/3/4-bit codes in fragment order (is_fragment_ordered)


def scheme_flags(scheme: Scheme, k: int) -> int:
    return (
        (FLAG_ZERO if scheme.has_zero_point else 0)
        | (FLAG_FP8_WEIGHT if scheme.weight_is_fp8 else 0)
        | (FLAG_FP8_ACT if scheme.act == "fp8" else 0)
        | (FLAG_FRAGMENT if is_fragment_ordered(scheme, k) else 0)
    )


def block_sizes(scheme: Scheme, n: int, k: int) -> tuple[int, int, int]:
    """(int32 words, scale elements, zero elements) of one [n, k] block."""
    words = n * k // 4 if scheme.weight_is_fp8 else n * k * scheme.bits // 32
    scales = n * scheme.num_groups(k)
    return words, scales, scales if scheme.has_zero_point else 0


FRAGMENT_CHUNK = 128  # K elements per chunk of a block in fragment order


def is_fragment_ordered(scheme: Scheme, k: int) -> bool:
    """2/3/4-bit weight-only blocks whose K and groups are whole 128-element chunks are kept in fragment order."""
    return (
        scheme.bits in (2, 3, 4)
        and scheme.act == "none"
        and k % FRAGMENT_CHUNK == 0
        and scheme.group(k) % FRAGMENT_CHUNK == 0
    )


def _fragment_slots(bits: int) -> torch.Tensor:
    """slot[k] = fields_per_word * word + field where weight k of a 128-chunk is kept in fragment order.

    The MMA's register fragment gives each thread, per row, the K positions whose bits
    1-2 are its lane c's and whose bits 0, 3-6 vary (kernels/grouped_gemm.py,
    _dequant_tile_*_frag). Each of lane c's words holds only such positions, and the
    field pair that one LOP3 turns into an f16x2/bf16x2 register ((f, f + 4) of a 4-bit
    word, (f, f + 8) of a 2-bit word: bits b and 16 + b) is the MMA's pair k0 = 0, 1:
    4 bits: word 4c + j, j = (k5, k6), nibble k3 + 2 k4 + 4 k0 (a lane's 16 bytes are
        contiguous);
    2 bits: word 2c + k6, field k3 + 2 k4 + 4 k5 + 8 k0 (8 contiguous bytes);
    3-bit blocks have their own slots (_w3_fragment_bits).
    The dequantized tile then needs no shared-memory round trip.
    """
    k = torch.arange(FRAGMENT_CHUNK)
    b = [(k >> i) & 1 for i in range(7)]
    c = b[1] + 2 * b[2]
    if bits == 4:
        return 8 * (b[5] + 2 * b[6] + 4 * c) + b[3] + 2 * b[4] + 4 * b[0]
    assert bits == 2
    return 16 * (b[6] + 2 * c) + b[3] + 2 * b[4] + 4 * b[5] + 8 * b[0]


_FRAGMENT_SLOTS = {bits: _fragment_slots(bits) for bits in (2, 4)}


def _w3_fragment_bits() -> torch.Tensor:
    """pos[k, j] = 32 * word + bit where bit j of weight k of a 128-chunk is kept (3-bit fragment order).

    A chunk is 12 words: lane c's low-plane words 2c + k6 (0-7, where a 2-bit block would keep
    them) and its high-plane word c (8-11). Every word is 8 nibbles, a 3-bit code in bits 0-2 of
    each and a spare bit 3, and nibbles n and n + 4 are the MMA's pair (k0 = 0, 1). With
    x = word 2c + k6, xh = word c >> 8 k6 and i = k3 + 2 k4, weight (i, k5, k0) is
      i = 0, 1: x's nibble i + 2 k5 (+ 4 k0);
      i = 2:    xh's nibble k5;
      i = 3:    spare bits: bit 0 from x's nibble k5, bit 1 from x's nibble 2 + k5, bit 2 from
                xh's nibble k5.
    So every code sits in nibble 0 or 1 of x, x >> 8, xh or one word of gathered spare bits, which
    the kernel turns into a bf16/f16 pair with one LOP3 and one FMA (a code in bits 4-6 still
    lies in a bf16's mantissa: the FMA scales it by 1/16), as cheap as a 4-bit pair.
    """
    k = torch.arange(FRAGMENT_CHUNK)
    b = [(k >> i) & 1 for i in range(7)]
    c, k5, k6, k0 = b[1] + 2 * b[2], b[5], b[6], b[0]
    i = b[3] + 2 * b[4]
    x = 32 * (2 * c + k6) + 16 * k0  # low-plane word, the pair's half
    xh = 32 * (8 + c) + 16 * k0 + 8 * k6  # high-plane word, this k6's bytes
    pos = torch.empty(FRAGMENT_CHUNK, 3, dtype=torch.int64)
    for j in range(3):
        pos[:, j] = torch.where(i < 2, x + 4 * (i + 2 * k5) + j, xh + 4 * k5 + j)
    spare = i == 3
    pos[spare, 0] = (x + 4 * k5 + 3)[spare]
    pos[spare, 1] = (x + 4 * (2 + k5) + 3)[spare]
    pos[spare, 2] = (xh + 4 * k5 + 3)[spare]
    return pos


_W3_FRAGMENT_BITS = _w3_fragment_bits()
_W3_CHUNK_WORDS = 12
# Its inverse: [word, bit] of a chunk -> 3 * weight + code bit kept there.
_W3_FRAGMENT_SOURCE = torch.empty(_W3_CHUNK_WORDS * 32, dtype=torch.int64)
_W3_FRAGMENT_SOURCE[_W3_FRAGMENT_BITS.flatten()] = torch.arange(3 * FRAGMENT_CHUNK)
_W3_FRAGMENT_SOURCE = _W3_FRAGMENT_SOURCE.reshape(_W3_CHUNK_WORDS, 32)


def _w3_to_fragment(codes: torch.Tensor) -> torch.Tensor:
    """3-bit codes [n, K] (K a multiple of 128) -> rows of the low plane's words, then the high plane's."""
    n, k = codes.shape
    chunks = codes.to(torch.int32).reshape(n, k // FRAGMENT_CHUNK, FRAGMENT_CHUNK)
    source = _W3_FRAGMENT_SOURCE.to(codes.device)
    words = torch.zeros(n, k // FRAGMENT_CHUNK, _W3_CHUNK_WORDS, dtype=torch.int32, device=codes.device)
    for bit in range(32):  # int32 shifts wrap into the sign bit, as the packing wants
        src = source[:, bit]
        words |= ((chunks[:, :, src // 3] >> (src % 3).to(torch.int32)) & 1) << bit
    return torch.cat([words[:, :, :8].reshape(n, -1), words[:, :, 8:].reshape(n, -1)], dim=1)


def _pack_v1_w3(codes: torch.Tensor) -> torch.Tensor:
    """format.pack(codes, 3) without compressed-tensors, which the serving side need not have: per 32
    weights, 2-bit fields of weights 0-15 and 16-31, then bit 2 of all 32, lowest field first."""
    n, k = codes.shape
    chunks = codes.to(torch.int64).reshape(n, k // 32, 2, 16)
    low = ((chunks & 3) << (2 * torch.arange(16, device=codes.device))).sum(-1)
    high = (((chunks >> 2) & 1).reshape(n, k // 32, 32) << torch.arange(32, device=codes.device)).sum(-1)
    words = torch.cat([low, high.unsqueeze(-1)], dim=2).reshape(n, -1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _w3_from_fragment(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _w3_to_fragment: int32 codes [n, K]."""
    n, words = packed.shape
    chunks = words // _W3_CHUNK_WORDS
    low, high = packed[:, : 8 * chunks].reshape(n, chunks, 8), packed[:, 8 * chunks :].reshape(n, chunks, 4)
    chunk_words = torch.cat([low, high], dim=2)
    pos = _W3_FRAGMENT_BITS.to(packed.device)
    codes = torch.zeros(n, chunks, FRAGMENT_CHUNK, dtype=torch.int32, device=packed.device)
    for j in range(3):
        bits = (chunk_words[:, :, pos[:, j] // 32] >> (pos[:, j] % 32).to(torch.int32)) & 1
        codes |= bits << j
    return codes.reshape(n, chunks * FRAGMENT_CHUNK)


def _permute_fields(packed: torch.Tensor, bits: int, inverse: bool) -> torch.Tensor:
    """Rows [n, words] of ``bits``-bit fields with each 128-chunk's fields moved to (or, ``inverse``, back
    from) their fragment slots."""
    n, words = packed.shape
    per_word = 32 // bits
    slots = _FRAGMENT_SLOTS[bits].to(packed.device)
    if not inverse:
        slots = torch.argsort(slots)  # stored field s holds weight argsort(slots)[s]
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
    fields = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n, -1, FRAGMENT_CHUNK)
    fields = fields[:, :, slots].reshape(n, words, per_word)
    out = torch.zeros_like(packed)
    for i in range(per_word):  # int32 shifts wrap into the sign bit, as the packing wants
        out |= fields[:, :, i] << (i * bits)
    return out


def to_kernel_order(scheme: Scheme, packed: torch.Tensor) -> torch.Tensor:
    """Format-v1 packed rows [n, words] -> the order the kernels read.

    3 bits: v1 stores each 32-weight chunk as a word triple (low 2 bits of weights
    0-15, of 16-31, then bit 2 of all 32). Kernel order puts each row's low-bit
    words first (the row's 2-bit packing) and its bit-2 words after them (its 1-bit
    packing), so a K tile's words are two contiguous runs that load as 16-byte
    vectors, instead of three strided 4-byte loads per chunk.
    Blocks in fragment order (is_fragment_ordered) then have each 128-weight
    chunk's fields permuted into their fragment slots (_fragment_slots; 3 bits:
    _w3_fragment_bits, in the same two planes' words). Rows stay rows and chunks
    stay chunks, so row or 128-column slices (tensor-parallel shards) convert
    independently.
    Other schemes: as is.
    """
    n, words = packed.shape
    k = words * 32 // scheme.bits
    frag = is_fragment_ordered(scheme, k)
    if scheme.bits == 3:
        if frag:
            return _w3_to_fragment(unpack(packed, 3))
        triples = packed.reshape(n, words // 3, 3)
        return torch.cat([triples[:, :, :2].reshape(n, -1), triples[:, :, 2]], dim=1)
    if frag:
        return _permute_fields(packed, scheme.bits, False)
    return packed


def from_kernel_order(scheme: Scheme, packed: torch.Tensor) -> torch.Tensor:
    """Inverse of to_kernel_order (a copy for reordered blocks)."""
    n, words = packed.shape
    k = words * 32 // scheme.bits
    frag = is_fragment_ordered(scheme, k)
    if scheme.bits == 3:
        if frag:
            return _pack_v1_w3(_w3_from_fragment(packed))
        chunks = words // 3
        low, high = packed[:, : 2 * chunks], packed[:, 2 * chunks :]
        return torch.cat([low.reshape(n, chunks, 2), high.reshape(n, chunks, 1)], dim=2).reshape(n, words)
    if frag:
        return _permute_fields(packed, scheme.bits, True)
    return packed


@dataclass
class ExpertGemmWeights:
    """All experts' weights of one GEMM (gate_up or down) of one MoE layer."""

    n: int  # output features per expert
    k: int  # input features per expert
    schemes: list[Scheme]
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    meta: torch.Tensor  # int64 [E, 6]

    @property
    def num_experts(self) -> int:
        return len(self.schemes)

    @cached_property
    def distinct_schemes(self) -> tuple[Scheme, ...]:
        """The layer's schemes, each once, in first-use order. Whatever depends on the scheme mix (kernel
        specialisation, tile config) reads these: a handful instead of every expert, on every forward of an
        eager step (the schemes are fixed when the layer is built)."""
        return tuple(dict.fromkeys(self.schemes))

    @classmethod
    def allocate(cls, schemes: list[Scheme], n: int, k: int, device=None) -> "ExpertGemmWeights":
        rows, w_total, s_total, z_total = [], 0, 0, 0
        for scheme in schemes:
            scheme.check_shape(n, k)
            words, scales, zeros = block_sizes(scheme, n, k)
            rows.append([scheme.bits, scheme.group(k), scheme_flags(scheme, k), w_total, s_total, z_total])
            w_total, s_total, z_total = w_total + words, s_total + scales, z_total + zeros
        return cls(
            n=n,
            k=k,
            schemes=list(schemes),
            qweight=torch.zeros(w_total, dtype=torch.int32, device=device),
            scales=torch.zeros(s_total, dtype=torch.float16, device=device),
            # Never empty, so kernels always get a valid pointer.
            zeros=torch.zeros(max(z_total, 1), dtype=torch.float16, device=device),
            meta=torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(schemes), 6),
        )

    def group_sizes(self) -> tuple[int, ...]:
        """The distinct quantization group sizes along K of the layer's schemes (per channel: K)."""
        return tuple(sorted({s.group(self.k) for s in self.distinct_schemes}))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    # Views of one expert's block (row slices of n; used by loaders and the reference).

    def packed_view(self, e: int) -> torch.Tensor:
        """Expert e's packed words as stored, in kernel order (to_kernel_order)."""
        scheme = self.schemes[e]
        words, _, _ = block_sizes(scheme, self.n, self.k)
        off = int(self.meta[e, W_OFF])
        flat = self.qweight[off : off + words]
        if scheme.weight_is_fp8:
            return flat.view(FP8_DTYPE).view(self.n, self.k)
        return flat.view(self.n, words // self.n)

    def scale_view(self, e: int) -> torch.Tensor:
        groups = self.schemes[e].num_groups(self.k)
        off = int(self.meta[e, S_OFF])
        return self.scales[off : off + self.n * groups].view(self.n, groups)

    def zero_view(self, e: int) -> torch.Tensor | None:
        scheme = self.schemes[e]
        if not scheme.has_zero_point:
            return None
        groups = scheme.num_groups(self.k)
        off = int(self.meta[e, Z_OFF])
        return self.zeros[off : off + self.n * groups].view(self.n, groups)

    def block(self, e: int) -> QuantizedWeight:
        """Expert e's block in format v1 (3-bit words are a converted copy; write with store_block)."""
        scheme = self.schemes[e]
        packed = from_kernel_order(scheme, self.packed_view(e))
        return QuantizedWeight(scheme, packed, self.scale_view(e), self.zero_view(e))

    def store_block(self, e: int, qw: QuantizedWeight) -> None:
        """Write a format-v1 block into expert e's slots."""
        self.packed_view(e).copy_(to_kernel_order(self.schemes[e], qw.packed))
        self.scale_view(e).copy_(qw.scale)
        if qw.zero is not None:
            self.zero_view(e).copy_(qw.zero)

    def dequantize_expert(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.block(e), self.k, dtype)


def make_dummy_weights_sane(*gemms: ExpertGemmWeights) -> None:
    """Dummy loading fills buffers with random bits: scales may be 0 or huge and fp8 bytes may be
    NaN. Give every block random codes and the statistics of vLLM's own dummy weights instead:
    zero-mean, about 1e-3 in size (zero point at mid-range, scales of random sign), so that speed
    runs route tokens the way vLLM's bf16 and GPTQ dummy models do. (Positive scales with a zero
    point of 1 made every dequantized weight positive: hidden states then drift one way and the
    router sends most tokens to the same experts, which flatters the MoE time.)"""
    for weights in gemms:
        weights.qweight.random_(-(2**31), 2**31 - 1)  # random codes: never time on zeros
        for e, scheme in enumerate(weights.schemes):
            if scheme.weight_is_fp8:
                fp8 = weights.packed_view(e)
                fp8.copy_(torch.nan_to_num(fp8.float(), nan=0.0).clamp(-FP8_MAX, FP8_MAX).to(fp8.dtype))
            fill_dummy_scale_and_zero(scheme, weights.scale_view(e), weights.zero_view(e))


def fill_dummy_scale_and_zero(scheme: Scheme, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
    """Scales of random sign and a mid-range zero point, so that (code - zero) * scale of uniformly
    random codes is zero-mean and at most about 1e-3 (make_dummy_weights_sane)."""
    largest_code = FP8_MAX if scheme.weight_is_fp8 else float(1 << (scheme.bits - 1))
    scale.uniform_(-1e-3 / largest_code, 1e-3 / largest_code)
    if zero is not None:
        zero.fill_(largest_code)
