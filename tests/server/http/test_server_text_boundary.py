"""The text boundary and everything checked before it is queued, over HTTP, on both stores.

Real processes: ``r`` serves from the shared test Redis (a fresh prefix, no trainer: jobs stay
queued), ``s`` from an embedded SQLite file (its trainer off, likewise). Each case is one row of
an attack on the server: a value that is valid JSON but not text, a record damaged in the store,
options the trainer would refuse, a job id probed with the wrong token, a client that hangs up.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from testsupport.processes import bearer
from xpeft.profiles.format_header import CRC, PREFIX, split

ADMIN = "text-admin-token-5b1f0c"
API = "text-api-token-8e4a27"
TENANTS = {"text-acme-token-2c9d71": ["acme-"], "text-beta-token-a07e3f": ["beta-"]}
ACME, BETA = list(TENANTS)
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PENDING = 5


@pytest.fixture(scope="module")
def servers(server_pair):
    """``r`` without a trainer (jobs stay queued), ``s`` with its embedded trainer off, likewise."""
    return server_pair(
        "text",
        {
            "XPEFT_ADMIN_TOKEN": ADMIN,
            "XPEFT_API_TOKEN": API,
            "XPEFT_PREDICT_TOKENS": json.dumps(TENANTS),
            "XPEFT_MAX_PENDING_JOBS": str(PENDING),
            "XPEFT_LOG_LEVEL": "info",
            "XPEFT_MAX_TEXT_CHARS": "200",
        },
        sqlite_env={"XPEFT_EMBEDDED_TRAINER": "false"},
    )


def _both(servers) -> list[str]:
    return [servers.r.url, servers.s.url]


def with_labels(data: bytes, labels: list[str]) -> bytes:
    """The same file with other header labels (escaped JSON, so a lone surrogate survives) and a fixed CRC."""
    version, raw, payload, _ = split(data)
    header = json.loads(raw)
    header["labels"] = labels
    encoded = json.dumps(header).encode()
    body = PREFIX.pack(b"\x89XPM", version, len(encoded)) + encoded + payload
    return body + CRC.pack(zlib.crc32(body))


def examples(n: int = 4, label: str = "neg", text: str = "a fine text") -> list[dict]:
    return [
        {"text": f"{text} {i}", "label": label if i == 0 else ("pos" if i % 2 else "neg")} for i in range(n)
    ]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    return body


def job_ids(url: str) -> list[str]:
    answer = httpx.get(f"{url}/jobs", params={"limit": 1000}, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    return [j["id"] for j in answer.json()["jobs"]]


def cancel_all(url: str) -> None:
    for job_id in job_ids(url):
        httpx.delete(f"{url}/jobs/{job_id}", params={"purge": "true"}, headers=AUTH, timeout=30)


# -- row 1: a profile whose label is not text is refused, and a damaged record never answers 500 --
def test_a_surrogate_label_in_a_header_is_refused_and_nothing_is_stored(servers, profile_bytes) -> None:
    bad = with_labels(profile_bytes(31), ["neg", "\ud800"])
    for url in _both(servers):
        body = assert_error(
            httpx.put(f"{url}/profiles/sur-1", content=bad, headers=AUTH), 422, "invalid_profile"
        )
        assert body["detail"] == "bad_header" and "surrogate" in body["message"]
        assert_error(httpx.get(f"{url}/profiles/sur-1", headers=AUTH), 404, "profile_not_found")
        assert httpx.get(f"{url}/profiles", headers=AUTH).status_code == 200
        control = with_labels(profile_bytes(31), ["neg", "p\x00s"])
        assert_error(
            httpx.put(f"{url}/profiles/sur-1", content=control, headers=AUTH), 422, "invalid_profile"
        )


def test_a_damaged_record_is_left_out_of_listings_and_the_operator_can_delete_it(
    servers, profile_bytes
) -> None:
    for url in _both(servers):
        for name in ("dmg-a", "dmg-b", "dmg-c"):
            assert httpx.put(f"{url}/profiles/{name}", content=profile_bytes(32), headers=AUTH).is_success
    # as an older version (or a hand edit) could have written them: valid JSON, not text
    meta = json.dumps({"labels": ["neg", "\ud800"], "kind": "hard"})
    store = redis.Redis.from_url(servers.redis_url)
    store.hset(f"{{{servers.prefix}}}:profile:dmg-b", "meta", meta)
    store.close()
    with sqlite3.connect(servers.sqlite_path) as db:
        db.execute("UPDATE profiles SET meta = ? WHERE id = 'dmg-b'", (meta,))
    for url in _both(servers):
        listed = httpx.get(f"{url}/profiles", params={"cursor": "dmg-", "limit": 1000}, headers=AUTH)
        assert listed.status_code == 200
        ids = [p["id"] for p in listed.json()["profiles"]]
        assert "dmg-a" in ids and "dmg-c" in ids and "dmg-b" not in ids
        assert_error(httpx.get(f"{url}/profiles/dmg-b", headers=AUTH), 409, "corrupt_record")
        assert httpx.delete(f"{url}/profiles/dmg-b", headers=AUTH).status_code == 200
        assert_error(httpx.get(f"{url}/profiles/dmg-b", headers=AUTH), 404, "profile_not_found")


# -- rows 2, 3, 5: the training route refuses what the trainer would, before anything is queued --
@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("surrogate_label", 422, "bad_data"),
        ("surrogate_text", 422, "bad_data"),
        ("control_label", 422, "bad_data"),
        ("deep_json", 422, "invalid_request"),
        ("k_over_n", 422, "bad_argument"),
        ("k_over_units", 422, "bad_argument"),
        ("seed_2_64", 422, "bad_argument"),
        ("negative_seed", 422, "bad_argument"),
        ("deep_jsonl", 422, "bad_data"),
        ("jsonl_not_object", 422, "bad_data"),
    ],
)
def test_training_requests_the_trainer_would_refuse_are_refused_before_queueing(
    servers, bank, case, status, code
) -> None:
    body: object = {"examples": examples()}
    content_type = "application/json"
    params: dict = {}
    if case == "surrogate_label":
        body = {"examples": [{"text": "good", "label": "\ud800"}, *examples(3)]}
    elif case == "surrogate_text":
        body = {"examples": [{"text": "good \udfff", "label": "pos"}, *examples(3)]}
    elif case == "control_label":
        body = {"examples": [{"text": "good", "label": "p\x1bos"}, *examples(3)]}
    elif case == "k_over_n":  # hard masks pick at most N adapters
        body = {"examples": examples(), "method": "hard", "k": bank.num_adapters + 1}
    elif case == "k_over_units":  # units (the default) pick at most N*r units
        body = {"examples": examples(), "k": bank.num_adapters * bank.bottleneck + 1}
    elif case == "seed_2_64":
        body = {"examples": examples(), "seed": 2**64}
    elif case == "negative_seed":
        body = {"examples": examples(), "seed": -1}
    raw = json.dumps(body).encode()
    if case == "deep_json":
        raw = b"[" * 100_000 + b"]" * 100_000
    elif case in ("deep_jsonl", "jsonl_not_object"):
        content_type = "application/jsonl"
        params = {"text_col": "text"}
        line = b"[" * 50_000 + b"]" * 50_000 if case == "deep_jsonl" else b"[1, 2]"
        raw = b'{"text": "good", "label": "pos"}\n' + line + b"\n"
    for url in _both(servers):
        before = job_ids(url)
        answer = httpx.post(
            f"{url}/profiles/acme-x/train",
            content=raw,
            params=params,
            headers={**bearer(ACME), "Content-Type": content_type},
            timeout=30,
        )
        assert_error(answer, status, code)
        assert job_ids(url) == before  # nothing queued
    assert "Traceback" not in servers.r.log_path.read_text() + servers.s.log_path.read_text()


def test_labels_that_look_numeric_but_are_not_integers_train_and_sort_as_text(servers) -> None:
    tsv = "sentence\tlabel\n" + "".join(f"text number {i}\t{'--1' if i % 2 else '2'}\n" for i in range(8))
    for url in _both(servers):
        answer = httpx.post(
            f"{url}/profiles/acme-n/train",
            content=tsv.encode(),
            params={"eval_fraction": "0"},
            headers={**AUTH, "Content-Type": "text/tab-separated-values"},
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        assert answer.json()["labels"] == ["--1", "2"]
        cancel_all(url)


# -- row 2: a damaged job record never breaks GET /jobs, and the operator can purge it -----------
def test_a_damaged_job_record_is_left_out_and_can_be_purged(servers) -> None:
    bad = {"id": "", "profile_id": "acme-x", "state": "failed", "labels": ["\ud800"]}
    good = "0" * 19 + "1"
    ids = {"redis": "00000000000000000aa1", "sqlite": "00000000000000000aa2"}
    store = redis.Redis.from_url(servers.redis_url)
    tag = "{" + servers.prefix + "}"
    store.set(f"{tag}:job:{ids['redis']}", json.dumps({**bad, "id": ids["redis"]}))
    store.zadd(f"{tag}:jobs", {ids["redis"]: 0})
    store.close()
    with sqlite3.connect(servers.sqlite_path) as db:
        db.execute(
            "INSERT INTO jobs (id, state, record, data, updated_at) VALUES (?, 'failed', ?, NULL, ?)",
            (ids["sqlite"], json.dumps({**bad, "id": ids["sqlite"]}), time.time()),
        )
    for url, job_id in zip(_both(servers), ids.values(), strict=True):
        assert job_id not in job_ids(url)
        assert_error(httpx.get(f"{url}/jobs/{job_id}", headers=AUTH), 409, "corrupt_record")
        assert_error(httpx.get(f"{url}/jobs/{job_id}", headers=bearer(ACME)), 403, "forbidden")
        assert_error(
            httpx.delete(f"{url}/jobs/{job_id}", params={"purge": "true"}, headers=bearer(ACME)),
            403,
            "forbidden",
        )
        purged = httpx.delete(f"{url}/jobs/{job_id}", params={"purge": "true"}, headers=AUTH)
        assert purged.status_code == 200 and purged.json()["purged"] is True
        assert_error(httpx.get(f"{url}/jobs/{job_id}", headers=AUTH), 404, "job_not_found")
        assert_error(
            httpx.delete(f"{url}/jobs/{good}", params={"purge": "true"}, headers=AUTH), 404, "job_not_found"
        )


# -- row 9: no job-id existence oracle ------------------------------------------------------------
def test_a_job_id_is_not_an_existence_oracle(servers) -> None:
    for url in _both(servers):
        answer = httpx.post(
            f"{url}/profiles/beta-o/train", json={"examples": examples()}, headers=bearer(BETA)
        )
        assert answer.status_code == 202, answer.text
        real, made_up = answer.json()["id"], "0" * 20
        for token in (ACME, "a-bogus-token-of-some-length"):
            for method in ("GET", "DELETE"):
                refusals = [
                    httpx.request(method, f"{url}/jobs/{job_id}", headers=bearer(token))
                    for job_id in (real, made_up)
                ]
                assert [r.status_code for r in refusals] == [403, 403], (token, method)
                assert refusals[0].json()["message"] == refusals[1].json()["message"]
        assert httpx.get(f"{url}/jobs/{real}", headers=bearer(BETA)).status_code == 200
        cancel_all(url)


# -- row 6: the pending-jobs bound is atomic --------------------------------------------------
def test_concurrent_submissions_never_pass_the_pending_jobs_bound(servers) -> None:
    for url in _both(servers):
        cancel_all(url)

        def post(n: int, url: str = url) -> int:
            body = {"examples": examples(), "seed": n}
            return httpx.post(f"{url}/profiles/acme-c/train", json=body, headers=AUTH, timeout=60).status_code

        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(post, range(60)))
        assert statuses.count(202) == PENDING and statuses.count(503) == 60 - PENDING, statuses
        assert len(job_ids(url)) == PENDING
        cancel_all(url)


# -- rows 8 and 11: a client that hangs up mid-body; nosniff --------------------------------------
def test_a_client_that_closes_mid_body_is_no_server_error(servers) -> None:
    url = servers.s.url
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", servers.s.port), timeout=10) as sock:
            sock.sendall(
                b"PUT /profiles/gone-1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                + f"Authorization: Bearer {ADMIN}\r\n\r\n".encode()
                + b"0123456789"
            )
    time.sleep(1.0)
    metrics = httpx.get(f"{url}/metrics").text
    puts = [
        line
        for line in metrics.splitlines()
        if line.startswith("xpeft_http_requests_total{") and 'method="PUT"' in line
    ]
    assert puts and not any('status="500"' in line for line in puts), puts
    assert any('status="499"' in line for line in puts), puts
    assert "Traceback" not in servers.s.log_path.read_text()


def test_malformed_requests_get_json_and_every_answer_says_nosniff(servers) -> None:
    with socket.create_connection(("127.0.0.1", servers.r.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"] == "bad_request"
    for answer in (
        httpx.get(f"{servers.r.url}/profiles/none-1", headers=AUTH),
        httpx.get(f"{servers.r.url}/healthz"),
        httpx.get(f"{servers.r.url}/profiles", headers=AUTH),
    ):
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_more_labels_than_the_server_takes_are_refused_on_upload(servers, profile_bytes) -> None:
    labels = [f"intent-{i}" for i in range(1001)]  # XPEFT_MAX_LABELS defaults to 1000
    answer = httpx.put(
        f"{servers.r.url}/profiles/wide-1", content=profile_bytes(33, labels=labels), headers=AUTH
    )
    assert_error(answer, 422, "too_many_labels")
    assert_error(httpx.get(f"{servers.r.url}/profiles/wide-1", headers=AUTH), 404, "profile_not_found")
