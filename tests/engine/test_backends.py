"""Encoder backends: each one serves a mixed batch of profiles as the torch encoder does, row by row.

The real MiniLM and a small seeded bank; profiles of every kind at slots past the first of a
pool with more slots than rows. ONNX backends export into a session folder once (skipped without
ONNX Runtime). ``onnx`` is exact to float rounding; the int8 backends quantize the frozen encoder,
so they are held to agreeing labels and a bound on the logits' difference, documented here:
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from xpeft.adapters.bank import AdapterBank, create_random_bank
from xpeft.adapters.encoder import AdapterEncoder
from xpeft.adapters.errors import XPeftError
from xpeft.cli.serve import build_settings, register
from xpeft.engine.backends import (
    BACKENDS,
    BackendError,
    build_backend,
    have_onnxruntime,
    resolve_backend,
)
from xpeft.engine.runtime import MultiProfileModel, SlotBatch
from xpeft.engine.slots import SlotPool
from xpeft.profiles.synthetic import random_profile
from xpeft.server.app import create_app
from xpeft.server.settings import Settings

#: int8 backends: the largest difference of one logit from torch's (the random heads' logits here
#: are O(1)), and the least share of rows whose predicted label agrees with torch's. Random heads
#: leave many rows with their top two logits closer than that difference, so labels flip on those
#: near-ties; python -m bench.eval.backends accuracy measures trained profiles. Block-wise int8 drifts least;
#: torch-int8 quantizes the activations per tensor with a reduced range and drifts furthest.
INT8_LOGIT_TOLERANCE = {"onnx-int8-block": 0.1, "onnx-int8": 0.25, "torch-int8": 0.4}
INT8_LABEL_AGREEMENT = {"onnx-int8-block": 0.9, "onnx-int8": 0.75, "torch-int8": 0.6}
EXACT_TOLERANCE = 1e-4

KINDS = ["hard", "soft", "units", "single_adapter", "head_only", "hard", "units"]
TEXTS = [
    "the film was wonderful",
    "a dreadful, boring evening",
    "what a superb meal",
    "this book is painful to read from the first page to the very last one",
    "ok",
    "the acting was lovely but the plot dragged on and on",
    "an awful experience",
    "brilliant",
    "the service was slow and the food cold",
    "i would go again",
    "charming and delightful from start to finish",
    "not my thing",
]

needs_onnx = pytest.mark.skipif(not have_onnxruntime(), reason="needs the cpu-fast extra (onnxruntime)")
PARAMS = [
    pytest.param(name, marks=needs_onnx) if name.startswith("onnx") else pytest.param(name)
    for name in BACKENDS
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backend-cache")


@pytest.fixture(scope="module")
def model(encoder: AdapterEncoder, bank: AdapterBank) -> MultiProfileModel:
    return MultiProfileModel(encoder, bank)


@pytest.fixture(scope="module")
def served(model: MultiProfileModel, bank: AdapterBank) -> SlotBatch:
    """Profiles of every kind (several labels counts) at slots 3, 5, 7, ... of a 20-slot pool."""
    profiles = [
        random_profile(bank, kind, seed=i, labels=[f"l{j}" for j in range(2 + i % 3)])
        for i, kind in enumerate(KINDS)
    ]
    pool = SlotPool(20, bank.num_layers, bank.hidden_size, bank.bottleneck)
    slots = [3 + 2 * i for i in range(len(profiles))]
    model.fuse_into_pool(pool, slots, profiles)
    batch = SlotBatch(pool, slots)
    batch.profiles = profiles  # type: ignore[attr-defined]
    return batch


@pytest.fixture(scope="module")
def backends() -> dict[str, object]:
    """The backends built so far in this module, by name (each built once)."""
    return {}


def _backend(name: str, model: MultiProfileModel, cache_dir: Path, built: dict[str, object]):
    if name not in built:
        built[name] = build_backend(name, model.encoder, threads=2, cache_dir=cache_dir)
    return built[name]


def _logits(model: MultiProfileModel, backend, served: SlotBatch, rows: list[int]) -> torch.Tensor:
    profiles = served.profiles  # type: ignore[attr-defined]
    model.backend = backend
    try:
        return model.forward_rows(TEXTS[: len(rows)], rows, profiles, served)[0]
    finally:
        model.backend = None


def _check(name: str, ours: torch.Tensor, ref: torch.Tensor, rows: list[int], served: SlotBatch) -> None:
    labels = [served.profiles[r].num_labels for r in rows]  # type: ignore[attr-defined]
    diffs = [float((ours[i, :c] - ref[i, :c]).abs().max()) for i, c in enumerate(labels)]
    if name in ("torch", "onnx"):
        assert max(diffs) < EXACT_TOLERANCE, diffs
        return
    assert max(diffs) < INT8_LOGIT_TOLERANCE[name], diffs
    agree = [int(ours[i, :c].argmax()) == int(ref[i, :c].argmax()) for i, c in enumerate(labels)]
    assert sum(agree) >= INT8_LABEL_AGREEMENT[name] * len(agree), agree


@pytest.mark.parametrize("name", PARAMS)
def test_a_mixed_batch_matches_torch_row_by_row(name, model, served, cache_dir, backends) -> None:
    backend = _backend(name, model, cache_dir, backends)
    assert backend.name == name
    rows = [i % len(KINDS) for i in range(len(TEXTS))]  # every kind, each profile on several rows
    ref = _logits(model, None, served, rows)
    ours = _logits(model, backend, served, rows)
    assert ours.shape == ref.shape
    _check(name, ours, ref, rows, served)
    # the adapters matter: a row served with another profile's slot gives other logits
    other = _logits(model, backend, served, [(r + 1) % len(KINDS) for r in rows])
    assert not torch.allclose(other[:, :2], ours[:, :2], atol=1e-3)


@pytest.mark.parametrize("name", PARAMS)
def test_rows_of_one_slot_and_a_pool_of_one(name, model, served, cache_dir, backends) -> None:
    backend = _backend(name, model, cache_dir, backends)
    rows = [2] * 5  # all rows read slot 7 of the pool (a units profile)
    _check(name, _logits(model, backend, served, rows), _logits(model, None, served, rows), rows, served)
    # predict() of one profile: a transient pool of exactly one slot (rows=None in the backend)
    profile = served.profiles[0]  # type: ignore[attr-defined]
    ref = model.predict(profile, TEXTS)
    model.backend = backend
    try:
        ours = model.predict(profile, TEXTS)
    finally:
        model.backend = None
    ref_p = torch.tensor([list(p.scores.values()) for p in ref])
    ours_p = torch.tensor([list(p.scores.values()) for p in ours])
    tolerance = EXACT_TOLERANCE if name in ("torch", "onnx") else 0.1
    assert (ref_p - ours_p).abs().max() < tolerance


@needs_onnx
def test_the_export_is_cached_once_and_takes_any_bottleneck(
    model, encoder, cache_dir, backends, monkeypatch
) -> None:
    from xpeft.engine.backends.onnx_backend import QUANTIZER_SETTINGS, OnnxBackend, cache_key

    first = _backend("onnx", model, cache_dir, backends)
    stamp = first.path.stat().st_mtime_ns
    again = OnnxBackend.build(model.encoder, cache_dir=cache_dir)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # loaded, not re-exported
    assert model.encoder.model_id in first.path.parent.name
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".export-")]
    # other quantizer settings are another cache entry, never the graph quantized the old way
    key = cache_key(model.encoder)
    monkeypatch.setitem(QUANTIZER_SETTINGS, "dynamic", {"weight_type": "QInt8", "per_channel": False})
    assert cache_key(model.encoder) != key
    # a bank of another reduction factor (r = 48, not 24) runs through the same graph
    other = create_random_bank(
        encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=6, reduction_factor=8, seed=3
    )
    wide = MultiProfileModel(encoder, other)
    profile = random_profile(other, "units", seed=1)
    ref = wide.predict(profile, TEXTS)
    wide.backend = again
    ours = wide.predict(profile, TEXTS)
    assert other.bottleneck == 48
    for a, b in zip(ref, ours, strict=True):
        assert a.label == b.label and abs(a.score - b.score) < EXACT_TOLERANCE


def test_a_bad_backend_name_is_a_typed_settings_error() -> None:
    with pytest.raises(ValidationError, match="backend"):
        Settings(backend="fastest")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    with pytest.raises(SystemExit):  # argparse lists the choices
        parser.parse_args(["serve", "--backend", "fastest"])
    args = parser.parse_args(["serve", "--backend", "torch", "--bank", "b.safetensors"])
    assert build_settings(args).backend == "torch"
    with pytest.raises(BackendError, match="unknown backend"):
        resolve_backend("fastest", "cpu")
    with pytest.raises(BackendError, match="CPU only") as err:
        resolve_backend("onnx-int8", "cuda")
    assert isinstance(err.value, XPeftError) and err.value.code == "backend_unavailable"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("auto", "cpu") == ("onnx-int8" if have_onnxruntime() else "torch")


@needs_onnx
def test_readyz_metrics_and_log_name_the_backend(encoder, bank, tmp_path, caplog, cache_dir) -> None:
    model = MultiProfileModel(encoder, bank)
    settings = Settings(backend="onnx", backend_cache=cache_dir, sqlite_path=tmp_path / "p.sqlite3")
    with (
        caplog.at_level(logging.INFO, logger="xpeft.server"),
        TestClient(create_app(settings, model)) as client,
    ):
        detail = client.get("/readyz").json()["detail"]
        metrics = client.get("/metrics").text
    assert detail["backend"] == "onnx"
    assert 'xpeft_backend_info{backend="onnx",setting="onnx"} 1.0' in metrics
    assert any("backend onnx (XPEFT_BACKEND=onnx)" in r.getMessage() for r in caplog.records)
    assert model.backend is not None and model.backend.name == "onnx"


def test_torch_serves_through_the_encoder_itself(encoder, bank, tmp_path) -> None:
    model = MultiProfileModel(encoder, bank)
    settings = Settings(backend="torch", sqlite_path=tmp_path / "p.sqlite3")
    with TestClient(create_app(settings, model)) as client:
        assert client.get("/readyz").json()["detail"]["backend"] == "torch"
        assert 'xpeft_backend_info{backend="torch",setting="torch"} 1.0' in client.get("/metrics").text
    assert model.backend is None


@needs_onnx
def test_auto_falls_back_to_torch_where_a_named_backend_stops_the_start(
    encoder, bank, tmp_path, caplog
) -> None:
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    model = MultiProfileModel(encoder, bank)
    settings = Settings(backend="auto", backend_cache=not_a_folder, sqlite_path=tmp_path / "p.sqlite3")
    with (
        caplog.at_level(logging.WARNING, logger="xpeft.server"),
        TestClient(create_app(settings, model)) as client,
    ):
        assert client.get("/readyz").json()["detail"]["backend"] == "torch"
    assert any("backend onnx-int8 cannot run" in r.getMessage() for r in caplog.records)
    named = Settings(backend="onnx", backend_cache=not_a_folder, sqlite_path=tmp_path / "q.sqlite3")
    with pytest.raises(BackendError, match="export cache") as err, TestClient(create_app(named, model)):
        pass
    assert err.value.code == "backend_cache"
