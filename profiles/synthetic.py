"""Random but valid profiles, for load tests, benchmarks and tests that need many of them.

Training 10,000 profiles is not needed to measure serving: a profile's cost does not depend on
which adapters its masks pick.
"""

from __future__ import annotations

from typing import Any

import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.profiles.abstain import AbstainRule, knots_of, sign_vectors
from xpeft.profiles.constants import CLASS_MEAN_SCORES, SIGN_SCORES
from xpeft.profiles.kinds import Shape
from xpeft.profiles.profile import Profile, ProfileKind


def random_profile(
    bank: AdapterBank,
    kind: ProfileKind | str = ProfileKind.HARD,
    seed: int = 0,
    labels: list[str] | None = None,
    k: int | None = None,
    max_length: int = 128,
    **options: Any,
) -> Profile:
    """A seeded random profile of any kind that fits ``bank``. ``options`` are the kind's own
    (its ``random`` in :mod:`xpeft.profiles.kinds`): a hard profile may carry the version-2
    extras (``scale_power``, ``gains``, ``weighted``: a weight per selected adapter), a units one
    a ``tied`` selection and an ``out_scale`` vector."""
    kind = ProfileKind(kind)
    g = torch.Generator().manual_seed(seed)
    L, N, d, r = bank.down.shape
    labels = labels or ["negative", "positive"]
    C = len(labels)
    profile = Profile.for_bank(
        kind,
        bank,
        labels,
        head_weight=torch.randn(C, d, generator=g) * d**-0.5,
        head_bias=torch.randn(C, generator=g) * 0.1,
        max_length=max_length,
        meta={"method": f"random:{kind.value}", "seed": str(seed)},
    )
    profile.k, profile.state = profile.spec.random(g, Shape(L, N, d, r, C, k or 0), **options)
    return profile


def random_rule(
    num_labels: int,
    seed: int = 0,
    min_confidence: float = 0.05,
    fallback: str | None = None,
    score: str = "msp",
    hidden_size: int = 0,
) -> AbstainRule:
    """A valid abstention rule: knots of seeded scores in ``[1/C, 1]``; for ``cosine``, also
    seeded unit class means of ``hidden_size``, for ``blend`` their signs and a weight (what a
    trained rule costs to apply)."""
    g = torch.Generator().manual_seed(seed)
    held = 1 / num_labels + (1 - 1 / num_labels) * torch.rand(200, generator=g)
    means, weight = None, 0.0
    if score in CLASS_MEAN_SCORES:
        means = torch.nn.functional.normalize(torch.randn(num_labels, hidden_size, generator=g), dim=-1)
        means = means.to(torch.float16).float()
    count = None  # as files before version 5 hold them
    if score in SIGN_SCORES and means is not None:
        means, weight, count = sign_vectors(means), 0.25, len(held)
    return AbstainRule(score, knots_of(held), min_confidence, fallback, means, weight, count)
