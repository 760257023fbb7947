"""Means with 95 % percentile-bootstrap intervals, paired differences, and the rule that decides
the default fusion mode."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000  # bootstrap resamples per interval
# The fused modes run the same forwards and differ only in the alpha solve: static none, paper a
# grid, dynamic the grid's scan plus Newton steps. Measured costs closer than COST_TIE (relative)
# are within a shared machine's run-to-run noise, and such a tie goes to the mode with less work.
LEAST_WORK_FIRST = ("static", "paper", "dynamic")
COST_TIE = 0.05


@dataclass(frozen=True)
class Estimate:
    """A mean over questions and its 95 % percentile-bootstrap interval."""

    mean: float
    low: float
    high: float

    def __neg__(self) -> Estimate:
        return Estimate(-self.mean, -self.high, -self.low)

    def contains_zero(self) -> bool:
        return self.low <= 0 <= self.high

    def __str__(self) -> str:
        return f"{self.mean:.1f} [{self.low:.1f}, {self.high:.1f}]"


def bootstrap(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """The mean of `values` (one per question) with its 95 % percentile-bootstrap interval. The
    resampled question sets depend only on the seed and the number of questions, so all rows of
    one task are resampled over the same sets."""
    data = np.asarray(values, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    low, high = np.percentile(data[picks].mean(axis=1), [2.5, 97.5])
    return Estimate(float(data.mean()), float(low), float(high))


def paired_difference(
    first: Sequence[float], second: Sequence[float], resamples: int = RESAMPLES, seed: int = 0
) -> Estimate:
    """first - second over the same questions: each resample draws questions, not rows, so what
    the two rows share (an easy question) cancels out of the interval."""
    if len(first) != len(second):
        raise ValueError(f"paired rows need the same questions: {len(first)} vs {len(second)}")
    difference = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    return bootstrap(difference, resamples, seed)


def pairwise(scores: Mapping[str, Sequence[float]], modes: Sequence[str]) -> dict:
    """{(a, b): the a - b estimate} for each pair of `modes`, a before b."""
    return {
        (a, b): paired_difference(scores[a], scores[b]) for a, b in itertools.combinations(modes, 2)
    }


def decide(
    costs: Mapping[str, float], differences: Mapping[str, Mapping[tuple[str, str], Estimate]]
) -> tuple[str | None, str]:
    """The default mode the evidence supports, and the sentence that says why.

    Rule: the cheapest mode whose paired difference against every other mode has an interval that
    does not lie entirely below zero, on every task. `costs`: mode -> cost (lower is cheaper; costs
    within COST_TIE of each other tie, and a tie goes to the mode with less work per step);
    `differences`: task -> (a, b) -> the a - b estimate, each pair of modes in either order."""
    modes = cost_order(costs)
    versus = {
        (task, a, b): table[(a, b)] if (a, b) in table else -table[(b, a)]
        for task, table in differences.items()
        for a, b in itertools.permutations(modes, 2)
    }
    if all(estimate.contains_zero() for estimate in versus.values()):
        return modes[0], (
            f"nothing separates the modes (every paired interval contains 0), so the rule "
            f"picks the cheapest: {modes[0]}"
        )
    for mode in modes:
        if all(e.high >= 0 for (_, a, _), e in versus.items() if a == mode):
            beaten = sorted({b for (_, a, b), e in versus.items() if a == mode and e.low > 0})
            better = f"; it beats {', '.join(beaten)}" if beaten else ""
            return mode, (
                f"{mode}: the cheapest mode that no other mode beats on any task (none of its "
                f"paired intervals lies entirely below 0){better}"
            )
    return None, "no mode passes the rule: each is beaten by another on some task"


def cost_order(costs: Mapping[str, float], tie: float = COST_TIE) -> list[str]:
    """The modes cheapest first: the modes within `tie` (relative) of the cheapest left tie and go
    first, ordered by the work each does per step (`LEAST_WORK_FIRST`), then the same for the rest.
    (Grouping from the cheapest keeps the order well defined where ties chain, a ~ b ~ c, a < c.)"""
    left, order = dict(costs), []
    while left:
        cheapest = min(left.values())
        tied = [m for m in LEAST_WORK_FIRST if m in left and left[m] <= cheapest * (1 + tie)]
        order += tied
        for mode in tied:
            del left[mode]
    return order
