"""Every endpoint and every refusal, over HTTP against real uvicorn processes.

Server ``a`` uses Redis and an admin token; ``c`` uses the embedded SQLite store, an API token
for reads, and small limits (4 inputs, 300 characters, 64 KiB profiles, 4 KiB requests).
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from xpeft.adapters.bank import create_random_bank
from xpeft.profiles import format as xpm
from xpeft.profiles.synthetic import random_profile


@pytest.fixture(scope="module")
def a(cluster) -> httpx.Client:
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def c(cluster) -> httpx.Client:
    with httpx.Client(base_url=cluster.c.url, timeout=30) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code and isinstance(body["message"], str) and body["message"], body
    return body


def test_health_and_readiness(a, c, bank) -> None:
    assert a.get("/healthz").json()["status"] == "ok"
    ready = a.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["detail"]["store"] == "redis" and ready.json()["detail"]["bank_id"] == bank.bank_id
    assert c.get("/readyz").json()["detail"]["store"] == "sqlite"


def test_profile_lifecycle(a, admin_headers, profile_bytes, bank) -> None:
    data = profile_bytes(1)
    put = a.put("/profiles/life-1", content=data, headers=admin_headers)
    assert put.status_code == 201, put.text
    meta = put.json()
    assert meta["id"] == "life-1" and meta["kind"] == "hard" and meta["bank_id"] == bank.bank_id
    assert (
        meta["bytes"] == len(data)
        and meta["labels"] == ["negative", "positive"]
        and len(meta["sha256"]) == 64
    )
    got = a.get("/profiles/life-1")
    assert meta.pop("unchanged") is False  # only a PUT's answer says whether it changed anything
    assert got.status_code == 200 and got.json() == meta

    replaced = a.put("/profiles/life-1", content=profile_bytes(2, "soft"), headers=admin_headers)
    assert replaced.status_code == 200
    assert replaced.json()["version"] > meta["version"] and replaced.json()["kind"] == "soft"
    assert replaced.json()["created_at"] == meta["created_at"]
    assert a.get("/profiles/life-1").json()["version"] == replaced.json()["version"]

    deleted = a.delete("/profiles/life-1", headers=admin_headers)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert deleted.json()["version"] > replaced.json()["version"]
    assert_error(a.get("/profiles/life-1"), 404, "profile_not_found")
    assert_error(a.delete("/profiles/life-1", headers=admin_headers), 404, "profile_not_found")
    assert_error(a.post("/profiles/life-1/predict", json={"inputs": ["x"]}), 404, "profile_not_found")


def _nothing_stored(client: httpx.Client, profile_id: str, headers: dict | None = None) -> None:
    assert_error(client.get(f"/profiles/{profile_id}", headers=headers), 404, "profile_not_found")


def test_writes_need_the_admin_token(a, profile_bytes) -> None:
    missing = assert_error(a.put("/profiles/auth-1", content=profile_bytes(1)), 401, "unauthorized")
    assert "token" in missing["message"]
    wrong = {"Authorization": "Bearer not-the-token"}
    assert_error(a.put("/profiles/auth-1", content=profile_bytes(1), headers=wrong), 403, "forbidden")
    assert_error(
        a.put("/profiles/auth-1", content=profile_bytes(1), headers={"Authorization": "Basic abc"}),
        401,
        "unauthorized",
    )
    assert_error(a.delete("/profiles/auth-1", headers=wrong), 403, "forbidden")
    _nothing_stored(a, "auth-1")


@pytest.mark.parametrize(
    "damage, detail",
    [
        (lambda d: d[:40], "truncated"),
        (lambda d: b"", "truncated"),
        (lambda d: b"GIF89a" + d[6:], "bad_magic"),
        (lambda d: d[:60] + bytes([d[60] ^ 0xFF]) + d[61:], "checksum_mismatch"),
    ],
)
def test_malformed_profiles_are_refused(a, admin_headers, profile_bytes, damage, detail) -> None:
    body = assert_error(
        a.put("/profiles/bad-1", content=damage(profile_bytes(3)), headers=admin_headers),
        422,
        "invalid_profile",
    )
    assert body["detail"] == detail and body["message"].startswith(detail)
    _nothing_stored(a, "bad-1")


def test_profile_of_another_bank_is_a_conflict(a, admin_headers, encoder) -> None:
    other = create_random_bank(
        encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=20, seed=7
    )
    body = assert_error(
        a.put(
            "/profiles/other-bank", content=xpm.encode(random_profile(other, seed=1)), headers=admin_headers
        ),
        409,
        "bank_mismatch",
    )
    assert other.bank_id in body["message"]
    _nothing_stored(a, "other-bank")


def test_refused_replacement_keeps_the_old_version(a, admin_headers, profile_bytes) -> None:
    v1 = a.put("/profiles/keep-1", content=profile_bytes(4), headers=admin_headers).json()
    assert_error(
        a.put("/profiles/keep-1", content=profile_bytes(5)[:-3], headers=admin_headers),
        422,
        "invalid_profile",
    )
    assert a.get("/profiles/keep-1").json() == {k: v for k, v in v1.items() if k != "unchanged"}
    answer = a.post("/profiles/keep-1/predict", json={"inputs": ["still here"]})
    assert answer.status_code == 200 and answer.json()["version"] == v1["version"]


@pytest.mark.parametrize("bad_id", ["-lead", "a" * 129, "bad id", "a/b", "caf\u00e9", ".dot", "trailing\n"])
def test_invalid_profile_ids(a, admin_headers, profile_bytes, bad_id) -> None:
    path = "/profiles/" + quote(bad_id, safe="/")
    assert_error(a.put(path, content=profile_bytes(1), headers=admin_headers), 422, "invalid_profile_id")
    assert_error(a.get(path), 422, "invalid_profile_id")
    assert_error(a.post(path + "/predict", json={"inputs": ["x"]}), 422, "invalid_profile_id")


def test_longest_valid_id_is_accepted(a, admin_headers, profile_bytes) -> None:
    long_id = "A" + "b._-9" * 25 + "xy"  # 128 characters
    assert len(long_id) == 128
    assert a.put(f"/profiles/{long_id}", content=profile_bytes(1), headers=admin_headers).status_code == 201
    assert a.get(f"/profiles/{long_id}").json()["id"] == long_id


def test_too_large_uploads(c, admin_headers, reader_headers, profile_bytes) -> None:
    big = profile_bytes(1, "single_adapter")  # a whole fp16 adapter: > 64 KiB, the limit of server c
    assert len(big) > 65536
    body = assert_error(c.put("/profiles/big-1", content=big, headers=admin_headers), 413, "too_large")
    assert "65536" in body["message"]

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    assert_error(c.put("/profiles/big-1", content=chunks(), headers=admin_headers), 413, "too_large")
    _nothing_stored(c, "big-1", reader_headers)
    assert c.put("/profiles/small-1", content=profile_bytes(1), headers=admin_headers).status_code == 201


def test_reads_need_the_api_token_when_set(c, admin_headers, reader_headers, profile_bytes) -> None:
    assert c.put("/profiles/read-1", content=profile_bytes(1), headers=admin_headers).status_code == 201
    assert_error(c.get("/profiles/read-1"), 401, "unauthorized")
    assert_error(c.get("/profiles"), 401, "unauthorized")
    assert_error(c.post("/profiles/read-1/predict", json={"inputs": ["x"]}), 401, "unauthorized")
    assert_error(c.get("/profiles/read-1", headers={"Authorization": "Bearer nope"}), 403, "forbidden")
    assert c.get("/profiles/read-1", headers=reader_headers).status_code == 200
    assert c.get("/profiles/read-1", headers=admin_headers).status_code == 200  # admin may read too
    assert (
        c.post("/profiles/read-1/predict", json={"inputs": ["x"]}, headers=reader_headers).status_code == 200
    )
    # the reader token does not allow writes
    assert_error(
        c.put("/profiles/read-2", content=profile_bytes(2), headers=reader_headers), 403, "forbidden"
    )
    assert_error(c.delete("/profiles/read-1", headers=reader_headers), 403, "forbidden")
    for path in ("/healthz", "/readyz", "/metrics"):
        assert c.get(path).status_code == 200


def test_list_is_paged_in_id_order(c, admin_headers, reader_headers, profile_bytes) -> None:
    ids = [f"list-{i:02d}" for i in range(7)]
    for i, profile_id in enumerate(reversed(ids)):
        assert (
            c.put(f"/profiles/{profile_id}", content=profile_bytes(i), headers=admin_headers).status_code
            == 201
        )
    seen, cursor, pages = [], "list-", 0
    while cursor is not None:
        page = c.get("/profiles", params={"cursor": cursor, "limit": 3}, headers=reader_headers)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["profiles"]) <= 3
        seen += [p["id"] for p in body["profiles"] if p["id"].startswith("list-")]
        pages += 1
        cursor = body["next_cursor"] if all(p["id"].startswith("list-") for p in body["profiles"]) else None
    assert seen == ids and pages >= 3
    first = c.get("/profiles", params={"limit": 50}, headers=reader_headers).json()["profiles"]
    assert [p["id"] for p in first] == sorted(p["id"] for p in first)
    assert {"version", "labels", "kind"} <= set(first[0])
    assert_error(c.get("/profiles", params={"limit": 51}, headers=reader_headers), 422, "invalid_request")
    assert_error(c.get("/profiles", params={"limit": 0}, headers=reader_headers), 422, "invalid_request")
    assert_error(
        c.get("/profiles", params={"cursor": "bad cursor"}, headers=reader_headers), 422, "invalid_profile_id"
    )


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"inputs": []}, "at least one"),
        ({"inputs": ["x"] * 5}, "at most 4"),
        ({"inputs": ["x" * 301]}, "at most 300"),
        ({"inputs": [["premise", "y" * 301]]}, "at most 300"),
        ({"inputs": [1, 2]}, "inputs"),
        ({"inputs": [["one", "two", "three"]]}, "inputs"),
        ({"texts": ["x"]}, "inputs"),
        ({"inputs": ["x"], "extra": 1}, "extra"),
    ],
)
def test_predict_refuses_bad_inputs(c, admin_headers, reader_headers, profile_bytes, payload, needle) -> None:
    c.put("/profiles/inputs-1", content=profile_bytes(1), headers=admin_headers)
    body = assert_error(
        c.post("/profiles/inputs-1/predict", json=payload, headers=reader_headers), 422, "invalid_request"
    )
    assert needle in body["message"]


def test_predict_refuses_non_json_and_oversize_bodies(c, reader_headers) -> None:
    body = assert_error(
        c.post(
            "/profiles/inputs-1/predict",
            content=b"inputs=x",
            headers={**reader_headers, "Content-Type": "application/x-www-form-urlencoded"},
        ),
        422,
        "invalid_request",
    )
    assert "application/json" in body["message"]
    huge = {"inputs": ["x" * 5000]}  # over the 4 KiB request limit of server c
    assert_error(c.post("/profiles/inputs-1/predict", json=huge, headers=reader_headers), 413, "too_large")


def test_unknown_routes_and_methods_are_json(a) -> None:
    assert_error(a.get("/nothing-here"), 404, "not_found")
    # 405s name every method the path has (Starlette alone names those of one route)
    for response in (a.patch("/profiles/x"), a.post("/profiles/x")):
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "DELETE, GET, PUT"
    assert_error(a.get("/profiles/x/predict"), 405, "method_not_allowed")
    assert a.get("/profiles/x/predict").headers["allow"] == "POST"
    assert a.delete("/healthz").headers["allow"] == "GET"


def test_openapi_and_docs(a) -> None:
    spec = a.get("/openapi.json").json()
    assert {
        "/profiles",
        "/profiles/{profile_id}",
        "/profiles/{profile_id}/predict",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    put = spec["paths"]["/profiles/{profile_id}"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]
    docs = a.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_metrics_count_requests_batches_caches_and_store(a, admin_headers, profile_bytes) -> None:
    a.put("/profiles/metrics-1", content=profile_bytes(9), headers=admin_headers)
    for _ in range(3):
        assert a.post("/profiles/metrics-1/predict", json={"inputs": ["x", "y"]}).status_code == 200
    a.get("/profiles/does-not-exist")
    text = a.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)

    def value(name: str) -> float:
        return values.get(name, 0.0)

    assert (
        value('xpeft_http_requests_total{method="POST",route="/profiles/{profile_id}/predict",status="200"}')
        >= 3
    )
    assert value('xpeft_http_requests_total{method="GET",route="/profiles/{profile_id}",status="404"}') >= 1
    assert not any("metrics-1" in name for name in values)  # ids never become labels
    assert value("xpeft_batch_rows_count") >= 1 and value("xpeft_batch_rows_sum") >= 6
    assert value('xpeft_cache_events_total{cache="profile",event="hit"}') >= 2
    assert value('xpeft_cache_events_total{cache="fused",event="miss"}') >= 1
    assert value('xpeft_store_seconds_count{op="put"}') >= 1
    assert "xpeft_queue_depth" in values and value("xpeft_model_ready") == 1
    assert (
        'xpeft_http_request_seconds_bucket{le="0.005",method="POST",route="/profiles/{profile_id}/predict"}'
        in values
    )


def test_tokens_never_reach_the_log(cluster, c, admin_headers, reader_headers) -> None:
    """Server c logs at info level, access log included; neither token may appear in it."""
    c.get("/profiles", headers=reader_headers)
    c.put("/profiles/log-1", content=b"junk", headers=admin_headers)
    c.get("/profiles", headers={"Authorization": "Bearer a-wrong-token-to-log"})
    log = cluster.c.log_path.read_text(errors="replace")
    assert "GET /profiles" in log  # the log is really written
    for secret in (admin_headers, reader_headers):
        assert secret["Authorization"].split(" ", 1)[1] not in log
    assert "a-wrong-token-to-log" not in log
