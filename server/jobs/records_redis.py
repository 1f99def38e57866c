"""Job records in Redis, beside the profiles (same prefix and hash tag)::

    {P}:job:<id>       string  the record (JSON); expires job_ttl_s after it was last written
    {P}:jobdata:<id>   string  the examples (JSON); deleted when the job ends
    {P}:jobs           zset    every job id, score 0 (ids sort by creation time): paging
    {P}:jobs:active    set     queued and running ids
    {P}:jobs:active:<t> set    queued and running ids of one tenant (t: a hash of its key)
    {P}:jobs:last      string  the tenant whose job was claimed last (the round robin's place)
    {P}:jobs:of:<t>    zset    every job id of one tenant: its oldest finished records beyond the
                               per-tenant cap are deleted as its new jobs come

Each change runs under WATCH/MULTI, so concurrent writers retry instead of interleaving.
``{P}:jobs:ended`` (a hash, never expiring) counts the jobs that ended in each terminal state,
in the same transaction as each job's last change.
"""

from __future__ import annotations

import builtins
import hashlib
import json

import redis

from xpeft.server.jobs.records import (
    ACTIVE,
    JobStore,
    TooManyJobs,
    Update,
    dump_record,
    load_record,
    readable_jobs,
)

_RETRIES = 50
# The pending-jobs bound and the insert in one step: no two creates can both see room for one.
# KEYS: record, data, index, active, the tenant's active, the idempotency key's. ARGV: record,
# data, ttl ms, id, bound, the tenant's bound (0: none), whether there is an idempotency key.
# Answers {1, active before} when created, {0, active} when the bound is reached, {-1, the
# tenant's active} when the tenant's bound is, {2, earlier id} when the key named a job already.
_CREATE = """
if ARGV[7] == '1' then
  local prior = redis.call('GET', KEYS[6])
  if prior then return {2, prior} end
end
local active = redis.call('SCARD', KEYS[4])
local bound = tonumber(ARGV[5])
if bound > 0 and active >= bound then return {0, active} end
local mine = redis.call('SCARD', KEYS[5])
local own_bound = tonumber(ARGV[6])
if own_bound > 0 and mine >= own_bound then return {-1, mine} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], 0, ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('SADD', KEYS[5], ARGV[4])
if ARGV[7] == '1' then redis.call('SET', KEYS[6], ARGV[4], 'PX', ARGV[3]) end
return {1, active}
"""


