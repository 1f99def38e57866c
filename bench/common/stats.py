"""Pure pieces of the load test: the Zipf sampler and latency percentiles (unit-tested, no I/O).

Kept apart from the runner so the statistics that the report rests on can be tested in
milliseconds, without a server, Redis or a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class ZipfSampler:
    """Draws items ``0..n-1`` with P(rank k) proportional to ``k^-s`` (k = 1..n), seeded.

    Rank 1 is not item 0: a seeded permutation maps ranks to items, so the popular profiles are
    spread over the id space (as in real traffic) instead of being the first ids inserted.
    ``numpy.random.zipf`` is unbounded (it needs s > 1 and yields any integer); this one is finite.
    """

    def __init__(self, n: int, s: float = 1.1, seed: int = 0) -> None:
        if n < 1:
            raise ValueError("n must be at least 1")
        if s < 0:
            raise ValueError("s must be non-negative")
        self.n = n
        self.s = s
        weights = np.arange(1, n + 1, dtype=np.float64) ** -s
        self.rank_probabilities = weights / weights.sum()
        self._cdf = np.cumsum(self.rank_probabilities)
        self._cdf[-1] = 1.0
        self.item_of_rank = np.random.default_rng(seed).permutation(n)
        self._rng = np.random.default_rng(seed + 1)

    def sample_ranks(self, count: int) -> np.ndarray:
        """``count`` ranks, 0-based (0 is the most popular)."""
        return np.searchsorted(self._cdf, self._rng.random(count), side="right").clip(0, self.n - 1)

    def sample(self, count: int) -> np.ndarray:
        """``count`` items (profile indexes)."""
        return self.item_of_rank[self.sample_ranks(count)]

    def top_share(self, top: int) -> float:
        """The share of traffic that goes to the ``top`` most popular items."""
        return float(self.rank_probabilities[: max(0, min(top, self.n))].sum())


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics.

    The same definition as ``numpy.percentile``'s default, written out so the report's
    p50/p95/p99 have one documented meaning. NaN for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Milliseconds: p50, p95, p99, mean and max of request latencies given in seconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": (sum(ms) / len(ms)) if ms else math.nan,
        "max_ms": max(ms) if ms else math.nan,
    }


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)
