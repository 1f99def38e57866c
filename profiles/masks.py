"""X-PEFT masks: score tensors ``S (L, N)`` turned into mixing weights over the bank.

- soft: ``w = softmax(S / tau)``;
- hard: ``w = top_k(S) as k-hot / k**p`` in the forward pass (``p = 1``: the mean of the k
  selected adapters, as in the paper), a surrogate gradient in the backward pass
  (straight-through estimator), so what is stored is bits.

The estimators differ only in the backward pass: ``softmax`` takes the softmax's gradient (the
paper's), ``identity`` passes the gradient to the scores unchanged (edge-popup), ``gumbel`` adds
Gumbel noise to the scores before the top-k while training (a stochastic top-k) and takes the
softmax gradient of the noisy scores.
"""

from __future__ import annotations

import math

import torch

from xpeft.profiles.constants import ESTIMATORS


def soft_weights(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(scores / temperature, dim=-1)


def khot(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean k-hot mask of the k largest scores along the last axis (ties: lowest index)."""
    index = torch.topk(scores, k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def hard_scale(k: int, scale_power: float = 1.0) -> float:
    """The weight of one selected adapter: ``1 / k**p``."""
    return 1.0 / float(k) ** scale_power


def hard_weights(
    scores: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    estimator: str = "softmax",
    scale_power: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """k-hot / k**p forward, a surrogate gradient backward.

    ``hard + (g - g.detach())``: the bracket is exactly zero in floating point, so the forward
    value is exactly k-hot / k**p while the gradient is the surrogate ``g``'s.
    """
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and N={scores.shape[-1]}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} is not one of {ESTIMATORS}")
    picked = scores
    if estimator == "gumbel":
        uniform = torch.rand(scores.shape, generator=generator, device="cpu").to(scores.device)
        picked = scores - torch.log(-torch.log(uniform.clamp_min(1e-20)))  # scores + Gumbel(0, 1)
    hard = khot(picked.detach(), k).to(scores.dtype) * hard_scale(k, scale_power)
    surrogate = picked if estimator == "identity" else soft_weights(picked, temperature)
    return hard + (surrogate - surrogate.detach())


def unit_scale(k: int, bottleneck: int) -> float:
    """The weight of one selected unit: ``sqrt(r / k)``. The k units fall on the r bottleneck
    positions, about k / r on each, and a sum of c independent random columns grows like
    ``sqrt(c)``: so scaled, the fused adapter is as large as one bank adapter whatever k is."""
    return math.sqrt(bottleneck / k)


def unit_weights(
    scores: torch.Tensor, k: int, temperature: float = 1.0, estimator: str = "identity"
) -> torch.Tensor:
    """k-hot (exactly 0 or 1) over the units of each row forward, a surrogate gradient backward.

    ``identity`` passes the gradient to every score unchanged (edge-popup), so a dropped unit
    can come back; ``softmax`` takes ``k * softmax(S / tau)``'s, as the hard masks do.
    """
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and {scores.shape[-1]} units")
    hard = khot(scores.detach(), k).to(scores.dtype)
    surrogate = scores if estimator == "identity" else k * soft_weights(scores, temperature)
    return hard + (surrogate - surrogate.detach())


def mask_to_weights(mask: torch.Tensor, k: int, scale_power: float = 1.0) -> torch.Tensor:
    """A stored boolean mask back to serving weights (k-hot / k**p)."""
    return mask.to(torch.float32) * hard_scale(k, scale_power)
