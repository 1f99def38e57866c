"""The ``hard`` kind: two k-hot masks over the bank's adapters (the paper's X-PEFT), stored as bits.

Format version 2 may add ``scale_power`` (a selected adapter weighs ``1 / k**p``), per-layer
``gains`` of the fused adapter and ``values`` (a weight for each selected adapter); a profile
without them is written as version 1. It fuses by reading only its ``k`` selected adapters per
layer (``gather``), or in the GEMM over the whole bank where that is faster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xpeft.profiles.kinds.base import (
    SCORE_FIELDS,
    SELECT_FIELDS,
    HeaderField,
    Kind,
    KindParams,
    KindState,
    Shape,
    TrainSettings,
    checked_gains,
)

if TYPE_CHECKING:
    import torch

    from xpeft.adapters.bank import AdapterBank
    from xpeft.adapters.fusion import FusedAdapters
    from xpeft.profiles.format_codecs import Section


@dataclass(eq=False)
class HardState(KindState):
    mask_down: torch.Tensor  # bool (L, N), k set per row
    mask_up: torch.Tensor
    scale_power: float = 1.0  # a selected adapter weighs 1 / k**p
    gains: torch.Tensor | None = None  # (L,) positive gain of each layer's fused adapter
    values: torch.Tensor | None = None  # (2, L, N) weight of each selected adapter (0 elsewhere)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_down, mask_up)``, bool ``(L, N)`` k-hot."""
        return self.mask_down, self.mask_up


