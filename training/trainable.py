"""The parameters one training method owns, and how they become fused adapters.

``hard`` and ``soft`` train two score tensors ``(L, N)`` over the bank; ``hard`` may also train a
per-layer gain of its fused adapter (``gain``) and a weight for each selected adapter (``weighted``), which
are stored with the masks. ``units`` trains scores over the bank's ``N*r`` units of each layer (one
tensor when ``tied``, else one per projection), one gain per layer and, with ``out_scale``, a
per-layer output scaling vector. ``single_adapter`` trains one adapter of its own, ``head_only``
nothing but the head. The head is common to all.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from xpeft.adapters.bank import TENSOR_NAMES, AdapterBank
from xpeft.adapters.errors import XPeftError
from xpeft.adapters.fusion import FusedAdapters, fuse, fuse_unit_weights
from xpeft.profiles.format import quantize_rows
from xpeft.profiles.masks import hard_scale, hard_weights, khot, soft_weights, unit_scale, unit_weights
from xpeft.profiles.profile import Profile, ProfileKind
from xpeft.training.train_config import METHODS

if TYPE_CHECKING:
    from xpeft.training.train_config import TrainConfig


class Trainable(nn.Module):
    """One profile's trainable parameters for ``method``, on a bank already on the training device."""

    def __init__(self, method: str, bank: AdapterBank, num_labels: int, config: TrainConfig) -> None:
        super().__init__()
        L, N, d, r = bank.down.shape
        self.method, self.bank, self.config = method, bank, config
        config.check_bank(N, r)
        self.k = config.resolved_k(N, r) if method in ("hard", "units") else 0
        self.temperature = config.temperature
        self.noise = torch.Generator().manual_seed(config.seed + 1)  # Gumbel draws, independent of order
        self.head = nn.Linear(d, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if method in ("hard", "soft"):
            self.scores_down = nn.Parameter(torch.randn(L, N) * config.score_init_std)
            self.scores_up = nn.Parameter(torch.randn(L, N) * config.score_init_std)
        elif method == "units":
            self.scores_down = nn.Parameter(torch.randn(L, N * r) * config.score_init_std)
            self.scores_up = (
                self.scores_down
                if config.tied
                else nn.Parameter(torch.randn(L, N * r) * config.score_init_std)
            )
        elif method == "single_adapter":
            # Identity at the start (up = 0), the usual adapter initialisation.
            self.down = nn.Parameter(torch.randn(L, d, r) * 0.02)
            self.down_bias = nn.Parameter(torch.zeros(L, r))
            self.up = nn.Parameter(torch.zeros(L, r, d))
            self.up_bias = nn.Parameter(torch.zeros(L, d))
        elif method != "head_only":
            raise XPeftError("bad_argument", f"unknown method {method!r}; one of {METHODS}")
        self.log_gain: nn.Parameter | None = None
        self.values: nn.Parameter | None = None
        self.out_scale: nn.Parameter | None = None
        if method == "units" and config.out_scale:  # starts at 1: the gain alone sets the strength
            self.out_scale = nn.Parameter(torch.ones(L, d))
        if (method == "hard" and config.gain) or method == "units":
            # (L,): one gain per layer on the fused adapter's output, as a logarithm so it stays
            # positive. A second gain on the down mask would be redundant: the ReLU is positively
            # homogeneous, so relu(g·x)·B = relu(x)·(g·B) and the two gains only act as a product.
            self.log_gain = nn.Parameter(torch.full((L,), math.log(config.resolved_gain_init())))
        if method == "hard" and config.weighted:
            self.values = nn.Parameter(torch.full((2, L, N), hard_scale(self.k, config.scale_power)))

    def param_groups(self) -> list[dict]:
        c = self.config
        groups: list[dict] = [{"params": list(self.head.parameters()), "lr": c.lr_head}]
        if self.method in ("hard", "soft", "units"):
            scores = list(dict.fromkeys([self.scores_down, self.scores_up]))  # one tensor when tied
            groups.append({"params": scores, "lr": c.lr_scores, "weight_decay": 0.0})
        elif self.method == "single_adapter":
            groups.append({"params": [self.down, self.down_bias, self.up, self.up_bias], "lr": c.lr_adapter})
        extras = [p for p in (self.log_gain, self.values) if p is not None]
        if extras:
            groups.append({"params": extras, "lr": c.lr_gain, "weight_decay": 0.0})
        if self.out_scale is not None:
            groups.append({"params": [self.out_scale], "lr": c.lr_out_scale, "weight_decay": 0.0})
        return groups

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current k-hot masks (hard: over adapters; units: over units)."""
        return khot(self.scores_down.detach(), self.k), khot(self.scores_up.detach(), self.k)

    def gains(self) -> torch.Tensor | None:
        return None if self.log_gain is None else self.log_gain.exp()

    def unit_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each unit's weight, ``(L, N*r)`` per projection: k-hot times the unit weight forward."""
        scale = unit_scale(self.k, self.bank.bottleneck)
        c, t = self.config, self.temperature
        estimator = c.resolved_estimator()
        down = unit_weights(self.scores_down, self.k, t, estimator) * scale
        up = down if c.tied else unit_weights(self.scores_up, self.k, t, estimator) * scale
        return down, up

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.temperature
        if self.method == "soft":
            return soft_weights(self.scores_down, t), soft_weights(self.scores_up, t)
        c = self.config
        noise = self.noise if self.training else None
        chosen = c.resolved_estimator()
        estimator = chosen if self.training or chosen != "gumbel" else "softmax"
        out = []
        for i, scores in enumerate((self.scores_down, self.scores_up)):
            w = hard_weights(scores, self.k, t, estimator, c.scale_power, noise)
            if self.values is not None:  # each selected adapter's own weight instead of 1/k**p
                w = w / hard_scale(self.k, c.scale_power) * self.values[i]
            if self.log_gain is not None and i == 1:
                w = w * self.log_gain.exp().unsqueeze(-1)
            out.append(w)
        return out[0], out[1]

    def fused(self) -> FusedAdapters | None:
        if self.method == "units":
            w_down, w_up = self.unit_weights()
            assert self.log_gain is not None  # a units profile always has its gains
            gains = self.log_gain.exp().unsqueeze(0)
            out = None if self.out_scale is None else self.out_scale.unsqueeze(0)
            return fuse_unit_weights(w_down.unsqueeze(0), w_up.unsqueeze(0), self.bank, gains, out)
        if self.method in ("hard", "soft"):
            w_down, w_up = self.weights()
            return fuse(w_down.unsqueeze(0), w_up.unsqueeze(0), self.bank)
        if self.method == "single_adapter":
            return FusedAdapters.from_single({n: getattr(self, n) for n in TENSOR_NAMES})
        return None

    def to_profile(
        self, bank: AdapterBank, labels: list[str], max_length: int, meta: dict[str, str]
    ) -> Profile:
        """What the profile file stores: bits (and any gains / weights) for hard, not the scores."""
        profile = Profile.for_bank(
            ProfileKind(self.method),
            bank,
            labels,
            head_weight=self.head.weight.detach().cpu().float().clone(),
            head_bias=self.head.bias.detach().cpu().float().clone(),
            max_length=max_length,
            meta=meta,
        )
        if self.method == "hard":
            profile.k = self.k
            profile.mask_down, profile.mask_up = (m.cpu() for m in self.masks())
            profile.scale_power = self.config.scale_power
            gains = self.gains()
            if gains is not None:
                profile.gains = gains.detach().cpu().float().clone()
            if self.values is not None:
                keep = torch.stack(profile.masks()).to(torch.float32)
                profile.values = self.values.detach().cpu().float() * keep
        elif self.method == "units":
            profile.k, profile.tied = self.k, self.config.tied
            L = profile.num_layers  # the units the forward pass used: ascending ids of the k-hot rows
            profile.unit_index = torch.stack(
                [torch.nonzero(m)[:, 1].view(L, self.k) for m in self.masks()]
            ).cpu()
            gains = self.gains()
            assert gains is not None
            profile.gains = gains.detach().cpu().float().clone()
            if self.out_scale is not None:  # as the file holds it: int8 rows times an fp16 step
                q, step = quantize_rows(self.out_scale)
                profile.out_scale = q.float() * step.unsqueeze(-1)
        elif self.method == "soft":
            profile.weights_down, profile.weights_up = (w.detach().cpu().float() for w in self.weights())
        elif self.method == "single_adapter":
            profile.adapter = {n: getattr(self, n).detach().cpu().float().clone() for n in TENSOR_NAMES}
        return profile
