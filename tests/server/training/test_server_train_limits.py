"""The pending-jobs bound: past XPEFT_MAX_PENDING_JOBS a training request is refused, nothing queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xpeft.server.errors import ApiError
from xpeft.server.jobs.queue import make_queue
from xpeft.server.jobs.request import parse_train_request
from xpeft.server.jobs.service import JobService
from xpeft.server.settings import Settings


def test_past_the_bound_a_job_is_refused_with_retry_after_and_nothing_is_queued(tmp_path: Path) -> None:
    settings = Settings(sqlite_path=tmp_path / "store.sqlite3", max_pending_jobs=2, embedded_trainer=False)
    body = {"examples": [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(8)], "epochs": 1}
    request = parse_train_request(json.dumps(body).encode(), "application/json", {}, settings)
    service = JobService(settings)
    first = service.submit("p-1", request)
    second = service.submit("p-2", request)
    with pytest.raises(ApiError) as refused:
        service.submit("p-3", request)
    assert (refused.value.status, refused.value.code) == (503, "too_many_jobs")
    assert refused.value.headers == {"Retry-After": "10"}
    jobs = service.jobs()
    assert sorted(jobs.active_ids()) == sorted([first["id"], second["id"]])
    huey, _ = make_queue(settings)
    assert huey.pending_count() == 2  # the refused request reached neither the records nor the queue
    service.cancel(first["id"])  # a cancelled job frees its place
    assert service.submit("p-3", request)["state"] == "queued"
