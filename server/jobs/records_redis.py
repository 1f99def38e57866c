"""Job records in Redis, beside the profiles (same prefix and hash tag)::

    {P}:job:<id>       string  the record (JSON); expires job_ttl_s after it was last written
    {P}:jobdata:<id>   string  the examples (JSON); deleted when the job ends
    {P}:jobs           zset    every job id, score 0 (ids sort by creation time): paging
    {P}:jobs:active    set     queued and running ids

Each change runs under WATCH/MULTI, so concurrent writers retry instead of interleaving.
``{P}:jobs:ended`` (a hash, never expiring) counts the jobs that ended in each terminal state,
in the same transaction as each job's last change.
"""

from __future__ import annotations

import builtins
import json

import redis

from xpeft.server.jobs.records import ACTIVE, JobStore, TooManyJobs, Update, load_record, readable_jobs

_RETRIES = 50
# The pending-jobs bound and the insert in one step: no two creates can both see room for one.
# KEYS: record, data, index, active. ARGV: record, data, ttl ms, id, bound (0: none).
# Answers {1, active before} when created, {0, active} when the bound is reached.
_CREATE = """
local active = redis.call('SCARD', KEYS[4])
local bound = tonumber(ARGV[5])
if bound > 0 and active >= bound then return {0, active} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], 0, ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
return {1, active}
"""


class RedisJobStore(JobStore):
    def __init__(self, url: str, prefix: str, ttl_s: float, password: str | None = None) -> None:
        super().__init__(ttl_s)
        tag = "{" + prefix + "}"
        self._job = f"{tag}:job:"
        self._data = f"{tag}:jobdata:"
        self.index = f"{tag}:jobs"
        self.active = f"{tag}:jobs:active"
        self._redis = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, **({"password": password} if password else {})
        )
        self._ttl_ms = int(ttl_s * 1000)
        self.ended = "{" + prefix + "}:jobs:ended"
        self._create = self._redis.register_script(_CREATE)

    def create(self, record: dict, data: bytes, max_active: int | None = None) -> None:
        job_id = record["id"]
        keys = [self._job + job_id, self._data + job_id, self.index, self.active]
        args = [json.dumps(record), data, self._ttl_ms, job_id, max_active or 0]
        created, active = self._create(keys=keys, args=args)
        if not created:
            raise TooManyJobs(int(active))

    def purge(self, job_id: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._job + job_id, self._data + job_id)
        pipe.zrem(self.index, job_id)
        pipe.srem(self.active, job_id)
        return bool(pipe.execute()[0])

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
                    pipe.set(key, json.dumps(new), px=self._ttl_ms)
                    if new["state"] not in ACTIVE:
                        if before in ACTIVE:  # this change ends the job: count it
                            pipe.hincrby(self.ended, new["state"], 1)
                        pipe.srem(self.active, job_id)
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
