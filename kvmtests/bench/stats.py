"""How far to trust a benchmark figure: its median over rounds, and how far another run's median may land from it."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.99
# The least a spread says, relative to its median: on the development machine a ratio moved by 0.7% between runs
# that each claimed ±0.2%, another by 1.4% (each run is one process with its own memory layout, which no round
# inside it varies).
REPRODUCIBILITY = 0.015


def median_bounds(n: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """Indices (low, high) into n sorted values that bracket the true median with at least `confidence`, from the
    binomial distribution alone (timings are skewed and have outliers, so no normal approximation); None when n is
    too small for any such interval."""
    alpha, below, k = (1 - confidence) / 2, 0.0, 0
    while k <= n:
        below += math.comb(n, k) / 2 ** n   # P(fewer than k + 1 of n values fall below the median)
        if below > alpha:
            break
        k += 1
    return None if k == 0 else (k - 1, n - k)


@dataclass(frozen=True)
class Estimate:
    """A median, its confidence interval (None: too few values for one), and how far the medians of the first
    and the second half of the values lie apart."""

    median: float
    low: float | None
    high: float | None
    drift: float = 0.0

    @property
    def spread(self) -> float | None:
        """How far another run's median may land from this one: √2 times the interval's larger half, since both
        medians carry that error (a rerun's median would leave the bare 99% interval one time in fifteen), the
        drift between the halves if larger, since conditions that changed during a run change between runs, and
        never less than REPRODUCIBILITY."""
        if self.low is None or self.high is None:
            return None
        return max(math.sqrt(2) * max(self.median - self.low, self.high - self.median), self.drift,
                   REPRODUCIBILITY * abs(self.median))

    def tight(self, tolerance: float) -> bool:
        """Whether the spread is within `tolerance` of the median, relatively."""
        return self.spread is not None and self.spread <= tolerance * abs(self.median)

    def __str__(self) -> str:
        return f"{self.median:.3f} ±{self.spread:.3f}" if self.spread is not None else f"{self.median:.3f} ±?"


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """The median of `values` (in the order they were measured) with its distribution-free confidence interval
    and the drift between its halves."""
    ordered, half = sorted(values), len(values) // 2
    bounds = median_bounds(len(ordered), confidence)
    if bounds is None:
        return Estimate(statistics.median(ordered), None, None)
    drift = abs(statistics.median(values[:half]) - statistics.median(values[half:]))
    return Estimate(statistics.median(ordered), ordered[bounds[0]], ordered[bounds[1]], drift)
