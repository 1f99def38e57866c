"""Abstention ("none of mine"): a profile's out-of-scope rule and the scores it reads.

A rule turns one row's score (from its logits, or from its pooled embedding and the profile's
class means) into an empirical *confidence*: the fraction of the profile's held-out in-scope
examples that scored lower. That makes the operating point ``min_confidence`` a number in
[0, 1] whatever the score, so a request can override it without knowing the score type. The
rule stores the score at :data:`KNOT_QUANTILES` (fp16 in the ``.xpm`` file) and maps any score
between two knots linearly. A row whose confidence is below ``min_confidence`` abstains.

Pure tensor arithmetic, no encoder: fitting a rule to a trained profile lives in
:mod:`xpeft.training.abstain_fit`, applying it to a batch in :mod:`xpeft.engine.runtime`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from xpeft.adapters.errors import XPeftError
from xpeft.profiles.constants import ABSTAIN_SCORES, CLASS_MEAN_SCORES, MAX_ABSTAIN_COST

__all__ = [
    "ABSTAIN_SCORES",
    "CLASS_MEAN_SCORES",
    "KNOT_QUANTILES",
    "AbstainRule",
    "auroc",
    "knots_of",
    "pick_operating_point",
    "row_scores",
]

# Where the rule samples the held-out scores: dense at the low end, where operating points lie.
KNOT_QUANTILES = (
    0.0,
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.7,
    0.9,
    1.0,
)
FP16_MAX = 65504.0
# Operating points tried when OOS examples choose one (the largest that keeps the in-scope cost).
CANDIDATE_POINTS = tuple(i / 200 for i in range(101))  # 0, 0.005, ..., 0.5


def row_scores(
    score: str, logits: torch.Tensor, pooled: torch.Tensor | None = None, means: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B,)`` scores, higher meaning more in scope: ``msp`` (max softmax probability),
    ``max_logit``, ``energy`` (log-sum-exp of the logits, the negated free energy), ``cosine``
    (the largest cosine similarity of the pooled embedding to a class mean; needs both)."""
    logits = logits.float()
    if score == "msp":
        return torch.softmax(logits, dim=-1).amax(dim=-1)
    if score == "max_logit":
        return logits.amax(dim=-1)
    if score == "energy":
        return torch.logsumexp(logits, dim=-1)
    if score == "cosine":
        if pooled is None or means is None:
            raise ValueError("the cosine score needs pooled embeddings and class means")
        unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return (unit @ means.float().T).amax(dim=-1)
    raise ValueError(f"unknown score {score!r}; one of {ABSTAIN_SCORES}")


def knots_of(scores: torch.Tensor) -> torch.Tensor:
    """The held-out scores at :data:`KNOT_QUANTILES`, rounded to what the file stores (fp16)."""
    if scores.numel() == 0:
        raise ValueError("calibrating a rule needs at least one held-out score")
    q = torch.tensor(KNOT_QUANTILES, dtype=torch.float64)
    knots = torch.quantile(scores.double(), q).clamp(-FP16_MAX, FP16_MAX)
    return knots.to(torch.float16).float()


def confidence(
    knots: torch.Tensor, scores: torch.Tensor, quantiles: torch.Tensor | None = None
) -> torch.Tensor:
    """Each score's empirical confidence in [0, 1]: linear between the knots, 0 below, 1 above.

    ``knots``, ``scores`` and ``quantiles`` (:data:`KNOT_QUANTILES` as a tensor; made here when
    not given) must be on one device."""
    q = (
        torch.tensor(KNOT_QUANTILES, dtype=torch.float32, device=knots.device)
        if quantiles is None
        else quantiles
    )
    s = scores.float()
    right = torch.searchsorted(knots, s.contiguous(), right=True)  # knots <= s
    inner = (right > 0) & (right < len(knots))
    hi = right.clamp(1, len(knots) - 1)
    lo = hi - 1
    span = (knots[hi] - knots[lo]).clamp_min(1e-12)
    frac = ((s - knots[lo]) / span).clamp(0.0, 1.0)
    between = q[lo] + frac * (q[hi] - q[lo])
    return torch.where(inner, between, (right >= len(knots)).float())


