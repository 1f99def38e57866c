"""Fitting a profile's abstention rule: the held-out split, class means, knots, operating point.

Training holds out a seeded, stratified part of each label's examples before it starts, trains
on the rest, and then scores the held-out part with the trained profile exactly as the server
would (:meth:`MultiProfileModel.features`). Those scores are the rule's knots. OOS examples the
customer gives (rows of the label ``oos_label`` names) never train the head: they only choose
the operating point.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from xpeft.adapters.errors import XPeftError
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles.abstain import (
    AbstainRule,
    blend_weight,
    check_min_confidence,
    knots_of,
    pick_operating_point,
    row_scores,
    sign_vectors,
)
from xpeft.profiles.constants import SIGN_SCORES
from xpeft.profiles.profile import Profile
from xpeft.training.data import DataError, Dataset
from xpeft.training.train_config import CLASS_MEAN_SCORES, DEFAULT_ABSTAIN_RATE, MIN_HOLDOUT, TrainConfig

__all__ = [
    "Scored",
    "Split",
    "calibration_note",
    "check_training_data",
    "class_means",
    "fit_rule",
    "rule_from",
    "rule_split",
    "split_for_rule",
]


@dataclass
class Split:
    """The training data cut for a rule: what trains, what calibrates, and the OOS examples."""

    fit: Dataset
    held: Dataset
    oos: Dataset


def split_for_rule(data: Dataset, fraction: float, seed: int, oos_label: str | None = None) -> Split:
    """Each label keeps at least one training example and gives ``floor(fraction * n)`` of its
    ``n`` to the held-out part, drawn with a seeded generator; OOS rows go to their own part."""
    by_label: dict[str, list[int]] = defaultdict(list)
    oos: list[int] = []
    for i, label in enumerate(data.labels):
        (oos if label == oos_label else by_label[label]).append(i)
    held: list[int] = []
    for label in sorted(by_label):
        rows = by_label[label]
        take = min(int(fraction * len(rows)), len(rows) - 1)
        held += random.Random(f"holdout:{seed}:{label}").sample(rows, take) if take > 0 else []
    chosen = set(held) | set(oos)
    fit = [i for i in range(len(data)) if i not in chosen]
    return Split(data.select(fit), data.select(sorted(held)), data.select(oos))


def rule_split(train: Dataset, config: TrainConfig) -> tuple[Split | None, list[str]]:
    """The held-out cut for the abstention rule, or None (with a note) where the data is too small
    for one and the user asked for nothing that needs it."""
    if not config.abstain:
        return None, []
    split = split_for_rule(train, config.holdout, config.seed, config.oos_label)
    if config.oos_label is not None and not len(split.oos):
        raise DataError("bad_data", f"no training rows carry the OOS label {config.oos_label!r}")
    if len(split.held) >= MIN_HOLDOUT:
        return split, []
    asked = config.min_confidence is not None or config.fallback_label or config.oos_label
    if asked:
        raise DataError(
            "bad_data",
            f"the abstention rule needs at least {MIN_HOLDOUT} held-out examples; holdout="
            f"{config.holdout} of this data gives {len(split.held)}",
        )
    note = f"no abstention rule: holdout={config.holdout} leaves {len(split.held)} examples, fewer than {MIN_HOLDOUT}"
    return None, [note]


def check_training_data(train: Dataset, config: TrainConfig) -> tuple[Split | None, list[str], Dataset]:
    """Everything about ``train`` that training would refuse, before it starts: the rule's cut
    (:func:`rule_split`), then at least 2 labels left to fit and the fallback among them. The
    trainer runs it, and the training route runs it before a job is queued, so a request is never
    accepted only to fail ``bad_data`` in the queue. The split, its notes and the rows that fit."""
    split, notes = rule_split(train, config)
    fit = split.fit if split is not None else train
    labels = fit.label_names()
    if config.fallback_label is not None and config.fallback_label not in labels:
        raise DataError(
            "bad_data", f"fallback label {config.fallback_label!r} is not one of the labels {labels}"
        )
    if len(labels) < 2:
        raise DataError("bad_data", f"training needs at least 2 labels, found {labels}")
    return split, notes, fit


def class_means(pooled: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``(C, d)`` unit-length means of each label's unit-length embeddings."""
    unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
    sums = torch.zeros(num_labels, unit.shape[1]).index_add_(0, labels, unit)
    means = torch.nn.functional.normalize(sums, dim=-1)
    return means.to(torch.float16).float()  # what the file stores


