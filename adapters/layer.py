"""The adapter slot: a wrapper around an encoder layer's feed-forward output projection.

Pfeiffer placement: after the output projection, before the residual LayerNorm. The slot holds
no weights of its own; the caller sets the fused weights of the batch's U profiles and, per row,
which profile it belongs to, so one forward pass serves many profiles.
"""

from __future__ import annotations

import torch
from torch import nn

from xpeft.adapters import kernels
from xpeft.adapters.kernels import KernelChoice


def apply_adapters(
    h: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    rows: torch.Tensor | None,
    choice: KernelChoice | None = None,
) -> torch.Tensor:
    """``h + relu(h A_u + a_u) B_u + b_u`` where u is each row's profile.

    ``h (B, T, d)``; ``down (U, d, r)``, ``down_bias (U, r)``, ``up (U, r, d)``, ``up_bias (U, d)``;
    ``rows (B,)`` maps rows to profiles or to slots of a pool (``U`` is then the pool's slot count;
    ``None`` when U == 1). This is the reference path that runs everywhere; the Triton kernel
    replaces it on CUDA where ``choice`` turns it on (``None``: the torch path).
    """
    if choice is not None and choice.enabled("apply", h, down, down_bias, up, up_bias):  # CUDA + Triton
        return kernels.apply_adapters_triton(h, down, down_bias, up, up_bias, rows)
    if down.shape[0] == 1:
        z = torch.relu(torch.matmul(h, down[0]) + down_bias[0])
        return h + (torch.matmul(z, up[0]) + up_bias[0])
    assert rows is not None, "rows must map each row to a profile when U > 1"
    # index_select copies whole rows (memcpy) where advanced indexing runs the general index
    # kernel; the in-place ReLU and residual add save two (B, T, *) temporaries per layer
    z = torch.baddbmm(down_bias.index_select(0, rows).unsqueeze(1), h, down.index_select(0, rows)).relu_()
    return torch.baddbmm(up_bias.index_select(0, rows).unsqueeze(1), z, up.index_select(0, rows)).add_(h)


class AdapterSlot(nn.Module):
    """Wraps ``nn.Linear`` so its output goes through the batch's per-row adapters."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.dense = dense
        self.weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.rows: torch.Tensor | None = None
        #: the kernels this slot may run (the encoder's choice; ``None``: the torch path)
        self.kernels: KernelChoice | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense(x)
        if self.weights is None:
            return h
        return apply_adapters(h, *self.weights, self.rows, self.kernels)
