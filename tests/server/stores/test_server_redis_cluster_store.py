"""The cluster store on a real 3-master cluster on loopback (the session's, tests/conftest.py):
profiles spread over every master, events reach a watcher from every master, a shard's counter
going back empties the caches, and a page merges every group's index in id order (also checked
against a skewed in-memory layout). The shared contract is in test_server_store_contract.py."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
import redis
from test_server_caches import make_cache

from testsupport.cluster import LocalCluster
from xpeft.server.settings import Settings
from xpeft.server.stores.base import ChangeEvent
from xpeft.server.stores.cluster_listing import merged_page
from xpeft.server.stores.redis_cluster_store import GROUPS, RedisClusterStore, group_tags
from xpeft.server.sync import CacheSync


@pytest.fixture
def store_on(redis_cluster: LocalCluster):
    prefix = f"xpeft-cs-{uuid.uuid4().hex[:8]}"
    made: list[RedisClusterStore] = []

    def make() -> RedisClusterStore:
        made.append(RedisClusterStore(redis_cluster.url(redis_cluster.masters()[0]), prefix, timeout_s=5))
        return made[-1]

    yield make
    redis_cluster.delete_matching("{" + prefix + "#*")


def test_group_tags_fill_evenly_spaced_slots(redis_cluster: LocalCluster) -> None:
    tags = group_tags("xpeft")
    assert len(tags) == GROUPS == len(set(tags))
    slots = [redis_cluster.slot("{" + t + "}") for t in tags]
    assert [s * GROUPS // 16384 for s in slots] == list(range(GROUPS))
    owners = Counter(redis_cluster.owner("{" + t + "}") for t in tags)
    assert sorted(owners.values()) == [16, 16, 16]  # an evenly split cluster: a third each


def test_profiles_spread_over_every_master_and_events_come_from_each(redis_cluster, store_on) -> None:
    async def body() -> dict[int, int]:
        watcher, store = store_on(), store_on()
        events: list[ChangeEvent] = []

        async def collect() -> None:
            async for event in watcher.watch():
                events.append(event)

        task = asyncio.create_task(collect())
        try:
            for _ in range(500):
                if events:
                    break
                await asyncio.sleep(0.01)
            assert events and events[0].id is None and len(events[0].counters()) == GROUPS
            ids = [f"p-{i:04d}" for i in range(300)]
            written = {i: (await store.put(i, b"x", {})).record.version for i in ids}
            for _ in range(500):
                if len(events) > len(ids):
                    break
                await asyncio.sleep(0.01)
            got = {e.id: e.version for e in events[1:]}
            assert got == written  # every write, from every master, reached the one watcher
            assert {e.shard for e in events[1:]} <= set(watcher.tags)
            page, cursor = await store.list(None, 1000)
            assert [r.id for r in page] == ids and cursor is None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await watcher.close()
            await store.close()
        return {}

    asyncio.run(body())
    counts = {}
    for port in redis_cluster.masters():
        with redis.Redis(port=port) as client:
            counts[port] = sum(1 for _ in client.scan_iter(match="{xpeft-cs-*:profile:p-*", count=1000))
    assert len(counts) == 3 and all(60 <= c <= 140 for c in counts.values()), counts


def test_a_shard_counter_going_back_empties_the_caches(redis_cluster, store_on, bank, profile_bytes) -> None:
    async def body() -> None:
        store = store_on()
        cache, metrics = make_cache(store, bank)
        sync = CacheSync(store, cache, metrics, check_s=10)
        kept = (await store.put("kept", profile_bytes(1), {})).record
        await sync.apply(ChangeEvent(None, 0, seqs=await store.current_seqs()))  # as watch() starts
        assert (await cache.get("kept")).version == kept.version
        assert sync.seen[store.tag("kept")] == kept.version
        await sync.check_once()  # nothing happened: nothing emptied
        assert cache.cached_version("kept") == kept.version
        # the master of one group lost its data (restarted without persistence): counter back to 0
        with redis.Redis(port=redis_cluster.owner(store.tag("kept"))) as client:
            client.delete(f"{store.tag('kept')}:seq")
        await sync.check_once()
        assert metrics.registry.get_sample_value("xpeft_invalidations_total", {"kind": "reset"}) == 1
        assert cache.cached_version("kept") is None
        await store.close()

    asyncio.run(body())


@pytest.mark.parametrize("limit", [1, 7, 100, 1000])
def test_merged_page_is_the_global_id_order_even_when_groups_are_skewed(limit: int) -> None:
    groups = 8
    # group 0 holds most ids, group 3 none: the first chunk cannot answer alone
    layout = {
        g: sorted(
            f"id-{i:05d}".encode()
            for i in range(2000)
            if (i % 10 < 7) == (g == 0) and (g == 0 or i % groups == g) and g != 3
        )
        for g in range(groups)
    }
    every = sorted(i for ids in layout.values() for i in ids)
    rounds = 0

    async def fetch(starts: dict[int, bytes], num: int) -> dict[int, list[bytes]]:
        nonlocal rounds
        rounds += 1
        out = {}
        for g, start in starts.items():
            after = start[1:] if start.startswith(b"(") else b""
            out[g] = [i for i in layout[g] if i > after][:num]
        return out

    async def walk() -> list[bytes]:
        seen, start = [], b"-"
        while True:
            page, more = await merged_page(fetch, groups, start, limit)
            seen += page
            if not more:
                return seen
            start = b"(" + page[-1]

    assert asyncio.run(walk()) == every
    assert rounds <= 4 * (-(-len(every) // limit)) + 4  # a few rounds a page, not one per id


def test_cluster_mode_needs_a_plain_redis_for_the_job_queue() -> None:
    with pytest.raises(ValueError, match="XPEFT_JOBS_REDIS_URL"):
        Settings(redis_url="redis://127.0.0.1:7000/0", redis_cluster=True)
    settings = Settings(
        redis_url="redis://127.0.0.1:7000/0", redis_cluster=True, jobs_redis_url="redis://127.0.0.1:6379/0"
    )
    assert settings.jobs_url() == "redis://127.0.0.1:6379/0"
    assert Settings(redis_url="redis://127.0.0.1:6379/0").jobs_url() == "redis://127.0.0.1:6379/0"