class RedisJobStore(JobStore):
    def __init__(
        self, url: str, prefix: str, ttl_s: float, password: str | None = None, max_tenant_records: int = 0
    ) -> None:
        super().__init__(ttl_s, max_tenant_records)
        tag = "{" + prefix + "}"
        self._job = f"{tag}:job:"
        self._data = f"{tag}:jobdata:"
        self.index = f"{tag}:jobs"
        self.active = f"{tag}:jobs:active"
        self._last = f"{tag}:jobs:last"
        self._redis = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, **({"password": password} if password else {})
        )
        self._ttl_ms = int(ttl_s * 1000)
        self.ended = "{" + prefix + "}:jobs:ended"
        self._create = self._redis.register_script(_CREATE)

    def _tenant_active(self, tenant: str) -> str:
        return f"{self.active}:{_tenant_hash(tenant)}"

    def _tenant_jobs(self, tenant: str) -> str:
        return f"{self.index}:of:{_tenant_hash(tenant)}"

    def _prune(self, tenant: str) -> None:
        """Keep at most ``max_tenant_records`` records of ``tenant``: its oldest finished ones go."""
        key = self._tenant_jobs(tenant)
        active = {_text(i) for i in self._redis.smembers(self._tenant_active(tenant))}
        excess = self._redis.zcard(key) - self.max_tenant_records
        if excess <= 0:
            return
        found: list = self._redis.zrange(key, 0, excess + len(active) - 1)  # type: ignore[assignment,unused-ignore]
        oldest = [_text(i) for i in found]
        doomed = [i for i in oldest if i not in active][:excess]
        if doomed:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(*[self._job + i for i in doomed], *[self._data + i for i in doomed])
            pipe.zrem(self.index, *doomed)
            pipe.zrem(key, *doomed)
            pipe.execute()

    def create(
        self, record: dict, data: bytes, max_active: int | None = None, max_tenant_active: int | None = None
    ) -> str | None:
        job_id = record["id"]
        idempotency = record.get("idempotency")
        keys = [
            self._job + job_id,
            self._data + job_id,
            self.index,
            self.active,
            self._tenant_active(record.get("tenant", "")),
            f"{self.index}:key:{idempotency or ''}",
        ]
        args = [
            dump_record(record),
            data,
            self._ttl_ms,
            job_id,
            max_active or 0,
            max_tenant_active or 0,
            "1" if idempotency else "0",
        ]
        created, active = self._create(keys=keys, args=args)
        if created == 2:
            return _text(active)
        if created != 1:
            raise TooManyJobs(int(active), tenant=created == -1)
        if self.max_tenant_records:
            tenant = record.get("tenant", "")
            self._redis.zadd(self._tenant_jobs(tenant), {job_id: 0})
            self._prune(tenant)
        return None

    def purge(self, job_id: str) -> bool:
        raw = self._redis.get(self._job + job_id)
        tenant = _tenant_of(raw)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._job + job_id, self._data + job_id)
        pipe.zrem(self.index, job_id)
        pipe.srem(self.active, job_id)
        if tenant is not None:
            pipe.srem(self._tenant_active(tenant), job_id)
            pipe.zrem(self._tenant_jobs(tenant), job_id)
        return bool(pipe.execute()[0])

    def queued(self) -> builtins.list[tuple[str, str]]:
        ids = self.active_ids()
        if not ids:
            return []
        values = self._redis.mget([self._job + i for i in ids])
        out = []
        for job_id, raw in zip(ids, values, strict=True):
            if raw is None:
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("state") == "queued":
                out.append((job_id, str(record.get("tenant", ""))))
        return out

    def last_served(self) -> str | None:
        raw = self._redis.get(self._last)
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def set_last_served(self, tenant: str) -> None:
        self._redis.set(self._last, tenant)

    def get(self, job_id: str) -> dict | None:
        raw = self._redis.get(self._job + job_id)
        return None if raw is None else load_record(job_id, raw)

    def data(self, job_id: str) -> bytes | None:
        raw = self._redis.get(self._data + job_id)
        assert raw is None or isinstance(raw, bytes)  # the client does not decode responses
        return raw

    def update(self, job_id: str, fn: Update) -> dict | None:
        key = self._job + job_id
        for _ in range(_RETRIES):
            with self._redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    record = load_record(job_id, raw)
                    before = record["state"]  # fn may change the record in place
                    new = fn(record)
                    if new is None:
                        return record
                    pipe.multi()
                    pipe.set(key, dump_record(new), px=self._ttl_ms)
                    if new["state"] not in ACTIVE:
                        if before in ACTIVE:  # this change ends the job: count it
                            pipe.hincrby(self.ended, new["state"], 1)
                        pipe.srem(self.active, job_id)
                        pipe.srem(self._tenant_active(new.get("tenant", "")), job_id)
                        pipe.delete(self._data + job_id)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue
        raise redis.RedisError(f"job {job_id}: too many concurrent updates")

    def list(self, cursor: str | None, limit: int) -> tuple[builtins.list[dict], str | None]:
        top = b"(" + cursor.encode() if cursor else b"+"
        records: builtins.list[dict] = []
        while len(records) < limit:
            found = self._redis.zrevrangebylex(self.index, top, b"-", start=0, num=limit + 1)
            if not found:
                return records, None
            ids: builtins.list[str] = [i.decode() if isinstance(i, bytes) else i for i in found]
            values = self._redis.mget([self._job + i for i in ids])
            gone = [i for i, v in zip(ids, values, strict=True) if v is None]
            if gone:  # expired records: drop them from the index
                self._redis.zrem(self.index, *gone)
            for job_id, raw in zip(ids, values, strict=True):
                if raw is None:
                    continue
                if len(records) == limit:
                    return records, records[-1]["id"]
                records.extend(readable_jobs([(job_id, raw)]))
            if len(ids) <= limit:
                return records, None
            top = b"(" + ids[-1].encode()
        return records, records[-1]["id"]  # full, with more ids after it (the next page may be empty)

    def active_ids(self) -> builtins.list[str]:
        members = self._redis.smembers(self.active)
        return sorted(i.decode() if isinstance(i, bytes) else str(i) for i in members)

    def ended_counts(self) -> dict[str, int]:
        raw = self._redis.hgetall(self.ended)
        return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}

    def close(self) -> None:
        self._redis.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _tenant_hash(tenant: str) -> str:
    """A tenant key in a Redis key: fixed length, no separators."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


def _tenant_of(raw: bytes | str | None) -> str | None:
    """The tenant of a stored record, if it can be read."""
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return str(record.get("tenant", "")) if isinstance(record, dict) else None
