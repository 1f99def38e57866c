"""The server's side of training: create, read, list and cancel jobs; the embedded trainer child.

Everything here is synchronous I/O (the records' store, Huey's enqueue) run through
``asyncio.to_thread`` by the routes. With the embedded SQLite store and ``XPEFT_EMBEDDED_TRAINER``
(the default), one ``xpeft worker`` child runs beside the server: started at startup when jobs
are waiting (so queued jobs survive a restart), else at the first job, and restarted if it died.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

from xpeft.server.errors import ApiError
from xpeft.server.jobs.records import JobStore, TooManyJobs, new_job_id
from xpeft.server.jobs.request import TrainRequest
from xpeft.server.settings import Settings

log = logging.getLogger("xpeft.server")
#: labels a job record names (the first, in label order, whole, within a byte budget);
#: ``label_count`` tells how many there are
LABELS_SHOWN = 20
LABEL_BYTES_SHOWN = 1024


def label_summary(labels: list[str]) -> list[str]:
    """The first labels, at most :data:`LABELS_SHOWN` and :data:`LABEL_BYTES_SHOWN` bytes of UTF-8
    (at least one): a record's size must not grow with its labels."""
    shown: list[str] = []
    budget = LABEL_BYTES_SHOWN
    for label in labels[:LABELS_SHOWN]:
        budget -= len(label.encode())
        if budget < 0 and shown:
            break
        shown.append(label)
    return shown


class JobService:
    """Opened lazily (the first job request), so a server that never trains pays nothing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._jobs: JobStore | None = None
        self._task: Any = None
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @property
    def embedded(self) -> bool:
        return not self.settings.redis_url and self.settings.embedded_trainer

    def jobs(self) -> JobStore:
        with self._lock:
            if self._jobs is None:
                from xpeft.server.jobs.queue import make_queue, open_job_store

                self._jobs = open_job_store(self.settings)
                _, self._task = make_queue(self.settings)
            return self._jobs

    # -- requests --------------------------------------------------------------------------
    def submit(self, profile_id: str, request: TrainRequest, tenant: str = "") -> dict:
        """Queue a job of ``tenant``; its record."""
        return self.submit_once(profile_id, request, tenant)[0]

    def submit_once(
        self, profile_id: str, request: TrainRequest, tenant: str = "", idempotency_key: str | None = None
    ) -> tuple[dict, bool]:
        """Queue a job of ``tenant`` (whose share of the queue it takes: see ``claim_next``); the
        record, and whether it is new. A request that repeats an ``Idempotency-Key`` (of the same
        tenant and profile, within the records' TTL) queues nothing: the first job is returned."""
        jobs = self.jobs()
        job_id = new_job_id()
        labels = request.data.label_names()
        record = {
            "id": job_id,
            "profile_id": profile_id,
            "tenant": tenant,
            "state": "queued",
            "created_at": time.time(),
            "examples": len(request.data),
            # a bounded summary: the record's size must not grow with the label count
            "labels": label_summary(labels),
            "label_count": len(labels),
            "options": request.options(),
            "attempts": 0,
        }
        if idempotency_key:
            scoped = "\0".join((tenant, profile_id, idempotency_key)).encode()
            record["idempotency"] = hashlib.sha256(scoped).hexdigest()[:32]
        settings = self.settings
        try:  # the bounds are checked and the record written in one atomic step of the store
            prior = jobs.create(
                record,
                request.encoded_examples(),
                settings.max_pending_jobs,
                settings.max_pending_jobs_per_tenant,
            )
        except TooManyJobs as exc:
            whose, most = (
                ("of this tenant ", settings.max_pending_jobs_per_tenant)
                if exc.tenant
                else ("", settings.max_pending_jobs)
            )
            raise ApiError(
                503,
                "too_many_jobs",
                f"{exc.active} jobs {whose}are queued or running (at most {most}); retry later",
                headers={"Retry-After": "10"},
            ) from None
        if prior is not None:  # a resent request: its first job, nothing queued again
            return self.get(prior) or record, False
        try:
            self._task(job_id)
        except Exception:
            jobs.cancel(job_id)  # never leave a record that no worker will ever see
            raise
        if self.embedded:
            self.ensure_trainer()
        return record, True

    def _checked(self, record: dict) -> dict:
        """The record, failed first if its worker missed the lease (a write only in that case)."""
        lease = self.settings.train_lease_s
        if record["state"] == "running" and time.time() - record.get("heartbeat_at", 0) > lease:
            return self.jobs().expire(record["id"], lease) or record
        return record

    def get(self, job_id: str) -> dict | None:
        record = self.jobs().get(job_id)
        return None if record is None else self._checked(record)

    def list(self, cursor: str | None, limit: int) -> tuple[list[dict], str | None]:
        records, next_cursor = self.jobs().list(cursor, limit)
        return [self._checked(r) for r in records], next_cursor

    def ended_counts(self) -> dict[str, int] | None:
        """Jobs ended by state (the metric ``xpeft_train_jobs_ended_total``); ``None`` while the
        embedded store's file does not exist, so a scrape never creates one."""
        if not self.settings.jobs_url() and not self.settings.sqlite_path.exists():
            return None
        return self.jobs().ended_counts()

    def cancel(self, job_id: str) -> dict | None:
        return self.jobs().cancel(job_id)

    def purge(self, job_id: str) -> bool:
        return self.jobs().purge(job_id)

    # -- the embedded trainer ----------------------------------------------------------------
    def start(self) -> None:
        """At startup: with the embedded trainer, start it now if jobs are waiting."""
        if self.embedded and self.settings.sqlite_path.exists() and self.jobs().active_ids():
            self.ensure_trainer()

    def ensure_trainer(self) -> None:
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                return
            if self._child is not None:
                log.warning(
                    "the embedded trainer exited (status %s): starting it again", self._child.returncode
                )
            cmd = [sys.executable, "-m", "xpeft.cli", "worker", "--parent-pid", str(os.getpid())]
            env = {**os.environ, **_settings_env(self.settings)}
            self._child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
            log.info("embedded trainer started (pid %d)", self._child.pid)

    def stop(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        if self._jobs is not None:
            self._jobs.close()


def _settings_env(settings: Settings) -> dict[str, str]:
    """The settings a child trainer needs, as ``XPEFT_*`` variables (flags may have set them)."""
    env = {
        "XPEFT_SQLITE_PATH": str(settings.sqlite_path),
        "XPEFT_LOG_LEVEL": settings.log_level,
        "XPEFT_LOG_FORMAT": settings.log_format,
    }
    for name in ("bank", "model", "device", "dtype"):
        value = getattr(settings, name)
        if value is not None:
            env[f"XPEFT_{name.upper()}"] = str(value)
    return env
