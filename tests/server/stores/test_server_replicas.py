"""Replicas sharing one Redis: writes on one are served by the other within a second, and a
store outage is reported, survived and recovered from.

``python -m pytest tests/server/stores/test_server_replicas.py -s -k within`` prints the measured
invalidation latency (docs/API.md quotes it).
"""

from __future__ import annotations

import statistics
import time

import httpx
import pytest

ROUNDS = 10


def test_a_put_on_one_replica_is_served_by_the_other_within_a_second(
    cluster, admin_headers, profile_bytes
) -> None:
    a = httpx.Client(base_url=cluster.a.url, timeout=10)
    b = httpx.Client(base_url=cluster.b.url, timeout=10)
    labels_of: dict[int, list[str]] = {}
    first = a.put(
        "/profiles/replicated", content=profile_bytes(0, labels=["v0-no", "v0-yes"]), headers=admin_headers
    )
    labels_of[first.json()["version"]] = ["v0-no", "v0-yes"]
    assert (
        b.post("/profiles/replicated/predict", json={"inputs": ["warm"]}).json()["version"]
        == first.json()["version"]
    )

    latencies, polls = [], []
    lag_before = _lag(b)
    for n in range(1, ROUNDS + 1):
        labels = [f"v{n}-no", f"v{n}-yes"]
        put = a.put("/profiles/replicated", content=profile_bytes(n, labels=labels), headers=admin_headers)
        written = time.perf_counter()
        version = put.json()["version"]
        labels_of[version] = labels
        polls.append(0)
        while True:
            polls[-1] += 1
            answer = b.post("/profiles/replicated/predict", json={"inputs": ["is it new yet?"]}).json()
            # consistency: whatever version answered, its labels are that version's labels
            assert sorted(answer["predictions"][0]["scores"]) == sorted(labels_of[answer["version"]])
            if answer["version"] == version:
                latencies.append(time.perf_counter() - written)
                break
            assert answer["version"] < version
            assert time.perf_counter() - written < 1.0, "replica b still serves an old version after 1 s"
    print(
        f"\ninvalidation latency over {ROUNDS} PUTs (PUT answered on a -> first predict on b with the new version): "
        f"median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms, "
        f"predicts on b per round: max {max(polls)}; "
        f"pub/sub event lag on b (xpeft_invalidation_lag_seconds): mean "
        f"{(_lag(b)[0] - lag_before[0]) / max(1, _lag(b)[1] - lag_before[1]) * 1000:.2f} ms"
    )
    assert max(latencies) < 1.0
    a.close()
    b.close()


def _lag(client: httpx.Client) -> tuple[float, float]:
    """(sum, count) of the replica's invalidation lag histogram."""
    values = dict.fromkeys(("sum", "count"), 0.0)
    for line in client.get("/metrics").text.splitlines():
        for key in values:
            if line.startswith(f"xpeft_invalidation_lag_seconds_{key} "):
                values[key] = float(line.split(" ")[1])
    return values["sum"], values["count"]


def test_a_delete_on_one_replica_reaches_the_other(cluster, admin_headers, profile_bytes) -> None:
    a = httpx.Client(base_url=cluster.a.url, timeout=10)
    b = httpx.Client(base_url=cluster.b.url, timeout=10)
    a.put("/profiles/doomed", content=profile_bytes(5), headers=admin_headers)
    assert b.post("/profiles/doomed/predict", json={"inputs": ["x"]}).status_code == 200  # cached on b
    assert a.delete("/profiles/doomed", headers=admin_headers).status_code == 200
    deleted = time.perf_counter()
    while b.post("/profiles/doomed/predict", json={"inputs": ["x"]}).status_code != 404:
        assert time.perf_counter() - deleted < 1.0, "replica b still serves a deleted profile after 1 s"
    assert b.get("/profiles/doomed").json()["error"] == "profile_not_found"
    # and an upload on b is visible on a's list
    b.put("/profiles/from-b", content=profile_bytes(6), headers=admin_headers)
    listed = a.get("/profiles", params={"cursor": "from-a", "limit": 1}).json()["profiles"]
    assert listed[0]["id"] == "from-b"
    a.close()
    b.close()


def test_store_outage_is_reported_and_recovered(cluster, profile_bytes) -> None:
    """Server d's private Redis is stopped, then restarted empty (no persistence)."""
    d = httpx.Client(base_url=cluster.d.url, timeout=10)
    assert d.put("/profiles/cached", content=profile_bytes(1)).status_code == 201
    assert d.put("/profiles/not-cached", content=profile_bytes(2)).status_code == 201
    assert d.post("/profiles/cached/predict", json={"inputs": ["x"]}).status_code == 200

    cluster.d_redis.stop()
    try:
        for response in (
            d.get("/readyz"),
            d.put("/profiles/new", content=profile_bytes(3)),
            d.get("/profiles/cached"),
            d.get("/profiles"),
            d.delete("/profiles/cached"),
            d.post("/profiles/not-cached/predict", json={"inputs": ["x"]}),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "store_unavailable"
        assert d.get("/healthz").status_code == 200  # alive: an orchestrator must not restart it
        # no write can happen while the store is down, so the cached copy is still current
        assert d.post("/profiles/cached/predict", json={"inputs": ["x"]}).status_code == 200
        metrics = d.get("/metrics").text
        assert 'xpeft_store_errors_total{op="put"} 1.0' in metrics
    finally:
        cluster.d_redis.start()

    # The restarted Redis is empty: its version counter went back, so the caches are emptied.
    deadline = time.perf_counter() + 10
    while d.get("/readyz").status_code != 200:
        assert time.perf_counter() < deadline
        time.sleep(0.1)
    while d.post("/profiles/cached/predict", json={"inputs": ["x"]}).status_code != 404:
        assert time.perf_counter() < deadline, "a reset store must not leave stale profiles served"
        time.sleep(0.1)
    again = d.put("/profiles/cached", content=profile_bytes(4, labels=["after", "reset"]))
    assert again.status_code == 201
    answer = d.post("/profiles/cached/predict", json={"inputs": ["x"]}).json()
    assert answer["version"] == again.json()["version"] and set(answer["predictions"][0]["scores"]) == {
        "after",
        "reset",
    }
    d.close()


@pytest.mark.parametrize("server", ["a", "b"])
def test_replicas_serve_the_same_bank(cluster, bank, server) -> None:
    ready = httpx.get(getattr(cluster, server).url + "/readyz").json()
    assert ready["detail"]["bank_id"] == bank.bank_id
