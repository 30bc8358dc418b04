"""ILP allocator: exact optimality against brute force, exact budget, errors, Pareto/knee."""

from __future__ import annotations

import itertools
import time
from fractions import Fraction

import numpy as np
import pytest

from offline.ilp import (
    Allocation,
    LayerProblem,
    ParetoPoint,
    allocate,
    choose_r_auto,
    joint_problem,
    knee_point,
    pareto_front,
    split_allocation,
)
from offline.perf_model import PerfModel
from vllm_mxmoe.schemes import parse_scheme

HIDDEN, INTER = 256, 128  # gate_up [256, 256], down [256, 128]
SCHEMES = ("w2g128", "w4g128", "w8")
EXPERTS = 3


def random_problem(seed: int, budget_bits: float, schemes=SCHEMES, experts=EXPERTS) -> LayerProblem:
    rng = np.random.default_rng(seed)
    bits = np.array([parse_scheme(s).bits for s in schemes], dtype=float)
    # loss falls with bits, time rises with bits, both with per-block noise
    shape = (experts, 2, len(schemes))
    loss = rng.gamma(2.0, 1.0, (experts, 2, 1)) * 2.0**-bits * rng.uniform(0.5, 1.5, shape)
    time_us = rng.uniform(1, 3, (experts, 2, 1)) * (1 + bits / 8) * rng.uniform(0.7, 1.3, shape)
    return LayerProblem.from_shapes(schemes, HIDDEN, INTER, loss, time_us, budget_bits)


def exact_bits(gate_up: tuple[str, ...], down: tuple[str, ...]) -> int:
    """Storage of an allocation recomputed from the scheme table alone."""
    return sum(parse_scheme(s).storage_bits(2 * INTER, HIDDEN) for s in gate_up) + sum(
        parse_scheme(s).storage_bits(HIDDEN, INTER) for s in down
    )


def normalised_objective(problem: LayerProblem, picked: np.ndarray, r: float) -> float:
    """Objective of an allocation given as [experts, 2] scheme indices, computed independently."""
    e, u = np.meshgrid(np.arange(picked.shape[0]), np.arange(2), indexing="ij")
    loss = problem.loss[e, u, picked].sum()
    time_us = problem.time_us[e, u, picked].sum()
    loss_lo, loss_hi = problem.loss.min(axis=2).sum(), problem.loss.max(axis=2).sum()
    time_lo, time_hi = problem.time_us.min(axis=2).sum(), problem.time_us.max(axis=2).sum()
    return r * (loss - loss_lo) / (loss_hi - loss_lo) + (1 - r) * (time_us - time_lo) / (time_hi - time_lo)


def brute_force(problem: LayerProblem, r: float, granularity: str):
    """All feasible allocations: (objective, loss, time, picked) of the best, plus the feasible list."""
    experts, _, num_schemes = problem.loss.shape
    budget = Fraction(problem.budget_bits) * problem.num_elements
    feasible = []
    if granularity == "block":
        choices = itertools.product(range(num_schemes), repeat=2 * experts)
        shaped = (np.array(c).reshape(experts, 2) for c in choices)
    else:
        choices = itertools.product(range(num_schemes), repeat=experts)
        shaped = (np.repeat(np.array(c)[:, None], 2, axis=1) for c in choices)
    e, u = np.meshgrid(np.arange(experts), np.arange(2), indexing="ij")
    for picked in shaped:
        if int(problem.storage_bits[e, u, picked].sum()) <= budget:
            feasible.append(
                (
                    normalised_objective(problem, picked, r),
                    problem.loss[e, u, picked].sum(),
                    problem.time_us[e, u, picked].sum(),
                    picked,
                )
            )
    return feasible


def picked_indices(problem: LayerProblem, allocation: Allocation) -> np.ndarray:
    index = {name: i for i, name in enumerate(problem.schemes)}
    return np.array([[index[g], index[d]] for g, d in zip(allocation.gate_up, allocation.down)])


def assert_within_budget_exactly(problem: LayerProblem, allocation: Allocation) -> None:
    bits = exact_bits(allocation.gate_up, allocation.down)
    assert allocation.total_bits == bits
    assert Fraction(bits) <= Fraction(problem.budget_bits) * problem.num_elements
    assert allocation.avg_bits == bits / (EXPERTS * 3 * HIDDEN * INTER)


