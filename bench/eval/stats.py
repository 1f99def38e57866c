"""Means, sample standard deviations and paired differences with 95% t-intervals (scipy)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as sps


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample std (n - 1); 0 for a single value
    n: int


@dataclass(frozen=True)
class Interval:
    """A mean difference with its two-sided t-interval (``low``/``high`` are NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def summarize(values: Sequence[float]) -> Summary | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(statistics.fmean(values), std, len(values))


def t_interval(differences: Sequence[float], confidence: float = 0.95) -> Interval | None:
    """Mean of paired differences and its t-interval on n - 1 degrees of freedom."""
    n = len(differences)
    if n == 0:
        return None
    mean = statistics.fmean(differences)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sem = statistics.stdev(differences) / math.sqrt(n)
    if sem == 0:
        return Interval(mean, mean, mean, n)
    low, high = sps.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


def paired(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float]) -> list[float]:
    """``a - b`` over the (profile, seed) pairs both have, in a stable order."""
    return [a[k] - b[k] for k in sorted(set(a) & set(b))]
