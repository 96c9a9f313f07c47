"""Properties of the bit-budget planner: within budget always, optimal where the relaxation is tight."""

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unweight.errors import UnweightError
from unweight.quant.planner import (
    MatrixOptions,
    Option,
    evaluate,
    lower_hull,
    plan,
    uniform_allocation,
)

BITS = [1.0, 2.0, 2.125, 3.0, 3.0625, 4.0, 4.25, 5.5, 8.0, 16.0]


@st.composite
def instances(draw, max_matrices=6, max_options=5):
    n = draw(st.integers(1, max_matrices))
    matrices = []
    for i in range(n):
        k = draw(st.integers(1, max_options))
        bits = draw(st.lists(st.sampled_from(BITS), min_size=k, max_size=k))
        loss = draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=k, max_size=k))
        numel = draw(st.integers(1, 10**7))
        options = tuple(Option(b, l, f"o{j}") for j, (b, l) in enumerate(zip(bits, loss)))
        matrices.append(MatrixOptions(f"m{i}", numel, options))
    cheapest = [min(range(len(m.options)), key=lambda j: m.options[j].bits) for m in matrices]
    low = exact_bits(matrices, cheapest)
    low_float = float(low)
    if Fraction(low_float) < low:  # rounding put it below the cheapest allocation
        low_float = math.nextafter(low_float, math.inf)
    high = max(o.bits for m in matrices for o in m.options)
    t = draw(st.floats(0, 1))
    return matrices, low_float + t * max(0.0, high - low_float)


def exact_bits(matrices, choice) -> Fraction:
    total = sum(Fraction(m.numel) * Fraction(m.options[j].bits) for m, j in zip(matrices, choice))
    return total / sum(m.numel for m in matrices)


def brute_force(matrices, budget):
    """The true optimum by enumeration, or None when nothing fits."""
    best = None
    for choice in itertools.product(*(range(len(m.options)) for m in matrices)):
        if exact_bits(matrices, choice) <= Fraction(budget):
            loss = math.fsum(m.options[j].loss for m, j in zip(matrices, choice))
            best = loss if best is None else min(best, loss)
    return best


@settings(max_examples=300, deadline=None)
@given(instances())
def test_plan_never_exceeds_the_budget(instance):
    matrices, budget = instance
    allocation = plan(matrices, budget)
    assert exact_bits(matrices, allocation.choice) <= Fraction(budget)
    assert allocation.bits_per_weight <= budget
    assert allocation.lower_bound <= allocation.total_loss + 1e-12
    assert allocation == evaluate(matrices, allocation.choice, budget, allocation.lower_bound)


@settings(max_examples=300, deadline=None)
@given(instances(max_matrices=4, max_options=4))
def test_plan_is_bracketed_by_the_bound_and_exact_when_tight(instance):
    """lower_bound <= optimum <= plan; plan == optimum when the relaxation is tight (gap 0).

    The greedy is not exact in general (a multiple-choice knapsack is NP-hard): the gap reports how
    far from the optimum it may be."""
    matrices, budget = instance
    allocation = plan(matrices, budget)
    optimum = brute_force(matrices, budget)
    tolerance = 1e-9 * max(1.0, abs(optimum))
    assert allocation.lower_bound <= optimum + tolerance
    assert optimum <= allocation.total_loss + tolerance
    if allocation.proven_optimal:
        assert allocation.total_loss == pytest.approx(optimum, abs=tolerance)


