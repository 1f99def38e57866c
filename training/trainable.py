"""The parameters one training run owns: the head, common to all methods, and the kind's own.

Each kind (:mod:`xpeft.profiles.kinds`) makes its parameters and says how they become a fused
adapter and what the profile file keeps of them: ``hard`` and ``soft`` train two score tensors
``(L, N)`` over the bank (``hard`` may also train a per-layer gain and a weight for each selected
adapter), ``units`` scores over the bank's ``N*r`` units of each layer with per-layer gains and an
optional output scaling vector, ``single_adapter`` one adapter of its own, ``head_only`` nothing
but the head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.errors import XPeftError
from xpeft.adapters.fusion import FusedAdapters
from xpeft.profiles.kinds import METHODS, ProfileKind
from xpeft.profiles.profile import Profile

if TYPE_CHECKING:
    from xpeft.training.train_config import TrainConfig


class Trainable(nn.Module):
    """One profile's trainable parameters for ``method``, on a bank already on the training device."""

    def __init__(self, method: str, bank: AdapterBank, num_labels: int, config: TrainConfig) -> None:
        super().__init__()
        if method not in METHODS:
            raise XPeftError("bad_argument", f"unknown method {method!r}; one of {METHODS}")
        L, N, d, r = bank.down.shape
        self.method, self.kind, self.config = method, ProfileKind(method), config
        spec = self.kind.spec
        config.check_bank(N, r)
        self.k = config.resolved_k(N, r) if spec.selects else 0
        self.temperature = config.temperature
        self.head = nn.Linear(d, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.params = spec.trainable(bank, config, self.k)
        for name, parameter in self.params.named_parameters():  # moved and trained with the module
            self.register_parameter(name, parameter)

    def param_groups(self) -> list[dict]:
        return [
            {"params": list(self.head.parameters()), "lr": self.config.lr_head},
            *self.params.param_groups(),
        ]

    @property
    def frozen_features(self) -> bool:
        """Whether the encoder's features are fixed (no adapter trains): they need no gradient."""
        return not self.params.named_parameters()

    def score_tensors(self) -> list[torch.Tensor]:
        """The selection scores (one tensor when a units selection is tied), if the kind trains any."""
        return self.params.score_tensors()

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current k-hot masks (hard: over adapters; units: over units)."""
        masks = self.params.masks()
        if masks is None:
            raise ValueError(f"method {self.method!r} selects nothing")
        return masks

    def gains(self) -> torch.Tensor | None:
        return self.params.gains()

    def fused(self) -> FusedAdapters | None:
        return self.params.fused(self.temperature, self.training)

    def to_profile(
        self, bank: AdapterBank, labels: list[str], max_length: int, meta: dict[str, str]
    ) -> Profile:
        """What the profile file stores: bits (and any gains / weights) for hard, not the scores."""
        profile = Profile.for_bank(
            self.kind,
            bank,
            labels,
            head_weight=self.head.weight.detach().cpu().float().clone(),
            head_bias=self.head.bias.detach().cpu().float().clone(),
            max_length=max_length,
            meta=meta,
        )
        profile.k = self.k
        profile.state = self.params.to_state(profile.shape, self.temperature)
        return profile
