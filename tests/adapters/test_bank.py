"""The bank: seeded, self-describing, tamper-evident; built from trained or AdapterHub adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from xpeft.adapters.adapterhub import import_adapterhub, read_adapterhub
from xpeft.adapters.bank import AdapterBank, create_random_bank
from xpeft.adapters.errors import BankError
from xpeft.adapters.fusion import fuse


def test_save_load_round_trip(tmp_path, bank):
    path = bank.save(tmp_path / "bank.safetensors")
    back = AdapterBank.load(path)
    assert back.bank_id == bank.bank_id
    assert back.metadata() == bank.metadata()
    for a, b in zip(back.tensors().values(), bank.tensors().values(), strict=True):
        assert torch.equal(a, b)


def test_saved_bank_is_readable_by_the_server_user(tmp_path, bank):
    # safetensors alone writes 0600: a server running as another user could not read the bank
    path = bank.save(tmp_path / "bank.safetensors")
    assert path.stat().st_mode & 0o777 == 0o644


def test_seed_fixes_content_and_id():
    a = create_random_bank(2, 32, "m", num_adapters=4, reduction_factor=8, seed=7)
    b = create_random_bank(2, 32, "m", num_adapters=4, reduction_factor=8, seed=7)
    c = create_random_bank(2, 32, "m", num_adapters=4, reduction_factor=8, seed=8)
    assert a.bank_id == b.bank_id != c.bank_id
    assert create_random_bank(2, 32, "other", num_adapters=4, reduction_factor=8, seed=7).bank_id != a.bank_id


def test_tampered_bank_is_refused(tmp_path, bank):
    tensors = {k: v.clone() for k, v in bank.tensors().items()}
    tensors["up"][0, 0, 0, 0] += 1.0
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bank.metadata())
    with pytest.raises(BankError) as err:
        AdapterBank.load(tmp_path / "bad.safetensors")
    assert err.value.code == "bank_checksum"
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(BankError) as err:
        AdapterBank.load(tmp_path / "junk.safetensors")
    assert err.value.code == "bank_invalid"
    with pytest.raises(BankError) as err:
        AdapterBank.load(tmp_path / "missing.safetensors")
    assert err.value.code == "bank_not_found"


def test_random_adapters_change_hidden_states_measurably(encoder, bank):
    """A near-zero bank would make every mask look the same; ours moves the embedding."""
    enc = encoder.tokenize(["a quiet film about a family", "the service was slow"])
    with torch.no_grad():
        base = encoder(enc)
        k = 2  # N // 10 for the N=20 test bank
        w = torch.zeros(1, bank.num_layers, bank.num_adapters)
        w[..., :k] = 1.0 / k
        moved = encoder(enc, fuse(w, w, bank))
    relative = ((moved - base).norm() / base.norm()).item()
    assert relative > 0.05, relative


def _write_adapterhub_folder(path, L, d, r, seed, fmt="bin", leave_out=()):
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {"down": [], "down_bias": [], "up": [], "up_bias": []}
    for layer in range(L):
        prefix = f"bert.encoder.layer.{layer}.output.adapters.task{seed}."
        dw, db = torch.randn(r, d, generator=g), torch.randn(r, generator=g)
        uw, ub = torch.randn(d, r, generator=g), torch.randn(d, generator=g)
        if layer in leave_out:
            dw, db, uw, ub = (torch.zeros_like(t) for t in (dw, db, uw, ub))
        else:
            state.update(
                {
                    prefix + "adapter_down.0.weight": dw,
                    prefix + "adapter_down.0.bias": db,
                    prefix + "adapter_up.weight": uw,
                    prefix + "adapter_up.bias": ub,
                }
            )
        expected["down"].append(dw.T)
        expected["down_bias"].append(db)
        expected["up"].append(uw.T)
        expected["up_bias"].append(ub)
    path.mkdir()
    config = {
        "config": {
            "architecture": "bottleneck",
            "mh_adapter": False,
            "output_adapter": True,
            "reduction_factor": d // r,
            "non_linearity": "relu",
            "original_ln_before": True,
        },
        "hidden_size": d,
        "model_class": "BertModel",
        "model_name": "test",
        "model_type": "bert",
        "name": f"task{seed}",
        "version": "adapters.1.0.0",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, path / "pytorch_adapter.bin")
    else:
        save_file(state, str(path / "adapter.safetensors"))
    return {k: torch.stack(v) for k, v in expected.items()}


def test_adapterhub_import(tmp_path):
    L, d, r = 3, 32, 4
    a = _write_adapterhub_folder(tmp_path / "a", L, d, r, seed=1, fmt="bin")
    b = _write_adapterhub_folder(tmp_path / "b", L, d, r, seed=2, fmt="safetensors", leave_out=(1,))
    bank = import_adapterhub([tmp_path / "a", tmp_path / "b"], model_id="m", num_layers=L, hidden_size=d)
    assert (bank.num_layers, bank.num_adapters, bank.hidden_size, bank.bottleneck) == (L, 2, d, r)
    assert bank.init == "adapterhub"
    for i, expected in enumerate([a, b]):
        for name, tensor in expected.items():
            torch.testing.assert_close(getattr(bank, name)[:, i], tensor, atol=0, rtol=0)


def test_adapterhub_refusals(tmp_path):
    _write_adapterhub_folder(tmp_path / "a", 3, 32, 4, seed=1)
    with pytest.raises(BankError, match="hidden size"):
        read_adapterhub(tmp_path / "a", num_layers=3, hidden_size=64)
    with pytest.raises(BankError, match="layer 2"):
        read_adapterhub(tmp_path / "a", num_layers=2, hidden_size=32)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["config"]["non_linearity"] = "swish"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BankError, match="swish"):
        read_adapterhub(tmp_path / "a", num_layers=3, hidden_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="adapter_config.json"):
        read_adapterhub(tmp_path / "empty", num_layers=3, hidden_size=32)
