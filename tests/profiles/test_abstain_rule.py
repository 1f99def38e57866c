"""The shipped abstention rule: the blend score's bytes and file layout, the conformal default
point, and what a profile too small to calibrate says."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import struct
import zlib

import pytest
import torch

from xpeft.cli.main import main
from xpeft.profiles import format as xpm
from xpeft.profiles.abstain import KNOT_QUANTILES, AbstainRule, conformal_rank, knots_of, row_scores
from xpeft.profiles.format_header import PREFIX, ProfileFormatError
from xpeft.profiles.synthetic import random_profile, random_rule
from xpeft.training.abstain_fit import Scored, rule_from
from xpeft.training.data import Dataset
from xpeft.training.train import TrainConfig, train_profile
from xpeft.training.train_config import DEFAULT_ABSTAIN_RATE, DEFAULT_ABSTAIN_SCORE

MINILM_WIDTH = 384


def test_the_default_score_is_blend() -> None:
    assert DEFAULT_ABSTAIN_SCORE == "blend" and TrainConfig().abstain_score == "blend"


@pytest.mark.parametrize("labels", [2, 6, 15, 77])
def test_a_blend_rule_costs_at_most_64_bytes_plus_96_per_label(labels: int) -> None:
    rule = random_rule(labels, score="blend", hidden_size=MINILM_WIDTH)
    header = len(',"abstain":"blend"')
    assert rule.nbytes == (len(KNOT_QUANTILES) + 3) * 2 + labels * MINILM_WIDTH // 8
    assert rule.nbytes + header <= 64 + 96 * labels
    cosine = random_rule(labels, score="cosine", hidden_size=MINILM_WIDTH)
    assert cosine.nbytes > 10 * rule.nbytes  # fp16 means: 16 bits an entry where the signs take 1


def test_a_blend_rule_round_trips_as_bits(bank) -> None:
    profile = random_profile(bank, "units", seed=3, labels=["a", "b", "c"])
    profile.abstain = random_rule(3, seed=5, score="blend", hidden_size=bank.hidden_size, fallback="b")
    blob = xpm.encode(profile)
    plain = xpm.encode(dataclasses.replace(profile, abstain=None))
    assert len(blob) - len(plain) == profile.abstain.nbytes + len(',"abstain":"blend","fallback":"b"')
    info = xpm.read_info(blob)
    assert info.format_version == 5 and info.abstain == "blend"
    back = xpm.decode(blob, bank).abstain
    assert back is not None and torch.equal(back.class_means, profile.abstain.class_means)
    assert back.weight == profile.abstain.weight and back.calibrated_on == 200
    logits, pooled = torch.randn(9, 3), torch.randn(9, bank.hidden_size)
    assert torch.allclose(back.confidence(logits, pooled), profile.abstain.confidence(logits, pooled))
    assert xpm.encode(xpm.decode(blob, bank)) == blob


def test_rules_without_the_new_fields_keep_version_4_bytes(bank) -> None:
    """A file from before version 5 decodes and encodes back to the same bytes."""
    for score in ("msp", "cosine"):
        profile = random_profile(bank, "hard", seed=1, labels=["neg", "pos"])
        profile.abstain = random_rule(2, seed=2, score=score, hidden_size=bank.hidden_size)
        blob = xpm.encode(profile)
        assert xpm.read_info(blob).format_version == 4
        back = xpm.decode(blob, bank)
        assert back.abstain.calibrated_on is None and xpm.encode(back) == blob


def _reframe(blob: bytes, version: int) -> bytes:
    _, _, length = PREFIX.unpack_from(blob)
    body = PREFIX.pack(b"\x89XPM", version, length) + blob[PREFIX.size : -4]
    return body + struct.pack("<I", zlib.crc32(body))


def _with_tail(blob: bytes, weight: float) -> bytes:
    """``blob`` (a blend rule last) with the rule's weight replaced, checksum redone."""
    profile = xpm.decode(blob)
    signs = (profile.abstain.class_means.numel() + 7) // 8
    body = bytearray(blob[:-4])
    at = len(body) - signs - 2
    body[at : at + 2] = torch.tensor([weight], dtype=torch.float16).numpy().tobytes()
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_damaged_blend_rules_are_refused(bank) -> None:
    profile = random_profile(bank, "units", seed=3, labels=["a", "b"])
    profile.abstain = random_rule(2, seed=5, score="blend", hidden_size=bank.hidden_size)
    blob = xpm.encode(profile)
    for name, data, code in (
        ("version 4", _reframe(blob, 4), "bad_header"),
        ("negative weight", _with_tail(blob, -1.0), "bad_payload"),
        ("infinite weight", _with_tail(blob, math.inf), "bad_payload"),
    ):
        with pytest.raises(ProfileFormatError) as info:
            xpm.decode(data, bank)
        assert info.value.code == code, name
    with pytest.raises(ProfileFormatError) as info:  # cut inside the sign bits
        xpm.decode(blob[:-10] + blob[-4:], bank)
    assert info.value.code in ("truncated", "checksum_mismatch")


