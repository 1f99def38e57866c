"""One row's answer: the profile's label probabilities, and the abstention rule's verdict on them.

The runtime builds these from each row's logits (one softmax for the whole batch); the server and
the CLI turn them into JSON with :meth:`Prediction.as_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xpeft.profiles.profile import Profile


@dataclass
class Prediction:
    """One row's answer. ``label`` is None (or the profile's fallback label) when it abstained;
    ``score`` and ``scores`` are always the profile's own label probabilities, and ``confidence``
    is the row's confidence under the profile's abstention rule (None without a rule)."""

    label: str | None
    score: float
    scores: dict[str, float]
    abstained: bool = False
    confidence: float | None = None

    def as_dict(self) -> dict:
        out = {"label": self.label, "score": self.score, "scores": self.scores, "abstained": self.abstained}
        if self.confidence is not None:
            out["confidence"] = self.confidence
        return out

    @property
    def top_label(self) -> str:
        """The most probable of the profile's labels, whether or not the row abstained."""
        return max(self.scores, key=self.scores.__getitem__)

    def at_operating_point(self, profile: Profile, min_confidence: float | None) -> Prediction:
        """This answer under another operating point (None: the profile's own); unchanged for a
        profile without a rule."""
        rule = profile.abstain
        if rule is None or self.confidence is None:
            return self
        return self.with_confidence(profile, self.confidence, min_confidence)

    def with_confidence(
        self, profile: Profile, confidence: float, min_confidence: float | None = None
    ) -> Prediction:
        """The answer once the profile's rule has given this row ``confidence``."""
        rule = profile.abstain
        assert rule is not None
        point = rule.min_confidence if min_confidence is None else min_confidence
        abstained = confidence < point
        label = rule.fallback if abstained else self.top_label
        return Prediction(label, self.score, self.scores, abstained, confidence)


def to_prediction(profile: Profile, logits: torch.Tensor) -> Prediction:
    return from_probs(profile, torch.softmax(logits.float(), dim=-1).tolist())


def from_probs(profile: Profile, probs: list[float]) -> Prediction:
    """The prediction for one row's label probabilities (padding columns past its labels ignored)."""
    probs = probs[: profile.num_labels]
    best = max(range(len(probs)), key=probs.__getitem__)
    return Prediction(
        label=profile.labels[best], score=probs[best], scores=dict(zip(profile.labels, probs, strict=True))
    )
