"""The shared store: Redis through redis-py's asyncio client, what replicas use together.

Key layout (``P`` is the prefix, default ``xpeft``; the braces are a Redis Cluster hash tag
that keeps every key in one slot, so the Lua scripts may touch them all)::

    {P}:profile:<id>   hash   data (.xpm bytes), meta (JSON), version, created_at, updated_at
    {P}:ids            zset   every id, score 0: lexicographic paging with ZRANGEBYLEX
    {P}:seq            string the store-wide version counter (INCR)
    {P}:events         pub/sub channel: JSON {"id", "version", "deleted", "at"} after each write

A put or delete is one Lua script: condition check, counter, hash, index and publish happen
atomically, so a reader sees either the old bytes with the old version or the new bytes with the
new version, and a conditional write never acts on a version that changed after its check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from xpeft.server.stores.base import (
    ChangeEvent,
    Condition,
    ProfileRecord,
    ProfileStore,
    PutResult,
    StoredProfile,
    StoreUnavailable,
    check,
    load_meta,
    now,
    readable_records,
)

T = TypeVar("T")
# What a store call that did not get an answer raises (RedisClusterException, from the cluster
# client when no node answers, is no RedisError).
DOWN = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


def condition_args(condition: Condition | None) -> list[str]:
    """``condition`` as the two script arguments that ``_CHECK`` reads."""
    if condition is None:
        return ["", ""]
    exists = "" if condition.exists is None else ("1" if condition.exists else "0")
    if condition.versions is None:
        return [exists, ""]
    return [exists, "," + "".join(f"{v}," for v in sorted(condition.versions))]


# Conditions travel as ARGV: cond_exists ('' none, '1' must exist, '0' must not) and cond_versions
# ('' none, else ",17,18," : the current version must be one listed; "," lists none).
_CHECK = """
local function holds(version, exists, versions)
  if exists == '1' and not version then return false end
  if exists == '0' and version then return false end
  if versions ~= '' and (not version or not string.find(versions, ',' .. version .. ',', 1, true)) then
    return false
  end
  return true
end
"""

# Returns {0, current or false}: condition failed; {2, version, created_at, updated_at}: the same
# bytes and metadata are stored already (nothing written); {1, seq, created, created_at}: written.
PUT_LUA = (
    _CHECK
    + """
local cur = redis.call('HMGET', KEYS[1], 'version', 'data', 'meta', 'created_at', 'updated_at')
if not holds(cur[1], ARGV[6], ARGV[7]) then return {0, cur[1]} end
if cur[1] and cur[2] == ARGV[2] and cur[3] == ARGV[3] then return {2, cur[1], cur[4], cur[5]} end
local seq = redis.call('INCR', KEYS[3])
local created = 0
local created_at = cur[4]
if not cur[1] then created = 1; created_at = ARGV[4] end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'meta', ARGV[3], 'version', seq,
           'created_at', created_at, 'updated_at', ARGV[4])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({id=ARGV[1], version=seq, deleted=false, at=tonumber(ARGV[4])}))
return {1, seq, created, created_at}
"""
)

# Returns 0: no such id; -version: the condition failed; else the version of the deletion.
DELETE_LUA = (
    _CHECK
    + """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return 0 end
