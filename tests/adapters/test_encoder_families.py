"""Every common encoder family, end to end from a local folder: `xpeft bank create --model FOLDER`,
`xpeft train` (a few steps, the shipped default method with its abstention rule), then a mixed
batch of two profiles, single texts and text pairs of different lengths, each row equal to the same
row served alone; and the adapters really sit in the forward (a profile changes the embeddings).

Each family is a tiny randomly initialised model (2 layers, hidden 64) built here from its config,
saved with a WordPiece tokenizer built here from the examples' words: no model hub. A family whose
layout the slots do not fit (ALBERT) is refused at load, naming the supported ones; a bank refuses
an encoder other than the one it was built for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

from xpeft.adapters.encoder import SUPPORTED_LAYOUTS, load_encoder
from xpeft.adapters.errors import BankError, ModelError
from xpeft.cli.main import main
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles.format_sizes import size_parts
from xpeft.profiles.synthetic import random_profile
from xpeft.training.data import Dataset

HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 64, 2, 2, 128, 128
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# model_type -> its config's own names for the tiny shape (AutoConfig.for_model builds it)
FAMILIES: dict[str, dict[str, Any]] = {
    "bert": {},
    "roberta": {"max_position_embeddings": POSITIONS + 2, "type_vocab_size": 1},
    "xlm-roberta": {"max_position_embeddings": POSITIONS + 2, "type_vocab_size": 1},
    "distilbert": {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": FFN},
    "deberta-v2": {
        "type_vocab_size": 0,
        "relative_attention": True,
        "position_buckets": 32,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
    },
    "mpnet": {"max_position_embeddings": POSITIONS + 2, "relative_attention_num_buckets": 32},
    "electra": {"embedding_size": HIDDEN},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 16},
}


def tokenizer_folder(folder: Path, words: set[str]) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer over ``words`` and their letters, BERT's templates."""
    letters = sorted({c for w in words for c in w})
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(words) + [f"##{c}" for c in letters] + letters)}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=POSITIONS,
        model_input_names=[
            "input_ids",
            "token_type_ids",
            "attention_mask",
        ],  # as BERT's: every family gets them
    )
    tok.save_pretrained(folder)
    return tok


def model_folder(folder: Path, model_type: str, words: set[str], **overrides: Any) -> Path:
    """A tiny random ``model_type`` encoder and its tokenizer, saved as a Hugging Face folder."""
    tok = tokenizer_folder(folder, words)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.cls_token_id,
        "eos_token_id": tok.sep_token_id,
        "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
    }
    shape = {
        "vocab_size": len(tok),
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": FFN,
        "max_position_embeddings": POSITIONS,
    }
    config = AutoConfig.for_model(model_type, **{**shape, **ids, **overrides})
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def words(separable: Dataset) -> set[str]:
    return {w for text in separable.inputs for w in str(text).lower().split()}