@dataclass
class AbstainRule:
    """A profile's out-of-scope rule: its score, the knots of that score on held-out in-scope
    examples, the default operating point, and the label answered instead of none (if any)."""

    score: str
    knots: torch.Tensor  # (len(KNOT_QUANTILES),) non-decreasing
    min_confidence: float
    fallback: str | None = None
    class_means: torch.Tensor | None = None  # (C, d) unit vectors, for the cosine score
    # per device: (knots, class_means) as they were when copied, then their copies and the quantiles
    _copies: dict[torch.device, tuple] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        means = 0 if self.class_means is None else self.class_means.numel() * 2
        return (len(KNOT_QUANTILES) + 1) * 2 + means

    def confidence(self, logits: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` confidences of rows with these logits (and pooled embeddings, for cosine), on
        the logits' device: the rule's own tensors are decoded on the host and go there once."""
        knots, means, quantiles = self.on(logits.device)
        return confidence(knots, row_scores(self.score, logits, pooled, means), quantiles)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The knots, the class means and :data:`KNOT_QUANTILES` on ``device``: copied at the first
        batch there, then reused (a served profile's rule never changes; a new one is copied anew)."""
        held = self._copies.get(device)
        if held is None or held[0] is not self.knots or held[1] is not self.class_means:
            means = None if self.class_means is None else self.class_means.to(device)
            quantiles = torch.tensor(KNOT_QUANTILES, dtype=torch.float32, device=device)
            held = (self.knots, self.class_means, self.knots.to(device), means, quantiles)
            self._copies[device] = held
        return held[2], held[3], held[4]

    @classmethod
    def from_stored(
        cls,
        score: str,
        stored: torch.Tensor,
        fallback: str | None,
        means: torch.Tensor | None,
        labels: list[str],
    ) -> AbstainRule:
        """The rule a file holds (the knots then the point; class means as unit rows), checked."""
        if means is not None:
            if not bool(((means.float().norm(dim=-1) - 1).abs() < 1e-2).all()):
                raise XPeftError("bad_argument", "class_means rows must be unit vectors")
            means = means.float()
        stored = stored.float()
        rule = cls(score, stored[:-1], float(stored[-1]), fallback, means)
        rule.check(labels)
        return rule

    def check(self, labels: list[str]) -> None:
        """Refuse a rule that cannot work for a profile with these labels (``bad_argument``)."""
        check_min_confidence(self.min_confidence)
        if len(labels) < 2:
            raise XPeftError("bad_argument", "an abstention rule needs a profile of at least 2 labels")
        if self.score not in ABSTAIN_SCORES:
            raise XPeftError(
                "bad_argument", f"unknown abstention score {self.score!r}; one of {ABSTAIN_SCORES}"
            )
        if self.fallback is not None and self.fallback not in labels:
            raise XPeftError("bad_argument", f"fallback label {self.fallback!r} is not one of {labels}")
        if (self.score in CLASS_MEAN_SCORES) != (self.class_means is not None):
            raise XPeftError(
                "bad_argument", f"the {self.score} score needs class means exactly when it reads them"
            )
        if self.knots.shape != (len(KNOT_QUANTILES),) or not bool(torch.isfinite(self.knots).all()):
            raise XPeftError("bad_argument", "the rule's knots must be finite")
        if bool((self.knots[1:] < self.knots[:-1]).any()):
            raise XPeftError("bad_argument", "the rule's knots must be non-decreasing")


def check_min_confidence(value: object) -> float:
    """An operating point: a finite number in [0, 1] (``bad_argument`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise XPeftError("bad_argument", f"min_confidence must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise XPeftError("bad_argument", f"min_confidence must lie in [0, 1], got {value}")
    return float(value)


def pick_operating_point(
    held_conf: torch.Tensor,
    held_correct: torch.Tensor,
    oos_conf: torch.Tensor,
    cost: float = MAX_ABSTAIN_COST,
) -> float:
    """With OOS examples: the operating point that catches the most of them while the held-out
    in-scope examples it would turn from right to abstained stay within ``cost`` (a fraction);
    the smallest such point when several catch as many."""
    best, best_recall = 0.0, -1.0
    n_held = max(1, held_conf.numel())
    for point in CANDIDATE_POINTS:
        lost = float(((held_conf < point) & held_correct).sum()) / n_held
        if lost > cost:
            break
        recall = float((oos_conf < point).float().mean()) if oos_conf.numel() else 0.0
        if recall > best_recall:
            best, best_recall = point, recall
    return best


def auroc(in_scope: torch.Tensor, out_of_scope: torch.Tensor) -> float:
    """Probability that an in-scope row scores above an out-of-scope one (ties count half)."""
    a, b = in_scope.double().flatten(), out_of_scope.double().flatten()
    if a.numel() == 0 or b.numel() == 0:
        return float("nan")
    both = torch.cat([a, b])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=torch.float64)
    # average the ranks of ties
    values, inverse = torch.unique(both, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))
