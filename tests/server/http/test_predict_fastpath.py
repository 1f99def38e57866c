"""The predict route's own dispatch: which requests it takes, and that they answer as the router's would."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.responses import Response

from xpeft.engine.runtime import MultiProfileModel
from xpeft.server.app import create_app
from xpeft.server.errors import ApiError, install_error_handlers
from xpeft.server.fastpath import PREDICT_PATH, PredictFastPath
from xpeft.server.settings import Settings


class _Recorder:
    """What reached the endpoint and what reached the app behind the fast path."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.endpoint: list[str] = []
        self.behind: list[str] = []
        self.fail = fail

    async def app(self, scope, receive, send) -> None:
        self.behind.append(scope["path"])
        await Response("behind", status_code=299)(scope, receive, send)

    async def predict(self, request: Request, profile_id: str) -> Response:
        self.endpoint.append(profile_id)
        if self.fail is not None:
            raise self.fail
        return Response(json.dumps({"id": profile_id}), media_type="application/json")


def _call(path: str, method: str = "POST", fail: Exception | None = None, root_path: str = ""):
    app = FastAPI()
    install_error_handlers(app)
    seen = _Recorder(fail)
    fast = PredictFastPath(seen.app, app)
    fast.endpoint = seen.predict
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "headers": [],
        "query_string": b"",
        "app": app,
    }
    asyncio.run(fast(scope, receive, send))
    return seen, sent[0]["status"], json.loads(sent[1]["body"]) if sent[0]["status"] != 299 else None, scope


def test_a_predict_goes_to_its_handler_with_the_route_set() -> None:
    seen, status, body, scope = _call("/profiles/acme-1/predict")
    assert (seen.endpoint, seen.behind, status, body) == (["acme-1"], [], 200, {"id": "acme-1"})
    assert scope["route"].path == PREDICT_PATH  # the metrics count it under its template
    assert scope["path_params"] == {"profile_id": "acme-1"}


def test_a_mounted_app_strips_its_root_path() -> None:
    seen, status, _, _ = _call("/api/profiles/p/predict", root_path="/api")
    assert (seen.endpoint, status) == (["p"], 200)


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/profiles/p/predict", "GET"),
        ("/profiles/a/b/predict", "POST"),  # an id with a slash: the router's own refusal
        ("/profiles//predict", "POST"),
        ("/profiles/p/predictx", "POST"),
        ("/other/p/predict", "POST"),
        ("/profiles/p", "POST"),
    ],
)
def test_anything_else_goes_behind(path: str, method: str) -> None:
    seen, status, _, _ = _call(path, method)
    assert (seen.endpoint, seen.behind, status) == ([], [path], 299)


def test_errors_go_through_the_apps_handlers() -> None:
    _, status, body, _ = _call("/profiles/p/predict", fail=ApiError(404, "profile_not_found", "no such"))
    assert status == 404 and body["error"] == "profile_not_found" and body["message"] == "no such"


def test_an_unexpected_error_goes_on_up_to_the_server_error_handler() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        _call("/profiles/p/predict", fail=RuntimeError("boom"))


def test_served_predicts_keep_their_shape_headers_and_metrics(encoder, bank, profile_bytes, tmp_path) -> None:
    app = create_app(Settings(sqlite_path=tmp_path / "p.sqlite3"), model=MultiProfileModel(encoder, bank))
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        assert client.put("/profiles/fast", content=profile_bytes(5, "soft")).status_code == 201
        answer = client.post("/profiles/fast/predict", json={"inputs": ["a", ["b", "c"]]})
        missing = client.post(
            "/profiles/none/predict", json={"inputs": ["a"]}, headers={"x-request-id": "r-1"}
        )
        slashed = client.post("/profiles/a%2Fb/predict", json={"inputs": ["a"]})
        metrics = client.get("/metrics").text
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert list(body) == ["profile", "version", "predictions"]
    for p in body["predictions"]:  # the response model's fields, in order; null without a rule
        assert list(p) == ["label", "score", "scores", "abstained", "confidence"] and p["confidence"] is None
    for header in ("x-request-id", "x-compute-type", "x-queue-time", "x-inference-time", "server-timing"):
        assert header in answer.headers
    assert answer.headers["x-compute-type"] == "cpu"
    assert missing.status_code == 404 and missing.json()["request_id"] == "r-1"
    assert missing.headers["x-request-id"] == "r-1"
    assert slashed.status_code == 422 and slashed.json()["error"] == "invalid_profile_id"  # the router's
    route = re.escape(PREDICT_PATH)
    for status in ("200", "404"):
        assert re.search(
            rf'^xpeft_http_requests_total\{{method="POST",route="{route}",status="{status}"\}} 1\.0$',
            metrics,
            re.M,
        ), status
