"""The kernels setting: read from XPEFT_KERNELS as a Settings field, checked at start, made into the
model's KernelChoice when it is built, and shown in /readyz, the start-up log and a metric."""

from __future__ import annotations

import logging

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from xpeft.adapters import kernels
from xpeft.engine.runtime import MultiProfileModel
from xpeft.server.app import create_app
from xpeft.server.model import build_model, kernel_report
from xpeft.server.settings import Settings


@pytest.fixture(autouse=True)
def _no_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without XPEFT_KERNELS in the environment."""
    monkeypatch.delenv("XPEFT_KERNELS", raising=False)


def test_the_environment_variable_is_the_settings_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().kernels == "auto"
    monkeypatch.setenv("XPEFT_KERNELS", " Apply ")
    assert Settings().kernels == "apply"


def test_an_unknown_kernel_refuses_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XPEFT_KERNELS", "apply,sgemm")
    with pytest.raises(ValidationError, match="unknown kernels \\['sgemm'\\]"):
        Settings()


def test_building_the_model_fixes_its_choice(monkeypatch, bank) -> None:
    """The model's forward and fusion follow the setting given to build_model, down to the encoder's
    adapter slots, and no later change of the variable."""
    model = build_model(Settings(kernels="gather", device="cpu"), bank)
    assert isinstance(model, MultiProfileModel)
    assert model.kernels.kernels == {"apply": False, "gather": True}
    assert all(slot.kernels is model.kernels for slot in model.encoder.slots)
    monkeypatch.setenv("XPEFT_KERNELS", "all")
    assert model.kernels.kernels == {"apply": False, "gather": True}
    fake_cuda = type("T", (), {"is_cuda": True, "dtype": torch.bfloat16, "requires_grad": False})()
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    assert model.kernels.enabled("gather", fake_cuda) and not model.kernels.enabled("apply", fake_cuda)
    assert kernel_report(model) == {"setting": "gather", "chosen": "gather", "running": "none"}  # a CPU


def test_readyz_the_metric_and_the_log_show_the_choice(encoder, bank, tmp_path, caplog) -> None:
    app = create_app(
        Settings(kernels="off", sqlite_path=tmp_path / "p.sqlite3"), model=MultiProfileModel(encoder, bank)
    )
    with caplog.at_level(logging.INFO, logger="xpeft.server"), TestClient(app) as client:
        detail = client.get("/readyz").json()["detail"]
        metrics = client.get("/metrics").text
    assert detail["kernels"] == {"setting": "off", "chosen": "none", "running": "none"}
    assert 'xpeft_kernels_info{chosen="none",running="none",setting="off"} 1.0' in metrics
    assert app.state.server.worker.model.kernels.kernels == {"apply": False, "gather": False}
    assert any("kernels none (XPEFT_KERNELS=off, running: none)" in r.getMessage() for r in caplog.records)
