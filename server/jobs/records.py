"""Job records: what ``GET /jobs/{id}`` shows, kept in the profile store's backend.

A record is a JSON object; every change is a read-modify-write in one transaction of the
backend (Redis WATCH/MULTI, a SQLite IMMEDIATE transaction), so two processes never interleave
their changes. The state machine::

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled

A running job belongs to one worker attempt (``worker``, a random token) until it ends; that
worker refreshes ``heartbeat_at``. A running job whose heartbeat is older than the lease failed
(``worker_lost``): whoever reads it first (a replica answering ``GET /jobs``, or a worker's
reaper) records that, and the dead worker's token no longer owns it, so nothing it might still
write is accepted.
"""

from __future__ import annotations

import abc
import builtins
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable

from xpeft.profiles.text import clean_strings
from xpeft.server.errors import CorruptRecord

JOB_ID = re.compile(r"^[0-9a-f]{20}$")
ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")

Update = Callable[[dict], "dict | None"]  # the new record, or None to leave it as it is
log = logging.getLogger("xpeft.server")


class TooManyJobs(Exception):
    """``create`` refused: ``active`` jobs are queued or running already (the bound is reached);
    ``tenant``: the bound was the tenant's own, not the global one."""

    def __init__(self, active: int, tenant: bool = False) -> None:
        super().__init__(f"{active} jobs are active" + (" for this tenant" if tenant else ""))
        self.active = active
        self.tenant = tenant


def next_in_turn(queued: builtins.list[tuple[str, str]], last: str | None) -> str | None:
    """Round robin across tenants: of ``queued`` ``(job id, tenant)`` pairs (oldest first), the
    oldest job of the first tenant after ``last`` in tenant order (wrapping round), so that one
    tenant's hundred queued jobs wait their turn behind another tenant's one."""
    if not queued:
        return None
    oldest: dict[str, str] = {}
    for job_id, tenant in queued:
        oldest.setdefault(tenant, job_id)
    tenants = sorted(oldest)
    after = [t for t in tenants if last is not None and t > last]
    return oldest[(after or tenants)[0]]


