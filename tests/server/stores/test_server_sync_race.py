"""The version check must not mistake writes that land while it reads the counter for a reset."""

from __future__ import annotations

import asyncio

from test_server_caches import make_cache

from xpeft.server.stores.base import ChangeEvent
from xpeft.server.stores.sqlite_store import SQLiteStore
from xpeft.server.sync import CacheSync


def test_events_applied_during_the_counter_read_are_not_a_reset(bank, profile_bytes, tmp_path) -> None:
    async def body() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3", poll_s=0.02)
        cache, metrics = make_cache(store, bank)
        sync = CacheSync(store, cache, metrics, check_s=10)
        kept = (await store.put("kept", profile_bytes(1), {})).record
        await sync.check_once()
        assert (await cache.get("kept")).version == kept.version
        real_seq = store.current_seq

        async def racing_seq() -> int:
            seq = await real_seq()  # the counter as it is now ...
            newer = (await store.put("other", profile_bytes(2), {})).record  # ... then a write lands
            await sync.apply(ChangeEvent("other", newer.version))  # and its event is applied first
            return seq

        store.current_seq = racing_seq
        await sync.check_once()
        assert metrics.registry.get_sample_value("xpeft_invalidations_total", {"kind": "reset"}) is None
        assert cache.cached_version("kept") == kept.version  # nothing was emptied
        store.current_seq = real_seq
        # a real reset (the counter below what was seen before the read) still empties everything
        sync.seen = {"": 10**6}
        await sync.check_once()
        assert metrics.registry.get_sample_value("xpeft_invalidations_total", {"kind": "reset"}) == 1
        assert cache.cached_version("kept") is None
        await store.close()

    asyncio.run(body())
