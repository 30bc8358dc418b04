"""Routing alignment on the device (the job of vLLM's moe_align_block_size).

From ``topk_ids [T, topk]`` build the row list the grouped GEMM walks:
every routed slot (``slot = token * topk + j``) grouped by its local expert,
each expert's rows padded to a multiple of BLOCK_M, so that each M-block of
rows belongs to one expert.

For few slots (decode) one program does all of it instead (_align_one_program_kernel):
one launch instead of a memset and three kernels.

Everything stays on the device and every shape depends only on
(T, topk, E, BLOCK_M): no ``.item()``, no ``nonzero``, so CUDA graphs can
capture it. Three small Triton kernels:

1. count + rank: an atomic add per slot gives its expert's count and, from the
   value it returned, the slot's rank inside its expert;
2. block map (one program): prefix sum of padded counts -> where each expert
   starts, which expert owns each M-block, padding rows set to the sentinel;
3. scatter: slot -> its row ``start[expert] + rank``.

Rows within an expert end up in atomic order, not token order; every row is
computed on its own, so results do not depend on that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class AlignedRouting:
    sorted_ids: torch.Tensor  # int32 [max_rows]: slot of each row; num_slots marks padding
    block_expert: torch.Tensor  # int32 [max_blocks]: local expert of each M-block
    num_blocks: torch.Tensor  # int32 [1]: M-blocks that hold rows (programs past it exit)
    slot_expert: torch.Tensor  # int32 [num_slots]: local expert of each slot, -1 if not local
    num_slots: int
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def max_padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    """Bound on the padded row count: at most min(E, slots) experts are busy, each wasting < BLOCK_M rows."""
    rows = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return triton.cdiv(max(rows, 1), block_m) * block_m


@triton.jit(do_not_specialize=["num_slots"])
def _count_and_rank_kernel(
    topk_ids_ptr, expert_map_ptr, counts_ptr, rank_ptr, slot_expert_ptr, num_slots,
    HAS_EXPERT_MAP: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_slots
    expert = tl.load(topk_ids_ptr + offs, mask=in_range, other=0).to(tl.int32)
    if HAS_EXPERT_MAP:
        expert = tl.load(expert_map_ptr + expert, mask=in_range, other=-1).to(tl.int32)
    local = in_range & (expert >= 0)
    # The value before the add is this slot's rank among its expert's slots.
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=local)
    tl.store(rank_ptr + offs, rank, mask=local)
    tl.store(slot_expert_ptr + offs, tl.where(local, expert, -1), mask=in_range)


@triton.jit(do_not_specialize=["num_slots", "max_blocks"])
def _block_map_kernel(
    counts_ptr, expert_start_ptr, sorted_ids_ptr, block_expert_ptr, num_blocks_ptr,
    num_experts, num_slots, max_blocks,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr, EXPERTS_PER_STEP: tl.constexpr,
):
    experts = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)  # inclusive: first M-block after expert e
    block_start = block_end - blocks
    tl.store(expert_start_ptr + experts, block_start * BLOCK_M, mask=experts < num_experts)
    tl.store(num_blocks_ptr, tl.sum(blocks, axis=0))

    # Owner of M-block b = number of experts ending at or before b.
    for b0 in range(0, max_blocks, BLOCKS_PER_STEP):
        b = b0 + tl.arange(0, BLOCKS_PER_STEP)
        owner = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        owner = tl.where(owner < num_experts, owner, -1)
        tl.store(block_expert_ptr + b, owner, mask=b < max_blocks)

    # Padding rows of each expert (its last M-block past its count) -> sentinel.
    tl.debug_barrier()  # expert_start was stored above by other threads
    pad = tl.arange(0, BLOCK_M)
    for e0 in range(0, num_experts, EXPERTS_PER_STEP):
        e = e0 + tl.arange(0, EXPERTS_PER_STEP)
        e_ok = e < num_experts
        cnt = tl.load(counts_ptr + e, mask=e_ok, other=0)
        start = tl.load(expert_start_ptr + e, mask=e_ok, other=0)
        padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        row = cnt[:, None] + pad[None, :]
        tl.store(
            sorted_ids_ptr + start[:, None] + row,
            tl.full((EXPERTS_PER_STEP, BLOCK_M), num_slots, tl.int32),
            mask=e_ok[:, None] & (row < padded[:, None]),
        )


@triton.jit(do_not_specialize=["num_slots", "max_rows", "max_blocks"])
def _align_one_program_kernel(
    topk_ids_ptr, expert_map_ptr, sorted_ids_ptr, block_expert_ptr, num_blocks_ptr, slot_expert_ptr,
    num_experts, num_slots, max_rows, max_blocks,
    HAS_EXPERT_MAP: tl.constexpr, BLOCK_M: tl.constexpr, S_POW2: tl.constexpr, E_POW2: tl.constexpr,
    ROWS_PER_STEP: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
):
    """The whole alignment in one program, for few slots (decode): no atomics, no memset.

    counts and ranks come from [slots, experts] and [slots, slots] comparisons, so
    the result is in token order (deterministic), unlike the atomic three-kernel path.
    """
    slots = tl.arange(0, S_POW2)
    in_range = slots < num_slots
    expert = tl.load(topk_ids_ptr + slots, mask=in_range, other=-1).to(tl.int32)
    if HAS_EXPERT_MAP:
        expert = tl.load(expert_map_ptr + expert, mask=in_range, other=-1).to(tl.int32)
    expert = tl.where(in_range, expert, -1)
    tl.store(slot_expert_ptr + slots, expert, mask=in_range)

    experts = tl.arange(0, E_POW2)
    hit = (expert[:, None] == experts[None, :]).to(tl.int32)  # [S, E]; -1 (not local) hits nothing
    counts = tl.sum(hit, axis=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    start = (block_end - blocks) * BLOCK_M
    tl.store(num_blocks_ptr, tl.sum(blocks, axis=0))
    # rank of a slot among the earlier slots of its expert
    before = (expert[:, None] == expert[None, :]) & (slots[None, :] < slots[:, None])
    rank = tl.sum(before.to(tl.int32), axis=1)
    row = tl.sum(hit * start[None, :], axis=1) + rank

    for r0 in range(0, max_rows, ROWS_PER_STEP):
        r = r0 + tl.arange(0, ROWS_PER_STEP)
        tl.store(sorted_ids_ptr + r, tl.full((ROWS_PER_STEP,), num_slots, tl.int32), mask=r < max_rows)
    for b0 in range(0, max_blocks, BLOCKS_PER_STEP):
        b = b0 + tl.arange(0, BLOCKS_PER_STEP)
        owner = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        owner = tl.where(owner < num_experts, owner, -1)
        tl.store(block_expert_ptr + b, owner, mask=b < max_blocks)
    tl.debug_barrier()  # the sentinel rows above are overwritten by other threads below
    tl.store(sorted_ids_ptr + row, slots, mask=expert >= 0)


# The one-program kernels (whole alignment in decode, block map otherwise) run alone on one SM and are
# bound by their [slots, experts] / [blocks, experts] comparisons: all of that SM's warps, not 4.
SINGLE_PROGRAM_WARPS = 16
# Slots x experts (and slots x slots) up to which the one-program alignment is used.
ONE_PROGRAM_MAX_SLOTS = 128
ONE_PROGRAM_MAX_CELLS = 128 * 256


@triton.jit(do_not_specialize=["num_slots"])
def _scatter_kernel(slot_expert_ptr, rank_ptr, expert_start_ptr, sorted_ids_ptr, num_slots, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(slot_expert_ptr + offs, mask=offs < num_slots, other=-1)
    local = expert >= 0
    start = tl.load(expert_start_ptr + expert, mask=local, other=0)
    rank = tl.load(rank_ptr + offs, mask=local, other=0)
    tl.store(sorted_ids_ptr + start + rank, offs, mask=local)


def align_routing(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None = None,
    one_program: bool | None = None,
) -> AlignedRouting:
    """Sort routed slots by local expert, padded per expert to BLOCK_M rows.

    ``num_experts`` is the local expert count; ``expert_map`` (global -> local,
    -1 = not on this rank) drops the slots of other ranks' experts. ``one_program``:
    one kernel (few slots, the default up to ONE_PROGRAM_MAX_SLOTS) or the
    memset + three-kernel path; None picks by size.
    """
    device = topk_ids.device
    num_slots = topk_ids.numel()
    max_rows = max_padded_rows(num_slots, num_experts, block_m)
    ids = topk_ids.reshape(-1)
    rank = torch.empty(max(num_slots, 1), dtype=torch.int32, device=device)
    slot_expert = torch.empty(max(num_slots, 1), dtype=torch.int32, device=device)
    expert_start = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)

    e_pow2 = triton.next_power_of_2(num_experts)
    s_pow2 = triton.next_power_of_2(max(num_slots, 1))
    if one_program is None:
        one_program = num_slots <= ONE_PROGRAM_MAX_SLOTS and s_pow2 * e_pow2 <= ONE_PROGRAM_MAX_CELLS
    if one_program:
        _align_one_program_kernel[(1,)](
            ids, expert_map if expert_map is not None else ids, sorted_ids, block_expert, num_blocks, slot_expert,
            num_experts, num_slots, max_rows, block_expert.numel(),
            HAS_EXPERT_MAP=expert_map is not None, BLOCK_M=block_m, S_POW2=s_pow2, E_POW2=e_pow2,
            ROWS_PER_STEP=1024, BLOCKS_PER_STEP=max(16, min(128, 8192 // e_pow2)),
            num_warps=SINGLE_PROGRAM_WARPS,
        )
        return AlignedRouting(sorted_ids, block_expert, num_blocks, slot_expert[:num_slots], num_slots, block_m)

    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    step = 1024
    grid = (triton.cdiv(max(num_slots, 1), step),)
    _count_and_rank_kernel[grid](
        ids, expert_map if expert_map is not None else ids, counts, rank, slot_expert, num_slots,
        HAS_EXPERT_MAP=expert_map is not None, BLOCK=step,
    )
    _block_map_kernel[(1,)](
        counts, expert_start, sorted_ids, block_expert, num_blocks,
        num_experts, num_slots, block_expert.numel(),
        BLOCK_M=block_m,
        E_POW2=triton.next_power_of_2(num_experts),
        BLOCKS_PER_STEP=max(16, min(128, 8192 // triton.next_power_of_2(num_experts))),
        EXPERTS_PER_STEP=max(1, 4096 // block_m), num_warps=SINGLE_PROGRAM_WARPS,
    )
    _scatter_kernel[grid](slot_expert, rank, expert_start, sorted_ids, num_slots, BLOCK=step)
    return AlignedRouting(sorted_ids, block_expert, num_blocks, slot_expert[:num_slots], num_slots, block_m)
