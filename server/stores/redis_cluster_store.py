"""The store on a Redis Cluster: profiles spread over every master, each write one atomic script.

One deployment's profiles are split into :data:`GROUPS` slot groups by a hash of the profile id.
Group ``g`` has its own hash tag ``T`` (``{P#k}``, ``k`` chosen so that the 48 tags land on 48
evenly spaced slots, so every master of an evenly split cluster holds the same share)::

    {T}:profile:<id>   hash   as in the single-node store
    {T}:ids            zset   the group's ids, score 0 (lexicographic paging)
    {T}:seq            string the group's version counter
    {T}:events         sharded pub/sub channel (SPUBLISH), one per group

A put or delete is the single-node store's script with two changes: the channel is sharded, and
the version is ``max(counter + 1, the master's clock in microseconds)``. So versions of one id
always increase (the counter lives in the id's slot and moves with it), and versions of different
groups still increase with time, up to the clock skew between masters: no global counter is
needed. After each write the store sends ``WAIT`` on the same connection and answers only once
``wait_replicas`` replicas hold the write, so a failover that promotes one of them loses no
acknowledged write. The replicas' cache sync reads every group's counter (:meth:`current_seqs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.cluster import key_slot

from xpeft.server.stores.base import ChangeEvent, StoreUnavailable
from xpeft.server.stores.cluster_listing import merged_page
from xpeft.server.stores.redis_store import DELETE_LUA, DOWN, PUT_LUA, RedisStore

GROUPS = 48  # fixed for a deployment's lifetime: it decides where every id lives
SLOTS = 16384

_COUNTER = "local seq = redis.call('INCR', KEYS[3])"
_CLOCKED = """local clock = redis.call('TIME')
local seq = string.format('%d', math.max(tonumber(redis.call('GET', KEYS[3]) or '0') + 1,
                                         clock[1] * 1000000 + clock[2]))
redis.call('SET', KEYS[3], seq)"""


def _clustered(script: str) -> str:
    """The single-node script with a clock-following per-group counter and a sharded channel."""
    assert script.count(_COUNTER) == 1 and script.count("'PUBLISH'") == 1
    return script.replace(_COUNTER, _CLOCKED).replace("'PUBLISH'", "'SPUBLISH'")


PUT_SCRIPT = _clustered(PUT_LUA)
DELETE_SCRIPT = _clustered(DELETE_LUA)


def group_tags(prefix: str, groups: int = GROUPS) -> list[str]:
    """One hash tag per group, group ``g``'s in slots ``[g, g + 1) * 16384 / groups``."""
    tags: list[str | None] = [None] * groups
    left, k = groups, 0
    while left:
        tag = f"{prefix}#{k}"
        group = key_slot(tag.encode()) * groups // SLOTS
        if tags[group] is None:
            tags[group] = tag
            left -= 1
        k += 1
    return [t for t in tags if t is not None]


