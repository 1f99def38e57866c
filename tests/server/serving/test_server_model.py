"""The model the server builds from its settings: the same encoder rule as the CLI and the offline
API (``encoder_for_bank``), a bank's pinned revision included."""

from __future__ import annotations

import pytest

from xpeft.adapters import encoder as encoder_module
from xpeft.adapters.bank import AdapterBank, create_random_bank
from xpeft.adapters.errors import ModelError, XPeftError
from xpeft.server.model import build_model, check_readable, load_bank
from xpeft.server.settings import Settings


def _bank(model_name: str, revision: str) -> AdapterBank:
    return create_random_bank(
        2, 32, "model-id", num_adapters=3, model_name=model_name, model_revision=revision
    )


class _Stop(Exception):
    pass


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record what reaches ``load_encoder``, then stop (no hub is reachable from the tests)."""
    calls: list[dict] = []

    def load(model: str, **kwargs: object) -> None:
        calls.append({"model": model, **kwargs})
        raise _Stop()

    monkeypatch.setattr(encoder_module, "load_encoder", load)
    return calls


def test_a_banks_pinned_revision_reaches_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    with pytest.raises(_Stop):
        build_model(Settings(device="cpu"), _bank("org/encoder", "0123abcd"))
    assert calls == [
        {
            "model": "org/encoder",
            "device": "cpu",
            "dtype": encoder_module.torch.float32,
            "revision": "0123abcd",
        }
    ]


def test_a_model_named_in_the_settings_is_loaded_without_the_banks_revision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _spy(monkeypatch)
    with pytest.raises(_Stop):
        build_model(
            Settings(model="org/other", device="cpu", dtype="bfloat16"), _bank("org/encoder", "0123abcd")
        )
    assert calls[0]["model"] == "org/other" and calls[0]["revision"] is None
    assert calls[0]["dtype"] == encoder_module.torch.bfloat16


def test_the_real_loader_sees_the_revision() -> None:
    """Unpatched: a revision pinned on a bank of the local default model is refused by the loader
    itself (a revision means nothing for a local folder), so it did reach it."""
    with pytest.raises(ModelError) as info:
        build_model(Settings(device="cpu"), _bank("minilm", "0123abcd"))
    assert info.value.code == "invalid_revision"


def test_load_bank_refuses_a_missing_file_or_a_folder_clearly(tmp_path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(XPeftError) as info:
        load_bank(missing)
    assert info.value.code == "bank_not_found" and str(missing) in info.value.message
    with pytest.raises(XPeftError) as info:
        check_readable(tmp_path)
    assert info.value.code == "bank_unreadable" and "Is a directory" in info.value.message
