"""Bit-budget planner: one option (bit width, codebook size...) per matrix under a bits-per-weight budget.

Each matrix i has numel_i weights and a few options j, each with a cost b_ij in bits per weight (every
index, codebook and scale included) and an expected loss increase l_ij, measured alone. Assuming the
increases add up (as HAWQ-V2/V3 and most mixed-precision planners do), the plan solves the
multiple-choice knapsack

    minimise sum_i l_i,j(i)   subject to   sum_i numel_i * b_i,j(i) <= budget * sum_i numel_i.

Method (the Lagrangian relaxation of Everett 1963, walked greedily as in rate-distortion bit
allocation, Shoham & Gersho 1988):

1. Per matrix, keep the lower convex hull of its (bits, loss) points: a point above the hull is
   never the best choice for any price per bit lambda.
2. Start every matrix at its cheapest option; take hull upgrades in order of loss decrease per bit
   spent, as long as they fit. An upgrade that does not fit ends that matrix's climb; cheaper
   upgrades of other matrices may still fit.
3. Spend what is left on any single option switch (hull or not) that fits and lowers the loss,
   best first, until none does.

Up to the first upgrade that does not fit, the greedy order is the solution of the linear relaxation;
taking that upgrade fractionally gives ``lower_bound``, a bound on the loss of *every* allocation within
the budget. The result is proven optimal when its loss reaches that bound (``gap == 0``), for example
when the budget falls on a hull breakpoint or is large enough for every matrix's best option;
otherwise the optimum lies in [lower_bound, total_loss]. Budgets are checked in exact rational
arithmetic, so an allocation never exceeds its budget by rounding.
"""

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

from unweight.errors import UnweightError

# Relative tolerance under which the loss gap to the lower bound counts as zero.
OPTIMALITY_RTOL = 1e-12


@dataclass(frozen=True)
class Option:
    """One way to store a matrix: its cost in bits per weight and its expected loss increase."""

    bits: float
    loss: float
    label: str = ""


@dataclass(frozen=True)
class MatrixOptions:
    """The options for one matrix."""

    name: str
    numel: int
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Allocation:
    """The chosen option index for every matrix, in the order the matrices were given."""

    names: tuple[str, ...]
    choice: tuple[int, ...]
    chosen: tuple[Option, ...]
    bits_per_weight: float  # sum(numel * bits) / sum(numel), correctly rounded
    total_loss: float  # sum of the chosen options' losses
    budget: float | None
    lower_bound: float | None = None  # no allocation within the budget has a lower loss

    @property
    def gap(self) -> float | None:
        """total_loss - lower_bound: how far from optimal the allocation can be at most."""
        return None if self.lower_bound is None else self.total_loss - self.lower_bound

    @property
    def proven_optimal(self) -> bool:
        gap = self.gap
        return gap is not None and gap <= OPTIMALITY_RTOL * max(1.0, abs(self.total_loss))

    def by_name(self) -> dict[str, Option]:
        return dict(zip(self.names, self.chosen))


def _validate(matrices: Sequence[MatrixOptions]) -> None:
    if not matrices:
        raise UnweightError("the planner needs at least one matrix")
    for m in matrices:
        if m.numel <= 0:
            raise UnweightError(f"matrix {m.name!r}: numel must be positive, got {m.numel}")
        if not m.options:
            raise UnweightError(f"matrix {m.name!r}: no options to choose from")
        for o in m.options:
            if not (math.isfinite(o.bits) and math.isfinite(o.loss)) or o.bits < 0:
                raise UnweightError(f"matrix {m.name!r}: option {o} must have finite bits >= 0 and loss")


def evaluate(
    matrices: Sequence[MatrixOptions],
    choice: Sequence[int],
    budget: float | None = None,
    lower_bound: float | None = None,
) -> Allocation:
    """The Allocation for an explicit choice of option indices (no budget check)."""
    _validate(matrices)
    if len(choice) != len(matrices):
        raise ValueError(f"{len(choice)} choices for {len(matrices)} matrices")
    chosen = tuple(m.options[j] for m, j in zip(matrices, choice))
    total_bits = sum(Fraction(m.numel) * Fraction(o.bits) for m, o in zip(matrices, chosen))
    numel = sum(m.numel for m in matrices)
    return Allocation(
        names=tuple(m.name for m in matrices),
        choice=tuple(int(j) for j in choice),
        chosen=chosen,
        bits_per_weight=float(total_bits / numel),
        total_loss=math.fsum(o.loss for o in chosen),
        budget=budget,
        lower_bound=lower_bound,
    )


