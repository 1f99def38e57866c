"""Random but valid profiles, for load tests, benchmarks and tests that need many of them.

Training 10,000 profiles is not needed to measure serving: a profile's cost does not depend on
which adapters its masks pick.
"""

from __future__ import annotations

import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.profiles.abstain import AbstainRule, knots_of
from xpeft.profiles.format import quantize_rows
from xpeft.profiles.masks import khot
from xpeft.profiles.profile import Profile, ProfileKind


def random_profile(
    bank: AdapterBank,
    kind: ProfileKind | str = ProfileKind.HARD,
    seed: int = 0,
    labels: list[str] | None = None,
    k: int | None = None,
    max_length: int = 128,
    scale_power: float = 1.0,
    gains: bool = False,
    weighted: bool = False,
    tied: bool = False,
    out_scale: bool = False,
) -> Profile:
    """A seeded random profile of any kind that fits ``bank``; hard ones may carry the
    version-2 extras (a scale exponent, per-layer gains, a weight per selected adapter), units
    ones a tied selection and an output scaling vector."""
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
    if kind is ProfileKind.HARD:
        profile.k = k or max(1, N // 10)
        profile.mask_down = khot(torch.randn(L, N, generator=g), profile.k)
        profile.mask_up = khot(torch.randn(L, N, generator=g), profile.k)
        profile.scale_power = scale_power
        if gains:
            profile.gains = torch.rand(L, generator=g) * 1.5 + 0.25
        if weighted:
            keep = torch.stack([profile.mask_down, profile.mask_up]).float()
            profile.values = (torch.rand(2, L, N, generator=g) * 0.4 - 0.1) * keep
    elif kind is ProfileKind.UNITS:
        profile.k, profile.tied = k or 4 * r, tied
        rows = [torch.nonzero(khot(torch.randn(L, N * r, generator=g), profile.k))[:, 1] for _ in range(2)]
        index = torch.stack(rows).view(2, L, profile.k)
        profile.unit_index = torch.stack([index[0], index[0]]) if tied else index
        profile.gains = torch.rand(L, generator=g) * 0.5 + 0.1
        if out_scale:
            q, step = quantize_rows(torch.rand(L, d, generator=g) * 2 - 0.5)
            profile.out_scale = q.float() * step.unsqueeze(-1)
    elif kind is ProfileKind.SOFT:
        profile.weights_down = torch.softmax(torch.randn(L, N, generator=g) * 2, -1)
        profile.weights_up = torch.softmax(torch.randn(L, N, generator=g) * 2, -1)
    elif kind is ProfileKind.SINGLE_ADAPTER:
        profile.adapter = {
            "down": torch.randn(L, d, r, generator=g) * d**-0.5,
            "down_bias": torch.randn(L, r, generator=g) * 0.1,
            "up": torch.randn(L, r, d, generator=g) * r**-0.5 * 0.2,
            "up_bias": torch.randn(L, d, generator=g) * 0.1,
        }
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
    seeded unit class means of ``hidden_size`` (what a trained rule costs to apply)."""
    g = torch.Generator().manual_seed(seed)
    held = 1 / num_labels + (1 - 1 / num_labels) * torch.rand(200, generator=g)
    means = None
    if score == "cosine":
        means = torch.nn.functional.normalize(torch.randn(num_labels, hidden_size, generator=g), dim=-1)
        means = means.to(torch.float16).float()
    return AbstainRule(score, knots_of(held), min_confidence, fallback, means)