if not holds(version, ARGV[4], ARGV[5]) then return -tonumber(version) end
local seq = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], cjson.encode({id=ARGV[1], version=seq, deleted=true, at=tonumber(ARGV[2])}))
return seq
"""
)

_RECORD_FIELDS = ("version", "meta", "created_at", "updated_at")


class RedisStore(ProfileStore):
    """Profiles in Redis; see the module docstring for the key layout."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        prefix: str = "xpeft",
        timeout_s: float = 2.0,
        max_connections: int = 64,
        password: str | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        tag = "{" + prefix + "}"
        self.ids_key = f"{tag}:ids"
        self.seq_key = f"{tag}:seq"
        self.channel = f"{tag}:events"
        self._profile_prefix = f"{tag}:profile:"
        # Few quick retries: a store that is down must surface as 503 within timeout_s, not hang.
        # A blocking pool: a burst beyond max_connections waits (up to timeout_s) for a free
        # connection; redis-py's default pool refuses at once, which turned bursts into 503s.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            health_check_interval=30,
            **({"password": password} if password else {}),
        )
        self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        self._put = self._redis.register_script(PUT_LUA)
        self._delete = self._redis.register_script(DELETE_LUA)

    def key(self, profile_id: str) -> str:
        return self._profile_prefix + profile_id

    def channel_of(self, profile_id: str) -> str:
        """The channel a write of ``profile_id`` publishes on (one here; the cluster store: one per group)."""
        return self.channel

    async def _write(self, script: str, profile_id: str, args: list) -> Any:
        """Run the put or delete script on the record, the index and the counter of ``profile_id``."""
        run = self._put if script == "put" else self._delete
        return await run(keys=[self.key(profile_id), self.ids_key, self.seq_key], args=args)

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(op, self.timeout_s)
        except DOWN as exc:
            raise StoreUnavailable(f"Redis did not answer {what}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _record(profile_id: str, values: list) -> ProfileRecord:
        version, meta, created_at, updated_at = values
        return ProfileRecord(
            profile_id, int(version), load_meta(profile_id, meta), float(created_at), float(updated_at)
        )

    # -- contract --------------------------------------------------------------------------
    async def put(
        self, profile_id: str, data: bytes, meta: dict, condition: Condition | None = None
    ) -> PutResult:
        stamp = now()
        args: list[bytes | str] = [
            profile_id,
            data,
            json.dumps(meta, separators=(",", ":")),
            repr(stamp),
            self.channel_of(profile_id),
            *condition_args(condition),
        ]
        status, *rest = await self._call("put", self._write("put", profile_id, args))
        if status == 0:  # the script checked the same condition: raise its refusal
            current = None if rest[0] is None else int(rest[0])
            check(condition, profile_id, current)
            raise AssertionError("the store refused a condition that holds")  # pragma: no cover
        if status == 2:
            version, created_at, updated_at = rest
            record = ProfileRecord(profile_id, int(version), dict(meta), float(created_at), float(updated_at))
            return PutResult(record, False, True)
        seq, created, created_at = rest
        return PutResult(
            ProfileRecord(profile_id, int(seq), dict(meta), float(created_at), stamp), bool(created)
        )

    async def get(self, profile_id: str) -> StoredProfile | None:
        values = await self._call("get", self._redis.hmget(self.key(profile_id), *_RECORD_FIELDS, "data"))
        if values[0] is None:
            return None
        record = self._record(profile_id, values[:4])
        data = values[4]
        assert isinstance(data, bytes)  # the client does not decode responses
        return StoredProfile(**record.__dict__, data=data)

    async def get_record(self, profile_id: str) -> ProfileRecord | None:
        values = await self._call("get", self._redis.hmget(self.key(profile_id), *_RECORD_FIELDS))
        return None if values[0] is None else self._record(profile_id, values)

    async def delete(self, profile_id: str, condition: Condition | None = None) -> int | None:
        args = [profile_id, repr(now()), self.channel_of(profile_id), *condition_args(condition)]
        seq = await self._call("delete", self._write("delete", profile_id, args))
        if int(seq) < 0:
            check(condition, profile_id, -int(seq))
            raise AssertionError("the store refused a condition that holds")  # pragma: no cover
        return int(seq) or None

    async def _page(self, cursor: str | None, limit: int) -> tuple[list[str], bool]:
        """Up to ``limit`` ids after ``cursor`` in id order, and whether more follow."""
        start = b"(" + cursor.encode() if cursor else b"-"
        ids = await self._call(
            "list", self._redis.zrangebylex(self.ids_key, start, b"+", start=0, num=limit + 1)
        )
        return [i.decode() if isinstance(i, bytes) else i for i in ids[:limit]], len(ids) > limit

    async def list(self, cursor: str | None, limit: int) -> tuple[list[ProfileRecord], str | None]:
        page, more = await self._page(cursor, limit)
        pipe = self._redis.pipeline(transaction=False)
        for profile_id in page:
            pipe.hmget(self.key(profile_id), *_RECORD_FIELDS)
        rows = await self._call("list", pipe.execute()) if page else []
        # An id deleted between the two reads is left out rather than shown half.
        found = [(i, v) for i, v in zip(page, rows, strict=True) if v[0] is not None]
        records = readable_records(found, lambda row: self._record(*row))
        return records, (page[-1] if more else None)

    async def versions(self, profile_ids: Iterable[str]) -> dict[str, int]:
        ids = list(profile_ids)
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for profile_id in ids:
            pipe.hget(self.key(profile_id), "version")
        values = await self._call("versions", pipe.execute())
        return {i: int(v) for i, v in zip(ids, values, strict=True) if v is not None}

    async def current_seq(self) -> int:
        value = await self._call("seq", self._redis.get(self.seq_key))
        return int(value or 0)

    async def watch(self) -> AsyncIterator[ChangeEvent]:
        backoff = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await asyncio.wait_for(pubsub.subscribe(self.channel), self.timeout_s)
                # Whatever was published before the subscription is unknown to us.
                yield ChangeEvent(None, await self.current_seq())
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    event = json.loads(message["data"])
                    yield ChangeEvent(
                        event["id"], int(event["version"]), bool(event["deleted"]), event.get("at")
                    )
            except (RedisError, OSError, asyncio.TimeoutError, StoreUnavailable):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def ping(self) -> dict[str, object] | None:
        await self._call("ping", self._redis.ping())
        return None

    async def close(self) -> None:
        await self._redis.aclose()
