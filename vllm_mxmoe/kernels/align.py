"""Routing alignment on the device (the job of vLLM's moe_align_block_size).

From ``topk_ids [T, topk]`` build the row list the grouped GEMM walks:
every routed slot (``slot = token * topk + j``) grouped by its local expert,
each expert's rows padded to a multiple of BLOCK_M, so that each M-block of
rows belongs to one expert.

Everything stays on the device and every shape depends only on
(T, topk, E, BLOCK_M): no ``.item()``, no ``nonzero``, so CUDA graphs can
capture it. Two paths:

* up to ONE_PROGRAM_MAX_SLOTS slots (decode and small prefill), one program
  does all of it (_align_one_program_kernel): a histogram gives the counts, a
  prefix sum each expert's first row, and each slot's row is that start plus
  its rank among its expert's slots (by comparison with the earlier slots up
  to COMPARE_MAX_SLOTS, which keeps token order; by an atomic cursor beyond);
* beyond, a memset and three kernels: count + rank (a per-program cursor for
  the rank inside a program, one atomic per program and expert for the
  program's base: hot experts do not serialise thousands of atomics on one
  address), the block map (one program per chunk of M-blocks, each re-doing
  the tiny prefix sum), and the scatter of each slot to its row.

Rows within an expert are in token order on the comparison path and in atomic
order otherwise; every row is computed on its own, so results do not depend on
that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .configs import cdiv, next_pow2


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
    return cdiv(max(rows, 1), block_m) * block_m


@triton.jit
def _local_experts(topk_ids_ptr, expert_map_ptr, offs, num_slots, HAS_EXPERT_MAP: tl.constexpr):
    """Local expert of each slot in ``offs``; -1 past num_slots or for other ranks' experts."""
    in_range = offs < num_slots
    expert = tl.load(topk_ids_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    if HAS_EXPERT_MAP:
        expert = tl.load(expert_map_ptr + expert, mask=in_range, other=-1).to(tl.int32)
    return tl.where(in_range, expert, -1)


@triton.jit
def _block_owners(block_end, b, num_experts):
    """Owner of each M-block in ``b``: the number of experts whose blocks end at or before it."""
    owner = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
    return tl.where(owner < num_experts, owner, -1)


@triton.jit(do_not_specialize=["num_slots", "max_rows", "max_blocks"])
def _align_one_program_kernel(
    topk_ids_ptr, expert_map_ptr, sorted_ids_ptr, block_expert_ptr, num_blocks_ptr, slot_expert_ptr, cursor_ptr,
    num_experts, num_slots, max_rows, max_blocks,
    HAS_EXPERT_MAP: tl.constexpr, BLOCK_M: tl.constexpr, S_POW2: tl.constexpr, E_POW2: tl.constexpr,
    EXPERT_BLOCKS: tl.constexpr, RANK_BY_COMPARE: tl.constexpr, FILL_STEP: tl.constexpr,
):
    """The whole alignment in one program: no memset, no second launch."""
    slots = tl.arange(0, S_POW2)
    expert = _local_experts(topk_ids_ptr, expert_map_ptr, slots, num_slots, HAS_EXPERT_MAP)
    tl.store(slot_expert_ptr + slots, expert, mask=slots < num_slots)
    local = expert >= 0

    experts = tl.arange(0, E_POW2)
    counts = tl.histogram(expert, E_POW2, mask=local)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_start = tl.cumsum(blocks, axis=0) - blocks
    tl.store(num_blocks_ptr, tl.sum(blocks, axis=0))
    tl.store(cursor_ptr + experts, block_start * BLOCK_M, mask=experts < num_experts)
    for r0 in range(0, max_rows, FILL_STEP):
        r = r0 + tl.arange(0, FILL_STEP)
        tl.store(sorted_ids_ptr + r, tl.full((FILL_STEP,), num_slots, tl.int32), mask=r < max_rows)
    for b0 in range(0, max_blocks, FILL_STEP):
        b = b0 + tl.arange(0, FILL_STEP)
        tl.store(block_expert_ptr + b, tl.full((FILL_STEP,), -1, tl.int32), mask=b < max_blocks)
    # The cursors and the fills above were written by other threads of this program.
    tl.debug_barrier()

    if RANK_BY_COMPARE:
        before = (expert[:, None] == expert[None, :]) & (slots[None, :] < slots[:, None])
        row = tl.load(cursor_ptr + expert, mask=local, other=0) + tl.sum(before.to(tl.int32), axis=1)
    else:
        row = tl.atomic_add(cursor_ptr + expert, 1, mask=local, sem="relaxed")
    tl.store(sorted_ids_ptr + row, slots, mask=local)
    # Expert e owns M-blocks block_start[e] .. block_start[e] + blocks[e] - 1.
    j = tl.arange(0, EXPERT_BLOCKS)
    owner = experts[:, None] + tl.zeros((E_POW2, EXPERT_BLOCKS), tl.int32)
    tl.store(block_expert_ptr + block_start[:, None] + j[None, :], owner, mask=j[None, :] < blocks[:, None])


@triton.jit(do_not_specialize=["num_slots"])
def _count_and_rank_kernel(
    topk_ids_ptr, expert_map_ptr, counts_ptr, cursor_ptr, rank_ptr, slot_expert_ptr, num_slots,
    HAS_EXPERT_MAP: tl.constexpr, BLOCK: tl.constexpr, E_POW2: tl.constexpr,
):
    """counts[e] += this program's slots of e; rank = base of the program in e + rank inside it.

    ``cursor`` (zeroed, [programs, E_POW2]) is this program's own: the per-slot atomics only
    contend within the program, and the expert totals take one atomic per (program, expert).
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    expert = _local_experts(topk_ids_ptr, expert_map_ptr, offs, num_slots, HAS_EXPERT_MAP)
    tl.store(slot_expert_ptr + offs, expert, mask=offs < num_slots)
    local = expert >= 0
    cursor = cursor_ptr + pid * E_POW2
    inner_rank = tl.atomic_add(cursor + expert, 1, mask=local, sem="relaxed")
    experts = tl.arange(0, E_POW2)
    here = tl.histogram(expert, E_POW2, mask=local)
    base = tl.atomic_add(counts_ptr + experts, here, mask=here > 0, sem="relaxed")
    tl.debug_barrier()  # every slot's cursor atomic is done before the cursors are overwritten
    tl.store(cursor + experts, base, mask=here > 0)  # the cursors are spent: reuse them for the bases
    tl.debug_barrier()
    rank = tl.load(cursor + expert, mask=local, other=0, volatile=True) + inner_rank
    tl.store(rank_ptr + offs, rank, mask=local)


@triton.jit(do_not_specialize=["num_slots", "max_blocks"])
def _block_map_kernel(
    counts_ptr, expert_start_ptr, sorted_ids_ptr, block_expert_ptr, num_blocks_ptr,
    num_experts, num_slots, max_blocks,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):
    """Each program: the prefix sum of padded counts (tiny, so every program does it), the owners of
    its chunk of M-blocks, and the sentinel in its chunk's rows (the scatter kernel, launched after,
    overwrites the real ones)."""
    pid = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    if pid == 0:
        tl.store(expert_start_ptr + experts, (block_end - blocks) * BLOCK_M, mask=experts < num_experts)
        tl.store(num_blocks_ptr, tl.sum(blocks, axis=0))

    b = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    tl.store(block_expert_ptr + b, _block_owners(block_end, b, num_experts), mask=b < max_blocks)
    r = pid * BLOCKS_PER_PROGRAM * BLOCK_M + tl.arange(0, BLOCKS_PER_PROGRAM * BLOCK_M)
    tl.store(sorted_ids_ptr + r, tl.full((BLOCKS_PER_PROGRAM * BLOCK_M,), num_slots, tl.int32),
             mask=r < max_blocks * BLOCK_M)


@triton.jit(do_not_specialize=["num_slots"])
def _scatter_kernel(slot_expert_ptr, rank_ptr, expert_start_ptr, sorted_ids_ptr, num_slots, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(slot_expert_ptr + offs, mask=offs < num_slots, other=-1)
    local = expert >= 0
    start = tl.load(expert_start_ptr + expert, mask=local, other=0)
    rank = tl.load(rank_ptr + offs, mask=local, other=0)
    tl.store(sorted_ids_ptr + start + rank, offs, mask=local)


# The one-program kernel runs alone on one SM: all of that SM's warps, not 4.
SINGLE_PROGRAM_WARPS = 16
# Slots up to which one program aligns everything (while its [experts, blocks of one expert] owner
# tile stays within ONE_PROGRAM_MAX_CELLS), and up to which it ranks a slot by comparing it with
# every other slot ([S, S] cells) instead of an atomic cursor. Measured on an H200 (2026-11-30,
# Zipf routing, CUDA-graph replay): 128 slots ranked by comparison 5.0-5.3 us, 512 by atomics
# 2.5-3.3 us; 4096 slots in one program 8.3-12.0 us, in three kernels 8.6-9.4 us.
ONE_PROGRAM_MAX_SLOTS = 2048
ONE_PROGRAM_MAX_CELLS = 32768
COMPARE_MAX_SLOTS = 32
# Slots per program of the count + rank and scatter kernels; M-blocks per program of the block map.
SLOTS_PER_PROGRAM = 1024
BLOCKS_PER_PROGRAM = 32


def _expert_blocks(num_slots: int, block_m: int) -> int:
    """Power of two >= the M-blocks one expert can hold (all slots its own)."""
    return next_pow2(cdiv(next_pow2(max(num_slots, 1)), block_m))


def uses_one_program(num_slots: int, num_experts: int, block_m: int) -> bool:
    cells = next_pow2(num_experts) * _expert_blocks(num_slots, block_m)
    return num_slots <= ONE_PROGRAM_MAX_SLOTS and cells <= ONE_PROGRAM_MAX_CELLS


def align_routing(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None = None,
    one_program: bool | None = None,
) -> AlignedRouting:
    """Sort routed slots by local expert, padded per expert to BLOCK_M rows.

    ``num_experts`` is the local expert count; ``expert_map`` (global -> local,
    -1 = not on this rank) drops the slots of other ranks' experts. ``one_program``:
    one kernel (the default up to ONE_PROGRAM_MAX_SLOTS slots) or the memset +
    three-kernel path; None picks by size.
    """
    device = topk_ids.device
    num_slots = topk_ids.numel()
    max_rows = max_padded_rows(num_slots, num_experts, block_m)
    ids = topk_ids.reshape(-1)
    emap = expert_map if expert_map is not None else ids
    slot_expert = torch.empty(max(num_slots, 1), dtype=torch.int32, device=device)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)
    e_pow2 = next_pow2(num_experts)
    s_pow2 = next_pow2(max(num_slots, 1))

    if one_program is None:
        one_program = uses_one_program(num_slots, num_experts, block_m)
    if one_program:
        cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
        _align_one_program_kernel[(1,)](
            ids, emap, sorted_ids, block_expert, num_blocks, slot_expert, cursor,
            num_experts, num_slots, max_rows, block_expert.numel(),
            HAS_EXPERT_MAP=expert_map is not None, BLOCK_M=block_m, S_POW2=s_pow2, E_POW2=e_pow2,
            EXPERT_BLOCKS=_expert_blocks(num_slots, block_m),
            RANK_BY_COMPARE=s_pow2 <= COMPARE_MAX_SLOTS, FILL_STEP=1024,
            num_warps=SINGLE_PROGRAM_WARPS,
        )
        return AlignedRouting(sorted_ids, block_expert, num_blocks, slot_expert[:num_slots], num_slots, block_m)

    programs = cdiv(max(num_slots, 1), SLOTS_PER_PROGRAM)
    # One memset for the expert totals and every program's cursors.
    zeroed = torch.zeros(num_experts + programs * e_pow2, dtype=torch.int32, device=device)
    counts, cursors = zeroed[:num_experts], zeroed[num_experts:]
    rank = torch.empty(max(num_slots, 1), dtype=torch.int32, device=device)
    expert_start = torch.empty(num_experts, dtype=torch.int32, device=device)
    _count_and_rank_kernel[(programs,)](
        ids, emap, counts, cursors, rank, slot_expert, num_slots,
        HAS_EXPERT_MAP=expert_map is not None, BLOCK=SLOTS_PER_PROGRAM, E_POW2=e_pow2,
    )
    _block_map_kernel[(cdiv(block_expert.numel(), BLOCKS_PER_PROGRAM),)](
        counts, expert_start, sorted_ids, block_expert, num_blocks,
        num_experts, num_slots, block_expert.numel(),
        BLOCK_M=block_m, E_POW2=e_pow2, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
    )
    _scatter_kernel[(programs,)](slot_expert, rank, expert_start, sorted_ids, num_slots, BLOCK=SLOTS_PER_PROGRAM)
    return AlignedRouting(sorted_ids, block_expert, num_blocks, slot_expert[:num_slots], num_slots, block_m)
