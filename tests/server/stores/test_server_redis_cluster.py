"""The Redis store's key layout on a real Redis Cluster (three masters on loopback).

Every key of one deployment carries the hash tag ``{prefix}``, so the store's multi-key
operations (the put and delete scripts touch the record, the id index and the version counter)
run on one shard without CROSSSLOT; pipelines, listing and the change events work there too.
Different prefixes hash to different slots, so several deployments spread over the shards. A
store pointed at a master that does not own its slot gets a clear StoreUnavailable (MOVED),
which docs/DEPLOYMENT.md tells operators to avoid (or to use cluster mode, whose store is tested in
test_server_redis_cluster_store.py). Skipped when the cluster cannot start.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import ResponseError

from testsupport.cluster import LocalCluster
from xpeft.server.stores.base import StoreUnavailable
from xpeft.server.stores.redis_store import DELETE_LUA, PUT_LUA, RedisStore


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> LocalCluster:
    """The session's cluster (tests/conftest.py): 3 masters, a replica each."""
    return redis_cluster


def _store_on_owner(cluster: LocalCluster, prefix: str) -> RedisStore:
    probe = RedisStore("redis://unused", prefix=prefix)
    return RedisStore(cluster.url(cluster.owner(probe.ids_key)), prefix=prefix, timeout_s=5)


def test_every_key_of_a_deployment_is_in_one_slot(cluster: LocalCluster) -> None:
    store = RedisStore("redis://unused", prefix="xpeft")
    keys = [store.key("a"), store.key("zz-other/id"), store.ids_key, store.seq_key, store.channel]
    assert len({cluster.slot(k) for k in keys}) == 1
    others = {
        cluster.slot(RedisStore("redis://unused", prefix=p).ids_key)
        for p in ("xpeft", "tenant-a", "tenant-b")
    }
    assert len(others) == 3  # one slot per deployment prefix: deployments spread over the shards


def test_the_store_works_on_the_master_that_owns_its_slot(cluster: LocalCluster, profile_bytes) -> None:
    prefix = f"xpeft-cluster-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        store = _store_on_owner(cluster, prefix)
        events = store.watch()
        try:
            first = await asyncio.wait_for(events.__anext__(), 10)
            assert first.id is None  # subscribed (classic pub/sub works on a cluster node)
            written = await store.put("p-1", profile_bytes(1), {"labels": ["a", "b"]})
            event = await asyncio.wait_for(events.__anext__(), 10)
            assert (event.id, event.version) == ("p-1", written.record.version)
            await store.put("p-2", profile_bytes(2), {"labels": ["a", "b"]})
            got = await store.get("p-1")
            assert got is not None and got.data == profile_bytes(1)
            records, cursor = await store.list(None, 10)
            assert [r.id for r in records] == ["p-1", "p-2"] and cursor is None
            assert set(await store.versions(["p-1", "p-2", "missing"])) == {"p-1", "p-2"}
            assert await store.delete("p-1") is not None
            assert await store.get("p-1") is None
            assert await store.current_seq() == 3
        finally:
            await events.aclose()
            await store.close()

    asyncio.run(scenario())
    # Every key the store wrote lives on that one master and carries the tag.
    owner = cluster.owner("{" + prefix + "}:ids")
    with redis.Redis(port=owner) as client:
        keys = {k.decode() for k in client.scan_iter(match="*" + prefix + "*")}
    assert keys and all(k.startswith("{" + prefix + "}:") for k in keys)
    for port in set(cluster.masters()) - {owner}:
        with redis.Redis(port=port) as client:
            assert not list(client.scan_iter(match="*" + prefix + "*"))


def test_the_scripts_are_single_slot_for_a_cluster_client_and_crossslot_without_the_tag(
    cluster: LocalCluster,
) -> None:
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        store = RedisStore("redis://unused", prefix=f"xpeft-cc-{uuid.uuid4().hex[:6]}")
        keys = [store.key("p"), store.ids_key, store.seq_key]
        args = ["p", b"data", "{}", "1.0", store.channel, "", ""]
        status, *_ = client.eval(PUT_LUA, 3, *keys, *args)
        assert status == 1
        assert client.eval(DELETE_LUA, 3, *keys, "p", "2.0", store.channel, "", "") >= 1
        # Without the shared tag, the same script spans slots and the cluster refuses it.
        untagged = ["profile:p", "other-deployment:ids", "seq"]
        assert len({cluster.slot(k) for k in untagged}) > 1
        with pytest.raises((ResponseError, redis.exceptions.RedisClusterException)):
            client.eval(PUT_LUA, 3, *untagged, *args)
    finally:
        client.close()


def test_a_store_on_the_wrong_master_fails_clearly(cluster: LocalCluster, profile_bytes) -> None:
    prefix = f"xpeft-wrong-{uuid.uuid4().hex[:8]}"
    owner = cluster.owner("{" + prefix + "}:ids")
    wrong = next(p for p in cluster.masters() if p != owner)

    async def scenario() -> None:
        store = RedisStore(cluster.url(wrong), prefix=prefix, timeout_s=2)
        try:
            with pytest.raises(StoreUnavailable, match="MovedError"):
                await store.put("p-1", profile_bytes(1), {})
        finally:
            await store.close()

    asyncio.run(scenario())
