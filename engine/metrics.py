"""What the engine reports, as callbacks: the engine knows no Prometheus and no server.

The server's :class:`~xpeft.server.metrics.Metrics` fills an :class:`EngineMetrics` with its
counters and histograms (``Metrics.engine()``); a library caller leaves the default, which records
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EngineMetrics"]


def _ignore(*_: object) -> None:
    """The default callback: nothing is recorded."""


@dataclass(frozen=True)
class EngineMetrics:
    """One callback per event the engine reports; each defaults to recording nothing."""

    #: a batch ran: its seconds (fuse and forward), rows, distinct profiles
    batch_ran: Callable[[float, int, int], None] = _ignore
    #: cold profiles fused into the slot pool (cache misses of the worker)
    profiles_fused: Callable[[int], None] = _ignore
    #: the fused-weight cache's ``hit`` / ``miss`` / ``eviction`` events, with a count
    cache_event: Callable[[str, int], None] = _ignore
    #: the slot pool's bytes and entries in use, after each change
    pool_used: Callable[[int, int], None] = _ignore
    #: how long a request waited in the queue before its batch ran
    queue_wait: Callable[[float], None] = _ignore
    #: a request refused because the queue was full
    overloaded: Callable[[], None] = _ignore
    #: a failed batch re-run one request at a time
    batch_isolated: Callable[[], None] = _ignore
