"""Per-layer mixed-precision allocation (MxMoE step 3) as a small MILP.

For one MoE layer choose, for every expert e and unit u (gate_up: the fused
[2*inter, hidden] gate+up matrix; down: [hidden, inter]), one candidate scheme
s, minimising

    r * (ΣΔ - L_lo) / (L_hi - L_lo)  +  (1 - r) * (ΣT - T_lo) / (T_hi - T_lo)

subject to Σ storage_bits <= budget_bits * (weight elements of the layer).

Normalisation (our choice; the paper leaves it open): L_lo / L_hi are the sums
over (e, u) of the smallest / largest candidate loss, likewise T for time. Each
term thus spans [0, 1] over the candidates whatever the units of Δ and µs, so
r trades the two comparably and the same r means the same thing in every
layer. The bounds ignore the budget, so they are cheap and budget-independent.
A term whose span is 0 is constant and is left unscaled.

Solved exactly with scipy.optimize.milp (HiGHS): a multiple-choice knapsack,
binary x[g, s] with exactly one scheme per decision group g (an (e, u) pair,
or an expert with granularity="expert").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from vllm_mxmoe.schemes import parse_scheme

UNITS = ("gate_up", "down")
Granularity = Literal["block", "expert"]
DEFAULT_RS = tuple(i / 20 for i in range(21))

# HiGHS stops at an absolute gap of 1e-6 (not settable through scipy); scaling
# the normalised objective (order 1) up this much makes that gap 1e-12.
_OBJECTIVE_SCALE = 1e6
# At r = 0 / 1 the ignored term breaks ties with this weight: above HiGHS's gap
# (1e-12 after scaling), below any real difference in the normalised objective.
_TIE_BREAK = 1e-9


class TimeModel(Protocol):
    def time_us(self, scheme_name: str, n: int, k: int, tokens: float) -> float: ...


def unit_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """[out, in] of each unit: gate and up are one [2*inter, hidden] matrix tied to one scheme."""
    return {"gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}


@dataclass(frozen=True, eq=False)
class LayerProblem:
    """Costs of every candidate for one MoE layer. Arrays are [experts, 2 units, schemes]."""

    schemes: tuple[str, ...]
    loss: np.ndarray  # Δ >= 0, sensitivity of the block under the scheme
    time_us: np.ndarray  # predicted kernel time (µs) at the tokens the expert sees
    storage_bits: np.ndarray  # exact bits, scales and zero points included (int64)
    num_elements: int  # weight elements of all experts' gate, up and down
    budget_bits: float  # allowed average bits per weight element

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", tuple(self.schemes))
        if len(set(self.schemes)) != len(self.schemes) or not self.schemes:
            raise ValueError(f"schemes must be non-empty and distinct, got {self.schemes}")
        expected = (self.num_experts, len(UNITS), len(self.schemes))
        for name in ("loss", "time_us", "storage_bits"):
            array = np.asarray(getattr(self, name))
            if array.shape != expected:
                raise ValueError(
                    f"{name} has shape {array.shape}, expected {expected} (experts, units, schemes)"
                )
            if not np.all(np.isfinite(array)) or np.any(array < 0):
                raise ValueError(f"{name} must be finite and >= 0")
        storage = np.asarray(self.storage_bits)
        if not np.array_equal(storage, np.round(storage)) or np.any(storage <= 0):
            raise ValueError("storage_bits must be positive integers")
        object.__setattr__(self, "loss", np.asarray(self.loss, dtype=np.float64))
        object.__setattr__(self, "time_us", np.asarray(self.time_us, dtype=np.float64))
        object.__setattr__(self, "storage_bits", storage.astype(np.int64))
        if self.num_elements <= 0:
            raise ValueError(f"num_elements must be > 0, got {self.num_elements}")
        if not (math.isfinite(self.budget_bits) and self.budget_bits > 0):
            raise ValueError(f"budget_bits must be a positive finite number, got {self.budget_bits}")

    @property
    def num_experts(self) -> int:
        return int(np.asarray(self.loss).shape[0])

    @classmethod
    def from_shapes(
        cls,
        schemes: Sequence[str],
        hidden: int,
        intermediate: int,
        loss: ArrayLike,
        time_us: ArrayLike,
        budget_bits: float,
    ) -> "LayerProblem":
        """Build a problem whose storage costs come exactly from Scheme.storage_bits."""
        loss = np.asarray(loss, dtype=np.float64)
        shapes = unit_shapes(hidden, intermediate)
        per_unit = []
        for unit in UNITS:
            out_features, in_features = shapes[unit]
            row = []
            for name in schemes:
                scheme = parse_scheme(name)
                scheme.check_shape(out_features, in_features, where=unit)
                row.append(scheme.storage_bits(out_features, in_features))
            per_unit.append(row)
        experts = loss.shape[0]
        storage = np.broadcast_to(np.array(per_unit, dtype=np.int64), (experts, len(UNITS), len(schemes)))
        return cls(
            schemes=tuple(schemes),
            loss=loss,
            time_us=np.asarray(time_us, dtype=np.float64),
            storage_bits=storage.copy(),
            num_elements=experts * 3 * hidden * intermediate,
            budget_bits=budget_bits,
        )

    @classmethod
    def from_perf_model(
        cls,
        schemes: Sequence[str],
        hidden: int,
        intermediate: int,
        loss: ArrayLike,
        tokens_per_expert: ArrayLike,
        perf_model: TimeModel,
        budget_bits: float,
    ) -> "LayerProblem":
        """Like from_shapes, with T[e, u, s] predicted at the (expected) tokens each expert sees."""
        tokens = np.asarray(tokens_per_expert, dtype=np.float64)
        shapes = unit_shapes(hidden, intermediate)
        time_us = np.array(
            [
                [[perf_model.time_us(s, *shapes[unit], float(t)) for s in schemes] for unit in UNITS]
                for t in tokens
            ]
        ).reshape(len(tokens), len(UNITS), len(schemes))
        return cls.from_shapes(schemes, hidden, intermediate, loss, time_us, budget_bits)

    def loss_bounds(self) -> tuple[float, float]:
        """(sum of per-block smallest loss, sum of per-block largest loss): the loss normaliser."""
        return float(self.loss.min(axis=2).sum()), float(self.loss.max(axis=2).sum())

    def time_bounds(self) -> tuple[float, float]:
        return float(self.time_us.min(axis=2).sum()), float(self.time_us.max(axis=2).sum())

    def objective(self, loss: float, time_us: float, r: float) -> float:
        """The normalised objective of an allocation with total ``loss`` and ``time_us``."""
        loss_lo, loss_hi = self.loss_bounds()
        time_lo, time_hi = self.time_bounds()
        loss_term = (loss - loss_lo) / _span(loss_lo, loss_hi)
        time_term = (time_us - time_lo) / _span(time_lo, time_hi)
        return r * loss_term + (1 - r) * time_term

    def achievable_avg_bits(self, granularity: Granularity = "block") -> tuple[float, float]:
        """(min, max) average bits any allocation of this layer can reach."""
        groups = _decision_groups(self, granularity)
        lo = sum(int(b.min()) for b in groups.storage)
        hi = sum(int(b.max()) for b in groups.storage)
        return lo / self.num_elements, hi / self.num_elements


@dataclass(frozen=True)
class Allocation:
    """The chosen scheme of every block of one layer, and what it costs."""

    gate_up: tuple[str, ...]  # scheme per expert for the fused gate+up matrix
    down: tuple[str, ...]  # scheme per expert for down
    total_bits: int  # exact, scales and zero points included
    avg_bits: float  # total_bits / weight elements of the layer
    loss: float  # predicted ΣΔ
    time_us: float  # predicted ΣT
    objective: float  # normalised objective at r
    r: float
    granularity: Granularity


@dataclass(frozen=True)
class ParetoPoint:
    """One solve of a Pareto sweep: its r, the allocation's ΣΔ and ΣT, and the allocation."""

    r: float
    loss: float
    time_us: float
    allocation: Allocation


