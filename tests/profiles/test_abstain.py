"""Abstention: the rule's arithmetic, its place in the .xpm file, training, and mixed batches."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import struct
import zlib

import pytest
import torch

from xpeft.adapters.errors import XPeftError
from xpeft.cli.main import main
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.profiles.abstain import (
    KNOT_QUANTILES,
    AbstainRule,
    auroc,
    confidence,
    knots_of,
    pick_operating_point,
)
from xpeft.profiles.format_header import PREFIX, ProfileFormatError
from xpeft.profiles.synthetic import random_profile, random_rule
from xpeft.training.abstain_fit import Scored, rule_from, split_for_rule
from xpeft.training.data import Dataset
from xpeft.training.train import TrainConfig, train_profile
from xpeft.training.train_config import DEFAULT_ABSTAIN_SCORE

GOOD = ["wonderful", "excellent", "delightful", "brilliant", "lovely", "superb", "great", "charming"]
BAD = ["awful", "terrible", "dreadful", "horrible", "boring", "dismal", "lousy", "painful"]
FRAMES = [
    "the film was {}",
    "a {} experience",
    "what a {} meal",
    "this book is {}",
    "the hotel was {}",
    "such a {} concert",
    "our trip was {}",
    "the service felt {}",
]
OFF_TOPIC = [
    "what time is it in tokyo",
    "set an alarm for seven",
    "how many ounces are in a pound",
    "who is the president of france",
    "convert fifty dollars to euros",
    "what is the capital of peru",
    "remind me to call my mother",
    "how tall is mount everest",
    "spell the word necessary",
    "what is two plus two",
    "turn off the kitchen lights",
    "when does the bank open",
]


@pytest.fixture(scope="module")
def reviews() -> Dataset:
    """128 reviews, 64 per label: enough for a held-out part of 12."""
    inputs, labels = [], []
    for frame in FRAMES:
        for g, b in zip(GOOD, BAD, strict=True):
            inputs += [frame.format(g), frame.format(b)]
            labels += ["pos", "neg"]
    return Dataset(inputs, labels)


@pytest.fixture(scope="module")
def model(encoder, bank) -> MultiProfileModel:
    return MultiProfileModel(encoder, bank)


@pytest.fixture(scope="module")
def trained(encoder, bank, reviews):
    """One head_only profile trained with OOS examples (they pick its operating point)."""
    data = Dataset(reviews.inputs + OFF_TOPIC, reviews.labels + ["oos"] * len(OFF_TOPIC))
    config = TrainConfig(method="head_only", epochs=3, max_length=16, oos_label="oos", lr_head=0.02)
    return train_profile(encoder, bank, data, config, progress=False)


# -- the arithmetic ---------------------------------------------------------------------------
def test_confidence_is_the_held_out_fraction_below() -> None:
    held = torch.arange(1, 201, dtype=torch.float32)  # 1..200
    knots = knots_of(held)
    assert knots.shape == (len(KNOT_QUANTILES),) and bool((knots[1:] >= knots[:-1]).all())
    conf = confidence(knots, torch.tensor([0.0, 1.0, 11.0, 100.5, 200.0, 500.0]))
    assert conf[0] == 0 and conf[-1] == 1 and conf[-2] == 1
    assert conf[2] == pytest.approx(0.05, abs=0.003)  # 10 of 200 held-out scores are below 11
    assert conf[3] == pytest.approx(0.5, abs=0.003)
    assert bool((conf[1:] >= conf[:-1]).all())


def test_tied_knots_do_not_divide_by_zero() -> None:
    knots = knots_of(torch.tensor([1.0] * 50 + [2.0] * 50))
    conf = confidence(knots, torch.tensor([0.5, 1.0, 1.5, 2.0]))
    assert bool(torch.isfinite(conf).all()) and conf[0] == 0 and conf[-1] == 1


def test_auroc_matches_pairwise_counting() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=g) + 1, torch.randn(30, generator=g).round()
    pairs = (a[:, None] > b[None, :]).double() + 0.5 * (a[:, None] == b[None, :]).double()
    assert auroc(a, b) == pytest.approx(float(pairs.mean()), abs=1e-9)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0


def test_operating_point_keeps_the_in_scope_cost() -> None:
    held = torch.linspace(0, 1, 101)  # confidences of 101 held-out rows, all correct
    correct = torch.ones(101, dtype=torch.bool)
    oos = torch.full((10,), 0.3)  # OOS rows sit at 0.3: catching them costs 31% of the in-scope rows
    assert pick_operating_point(held, correct, oos, cost=0.02) <= 0.03
    assert pick_operating_point(held, correct, oos, cost=0.6) == pytest.approx(0.305)
    # wrong answers that abstain cost nothing
    assert pick_operating_point(held, torch.zeros(101, dtype=torch.bool), oos, cost=0.0) == pytest.approx(
        0.305
    )


def test_split_is_stratified_seeded_and_keeps_oos_apart(reviews) -> None:
    data = Dataset(reviews.inputs + OFF_TOPIC, reviews.labels + ["oos"] * len(OFF_TOPIC))
    split = split_for_rule(data, 0.1, seed=3, oos_label="oos")
    assert sorted(split.held.labels) == ["neg"] * 6 + ["pos"] * 6
    assert split.oos.labels == ["oos"] * len(OFF_TOPIC) and "oos" not in split.fit.labels
    assert len(split.fit) + len(split.held) == len(reviews)
    assert not set(split.fit.inputs) & set(split.held.inputs)
    assert split_for_rule(data, 0.1, seed=3, oos_label="oos").held.inputs == split.held.inputs


# -- training ------------------------------------------------------------------------------------
def test_training_fits_a_rule_that_catches_off_topic_inputs(trained, model) -> None:
    rule = trained.profile.abstain
    assert rule is not None and rule.score == DEFAULT_ABSTAIN_SCORE and 0 <= rule.min_confidence <= 0.5
    assert len(trained.split.held) == 12 and len(trained.split.oos) == len(OFF_TOPIC)
    assert "oos" not in trained.profile.labels
    served = xpm.decode(xpm.encode(trained.profile), model.bank)
    scored = Scored.of(model, served, trained.split.held)
    held_conf = served.abstain.confidence(scored.logits, scored.pooled)
    # the knots are the held-out scores: their confidences spread over [0, 1]
    assert float(held_conf.min()) < 0.1 and float(held_conf.max()) > 0.9
    cosine = rule_from(served, "cosine", scored, Scored.of(model, served, trained.split.fit))
    assert cosine.class_means is not None and cosine.class_means.shape == (2, model.encoder.hidden_size)
    assert torch.allclose(cosine.class_means.norm(dim=-1), torch.ones(2), atol=1e-2)
    msp = rule_from(served, "msp", scored)  # no OOS examples given: the conformal default point
    # 12 held-out rows cannot place a 1% point: the rule abstains only where a request asks
    assert msp.class_means is None and msp.min_confidence == 0.0 and msp.calibrated_on == 12


def test_small_data_trains_without_a_rule_and_says_so(encoder, bank, separable) -> None:
    result = train_profile(
        encoder, bank, separable, TrainConfig(method="head_only", epochs=1), progress=False
    )
    assert result.profile.abstain is None and "no abstention rule" in result.notes[0]
    assert xpm.read_info(xpm.encode(result.profile)).format_version == 1  # as before rules existed


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"min_confidence": 1.5}, "bad_argument"),
        ({"min_confidence": -0.1}, "bad_argument"),
        ({"holdout": 0.0}, "bad_argument"),
        ({"abstain_score": "entropy"}, "bad_argument"),
        ({"abstain": False, "fallback_label": "pos"}, "bad_argument"),
        ({"fallback_label": "maybe"}, "bad_data"),  # not one of the labels
        ({"oos_label": "none_such"}, "bad_data"),  # no rows carry it
        ({"min_confidence": 0.1}, "bad_data"),  # asks for a rule the data is too small for
    ],
)
def test_bad_abstention_options_fail_before_training(encoder, bank, separable, options, code) -> None:
    steps: list[dict] = []
    with pytest.raises(XPeftError) as info:
        train_profile(
            encoder,
            bank,
            separable,
            TrainConfig(method="head_only", **options),
            progress=False,
            on_step=steps.append,
        )
    assert info.value.code == code and steps == []  # refused before the first step


# -- the file ------------------------------------------------------------------------------------
def _with_rule(bank, model, score="msp", fallback=None, point=0.05):
    profile = random_profile(bank, "hard", seed=4, labels=["neg", "pos"])
    texts = Dataset([f.format(w) for f in FRAMES for w in GOOD[:2]], ["pos"] * 16)
    held = Scored.of(model, profile, texts)
    profile.abstain = rule_from(profile, score, held, held, min_confidence=point, fallback=fallback)
    return profile


def test_a_rule_round_trips_and_costs_at_most_64_bytes(bank, model) -> None:
    profile = _with_rule(bank, model, fallback="neg")
    blob = xpm.encode(profile)
    plain = xpm.encode(dataclasses.replace(profile, abstain=None))
    assert xpm.read_info(plain).format_version == 1 and xpm.read_info(blob).format_version == 5
    assert len(blob) - len(plain) <= 64 + len('"fallback":"neg",')  # the fallback is the user's own bytes
    back = xpm.decode(blob, bank)
    assert back.abstain is not None and back.abstain.fallback == "neg" and back.abstain.score == "msp"
    assert torch.equal(back.abstain.knots, profile.abstain.knots)
    assert back.abstain.min_confidence == pytest.approx(0.05, abs=1e-4)
    info = xpm.read_info(blob)
    assert info.abstain == "msp" and info.fallback == "neg"
    cosine = _with_rule(bank, model, score="cosine")
    grown = len(xpm.encode(cosine)) - len(plain)
    assert grown == pytest.approx(cosine.abstain.nbytes + len(',"abstain":"cosine"'), abs=2)


def _reframe(blob: bytes, edit, version: int | None = None) -> bytes:
    """The file with its header changed by ``edit`` (and its version), checksum redone."""
    _, old_version, length = PREFIX.unpack_from(blob)
    header = json.loads(blob[PREFIX.size : PREFIX.size + length])
    edit(header)
    raw = json.dumps(header).encode()
    payload = blob[PREFIX.size + length : -4]
    body = PREFIX.pack(b"\x89XPM", version or old_version, len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _repayload(blob: bytes, rule_values: list[float]) -> bytes:
    """The file with its stored rule (knots, point, held-out count, weight) replaced, checksum redone."""
    n = (len(KNOT_QUANTILES) + 3) * 2
    body = blob[:-4]
    body = body[:-n] + torch.tensor(rule_values, dtype=torch.float16).numpy().tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def test_damaged_rules_are_refused_with_codes(bank, model) -> None:
    blob = xpm.encode(_with_rule(bank, model))
    knots = _with_rule(bank, model).abstain.knots.tolist()
    cases = {
        "unknown fallback": (_reframe(blob, lambda h: h.update(fallback="maybe")), "bad_header"),
        "one label": (_reframe(blob, lambda h: h.update(labels=["neg"])), "bad_header"),
        "old version": (_reframe(blob, lambda h: None, version=3), "bad_header"),
        "unknown score": (_reframe(blob, lambda h: h.update(abstain="entropy")), "bad_header"),
        "fallback without rule": (
            _reframe(blob, lambda h: (h.pop("abstain"), h.update(fallback="neg"))),
            "bad_header",
        ),
        "point above 1": (_repayload(blob, knots + [1.5, 16, 0]), "bad_payload"),
        "falling knots": (_repayload(blob, knots[::-1] + [0.05, 16, 0]), "bad_payload"),
        "fractional count": (_repayload(blob, knots + [0.05, 16.5, 0]), "bad_payload"),
        "negative count": (_repayload(blob, knots + [0.05, -3, 0]), "bad_payload"),
        "weight on msp": (_repayload(blob, knots + [0.05, 16, 0.5]), "bad_payload"),
    }
    for name, (data, code) in cases.items():
        with pytest.raises(ProfileFormatError) as info:
            xpm.decode(data, bank)
        assert info.value.code == code, name
    one_label = _with_rule(bank, model)
    one_label.labels, one_label.head_weight = ["neg"], one_label.head_weight[:1]
    with pytest.raises(XPeftError, match="at least 2 labels"):
        xpm.encode(one_label)
    with pytest.raises(XPeftError, match=r"\[0, 1\]"):
        xpm.encode(
            dataclasses.replace(
                one_label,
                labels=["neg", "pos"],
                abstain=dataclasses.replace(one_label.abstain, min_confidence=2.0),
            )
        )


# -- serving -------------------------------------------------------------------------------------
def test_mixed_batches_leave_profiles_without_a_rule_alone(bank, model) -> None:
    ruled = _with_rule(bank, model, point=0.5)
    plain = random_profile(bank, "soft", seed=9, labels=["a", "b", "c"])
    texts = ["the film was superb", "set an alarm for seven", "what a dull meal"]
    alone = model.predict(plain, texts)
    mixed = model.predict_batch([(ruled, texts), (plain, texts), (ruled, texts[:1])])
    for got, want in zip(mixed[1], alone, strict=True):  # as alone, up to batching's float noise
        assert got.as_dict().keys() == want.as_dict().keys() and got.label == want.label
        assert got.scores == pytest.approx(want.scores, abs=1e-5)
    assert all(not p.abstained and p.confidence is None and "confidence" not in p.as_dict() for p in mixed[1])
    for p in mixed[0]:
        assert p.confidence is not None and p.abstained == (p.confidence < ruled.abstain.min_confidence)
        assert p.label == (None if p.abstained else p.top_label)
    assert all(not p.at_operating_point(ruled, 0.0).abstained for p in mixed[0])
    assert all(p.at_operating_point(ruled, 1.0 + 1e-9).abstained for p in mixed[0])
    assert mixed[2][0].label == mixed[0][0].label
    assert mixed[2][0].confidence == pytest.approx(mixed[0][0].confidence, abs=1e-4)


def test_a_fallback_label_answers_instead_of_none(bank, model) -> None:
    ruled = _with_rule(bank, model, fallback="neg", point=0.5)
    (p,) = model.predict(ruled, ["set an alarm for seven"])
    assert p.label == ("neg" if p.abstained else p.top_label)
    always = p.at_operating_point(ruled, 1.0 + 1e-9)
    assert always.abstained and always.label == "neg" and always.scores == p.scores
    never = p.at_operating_point(ruled, 0.0)
    assert not never.abstained and never.label == p.top_label


def test_rule_dataclass_checks(bank) -> None:
    rule = AbstainRule("msp", knots_of(torch.rand(20)), 0.05, None, None)
    rule.check(["a", "b"])
    for bad in (
        dataclasses.replace(rule, fallback="z"),
        dataclasses.replace(rule, score="cosine"),
        dataclasses.replace(rule, min_confidence=float("nan")),
        dataclasses.replace(rule, knots=rule.knots.flip(0) - torch.arange(16.0)),
    ):
        with pytest.raises(XPeftError):
            bad.check(["a", "b"])


# -- the command line ----------------------------------------------------------------------------
def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refusals
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_cli_trains_a_rule_and_predict_shows_it(bank, reviews, tmp_path) -> None:
    bank_file = bank.save(tmp_path / "bank.safetensors")
    data = tmp_path / "train.tsv"
    rows = [
        f"{x}\t{y}" for x, y in zip(reviews.inputs + OFF_TOPIC, reviews.labels + ["none"] * 12, strict=True)
    ]
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "p.xpm"
    base = ["train", "--bank", str(bank_file), "--data", str(data), "--method", "head_only", "--quiet"]
    code, _, err = _cli(*base, "--out", str(out), "--oos-label", "none", "--fallback-label", "maybe")
    assert code == 2 and "fallback label 'maybe'" in err and not out.exists()
    code, _, err = _cli(*base, "--out", str(out), "--min-confidence", "1.5")
    assert code == 2 and "not in [0, 1]" in err and not out.exists()
    code, printed, err = _cli(*base, "--out", str(out), "--oos-label", "none", "--abstain-score", "msp")
    assert code == 0, err
    summary = json.loads(printed)
    assert summary["abstain"]["score"] == "msp" and 0 <= summary["abstain"]["min_confidence"] <= 0.5
    assert xpm.read_info(out.read_bytes()).labels == ["neg", "pos"]
    predict = ["predict", "--bank", str(bank_file), "--profile", str(out), "set an alarm for seven"]
    code, printed, _ = _cli(*predict, "--min-confidence", "1")
    (answer,) = json.loads(printed)
    assert code == 0 and answer["abstained"] == (answer["confidence"] < 1) and "label" in answer
    code, printed, _ = _cli(*predict, "--min-confidence", "0")
    assert json.loads(printed)[0]["abstained"] is False
    assert _cli(*predict, "--min-confidence", "2")[0] == 2


def test_class_means_that_are_not_unit_rows_are_refused(bank) -> None:
    profile = random_profile(bank, "hard", seed=4, labels=["neg", "pos"])
    profile.abstain = random_rule(2, seed=2, score="cosine", hidden_size=bank.hidden_size)
    blob = xpm.encode(profile)
    assert xpm.decode(blob, bank).abstain.class_means.shape == (2, bank.hidden_size)
    n = 2 * bank.hidden_size * 2  # the class means: the last section
    doubled = (profile.abstain.class_means * 2).to(torch.float16).numpy().tobytes()
    body = blob[:-4][:-n] + doubled
    with pytest.raises(ProfileFormatError) as info:
        xpm.decode(body + struct.pack("<I", zlib.crc32(body)), bank)
    assert info.value.code == "bad_payload" and "unit vectors" in info.value.message
