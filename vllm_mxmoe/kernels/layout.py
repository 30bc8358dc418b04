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
blocks, which are kept in kernel order (``to_kernel_order``): the loaders
convert on the way in and ``block`` converts back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import FP8_DTYPE, QuantizedWeight, dequantize
from ..schemes import Scheme

BITS, GROUP, FLAGS, W_OFF, S_OFF, Z_OFF = range(6)
FLAG_ZERO = 1  # asymmetric: a zero point per group
FLAG_FP8_WEIGHT = 2  # weights are fp8 e4m3, one scale per output channel
FLAG_FP8_ACT = 4  # activations are quantized to fp8 per token before the GEMM


def scheme_flags(scheme: Scheme) -> int:
    return (
        (FLAG_ZERO if scheme.has_zero_point else 0)
        | (FLAG_FP8_WEIGHT if scheme.weight_is_fp8 else 0)
        | (FLAG_FP8_ACT if scheme.act == "fp8" else 0)
    )


def block_sizes(scheme: Scheme, n: int, k: int) -> tuple[int, int, int]:
    """(int32 words, scale elements, zero elements) of one [n, k] block."""
    words = n * k // 4 if scheme.weight_is_fp8 else n * k * scheme.bits // 32
    scales = n * scheme.num_groups(k)
    return words, scales, scales if scheme.has_zero_point else 0


def to_kernel_order(scheme: Scheme, packed: torch.Tensor) -> torch.Tensor:
    """Format-v1 packed rows [n, words] -> the order the kernels read.

    3 bits: v1 stores each 32-weight chunk as a word triple (low 2 bits of weights
    0-15, of 16-31, then bit 2 of all 32). Kernel order puts each row's low-bit
    words first (the row's 2-bit packing) and its bit-2 words after them (its 1-bit
    packing), so a K tile's words are two contiguous runs that load as 16-byte
    vectors, instead of three strided 4-byte loads per chunk. Rows stay rows, so
    row slices (tensor-parallel shards) convert independently. Other schemes: as is.
    """
    if scheme.bits != 3:
        return packed
    n, words = packed.shape
    triples = packed.reshape(n, words // 3, 3)
    return torch.cat([triples[:, :, :2].reshape(n, -1), triples[:, :, 2]], dim=1)


def from_kernel_order(scheme: Scheme, packed: torch.Tensor) -> torch.Tensor:
    """Inverse of to_kernel_order (a copy for 3-bit blocks)."""
    if scheme.bits != 3:
        return packed
    n, words = packed.shape
    chunks = words // 3
    low = packed[:, : 2 * chunks].reshape(n, chunks, 2)
    high = packed[:, 2 * chunks :].reshape(n, chunks, 1)
    return torch.cat([low, high], dim=2).reshape(n, words)


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

    @classmethod
    def allocate(cls, schemes: list[Scheme], n: int, k: int, device=None) -> "ExpertGemmWeights":
        rows, w_total, s_total, z_total = [], 0, 0, 0
        for scheme in schemes:
            scheme.check_shape(n, k)
            words, scales, zeros = block_sizes(scheme, n, k)
            rows.append([scheme.bits, scheme.group(k), scheme_flags(scheme), w_total, s_total, z_total])
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
        return tuple(sorted({s.group(self.k) for s in self.schemes}))

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
