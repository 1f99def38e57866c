"""One tenant cannot starve or bloat the service for the others, over HTTP, on both stores.

Two real servers with two tenants' predict tokens: ``r`` on the shared test Redis (no trainer
runs: jobs stay queued), ``s`` on an embedded SQLite file (its trainer off). Each test is one
finding of a hostile pass: a predict too costly for one request, a tenant filling the training
queue, a job too long for the trainer, job records that grow with their labels, and a listing
that grows with them.
"""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest
import redis

from xpeft.server.jobs.records_redis import RedisJobStore
from xpeft.server.jobs.records_sqlite import SQLiteJobStore

ADMIN = "share-admin-token-3f8a1c"
TENANTS = {"share-acme-token-91b2d4": ["acme-"], "share-beta-token-c0e7a5": ["beta-"]}
ACME, BETA = ({"Authorization": f"Bearer {t}"} for t in TENANTS)
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PER_TENANT = 3
WORK = 600  # examples x epochs per job


@pytest.fixture(scope="module")
def servers(serve, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory):
    sqlite_path = tmp_path_factory.mktemp("share-sqlite") / "s.sqlite3"
    common = {
        "XPEFT_ADMIN_TOKEN": ADMIN,
        "XPEFT_PREDICT_TOKENS": json.dumps(TENANTS),
        "XPEFT_MAX_REQUEST_TOKENS": "300",
        "XPEFT_MAX_PENDING_JOBS": "50",
        "XPEFT_MAX_PENDING_JOBS_PER_TENANT": str(PER_TENANT),
        "XPEFT_MAX_TRAIN_EXAMPLE_EPOCHS": str(WORK),
        "XPEFT_MAX_JOB_RECORDS_PER_TENANT": "5",
        "XPEFT_MAX_LABELS": "1000",
        "XPEFT_MAX_JOBS_PAGE_BYTES": "4096",
    }
    prefix = f"{redis_prefix}-share"
    r = serve("share-r", {**common, "XPEFT_REDIS_URL": redis_url, "XPEFT_REDIS_PREFIX": prefix})
    s = serve("share-s", {**common, "XPEFT_SQLITE_PATH": str(sqlite_path), "XPEFT_EMBEDDED_TRAINER": "false"})
    return {"r": (r.url, (redis_url, prefix)), "s": (s.url, sqlite_path)}


STORES = ["r", "s"]


def examples(n: int, labels: list[str]) -> list[dict]:
    return [{"text": f"example number {i}", "label": labels[i % len(labels)]} for i in range(n)]


def all_jobs(url: str) -> list[dict]:
    """Every job, page by page (pages are bounded in bytes, so a page may hold fewer than asked)."""
    jobs, cursor = [], None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{url}/jobs", params=params, headers=AUTH).json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return jobs


def cancel_all(url: str) -> None:
    for job in all_jobs(url):
        if job["state"] in ("queued", "running"):
            httpx.delete(f"{url}/jobs/{job['id']}", headers=AUTH)


def test_a_predict_costing_more_tokens_than_the_bound_is_refused_with_its_cost(
    servers, profile_bytes
) -> None:
    url = servers["r"][0]
    assert httpx.put(f"{url}/profiles/acme-cost", content=profile_bytes(7), headers=AUTH).status_code == 201
    long = "word " * 200  # far past 300 tokens once padded, times 4 rows
    refused = httpx.post(f"{url}/profiles/acme-cost/predict", json={"inputs": [long] * 4}, headers=ACME)
    assert refused.status_code == 413, refused.text
    body = refused.json()
    assert body["error"] == "too_many_tokens" and body["limit"] == 300 and body["cost"] > 300
    served = httpx.post(f"{url}/profiles/acme-cost/predict", json={"inputs": ["short"] * 4}, headers=ACME)
    assert served.status_code == 200 and len(served.json()["predictions"]) == 4


@pytest.mark.parametrize("store", STORES)
def test_one_tenant_filling_its_share_of_the_queue_leaves_room_for_another(servers, store: str) -> None:
    url = servers[store][0]
    cancel_all(url)
    body = {"examples": examples(8, ["neg", "pos"]), "epochs": 1}
    for _ in range(PER_TENANT):
        assert httpx.post(f"{url}/profiles/acme-q/train", json=body, headers=ACME).status_code == 202
    refused = httpx.post(f"{url}/profiles/acme-q/train", json=body, headers=ACME)
    assert refused.status_code == 503 and refused.json()["error"] == "too_many_jobs"
    assert "of this tenant" in refused.json()["message"]
    # the admin training acme's profiles counts against acme's share too
    assert httpx.post(f"{url}/profiles/acme-q/train", json=body, headers=AUTH).status_code == 503
    other = httpx.post(f"{url}/profiles/beta-q/train", json=body, headers=BETA)
    assert other.status_code == 202, other.text
    cancel_all(url)


