"""The app factory in-process (the notebook path): a given model, and a model that fails to load."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.server.app import create_app
from xpeft.server.settings import Settings


def test_app_with_a_given_model_is_ready_at_once(encoder, bank, profile_bytes, tmp_path) -> None:
    model = MultiProfileModel(encoder, bank)
    app = create_app(Settings(sqlite_path=tmp_path / "p.sqlite3"), model=model)
    data = profile_bytes(3, "soft")
    # no admin token: writes are open to loopback clients (protected mode), as a notebook is
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        assert client.get("/readyz").status_code == 200
        assert client.put("/profiles/nb", content=data).status_code == 201
        answer = client.post("/profiles/nb/predict", json={"inputs": ["in a notebook"]}).json()
    expected = model.predict(xpm.decode(data, bank), ["in a notebook"])[0]
    assert answer["predictions"][0]["label"] == expected.label
    assert abs(answer["predictions"][0]["score"] - expected.score) < 1e-5


def test_a_model_that_cannot_load_fails_health(bank_path, tmp_path) -> None:
    app = create_app(
        Settings(bank=bank_path, model="random:no-such-shape", sqlite_path=tmp_path / "p.sqlite3")
    )
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/healthz").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = client.get("/healthz").json()
        assert health["error"] == "model_failed" and "no-such-shape" in health["message"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "model_not_found" in ready.json()["message"]
        refused = client.post("/profiles/x/predict", json={"inputs": ["x"]})
        assert refused.status_code == 503 and refused.json()["error"] == "not_ready"
