"""Observability in-process: request ids, logs that carry them, metrics, timing headers, readiness
hints and the offline API docs. (JSON logs of a real ``xpeft serve``: test_server_logging.py.)"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.metrics import MetricWrapperBase

from xpeft.engine.runtime import MultiProfileModel
from xpeft.server.app import create_app
from xpeft.server.logging_setup import UVICORN_LOGGERS, configure_logging
from xpeft.server.metrics import Metrics
from xpeft.server.settings import Settings

API_DOC = Path(__file__).resolve().parents[3] / "docs" / "API.md"
HEX_ID = re.compile(r"[0-9a-f]{32}")


def _app(model: MultiProfileModel, tmp_path: Path, **settings: object) -> FastAPI:
    app = create_app(Settings(sqlite_path=tmp_path / "p.sqlite3", **settings), model=model)

    async def boom() -> None:
        logging.getLogger("xpeft.server").info("about to fail")
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)  # a route that fails: the 500 path
    return app


@pytest.fixture
def client(offline, tmp_path) -> Iterator[TestClient]:
    # loopback client: protected mode lets it write without a token
    with TestClient(_app(offline, tmp_path), client=("127.0.0.1", 50000), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """configure_logging in JSON into a buffer; the previous logging setup is restored after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    saved_uvicorn = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in UVICORN_LOGGERS
    }
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    try:
        yield stream
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, (handlers, propagate) in saved_uvicorn.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate


def test_request_id_is_echoed_kept_or_generated(client: TestClient) -> None:
    kept = client.get("/healthz", headers={"X-Request-ID": "edge-7f3a:42/b"})
    assert kept.headers["x-request-id"] == "edge-7f3a:42/b"
    assert HEX_ID.fullmatch(client.get("/healthz").headers["x-request-id"])
    ids = set()
    for unsafe in ("has space", "a" * 129, "new\\nline", 'quote"d', ""):
        answer = client.get("/healthz", headers={"X-Request-ID": unsafe})
        assert HEX_ID.fullmatch(answer.headers["x-request-id"]), unsafe  # replaced, never echoed
        ids.add(answer.headers["x-request-id"])
    assert len(ids) == 5  # a new one each time


def test_every_error_carries_the_request_id(client: TestClient) -> None:
    cases = [
        ("GET", "/profiles/missing", None, 404, "profile_not_found"),
        ("GET", "/profiles/bad%20id", None, 422, "invalid_profile_id"),
        ("GET", "/nowhere", None, 404, "not_found"),
        ("POST", "/profiles/x/predict", b"[" * 2_000_000, 413, "too_large"),  # refused in a middleware
        ("GET", "/boom", None, 500, "internal_error"),  # outside every middleware
    ]
    for n, (method, path, body, status, code) in enumerate(cases):
        rid = f"case-{n}"
        answer = client.request(method, path, content=body, headers={"X-Request-ID": rid})
        assert answer.status_code == status, (path, answer.text)
        assert answer.json()["error"] == code and answer.json()["request_id"] == rid, path
        assert answer.headers["x-request-id"] == rid, path


def test_log_lines_of_a_request_carry_its_id(client: TestClient, log_stream: io.StringIO) -> None:
    client.get("/boom", headers={"X-Request-ID": "trace-boom-1"})
    client.get("/healthz")
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]  # every line is JSON
    ours = [line for line in lines if line.get("request_id") == "trace-boom-1"]
    messages = [line["message"] for line in ours]
    assert "about to fail" in messages and any("unhandled error" in m for m in messages)
    failed = next(line for line in ours if "unhandled error" in line["message"])
    assert failed["level"] == "ERROR" and "RuntimeError: a bug" in failed["exc_info"]
    assert {"time", "level", "logger", "message", "request_id"} <= set(failed)


def test_text_lines_carry_the_request_id(client: TestClient) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("info", "text", stream)
    try:
        client.get("/boom", headers={"X-Request-ID": "text-id-9"})
    finally:
        root.handlers[:], root.level = saved
    line = next(line for line in stream.getvalue().splitlines() if "about to fail" in line)
    assert re.search(r" INFO xpeft\.server \[text-id-9\]: about to fail$", line), line


def test_metrics_have_runtime_collectors_and_no_created_series(client: TestClient) -> None:
    client.get("/healthz")
    text = client.get("/metrics").text
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "python_gc_objects_collected_total",
        "python_info",
    ):
        assert re.search(rf"^{name}[ {{]", text, re.M), name
    assert "_created" not in text
    assert re.search(r'^xpeft_http_requests_total\{method="GET",route="/healthz",status="200"\} ', text, re.M)


def _documented_metrics() -> dict[str, set[str]]:
    """The metric table of docs/API.md: metric name -> the label names it lists."""
    section = API_DOC.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`xpeft_"):
            continue
        labels = re.sub(r"\([^)]*\)", "", cells[1])
        for name in re.findall(r"`(xpeft_\w+)`", cells[0]):
            table[name] = {part.strip() for part in labels.split(",") if part.strip()}
    return table


def test_api_doc_metric_table_matches_the_registry() -> None:
    metrics = Metrics()
    real = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            suffix = "_total" if value._type == "counter" else ""
            real[value._name + suffix] = set(value._labelnames)
    for family in metrics.job_ends.describe():  # read from the job store at each scrape
        real[family.name + "_total"] = set(family._labelnames)  # type: ignore[attr-defined]
    assert _documented_metrics() == real


def test_predict_reports_where_its_time_went(offline, tmp_path, profile_bytes) -> None:
    wait_ms = 80  # a lone request waits for its batch to fill: the queue time shows it
    app = _app(offline, tmp_path, max_wait_ms=wait_ms)
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        assert client.put("/profiles/t", content=profile_bytes(5)).status_code == 201
        texts = ["a lovely film", ["a premise", "its hypothesis"]]
        answer = client.post("/profiles/t/predict", json={"inputs": texts})
    assert answer.status_code == 200
    h = answer.headers
    assert h["x-compute-type"] == "cpu" and h["x-compute-characters"] == str(13 + 9 + 14)
    kinds = ("tokenization", "queue", "inference", "compute", "total")
    timing = {k: int(h[f"x-{k}-time"]) for k in kinds}
    assert timing["queue"] >= wait_ms - 5 and timing["inference"] > 0
    server = dict(re.findall(r"(\w+);dur=([\d.]+)", h["server-timing"]))
    server = {k: float(v) for k, v in server.items()}
    assert all(abs(server[k] - timing[k]) <= 1 for k in kinds)
    assert server["tokenization"] > 0  # tokenized ahead, on its own thread, before it queued
    parts = server["tokenization"] + server["queue"] + server["inference"]
    assert server["total"] >= server["compute"] >= parts - 1e-6


def test_readyz_refusals_say_when_to_retry(offline, tmp_path) -> None:
    app = _app(offline, tmp_path)
    with TestClient(app) as client:
        app.state.server.admission.begin_drain()
        draining = client.get("/readyz")
    assert draining.status_code == 503 and draining.headers["retry-after"] == "1"
    not_loaded = create_app(Settings(bank=None, sqlite_path=tmp_path / "q.sqlite3"), model=offline)
    not_loaded.state.server.worker.model = None  # as while the encoder loads
    answer = TestClient(not_loaded).get("/readyz")  # no lifespan: the model is never attached
    assert answer.status_code == 503 and answer.json()["error"] == "not_ready"
    assert answer.headers["retry-after"] == "1"


def test_api_docs_are_served_from_the_package(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
        urls = [a or b for a, b in urls]
        assert urls and "cdn" not in html.lower(), page
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), url
            assert client.get(url).status_code == 200, url