def allocate(problem: LayerProblem, r: float, granularity: Granularity = "block") -> Allocation:
    """Optimal allocation for trade-off ``r`` (1: accuracy only, 0: speed only).

    At r = 1 (0) ties in loss (time) are broken by the other term, so the ends
    of a Pareto sweep are Pareto optimal.
    """
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r must be in [0, 1], got {r}")
    groups = _decision_groups(problem, granularity)
    budget_units, unit = _budget_in_units(problem, groups, granularity)
    loss_lo, loss_hi = problem.loss_bounds()
    time_lo, time_hi = problem.time_bounds()
    loss_c = groups.loss.ravel() / _span(loss_lo, loss_hi)
    time_c = groups.time.ravel() / _span(time_lo, time_hi)

    cost = r * loss_c + (1 - r) * time_c
    if r in (0.0, 1.0):
        # Break ties in the one term by the other, too lightly to trade against it.
        cost = cost + _TIE_BREAK * (time_c if r == 1.0 else loss_c)
    choice = _solve(groups, cost, budget_units, unit)
    return _make_allocation(problem, groups, choice, r, granularity)


def joint_problem(problems: Sequence[LayerProblem]) -> LayerProblem:
    """One problem over the experts of all ``problems`` (layers): the budget then holds
    for their weights together (the model's average), not for each layer.

    Losses are summed across layers as given: scale each layer's Δ first (the
    pipeline's Fisher weights) if the layers' units differ. On the reference
    model the sum of per-block Δ matched the measured output error of a whole
    quantized layer within ±15% (additivity), see benchmarks/RESULTS.md.
    """
    if not problems:
        raise ValueError("joint_problem needs at least one layer problem")
    first = problems[0]
    for p in problems[1:]:
        if p.schemes != first.schemes or p.budget_bits != first.budget_bits:
            raise ValueError("joint_problem: layers must share candidate schemes and budget")
    return LayerProblem(
        schemes=first.schemes,
        loss=np.concatenate([p.loss for p in problems]),
        time_us=np.concatenate([p.time_us for p in problems]),
        storage_bits=np.concatenate([p.storage_bits for p in problems]),
        num_elements=sum(p.num_elements for p in problems),
        budget_bits=first.budget_bits,
    )


