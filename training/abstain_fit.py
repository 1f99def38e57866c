"""Fitting a profile's abstention rule: the held-out split, class means, knots, operating point.

Training holds out a seeded, stratified part of each label's examples before it starts, trains
on the rest, and then scores the held-out part with the trained profile exactly as the server
would (:meth:`MultiProfileModel.features`). Those scores are the rule's knots. OOS examples the
customer gives (rows of the label ``oos_label`` names) never train the head: they only choose
the operating point.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from xpeft.adapters.errors import XPeftError
from xpeft.profiles.abstain import (
    AbstainRule,
    check_min_confidence,
    knots_of,
    pick_operating_point,
    row_scores,
)
from xpeft.profiles.profile import Profile
from xpeft.profiles.runtime import MultiProfileModel
from xpeft.training.data import Dataset
from xpeft.training.train_config import CLASS_MEAN_SCORES, DEFAULT_MIN_CONFIDENCE, MIN_HOLDOUT

__all__ = ["Scored", "Split", "class_means", "fit_rule", "rule_from", "split_for_rule"]


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
    """:func:`fit_rule` on rows already scored (``fit`` only for the class-mean scores)."""
    means = None
    if score in CLASS_MEAN_SCORES:
        assert fit is not None and fit.labels is not None
        means = class_means(fit.pooled, fit.labels, profile.num_labels)
    rule = AbstainRule(
        score, knots_of(row_scores(score, held.logits, held.pooled, means)), 0.0, fallback, means
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
    else:
        rule.min_confidence = DEFAULT_MIN_CONFIDENCE
    rule.min_confidence = float(torch.tensor(rule.min_confidence).to(torch.float16))  # as stored
    rule.check(profile.labels)
    return rule
