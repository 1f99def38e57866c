"""The fused-weight cache on the device: bounded by bytes, LRU, and never keeping a stale version."""

from __future__ import annotations

from collections import Counter

from xpeft.adapters.fusion import FusedAdapters
from xpeft.engine.cache import FusedCache, VersionFloors
from xpeft.engine.metrics import EngineMetrics


def fused_entry() -> FusedAdapters:
    return FusedAdapters.zeros(2, 8, 4)  # 2 * (8*4 + 4 + 4*8 + 8) * 4 bytes = 608 bytes


def test_fused_cache_is_bounded_in_bytes_and_evicts_least_recent(keep) -> None:
    events: Counter[str] = Counter()
    used: list[tuple[int, int]] = []
    metrics = EngineMetrics(
        cache_event=lambda event, count: events.update({event: count}), pool_used=lambda *u: used.append(u)
    )
    size = fused_entry().nbytes
    cache = FusedCache(int(size * 2.5), VersionFloors(), metrics)
    assert keep(cache, ("a", 1), fused_entry()) and keep(cache, ("b", 1), fused_entry())
    assert cache.get(("a", 1)) is not None  # a is now the most recent
    assert keep(cache, ("c", 1), fused_entry())
    assert ("b", 1) not in cache and ("a", 1) in cache and ("c", 1) in cache
    assert cache.nbytes == 2 * size <= cache.capacity_bytes
    assert events["eviction"] == 1 and events["hit"] == 1
    # three cold reservations (a, b, c) and this lookup of the evicted b
    assert cache.get(("b", 1)) is None and events["miss"] == 4
    assert used[-1] == (2 * size, 2)  # bytes and entries of the pool in use
    # one entry larger than the whole cache is used but never kept
    tiny = FusedCache(size - 1, VersionFloors())
    assert not keep(tiny, ("a", 1), fused_entry()) and len(tiny) == 0


def test_fused_cache_refuses_and_drops_stale_versions(keep) -> None:
    floors = VersionFloors()
    cache = FusedCache(10**6, floors)
    keep(cache, ("a", 1), fused_entry())
    keep(cache, ("a", 2), fused_entry())
    keep(cache, ("b", 1), fused_entry())
    assert cache.drop("a", below=2) == 1 and ("a", 2) in cache and ("a", 1) not in cache
    floors.raise_to("a", 5)
    assert not keep(cache, ("a", 4), fused_entry())  # a late writer of an old version is refused
    assert keep(cache, ("a", 5), fused_entry())
    assert cache.drop("a") == 2 and len(cache) == 1
