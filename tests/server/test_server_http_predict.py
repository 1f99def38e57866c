"""Predictions over HTTP equal the offline Python API, also under 200 concurrent requests."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm

TEXTS = [
    "a gripping, beautifully acted film",
    "the plot is dull and the jokes are stale",
    "It was fine, I suppose.",
    "Terrible service and cold food.",
    "great",
    "I would go again tomorrow",
]


@pytest.fixture(scope="module")
def offline(encoder, bank) -> MultiProfileModel:
    return MultiProfileModel(encoder, bank)


def assert_same(served: list[dict], expected, atol: float = 1e-4) -> None:
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert got["label"] == want.label
        assert got["score"] == pytest.approx(want.score, abs=atol)
        assert got["scores"].keys() == want.scores.keys()
        for label, p in want.scores.items():
            assert got["scores"][label] == pytest.approx(p, abs=atol)


@pytest.mark.parametrize("kind", ["hard", "soft", "single_adapter", "head_only"])
def test_predict_equals_the_offline_api(cluster, admin_headers, profile_bytes, offline, bank, kind) -> None:
    data = profile_bytes(11, kind, labels=["neg", "neutral", "pos"])
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        version = client.put(f"/profiles/same-{kind}", content=data, headers=admin_headers).json()["version"]
        answer = client.post(f"/profiles/same-{kind}/predict", json={"inputs": TEXTS})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["profile"] == f"same-{kind}" and body["version"] == version
    assert_same(body["predictions"], offline.predict(xpm.decode(data, bank), TEXTS))


def test_predict_text_pairs_and_mixed_inputs(cluster, admin_headers, profile_bytes, offline, bank) -> None:
    data = profile_bytes(12, labels=["entailment", "neutral", "contradiction"])
    inputs = [
        ["A man plays a guitar.", "Someone makes music."],
        "a single text",
        ["The cat sleeps.", "The cat runs a marathon."],
    ]
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        client.put("/profiles/pairs-1", content=data, headers=admin_headers)
        answer = client.post("/profiles/pairs-1/predict", json={"inputs": inputs})
    assert answer.status_code == 200, answer.text
    expected = offline.predict(
        xpm.decode(data, bank), [tuple(x) if isinstance(x, list) else x for x in inputs]
    )
    assert_same(answer.json()["predictions"], expected)


def test_200_concurrent_predicts_over_50_profiles(
    cluster, admin_headers, profile_bytes, offline, bank
) -> None:
    """Each answer carries its own profile's labels and scores, though they share batches."""
    n_profiles, n_requests = 50, 200
    datas = [profile_bytes(100 + i, labels=[f"no-{i}", f"yes-{i}"]) for i in range(n_profiles)]
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        for i, data in enumerate(datas):
            assert client.put(f"/profiles/many-{i}", content=data, headers=admin_headers).status_code == 201
        before = _batch_stats(client)
    expected = {}
    for i, data in enumerate(datas):  # offline: each profile's texts in one call
        wanted = sorted({k % len(TEXTS) for k in range(i, n_requests, n_profiles)})
        for t, prediction in zip(
            wanted, offline.predict(xpm.decode(data, bank), [TEXTS[t] for t in wanted]), strict=True
        ):
            expected[(i, t)] = prediction

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n_requests, max_keepalive_connections=n_requests)
        async with httpx.AsyncClient(base_url=cluster.a.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"/profiles/many-{k % n_profiles}/predict", json={"inputs": [TEXTS[k % len(TEXTS)]]}
                    )
                    for k in range(n_requests)
                )
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * n_requests
    for k, response in enumerate(responses):
        i, t = k % n_profiles, k % len(TEXTS)
        body = response.json()
        assert body["profile"] == f"many-{i}"
        assert_same(body["predictions"], [expected[(i, t)]])
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        after = _batch_stats(client)
    batches = after["xpeft_batch_profiles_count"] - before["xpeft_batch_profiles_count"]
    profiles_per_batch = (after["xpeft_batch_profiles_sum"] - before["xpeft_batch_profiles_sum"]) / batches
    assert batches < n_requests and profiles_per_batch > 1.5  # requests of many profiles shared forwards


def _batch_stats(client: httpx.Client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(("xpeft_batch_profiles_count", "xpeft_batch_profiles_sum")):
            name, value = line.split(" ")
            out[name] = float(value)
    return out


def test_a_flood_gets_overloaded_not_unbounded_queues(
    cluster, admin_headers, reader_headers, profile_bytes
) -> None:
    """Server c queues at most 2 requests; the rest of a burst is refused with 503 overloaded."""
    with httpx.Client(base_url=cluster.c.url, timeout=30) as client:
        client.put("/profiles/flood-1", content=profile_bytes(1), headers=admin_headers)
    text = ("a long and winding review that keeps going " * 7)[:290]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=cluster.c.url,
            timeout=60,
            headers=reader_headers,
            limits=httpx.Limits(max_connections=60),
        ) as client:
            return await asyncio.gather(
                *(client.post("/profiles/flood-1/predict", json={"inputs": [text] * 4}) for _ in range(60))
            )

    responses = asyncio.run(fire())
    codes = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 503]
    assert set(codes) == {200, 503} and len(refused) >= 5, codes
    for r in refused:
        assert r.json()["error"] == "overloaded" and r.headers["retry-after"] == "1"
    answers = [r.json() for r in responses if r.status_code == 200]
    assert all(len(a["predictions"]) == 4 for a in answers)
    assert len({a["predictions"][0]["label"] for a in answers}) == 1  # same input, same answer