@pytest.mark.parametrize("granularity", ["block", "expert"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed: int, granularity: str) -> None:
    for budget in (2.6, 3.7, 5.0):
        problem = random_problem(seed, budget)
        for r in (0.0, 0.3, 0.5, 0.8, 1.0):
            allocation = allocate(problem, r, granularity)
            best = min(f[0] for f in brute_force(problem, r, granularity))
            got = normalised_objective(problem, picked_indices(problem, allocation), r)
            assert got == pytest.approx(best, rel=1e-9, abs=1e-12), (seed, budget, r)
            assert allocation.objective == pytest.approx(got, rel=1e-12, abs=1e-15)
            assert_within_budget_exactly(problem, allocation)
            if granularity == "expert":
                assert allocation.gate_up == allocation.down


def test_matches_brute_force_with_arbitrary_storage_costs() -> None:
    # Costs with no common factor: the budget must still hold to the bit.
    rng = np.random.default_rng(7)
    for trial in range(6):
        storage = rng.integers(1000, 5000, (3, 2, 3))
        elements = 1000
        budget = float(rng.uniform(storage.min(axis=2).sum(), storage.max(axis=2).sum()) / elements)
        problem = LayerProblem(
            schemes=SCHEMES,
            loss=rng.random((3, 2, 3)),
            time_us=rng.random((3, 2, 3)),
            storage_bits=storage,
            num_elements=elements,
            budget_bits=budget,
        )
        for r in (0.0, 0.4, 1.0):
            allocation = allocate(problem, r)
            feasible = brute_force(problem, r, "block")
            best = min(f[0] for f in feasible)
            got = normalised_objective(problem, picked_indices(problem, allocation), r)
            assert got == pytest.approx(best, rel=1e-9, abs=1e-12), (trial, r)
            assert allocation.total_bits <= Fraction(budget) * elements


def test_budget_is_met_exactly_as_counted() -> None:
    # 4.25 bits is exactly "w4g128 everywhere"; a loss that strongly prefers more
    # bits makes the optimum spend the budget to the last bit.
    problem = random_problem(0, 4.25)
    loss = np.broadcast_to(np.array([100.0, 10.0, 1.0]), problem.loss.shape)
    problem = LayerProblem.from_shapes(SCHEMES, HIDDEN, INTER, loss, problem.time_us, 4.25)
    allocation = allocate(problem, 1.0)
    assert_within_budget_exactly(problem, allocation)
    assert allocation.total_bits == pytest.approx(4.25 * problem.num_elements, abs=0)
    assert allocation.avg_bits == 4.25


def test_budget_at_the_minimum_is_feasible_and_below_raises() -> None:
    problem = random_problem(1, 2.25)  # w2g128 everywhere: 2 + 32/128 bits
    allocation = allocate(problem, 0.5)
    assert set(allocation.gate_up) | set(allocation.down) == {"w2g128"}
    assert allocation.avg_bits == 2.25

    elements = EXPERTS * 3 * HIDDEN * INTER
    max_bits = exact_bits(("w8",) * EXPERTS, ("w8",) * EXPERTS) / elements
    for granularity in ("block", "expert"):
        with pytest.raises(ValueError) as info:
            allocate(random_problem(1, 2.2), 0.5, granularity)
        message = str(info.value)
        assert "budget of 2.2 bits" in message
        assert "2.25 (min)" in message
        assert f"{max_bits:.6g} (max)" in message


def test_r1_is_loss_optimal_and_r0_is_time_optimal() -> None:
    for seed in range(3):
        problem = random_problem(seed, 3.5)
        feasible = brute_force(problem, 0.5, "block")
        best_loss = min(f[1] for f in feasible)
        best_time = min(f[2] for f in feasible)
        accurate = allocate(problem, 1.0)
        fast = allocate(problem, 0.0)
        assert accurate.loss == pytest.approx(best_loss, rel=1e-12)
        assert fast.time_us == pytest.approx(best_time, rel=1e-12)
        # ties in the primary term are broken by the other: each end is Pareto optimal
        tied_on_loss = [f[2] for f in feasible if f[1] <= best_loss * (1 + 1e-12)]
        tied_on_time = [f[1] for f in feasible if f[2] <= best_time * (1 + 1e-12)]
        assert accurate.time_us == pytest.approx(min(tied_on_loss))
        assert fast.loss == pytest.approx(min(tied_on_time))
        assert accurate.loss < fast.loss and fast.time_us < accurate.time_us


def test_ends_break_ties_by_the_other_term() -> None:
    # Unrouted experts: zero loss whatever the scheme, so only time can decide at
    # r=1; the fastest scheme differs per block (and is rarely the first).
    rng = np.random.default_rng(2)
    time_us = np.array([rng.permutation([3.0, 2.0, 1.0]) for _ in range(EXPERTS * 2)]).reshape(EXPERTS, 2, 3)
    problem = LayerProblem.from_shapes(SCHEMES, HIDDEN, INTER, np.zeros_like(time_us), time_us, 8.5)
    assert allocate(problem, 1.0).time_us == pytest.approx(EXPERTS * 2 * 1.0)
    # and symmetrically at r=0 with equal times
    loss = time_us
    problem = LayerProblem.from_shapes(SCHEMES, HIDDEN, INTER, loss, np.ones_like(loss), 8.5)
    assert allocate(problem, 0.0).loss == pytest.approx(EXPERTS * 2 * 1.0)


def test_budget_between_achievable_totals_rounds_down() -> None:
    # Every total is a multiple of 100 bits; a budget of 2950 bits must not admit 3000.
    storage = np.broadcast_to(np.array([400, 500, 600]), (3, 2, 3)).copy()
    loss = np.broadcast_to(np.array([3.0, 2.0, 1.0]), (3, 2, 3)).copy()
    problem = LayerProblem(SCHEMES, loss, np.ones_like(loss), storage, num_elements=1000, budget_bits=2.95)
    allocation = allocate(problem, 1.0)
    assert allocation.total_bits == 2900
    assert allocation.loss == pytest.approx(6 * 3.0 - 5)  # 500 bits above the all-400 floor, -1 per 100


def test_invalid_inputs_raise() -> None:
    problem = random_problem(0, 3.0)
    with pytest.raises(ValueError, match="r must be in"):
        allocate(problem, 1.5)
    with pytest.raises(ValueError, match="granularity"):
        allocate(problem, 0.5, "layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss has shape"):
        LayerProblem.from_shapes(SCHEMES, HIDDEN, INTER, np.ones((3, 2, 2)), np.ones((3, 2, 3)), 3.0)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        LayerProblem.from_shapes(SCHEMES, HIDDEN, INTER, -np.ones((3, 2, 3)), np.ones((3, 2, 3)), 3.0)
    with pytest.raises(ValueError, match="group size 128 does not divide"):
        LayerProblem.from_shapes(SCHEMES, HIDDEN, 96, np.ones((3, 2, 3)), np.ones((3, 2, 3)), 3.0)


def test_pareto_front_trades_loss_for_time() -> None:
    problem = random_problem(3, 3.5, experts=4)
    front = pareto_front(problem, rs=[1.0, 0.0, 0.25, 0.5, 0.75, 0.5])
    assert [p.r for p in front] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # more weight on accuracy never raises loss nor lowers time
    for a, b in zip(front, front[1:]):
        assert b.loss <= a.loss + 1e-12
        assert b.time_us >= a.time_us - 1e-12
    assert front[0].loss > front[-1].loss


def test_choose_r_auto_is_deterministic_and_on_the_front() -> None:
    problem = random_problem(4, 3.5, experts=4)
    rs = [i / 10 for i in range(11)]
    knee = choose_r_auto(problem, rs)
    assert knee == choose_r_auto(problem, rs)
    front = pareto_front(problem, rs)
    assert knee in front
    # the knee is no worse than either end on the sum of normalised axes
    losses = np.array([p.loss for p in front])
    times = np.array([p.time_us for p in front])
    score = (losses - losses.min()) / np.ptp(losses) + (times - times.min()) / np.ptp(times)
    assert score[front.index(knee)] == pytest.approx(score.min())
    assert score.min() < 1.0  # a real knee lies below the line between the ends


def _point(r: float, loss: float, time_us: float) -> ParetoPoint:
    return ParetoPoint(r, loss, time_us, allocation=None)  # type: ignore[arg-type]


def test_knee_point_on_hand_made_fronts() -> None:
    front = [_point(0.0, 10.0, 1.0), _point(0.5, 2.0, 2.0), _point(0.7, 1.5, 6.0), _point(1.0, 1.0, 10.0)]
    assert knee_point(front).r == 0.5
    flat_loss = [_point(0.0, 1.0, 3.0), _point(0.5, 1.0, 2.0), _point(1.0, 1.0, 2.0)]
    assert knee_point(flat_loss).r == 1.0  # best time; ties go to the more accurate r
    with pytest.raises(ValueError):
        knee_point([])


def test_knee_point_does_not_trade_accuracy_for_negligible_time() -> None:
    # the same shape as above, but the whole front saves only 1% of the time:
    # nothing worth trading for, so the most accurate point
    front = [
        _point(0.0, 10.0, 100.0),
        _point(0.5, 2.0, 100.2),
        _point(0.7, 1.5, 100.6),
        _point(1.0, 1.0, 101.0),
    ]
    assert knee_point(front).r == 1.0
    assert knee_point(front, min_time_gain=0.0).r == 0.5  # the plain knee
    # 10% of the time is worth it: the knee as before
    wide = [
        _point(0.0, 10.0, 100.0),
        _point(0.5, 2.0, 102.0),
        _point(0.7, 1.5, 106.0),
        _point(1.0, 1.0, 110.0),
    ]
    assert knee_point(wide).r == 0.5


def test_realistic_layer_solves_fast() -> None:
    # 60 experts x 2 units x 6 schemes, times from the perf model at skewed loads
    schemes = ("w2g128", "w3g128", "w4g128", "w8", "w8a8fp8", "w4a8fp8")
    rng = np.random.default_rng(0)
    bits = np.array([parse_scheme(s).bits_per_weight(1408) for s in schemes])
    loss = rng.gamma(1.0, 1.0, (60, 2, 1)) * np.exp(-1.2 * bits) * rng.uniform(0.8, 1.2, (60, 2, 6))
    tokens = rng.zipf(1.5, 60).astype(float) * 4
    problem = LayerProblem.from_perf_model(schemes, 2048, 1408, loss, tokens, PerfModel(), 3.25)
    start = time.perf_counter()
    allocation = allocate(problem, 0.5)
    elapsed = time.perf_counter() - start
    assert allocation.avg_bits <= 3.25
    assert len(allocation.gate_up) == 60
    assert elapsed < 1.0, f"60x2x6 layer took {elapsed:.2f} s"


# ---------------------------------------------------------------------------
# Model-wide budget (joint problem over layers)


def test_joint_problem_matches_brute_force_and_never_loses_to_per_layer_budgets() -> None:
    """Two layers of 2 experts: the joint ILP is the brute-force optimum over both layers
    under the model-wide budget, which can be spent unevenly, and its ΣΔ is at most
    the sum of the per-layer optima (their allocations are feasible for it)."""
    rng = np.random.default_rng(3)
    uneven = 0
    for trial in range(6):
        budget = float(rng.uniform(2.6, 4.5))
        layers = [random_problem(10 * trial + i, budget, experts=2) for i in range(2)]
        layers[1] = LayerProblem.from_shapes(  # a much more sensitive second layer
            SCHEMES, HIDDEN, INTER, layers[1].loss * rng.uniform(1, 20), layers[1].time_us, budget
        )
        joint = joint_problem(layers)
        assert joint.num_experts == 4 and joint.num_elements == sum(p.num_elements for p in layers)
        allocation = allocate(joint, 1.0)
        best = min(f[1] for f in brute_force(joint, 1.0, "block"))
        assert allocation.loss == pytest.approx(best, rel=1e-9)
        assert Fraction(allocation.total_bits) <= Fraction(budget) * joint.num_elements
        per_layer = sum(allocate(p, 1.0).loss for p in layers)
        assert allocation.loss <= per_layer * (1 + 1e-12)
        parts = split_allocation(allocation, layers)
        assert sum(p.total_bits for p in parts) == allocation.total_bits
        assert sum(p.loss for p in parts) == pytest.approx(allocation.loss, rel=1e-12)
        assert parts[0].gate_up + parts[1].gate_up == allocation.gate_up
        uneven += any(p.avg_bits > budget for p in parts)
    assert uneven  # some budget moved between layers


def test_joint_problem_rejects_mismatched_layers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        joint_problem([])
    with pytest.raises(ValueError, match="share"):
        joint_problem([random_problem(0, 3.0), random_problem(1, 3.5)])
