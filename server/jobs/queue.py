"""The job queue (Huey) and the job records, opened from the server's settings.

Huey has a Redis and a SQLite backend behind one API, so the shared-Redis deployment and the
embedded store run the same code: the queue lives beside the profiles (the same Redis, or the
same SQLite file). The queue only carries job ids; the records (state, progress, result) are
ours (:mod:`xpeft.server.jobs.records`), because a replica must answer ``GET /jobs`` for any
job and a dead worker must be detectable. Huey keeps no results (``results=False``).
"""

from __future__ import annotations

from typing import Any

from huey import RedisHuey, SqliteHuey
from huey.api import Huey

from xpeft.server.jobs.records import JobStore
from xpeft.server.settings import Settings

TASK_NAME = "xpeft.train"


def _password(settings: Settings) -> str | None:
    return settings.redis_password.get_secret_value() if settings.redis_password else None


def open_job_store(settings: Settings) -> JobStore:
    """Job records in the store the settings name."""
    url = settings.jobs_url()
    if url:
        from xpeft.server.jobs.records_redis import RedisJobStore

        return RedisJobStore(
            url,
            settings.redis_prefix,
            settings.job_ttl_s,
            _password(settings),
            max_tenant_records=settings.max_job_records_per_tenant,
        )
    from xpeft.server.jobs.records_sqlite import SQLiteJobStore

    settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    return SQLiteJobStore(
        settings.sqlite_path, settings.job_ttl_s, max_tenant_records=settings.max_job_records_per_tenant
    )


def _run_task(job_id: str) -> None:
    from xpeft.server.jobs.trainer import run_job

    run_job(job_id)


def make_queue(settings: Settings) -> tuple[Huey, Any]:
    """The Huey instance and its one task (call it with a job id to enqueue the job)."""
    huey: Huey
    url = settings.jobs_url()
    if url:
        from redis import ConnectionPool

        password = _password(settings)
        pool = ConnectionPool.from_url(url, **({"password": password} if password else {}))
        huey = RedisHuey(f"{settings.redis_prefix}.train", results=False, connection_pool=pool)
    else:
        huey = SqliteHuey("xpeft-train", results=False, filename=str(settings.sqlite_path))
    task = huey.task(name=TASK_NAME)(_run_task)
    return huey, task
