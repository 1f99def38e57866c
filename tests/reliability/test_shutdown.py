"""Graceful shutdown. Over HTTP: SIGTERM to server ``drain`` with predictions in flight
(testsupport/scenarios/shutdown.py). In process: the drain deadline, after which queued predictions
get 503 ``shutting_down``, and the refusals while draining.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from testsupport.scenarios.shutdown import run_shutdown
from xpeft.engine.cache import CachedProfile
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.server.app import create_app
from xpeft.server.errors import ApiError
from xpeft.server.settings import Settings

from .conftest import ADMIN, bearer

DRAIN_DELAY_S, DRAIN_TIMEOUT_S, FINAL_GRACE_S = 0.5, 60.0, 5.0  # server drain's settings; cli.FINAL_GRACE_S


def test_sigterm_finishes_in_flight_refuses_new_requests_and_exits(fleet, make_profile) -> None:
    server = fleet.drain
    with httpx.Client(base_url=server.url, headers=bearer(ADMIN), timeout=30) as client:
        assert client.put("/profiles/drain-1", content=make_profile(8)).status_code == 201
    # 8 texts per request at 2 per batch: each request takes 4 forwards, so all 10 are still in flight
    # when SIGTERM comes even on a busy machine
    result = asyncio.run(run_shutdown(server, bearer(ADMIN), "drain-1", in_flight=10, texts=8))
    print("\n", {k: v for k, v in result.items() if k != "probe_outcomes"})

    assert result["seen_in_flight"] >= 5  # SIGTERM really came with work in flight
    assert result["in_flight_statuses"] == {"200": 10}  # every one of them finished
    probes = result["probe_outcomes"]
    new = [o for o in probes if o.kind == "new_predict"]
    answered = [o for o in new if o.status != 0]
    assert answered and {(o.status, o.code) for o in answered} == {(503, "shutting_down")}
    assert {o.status for o in probes if o.kind == "readyz"} <= {503, 0} and result["probes"]["readyz"].get(
        "503 shutting_down"
    )
    assert {o.status for o in probes if o.kind == "healthz"} <= {200, 0}
    # it kept answering 503 at least for the drain delay, then closed the port and exited cleanly, soon
    # after the last in-flight request (not after the 60 s drain timeout)
    assert result["port_closed_s"] is not None and result["port_closed_s"] >= DRAIN_DELAY_S
    assert result["returncode"] == 0
    assert result["exit_s"] < max(DRAIN_DELAY_S, result["last_in_flight_done_s"]) + FINAL_GRACE_S
    assert result["exit_s"] < DRAIN_DELAY_S + DRAIN_TIMEOUT_S + FINAL_GRACE_S


def test_drain_deadline_answers_queued_predictions_and_refuses_new_requests(
    encoder, bank, tmp_path, make_profile
) -> None:
    settings = Settings(sqlite_path=tmp_path / "p.sqlite3", drain_timeout_s=0.3)
    app = create_app(settings, model=MultiProfileModel(encoder, bank))
    state = app.state.server
    with TestClient(app, client=("127.0.0.1", 50000)) as client:  # loopback: writes open without a token
        assert client.put("/profiles/d-1", content=make_profile(1)).status_code == 201
        state.admission.begin_drain()
        refused = client.get("/profiles")
        assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
        assert refused.headers["connection"] == "close" and refused.headers["retry-after"] == "1"
        assert client.post("/profiles/d-1/predict", json={"inputs": ["x"]}).json()["error"] == "shutting_down"
        assert client.get("/readyz").json()["error"] == "shutting_down"
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
        metrics = client.get("/metrics").text
        assert 'xpeft_admission_refused_total{reason="draining"} 2.0' in metrics

    async def stuck() -> None:
        # A request that never finishes, and one queued behind it (the batching loop is not running).
        entry = CachedProfile("d-1", 1, xpm.decode(make_profile(1), bank))
        queued = state.batcher.submit(entry, ["x"])
        state.admission.in_flight = 1
        left = await state.drain()
        assert left == 1
        with pytest.raises(ApiError) as answer:
            await queued
        assert answer.value.status == 503 and answer.value.code == "shutting_down"

    asyncio.run(stuck())