@pytest.fixture(scope="module")
def data_file(separable: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("family-data") / "train.tsv"
    rows = [f"{text}\t{label}" for text, label in zip(separable.inputs, separable.labels, strict=True)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_trains_and_serves_mixed_batches_like_single_rows(
    model_type: str, words: set[str], data_file: Path, tmp_path: Path
) -> None:
    folder = model_folder(tmp_path / model_type, model_type, words, **FAMILIES[model_type])
    bank_path, profile_path = tmp_path / "bank.safetensors", tmp_path / "p.xpm"
    assert main(["bank", "create", "--model", str(folder), "--out", str(bank_path), "--n", "8"]) == 0
    tiny = ["--epochs", "1", "--batch-size", "16", "--max-length", "16", "--holdout", "0.2", "--quiet"]
    assert (
        main(["train", "--bank", str(bank_path), "--data", str(data_file), "--out", str(profile_path), *tiny])
        == 0
    )

    model = MultiProfileModel.load(bank_path, device="cpu")  # the encoder the bank recorded
    encoder = model.encoder
    assert encoder.model.config.model_type == model_type and encoder.num_layers == LAYERS
    assert model.bank.model_name == str(folder.resolve())
    trained = model.load_profile(profile_path)
    assert trained.abstain is not None  # the shipped default: a rule included
    parts = size_parts(profile_path.read_bytes())
    # the blend rule: knots, point, held-out count and weight (19 fp16), and C x d sign bits
    assert parts["rule"] == 19 * 2 + (len(trained.labels) * HIDDEN + 7) // 8
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    other = random_profile(model.bank, "units", seed=7, labels=["x", "y", "z"])

    short = ["the film was wonderful", "awful"]
    longer = ["what a charming and lovely meal this book is", ("a dreadful experience", "the film was great")]
    requests = [(trained, [*short, *longer]), (other, [longer[1], short[0], "a superb book"])]
    mixed = model.predict_batch(requests)
    for (profile, inputs), answers in zip(requests, mixed, strict=True):
        for text, answer in zip(inputs, answers, strict=True):
            (alone,) = model.predict_batch([(profile, [text])])[0]
            assert answer.label == alone.label and answer.abstained == alone.abstained, (model_type, text)
            for label, score in answer.scores.items():
                assert score == pytest.approx(alone.scores[label], abs=1e-5), (model_type, text)
            assert answer.confidence == pytest.approx(alone.confidence, abs=1e-5)

    # the slots are in the forward: the profile's adapters move the embeddings
    enc = encoder.tokenize(short)
    with torch.no_grad():
        plain = encoder(enc)
        adapted = encoder(enc, model.fuse_batch([trained]))
    assert not torch.allclose(plain, adapted, atol=1e-6)


def test_pairs_keep_their_segments_where_the_family_has_them(words: set[str], tmp_path: Path) -> None:
    """BERT and ELECTRA get token type ids; RoBERTa (one type), MPNet, DistilBERT and ModernBERT
    (no such input) do not: a pair's second segment would index past RoBERTa's table."""
    for model_type, wanted in (("bert", True), ("roberta", False), ("mpnet", False), ("modernbert", False)):
        folder = model_folder(tmp_path / model_type, model_type, words, **FAMILIES[model_type])
        encoder = load_encoder(str(folder))
        enc = encoder.tokenize([("the film was great", "awful")])
        assert ("token_type_ids" in enc) is wanted, model_type
        if wanted:
            assert enc["token_type_ids"].max().item() == 1
        ids = encoder.token_ids([("a lovely meal", "boring")])
        assert ("token_type_ids" in ids[0]) is wanted


def test_a_family_the_slots_do_not_fit_is_refused_naming_the_supported_ones(
    words: set[str], tmp_path: Path, capsys
) -> None:
    albert = {"embedding_size": HIDDEN}  # ALBERT shares one layer group: no per-layer projection list
    folder = model_folder(tmp_path / "albert", "albert", words, **albert)
    with pytest.raises(ModelError) as err:
        load_encoder(str(folder))
    assert err.value.code == "unsupported_model"
    assert "albert" in err.value.message and SUPPORTED_LAYOUTS in err.value.message
    for family in ("BERT", "RoBERTa", "XLM-R", "DistilBERT", "DeBERTa-v2", "MPNet", "ELECTRA", "ModernBERT"):
        assert family in err.value.message
    assert main(["bank", "create", "--model", str(folder), "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "unsupported_model" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


def test_a_bank_refuses_an_encoder_other_than_its_own(words: set[str], tmp_path: Path) -> None:
    """The bank pins its encoder's content id: the same shape with other weights (another
    checkpoint of the family, or another family) is refused before any profile is served."""
    bert = model_folder(tmp_path / "bert", "bert", words)
    bank_path = tmp_path / "bank.safetensors"
    assert main(["bank", "create", "--model", str(bert), "--out", str(bank_path), "--n", "4"]) == 0
    electra = model_folder(tmp_path / "electra", "electra", words, **FAMILIES["electra"])
    with pytest.raises(BankError) as err:
        MultiProfileModel.load(bank_path, model=str(electra), device="cpu")
    assert err.value.code == "bank_mismatch"


def test_inputs_never_outgrow_the_position_table(words: set[str], tmp_path: Path) -> None:
    """RoBERTa-style models number positions from their padding index + 1: with a tokenizer that
    sets no limit of its own, the longest input still fits the table, and runs."""
    folder = model_folder(tmp_path / "roberta", "roberta", words, **FAMILIES["roberta"])
    config = (folder / "tokenizer_config.json").read_text()
    (folder / "tokenizer_config.json").write_text(
        config.replace(f'"model_max_length": {POSITIONS}', '"model_max_length": 1e30')
    )
    encoder = load_encoder(str(folder))
    pad = encoder.model.config.pad_token_id
    assert encoder.tokenizer.model_max_length > 10**6
    assert encoder.max_tokens == POSITIONS + 2 - (pad + 1)
    long_text = " ".join(sorted(words) * 20)
    enc = encoder.tokenize([long_text], max_length=10_000)
    assert enc["input_ids"].shape[1] == encoder.max_tokens
    with torch.no_grad():
        assert torch.isfinite(encoder(enc)).all()
    bert = load_encoder(str(model_folder(tmp_path / "bert", "bert", words)))
    assert bert.max_tokens == POSITIONS  # no padding index in BERT's position table
