"""The host cache of decoded profiles is bounded in bytes, not only in count."""

from __future__ import annotations

import asyncio

from xpeft.engine.cache import FusedCache, VersionFloors
from xpeft.profiles import format as xpm
from xpeft.server.cache import PROFILE_OVERHEAD_BYTES, ProfileCache
from xpeft.server.metrics import Metrics
from xpeft.server.stores.sqlite_store import SQLiteStore


def test_large_profiles_are_evicted_by_bytes(bank, profile_bytes, tmp_path) -> None:
    async def body() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3", poll_s=0.02)
        adapter_size = xpm.decode(profile_bytes(0, "single_adapter"), bank).nbytes + PROFILE_OVERHEAD_BYTES
        hard_size = xpm.decode(profile_bytes(0, "hard"), bank).nbytes + PROFILE_OVERHEAD_BYTES
        assert adapter_size > 20 * hard_size  # why a count alone does not bound memory
        budget = 2 * adapter_size + hard_size
        metrics = Metrics()
        cache = ProfileCache(
            store,
            lambda data: xpm.decode(data, bank),
            1000,
            FusedCache(10**8, VersionFloors(), metrics.engine()),
            metrics,
            max_bytes=budget,
        )
        for i in range(4):
            await store.put(f"a{i}", profile_bytes(i, "single_adapter"), {})
            assert (await cache.get(f"a{i}")) is not None
            assert cache.nbytes <= budget
        assert (
            len(cache) == 2 and cache.cached_version("a3") is not None and cache.cached_version("a0") is None
        )
        assert cache.nbytes == 2 * adapter_size
        for i in range(3):  # small profiles push out one big one each time it is needed, never more
            await store.put(f"h{i}", profile_bytes(i), {})
            await cache.get(f"h{i}")
        assert cache.nbytes <= budget and cache.cached_version("h2") is not None
        # a newer version replacing a cached one is not counted twice
        before = cache.nbytes
        newer = (await store.put("h2", profile_bytes(9), {})).record
        cache.floors.raise_to("h2", newer.version)  # as a change event would, without dropping the entry
        assert (await cache.get("h2")).version == newer.version
        assert cache.nbytes == before
        cache.invalidate("h2", newer.version + 1)
        assert cache.cached_version("h2") is None and cache.nbytes == before - hard_size
        await store.close()

    asyncio.run(body())