def split_allocation(allocation: Allocation, problems: Sequence[LayerProblem]) -> list[Allocation]:
    """The per-layer parts of an allocation of ``joint_problem(problems)``."""
    parts, start = [], 0
    for p in problems:
        stop = start + p.num_experts
        gate_up, down = allocation.gate_up[start:stop], allocation.down[start:stop]
        idx = {name: i for i, name in enumerate(p.schemes)}
        picked = np.array([[idx[g], idx[d]] for g, d in zip(gate_up, down)])
        e_idx = np.arange(p.num_experts)[:, None]
        u_idx = np.arange(len(UNITS))[None, :]
        total_bits = int(p.storage_bits[e_idx, u_idx, picked].sum())
        loss = float(p.loss[e_idx, u_idx, picked].sum())
        time_us = float(p.time_us[e_idx, u_idx, picked].sum())
        parts.append(
            Allocation(
                gate_up=gate_up, down=down, total_bits=total_bits, avg_bits=total_bits / p.num_elements,
                loss=loss, time_us=time_us, objective=allocation.objective, r=allocation.r,
                granularity=allocation.granularity,
            )
        )  # fmt: skip
        start = stop
    return parts


def pareto_front(
    problem: LayerProblem, rs: Sequence[float] = DEFAULT_RS, granularity: Granularity = "block"
) -> list[ParetoPoint]:
    """Solve for each r (ascending); every point is Pareto optimal in (loss, time)."""
    points = []
    for r in sorted(set(float(r) for r in rs)):
        allocation = allocate(problem, r, granularity)
        points.append(ParetoPoint(r, allocation.loss, allocation.time_us, allocation))
    return points


def choose_r_auto(
    problem: LayerProblem, rs: Sequence[float] = DEFAULT_RS, granularity: Granularity = "block"
) -> ParetoPoint:
    """The knee of the Pareto front: the point farthest below the line joining its two ends.

    Both axes are normalised to the front's own extent first, so the knee does
    not depend on units. If one axis does not vary, the best point on the other
    is returned. Ties go to the larger r (the more accurate point). A front whose
    fastest point saves less than ``MIN_TIME_GAIN`` of the slowest point's time
    has nothing worth trading accuracy for: its most accurate point is returned
    (the extent normalisation would otherwise trade many times the loss for a
    fraction of a percent of time, as the roofline predicts for small experts).
    """
    return knee_point(pareto_front(problem, rs, granularity))


# r="auto" trades accuracy for speed only if the front spans at least this share of time.
MIN_TIME_GAIN = 0.02


def knee_point(points: Sequence[ParetoPoint], min_time_gain: float = MIN_TIME_GAIN) -> ParetoPoint:
    """The knee of given front points (see choose_r_auto)."""
    if not points:
        raise ValueError("knee_point needs at least one point")
    losses = np.array([p.loss for p in points])
    times = np.array([p.time_us for p in points])
    loss_span, time_span = np.ptp(losses), np.ptp(times)
    if time_span <= min_time_gain * times.max():
        time_span = 0.0  # no speed worth trading for: the most accurate point
    if loss_span == 0 or time_span == 0:
        key = times if loss_span == 0 else losses
        candidates = np.flatnonzero(key == key.min())
        return max((points[i] for i in candidates), key=lambda p: p.r)
    loss_n = (losses - losses.min()) / loss_span
    time_n = (times - times.min()) / time_span
    # The ends of a front are (0, 1) and (1, 0) after normalising; distance below
    # the line x + y = 1 is proportional to 1 - x - y.
    below = 1.0 - loss_n - time_n
    best = below.max()
    candidates = np.flatnonzero(below >= best - 1e-12)
    return max((points[i] for i in candidates), key=lambda p: p.r)


# ---------------------------------------------------------------------------
# Internals


