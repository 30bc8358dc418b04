"""Randomized Hadamard rotations: the matrices and their fast online transform.

``hadamard_matrix(n, seed)`` is ``Q = diag(signs) @ blockdiag(H_b, ..., H_b) / sqrt(b)``
with ``H_b`` the Sylvester Hadamard matrix of size b (a power of two) and
``signs`` a seeded random ±1 vector of length n. Q is orthogonal, and
``x @ Q == fwht_blocked(x, b, signs)`` costs O(n log b) instead of O(n^2).

Block size. A power-of-two n uses one full block (maximal mixing). Otherwise
(hidden 2880, intermediate 1408 = 11 * 128, 768 = 3 * 256 ...) the block is the
largest power of two that divides n, at most 128 by default. 128 is the
natural choice for a rotation applied to a quantized GEMM's *input* dim:

* it equals the quant group size, so each rotated group is a rotation of one
  original group; outliers are spread within the group whose scale they set,
  and groups stay independent;
* an online transform of 128 elements is 7 butterfly stages on data one
  kernel tile already holds (fusable into the activation-quant / GEMM
  prologue), no cross-tile traffic;
* tensor parallelism shards the intermediate dim in multiples of the group
  size, so every rank rotates its own shard without communication.

Pure torch, no offline dependencies, so the runtime can copy ``fwht_blocked``.
"""

from __future__ import annotations

import math

import torch

DEFAULT_MAX_BLOCK = 128


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_block_size(n: int, max_block: int | None = DEFAULT_MAX_BLOCK) -> int:
    """Block of hadamard_matrix(n): n itself if a power of two and max_block is None,
    else the largest power of two <= max_block dividing n."""
    if n <= 0:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    if max_block is None:
        if is_power_of_two(n):
            return n
        max_block = DEFAULT_MAX_BLOCK
    block = min(n & -n, 1 << (max_block.bit_length() - 1))  # lowest set bit = largest pow2 divisor
    if block < 2:
        raise ValueError(f"Hadamard rotation of size {n}: no power-of-two block >= 2 divides it")
    return block


def hadamard_signs(
    n: int, seed: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The random ±1 diagonal of hadamard_matrix(n, seed); drawn on CPU so any device agrees."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def sylvester_hadamard(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unnormalized ±1 Sylvester Hadamard matrix, H_2m = [[H_m, H_m], [H_m, -H_m]]."""
    if not is_power_of_two(n):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two only, got {n}")
    h = torch.ones(1, 1, device=device, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def hadamard_matrix(
    n: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    block: int | None = None,
) -> torch.Tensor:
    """Orthogonal n x n randomized (block-)Hadamard matrix Q; block from hadamard_block_size(n)
    unless given. x @ Q equals fwht_blocked(x, block, hadamard_signs(n, seed))."""
    block = hadamard_block_size(n, None) if block is None else block
    if not is_power_of_two(block) or n % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing n={n}")
    h = sylvester_hadamard(block, device, torch.float64) / math.sqrt(block)
    q = torch.block_diag(*([h] * (n // block)))
    q = hadamard_signs(n, seed, device, torch.float64).unsqueeze(1) * q
    return q.to(dtype)


def fwht_blocked(x: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """x @ Q along the last dim, Q = diag(signs) blockdiag(H_block) / sqrt(block).

    Fast Walsh-Hadamard transform inside each block of `block` elements:
    log2(block) butterfly stages (a, b) -> (a + b, a - b). float16/bfloat16
    inputs are transformed in float32 and returned in their dtype.
    """
    n = x.shape[-1]
    if not is_power_of_two(block) or n % block:
        raise ValueError(f"fwht_blocked: block {block} must be a power of two dividing the last dim {n}")
    out_dtype = x.dtype
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if signs is not None:
        y = y * signs.to(device=y.device, dtype=y.dtype)
    lead = y.shape[:-1]
    half = 1
    while half < block:
        # Pair element j with j + half inside every run of 2 * half elements.
        pairs = y.reshape(*lead, n // (2 * half), 2, half)
        y = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        half *= 2
    return (y.reshape(*lead, n) / math.sqrt(block)).to(out_dtype)
