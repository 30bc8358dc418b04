"""Which tensor-parallel degrees an MxMoE checkpoint's expert schemes can be served at.

Under tensor parallelism (without --enable-expert-parallel) vLLM splits every
expert's intermediate dimension across ranks: gate/up keep their input (hidden)
dim whole, but down's input dim becomes ``intermediate / tp``. A down scheme can
only be sliced per rank if its quantization group (and packing) divides that.
Expert parallelism keeps experts whole, so it has no such limit. The loader
(moe.py) refuses a bad split at load time; the allocator warns at quantize time.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schemes import Scheme


@dataclass(frozen=True)
class ShardProblem:
    block: str  # "<experts prefix>.<expert>.down"
    scheme: str
    tp_size: int
    reason: str


def down_shard_reason(scheme: Scheme, hidden: int, intermediate: int, tp_size: int) -> str | None:
    """Why a down block in ``scheme`` cannot be split ``tp_size`` ways, or None if it can."""
    if intermediate % tp_size:
        return f"intermediate size {intermediate} is not divisible by {tp_size}"
    try:
        scheme.check_shape(hidden, intermediate // tp_size)
    except ValueError as e:
        return str(e)
    return None


def shard_problems(
    experts: dict, schemes: dict[str, Scheme], hidden: int, intermediate: int, tp_sizes: list[int]
) -> list[ShardProblem]:
    """Every (down block, TP degree) that cannot be served; ``experts`` maps prefix -> ExpertLayerSchemes."""
    problems = []
    reasons: dict[tuple[str, int], str | None] = {}
    for tp in tp_sizes:
        for prefix, layer in experts.items():
            for e, name in enumerate(layer.down):
                if (name, tp) not in reasons:
                    reasons[name, tp] = down_shard_reason(schemes[name], hidden, intermediate, tp)
                if reasons[name, tp]:
                    problems.append(ShardProblem(f"{prefix}.{e}.down", name, tp, reasons[name, tp]))
    return problems


def max_tp_degree(experts: dict, schemes: dict[str, Scheme], hidden: int, intermediate: int, limit: int = 64) -> int:
    """The largest power-of-two TP degree (<= limit) at which every down block shards."""
    best, tp = 1, 2
    while tp <= limit and not shard_problems(experts, schemes, hidden, intermediate, [tp]):
        best, tp = tp, tp * 2
    return best


def describe_problems(problems: list[ShardProblem], examples: int = 3) -> list[str]:
    """One line per TP degree: how many blocks fail, a few examples, and the ways out."""
    lines = []
    for tp in sorted({p.tp_size for p in problems}):
        at = [p for p in problems if p.tp_size == tp]
        shown = "; ".join(f"{p.block} ({p.scheme}): {p.reason}" for p in at[:examples])
        more = f" (and {len(at) - examples} more)" if len(at) > examples else ""
        lines.append(
            f"{len(at)} expert down block(s) cannot be served with --tensor-parallel-size {tp}: {shown}{more}. "
            f"Serve with --enable-expert-parallel (experts stay whole), or restrict the down schemes to "
            f"groups that divide the per-rank intermediate size."
        )
    return lines