def label_ids(profile: Profile, data: Dataset) -> torch.Tensor:
    position = {name: i for i, name in enumerate(profile.labels)}
    return torch.tensor([position[y] for y in data.labels], dtype=torch.long)


@dataclass
class Scored:
    """One set of rows as a rule reads them: logits and pooled embeddings (and the true label
    ids, where the rows are in scope)."""

    logits: torch.Tensor
    pooled: torch.Tensor
    labels: torch.Tensor | None = None

    @classmethod
    def of(cls, model: MultiProfileModel, profile: Profile, data: Dataset, batch_size: int = 64) -> Scored:
        logits, pooled = model.features(profile, data.inputs, batch_size)
        in_scope = all(y in profile.labels for y in data.labels)
        return cls(logits, pooled, label_ids(profile, data) if in_scope else None)


def fit_rule(
    model: MultiProfileModel,
    profile: Profile,
    split: Split,
    score: str,
    min_confidence: float | None = None,
    fallback: str | None = None,
    batch_size: int = 64,
) -> AbstainRule:
    """The rule of ``score`` for a trained profile: knots from the held-out part; the operating
    point as given, else picked on the OOS examples when there are any, else the default."""
    if len(split.held) < MIN_HOLDOUT:
        raise XPeftError(
            "bad_data",
            f"an abstention rule needs at least {MIN_HOLDOUT} held-out examples, the split gave "
            f"{len(split.held)}: give more training data, a larger holdout, or turn abstention off",
        )
    fit = Scored.of(model, profile, split.fit, batch_size) if score in CLASS_MEAN_SCORES else None
    held = Scored.of(model, profile, split.held, batch_size)
    oos = Scored.of(model, profile, split.oos, batch_size) if len(split.oos) else None
    return rule_from(profile, score, held, fit, oos, min_confidence, fallback)


def rule_from(
    profile: Profile,
    score: str,
    held: Scored,
    fit: Scored | None = None,
    oos: Scored | None = None,
    min_confidence: float | None = None,
    fallback: str | None = None,
) -> AbstainRule:
    """:func:`fit_rule` on rows already scored (``fit`` only for the class-vector scores)."""
    means, weight = None, 0.0
    if score in CLASS_MEAN_SCORES:
        assert fit is not None and fit.labels is not None
        means = class_means(fit.pooled, fit.labels, profile.num_labels)
        if score in SIGN_SCORES:
            means = sign_vectors(means)
            cosine = row_scores(score, fit.logits, fit.pooled, means)  # weight 0: the cosine alone
            weight = blend_weight(cosine, fit.logits.float().amax(-1))
    held_scores = row_scores(score, held.logits, held.pooled, means, weight)
    rule = AbstainRule(
        score, knots_of(held_scores), 0.0, fallback, means, weight, calibrated_on=len(held_scores)
    )
    if min_confidence is not None:
        rule.min_confidence = check_min_confidence(min_confidence)
    elif oos is not None:
        assert held.labels is not None
        correct = held.logits.argmax(-1) == held.labels
        held_conf = rule.confidence(held.logits, held.pooled)
        rule.min_confidence = pick_operating_point(
            held_conf, correct, rule.confidence(oos.logits, oos.pooled)
        )
    else:  # conformal: rounded down to what the file stores, so no more rows abstain than promised
        point = rule.conformal_point(held_scores, DEFAULT_ABSTAIN_RATE) or 0.0
        stored = np.float16(point)
        rule.min_confidence = float(np.nextafter(stored, np.float16(0)) if stored > point else stored)
    rule.min_confidence = float(torch.tensor(rule.min_confidence).to(torch.float16))  # as stored
    rule.check(profile.labels)
    return rule


def calibration_note(rule: AbstainRule | None, config: TrainConfig) -> str | None:
    """What a user should know where the default operating point could not be placed: too few
    held-out rows for the default rate, so the profile abstains only where a request asks."""
    if rule is None or not rule.too_few_to_calibrate or config.min_confidence is not None or config.oos_label:
        return None
    need = math.ceil(1 / DEFAULT_ABSTAIN_RATE) - 1
    return (
        f"the abstention rule is calibrated on {rule.calibrated_on} held-out examples, too few to "
        f"place the default {DEFAULT_ABSTAIN_RATE:.1%} operating point (it needs {need}): the "
        "profile does not abstain unless a request sets min_confidence; train on more data or "
        "raise holdout"
    )