@pytest.mark.parametrize("store", STORES)
def test_a_job_asking_more_examples_times_epochs_than_the_bound_is_refused(servers, store: str) -> None:
    url = servers[store][0]
    cancel_all(url)
    before = all_jobs(url)
    body = {"examples": examples(200, ["neg", "pos"]), "epochs": 4}  # 800 > 600
    refused = httpx.post(f"{url}/profiles/beta-big/train", json=body, headers=BETA)
    assert refused.status_code == 422 and refused.json()["error"] == "training_too_large", refused.text
    assert all_jobs(url) == before  # nothing queued
    body["epochs"] = 3  # 600: allowed
    assert httpx.post(f"{url}/profiles/beta-big/train", json=body, headers=BETA).status_code == 202
    cancel_all(url)


def _kept(store: str, where: object) -> tuple[int, int]:
    """Bytes the store keeps for jobs (records and examples), and how many records."""
    if store == "s":
        with sqlite3.connect(f"file:{where}?mode=ro", uri=True) as db:
            size, count = db.execute(
                "SELECT sum(length(CAST(record AS BLOB)) + coalesce(length(data), 0)), count(*) FROM jobs"
            ).fetchone()
        return int(size), int(count)
    url, prefix = where  # type: ignore[misc]
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{{{prefix}}}:job*"))
        records = [k for k in keys if k.startswith(f"{{{prefix}}}:job:".encode())]
        return sum(client.memory_usage(k) or 0 for k in keys), len(records)
    finally:
        client.close()


@pytest.mark.parametrize("store", STORES)
def test_job_records_stay_small_and_bounded_per_tenant_whatever_their_labels(servers, store: str) -> None:
    url, where = servers[store]
    cancel_all(url)
    labels = [f"\N{GRINNING FACE}{i:03d}" + "\N{SNOWMAN}" * 90 for i in range(400)]  # 400 long emoji labels
    body = {"examples": examples(400, labels), "epochs": 1, "eval_fraction": 0}
    for _ in range(8):
        posted = httpx.post(f"{url}/profiles/acme-big/train", json=body, headers=ACME)
        assert posted.status_code == 202, posted.text
        job = posted.json()
        assert job["label_count"] == 400 and 1 <= len(job["labels"]) < 20  # a summary within 1 KiB
        assert len("".join(job["labels"]).encode()) <= 1024
        assert job["labels"][0] == labels[0]  # UTF-8 text, shown as sent
        assert "worker" not in job and "tenant" not in job  # no host, pid or tenant key shown
        assert httpx.delete(f"{url}/jobs/{job['id']}", headers=ACME).json()["state"] == "cancelled"
    size, count = _kept(store, where)
    assert size / count <= 5000, (size, count)  # 1,000 cancelled jobs: at most 5 MB
    # the tenant keeps at most 5 finished records, the newest
    acme = [j["id"] for j in all_jobs(url) if j["profile_id"] == "acme-big"]
    assert len(acme) == 5 and acme[0] == job["id"]