def test_blend_adds_the_weighted_largest_logit_to_the_sign_cosine() -> None:
    pooled = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    signs = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 1.0, 1.0]])
    logits = torch.tensor([[0.5, 2.0]])
    got = row_scores("blend", logits, pooled, signs, weight=0.25)
    assert float(got) == pytest.approx((0.6 + 0.8) / 2 + 0.25 * 2.0)


@pytest.mark.parametrize("n", [98, 100, 199])
def test_the_conformal_point_keeps_its_rate_on_new_rows(bank, n: int) -> None:
    """Over many draws, new in-scope rows abstain at ``k / (n + 1)`` on average, never above the
    rate; an interpolated 1% quantile (the rule before) abstains more often."""
    profile = random_profile(bank, "head_only", seed=0, labels=["a", "b"])
    g = torch.Generator().manual_seed(n)
    k = conformal_rank(n, DEFAULT_ABSTAIN_RATE)
    rates, quantile_rates = [], []
    for _ in range(400):  # the mean of 400 rates: within 0.0005 (one standard error) of k / (n + 1)
        held = torch.randn(n, 2, generator=g)
        held[:, 1] -= 10  # max_logit is the first column
        rule = rule_from(
            profile, "max_logit", Scored(held, torch.zeros(n, 4), torch.zeros(n, dtype=torch.long))
        )
        assert rule.calibrated_on == n
        fresh = torch.randn(4000, 2, generator=g)
        fresh[:, 1] -= 10
        conf = rule.confidence(fresh)
        if k == 0:
            assert rule.min_confidence == 0.0
        rates.append(float((conf < rule.min_confidence).float().mean()))
        quantile_rates.append(float((conf < DEFAULT_ABSTAIN_RATE).float().mean()))
    mean = sum(rates) / len(rates)
    assert mean == pytest.approx(k / (n + 1), abs=0.0025)
    assert mean <= DEFAULT_ABSTAIN_RATE + 0.0015  # three standard errors
    if k:
        assert sum(quantile_rates) / len(quantile_rates) > mean + 0.002


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_a_profile_too_small_to_calibrate_says_so(encoder, bank, separable, tmp_path) -> None:
    data = Dataset(separable.inputs * 4, separable.labels * 4)
    config = TrainConfig(method="head_only", epochs=1, max_length=16)
    result = train_profile(encoder, bank, data, config, progress=False)
    rule = result.profile.abstain
    assert rule is not None and rule.score == "blend" and rule.min_confidence == 0.0
    assert rule.calibrated_on == len(result.split.held) < math.ceil(1 / DEFAULT_ABSTAIN_RATE) - 1
    assert any("too few to place the default" in note for note in result.notes)
    path = tmp_path / "small.xpm"
    xpm.save(result.profile, path)
    code, printed, _ = _cli("info", str(path))
    shown = json.loads(printed)["rule"]
    assert code == 0 and shown["calibrated_on"] == rule.calibrated_on and "too few" in shown["note"]
    assert shown["score"] == "blend" and shown["min_confidence"] == 0.0


def test_a_profile_with_enough_rows_abstains_by_default(bank) -> None:
    n = 150
    held = torch.linspace(-1, 1, n).unsqueeze(1).repeat(1, 2)
    held[:, 1] -= 5
    profile = random_profile(bank, "head_only", seed=0, labels=["a", "b"])
    rule = rule_from(profile, "max_logit", Scored(held, torch.zeros(n, 4), torch.zeros(n, dtype=torch.long)))
    assert 0 < rule.min_confidence < 0.01 and "note" not in rule.summary()
    assert "note" not in dataclasses.replace(rule, min_confidence=0.0).summary()  # the user's own 0
    below, at = torch.tensor([[-1.01, -9.0]]), torch.tensor([[-0.99, -9.0]])
    assert bool(rule.confidence(below) < rule.min_confidence)
    assert not bool(rule.confidence(at) < rule.min_confidence)
    assert isinstance(
        AbstainRule.from_stored("max_logit", rule.stored(), None, None, ["a", "b"]), AbstainRule
    )
    assert knots_of(held[:, 0]).shape == (len(KNOT_QUANTILES),)
