"""Any BERT-family folder loads with adapter slots; other architectures are refused clearly."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, GPT2Config, GPT2Model

from xpeft.adapters.bank import create_random_bank
from xpeft.adapters.encoder import AdapterEncoder, default_model_dir, load_encoder
from xpeft.adapters.errors import ModelError
from xpeft.adapters.fusion import fuse


def _tiny_folder(tmp_path, model, encoder):
    model.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_bert_family_folders_get_working_slots(tmp_path, encoder, family):
    torch.manual_seed(0)
    if family == "bert":
        model = BertModel(
            BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
            add_pooling_layer=False,
        )
    else:
        model = DistilBertModel(DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=128))
    loaded = load_encoder(_tiny_folder(tmp_path, model, encoder))
    assert (loaded.num_layers, loaded.hidden_size) == (2, 64)
    assert loaded.model_id.startswith(f"{family}-L2-H64-")
    bank = create_random_bank(2, 64, loaded.model_id, num_adapters=4, reduction_factor=16)
    enc = loaded.tokenize(["one text", "and another one"])
    w = torch.zeros(1, 2, 4)
    w[..., 1] = 1.0
    with torch.no_grad():
        plain, adapted = loaded(enc), loaded(enc, fuse(w, w, bank))
    assert plain.shape == (2, 64)
    assert (plain - adapted).abs().max() > 1e-3  # the slots are really in the forward path


def test_model_id_follows_the_weights(tmp_path, encoder):
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        add_pooling_layer=False,
    )
    first = load_encoder(_tiny_folder(tmp_path / "a", model, encoder)).model_id
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight[0, 0] += 1.0
    assert load_encoder(_tiny_folder(tmp_path / "b", model, encoder)).model_id != first


def test_other_architectures_and_missing_models_are_refused(tmp_path, encoder):
    gpt = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ModelError) as err:
        AdapterEncoder(gpt, encoder.tokenizer, "x", "gpt2")
    assert err.value.code == "unsupported_model"
    with pytest.raises(ModelError) as err:
        load_encoder(str(tmp_path / "no-such-model"))
    assert err.value.code == "model_not_found"
    assert (default_model_dir() / "config.json").is_file()


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_token_ids_as_the_tokenizer_does(encoder, side):
    """The server pads a batch's token ids itself: texts and pairs of several lengths come out as
    ``tokenizer.pad`` makes them (ids, token types, attention mask), on either padding side."""
    inputs = ["a lovely film", ("a much longer premise of several words here", "a hypothesis"), "dull"]
    ids = encoder.token_ids(inputs, [128, 128, 4])
    old = encoder.tokenizer.padding_side
    encoder.tokenizer.padding_side = side
    try:
        expected = encoder.tokenizer.pad(ids, padding=True, return_tensors="pt")
        got = encoder.collate(ids)
    finally:
        encoder.tokenizer.padding_side = old
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert got["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in ids)
