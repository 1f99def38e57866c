"""How a bank names its encoder: absolute folders, pinned hub revisions, the caller's progress bars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from xpeft.adapters import encoder as encoder_module
from xpeft.adapters.bank import AdapterBank, create_random_bank
from xpeft.adapters.encoder import canonical_model_name, encoder_for_bank, load_encoder
from xpeft.adapters.errors import ModelError


def _tiny_model_folder(folder: Path, encoder) -> Path:
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        add_pooling_layer=False,
    )
    model.save_pretrained(folder)
    encoder.tokenizer.save_pretrained(folder)
    return folder


def test_canonical_names_make_folders_absolute_and_keep_aliases_and_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "enc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert canonical_model_name("enc") == str((tmp_path / "enc").resolve())
    assert canonical_model_name("./enc/") == str((tmp_path / "enc").resolve())
    assert canonical_model_name("minilm") == "minilm"
    assert canonical_model_name("random:bert-base") == "random:bert-base"
    assert canonical_model_name("org/some-model") == "org/some-model"  # no such folder: a hub id


def test_a_bank_made_from_a_relative_folder_loads_its_encoder_from_anywhere(tmp_path, encoder):
    _tiny_model_folder(tmp_path / "work" / "enc", encoder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "xpeft.cli.main", "bank", "create", "--out", "bank.safetensors"]
    done = subprocess.run(
        [*cmd, "--model", "enc", "--n", "4"], cwd=tmp_path / "work", env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    bank = AdapterBank.load(tmp_path / "work" / "bank.safetensors")
    assert bank.model_name == str((tmp_path / "work" / "enc").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(elsewhere)  # the folder name "enc" means nothing here
        loaded = encoder_for_bank(bank, device="cpu")
    finally:
        os.chdir(cwd)
    # The folder has no pooler weights: their random init must not change the id between loads.
    assert loaded.model_id == bank.model_id


def test_a_revision_is_refused_for_local_models(tmp_path, encoder):
    folder = _tiny_model_folder(tmp_path / "enc", encoder)
    for model in (str(folder), "minilm", "random:minilm"):
        with pytest.raises(ModelError) as err:
            load_encoder(model, revision="main")
        assert err.value.code == "invalid_revision"


def test_a_banks_pinned_revision_reaches_the_encoder_load(monkeypatch):
    # The hub cannot be reached here: record what encoder_for_bank asks load_encoder for.
    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(
        encoder_module, "load_encoder", lambda model, device, dtype, revision: calls.append((model, revision))
    )
    bank = create_random_bank(1, 32, "m", 2, model_name="org/model", model_revision="0123abc")
    assert bank.model_revision == "0123abc"
    encoder_for_bank(bank, device="cpu")
    encoder_for_bank(bank, model="other/model", device="cpu")  # another model: the pin does not apply
    assert calls == [("org/model", "0123abc"), ("other/model", None)]


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_an_encoder_leaves_the_callers_progress_bar_setting_alone(enabled):
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        load_encoder("random:minilm")
        assert hf_logging.is_progress_bar_enabled() is enabled
    finally:
        hf_logging.enable_progress_bar()
