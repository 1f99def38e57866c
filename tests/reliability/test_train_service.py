"""Training as a service under faults: every job ends in a clear state, nothing is half-stored.

- a worker killed (SIGKILL) mid-job: the job fails ``worker_lost`` within the lease, and no
  profile version is written by it; a worker stopped (SIGTERM) mid-job queues it again;
- a server restarted while jobs are queued (the embedded store, its trainer off at first): the
  restarted server starts its trainer and the jobs run;
- a cancelled job, queued or running: it ends ``cancelled`` and nothing is stored;
- 100 malformed training requests: each a 4xx with a stable code; nothing queued or stored.

Real processes (``xpeft serve`` and ``xpeft worker``), the shared test Redis under a fresh
prefix, the real MiniLM; jobs train a 64-example set.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from testsupport.processes import ServerProcess, running
from testsupport.workers import WorkerProcess, job, wait_job
from xpeft.server.jobs.queue import make_queue
from xpeft.server.settings import Settings
from xpeft.training.data import Dataset

ADMIN = "rel-train-admin-4b7e21"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
LEASE_S = 3.0
LONG = {"epochs": 30, "batch_size": 2, "max_length": 16}  # ~900 steps: long enough to interrupt


def examples(data: Dataset) -> list[dict]:
    return [{"text": x, "label": y} for x, y in zip(data.inputs, data.labels, strict=True)]


@pytest.fixture(scope="module")
def redis_env(rel_redis_url: str) -> Iterator[dict[str, str]]:
    prefix = f"xpeft-rtrain-{uuid.uuid4().hex[:10]}"
    yield {
        "XPEFT_REDIS_URL": rel_redis_url,
        "XPEFT_REDIS_PREFIX": prefix,
        "XPEFT_ADMIN_TOKEN": ADMIN,
        "XPEFT_TRAIN_LEASE_S": str(LEASE_S),
        "XPEFT_TRAIN_HEARTBEAT_S": "0.3",
        "XPEFT_MAX_TRAIN_EXAMPLES": "100",
        "XPEFT_MAX_TEXT_CHARS": "100",
    }
    client = redis.Redis.from_url(rel_redis_url)
    keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def server(
    redis_env, rel_bank_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess("rtrain", redis_env, rel_bank_path, tmp_path_factory.mktemp("rtrain") / "server.log")
    with running(proc):
        yield proc


def start_worker(env: dict[str, str], bank: Path, log: Path) -> WorkerProcess:
    return WorkerProcess({**env, "XPEFT_TRAIN_NICE": "0"}, bank, log).start()


def profile_status(url: str, profile_id: str) -> int:
    return httpx.get(f"{url}/profiles/{profile_id}", headers=AUTH, timeout=10).status_code


def train_until_running(url: str, profile_id: str, data: Dataset) -> str:
    """POST a long job and wait until its worker has trained a few steps; its id."""
    posted = httpx.post(
        f"{url}/profiles/{profile_id}/train", json={"examples": examples(data), **LONG}, headers=AUTH
    )
    assert posted.status_code == 202, posted.text
    job_id = posted.json()["id"]
    running = wait_job(url, job_id, AUTH, until=("running",), step_at_least=3)
    assert running["state"] == "running", running
    return job_id


def test_worker_killed_mid_job_fails_the_job_and_stores_nothing(
    server, redis_env, rel_bank_path, separable, tmp_path
) -> None:
    worker = start_worker(redis_env, rel_bank_path, tmp_path / "worker.log")
    try:
        job_id = train_until_running(server.url, "killed-1", separable)
        worker.kill()
        killed_at = time.monotonic()
        record = wait_job(server.url, job_id, AUTH, timeout=LEASE_S + 30)
        assert record["state"] == "failed" and record["error"]["code"] == "worker_lost", record
        assert time.monotonic() - killed_at < LEASE_S + 15
        assert profile_status(server.url, "killed-1") == 404  # no version written by the dead worker
        # a worker started afterwards does not resurrect it
        late = start_worker(redis_env, rel_bank_path, tmp_path / "late.log")
        try:
            time.sleep(2)
            assert job(server.url, job_id, AUTH)["state"] == "failed"
        finally:
            late.stop()
    finally:
        worker.stop()
    assert profile_status(server.url, "killed-1") == 404


def test_worker_stopped_mid_job_queues_it_again(
    server, redis_env, rel_bank_path, separable, tmp_path
) -> None:
    """SIGTERM (a deploy, a scale-down) is not a crash: the job goes back to the queue at once."""
    worker = start_worker(redis_env, rel_bank_path, tmp_path / "worker.log")
    try:
        job_id = train_until_running(server.url, "stopped-1", separable)
    finally:
        worker.stop()  # SIGTERM, then waits for the process to exit
    record = job(server.url, job_id, AUTH)
    assert record["state"] == "queued" and record["attempts"] == 1 and record["progress"] is None, record
    assert "queued again" in worker.log_path.read_text()
    assert profile_status(server.url, "stopped-1") == 404
    cancelled = httpx.delete(f"{server.url}/jobs/{job_id}", headers=AUTH).json()
    assert cancelled["state"] == "cancelled"


def test_cancelled_jobs_end_cancelled_and_store_nothing(
    server, redis_env, rel_bank_path, separable, tmp_path
) -> None:
    body = {"examples": examples(separable), **LONG}
    queued = httpx.post(f"{server.url}/profiles/cancel-q/train", json=body, headers=AUTH).json()
    cancelled = httpx.delete(f"{server.url}/jobs/{queued['id']}", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"  # no worker yet: at once
    worker = start_worker(redis_env, rel_bank_path, tmp_path / "worker.log")
    try:
        running = httpx.post(f"{server.url}/profiles/cancel-r/train", json=body, headers=AUTH).json()
        wait_job(server.url, running["id"], AUTH, until=("running",), step_at_least=2)
        asked = httpx.delete(f"{server.url}/jobs/{running['id']}", headers=AUTH).json()
        assert asked["state"] in ("running", "cancelled") and asked.get("cancel_requested", True)
        record = wait_job(server.url, running["id"], AUTH, timeout=60)
        assert record["state"] == "cancelled", record
        assert record["progress"]["step"] < record["progress"]["total"]  # it stopped early
        # the worker skipped the job cancelled while queued: it never claimed it
        skipped = job(server.url, queued["id"], AUTH)
        assert skipped["state"] == "cancelled" and skipped["attempts"] == 0 and skipped.get("worker") is None
    finally:
        worker.stop()
    assert profile_status(server.url, "cancel-q") == 404
    assert profile_status(server.url, "cancel-r") == 404


def _malformed(rng: random.Random, good: list[dict]) -> tuple[dict, object, bytes | None]:
    """One malformed request: (headers, json body or None, raw body or None)."""
    kind = rng.randrange(10)
    headers = dict(AUTH)
    if kind == 0:
        return (
            headers,
            {"examples": [dict(e, label=rng.choice([None, True, 1.5, [], {}])) for e in good[:4]]},
            None,
        )
    if kind == 1:
        return headers, {"examples": [{"text": "x", "label": "same"}] * rng.randint(2, 40)}, None
    if kind == 2:
        return headers, {"examples": good, "method": rng.choice(["lora", "", "HARD", 3])}, None
    if kind == 3:
        return headers, {"examples": good, "epochs": rng.choice([0, -1, 10_000, 2.5, "3", None])}, None
    if kind == 4:
        return headers, {"examples": [{"text": "y" * rng.randint(101, 400), "label": "a"}, *good]}, None
    if kind == 5:
        return (
            headers,
            {"examples": [{"text": "a", "label": str(i)} for i in range(rng.randint(101, 150))]},
            None,
        )
    if kind == 6:
        return headers, {"examples": good, "eval_fraction": rng.choice([-0.1, 0.6, 1, "x"])}, None
    if kind == 7:
        return (
            {**headers, "Content-Type": "application/json"},
            None,
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))),
        )
    if kind == 8:
        return (
            {**headers, "Content-Type": "text/tab-separated-values"},
            None,
            rng.choice([b"", b"sentence\tlabel\n", b"a\tb\n1\t2\n", b"\xff" * 10]),
        )
    return (
        {**headers, "Content-Type": rng.choice(["text/plain", "application/xml", "image/png"])},
        None,
        b"sentence\tlabel\nx\ty\n",
    )


def test_hundred_malformed_requests_each_refused_with_a_code_nothing_queued(
    server, redis_env, separable
) -> None:
    settings = Settings(redis_url=redis_env["XPEFT_REDIS_URL"], redis_prefix=redis_env["XPEFT_REDIS_PREFIX"])
    huey, _ = make_queue(settings)
    queued_before = huey.pending_count()
    jobs_before = httpx.get(f"{server.url}/jobs", params={"limit": 1000}, headers=AUTH).json()["jobs"]
    rng = random.Random(11)
    good = examples(separable)
    codes = set()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for n in range(100):
            headers, body, raw = _malformed(rng, good)
            response = client.post(f"/profiles/malformed-{n}/train", json=body, content=raw, headers=headers)
            assert 400 <= response.status_code < 500, (n, response.status_code, response.text)
            error = response.json()
            assert error["error"] in {
                "invalid_request",
                "bad_data",
                "bad_argument",
                "unsupported_media_type",
            }, error
            assert error["message"], error
            codes.add(error["error"])
    assert len(codes) == 4  # every kind of refusal occurred
    assert huey.pending_count() == queued_before
    assert httpx.get(f"{server.url}/jobs", params={"limit": 1000}, headers=AUTH).json()["jobs"] == jobs_before
    listed = httpx.get(f"{server.url}/profiles", params={"limit": 1000}, headers=AUTH).json()["profiles"]
    assert not [p for p in listed if p["id"].startswith("malformed-")]


def test_jobs_queued_before_a_restart_run_after_it(rel_bank_path, separable, tmp_path) -> None:
    sqlite = tmp_path / "restart.sqlite3"
    env = {"XPEFT_SQLITE_PATH": str(sqlite), "XPEFT_ADMIN_TOKEN": ADMIN, "XPEFT_EMBEDDED_TRAINER": "false"}
    first = ServerProcess("restart-1", env, rel_bank_path, tmp_path / "first.log")
    first.start()
    try:
        first.wait_ready()
        body = {"examples": examples(separable), "epochs": 1, "batch_size": 16, "max_length": 16}
        ids = [
            httpx.post(f"{first.url}/profiles/after-{n}/train", json=body, headers=AUTH).json()["id"]
            for n in range(2)
        ]
        time.sleep(1)
        assert [job(first.url, i, AUTH)["state"] for i in ids] == ["queued", "queued"]  # no trainer runs
    finally:
        first.stop()
    second = ServerProcess(
        "restart-2", {**env, "XPEFT_EMBEDDED_TRAINER": "true"}, rel_bank_path, tmp_path / "second.log"
    )
    second.start()
    try:
        second.wait_ready()
        for job_id, n in zip(ids, range(2), strict=True):
            record = wait_job(second.url, job_id, AUTH, timeout=240)
            assert record["state"] == "succeeded", (record, second.log_text()[-3000:])
            assert profile_status(second.url, f"after-{n}") == 200
    finally:
        second.stop()