class HardParams(KindParams):
    """Two score tensors ``(L, N)``; optionally a per-layer gain and a weight per selected adapter."""

    def __init__(self, bank: AdapterBank, config: TrainSettings, k: int) -> None:
        import torch
        from torch import nn

        from xpeft.profiles.masks import hard_scale

        L, N, _, _ = bank.down.shape
        self.bank, self.config, self.k = bank, config, k
        self.noise = torch.Generator().manual_seed(config.seed + 1)  # Gumbel draws, independent of order
        self.scores_down = nn.Parameter(torch.randn(L, N) * config.score_init_std)
        self.scores_up = nn.Parameter(torch.randn(L, N) * config.score_init_std)
        # (L,): one gain per layer on the fused adapter's output, as a logarithm so it stays
        # positive. A second gain on the down mask would be redundant: the ReLU is positively
        # homogeneous, so relu(g·x)·B = relu(x)·(g·B) and the two gains only act as a product.
        self.log_gain = (
            nn.Parameter(torch.full((L,), math.log(config.resolved_gain_init()))) if config.gain else None
        )
        self.values = (
            nn.Parameter(torch.full((2, L, N), hard_scale(k, config.scale_power)))
            if config.weighted
            else None
        )

    def param_groups(self) -> list[dict]:
        groups: list[dict] = [
            {"params": [self.scores_down, self.scores_up], "lr": self.config.lr_scores, "weight_decay": 0.0}
        ]
        extras = [p for p in (self.log_gain, self.values) if p is not None]
        if extras:
            groups.append({"params": extras, "lr": self.config.lr_gain, "weight_decay": 0.0})
        return groups

    def score_tensors(self) -> list[torch.Tensor]:
        return [self.scores_down, self.scores_up]

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        from xpeft.profiles.masks import khot

        return khot(self.scores_down.detach(), self.k), khot(self.scores_up.detach(), self.k)

    def gains(self) -> torch.Tensor | None:
        return None if self.log_gain is None else self.log_gain.exp()

    def weights(self, temperature: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from xpeft.profiles.masks import hard_scale, hard_weights

        c = self.config
        noise = self.noise if training else None
        chosen = c.resolved_estimator()
        estimator = chosen if training or chosen != "gumbel" else "softmax"
        out = []
        for i, scores in enumerate((self.scores_down, self.scores_up)):
            w = hard_weights(scores, self.k, temperature, estimator, c.scale_power, noise)
            if self.values is not None:  # each selected adapter's own weight instead of 1/k**p
                w = w / hard_scale(self.k, c.scale_power) * self.values[i]
            if self.log_gain is not None and i == 1:
                w = w * self.log_gain.exp().unsqueeze(-1)
            out.append(w)
        return out[0], out[1]

    def fused(self, temperature: float, training: bool) -> FusedAdapters:
        from xpeft.adapters.fusion import fuse

        w_down, w_up = self.weights(temperature, training)
        return fuse(w_down.unsqueeze(0), w_up.unsqueeze(0), self.bank)

    def to_state(self, shape: Shape, temperature: float) -> HardState:
        import torch

        mask_down, mask_up = (m.cpu() for m in self.masks())
        state = HardState(mask_down, mask_up, scale_power=self.config.scale_power)
        gains = self.gains()
        if gains is not None:
            state.gains = gains.detach().cpu().float().clone()
        if self.values is not None:
            keep = torch.stack(state.masks()).to(torch.float32)
            state.values = self.values.detach().cpu().float() * keep
        return state


class Hard(Kind):
    wire = "hard"
    uses_bank = True
    fusion = "gather"
    min_version = 1
    header_fields = (
        HeaderField("scale_power", 1.0, 0.0, 4.0),
        HeaderField("gains", False),
        HeaderField("values", False),
    )
    train_fields = SCORE_FIELDS + SELECT_FIELDS + ("gain", "scale_power", "weighted")
    selects = True
    estimators = ("softmax", "identity", "gumbel")
    state_type = HardState
    bank_shapes = ("num_adapters", "bottleneck")

    def k_bounds(self, N: int, r: int) -> tuple[int, int]:
        return 1, N

    def header_options(self, state: KindState | None) -> dict:
        assert isinstance(state, HardState)
        fields: dict = {}
        if state.scale_power != 1.0:
            fields["scale_power"] = float(state.scale_power)
        if state.gains is not None:
            fields["gains"] = True
        if state.values is not None:
            fields["values"] = True
        return fields

    def sections(self, shape: Shape, options: Mapping[str, object]) -> list[Section]:
        from xpeft.profiles.format_codecs import Section

        L, N, k = shape.L, shape.N, shape.k
        out = [Section("mask_down", "bits", (L, N)), Section("mask_up", "bits", (L, N))]
        if options.get("gains", False):
            out.append(Section("gains", "f16", (L,)))
        if options.get("values", False):
            out.append(Section("values", "f16", (2, L, k)))
        return out

    def stored(self, state: KindState | None, section: Section, shape: Shape) -> torch.Tensor | None:
        import torch

        assert isinstance(state, HardState)
        if section.name == "values" and state.values is not None:  # only the selected: (2, L, k)
            return state.values[torch.stack(state.masks())].view(2, shape.L, shape.k)
        return super().stored(state, section, shape)

    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: Shape, options: Mapping[str, object]
    ) -> HardState:
        import torch

        scale_power = options.get("scale_power", 1.0)
        assert isinstance(scale_power, int | float)
        state = HardState(tensors["mask_down"], tensors["mask_up"], scale_power=float(scale_power))
        if "gains" in tensors:
            state.gains = checked_gains(tensors)
        if "values" in tensors:
            values = torch.zeros(2, shape.L, shape.N)
            values[torch.stack(state.masks())] = tensors["values"].flatten()
            state.values = values
        return state

    def mixing_weights(self, state: KindState | None, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from xpeft.profiles.masks import mask_to_weights

        assert isinstance(state, HardState)
        out = []
        for i, mask in enumerate(state.masks()):
            if state.values is not None:  # each selected adapter's own weight
                w = mask.to(torch.float32) * state.values[i].float()
            else:
                w = mask_to_weights(mask, shape.k, state.scale_power)
            if state.gains is not None and i == 1:  # on the up projection: scales the output
                w = w * state.gains.float().unsqueeze(-1)
            out.append(w)
        return out[0], out[1]

    def trainable(self, bank: AdapterBank, config: TrainSettings, k: int) -> HardParams:
        return HardParams(bank, config, k)

    def random(  # type: ignore[override]  # its own options
        self,
        generator: torch.Generator,
        shape: Shape,
        scale_power: float = 1.0,
        gains: bool = False,
        weighted: bool = False,
    ) -> tuple[int, HardState]:
        import torch

        from xpeft.profiles.masks import khot

        g, (L, N) = generator, (shape.L, shape.N)
        k = shape.k or max(1, N // 10)
        state = HardState(
            khot(torch.randn(L, N, generator=g), k), khot(torch.randn(L, N, generator=g), k), scale_power
        )
        if gains:
            state.gains = torch.rand(L, generator=g) * 1.5 + 0.25
        if weighted:
            keep = torch.stack(state.masks()).float()
            state.values = (torch.rand(2, L, N, generator=g) * 0.4 - 0.1) * keep
        return k, state
