"""The async client, and the splitting of long input lists, against real servers.

Server ``c`` of the cluster allows 4 inputs per request, an API token for reads and an admin token
for writes: a client told ``max_inputs=4`` splits longer lists, and the answer equals the offline
model's for every input, in order, from one version of the profile.
"""

from __future__ import annotations

import asyncio
import inspect

import httpx
import pytest

from xpeft.client import AsyncClient, Client, ClientError
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm

TEXTS = [f"review {i}: {'a wonderful film' if i % 2 else 'a dreadful meal'}" for i in range(10)]
PROFILE_METHODS = (
    "upload",
    "get",
    "download",
    "delete",
    "list",
    "iter_profiles",
    "predict",
    "health",
    "ready",
)


def token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def offline(encoder, bank, data: bytes, texts: list[str]) -> list[str]:
    return [p.label for p in MultiProfileModel(encoder, bank).predict(xpm.decode(data, bank), texts)]


def test_both_clients_have_the_same_methods() -> None:
    for name in PROFILE_METHODS:
        sync, async_ = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.signature(sync).parameters == inspect.signature(async_).parameters, name
        assert inspect.iscoroutinefunction(async_) or inspect.isasyncgenfunction(async_), name
    for name, _ in inspect.getmembers(AsyncClient, inspect.isfunction):
        if not name.startswith("_") and name != "aclose":
            assert hasattr(Client, name), f"AsyncClient.{name} has no Client counterpart"


def test_async_round_trip_and_split_predictions(
    cluster, profile_bytes, encoder, bank, admin_headers, reader_headers
) -> None:
    admin_token, reader_token = token(admin_headers), token(reader_headers)
    data = profile_bytes(51, labels=["neg", "pos"])

    async def go() -> None:
        async with (
            AsyncClient(cluster.c.url, token=admin_token, max_inputs=4, max_concurrency=2) as admin,
            AsyncClient(cluster.c.url, token=reader_token, max_inputs=4, max_concurrency=2) as reader,
        ):
            meta = await admin.upload("async-1", data)
            assert (await reader.get("async-1"))["version"] == meta["version"]
            assert await reader.download("async-1") == data
            ids = [m["id"] async for m in reader.iter_profiles(page_size=1)]
            assert "async-1" in ids and ids == sorted(ids)
            result = await reader.predict("async-1", TEXTS)  # 10 inputs: 3 requests of at most 4
            assert result["version"] == meta["version"] and len(result["predictions"]) == 10
            assert [p["label"] for p in result["predictions"]] == offline(encoder, bank, data, TEXTS)
            with pytest.raises(ClientError) as err:
                await reader.delete("async-1")  # the API token may not write
            assert err.value.code == "forbidden"
            assert (await admin.delete("async-1"))["deleted"] is True
            with pytest.raises(ClientError) as err:
                await reader.get("async-1")
            assert err.value.code == "profile_not_found"
            assert (await reader.health())["status"] == "ok"

    asyncio.run(go())


def test_split_predictions_match_one_request_each(
    cluster, profile_bytes, encoder, bank, admin_headers
) -> None:
    admin_token = token(admin_headers)
    data = profile_bytes(52, labels=["a", "b", "c"])
    with Client(cluster.c.url, token=admin_token, max_inputs=4) as client:
        client.upload("split-1", data)
        one_each = [client.predict("split-1", [t])["predictions"][0] for t in TEXTS]
        together = client.predict("split-1", TEXTS)["predictions"]
        assert [p["label"] for p in together] == [p["label"] for p in one_each]
        for a, b in zip(together, one_each, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    with Client(cluster.c.url, token=admin_token) as unsplit, pytest.raises(ClientError) as err:
        unsplit.predict("split-1", TEXTS)  # the default 64 is above this server's limit of 4
    assert (err.value.code, err.value.status) == ("invalid_request", 422)


class AfterPredict(httpx.BaseTransport):
    """Loopback HTTP, and an upload of a new version after each of the first ``times`` predict answers."""

    def __init__(self, upload, times: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.upload, self.times, self.predicts = upload, times, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/predict"):
            self.predicts += 1
            if self.predicts <= self.times:
                response.read()
                self.upload(self.predicts)
        return response


def test_a_split_answer_comes_from_one_version(
    cluster, profile_bytes, encoder, bank, admin_headers, reader_headers
) -> None:
    admin_token, reader_token = token(admin_headers), token(reader_headers)
    old, new = profile_bytes(61, labels=["x", "y"]), profile_bytes(62, labels=["x", "y"])
    with Client(cluster.c.url, token=admin_token) as admin:
        admin.upload("versions-1", old)
        # after the first chunk's answer a new version is stored: that chunk is sent again
        transport = AfterPredict(lambda n: admin.upload("versions-1", new), times=1)
        with Client(cluster.c.url, token=reader_token, max_inputs=4, transport=transport) as client:
            result = client.predict("versions-1", TEXTS)
        assert transport.predicts == 4  # 3 chunks and the overtaken one again
        assert result["version"] == admin.get("versions-1")["version"]
        assert [p["label"] for p in result["predictions"]] == offline(encoder, bank, new, TEXTS)
        # a new version after every answer: the client gives up with a clear error
        transport = AfterPredict(lambda n: admin.upload("versions-1", (new, old)[n % 2]), times=100)
        with (
            Client(cluster.c.url, token=reader_token, max_inputs=4, transport=transport) as client,
            pytest.raises(ClientError) as err,
        ):
            client.predict("versions-1", TEXTS)
        assert err.value.code == "version_changed"