def lower_hull(options: Sequence[Option]) -> list[int]:
    """Indices of the lower convex hull of (bits, loss), by increasing bits and decreasing loss.

    Dominated options (no cheaper, at no lower loss) are dropped, then points strictly above the
    segment joining their neighbours. Collinear points are kept: they give the greedy finer steps at
    the same price per bit. Ties in bits keep the lowest loss (then the first index)."""
    order = sorted(range(len(options)), key=lambda j: (options[j].bits, options[j].loss, j))
    front: list[int] = []
    for j in order:
        if front and options[j].loss >= options[front[-1]].loss:
            continue  # dominated: costs at least as much, loses at least as much
        front.append(j)
    hull: list[int] = []
    for j in front:
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            c = options[j]
            # b lies strictly above segment a-c when the gain per bit of a->b is below that of b->c.
            gain_ab = Fraction(a.loss) - Fraction(b.loss)
            gain_bc = Fraction(b.loss) - Fraction(c.loss)
            if gain_ab * (Fraction(c.bits) - Fraction(b.bits)) < gain_bc * (
                Fraction(b.bits) - Fraction(a.bits)
            ):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def plan(matrices: Sequence[MatrixOptions], budget: float) -> Allocation:
    """Minimise the total loss with average bits per weight <= ``budget`` (see the module docstring).

    Raises UnweightError when even the cheapest option of every matrix exceeds the budget."""
    _validate(matrices)
    numel = [Fraction(m.numel) for m in matrices]
    capacity = Fraction(budget) * sum(numel)
    hulls = [lower_hull(m.options) for m in matrices]
    position = [0] * len(matrices)  # index into each hull
    choice = [hull[0] for hull in hulls]
    used = sum(n * Fraction(m.options[j].bits) for n, m, j in zip(numel, matrices, choice))
    if used > capacity:
        cheapest = float(used / sum(numel))
        raise UnweightError(
            f"budget {budget} bits per weight is below the cheapest allocation ({cheapest:.4f})"
        )
    loss = math.fsum(m.options[j].loss for m, j in zip(matrices, choice))

    def step(i: int) -> tuple[Fraction, float, float] | None:
        """(cost in bits, loss decrease, decrease per bit) of matrix i's next hull upgrade."""
        if position[i] + 1 >= len(hulls[i]):
            return None
        here, there = matrices[i].options[choice[i]], matrices[i].options[hulls[i][position[i] + 1]]
        cost = numel[i] * (Fraction(there.bits) - Fraction(here.bits))
        gain = here.loss - there.loss
        return cost, gain, gain / float(cost)

    heap = []
    for i in range(len(matrices)):
        if (s := step(i)) is not None:
            heapq.heappush(heap, (-s[2], i))
    lower_bound = None
    while heap:
        _, i = heapq.heappop(heap)
        cost, gain, rate = step(i)
        if cost > capacity - used:
            if lower_bound is None:  # first upgrade that does not fit: the LP relaxation's optimum
                lower_bound = loss - rate * float(capacity - used)
            continue
        used += cost
        loss -= gain
        position[i] += 1
        choice[i] = hulls[i][position[i]]
        if (s := step(i)) is not None:
            heapq.heappush(heap, (-s[2], i))

    _fill(matrices, numel, choice, capacity - used)
    result = evaluate(matrices, choice, budget)
    bound = result.total_loss if lower_bound is None else min(lower_bound, result.total_loss)
    return replace(result, lower_bound=bound)


def _fill(
    matrices: Sequence[MatrixOptions], numel: Sequence[Fraction], choice: list[int], left: Fraction
) -> None:
    """Spend ``left`` bits on the best single-option switches that fit, until none lowers the loss."""
    while True:
        best = None
        for i, m in enumerate(matrices):
            here = m.options[choice[i]]
            for j, o in enumerate(m.options):
                gain = here.loss - o.loss
                if gain <= 0:
                    continue
                cost = numel[i] * (Fraction(o.bits) - Fraction(here.bits))
                if cost <= left and (best is None or gain > best[0]):
                    best = (gain, i, j, cost)
        if best is None:
            return
        _, i, j, cost = best
        choice[i] = j
        left -= cost


def uniform_allocation(matrices: Sequence[MatrixOptions], budget: float) -> Allocation:
    """The same precision everywhere: each matrix takes its costliest option within ``budget`` bits
    per weight (its lowest loss among those, then the first index), so the average is within budget.

    Raises UnweightError when some matrix has no option within the budget."""
    _validate(matrices)
    choice = []
    for m in matrices:
        fitting = [j for j, o in enumerate(m.options) if o.bits <= budget]
        if not fitting:
            raise UnweightError(f"matrix {m.name!r}: no option within {budget} bits per weight")
        choice.append(min(fitting, key=lambda j: (-m.options[j].bits, m.options[j].loss, j)))
    return evaluate(matrices, choice, budget)
