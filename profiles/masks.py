"""X-PEFT masks: score tensors ``S (L, N)`` turned into mixing weights over the bank.

- soft: ``w = softmax(S / tau)``;
- hard: ``w = top_k(S) as k-hot / k`` in the forward pass, softmax gradient in the backward
  pass (straight-through estimator), so what is stored is bits.
"""

from __future__ import annotations

import torch


def soft_weights(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(scores / temperature, dim=-1)


def khot(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean k-hot mask of the k largest scores along the last axis (ties: lowest index)."""
    index = torch.topk(scores, k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def hard_weights(scores: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """k-hot / k forward, softmax backward.

    ``hard + (soft - soft.detach())``: the bracket is exactly zero in floating point, so the forward
    value is exactly k-hot / k while the gradient is the softmax's.
    """
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and N={scores.shape[-1]}")
    hard = khot(scores, k).to(scores.dtype) / k
    soft = soft_weights(scores, temperature)
    return hard + (soft - soft.detach())


def mask_to_weights(mask: torch.Tensor, k: int) -> torch.Tensor:
    """A stored boolean mask back to serving weights (k-hot / k)."""
    return mask.to(torch.float32) / k