def load_record(job_id: str, raw: str | bytes) -> dict:
    """A stored job record; :class:`CorruptRecord` when it is not a record this version can show
    (not a JSON object, fields missing, or a string that is not text): it costs that one job,
    never a listing."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        record = None
    if (
        not isinstance(record, dict)
        or not all(isinstance(record.get(key), str) for key in ("id", "profile_id", "state"))
        or not all(
            isinstance(record.get(key), dict | None) for key in ("options", "progress", "result", "error")
        )
        or not isinstance(record.get("worker"), str | None)
        or not clean_strings(record)
    ):
        raise CorruptRecord(job_id, "its stored record is not a readable job record", kind="job")
    return record


def readable_jobs(rows: builtins.list[tuple[str, str | bytes]]) -> builtins.list[dict]:
    """The records of a page of ``(id, raw)`` rows, leaving out (and logging) damaged ones."""
    records = []
    for job_id, raw in rows:
        try:
            records.append(load_record(job_id, raw))
        except CorruptRecord as exc:
            log.error(
                "listing leaves out job %r: %s (DELETE /jobs/{id}?purge=true removes it)", job_id, exc.message
            )
    return records


def dump_record(record: dict) -> str:
    """A record as stored: UTF-8 text rather than ``\\u`` escapes (an emoji is 4 bytes, not 12),
    no spaces."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def new_job_id() -> str:
    """12 hex digits of milliseconds, then 8 random: ids sort by creation time."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def worker_token() -> str:
    """host:pid:attempt: the operator's way to find a worker in the logs (never shown to tenants)."""
    return f"{os.uname().nodename[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class JobStore(abc.ABC):
    """Job records and the examples each job trains on. Synchronous: a worker calls it from its
    own threads, the server through ``asyncio.to_thread``."""

    def __init__(self, ttl_s: float, max_tenant_records: int = 0) -> None:
        self.ttl_s = ttl_s
        #: finished records kept per tenant (the oldest go first as new jobs come); 0: no cap
        self.max_tenant_records = max_tenant_records

    # -- backend ---------------------------------------------------------------------------
    @abc.abstractmethod
    def create(
        self, record: dict, data: bytes, max_active: int | None = None, max_tenant_active: int | None = None
    ) -> str | None:
        """Store a new queued record and its examples; with ``max_active``, only while fewer jobs
        are active, and with ``max_tenant_active`` only while fewer jobs of ``record["tenant"]``
        are, checked and written in one atomic step (else :class:`TooManyJobs`). A record with an
        ``idempotency`` key that an earlier job has (within the TTL) creates nothing: the earlier
        job's id is returned instead (``None``: created)."""

    @abc.abstractmethod
    def queued(self) -> builtins.list[tuple[str, str]]:
        """``(job id, tenant)`` of every queued job, oldest first."""

    @abc.abstractmethod
    def last_served(self) -> str | None:
        """The tenant whose job was claimed last (the round robin's position)."""

    @abc.abstractmethod
    def set_last_served(self, tenant: str) -> None: ...

    @abc.abstractmethod
    def purge(self, job_id: str) -> bool:
        """Delete a job's record and examples whatever its state (an operator removing a damaged
        record); ``False`` when there was none. A worker that held it loses it."""

    @abc.abstractmethod
    def get(self, job_id: str) -> dict | None: ...

    @abc.abstractmethod
    def data(self, job_id: str) -> bytes | None:
        """The examples of a job (dropped once it ends)."""

    @abc.abstractmethod
    def update(self, job_id: str, fn: Update) -> dict | None:
        """Apply ``fn`` to the record atomically; the record as it is afterwards (``None``: no job)."""

    @abc.abstractmethod
    def list(self, cursor: str | None, limit: int) -> tuple[builtins.list[dict], str | None]:
        """Newest first; ``cursor`` is the last id of the previous page."""

    @abc.abstractmethod
    def active_ids(self) -> builtins.list[str]:
        """Ids of queued and running jobs."""

    @abc.abstractmethod
    def ended_counts(self) -> dict[str, int]:
        """How many jobs ended in each terminal state since the store began (counted in the same
        transaction as each job's last change, so a count is never lost or doubled; records
        expire, these counts do not): what ``xpeft_train_jobs_ended_total`` exports."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- state machine ---------------------------------------------------------------------
    def claim(self, job_id: str, worker: str) -> dict | None:
        """queued -> running for ``worker``; ``None`` when the job is not (or no longer) queued."""
        claimed: list[dict] = []

        def fn(rec: dict) -> dict | None:
            if rec["state"] != "queued":
                return None
            stamp = time.time()
            rec.update(state="running", worker=worker, started_at=stamp, heartbeat_at=stamp)
            rec["attempts"] = rec.get("attempts", 0) + 1
            claimed.append(rec)
            return rec

        self.update(job_id, fn)
        return claimed[0] if claimed else None

    def claim_next(self, worker: str) -> dict | None:
        """Claim the queued job whose tenant's turn it is (:func:`next_in_turn`); ``None`` when
        nothing is queued. Each queue message runs one job, not necessarily its own: a message
        carries a turn, and the turns go round the tenants."""
        for _ in range(20):  # another worker may claim the chosen job first: choose again
            job_id = next_in_turn(self.queued(), self.last_served())
            if job_id is None:
                return None
            record = self.claim(job_id, worker)
            if record is not None:
                self.set_last_served(record.get("tenant", ""))
                return record
        return None

    def heartbeat(self, job_id: str, worker: str, progress: dict | None = None) -> dict | None:
        """Refresh the lease (and progress); ``None`` when ``worker`` no longer owns the job."""
        owned: list[dict] = []

        def fn(rec: dict) -> dict | None:
            if rec["state"] != "running" or rec.get("worker") != worker:
                return None
            rec["heartbeat_at"] = time.time()
            if progress is not None:
                rec["progress"] = progress
            owned.append(rec)
            return rec

        self.update(job_id, fn)
        return owned[0] if owned else None

    def finish(self, job_id: str, worker: str, state: str, **fields: object) -> bool:
        """running -> ``state`` for the owning worker only; ``False`` when it lost the job."""
        assert state in TERMINAL
        done: list[bool] = []

        def fn(rec: dict) -> dict | None:
            if rec["state"] != "running" or rec.get("worker") != worker:
                return None
            rec.update(state=state, finished_at=time.time(), **fields)
            done.append(True)
            return rec

        self.update(job_id, fn)
        return bool(done)

    def requeue(self, job_id: str, worker: str) -> bool:
        """running -> queued again, for the owning worker that is stopping (not crashing)."""
        done: list[bool] = []

        def fn(rec: dict) -> dict | None:
            if rec["state"] != "running" or rec.get("worker") != worker or rec.get("cancel_requested"):
                return None
            rec.update(state="queued", worker=None, progress=None, started_at=None, heartbeat_at=None)
            done.append(True)
            return rec

        self.update(job_id, fn)
        return bool(done)

    def cancel(self, job_id: str) -> dict | None:
        """A queued job ends cancelled now; a running one is asked to stop (its worker ends it)."""

        def fn(rec: dict) -> dict | None:
            if rec["state"] == "queued":
                rec.update(state="cancelled", finished_at=time.time())
                return rec
            if rec["state"] == "running" and not rec.get("cancel_requested"):
                rec["cancel_requested"] = True
                return rec
            return None

        return self.update(job_id, fn)

    def expire(self, job_id: str, lease_s: float) -> dict | None:
        """The record, after failing it if its worker missed the lease."""

        def fn(rec: dict) -> dict | None:
            if rec["state"] != "running" or time.time() - rec.get("heartbeat_at", 0) <= lease_s:
                return None
            rec.update(
                state="failed",
                finished_at=time.time(),
                error={
                    "code": "worker_lost",
                    "message": f"the trainer stopped reporting for over {lease_s:g} s (it died or hung); "
                    "nothing was stored: submit the job again",
                },
            )
            return rec

        return self.update(job_id, fn)

    def reap(self, lease_s: float) -> int:
        """Fail every running job whose worker missed the lease; how many."""
        failed = 0
        for job_id in self.active_ids():
            rec = self.expire(job_id, lease_s)
            failed += rec is not None and rec.get("error", {}).get("code") == "worker_lost"
        return failed
