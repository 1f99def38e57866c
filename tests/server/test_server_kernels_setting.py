"""The kernels setting: read from XPEFT_KERNELS as a Settings field, checked at start, passed to the
dispatch when the model is built, and shown in /readyz, the start-up log and a metric."""

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
def _fresh_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no choice made in this process, and leaves none behind."""
    monkeypatch.setattr(kernels, "_chosen", None)
    monkeypatch.delenv("XPEFT_KERNELS", raising=False)


def test_the_environment_variable_is_the_settings_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().kernels == "auto"
    monkeypatch.setenv("XPEFT_KERNELS", " Apply ")
    assert Settings().kernels == "apply"


def test_an_unknown_kernel_refuses_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XPEFT_KERNELS", "apply,sgemm")
    with pytest.raises(ValidationError, match="unknown kernels \\['sgemm'\\]"):
        Settings()


def test_building_the_model_fixes_the_choice_for_the_process(monkeypatch, bank) -> None:
    """The dispatch follows the setting given to build_model, and no later change of the variable."""
    model = build_model(Settings(kernels="gather", device="cpu"), bank)
    assert isinstance(model, MultiProfileModel)
    assert kernels.chosen() == {"apply": False, "gather": True}
    monkeypatch.setenv("XPEFT_KERNELS", "all")
    assert kernels.chosen() == {"apply": False, "gather": True}
    fake_cuda = type("T", (), {"is_cuda": True, "dtype": torch.bfloat16, "requires_grad": False})()
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    assert kernels.enabled("gather", fake_cuda) and not kernels.enabled("apply", fake_cuda)


def test_the_report_runs_kernels_only_on_cuda_with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels.configure("all")
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernel_report("all", cuda) == {
        "setting": "all",
        "chosen": "apply,gather",
        "running": "apply,gather",
    }
    assert kernel_report("all", cpu)["running"] == "none"
    monkeypatch.setattr(kernels, "HAVE_TRITON", False)
    assert kernel_report("all", cuda)["running"] == "none"


def test_readyz_the_metric_and_the_log_show_the_choice(encoder, bank, tmp_path, caplog) -> None:
    app = create_app(
        Settings(kernels="off", sqlite_path=tmp_path / "p.sqlite3"), model=MultiProfileModel(encoder, bank)
    )
    with caplog.at_level(logging.INFO, logger="xpeft.server"), TestClient(app) as client:
        detail = client.get("/readyz").json()["detail"]
        metrics = client.get("/metrics").text
    assert detail["kernels"] == {"setting": "off", "chosen": "none", "running": "none"}
    assert 'xpeft_kernels_info{chosen="none",running="none",setting="off"} 1.0' in metrics
    assert kernels.chosen() == {"apply": False, "gather": False}
    assert any("kernels none (XPEFT_KERNELS=off, running: none)" in r.getMessage() for r in caplog.records)