def test_plan_is_exact_on_hull_breakpoints():
    """Convex option sets, budgets on every breakpoint of the greedy path: the optimum, proven.

    Parameter counts are powers of two so that every breakpoint is an exact float budget."""
    matrices = [
        MatrixOptions("a", 1024, (Option(2, 8.0), Option(3, 4.0), Option(4, 2.0), Option(8, 1.0))),
        MatrixOptions("b", 2048, (Option(2, 3.0), Option(3, 1.0), Option(4, 0.6), Option(8, 0.0))),
        MatrixOptions("c", 1024, (Option(2, 20.0), Option(3, 5.0), Option(4, 1.5), Option(8, 0.3))),
    ]
    steps = []  # (loss decrease per bit, matrix): every option here is on its hull
    for i, m in enumerate(matrices):
        for lo, hi in zip(m.options, m.options[1:]):
            steps.append(((lo.loss - hi.loss) / (m.numel * (hi.bits - lo.bits)), i))
    choice = [0, 0, 0]
    for _, i in sorted(steps, reverse=True):
        choice[i] += 1
        budget = float(exact_bits(matrices, choice))
        assert Fraction(budget) == exact_bits(matrices, choice)
        allocation = plan(matrices, budget)
        assert allocation.proven_optimal
        assert list(allocation.choice) == choice
        assert allocation.total_loss == pytest.approx(brute_force(matrices, budget))


def synthetic_profile():
    """30 layers x 7 matrices; loss falls 4x per extra bit (6 dB), a few matrices 100x more sensitive."""
    shapes = {"q": 576 * 576, "k": 192 * 576, "v": 192 * 576, "o": 576 * 576,
              "gate": 1536 * 576, "up": 1536 * 576, "down": 576 * 1536}
    matrices = []
    for layer in range(30):
        for kind, numel in shapes.items():
            sensitivity = 1.0
            if kind == "down" and layer in (1, 2):
                sensitivity = 100.0  # the super-weight layers
            elif kind in ("v", "o"):
                sensitivity = 5.0
            elif layer >= 25:
                sensitivity = 0.1
            options = tuple(
                Option(bits + 0.0625, sensitivity * numel * 1e-6 * 2.0 ** (-2 * bits), f"{bits}b")
                for bits in (2, 3, 4, 6, 8)
            )
            matrices.append(MatrixOptions(f"layers.{layer}.{kind}", numel, options))
    return matrices


@pytest.mark.parametrize("budget", [3.0625, 4.0625, 5.0])
def test_plan_beats_uniform_when_sensitivity_varies(budget):
    matrices = synthetic_profile()
    uniform = uniform_allocation(matrices, budget)
    planned = plan(matrices, budget)
    assert planned.bits_per_weight <= budget and uniform.bits_per_weight <= budget
    assert planned.total_loss < 0.8 * uniform.total_loss
    assert planned.gap <= 0.05 * planned.total_loss  # within 5% of the optimum
    chosen = planned.by_name()
    assert chosen["layers.1.down"].bits > chosen["layers.27.down"].bits


def test_plan_equals_uniform_when_every_matrix_is_alike():
    options = (Option(2.0, 4.0), Option(3.0, 1.0), Option(4.0, 0.25))
    matrices = [MatrixOptions(f"m{i}", 100, options) for i in range(5)]
    assert plan(matrices, 3.0).choice == uniform_allocation(matrices, 3.0).choice == (1,) * 5


def test_lower_hull_drops_dominated_and_concave_points():
    options = [
        Option(4.0, 1.0),
        Option(2.0, 5.0),
        Option(3.0, 4.5),  # above the segment 2 -> 4
        Option(5.0, 1.0),  # dominated: more bits, same loss
        Option(2.0, 6.0),  # same bits, higher loss
        Option(8.0, 0.0),
        Option(6.0, 0.5),  # collinear with 4 -> 8: kept
    ]
    assert lower_hull(options) == [1, 0, 6, 5]


def test_plan_rejects_impossible_budgets_and_bad_input():
    matrices = [MatrixOptions("m", 10, (Option(2.0, 1.0), Option(4.0, 0.0)))]
    with pytest.raises(UnweightError, match="below the cheapest"):
        plan(matrices, 1.5)
    with pytest.raises(UnweightError, match="no option within"):
        uniform_allocation(matrices, 1.5)
    with pytest.raises(UnweightError):
        plan([MatrixOptions("m", 0, (Option(2.0, 1.0),))], 3.0)
    with pytest.raises(UnweightError):
        plan([MatrixOptions("m", 5, ())], 3.0)