@pytest.mark.parametrize("store", STORES)
def test_a_page_of_jobs_is_bounded_in_bytes_and_paging_still_reaches_every_job(servers, store: str) -> None:
    url = servers[store][0]
    cancel_all(url)
    labels = [f"label-{i:03d}-" + "x" * 80 for i in range(30)]
    body = {"examples": examples(60, labels), "epochs": 1, "eval_fraction": 0}
    ids = set()
    for _ in range(3):
        posted = httpx.post(f"{url}/profiles/beta-page/train", json=body, headers=BETA)
        assert posted.status_code == 202, posted.text
        ids.add(posted.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        page = httpx.get(
            f"{url}/jobs", params={"limit": 100, **({"cursor": cursor} if cursor else {})}, headers=AUTH
        )
        assert len(page.content) <= 4096 + 2048, len(page.content)  # one record past the budget at most
        seen += [j["id"] for j in page.json()["jobs"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert ids <= set(seen) and len(seen) == len(set(seen))
    cancel_all(url)


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_the_training_queue_takes_tenants_in_turn(
    backend: str, redis_url: str, redis_prefix: str, tmp_path
) -> None:
    store = (
        RedisJobStore(redis_url, f"{redis_prefix}-turns", 3600)
        if backend == "redis"
        else SQLiteJobStore(tmp_path / "jobs.sqlite3", 3600)
    )
    try:
        ids = {}
        for n, tenant in enumerate(["a"] * 5 + ["b", "c"]):
            job_id = f"{n:020x}"
            store.create({"id": job_id, "profile_id": tenant, "state": "queued", "tenant": tenant}, b"{}")
            ids[job_id] = tenant
        order = []
        while (record := store.claim_next("w:1:x")) is not None:
            order.append(record["tenant"])
        # a's five queued first; b and c each wait one turn, not five
        assert order == ["a", "b", "c", "a", "a", "a", "a"]
        assert store.queued() == []
    finally:
        store.close()


@pytest.mark.parametrize("store", STORES)
def test_a_resent_training_post_with_its_idempotency_key_returns_the_first_job(servers, store: str) -> None:
    url = servers[store][0]
    cancel_all(url)
    body = {"examples": examples(8, ["neg", "pos"]), "epochs": 1}
    key = {"Idempotency-Key": "retry-7f3a"}
    first = httpx.post(f"{url}/profiles/beta-idem/train", json=body, headers={**BETA, **key})
    again = httpx.post(f"{url}/profiles/beta-idem/train", json=body, headers={**BETA, **key})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotency" not in again.json()
    assert [j["id"] for j in all_jobs(url) if j["profile_id"] == "beta-idem"] == [first.json()["id"]]
    # the same key from another tenant, or for another profile, is another request
    other = httpx.post(f"{url}/profiles/acme-idem/train", json=body, headers={**ACME, **key})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    bad = httpx.post(
        f"{url}/profiles/beta-idem/train", json=body, headers={**BETA, "Idempotency-Key": "x" * 200}
    )
    assert bad.status_code == 422
    cancel_all(url)


def test_a_requests_tenant_is_its_tokens_prefixes_else_the_owner_of_the_id() -> None:
    from starlette.requests import Request

    from xpeft.server.auth import Authorizer
    from xpeft.server.settings import Settings

    auth = Authorizer(Settings(admin_token=ADMIN, predict_tokens=json.dumps(TENANTS)))

    def tenant(headers: dict[str, str], profile_id: str) -> str:
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        return auth.tenant_key(Request({"type": "http", "headers": raw}), profile_id)

    assert tenant(ACME, "acme-1") == tenant(AUTH, "acme-2") == "token:acme-"  # admin on acme's ids: acme
    assert tenant(BETA, "beta-x") != tenant(ACME, "acme-1")
    assert tenant(AUTH, "solo_reviews") == tenant({}, "solo-tickets") == "id:solo"  # no tenant owns it
    assert tenant(AUTH, "other") != tenant(AUTH, "solo")


def test_a_short_predict_is_answered_before_another_tenants_long_ones_queued_ahead_of_it(
    serve, profile_bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Over HTTP: two long requests of one tenant, queued first, run in parts of one batch; the other
    tenant's one-text predict, sent after them, is answered before either (first come, first
    served would answer it last)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {
        "XPEFT_ADMIN_TOKEN": ADMIN,
        "XPEFT_PREDICT_TOKENS": json.dumps(TENANTS),
        "XPEFT_SQLITE_PATH": str(tmp_path_factory.mktemp("fair") / "s.sqlite3"),
        "XPEFT_MAX_BATCH_TOKENS": "256",
        "XPEFT_REQUEST_TIMEOUT_S": "120",
    }
    url = serve("share-fair", env).url
    for pid in ("acme-long", "beta-short"):
        assert httpx.put(f"{url}/profiles/{pid}", content=profile_bytes(3), headers=AUTH).status_code == 201
    long_inputs = ["a long review that goes on " * 40] * 32  # 32 rows at 128 tokens: 16 batches of 256

    def predict(pid: str, inputs: list[str], headers: dict[str, str]) -> float:
        answer = httpx.post(
            f"{url}/profiles/{pid}/predict", json={"inputs": inputs}, headers=headers, timeout=120
        )
        assert answer.status_code == 200, answer.text
        return time.monotonic()

    def queued() -> float:
        metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
        return next(
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("xpeft_queue_depth ")
        )

    with ThreadPoolExecutor(3) as pool:
        heavy = [pool.submit(predict, "acme-long", long_inputs, ACME) for _ in range(2)]
        deadline = time.monotonic() + 60
        while queued() < 2 and time.monotonic() < deadline:  # both long requests tokenized and queued
            time.sleep(0.01)
        light = pool.submit(predict, "beta-short", ["short"], BETA)
        done_light, done_heavy = light.result(), [h.result() for h in heavy]
    assert done_light < min(done_heavy)