@dataclass(frozen=True)
class _Groups:
    """Decision groups: each picks exactly one scheme. Arrays are [groups, schemes]."""

    loss: np.ndarray
    time: np.ndarray
    storage: np.ndarray  # int64
    # unit_of[e, u] = the group deciding expert e's unit u
    unit_of: np.ndarray


def _decision_groups(problem: LayerProblem, granularity: Granularity) -> _Groups:
    experts, units, _ = problem.loss.shape
    if granularity == "block":
        return _Groups(
            loss=problem.loss.reshape(experts * units, -1),
            time=problem.time_us.reshape(experts * units, -1),
            storage=problem.storage_bits.reshape(experts * units, -1),
            unit_of=np.arange(experts * units).reshape(experts, units),
        )
    if granularity == "expert":
        # the paper's expert-level ablation: one scheme for all blocks of an expert
        return _Groups(
            loss=problem.loss.sum(axis=1),
            time=problem.time_us.sum(axis=1),
            storage=problem.storage_bits.sum(axis=1),
            unit_of=np.repeat(np.arange(experts)[:, None], units, axis=1),
        )
    raise ValueError(f"granularity must be 'block' or 'expert', got {granularity!r}")


def _span(lo: float, hi: float) -> float:
    return hi - lo if hi > lo else 1.0


def _budget_in_units(problem: LayerProblem, groups: _Groups, granularity: Granularity) -> tuple[int, int]:
    """The budget as an integer count of ``unit`` bits, where every storage cost is a multiple of unit.

    Working in whole units keeps the solver's float tolerance (far below one
    unit) from ever admitting an allocation over the exact budget.
    """
    max_bits = Fraction(problem.budget_bits) * problem.num_elements  # exact value of the float
    unit = math.gcd(*(int(b) for b in np.unique(groups.storage)))
    budget_units = math.floor(max_bits / unit)
    if budget_units * unit < sum(int(b.min()) for b in groups.storage):
        lo_avg, hi_avg = problem.achievable_avg_bits(granularity)
        raise ValueError(
            f"budget of {problem.budget_bits} bits per weight is infeasible for this layer: "
            f"achievable average bits range from {lo_avg:.6g} (min) to {hi_avg:.6g} (max) "
            f"with schemes {', '.join(problem.schemes)}"
        )
    return budget_units, unit


def _solve(groups: _Groups, cost: np.ndarray, budget_units: int, unit: int) -> np.ndarray:
    """Minimise cost·x over one-hot rows within the budget; returns the scheme index per group."""
    num_groups, num_schemes = groups.loss.shape
    num_vars = num_groups * num_schemes
    one_per_group = csr_array(
        (np.ones(num_vars), (np.repeat(np.arange(num_groups), num_schemes), np.arange(num_vars))),
        shape=(num_groups, num_vars),
    )
    constraints = [
        LinearConstraint(one_per_group, 1, 1),
        LinearConstraint((groups.storage.ravel() // unit)[None, :].astype(np.float64), -np.inf, budget_units),
    ]
    result = milp(
        c=cost * _OBJECTIVE_SCALE,
        integrality=np.ones(num_vars),
        bounds=Bounds(0, 1),
        constraints=constraints,
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise RuntimeError(f"HiGHS found no allocation although the budget is feasible: {result.message}")
    return np.round(result.x).reshape(num_groups, num_schemes).argmax(axis=1)


def _make_allocation(
    problem: LayerProblem, groups: _Groups, choice: np.ndarray, r: float, granularity: Granularity
) -> Allocation:
    experts, units = groups.unit_of.shape
    picked = choice[groups.unit_of]  # [experts, units] scheme index
    e_idx, u_idx = np.meshgrid(np.arange(experts), np.arange(units), indexing="ij")
    total_bits = sum(int(b) for b in problem.storage_bits[e_idx, u_idx, picked].ravel())
    if Fraction(total_bits) > Fraction(problem.budget_bits) * problem.num_elements:
        # cannot happen unless HiGHS breaks its own tolerance by a whole budget unit
        raise RuntimeError(
            f"internal error: HiGHS returned an allocation of {total_bits} bits, over the budget of "
            f"{problem.budget_bits} bits x {problem.num_elements} weights"
        )
    loss = float(problem.loss[e_idx, u_idx, picked].sum())
    time_us = float(problem.time_us[e_idx, u_idx, picked].sum())
    names = np.array(problem.schemes, dtype=object)[picked]
    return Allocation(
        gate_up=tuple(names[:, 0]),
        down=tuple(names[:, 1]),
        total_bits=total_bits,
        avg_bits=total_bits / problem.num_elements,
        loss=loss,
        time_us=time_us,
        objective=problem.objective(loss, time_us, r),
        r=r,
        granularity=granularity,
    )