def group_of(profile_id: str, groups: int = GROUPS) -> int:
    """The slot group of an id: a stable hash, uniform over the groups."""
    return zlib.crc32(profile_id.encode()) % groups


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisClusterStore(RedisStore):
    """Profiles sharded over a Redis Cluster; see the module docstring for the layout. Reads,
    the put and delete replies and the version lookups are the single-node store's."""

    kind = "redis-cluster"

    def __init__(
        self,
        url: str,
        prefix: str = "xpeft",
        timeout_s: float = 2.0,
        max_connections: int = 64,
        password: str | None = None,
        wait_replicas: int = 1,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.wait_replicas = wait_replicas
        self._replica_counts: dict[str, tuple[int, float]] = {}  # node -> (replicas, valid until)
        self.tags = ["{" + t + "}" for t in group_tags(prefix)]
        self.channels = [f"{t}:events" for t in self.tags]
        self._by_channel = {c.encode(): t for c, t in zip(self.channels, self.tags, strict=True)}
        # A few quick retries on a refused connection (the client re-reads the slot map between
        # them): a failover then surfaces as 503 within timeout_s and the next call finds the new master.
        self._redis = RedisCluster.from_url(  # type: ignore[assignment]
            url,
            max_connections=max_connections,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            health_check_interval=30,
            **({"password": password} if password else {}),
        )
        self._cluster: RedisCluster = self._redis  # type: ignore[assignment]

    def tag(self, profile_id: str) -> str:
        return self.tags[group_of(profile_id)]

    def key(self, profile_id: str) -> str:
        return f"{self.tag(profile_id)}:profile:{profile_id}"

    def channel_of(self, profile_id: str) -> str:
        return f"{self.tag(profile_id)}:events"

    async def _replicas(self, node: Any) -> int:
        """How many replicas ``node`` has attached (``INFO replication``, re-read each second)."""
        known = self._replica_counts.get(node.name)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        info = await self._cluster.info("replication", target_nodes=node)
        if node.name in info and isinstance(info[node.name], dict):  # keyed by node on some versions
            info = info[node.name]
        count = int(info.get("connected_slaves", 0))
        self._replica_counts[node.name] = (count, time.monotonic() + 1.0)
        return count

    async def _write(self, script: str, profile_id: str, args: list) -> Any:
        """Run a write script, then ``WAIT`` on the same connection until ``wait_replicas``
        replicas hold it (fewer when the master has fewer attached: a master whose replica was
        promoted away or died stays writable, rather than refusing every write until one rejoins)."""
        tag = self.tag(profile_id)
        keys = [self.key(profile_id), f"{tag}:ids", f"{tag}:seq"]
        await self._cluster.initialize()
        node = self._cluster.get_node_from_key(keys[0])
        assert node is not None  # the slot map covers every slot once initialized
        wanted = min(self.wait_replicas, await self._replicas(node)) if self.wait_replicas else 0
        pipe = self._cluster.pipeline(transaction=False)
        pipe.eval(PUT_SCRIPT if script == "put" else DELETE_SCRIPT, len(keys), *keys, *args)
        if wanted:
            pipe.execute_command("WAIT", wanted, int(self.timeout_s * 500), target_nodes=node)
        results = await pipe.execute()
        if wanted:
            now_at = self._cluster.get_node_from_key(keys[0])
            moved = now_at is None or now_at.name != node.name
            if moved or int(results[1]) < wanted:
                self._replica_counts.pop(node.name, None)
                why = "its slot moved meanwhile" if moved else f"{results[1]} replicas confirmed it"
                raise StoreUnavailable(f"a write reached the master but {why}, {wanted} wanted; retry it")
        return results[0]

    async def _ranges(self, starts: dict[int, bytes], num: int) -> dict[int, list[bytes]]:
        """Up to ``num`` ids after each group's start, all groups in one pipeline per master."""
        pipe = self._cluster.pipeline(transaction=False)
        for group, start in starts.items():
            pipe.zrangebylex(f"{self.tags[group]}:ids", start, b"+", start=0, num=num)
        return dict(zip(starts, await pipe.execute(), strict=True))

    async def _page(self, cursor: str | None, limit: int) -> tuple[list[str], bool]:
        start = b"(" + cursor.encode() if cursor else b"-"
        page, more = await self._call("list", merged_page(self._ranges, len(self.tags), start, limit))
        return [_text(i) for i in page], more

    async def current_seqs(self) -> dict[str, int]:
        values = await self._call("seq", self._cluster.mget_nonatomic([f"{t}:seq" for t in self.tags]))
        return {t: int(v or 0) for t, v in zip(self.tags, values, strict=True)}

    async def current_seq(self) -> int:
        return max((await self.current_seqs()).values())

    async def _subscribe(self, pubsub: ClusterPubSub) -> None:
        """Subscribe to every group's channel and wait until each master confirmed its share."""
        await self._cluster.initialize()
        await pubsub.ssubscribe(*self.channels)
        pending = set(self.channels)
        while pending:
            message = await pubsub.get_sharded_message(timeout=0.1)
            if message is not None and _text(message["type"]) == "ssubscribe":
                pending.discard(_text(message["channel"]))

    async def watch(self) -> AsyncIterator[ChangeEvent]:
        backoff = 0.05
        while True:
            pubsub = self._cluster.pubsub()
            queue: asyncio.Queue[dict | BaseException] = asyncio.Queue()
            readers: list[asyncio.Task] = []
            try:
                await asyncio.wait_for(self._subscribe(pubsub), self.timeout_s)
                nodes = dict(pubsub.node_pubsub_mapping)
                readers = [asyncio.create_task(_read(ps, queue)) for ps in nodes.values()]
                # Whatever was published before the subscriptions is unknown to us.
                yield ChangeEvent(None, 0, seqs=await self.current_seqs())
                backoff = 0.05
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if set(pubsub.node_pubsub_mapping) != set(nodes):
                        raise StoreUnavailable("the masters of the event channels changed")
                    if _text(item["type"]) == "sunsubscribe":  # the slot moved: subscribe again
                        raise StoreUnavailable("a channel's slot moved")
                    if _text(item["type"]) != "smessage":
                        continue
                    event = json.loads(item["data"])
                    yield ChangeEvent(
                        event["id"],
                        int(event["version"]),
                        bool(event["deleted"]),
                        event.get("at"),
                        shard=self._by_channel.get(item["channel"], ""),
                    )
            except (*DOWN, StoreUnavailable):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(*DOWN):
                    await asyncio.wait_for(self._cluster.nodes_manager.initialize(), self.timeout_s)
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
                with contextlib.suppress(*DOWN):
                    await pubsub.aclose()

    async def ping(self) -> dict[str, object]:
        """The cluster's own view (``CLUSTER INFO``); unavailable unless every slot is served."""
        raw = await self._call("ping", self._cluster.cluster_info(target_nodes=RedisCluster.RANDOM))
        info = {k: v for k, v in raw.items()} if isinstance(raw, dict) else {}
        state = _text(info.get("cluster_state", "unknown"))
        if state != "ok":
            raise StoreUnavailable(f"the Redis Cluster reports cluster_state:{state}")
        return {
            "cluster_state": state,
            "slots_ok": int(info.get("cluster_slots_ok", 0)),
            "masters": int(info.get("cluster_size", 0)),
            "known_nodes": int(info.get("cluster_known_nodes", 0)),
        }


async def _read(pubsub: Any, queue: asyncio.Queue) -> None:
    """Forward one master's shard-channel messages (or the error that ended them) to ``queue``."""
    try:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            if message is not None:
                queue.put_nowait(message)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # handed to the watcher, which restarts
        queue.put_nowait(exc)
