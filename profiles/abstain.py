"""Abstention ("none of mine"): a profile's out-of-scope rule and the scores it reads.

A rule turns one row's score (from its logits, or from its pooled embedding and the profile's
class means) into an empirical *confidence*: the fraction of the profile's held-out in-scope
examples that scored lower. That makes the operating point ``min_confidence`` a number in
[0, 1] whatever the score, so a request can override it without knowing the score type. The
rule stores the score at :data:`KNOT_QUANTILES` (fp16 in the ``.xpm`` file) and maps any score
between two knots linearly. A row whose confidence is below ``min_confidence`` abstains.

The default score, ``blend``, adds the row's largest logit (weighted to the cosine's spread) to
its cosine against each class mean's *signs*: one bit per dimension, 48 bytes a label on a
384-wide encoder where fp16 means cost 768, at the same separation (docs/ABSTENTION.md has the
measurements). The default operating point is conformal: the ``k``-th lowest held-out score with
``k = floor(rate * (n + 1))``, so a new in-scope row abstains with probability at most ``rate``;
a rule calibrated on too few rows for that (``k = 0``) does not abstain by default.

Pure tensor arithmetic, no encoder: fitting a rule to a trained profile lives in
:mod:`xpeft.training.abstain_fit`, applying it to a batch in :mod:`xpeft.engine.runtime`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from xpeft.adapters.errors import XPeftError
from xpeft.profiles.constants import (
    ABSTAIN_SCORES,
    CLASS_MEAN_SCORES,
    DEFAULT_ABSTAIN_RATE,
    MAX_ABSTAIN_COST,
    SIGN_SCORES,
)

__all__ = [
    "ABSTAIN_SCORES",
    "CLASS_MEAN_SCORES",
    "KNOT_QUANTILES",
    "AbstainRule",
    "auroc",
    "conformal_rank",
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
FP16_TINY = 2.0**-24  # the smallest positive fp16: a point just above confidence 0
RULE_VALUES = {4: len(KNOT_QUANTILES) + 1, 5: len(KNOT_QUANTILES) + 3}  # abstain_rule, per format version
# Operating points tried when OOS examples choose one (the largest that keeps the in-scope cost).
CANDIDATE_POINTS = tuple(i / 200 for i in range(101))  # 0, 0.005, ..., 0.5


def row_scores(
    score: str,
    logits: torch.Tensor,
    pooled: torch.Tensor | None = None,
    means: torch.Tensor | None = None,
    weight: float = 0.0,
) -> torch.Tensor:
    """``(B,)`` scores, higher meaning more in scope: ``msp`` (max softmax probability),
    ``max_logit``, ``energy`` (log-sum-exp of the logits, the negated free energy), ``cosine``
    (the largest cosine similarity of the pooled embedding to a class mean), ``blend`` (the
    largest cosine to a class mean's sign vector, plus ``weight`` times the largest logit).
    The class-vector scores need ``pooled`` and ``means`` (unit rows, or +-1 rows for blend)."""
    logits = logits.float()
    if score == "msp":
        return torch.softmax(logits, dim=-1).amax(dim=-1)
    if score == "max_logit":
        return logits.amax(dim=-1)
    if score == "energy":
        return torch.logsumexp(logits, dim=-1)
    if score in CLASS_MEAN_SCORES:
        if pooled is None or means is None:
            raise ValueError(f"the {score} score needs pooled embeddings and class vectors")
        unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
        cosine = (unit @ means.float().T).amax(dim=-1)
        if score == "cosine":
            return cosine
        return cosine / math.sqrt(means.shape[-1]) + weight * logits.amax(dim=-1)
    raise ValueError(f"unknown score {score!r}; one of {ABSTAIN_SCORES}")


def sign_vectors(means: torch.Tensor) -> torch.Tensor:
    """``(C, d)`` +-1 rows: the signs of class means (zero counts as +1), what a file's bits hold."""
    return torch.where(means >= 0, 1.0, -1.0)


def blend_weight(cosine: torch.Tensor, max_logit: torch.Tensor) -> float:
    """The weight that gives the largest logit the cosine's spread on the same rows, so neither
    term drowns the other (0 where the logits do not vary), as the file stores it (fp16)."""
    spread = float(max_logit.float().std()) if max_logit.numel() > 1 else 0.0
    if not math.isfinite(spread) or spread <= 0:
        return 0.0
    weight = float(cosine.float().std()) / spread
    return float(torch.tensor(min(weight, FP16_MAX)).to(torch.float16)) if math.isfinite(weight) else 0.0


def conformal_rank(n: int, rate: float) -> int:
    """``k``: a new row exchangeable with ``n`` held-out rows falls below the ``k``-th lowest of
    them with probability ``k / (n + 1)``, at most ``rate``. 0 when ``n`` is too small."""
    return math.floor(rate * (n + 1) + 1e-9)


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
    # (C, d): unit class means (cosine) or their signs as +-1 (blend)
    class_means: torch.Tensor | None = None
    weight: float = 0.0  # blend: what the largest logit weighs against the cosine
    calibrated_on: int | None = None  # held-out rows behind the knots (None: a file that predates it)
    # per device: (knots, class_means) as they were when copied, then their copies and the quantiles
    _copies: dict[torch.device, tuple] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def format_version(self) -> int:
        """The oldest file version that holds this rule: 4 for the rules it always held."""
        return 5 if self.score in SIGN_SCORES or self.calibrated_on is not None else 4

    @property
    def nbytes(self) -> int:
        """Bytes of the rule's sections in a file."""
        means = 0
        if self.class_means is not None:
            bits = 1 if self.score in SIGN_SCORES else 16
            means = (self.class_means.numel() * bits + 7) // 8
        return RULE_VALUES[self.format_version] * 2 + means

    @property
    def too_few_to_calibrate(self) -> bool:
        """Held out on too few rows to place the default operating point (:func:`conformal_rank`
        of :data:`DEFAULT_ABSTAIN_RATE` is 0); False where the count is unknown."""
        return self.calibrated_on is not None and conformal_rank(self.calibrated_on, DEFAULT_ABSTAIN_RATE) < 1

    def summary(self) -> dict[str, object]:
        """What ``xpeft train`` and ``xpeft info`` show of the rule."""
        out: dict[str, object] = {
            "score": self.score,
            "min_confidence": self.min_confidence,
            "fallback": self.fallback,
            "calibrated_on": self.calibrated_on,
        }
        too_few = (
            self.calibrated_on is not None and conformal_rank(self.calibrated_on, DEFAULT_ABSTAIN_RATE) < 1
        )
        if self.min_confidence == 0 and too_few:
            out["note"] = (
                f"calibrated on {self.calibrated_on} held-out examples: too few for a default "
                "operating point, so rows abstain only where a request sets min_confidence"
            )
        return out

    def stored(self) -> torch.Tensor:
        """The ``abstain_rule`` section: the knots and the operating point; from version 5 also
        the held-out count (0: unknown) and the blend weight."""
        values = [*self.knots.float().tolist(), self.min_confidence]
        if self.format_version >= 5:
            values += [float(min(self.calibrated_on or 0, FP16_MAX)), self.weight]
        return torch.tensor(values)

    def confidence(self, logits: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` confidences of rows with these logits (and pooled embeddings, for the
        class-vector scores), on the logits' device: the rule's own tensors are decoded on the host
        and go there once."""
        knots, means, quantiles = self.on(logits.device)
        return confidence(knots, row_scores(self.score, logits, pooled, means, self.weight), quantiles)

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

    def conformal_point(self, held_scores: torch.Tensor, rate: float) -> float | None:
        """The operating point at which a new in-scope row abstains with probability at most
        ``rate`` (:func:`conformal_rank`): the confidence of the ``k``-th lowest held-out score,
        raised just above 0 for ``k = 1`` so that rows below the lowest one abstain. None where
        the held-out rows are too few for ``rate``."""
        k = conformal_rank(held_scores.numel(), rate)
        if k < 1:
            return None
        threshold = held_scores.float().sort().values[k - 1 : k]
        point = float(confidence(self.knots.float(), threshold)[0])
        return max(point, FP16_TINY)

    @classmethod
    def from_stored(
        cls,
        score: str,
        stored: torch.Tensor,
        fallback: str | None,
        means: torch.Tensor | None,
        labels: list[str],
    ) -> AbstainRule:
        """The rule a file holds (:meth:`stored`; class means as unit rows, or as bits for the
        sign scores), checked."""
        if means is not None:
            if score in SIGN_SCORES:
                means = sign_vectors(means.float() - 0.5)
            elif not bool(((means.float().norm(dim=-1) - 1).abs() < 1e-2).all()):
                raise XPeftError("bad_argument", "class_means rows must be unit vectors")
            means = means.float()
        stored = stored.float()
        knots, rest = stored[: len(KNOT_QUANTILES)], stored[len(KNOT_QUANTILES) :].tolist()
        count = rest[1] if len(rest) > 1 else 0.0
        if count < 0 or count != int(count):
            raise XPeftError("bad_argument", f"the rule's held-out count must be a whole number, got {count}")
        count = int(count)
        weight = float(rest[2]) if len(rest) > 2 else 0.0
        rule = cls(score, knots, float(rest[0]), fallback, means, weight, count or None)
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
                "bad_argument", f"the {self.score} score needs class vectors exactly when it reads them"
            )
        if self.class_means is not None and self.class_means.shape[0] != len(labels):
            raise XPeftError("bad_argument", "the rule needs one class vector per label")
        if self.knots.shape != (len(KNOT_QUANTILES),) or not bool(torch.isfinite(self.knots).all()):
            raise XPeftError("bad_argument", "the rule's knots must be finite")
        if bool((self.knots[1:] < self.knots[:-1]).any()):
            raise XPeftError("bad_argument", "the rule's knots must be non-decreasing")
        if not (math.isfinite(self.weight) and 0.0 <= self.weight <= FP16_MAX):
            raise XPeftError("bad_argument", f"the rule's weight must be finite and >= 0, got {self.weight}")
        if self.weight and self.score not in SIGN_SCORES:
            raise XPeftError("bad_argument", f"the {self.score} score has no weight")
        if self.calibrated_on is not None and not 0 < self.calibrated_on <= FP16_MAX:
            raise XPeftError("bad_argument", f"calibrated_on={self.calibrated_on} is out of range")


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
